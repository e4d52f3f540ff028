"""Where models come from: a Python factory, a saved module file, a Hugging Face folder."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import zipfile
from pathlib import Path

import torch

from onnxforge.common.callables import import_callable
from onnxforge.common.errors import UserError
from onnxforge.common.fileio import atomic_path
from onnxforge.common.specs import DTYPES, InputSpec, make_inputs

logger = logging.getLogger(__name__)

# Tasks by the names Hugging Face pipelines and Optimum use today, each with the transformers
# auto class that loads it. sentence-similarity is the encoder plus the pooling (and
# normalization) that the folder's sentence-transformers modules.json declares.
HF_TASKS = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
    "image-classification": "AutoModelForImageClassification",
    "sentence-similarity": "AutoModel",
    "text-generation": "AutoModelForCausalLM",
}
# Earlier onnxforge names, still accepted.
TASK_ALIASES = {"sequence-classification": "text-classification", "masked-lm": "fill-mask"}
# config.json "architectures" suffix -> task, for --task auto (longest suffix first).
_ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForImageClassification", "image-classification"),
    ("ForCausalLM", "text-generation"),
    ("ForConditionalGeneration", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("Model", "feature-extraction"),
)


def resolve_task(folder: str | Path, task: str = "auto") -> str:
    """The task to export ``folder`` for: ``auto`` reads ``config.json``'s ``architectures``
    (``BertForSequenceClassification`` -> text-classification, ``LlamaForCausalLM`` ->
    text-generation, ``BertModel`` -> feature-extraction); an old name maps to today's."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"'{folder}' is not a Hugging Face model folder (no config.json)")
    task = TASK_ALIASES.get(task, task)
    if task != "auto":
        if task not in HF_TASKS:
            from onnxforge.common.errors import closest

            raise UserError(f"unknown task {task!r}{closest(task, [*HF_TASKS, 'auto'])}; available: auto, {', '.join(HF_TASKS)}")
        return task
    import json

    try:
        architectures = json.loads(config_path.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {config_path}: {exc}") from None
    for architecture in architectures:
        for suffix, found in _ARCHITECTURE_TASKS:
            if architecture.endswith(suffix):
                logger.info("task: %s (from config.json architectures %s)", found, architecture)
                return found
    raise UserError(f"cannot tell the task of '{folder}' from config.json architectures {architectures}; "
                    f"name it with --task ({', '.join(HF_TASKS)})")


class SentenceEmbedder(torch.nn.Module):
    """An encoder followed by sentence-transformers' pooling: attention-masked mean
    ``p = sum_t(h_t * m_t) / max(sum_t m_t, 1e-9)`` (or the first token's state, ``cls``), then,
    where the model has a Normalize module, ``e = p / max(||p||, 1e-12)``."""

    def __init__(self, encoder: torch.nn.Module, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise UserError(f"sentence-similarity supports mean and cls pooling, not {pooling!r}")
        self.encoder, self.pooling, self.normalize = encoder, pooling, normalize

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)[0]
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            # max() and a sum of squares rather than clamp() and normalize(): those export as Clip
            # and ReduceL2, whose shapes ONNX Runtime's symbolic shape inference cannot infer, and
            # without shapes its transformer optimizer skips the SkipLayerNormalization fusions.
            pooled = (hidden * mask).sum(1) / torch.maximum(mask.sum(1), torch.tensor(1e-9, dtype=hidden.dtype))
        if not self.normalize:
            return pooled
        norm = torch.sqrt(torch.maximum((pooled * pooled).sum(1, keepdim=True), torch.tensor(1e-24, dtype=hidden.dtype)))
        return pooled / norm


def sentence_pooling(folder: Path) -> tuple[str, bool]:
    """(pooling, normalize) from a sentence-transformers folder's modules.json; a plain
    transformers folder gets mean pooling and normalization, what most embedders use."""
    import json

    modules_path = folder / "modules.json"
    if not modules_path.is_file():
        logger.info("sentence-similarity: no modules.json in '%s'; mean pooling, normalized", folder)
        return "mean", True
    modules = json.loads(modules_path.read_text(encoding="utf-8"))
    pooling, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            settings = json.loads((folder / module.get("path", "") / "config.json").read_text(encoding="utf-8"))
            modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens") if settings.get(f"pooling_mode_{m}")]
            if modes not in (["cls_token"], ["mean_tokens"]):
                raise UserError(f"'{folder}' pools with {modes}; onnxforge exports mean or cls pooling, one at a time")
            pooling = "cls" if modes == ["cls_token"] else "mean"
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize


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


def load_hf_model(folder: str | Path, task: str = "auto", *, batch: int = 2, seq: int = 16) -> LoadedModel:
    """A local Hugging Face folder loaded for ``task`` (``auto``: from its config, see
    ``resolve_task``), with example inputs from its tokenizer (text models: sentences padded to
    ``seq`` tokens) or its config (image models)."""
    folder = Path(folder)
    task = resolve_task(folder, task)
    if task == "text-generation":
        raise UserError(f"'{folder}' is a text-generation model: it is exported with its KV cache by "
                        "'onnxforge export --hf-model DIR --task text-generation'")
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
    if task == "sentence-similarity":
        module = SentenceEmbedder(module, *sentence_pooling(folder)).eval()
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


# Files of a Hugging Face folder that travel with its ONNX graph (the Optimum layout: model.onnx
# beside config.json and the tokenizer or preprocessor), so that transformers' tokenizers, Optimum's
# ORTModel classes, transformers.js and ONNX Runtime GenAI load the folder as it is.
COMPANION_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "added_tokens.json", "preprocessor_config.json", "modules.json", "sentence_bert_config.json",
)


def copy_model_files(folder: str | Path, target: str | Path) -> list[Path]:
    """The ``COMPANION_FILES`` of ``folder`` copied into ``target`` (each atomically, never onto
    itself); returns the files copied."""
    copied = []
    for name in COMPANION_FILES:
        source = Path(folder) / name
        if source.is_file() and source.resolve() != (Path(target) / name).resolve():
            with atomic_path(Path(target) / name) as staged:
                shutil.copy2(source, staged)
            copied.append(Path(target) / name)
    return copied


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
    "COMPANION_FILES",
    "HF_TASKS",
    "LoadedModel",
    "SentenceEmbedder",
    "TASK_ALIASES",
    "copy_model_files",
    "dynamic_axes_from_specs",
    "inputs_from_specs",
    "load_factory",
    "load_hf_model",
    "load_model_source",
    "load_saved_module",
    "resolve_task",
    "sentence_pooling",
]
