import os

import pytest

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
