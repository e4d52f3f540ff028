"""Structured pruning: each block type prunes and still runs; exact cases match; unsafe patterns stay."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporter import export
from onnxforge.cli import main
from onnxforge.common.errors import UserError
from optimizers import PruneSettings, prune


def _export(module, example, tmp_path, name="m.onnx"):
    torch.manual_seed(0)
    return onnx.load(str(export(module.eval(), example, tmp_path / name).path))


def _run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _weights(model):
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


def _calib(path, shape, name, n=32):
    np.savez(path, **{name: np.random.default_rng(0).standard_normal((n, *shape)).astype(np.float32)})
    return path


class ConvChain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, image):
        x = torch.relu(self.c1(image))
        x = torch.relu(self.c2(x))
        x = torch.relu(self.c3(x))
        return self.fc(x.mean(dim=(2, 3)))


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.block = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                         torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16))
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, image):
        x = self.stem(image)
        x = torch.relu(x + self.block(x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ConcatBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.a = torch.nn.Conv2d(8, 16, 1)
        self.b = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.merge = torch.nn.Conv2d(32, 8, 1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, image):
        x = torch.relu(self.stem(image))
        x = torch.cat([torch.relu(self.a(x)), torch.relu(self.b(x))], dim=1)
        return self.fc(torch.relu(self.merge(x)).mean(dim=(2, 3)))


class DepthwiseSeparable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.expand = torch.nn.Conv2d(8, 32, 1)
        self.depthwise = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.project = torch.nn.Conv2d(32, 8, 1)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, image):
        x = torch.relu(self.stem(image))
        x = torch.relu(self.depthwise(torch.relu(self.expand(x))))
        return self.fc(self.project(x).mean(dim=(2, 3)))


class FFNBlock(torch.nn.Module):
    """A transformer layer's residual stream with layer norm and a GELU feed-forward block."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.up = torch.nn.Linear(16, 64)
        self.down = torch.nn.Linear(64, 16)

    def forward(self, hidden):
        return self.norm(hidden + self.down(torch.nn.functional.gelu(self.up(hidden))))


class ReshapeTrap(torch.nn.Module):
    """Conv channels flow into a Reshape: not provably safe, must stay untouched."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 4 * 4, 4)

    def forward(self, image):
        x = torch.relu(self.c2(torch.relu(self.c1(image))))
        return self.fc(x.reshape(x.shape[0], -1))


def _check_pruned(original, result, feeds, min_cosine):
    onnx.checker.check_model(result.model, full_check=True)
    assert result.parameters[1] < result.parameters[0] and result.macs[1] < result.macs[0]
    out = _run(result.model, feeds)
    ref = _run(original, feeds)
    assert out.shape == ref.shape
    cosine = float(np.sum(out * ref) / np.linalg.norm(out) / np.linalg.norm(ref))
    assert cosine > min_cosine, cosine


IMAGE = {"image": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}


def test_conv_chain(tmp_path):
    model = _export(ConvChain(), torch.randn(2, 3, 8, 8), tmp_path)
    result = prune(model, PruneSettings(ratio=0.5))
    kept = {u.producers: (u.channels, u.kept) for u in result.units}
    assert sum(1 for c, k in kept.values() if k == 8 and c == 16) == 2  # c2 and c3 halved; c1 protected
    assert any(u.reason == "first layer (protected by default)" for u in result.units)
    shapes = sorted(s for s in _weights(result.model).values() if len(s) == 4)
    assert shapes == [(8, 8, 3, 3), (8, 16, 3, 3), (16, 3, 3, 3)]
    _check_pruned(model, result, IMAGE, 0.5)


def test_residual_block_prunes_coupled_layers_alike(tmp_path):
    model = _export(Residual(), torch.randn(2, 3, 8, 8), tmp_path)
    protected = prune(model, PruneSettings(ratio=0.5))  # the residual group contains the stem: protected
    residual_group = next(u for u in protected.units if len(u.producers) == 2)
    assert residual_group.kept == residual_group.channels
    result = prune(model, PruneSettings(ratio=0.5, protect_first=False))
    group = next(u for u in result.units if len(u.producers) == 2)
    assert (group.channels, group.kept) == (16, 8)
    conv_shapes = sorted(s for s in _weights(result.model).values() if len(s) == 4)
    assert conv_shapes == [(8, 3, 3, 3), (8, 8, 3, 3), (8, 8, 3, 3)]
    _check_pruned(model, result, IMAGE, 0.0)


def test_concat_block_prunes_each_branch_at_its_offset(tmp_path):
    module = ConcatBlock()
    with torch.no_grad():  # channels 8..15 of branch a and 0..7 of branch b are dead: pruning them is exact
        module.a.weight[8:] = 0
        module.a.bias[8:] = -1
        module.b.weight[:8] = 0
        module.b.bias[:8] = -1
    model = _export(module, torch.randn(2, 3, 8, 8), tmp_path)
    result = prune(model, PruneSettings(ratio=0.5, bias_compensation=False))
    shapes = _weights(result.model)
    assert sorted(s for s in shapes.values() if len(s) == 4 and s[0] == 8 and s[1] in (8, 16)) == [(8, 8, 1, 1), (8, 8, 3, 3), (8, 16, 1, 1)]
    out, ref = _run(result.model, IMAGE), _run(model, IMAGE)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)  # exactly the dead channels went


def test_depthwise_separable(tmp_path):
    model = _export(DepthwiseSeparable(), torch.randn(2, 3, 8, 8), tmp_path)
    result = prune(model, PruneSettings(ratio=0.5))
    shapes = _weights(result.model)
    assert (16, 8, 1, 1) in shapes.values() and (16, 1, 3, 3) in shapes.values() and (8, 16, 1, 1) in shapes.values()
    depthwise = next(n for n in result.model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))
    assert next(a.i for a in depthwise.attribute if a.name == "group") == 16  # the group attribute follows
    _check_pruned(model, result, IMAGE, 0.0)


def test_transformer_ffn_prunes_intermediate_neurons(tmp_path):
    model = _export(FFNBlock(), torch.randn(2, 5, 16), tmp_path)
    result = prune(model, PruneSettings(ratio=0.5, protect_first=False))  # "up" reads the graph input here
    shapes = _weights(result.model)
    assert (16, 32) in shapes.values() and (32, 16) in shapes.values() and (32,) in shapes.values()
    assert any("LayerNormalization" in (u.reason or "") or "Add" in (u.reason or "") for u in result.units)
    hidden = {"hidden": np.random.default_rng(2).standard_normal((3, 5, 16)).astype(np.float32)}
    _check_pruned(model, result, hidden, 0.5)


def test_unsupported_pattern_stays_untouched(tmp_path):
    model = _export(ReshapeTrap(), torch.randn(2, 3, 4, 4), tmp_path)
    with pytest.raises(UserError, match="nothing could be pruned at ratio 0.5: .*Reshape"):
        prune(model, PruneSettings(ratio=0.5, protect_first=False))
    result = prune(model, PruneSettings(ratio=0.0))
    assert not result.modified and _weights(result.model) == _weights(model)


def test_bias_compensation_lowers_error(tmp_path):
    model = _export(ConvChain(), torch.randn(2, 3, 8, 8), tmp_path)
    data = _calib(tmp_path / "c.npz", (3, 8, 8), "image")
    result = prune(model, PruneSettings(ratio=0.5), calibration=data)
    assert result.compensated_consumers >= 2
    assert result.fidelity["min_mean_cosine"] > result.fidelity_without_compensation["min_mean_cosine"]
    assert result.fidelity["max_abs_error"] < result.fidelity_without_compensation["max_abs_error"]
    activation = prune(model, PruneSettings(ratio=0.5, importance="activation"), calibration=data)
    assert activation.fidelity["min_mean_cosine"] > 0.5


def test_global_scope_and_overrides(tmp_path):
    model = _export(ConvChain(), torch.randn(2, 3, 8, 8), tmp_path)
    names = [n.name for n in model.graph.node if n.op_type == "Conv"]
    override = prune(model, PruneSettings(ratio=0.5, ratios={names[1]: 0.0}, round_to=4))
    kept = {u.producers[0]: u.kept for u in override.units}
    assert kept[names[1]] == 16 and kept[names[2]] == 8
    assert prune(model, PruneSettings(ratio=0.5, scope="global", round_to=4)).parameters[1] < override.parameters[0]


def test_bad_inputs(tmp_path):
    model = _export(ConvChain(), torch.randn(2, 3, 8, 8), tmp_path)
    with pytest.raises(UserError, match=r"pruning ratio must be in \[0, 1\)"):
        PruneSettings(ratio=1.0)
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(UserError, match=r"missing inputs \['image'\]"):
        prune(model, PruneSettings(ratio=0.5), calibration=tmp_path / "bad.npz")
    with pytest.raises(UserError, match="activation importance needs calibration data"):
        prune(model, PruneSettings(ratio=0.5, importance="activation"))


def test_cli_prune(tmp_path, capsys):
    _export(ConvChain(), torch.randn(2, 3, 8, 8), tmp_path, "chain.onnx")
    code = main(["-q", "prune", str(tmp_path / "chain.onnx"), str(tmp_path / "p.onnx"), "--ratio", "0.5",
                 "--calibration", str(_calib(tmp_path / "c.npz", (3, 8, 8), "image"))])
    out = capsys.readouterr().out
    assert code == 0 and "16 -> 8" in out and "without bias compensation" in out
    code = main(["-q", "prune", str(tmp_path / "chain.onnx"), str(tmp_path / "m.onnx"), "--ratio", "0.5", "--method", "magnitude", "--json"])
    assert code == 0 and "magnitude pruning" in json.loads(capsys.readouterr().out)["notes"][0]
    (tmp_path / "junk.onnx").write_bytes(b"junk" * 20)
    code = main(["prune", str(tmp_path / "junk.onnx"), str(tmp_path / "x.onnx"), "--ratio", "0.5"])
    assert code == 2 and "not a readable ONNX model" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
    code = main(["prune", str(tmp_path / "chain.onnx"), str(tmp_path / "x.onnx"), "--ratio", "1.5"])
    assert code == 2 and "pruning ratio must be in [0, 1)" in capsys.readouterr().err
