"""Running an in-memory ONNX model in ONNX Runtime on the CPU to see what it computes, with
errors a person can act on. Sessions come from ``onnxforge.common.sessions.open_session``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np
import onnx

from onnxforge.common.errors import UserError
from onnxforge.common.sessions import CHECK, SessionSettings, one_line, open_session
from onnxforge.common.specs import choose_dim_sizes, make_inputs, specs_from_onnx

_FLOAT_TYPES = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(double)": np.float64}
# As a deployment runs it (ONNX Runtime's optimizations on), but quiet: failures are raised.
DEPLOYED_CHECK = SessionSettings(log_severity=4, spinning=False)


def describe_feeds(inputs: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"'{name}' {list(np.shape(array))}" for name, array in inputs.items())


def run_onnx(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray], *, optimized: bool = False) -> dict[str, np.ndarray]:
    """All outputs of ``model`` on ``inputs`` (by name; extra inputs are ignored, float inputs
    are cast to the precision the model declares). ``optimized=False`` runs the graph as
    written (no ONNX Runtime graph optimizations), ``True`` as a deployment would.

    A run that ONNX Runtime refuses (shapes the graph cannot take, out-of-range indices) is a
    ``UserError`` naming the inputs and the sizes the model leaves open, so the user can give
    ``--dim NAME=SIZE`` or real data.
    """
    import onnxruntime as ort

    session = open_session(model, DEPLOYED_CHECK if optimized else CHECK)
    wanted = {i.name: i for i in session.get_inputs()}
    feeds = {}
    for name, array in inputs.items():
        if name in wanted:
            dtype = _FLOAT_TYPES.get(wanted[name].type)
            feeds[name] = array.astype(dtype) if dtype is not None and array.dtype.kind == "f" else array
    names = [o.name for o in session.get_outputs()]
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4  # the failure is raised below, in our words; no second copy on stderr
    try:
        return dict(zip(names, session.run(names, feeds, run_options)))
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidArgument/... types
        open_dims = sorted({d for i in wanted.values() for d in i.shape if isinstance(d, str)})
        hint = f"give the sizes with --dim NAME=SIZE (the model's open dims: {', '.join(open_dims)})" if open_dims else "give the sizes with --dim NAME=SIZE"
        raise UserError(
            f"ONNX Runtime cannot run the model on inputs {describe_feeds(feeds)} ({one_line(exc, 240)}); "
            f"if these sizes are not what the model takes, {hint} or give real input data"
        ) from None


# Sides tried, one open image dim at a time, when ONNX Runtime refuses the first guess: the
# heights text recognizers are trained at (32, 48), then common input sizes.
PROBE_SIDES = (32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640)


def runnable_dim_sizes(model: onnx.ModelProto, given: Mapping[str, int] | None = None, data: Mapping[str, np.ndarray] | None = None):
    """``choose_dim_sizes`` checked in ONNX Runtime: when the model refuses the first choice
    and some image sides or sequence lengths were guessed, each in turn tries ``PROBE_SIDES``
    (sequences longest first; the others kept) and the first size that runs is taken, with its
    source saying so. Sizes the
    user gave or the data has are never changed. When nothing runs, the first refusal is
    raised (a one-line ``UserError`` asking for ``--dim`` or data).

    Any size that runs serves to compare two models on the same inputs; it need not be the
    size the model was trained at.
    """


    specs = specs_from_onnx(model)
    chosen = choose_dim_sizes(model, specs, given, data)
    try:
        run_onnx(model, make_inputs(specs, chosen.sizes))
        return chosen
    except UserError as refusal:
        first = refusal
    for name in [n for n, source in chosen.sources.items() if source.startswith(("image", "sequence"))]:
        image = chosen.sources[name].startswith("image")
        # a sequence is probed longest first: a short one that runs may take a degenerate path
        # (one frame, one step) that leaves most of the model unexercised
        for size in PROBE_SIDES if image else tuple(reversed(PROBE_SIDES)):
            if size == chosen.sizes[name]:
                continue
            trial = {**chosen.sizes, name: size}
            try:
                run_onnx(model, make_inputs(specs, trial))
            except UserError:
                continue
            what = "the first side" if image else f"the longest length up to {PROBE_SIDES[-1]}"
            sources = {**chosen.sources, name: f"{what} ONNX Runtime accepted; {chosen.sizes[name]} was refused"}
            return dataclasses.replace(chosen, sizes=trial, sources=sources)
    raise _with_value_hint(first, specs)


def _with_value_hint(refusal: UserError, specs) -> UserError:
    """``refusal``, naming the integer inputs whose values were guessed (nothing in the graph
    bounds them: not an embedding index, a mask or a value compared with a constant): a mode
    switch or a count the model checks may need a value no size can give."""
    guessed = [spec for spec in specs if spec.dtype.startswith(("int", "uint")) and spec.low is None and spec.fill is None]
    if not guessed:
        return refusal
    names = ", ".join(f"'{spec.name}'" for spec in guessed)
    return UserError(f"{refusal}; the integer input(s) {names} got generated values in [0, 2), which the model may not "
                     "take: give real values for them in an .npz of inputs (--inputs, --calibration or --evaluation, "
                     "keyed by input name)")
