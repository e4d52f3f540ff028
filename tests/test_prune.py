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
    # no flags but the data: the best recipe measured, said with how much data was fitted
    assert "chosen for this data: importance reconstruction, scope global, refinement off" in out
    assert "batches (" in out and "samples) fitted, at most 1024 read" in out
    assert "the pruned model ran in ONNX Runtime with the original's output shapes on image [1, 3, 8, 8] and image [2, 3, 8, 8]" in out
    code = main(["-q", "prune", str(tmp_path / "chain.onnx"), str(tmp_path / "m.onnx"), "--ratio", "0.5", "--method", "magnitude", "--json"])
    assert code == 0 and "magnitude pruning" in json.loads(capsys.readouterr().out)["notes"][0]
    (tmp_path / "junk.onnx").write_bytes(b"junk" * 20)
    code = main(["prune", str(tmp_path / "junk.onnx"), str(tmp_path / "x.onnx"), "--ratio", "0.5"])
    assert code == 2 and "not a readable ONNX model" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
    code = main(["prune", str(tmp_path / "chain.onnx"), str(tmp_path / "x.onnx"), "--ratio", "1.5"])
    assert code == 2 and "pruning ratio must be in [0, 1)" in capsys.readouterr().err


# ---------------------------------------------------------------- constructs of real-world models (issue 12)


class ConvBNSiLU(torch.nn.Module):
    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = torch.nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = torch.nn.BatchNorm2d(c2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * torch.sigmoid(y)


class C2f(torch.nn.Module):
    """YOLOv8's block: a 1x1 conv split in halves, a bottleneck on the second half (with or
    without its residual add), all three concatenated into a 1x1 conv."""

    def __init__(self, c1, c2, shortcut):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = ConvBNSiLU(c1, 2 * self.c)
        self.m1, self.m2 = ConvBNSiLU(self.c, self.c, 3), ConvBNSiLU(self.c, self.c, 3)
        self.cv2 = ConvBNSiLU(3 * self.c, c2)
        self.shortcut = shortcut

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        m = self.m2(self.m1(y[-1]))
        y.append(y[-1] + m if self.shortcut else m)
        return self.cv2(torch.cat(y, 1))


class YoloLike(torch.nn.Module):
    """YOLOv8 in miniature: C2f blocks (Split + Concat), SPPF (MaxPool chain + Concat), an
    Upsample + Concat neck, a DFL box head (Reshape to 4 x 16 bins, Softmax, fixed Conv) and a
    class head whose outputs are concatenated and reshaped."""

    def __init__(self, classes=3):
        super().__init__()
        self.stem = ConvBNSiLU(3, 16, 3, 2)
        self.c2f1 = C2f(16, 32, True)
        self.down = ConvBNSiLU(32, 32, 3, 2)
        self.c2f2 = C2f(32, 32, True)
        self.sppf_cv1, self.pool, self.sppf_cv2 = ConvBNSiLU(32, 16), torch.nn.MaxPool2d(5, 1, 2), ConvBNSiLU(64, 32)
        self.up = torch.nn.Upsample(scale_factor=2, mode="nearest")
        self.neck = C2f(64, 32, False)
        self.box = torch.nn.Sequential(ConvBNSiLU(32, 32, 3), torch.nn.Conv2d(32, 64, 1))
        self.cls = torch.nn.Sequential(ConvBNSiLU(32, 32, 3), torch.nn.Conv2d(32, classes, 1))
        self.dfl = torch.nn.Conv2d(16, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(16, dtype=torch.float).view(1, 16, 1, 1)
        self.classes = classes

    def forward(self, image):
        p3 = self.c2f1(self.stem(image))
        x = self.c2f2(self.down(p3))
        a = self.sppf_cv1(x)
        b = self.pool(a)
        c = self.pool(b)
        p4 = self.sppf_cv2(torch.cat([a, b, c, self.pool(c)], 1))
        f = self.neck(torch.cat([self.up(p4), p3], 1))
        n = f.shape[0]
        out = torch.cat([self.box(f), self.cls(f)], 1).view(n, 64 + self.classes, -1)
        box, cls = out.split((64, self.classes), 1)
        dist = self.dfl(box.view(n, 4, 16, -1).transpose(2, 1).softmax(1)).view(n, 4, -1)
        return torch.cat([dist, cls.sigmoid()], 1)


def _ort_outputs(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _runs_like(original, pruned, feeds_list):
    """ONNX Runtime runs ``pruned`` on every feed and each output has the original's shape."""
    for feeds in feeds_list:
        assert [o.shape for o in _ort_outputs(pruned, feeds)] == [o.shape for o in _ort_outputs(original, feeds)]


def _assert_exact_twin(model, settings, feeds):
    """Pruning channels computes exactly what the original computes with those channels' input
    columns zeroed in every consumer: everything between producer and consumer is channel-wise
    or routes whole channels (Split, Slice, Concat, Resize, pooling, gates), so a wrongly
    followed op shows up as a difference here."""
    from onnx import numpy_helper

    from optimizers.prune.channels import apply, channel_importance, decide_drops, resolve_conflicts
    from optimizers.prune.checks import prepared_for_pruning
    from optimizers.prune.trace import analyze

    _, prepared, _ = prepared_for_pruning(model)
    analysis = analyze(prepared)
    resolve_conflicts(analysis)
    decided = decide_drops(analysis, settings, channel_importance(prepared, analysis, settings, None))
    removed = frozenset().union(*(roots for _, roots in decided))
    assert removed
    twin = onnx.ModelProto()
    twin.CopyFrom(prepared)
    inits = {t.name: t for t in twin.graph.initializer}
    for _, _, slots, weight, axis in analysis.consumers:
        gone = [i for i, s in enumerate(slots) if analysis.slots.find(s) in removed]
        w = numpy_helper.to_array(inits[weight]).copy()
        w[(slice(None),) * axis + (gone,)] = 0
        inits[weight].CopyFrom(numpy_helper.from_array(w, weight))
    pruned = apply(prepared, analysis, removed)
    for got, want in zip(_ort_outputs(pruned, feeds), _ort_outputs(twin, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _split_sizes(model):
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    inits.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"})
    return [list(inits[n.input[1]]) for n in model.graph.node if n.op_type == "Split" and len(n.input) > 1 and n.input[1] in inits]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_yolo_like_split_concat_head(tmp_path, exporter):
    torch.manual_seed(0)
    path = export(YoloLike().eval(), torch.randn(1, 3, 32, 32), tmp_path / "yolo.onnx", exporter=exporter,
                  dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}}).path
    model = onnx.load(str(path))
    result = prune(model, PruneSettings(ratio=0.5))
    units = {u.producers: u for u in result.units}
    c2f = next(u for names, u in units.items() if len(names) == 2)  # cv1 coupled to the bottleneck by the residual add
    assert (c2f.channels, c2f.kept) == (32, 16)
    left_whole = [u for u in result.units if u.reason and "Reshape" in u.reason]
    assert {u.channels for u in left_whole} >= {64, 3}  # the DFL box conv and the class conv reach Reshapes
    assert not any("breaks the graph" in (u.reason or "") for u in result.units)
    assert [16, 16] in _split_sizes(model) and any(sizes != [16, 16] and sum(sizes) < 32 for sizes in _split_sizes(result.model))
    rng = np.random.default_rng(3)
    feeds = [{"image": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)},
             {"image": rng.standard_normal((2, 3, 64, 96)).astype(np.float32)}]
    _runs_like(model, result.model, feeds)
    onnx.checker.check_model(result.model, full_check=True)
    _assert_exact_twin(model, PruneSettings(ratio=0.5), feeds[1])
    same = prune(model, PruneSettings(ratio=0.0))  # ratio 0: the same function
    for feed in feeds:
        np.testing.assert_allclose(_ort_outputs(same.model, feed)[0], _ort_outputs(model, feed)[0], rtol=1e-5, atol=1e-5)


def _helper_cnn(tmp_path=None, *, constant_weights=False, batch_dim=None, prelu=False, dead=()):
    """Conv(3->16) -> act -> Conv(16->16) -> act -> Conv(16->4) -> GlobalAveragePool -> Flatten,
    written with onnx.helper as other exporters write it: weights in Constant nodes
    (Paddle2ONNX, tf2onnx), a batch dim of -1, per-channel PRelu (MTCNN). Channels ``dead`` of
    the middle conv output exactly zero, so pruning them is exact."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "b1": rng.standard_normal(16).astype(np.float32),
        "w2": rng.standard_normal((16, 16, 3, 3)).astype(np.float32) * 0.3, "b2": rng.standard_normal(16).astype(np.float32),
        "w3": rng.standard_normal((4, 16, 1, 1)).astype(np.float32), "b3": rng.standard_normal(4).astype(np.float32),
        "s1": np.full((16, 1, 1), 0.25, np.float32), "s2": rng.uniform(0.05, 0.5, (16, 1, 1)).astype(np.float32),
    }
    weights["w2"][list(dead)] = 0
    weights["b2"][list(dead)] = 0
    act = (lambda x, y, slope: helper.make_node("PRelu", [x, slope], [y])) if prelu else \
        (lambda x, y, slope: helper.make_node("Relu", [x], [y]))
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), act("c1", "a1", "s1"),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]), act("c2", "a2", "s2"),
        helper.make_node("Conv", ["a2", "w3", "b3"], ["c3"]),
        helper.make_node("GlobalAveragePool", ["c3"], ["pooled"]), helper.make_node("Flatten", ["pooled"], ["logits"]),
    ]
    used = [name for name in weights if prelu or not name.startswith("s")]
    tensors = [numpy_helper.from_array(weights[name], name) for name in used]
    if constant_weights:
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in tensors] + nodes
        tensors = []
    batch = batch_dim if batch_dim is not None else "batch"
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 4])], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_conv_weights_in_constant_nodes_and_minus_one_batch(tmp_path):
    model = _helper_cnn(constant_weights=True, batch_dim=-1)  # Paddle2ONNX-style: Constant weights, batch -1
    result = prune(model, PruneSettings(ratio=0.5))
    assert any("lifted" in note and "Constant" in note for note in result.notes)
    assert any(note.count("symbolic") for note in result.notes)
    shapes = _weights(result.model)
    assert shapes["w2"] == (8, 16, 3, 3) and shapes["w3"] == (4, 8, 1, 1) and shapes["b2"] == (8,)
    assert not any(n.op_type == "Constant" for n in result.model.graph.node)
    batch = result.model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")  # -1 became a named dynamic dim
    feeds = [{"image": np.random.default_rng(s).standard_normal((b, 3, 8, 8)).astype(np.float32)} for s, b in ((1, 1), (2, 3))]
    _runs_like(model, result.model, feeds)
    onnx.save(model, str(tmp_path / "paddle_like.onnx"))  # the CLI path: written model verified, exit 0
    assert main(["-q", "prune", str(tmp_path / "paddle_like.onnx"), str(tmp_path / "p.onnx"), "--ratio", "0.5"]) == 0
    _runs_like(model, onnx.load(str(tmp_path / "p.onnx")), feeds)


def test_prelu_per_channel_slope_is_sliced_exactly():
    dead = (1, 4, 6, 9, 10, 12, 13, 15)
    model = _helper_cnn(prelu=True, dead=dead)  # PRelu(0) = 0: the dead channels carry nothing
    result = prune(model, PruneSettings(ratio=0.5, bias_compensation=False))
    shapes = _weights(result.model)
    assert shapes["s2"] == (8, 1, 1) and shapes["w2"] == (8, 16, 3, 3) and shapes["s1"] == (16, 1, 1)
    kept_slopes = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "s2")).reshape(-1)
    original_slopes = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "s2")).reshape(-1)
    np.testing.assert_array_equal(kept_slopes, np.delete(original_slopes, dead))  # the live channels' slopes, in order
    np.testing.assert_allclose(_run(result.model, IMAGE), _run(model, IMAGE), rtol=1e-5, atol=1e-5)


def test_group_that_breaks_at_run_time_is_left_whole(monkeypatch):
    """Static shape information can be wrong (stale value_info, exporter bugs). Here it claims
    that a gate computed from the image has one channel; it has 16, so the unit whose channels
    it multiplies cannot lose any. The run check (ONNX checker, then ONNX Runtime) finds that
    unit, leaves it whole with the error as the reason, and prunes the others."""
    from onnx import TensorProto, helper, numpy_helper

    from optimizers.prune import structured, trace

    rng = np.random.default_rng(0)
    tensors = [numpy_helper.from_array(a, n) for n, a in (
        ("wa", rng.standard_normal((16, 3, 3, 3)).astype(np.float32)), ("wb", rng.standard_normal((16, 16, 3, 3)).astype(np.float32)),
        ("wc", rng.standard_normal((16, 16, 3, 3)).astype(np.float32)), ("wd", rng.standard_normal((4, 16, 1, 1)).astype(np.float32)),
        ("axes", np.array([1], np.int64)), ("repeats", np.array([1, 16, 1, 1], np.int64)))]
    nodes = [
        helper.make_node("Conv", ["image", "wa"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "wb"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=1),
        helper.make_node("Tile", ["mean", "repeats"], ["gate"]),
        helper.make_node("Mul", ["b", "gate"], ["gated"]),
        helper.make_node("Conv", ["gated", "wc"], ["c"], name="conv_c", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "wd"], ["d"], name="conv_d"),
        helper.make_node("GlobalAveragePool", ["d"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "gate", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 4, 1, 1])], tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    real = trace._static_shapes
    monkeypatch.setattr(trace, "_static_shapes", lambda m: {**real(m), "gate": (2, 1, 8, 8)})
    result = prune(model, PruneSettings(ratio=0.5, protect_first=False))
    units = {u.producers[0]: u for u in result.units}
    broken = units["conv_b"]
    assert broken.kept == broken.channels == 16
    assert broken.reason.startswith("pruning it breaks the graph: ") and "Mul" in broken.reason  # the checker or ORT says why
    assert (units["conv_a"].kept, units["conv_c"].kept, units["conv_d"].kept) == (8, 8, 4)  # conv_d makes the graph output
    assert any("left whole because pruning them breaks the graph" in note for note in result.notes)
    _runs_like(model, result.model, [IMAGE])
    monkeypatch.setattr(structured, "MAX_TRIALS", 1)  # bounded: one failed run, nothing left to try
    with pytest.raises(UserError, match="nothing could be pruned at ratio 0.5: .*not run within the budget of 1 ONNX Runtime"):
        prune(model, PruneSettings(ratio=0.5, protect_first=False))


class SliceResizeTranspose(torch.nn.Module):
    """Channel ranges cut by Slice, one half upsampled by Resize (scales), the other by a
    ConvTranspose, concatenated into a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.mid = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.up = torch.nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.merge = torch.nn.Conv2d(16, 4, 1)

    def forward(self, image):
        x = torch.relu(self.mid(torch.relu(self.stem(image))))
        left = torch.nn.functional.interpolate(torch.relu(self.a(x[:, :8])), scale_factor=2.0, mode="nearest")
        right = torch.relu(self.up(x[:, 8:]))
        return self.merge(torch.cat([left, right], 1)).mean(dim=(2, 3))


def test_slice_resize_conv_transpose(tmp_path):
    module = SliceResizeTranspose()
    dead = [1, 2, 5, 6, 8, 11, 12, 15]
    with torch.no_grad():  # mid's dead channels: ReLU(0 * x - 1) = 0, so pruning them is exact
        module.mid.weight[dead] = 0
        module.mid.bias[dead] = -1
    model = _export(module, torch.randn(2, 3, 8, 8), tmp_path)
    mid = next(n.name for n in model.graph.node if n.op_type == "Conv" and _weights(model)[n.input[1]] == (16, 8, 3, 3))
    exact = prune(model, PruneSettings(ratio=0.0, ratios={mid: 0.5}, bias_compensation=False))
    shapes = _weights(exact.model)
    assert shapes["model.mid.weight"] == (8, 8, 3, 3) and shapes["model.a.weight"] == (8, 4, 3, 3)  # each Slice keeps 4
    assert shapes["model.up.weight"] == (4, 8, 2, 2)  # ConvTranspose reads its input channels on axis 0
    np.testing.assert_allclose(_run(exact.model, IMAGE), _run(model, IMAGE), rtol=1e-5, atol=1e-5)
    result = prune(model, PruneSettings(ratio=0.5, round_to=4))
    transpose = next(n for n in result.model.graph.node if n.op_type == "ConvTranspose")
    assert _weights(result.model)[transpose.input[1]][1] == 4  # its output channels are pruned too
    _check_pruned(model, result, IMAGE, 0.0)


class MobileNetV3Block(torch.nn.Module):
    """HardSwish expand, depthwise, squeeze-excite gate (HardSigmoid, Mul), project: PaddleOCR's backbone."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.expand = torch.nn.Conv2d(8, 32, 1)
        self.depthwise = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.reduce, self.restore = torch.nn.Conv2d(32, 8, 1), torch.nn.Conv2d(8, 32, 1)
        self.project = torch.nn.Conv2d(32, 8, 1)

    def forward(self, image):
        x = torch.nn.functional.hardswish(self.depthwise(torch.nn.functional.hardswish(self.expand(self.stem(image)))))
        gate = torch.nn.functional.hardsigmoid(self.restore(torch.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True)))))
        return self.project(x * gate).mean(dim=(2, 3))


def test_hardswish_squeeze_excite_couples_gate_and_expand(tmp_path):
    model = _export(MobileNetV3Block(), torch.randn(2, 3, 8, 8), tmp_path)
    result = prune(model, PruneSettings(ratio=0.5))
    coupled = next(u for u in result.units if len(u.producers) == 2)  # expand and the SE restore conv lose the same channels
    assert (coupled.channels, coupled.kept) == (32, 16)
    shapes = _weights(result.model)
    assert (16, 8, 1, 1) in shapes.values() and (16, 1, 3, 3) in shapes.values() and (8, 16, 1, 1) in shapes.values()
    _check_pruned(model, result, IMAGE, 0.0)
    _assert_exact_twin(model, PruneSettings(ratio=0.5), IMAGE)


def test_cli_unsupported_ends_in_one_line_and_writes_nothing(tmp_path, capsys):
    _export(ReshapeTrap(), torch.randn(2, 3, 4, 4), tmp_path, "trap.onnx")
    capsys.readouterr()  # the export's own log lines, shown when an earlier main() left logging at INFO
    code = main(["-q", "prune", str(tmp_path / "trap.onnx"), str(tmp_path / "out.onnx"), "--ratio", "0.5", "--no-protect-first"])
    err = capsys.readouterr().err
    assert code == 2 and "nothing could be pruned at ratio 0.5" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out.onnx").exists()


def test_max_batches_gives_pruning_more_calibration_data(tmp_path):
    """``max_batches`` (a recipe's ``prune.max_batches``) bounds the calibration batches pruning
    reads: reconstruction's fit and held-out batches add up to it; 0 is refused with the key's name."""
    from onnxforge.recipe import recipe_from_dict

    model = _export(ConvChain(), torch.randn(2, 3, 8, 8), tmp_path)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)} for _ in range(12)]
    read = {}
    for count in (4, 10):
        result = prune(model, PruneSettings(ratio=0.5, max_batches=count), calibration=lambda: batches,
                       evaluation=lambda: batches[:2])
        read[count] = result.reconstruction["fit_batches"] + result.reconstruction["heldout_batches"]
    assert read == {4: 4, 10: 10}
    recipe = recipe_from_dict({"model": {"onnx": "m.onnx"}, "candidates": [{"name": "p", "prune": {"ratio": 0.5, "max_batches": 64}}]})
    assert PruneSettings(**recipe.data["candidates"][0]["prune"]).max_batches == 64
    with pytest.raises(UserError, match=r"'candidates\[0\].prune.max_batches' must be at least 1"):
        recipe_from_dict({"model": {"onnx": "m.onnx"}, "candidates": [{"name": "p", "prune": {"max_batches": 0}}]})
    with pytest.raises(UserError, match="max_batches .* must be at least 1, got 0"):
        PruneSettings(max_batches=0)
    np.savez(tmp_path / "calibration.npz", image=np.concatenate([b["image"] for b in batches]))  # a batch per row
    args = ["prune", str(tmp_path / "m.onnx"), str(tmp_path / "out.onnx"), "--ratio", "0.5", "--calibration",
            str(tmp_path / "calibration.npz"), "--evaluation", str(tmp_path / "calibration.npz"), "--json"]
    import contextlib
    import io

    for flags, count in (([], 24), (["--max-batches", "6"], 6)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main([*args, *flags]) == 0
        refit = json.loads(out.getvalue())["reconstruction"]
        assert refit["fit_batches"] + refit["heldout_batches"] == count


class Conv1DBlock(torch.nn.Module):
    """GPT-2's feed-forward block: Conv1D (``view(-1, C)``, ``addmm``, ``view(*lead, N)``),
    tanh Gelu, Conv1D, residual; the exporters write Reshapes whose target keeps channels last."""

    def __init__(self, width=16, hidden=64):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.up, self.down = Conv1D(hidden, width), Conv1D(width, hidden)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x), approximate="tanh"))


class HeadsReshape(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.linear(x).reshape(x.shape[0], x.shape[1], 4, 4).sum(-1)


@pytest.mark.parametrize("exporter", ["dynamo"])
def test_reshape_that_keeps_channels_last_is_followed(tmp_path, exporter):
    """A Reshape that only regroups the leading axes (channels last before and after, the target's
    last entry the channel count) is followed and its target rewritten; one to heads freezes.
    (The TorchScript export of Conv1D reads the activation's Shape for the reshape back, which
    still freezes the unit.)"""
    torch.manual_seed(0)
    model = onnx.load(str(export(Conv1DBlock().eval(), torch.randn(2, 5, 16), tmp_path / "c.onnx", exporter=exporter).path))
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((2, 5, 16)).astype(np.float32)} for _ in range(6)]
    result = prune(model, PruneSettings(ratio=0.5), calibration=lambda: batches, evaluation=lambda: batches[:2])
    up = [u for u in result.units if u.channels == 64]
    assert len(up) == 1 and up[0].kept == 32 and up[0].reason is None
    onnx.checker.check_model(result.model, full_check=True)
    for shape in ((1, 5, 16), (4, 5, 16)):
        feeds = {"x": rng.standard_normal(shape).astype(np.float32)}
        assert _run(result.model, feeds).shape == shape
    assert result.fidelity["min_mean_cosine"] > 0.9
    heads = onnx.load(str(export(HeadsReshape().eval(), torch.randn(2, 5, 16), tmp_path / "h.onnx", exporter=exporter).path))
    with pytest.raises(UserError, match="Reshape"):
        prune(heads, PruneSettings(ratio=0.5, protect_first=False))


def test_the_defaults_count_fitted_samples_not_batches():
    """13 batches of 16 sentences hold 208 samples: refinement is chosen as for 208 lines one a
    batch (with the perturbed copies text gets: 400 steps), 100 steps for 208 images."""
    from optimizers.prune.channels import PERTURBED_COPIES, REFINE_STEPS, REFINE_STEPS_SMALL
    from optimizers.prune.structured import _resolved_with_data

    batch = lambda rows: {"input_ids": np.zeros((rows, 12), np.int64)}
    notes = []
    grouped = _resolved_with_data(PruneSettings(ratio=0.3), [batch(16)] * 13, notes)
    assert grouped.refine_steps == REFINE_STEPS and grouped.perturbed_copies == PERTURBED_COPIES
    assert "13 batches (208 samples) fitted" in notes[0] and f"refinement {REFINE_STEPS} steps" in notes[0]
    assert f"{PERTURBED_COPIES} perturbed copies of each fitted sample" in notes[0]
    notes = []
    images = _resolved_with_data(PruneSettings(ratio=0.3), [{"x": np.zeros((16, 3, 8, 8), np.float32)}] * 13, notes)
    assert images.refine_steps == REFINE_STEPS_SMALL and images.perturbed_copies == 0
    assert "refinement 100 steps" in notes[0] and "perturbed" not in notes[0]
    notes = []
    assert _resolved_with_data(PruneSettings(ratio=0.3), [batch(16)] * 12, notes).refine_steps == 0
    assert "refinement off (it runs from 200 fitted samples)" in notes[0]


def test_default_settings_resolve_to_the_best_recipe_for_the_data():
    """auto: with calibration data reconstruction, global and, with enough fitted batches,
    refinement; without data l1 per layer; what the user set stays as set."""
    from optimizers.prune.channels import REFINE_MIN_SAMPLES, REFINE_STEPS, REFINE_STEPS_FROM, REFINE_STEPS_SMALL

    default = PruneSettings(ratio=0.3)
    assert (default.importance, default.scope, default.refine_steps) == ("auto", "auto", None)
    free = default.resolved(None)
    assert (free.importance, free.scope, free.refine_steps) == ("l1", "layer", 0)
    few = default.resolved(REFINE_MIN_SAMPLES - 1)
    assert (few.importance, few.scope, few.refine_steps) == ("reconstruction", "global", 0)
    assert 0 < REFINE_STEPS_SMALL < REFINE_STEPS and REFINE_MIN_SAMPLES < REFINE_STEPS_FROM
    assert REFINE_MIN_SAMPLES <= 205  # MiniLM's 256 calibration lines (205 fitted sentences) are refined (prune_default.md)
    assert default.resolved(REFINE_MIN_SAMPLES).refine_steps == REFINE_STEPS_SMALL
    assert default.resolved(REFINE_STEPS_FROM - 1).refine_steps == REFINE_STEPS_SMALL
    assert default.resolved(REFINE_STEPS_FROM).refine_steps == REFINE_STEPS
    assert PruneSettings(ratio=0.3, reconstruct=False).resolved(10 * REFINE_MIN_SAMPLES).refine_steps == 0
    kept = PruneSettings(ratio=0.3, importance="l2", scope="layer", refine_steps=7).resolved(10 * REFINE_MIN_SAMPLES)
    assert (kept.importance, kept.scope, kept.refine_steps) == ("l2", "layer", 7)


def test_perturbed_copies_are_the_default_below_a_thousand_fitted_samples():
    """MiniLM's 205 fitted sentences get perturbed copies (prune_default.md), and the copies count
    when refinement's steps are chosen; plenty of data, no data, data that is not text, or no
    re-fit get none; a number the user gave stays."""
    from optimizers.prune.channels import PERTURB_BELOW, PERTURBED_COPIES, REFINE_STEPS, REFINE_STEPS_SMALL

    default = PruneSettings(ratio=0.3)
    assert default.perturbed_copies is None and PERTURBED_COPIES > 0 and PERTURB_BELOW > 205
    text = default.resolved(205, text=True)
    assert (text.perturbed_copies, text.refine_steps) == (PERTURBED_COPIES, REFINE_STEPS)
    images = default.resolved(205)
    assert (images.perturbed_copies, images.refine_steps) == (0, REFINE_STEPS_SMALL)
    assert default.resolved(PERTURB_BELOW - 1, text=True).perturbed_copies == PERTURBED_COPIES
    assert default.resolved(PERTURB_BELOW, text=True).perturbed_copies == 0
    assert default.resolved(None, text=True).perturbed_copies == 0
    assert PruneSettings(ratio=0.3, reconstruct=False).resolved(205, text=True).perturbed_copies == 0
    assert PruneSettings(ratio=0.3, perturbed_copies=2).resolved(5 * PERTURB_BELOW).perturbed_copies == 2
    assert PruneSettings(ratio=0.3, perturbed_copies=0).resolved(205, text=True).refine_steps == REFINE_STEPS_SMALL
