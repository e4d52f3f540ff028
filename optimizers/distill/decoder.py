"""Distilling a generative decoder: a student with fewer layers trained on the teacher's
next-token distributions over local text, saved as a Hugging Face folder that exports with its
cache like any other decoder (``exporter.decoder.export_decoder``).

The student is the teacher's own configuration with ``layers`` decoder layers (default half),
initialised from the teacher: embeddings, final norm and output layer copied, and the layers kept
evenly spaced from first to last (DistilBERT's "one layer in two"). Per token, with teacher
logits ``t``, student logits ``s``, the next token ``y`` and temperature ``T``:

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

``alpha = 0`` is the same student trained on the labels alone, the baseline a distillation must
beat. Text is split by document into training and held-out parts before tokenizing; perplexity
is measured on the held-out part only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

from onnxforge.common.errors import UserError
from onnxforge.common.fileio import atomic_dir
from onnxforge.common.progress import tracked
from optimizers.distill.distill import check_loss_settings

logger = logging.getLogger(__name__)

HELDOUT_WINDOWS = 64  # held-out windows scored for perplexity (the first ones, in order)


@dataclasses.dataclass(frozen=True)
class DecoderDistillSettings:
    layers: int | None = None  # the student's decoder layers; None: half the teacher's, rounded up
    steps: int = 300
    batch: int = 16
    window: int = 64  # tokens per training sequence
    lr: float = 3e-3
    temperature: float = 2.0
    alpha: float = 0.5  # weight of the teacher's distribution; the rest is the next token's label
    heldout_share: float = 0.1  # documents kept out of training, for perplexity
    seed: int = 0

    def __post_init__(self):
        if self.layers is not None and self.layers < 1:
            raise UserError(f"a student needs at least 1 layer, got {self.layers}")
        if self.steps < 1 or self.batch < 1 or self.window < 2:
            raise UserError(f"steps, batch and window must be positive (window at least 2), got {self.steps}, {self.batch}, {self.window}")
        check_loss_settings(self.temperature, self.alpha, self.lr)
        if not 0.0 < self.heldout_share < 0.5:
            raise UserError(f"heldout_share must be in (0, 0.5), got {self.heldout_share}")


@dataclasses.dataclass(frozen=True)
class DecoderDistillResult:
    folder: Path
    teacher_layers: int
    kept_layers: tuple[int, ...]
    perplexity_teacher: float
    perplexity_initial: float  # the student as initialised from the teacher, before training
    perplexity_student: float
    alpha: float
    steps: int
    train_tokens: int
    heldout_tokens: int
    seconds: float

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "folder": str(self.folder)}


def kept_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """``student_layers`` indices spread evenly over the teacher's, first and last included."""
    if student_layers > teacher_layers:
        raise UserError(f"the student cannot have more layers ({student_layers}) than the teacher ({teacher_layers})")
    if student_layers == 1:
        return [0]
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


MIN_TEXTS = 10  # documents: a held-out share of them judges the student


def _documents(texts: Sequence[str]) -> list[str]:
    """The non-empty texts, at least ``MIN_TEXTS`` of them (checked before the teacher is loaded)."""
    documents = [t for t in texts if t.strip()]
    if len(documents) < MIN_TEXTS:
        raise UserError(f"distilling a decoder needs at least {MIN_TEXTS} texts, got {len(documents)}; a --text file holds "
                        "one text per passage, passages separated by blank lines")
    return documents


def _streams(tokenizer, texts: Sequence[str], settings: DecoderDistillSettings):
    import torch

    documents = _documents(texts)
    random.Random(settings.seed).shuffle(documents)
    cut = max(1, int(len(documents) * settings.heldout_share))
    eos = tokenizer.eos_token_id

    def stream(part):
        ids: list[int] = []
        for encoded in tokenizer(part, add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            if eos is not None:
                ids.append(eos)
        return torch.tensor(ids, dtype=torch.long)

    train, heldout = stream(documents[cut:]), stream(documents[:cut])
    if len(train) < settings.window + 2 or len(heldout) < settings.window + 1:
        raise UserError(f"the text gives {len(train)} training and {len(heldout)} held-out tokens, too few for windows of "
                        f"{settings.window}; give more text or a smaller window")
    return train, heldout


def perplexity(model, stream, window: int) -> float:
    """exp(mean next-token cross entropy) over the first ``HELDOUT_WINDOWS`` non-overlapping
    windows of ``stream``."""
    import torch

    count = min(HELDOUT_WINDOWS, (len(stream) - 1) // window)
    chunks = torch.stack([stream[i * window:(i + 1) * window + 1] for i in range(count)])
    model.eval()
    with torch.no_grad():
        total = 0.0
        for start in range(0, count, 16):
            part = chunks[start:start + 16]
            logits = model(input_ids=part[:, :-1]).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), part[:, 1:].reshape(-1),
                                                             reduction="sum"))
    return math.exp(total / (count * window))


def student_from_teacher(teacher, layers: int):
    """The teacher's configuration with ``layers`` decoder layers, weights copied from the
    teacher (layers ``kept_layers``). ``(student, kept)``."""
    import copy

    from transformers import AutoModelForCausalLM

    total = int(teacher.config.num_hidden_layers)
    kept = kept_layers(total, layers)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in kept]
    student = AutoModelForCausalLM.from_config(config)
    renamed = {f".layers.{i}.": f".layers.{j}." for j, i in enumerate(kept)}
    state = {}
    for name, tensor in teacher.state_dict().items():
        marker = next((m for m in renamed if m in name), None)
        if marker is not None:
            state[name.replace(marker, renamed[marker])] = tensor
        elif ".layers." not in name:
            state[name] = tensor
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise UserError(f"could not map the teacher's weights onto a {layers}-layer student: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    return student, kept


def distill_decoder(teacher_folder: str | Path, out_folder: str | Path, texts: Sequence[str],
                    settings: DecoderDistillSettings = DecoderDistillSettings()) -> DecoderDistillResult:
    """Train a ``settings.layers``-layer student of the causal LM in ``teacher_folder`` on
    ``texts`` and save it (weights, config, tokenizer) to ``out_folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    teacher_folder, out_folder = Path(teacher_folder), Path(out_folder)
    _documents(texts)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_folder))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_folder), dtype=torch.float32).eval()
    total = int(teacher.config.num_hidden_layers)
    layers = settings.layers if settings.layers is not None else max(1, (total + 1) // 2)
    train, heldout = _streams(tokenizer, texts, settings)
    torch.manual_seed(settings.seed)
    student, kept = student_from_teacher(teacher, layers)
    teacher_ppl, initial_ppl = perplexity(teacher, heldout, settings.window), perplexity(student, heldout, settings.window)
    logger.info("teacher %d layers: held-out perplexity %.2f; student %d layers %s from it: %.2f before training",
                total, teacher_ppl, layers, kept, initial_ppl)
    _train(teacher, student, train, settings)
    student_ppl = perplexity(student, heldout, settings.window)
    logger.info("student after %d steps (alpha %.2f): held-out perplexity %.2f", settings.steps, settings.alpha, student_ppl)
    with atomic_dir(out_folder) as staging:
        student.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
    return DecoderDistillResult(out_folder, total, tuple(kept), teacher_ppl, initial_ppl, student_ppl, settings.alpha,
                                settings.steps, len(train), len(heldout), time.perf_counter() - started)


def _train(teacher, student, stream, settings: DecoderDistillSettings) -> None:
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=settings.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(settings.seed)
    T, alpha = settings.temperature, settings.alpha
    student.train()
    for step in tracked(range(settings.steps), "distill decoder", label=lambda s: f"step {s + 1}/{settings.steps}"):
        starts = torch.randint(0, len(stream) - settings.window - 1, (settings.batch,), generator=generator)
        chunk = torch.stack([stream[s:s + settings.window + 1] for s in starts.tolist()])
        inputs, labels = chunk[:, :-1], chunk[:, 1:]
        logits = student(input_ids=inputs).logits
        vocab = logits.shape[-1]
        loss = (1.0 - alpha) * F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1)) if alpha < 1.0 else 0.0
        if alpha > 0.0:
            with torch.no_grad():
                target = F.log_softmax(teacher(input_ids=inputs).logits / T, dim=-1).reshape(-1, vocab)
            soft = F.kl_div(F.log_softmax(logits / T, dim=-1).reshape(-1, vocab), target, log_target=True, reduction="batchmean")
            loss = loss + alpha * T * T * soft
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == settings.steps - 1:
            logger.info("distill decoder: step %d loss %.3f", step, float(loss.detach()))
    student.eval()
