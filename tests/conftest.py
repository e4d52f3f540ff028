import contextlib
import io
import os

import pytest

from tests.recipe_snippets import FP32_AND_INT8

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is present; the reason says what would enable them."""
    try:
        import onnxruntime

        has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with onnxruntime-gpu (pip install 'onnxforge[gpu]')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def decision_store(tmp_path_factory):
    """Auto quantization remembers its timed choices (``optimizers.quantize.decisions``): in tests they go
    to a folder of the session, never to the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("onnxforge-cache")
    before = os.environ.get("ONNXFORGE_CACHE")
    os.environ["ONNXFORGE_CACHE"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("ONNXFORGE_CACHE", None)
    else:
        os.environ["ONNXFORGE_CACHE"] = before


@pytest.fixture(scope="session")
def docstring_llama_folder(tmp_path_factory):
    """The built-in trained Llama (onnxforge.decoder_models), trained once per test session, or
    kept between sessions in $ONNXFORGE_TEST_MODELS when that is set (a CI cache)."""
    from onnxforge.decoder_models import docstring_llama

    return docstring_llama(os.environ.get("ONNXFORGE_TEST_MODELS") or tmp_path_factory.mktemp("decoders"))


@pytest.fixture(scope="session")
def docstring_llama_export(docstring_llama_folder, tmp_path_factory):
    """The trained Llama exported once through the CLI's default path (proof and fusion on):
    (folder holding model.onnx and its companions, the command's stdout)."""
    import contextlib
    import io

    from onnxforge.cli import main

    folder = tmp_path_factory.mktemp("docstring-llama-onnx")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["-q", "export", "--hf-model", str(docstring_llama_folder), "--task", "text-generation",
                     "--output", str(folder / "model.onnx")])
    assert code == 0, stdout.getvalue()
    return folder, stdout.getvalue()


TINY_RECIPE = """
name = "tiny"
[model]
source = "tiny.py:build"
""" + FP32_AND_INT8 + """
[[candidates]]
name = "pruned-25"
prune = { ratio = 0.25, round_to = 4, protect_first = false }
[[candidates]]
name = "pruned-50"
prune = { ratio = 0.5, round_to = 4, protect_first = false }
[select]
min_cosine = 0.5
[package]
triton = true
[benchmark]
batch = [4]
min_seconds = 0.0
min_runs = 5
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """``onnxforge -q run`` of fp32, int8 and two pruned candidates (a Triton entry in the package):
    (output folder, what it printed)."""
    from onnxforge.cli import main
    from tests.tiny_models import MLP_FACTORY_SOURCE

    folder = tmp_path_factory.mktemp("tiny-run")
    (folder / "tiny.py").write_text(MLP_FACTORY_SOURCE)
    (folder / "recipe.toml").write_text(TINY_RECIPE)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["-q", "run", str(folder / "recipe.toml"), "--out", str(folder / "out")]) == 0
    return folder / "out", out.getvalue()
