"""Tiny models built for the tests: each small enough to export in seconds."""

from __future__ import annotations

import textwrap

import torch


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


class ResidualCNN(torch.nn.Module):
    """Conv-BN-ReLU, a residual block, global average pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.block = torch.nn.Sequential(
            torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1)
        )
        self.head = torch.nn.Linear(8, 5)

    def forward(self, image):
        x = self.stem(image)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


class TinyEncoder(torch.nn.Module):
    """Token embedding + a 2-layer transformer encoder honouring a padding attention mask."""

    def __init__(self, vocab: int = 50, width: int = 16):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        layer = torch.nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=32, dropout=0.1, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        return hidden


class TupleDictOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(4, 2)

    def forward(self, x):
        return {"logits": self.a(x), "extra": (self.b(x), x.sum(dim=1)), "unused": None}


class TwoDtypes(torch.nn.Module):
    """A float feature input and an integer category input."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(7, 4)
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, features, category):
        return self.proj(features) + self.table(category)


def tokens(batch: int = 2, seq: int = 6, vocab: int = 50):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[0, -2:] = 0
    return ids, mask


def build(name: str):
    """(module, example_inputs) by name, seeded."""
    torch.manual_seed(0)
    if name == "mlp":
        return MLP(), torch.randn(3, 6)
    if name == "cnn":
        return ResidualCNN(), torch.randn(2, 3, 12, 12)
    if name == "encoder":
        ids, mask = tokens()
        return TinyEncoder(), {"input_ids": ids, "attention_mask": mask}
    if name == "tuple_dict":
        return TupleDictOutputs(), (torch.randn(2, 4),)
    if name == "two_dtypes":
        return TwoDtypes(), (torch.randn(3, 4), torch.tensor([0, 3, 6]))
    raise KeyError(name)


# A factory file for recipes and CLI tests (``tiny.py:build``): a 3-layer MLP with its example input.
MLP_FACTORY_SOURCE = textwrap.dedent(
    """
    import torch

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                    torch.nn.Linear(64, 8))
        return model.eval(), torch.randn(4, 32)
    """
)

