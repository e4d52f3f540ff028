"""Where models come from: a Python factory, a saved module file, a Hugging Face folder."""

from __future__ import annotations

import dataclasses
import logging
import os
import zipfile
from pathlib import Path

import torch

from onnxforge.common.callables import import_callable
from onnxforge.common.errors import UserError
from onnxforge.common.specs import DTYPES, InputSpec, make_inputs

logger = logging.getLogger(__name__)

HF_TASKS = {
    "feature-extraction": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-lm": "AutoModelForMaskedLM",
    "image-classification": "AutoModelForImageClassification",
}


@dataclasses.dataclass
class LoadedModel:
    """A module and, when its source provides them, example inputs (tensor, tuple or dict)."""

    module: torch.nn.Module
    example_inputs: object | None
    source: str


def load_factory(spec: str) -> LoadedModel:
    """Call the factory named by ``spec``; it returns a module or ``(module, example_inputs)``."""
    factory = import_callable(spec, "model source")
    if isinstance(factory, torch.nn.Module):
        produced = factory
    else:
        if not callable(factory):
            raise UserError(f"{spec!r} names a {type(factory).__name__}, not a factory function or module")
        try:
            produced = factory()
        except Exception as exc:
            raise UserError(f"factory {spec!r} raised {type(exc).__name__}: {exc}") from exc
    example = None
    if isinstance(produced, tuple) and len(produced) == 2 and isinstance(produced[0], torch.nn.Module):
        produced, example = produced
    if not isinstance(produced, torch.nn.Module):
        raise UserError(
            f"factory {spec!r} returned a {type(produced).__name__}; it must return a torch.nn.Module "
            "or a (module, example_inputs) pair"
        )
    return LoadedModel(produced, example, spec)


def load_saved_module(path: str | Path) -> LoadedModel:
    """A TorchScript archive (``torch.jit.save``) or a whole module saved with ``torch.save``.

    ``torch.save``d modules are unpickled with ``weights_only=False``, which runs code from
    the file: load only files you trust. A state dict is not a model and is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file '{path}' does not exist")
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        with zipfile.ZipFile(path) as archive:
            is_script = any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
        if is_script:
            try:
                return LoadedModel(torch.jit.load(str(path), map_location="cpu"), None, str(path))
            except Exception as exc:
                raise UserError(f"'{path}' looks like a TorchScript file but does not load: {exc}") from exc
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        raise UserError(
            f"'{path}' holds a module whose class lives in '{exc.name}', which cannot be imported here; "
            "run from the folder that has that code, or export with a factory ('pkg.module:factory')"
        ) from None
    except Exception as exc:
        raise UserError(
            f"'{path}' is not a PyTorch model file ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
            "give a file written by torch.save(module) or torch.jit.save"
        ) from None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(
            f"'{path}' holds a state dict (weights only), not a model; use a factory "
            "('pkg.module:factory') that builds the module and loads these weights"
        )
    if not isinstance(obj, torch.nn.Module):
        raise UserError(f"'{path}' holds a {type(obj).__name__}, not a torch.nn.Module")
    return LoadedModel(obj, None, str(path))


def load_hf_model(folder: str | Path, task: str = "feature-extraction", *, batch: int = 2, seq: int = 16) -> LoadedModel:
    """A local Hugging Face folder loaded for ``task``, with example inputs from its tokenizer
    (text models: sentences padded to ``seq`` tokens) or its config (image models)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"'{folder}' is not a Hugging Face model folder (no config.json)")
    if task not in HF_TASKS:
        from onnxforge.common.errors import closest

        raise UserError(f"unknown task {task!r}{closest(task, HF_TASKS)}; available: {', '.join(HF_TASKS)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face folders need transformers: pip install 'onnxforge[hf]'") from None
    auto_class = getattr(transformers, HF_TASKS[task])
    try:
        module = auto_class.from_pretrained(str(folder))
    except Exception as exc:
        raise UserError(f"transformers could not load '{folder}' for task {task!r}: {exc}") from exc
    module.eval()
    if task == "image-classification":
        config = module.config
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        example = {"pixel_values": torch.randn(batch, channels, size, size)}
    else:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        except Exception as exc:
            raise UserError(f"'{folder}' has no usable tokenizer ({exc}); text models need one for example inputs") from exc
        sentences = ["onnxforge exports this sentence to check the model.", "A second, different example."]
        sentences = (sentences * batch)[:batch]
        example = dict(tokenizer(sentences, padding="max_length", truncation=True, max_length=seq, return_tensors="pt"))
    return LoadedModel(module, example, str(folder))


def load_model_source(source: str) -> LoadedModel:
    """A ``.pt``/``.pth``/``.ts`` file, or a ``module:factory`` / ``file.py:factory`` spec."""
    if source.endswith((".pt", ".pth", ".ts", ".jit")) and ":" not in Path(source).name:
        return load_saved_module(source)
    return load_factory(source)


def inputs_from_specs(specs: list[InputSpec], dim_sizes: dict[str, int], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Example torch tensors for ``specs`` (the shared numpy generator, converted)."""
    arrays = make_inputs(specs, dim_sizes, seed=seed)
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def dynamic_axes_from_specs(specs: list[InputSpec]) -> dict[str, dict[int, str]]:
    return {spec.name: spec.symbolic_dims for spec in specs if spec.symbolic_dims}


__all__ = [
    "DTYPES",
    "HF_TASKS",
    "LoadedModel",
    "dynamic_axes_from_specs",
    "inputs_from_specs",
    "load_factory",
    "load_hf_model",
    "load_model_source",
    "load_saved_module",
]
