"""The docstring Llama's variants: their own cache folders, their parameters recorded."""

from __future__ import annotations

import json

import pytest

from onnxforge.common.errors import UserError
from onnxforge.decoder_models import DOCSTRING_LLAMA_VERSION, build_docstring_llama, docstring_llama, docstring_llama_name


def test_the_default_model_keeps_its_folder_and_a_variant_gets_its_own():
    assert docstring_llama_name() == DOCSTRING_LLAMA_VERSION == "docstring-llama-v2"
    assert docstring_llama_name(steps=2000) == "docstring-llama-v2-s2000"
    assert docstring_llama_name(steps=1000, layers=4, hidden=256) == "docstring-llama-v2-s1000-l4-h256"
    assert docstring_llama_name(steps=300, hidden=256) == "docstring-llama-v2-h256"
    assert len({docstring_llama_name(steps=s) for s in (300, 1000, 2000)}) == 3
    assert docstring_llama_name(weight_decay=0.01) == "docstring-llama-v2"  # the default: the tests' cached model
    assert docstring_llama_name(steps=1000, weight_decay=0.1) == "docstring-llama-v2-s1000-wd0.1"
    assert docstring_llama_name(steps=800, layers=4, hidden=256, weight_decay=1.0, seed=1) == "docstring-llama-v2-s800-l4-h256-wd1-seed1"
    assert docstring_llama_name(seed=0) == "docstring-llama-v2"
    assert docstring_llama_name(steps=800, layers=4, hidden=256, weight_decay=0.1) == "docstring-llama-v2-s800-l4-h256-wd0.1"
    assert docstring_llama_name(weight_decay=0.0) == "docstring-llama-v2-wd0"
    assert len({docstring_llama_name(weight_decay=w) for w in (0.0, 0.01, 0.05, 0.1)}) == 4


def test_a_variant_is_built_once_into_its_folder_with_its_parameters_recorded(tmp_path):
    folder = docstring_llama(tmp_path, steps=20, layers=1, hidden=16)
    assert folder == tmp_path / "docstring-llama-v2-s20-l1-h16"
    assert not (tmp_path / DOCSTRING_LLAMA_VERSION).exists()
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (1, 16, 48)
    training = (folder / "TRAINING.txt").read_text()
    assert training.startswith("docstring-llama-v2-s20-l1-h16: ")
    assert "1 layers of hidden 16, 20 AdamW steps of 32x64 tokens (one-cycle, peak lr 0.003, weight decay 0.01)" in training
    assert "final loss " in training
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert docstring_llama(tmp_path, steps=20, layers=1, hidden=16) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # found, not trained again


def test_the_weight_decay_reaches_the_optimizer_and_the_folder(tmp_path, monkeypatch):
    import torch

    decays = []

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            decays.append(tuple(group["weight_decay"] for group in self.param_groups))
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    folder = docstring_llama(tmp_path, steps=20, layers=1, hidden=16, weight_decay=0.1)
    assert folder == tmp_path / "docstring-llama-v2-s20-l1-h16-wd0.1"
    assert decays == [(0.1,)] * 20  # every step of the one parameter group decays by 0.1
    assert "(one-cycle, peak lr 0.003, weight decay 0.1)" in (folder / "TRAINING.txt").read_text()


@pytest.mark.parametrize("kwargs", [dict(steps=19), dict(layers=0), dict(hidden=20), dict(weight_decay=-0.1),
                                    dict(weight_decay=400.0)])
def test_an_impossible_variant_is_one_clear_error(tmp_path, kwargs):
    with pytest.raises(UserError, match="docstring llama: steps .* need steps >= 20"):
        build_docstring_llama(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()
