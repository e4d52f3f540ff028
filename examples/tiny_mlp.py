"""A three-layer MLP with random weights: the smallest model a recipe can run in seconds."""

import torch


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 8))
    return model.eval(), torch.randn(4, 32)
