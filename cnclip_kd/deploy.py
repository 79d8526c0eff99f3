"""CPU serving: query → Top-k gallery items, through ONNX Runtime (no torch) or PyTorch.

* :class:`Retriever` loads a saved index folder (:meth:`GalleryIndex.load
  <cnclip_kd.index.GalleryIndex.load>`) with an image encoder and/or a text
  encoder and answers ``search(jpeg_bytes_or_path, k)`` (image → image) and
  ``search_text("白色连衣裙", k)`` (text → image) with ids, scores, metadata and
  the time each step took.
* Encoders: :class:`OnnxEncoder` / :class:`OnnxTextEncoder` run the models that
  :mod:`cnclip_kd.export` writes (``export_onnx``, ``export_text_onnx``) with ONNX
  Runtime; :class:`TorchEncoder` runs a student's image tower in PyTorch (fp32,
  bf16 autocast, ``torch.compile``) and :func:`cnclip_kd.encoders.load_text_encoder`
  its text tower.
* :func:`measure_latency` / :func:`latency_markdown`: p50/p95 of decode,
  encode, search and the total, for notebook 06 and ``benchmarks/query_latency.py``.

**No torch on the ONNX path.** This module imports torch only inside the
PyTorch back-ends: ``Retriever.load(index_dir, "image_encoder.onnx",
text_encoder="text_encoder.onnx")`` followed by image and text searches runs on
numpy, PIL, FAISS, ONNX Runtime and cn_clip's tokenizer
(:mod:`cnclip_kd.tokenizer`) alone, and leaves ``"torch" not in sys.modules``
(a smaller, faster-starting server: ``import torch`` alone takes ~0.5 GB).

Image preprocessing is the training one (:func:`cnclip_kd.models.image_transform`:
square bicubic resize, CLIP mean/std), computed in numpy (:func:`to_pixels`, same
values; a few torch ops on one small image are slower than the model on a
busy 2-core machine). With ``fast_decode`` a JPEG query is decoded at a
reduced size by libjpeg's DCT scaling (PIL ``draft``, never below the model's
resolution) before the same resize; the embedding differs slightly from a
full decode (the benchmark reports the cosine). A text query is checked
(:func:`cnclip_kd.tokenizer.check_query`: empty or whitespace-only →
:class:`~cnclip_kd.tokenizer.QueryError`) and tokenised as cn_clip does, at its
own length (padding is masked, so it would not change the embedding); a query
longer than the context length is cut, and the result says so.
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .images import CLIP_MEAN, CLIP_STD, DEFAULT_MAX_PIXELS, _load_strict, load_image
from .tokenizer import CONTEXT_LENGTH, Tokens, check_query, tokenize

if TYPE_CHECKING:  # pragma: no cover
    from .encoders import TextEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "OnnxEncoder",
    "OnnxTextEncoder",
    "Retriever",
    "SearchResult",
    "TorchEncoder",
    "latency_markdown",
    "load_query_image",
    "make_encoder",
    "make_text_encoder",
    "measure_latency",
    "native_bf16",
    "summarize_timings",
    "to_pixels",
]

#: Encoder back-ends a :class:`Retriever` can run.
BACKENDS = ("onnx", "torch", "torch-bf16", "torch-compile")
#: Input and output names of the exported graphs (image: ``pixel_values``, text: ``input_ids``).
ONNX_INPUT, ONNX_OUTPUT = "pixel_values", "embeddings"
ONNX_TEXT_INPUT = "input_ids"
_META = "cnclip_kd."
_MEAN = np.asarray(CLIP_MEAN, np.float32).reshape(3, 1, 1)
_STD = np.asarray(CLIP_STD, np.float32).reshape(3, 1, 1)

QuerySource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


# --------------------------------------------------------------------------- preprocessing


def to_pixels(image: Image.Image, resolution: int) -> np.ndarray:
    """The training transform of one RGB image, in numpy: ``[3, R, R]`` float32.

    Same values as :func:`cnclip_kd.models.image_transform` (PIL bicubic resize to
    ``R × R``, scale to [0, 1], CLIP mean/std).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    return (pixels - _MEAN) / _STD


def load_query_image(source: QuerySource, *, draft_size: int | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a query into RGB, optionally letting libjpeg shrink a JPEG while decoding.

    Args:
        source: Encoded bytes, a file path, or a PIL image (converted to RGB).
        draft_size: For an RGB/greyscale JPEG, decode at the smallest DCT scale
            (1/2, 1/4, 1/8) that keeps both sides ≥ ``draft_size`` (PIL ``draft``).
            ``None``: full decode. Every other input goes through
            :func:`cnclip_kd.images.load_image`.
        max_pixels: Refuse larger images (decompression bombs).

    Returns:
        An RGB image, EXIF orientation applied.

    Raises:
        BadImageError: Empty, missing, not an image, truncated or too large.
    """
    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else source.convert("RGB")
    if draft_size is None:
        return load_image(source, max_pixels=max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "<bytes>"
    else:
        path = Path(source)
        if not path.is_file():
            return load_image(source, max_pixels=max_pixels)  # raises its "file not found"
        data, name = path.read_bytes(), str(source)
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return load_image(data, name=name, max_pixels=max_pixels)  # raises the clear error
    width, height = img.size
    if img.format != "JPEG" or img.mode not in ("RGB", "L") or not 0 < width * height <= max_pixels:
        img.close()
        return load_image(data, name=name, max_pixels=max_pixels)
    img.draft("RGB", (int(draft_size), int(draft_size)))
    try:
        _load_strict(img)  # a truncated upload fails here even when a library turned PIL's flag on
    except (OSError, SyntaxError, ValueError):
        img.close()
        return load_image(data, name=name, max_pixels=max_pixels)  # raises "truncated or corrupt"
    img = ImageOps.exif_transpose(img)
    return img if img.mode == "RGB" else img.convert("RGB")


# --------------------------------------------------------------------------- encoders


def native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 / AMX). Without it bf16 autocast is
    emulated and several times slower than fp32 (measured: 6× on an AVX2-only EPYC)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _set_torch_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))  # process-wide: torch has one intra-op pool


def _ort_session(path: Path, threads: int | None):
    """An ONNX Runtime CPU session: all graph optimisations, ``threads`` intra-op threads, one inter-op."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = int(threads or 0)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _open_onnx(path: Path, threads: int | None, kind: str, *, missing: str, other: str):
    """(session, metadata, first input) of an exported encoder of ``kind`` (``"image"`` / ``"text"``).

    Raises:
        FileNotFoundError: No such file (``missing`` says how to make one).
        ValueError: The file is the other tower's export (``other`` says what to open it with).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {missing}")
    session = _ort_session(path, threads)
    meta = session.get_modelmeta().custom_metadata_map
    inp = session.get_inputs()[0]
    other_kind, other_input = ("text", ONNX_TEXT_INPUT) if kind == "image" else ("image", ONNX_INPUT)
    if meta.get(_META + "kind") == other_kind or inp.name == other_input:
        raise ValueError(f"{path}: {other}")
    return session, meta, inp


def _fingerprint_of(encoder: Any) -> str | None:
    """An encoder's fingerprint: an attribute on the ONNX encoders, a method on the kit's PyTorch ones."""
    fp = getattr(encoder, "fingerprint", None)
    if callable(fp):
        fp = fp()
    return str(fp) if fp else None


class OnnxEncoder:
    """An exported image encoder run by ONNX Runtime on the CPU.

    Attributes:
        path: The ``.onnx`` file.
        session: The ``onnxruntime.InferenceSession``.
        resolution: Input side R.
        dim: Embedding size D.
        precision: ``"fp32"`` or ``"int8"`` (from the file's metadata).
        int8_method: ``"dynamic"`` or ``"static"`` for an int8 model (older exports: ``None``).
        fingerprint: The source weights' fingerprint (as the index records it), or ``None``.
        threads: Intra-op threads (``None``: ONNX Runtime's default).
        name: ``"onnx-fp32"`` / ``"onnx-int8"``.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        """Open ``path`` with ``threads`` intra-op threads (one inter-op thread).

        Raises:
            FileNotFoundError: No such file.
            ValueError: The file is an exported text encoder (:class:`OnnxTextEncoder`).
        """
        self.path, self.threads = Path(path), int(threads) if threads else None
        self.session, meta, inp = _open_onnx(
            self.path, threads, "image", missing="no ONNX model; export one with export_onnx / `cnclip-kd export` "
                                                 "(notebook 06_deploy_cpu.ipynb)",
            other="an exported text encoder, not an image one; open it with OnnxTextEncoder (Retriever text_encoder=)")
        self.resolution = int(meta.get(_META + "resolution") or inp.shape[-1])
        self.dim = int(meta.get(_META + "dim") or self.session.get_outputs()[0].shape[-1])
        self.precision = meta.get(_META + "precision", "fp32")
        self.int8_method = meta.get(_META + "int8_method") or None if self.precision == "int8" else None
        self.fingerprint = meta.get(_META + "fingerprint") or None
        self._normalized = meta.get(_META + "l2_normalized", "1") == "1"
        self._input = inp.name
        self.name = f"onnx-{self.precision}"

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """``[B, 3, R, R]`` float32 pixels (:func:`to_pixels`) → ``[B, D]`` L2-normalised float32."""
        out = self.session.run(None, {self._input: np.ascontiguousarray(pixels, dtype=np.float32)})[0]
        if not self._normalized:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"OnnxEncoder({str(self.path)!r}, precision={self.precision}, threads={self.threads})"


class OnnxTextEncoder:
    """An exported text encoder (:func:`cnclip_kd.export.export_text_onnx`) run by ONNX Runtime, without torch.

    Texts are tokenised as cn_clip tokenises them (:func:`cnclip_kd.tokenizer.tokenize`, numpy) and fed
    at the length of the longest text in the batch (the graph masks padding, both axes are dynamic).

    Attributes:
        path: The ``.onnx`` file.
        session: The ``onnxruntime.InferenceSession``.
        context_length: Tokens per text, ``[CLS]``/``[SEP]`` included; longer texts are cut.
        dim: Embedding size D.
        precision: ``"fp32"`` or ``"int8"``.
        fingerprint: The text tower's fingerprint (:meth:`cnclip_kd.encoders.TextEncoder.fingerprint`,
            what an index records as ``text_fingerprint``), or ``None``.
        image_fingerprint: The fingerprint of the same model's image tower (an index's ``fingerprint``),
            or ``None`` when the export did not know it.
        threads: Intra-op threads (``None``: ONNX Runtime's default).
        name: ``"onnx-text-fp32"`` / ``"onnx-text-int8"``.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        """Open ``path`` with ``threads`` intra-op threads (one inter-op thread).

        Raises:
            FileNotFoundError: No such file.
            ValueError: The file is an exported image encoder (:class:`OnnxEncoder`).
        """
        self.path, self.threads = Path(path), int(threads) if threads else None
        self.session, meta, inp = _open_onnx(
            self.path, threads, "text", missing="no ONNX text model; export one with export_text_onnx / "
                                                "`cnclip-kd export CKPT OUT.onnx --text-out TEXT.onnx` (notebook 06)",
            other="an exported image encoder, not a text one; open it with OnnxEncoder")
        self.context_length = int(meta.get(_META + "context_length") or CONTEXT_LENGTH)
        self.dim = int(meta.get(_META + "dim") or self.session.get_outputs()[0].shape[-1])
        self.precision = meta.get(_META + "precision", "fp32")
        self.fingerprint = meta.get(_META + "fingerprint") or None
        self.image_fingerprint = meta.get(_META + "image_fingerprint") or None
        self._normalized = meta.get(_META + "l2_normalized", "1") == "1"
        self._input = inp.name
        self.name = f"onnx-text-{self.precision}"

    def tokenize(self, texts: str | Sequence[str]) -> Tokens:
        """cn_clip's token ids of ``texts`` at this model's context length, padded to the longest only."""
        return tokenize(texts, self.context_length, pad_to_context=False)

    def encode_ids(self, ids: np.ndarray) -> np.ndarray:
        """``[B, L]`` int64 token ids (``L`` ≤ :attr:`context_length`, zero padding) → ``[B, D]`` L2-normalised float32."""
        out = self.session.run(None, {self._input: np.ascontiguousarray(ids, dtype=np.int64)})[0]
        if not self._normalized:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32, copy=False)

    def encode(self, texts: str | Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Embeddings of texts, in batches (no query checks: see :func:`cnclip_kd.tokenizer.check_query`).

        Returns:
            ``[N, D]`` float32, L2-normalised rows; a text longer than the context length is cut.
        """
        if isinstance(texts, str):
            texts = [texts]
        out = [np.zeros((0, self.dim), np.float32)]
        for start in range(0, len(texts), batch_size):
            out.append(self.encode_ids(self.tokenize(list(texts[start:start + batch_size])).ids))
        return np.concatenate(out)

    def truncated(self, text: str) -> bool:
        """Whether ``text`` has more tokens than :attr:`context_length` (its end is not seen)."""
        return bool(self.tokenize(text).truncated[0])

    def __repr__(self) -> str:
        return (f"OnnxTextEncoder({str(self.path)!r}, precision={self.precision}, "
                f"context_length={self.context_length}, threads={self.threads})")


class TorchEncoder:
    """A student's image tower run by PyTorch on the CPU: fp32, bf16 autocast, or compiled.

    Attributes:
        visual: The student's image tower (eval mode; the text tower is not kept).
        resolution: Input side R.
        dim: Embedding size D.
        precision: ``"fp32"`` or ``"bf16"``.
        compiled: Whether the tower runs through ``torch.compile`` (inductor, weights frozen).
        fingerprint: As :meth:`cnclip_kd.encoders.ImageEncoder.fingerprint` (what the index records).
        threads: ``torch.get_num_threads()`` after loading.
        name: ``"torch"``, ``"torch-bf16"`` or ``"torch-compile"``.
    """

    def __init__(self, spec: str | os.PathLike, *, precision: str = "fp32", compile: bool = False,
                 threads: int | None = None, vision_model: str | None = None, text_model: str | None = None):
        """Load ``spec`` (a student checkpoint or cn_clip pretrained name, see
        :func:`cnclip_kd.encoders.load_encoder`) on the CPU.

        ``compile=True`` compiles the tower with inductor (weights frozen into the
        graph) and runs one warm-up batch here: tens of seconds for a ViT-B-16 on 2 cores.
        """
        import torch

        from .encoders import load_encoder

        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        _set_torch_threads(threads)
        kwargs = {k: v for k, v in (("vision_model", vision_model), ("text_model", text_model)) if v}
        enc = load_encoder(spec, device="cpu", precision="fp32", **kwargs)
        if enc.model is None or not hasattr(enc.model, "visual"):
            raise ValueError(f"{spec}: not a student model; the Retriever serves cn_clip students")
        self.visual = enc.model.visual.eval()  # only the image tower stays in memory
        self.resolution = int(self.visual.input_resolution)
        self.dim = enc.dim
        self.fingerprint = enc.fingerprint()
        self.precision = precision
        self.compiled = bool(compile)
        self.threads = torch.get_num_threads()
        self.name = "torch-compile" if compile else ("torch-bf16" if precision == "bf16" else "torch")
        self._fn = self.visual
        del enc
        if compile:
            self._compile()

    def _autocast(self):
        import contextlib

        import torch

        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _compile(self) -> None:
        import torch
        import torch._inductor.config as inductor_config

        compiled = torch.compile(self.visual, dynamic=False)
        warm = torch.zeros(1, 3, self.resolution, self.resolution)
        t0 = time.perf_counter()
        # Freezing folds the weights into the graph (needs no_grad); it happens at the first call.
        with inductor_config.patch(freezing=True), torch.no_grad(), self._autocast():
            compiled(warm)
        logger.info("torch.compile of the image tower: %.1f s", time.perf_counter() - t0)
        self._fn = compiled

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """``[B, 3, R, R]`` float32 pixels → ``[B, D]`` L2-normalised float32."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        with torch.no_grad(), self._autocast():
            feats = self._fn(x)
        return torch.nn.functional.normalize(feats.float(), dim=-1).numpy()

    def __repr__(self) -> str:
        return f"TorchEncoder({self.name}, threads={self.threads})"


# --------------------------------------------------------------------------- retrieval


@dataclass
class SearchResult:
    """One query's answer.

    Attributes:
        ids: ``[n]`` gallery image ids, best first (``n ≤ k``: missing results dropped).
        scores: ``[n]`` cosine similarities.
        rows: ``[n]`` gallery rows (``index.gallery.meta[row]``).
        metadata: ``n`` metadata rows (``id``, ``caption``, ``label``, ``product_id``, ``image`` …).
        timings_ms: ``decode`` (image: decode + preprocess; text: query check + tokenise),
            ``encode``, ``search``, ``total``.
        query: For a text query: ``text`` (as searched, surrounding whitespace stripped),
            ``truncated`` (the text had more tokens than the model reads: its end was cut),
            ``n_tokens`` (tokens fed, ``[CLS]``/``[SEP]`` included) and ``context_length``;
            ``None`` for an image query.
    """

    ids: np.ndarray
    scores: np.ndarray
    rows: np.ndarray
    metadata: list[dict]
    timings_ms: dict = field(default_factory=dict)
    query: dict | None = None

    def hits(self) -> list[dict]:
        """One dict per result: ``rank``, ``id``, ``score`` and the metadata fields."""
        return [{**meta, "rank": rank, "id": int(i), "score": round(float(s), 6)}
                for rank, (i, s, meta) in enumerate(zip(self.ids, self.scores, self.metadata), 1)]

    def to_dict(self) -> dict:
        """JSON-ready: ``results`` (:meth:`hits`), ``timings_ms`` and, for a text query, ``query``."""
        out = {"results": self.hits(), "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}}
        if self.query is not None:
            out["query"] = dict(self.query)
        return out


def _is_onnx(spec: Any) -> bool:
    return isinstance(spec, (str, os.PathLike)) and str(spec).lower().endswith(".onnx")


def make_encoder(spec: str | os.PathLike, backend: str = "auto", *, threads: int | None = None,
                 vision_model: str | None = None, text_model: str | None = None) -> OnnxEncoder | TorchEncoder:
    """An image encoder for a Retriever.

    Args:
        spec: An ``.onnx`` file (:func:`cnclip_kd.export.export_onnx`) or a student checkpoint /
            cn_clip pretrained name.
        backend: ``onnx`` (an ``.onnx`` spec), ``torch`` (fp32), ``torch-bf16`` (bf16 autocast),
            ``torch-compile`` (inductor with frozen weights, bf16 where the CPU has it natively
            (:func:`native_bf16`), else fp32; a slow first call), or ``auto``: ``onnx`` for an
            ``.onnx`` file, else ``torch``.
        threads: Intra-op threads (torch's are process-wide).
        vision_model: Architecture of a checkpoint that does not record it.
        text_model: Likewise.

    Raises:
        ValueError: Unknown backend, or an ONNX backend for a checkpoint (export it first).
    """
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if _is_onnx(spec):
        if backend not in ("auto", "onnx"):
            raise ValueError(f"{spec} is an ONNX model; backend {backend!r} needs a checkpoint")
        return OnnxEncoder(spec, threads=threads)
    if backend == "onnx":
        raise ValueError(f"{spec}: backend 'onnx' needs an .onnx file; export it first "
                         "(export_onnx, `cnclip-kd export`, notebook 06_deploy_cpu.ipynb)")
    bf16 = backend == "torch-bf16" or (backend == "torch-compile" and native_bf16())
    return TorchEncoder(spec, precision="bf16" if bf16 else "fp32",
                        compile=backend == "torch-compile", threads=threads, vision_model=vision_model,
                        text_model=text_model)


def make_text_encoder(spec: Any, *, threads: int | None = None, context_length: int | None = None,
                      vision_model: str | None = None, text_model: str | None = None) -> OnnxTextEncoder | TextEncoder:
    """A text encoder for a Retriever.

    Args:
        spec: An ``.onnx`` text model (:func:`cnclip_kd.export.export_text_onnx`; ONNX Runtime, no
            torch), or anything :func:`cnclip_kd.encoders.load_text_encoder` takes (a student
            checkpoint, a cn_clip pretrained name, ``teacher:<…>``: PyTorch fp32 on the CPU). An
            already loaded text encoder is returned as it is.
        threads: Intra-op threads (torch's are process-wide).
        context_length: For a PyTorch model: tokens per text (default: the checkpoint's, else 52).
        vision_model: Architecture of a checkpoint that does not record it.
        text_model: Likewise.

    Raises:
        cnclip_kd.tokenizer.NoTextTowerError: The model has no text tower (the message names it).
        FileNotFoundError: A missing ``.onnx`` file.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    if _is_onnx(spec):
        return OnnxTextEncoder(spec, threads=threads)
    from .encoders import load_text_encoder

    _set_torch_threads(threads)
    kwargs = {k: v for k, v in (("vision_model", vision_model), ("text_model", text_model)) if v}
    return load_text_encoder(spec, device="cpu", precision="fp32", context_length=context_length, **kwargs)


def _text_backend_name(encoder: Any) -> str:
    return encoder.name if isinstance(encoder, OnnxTextEncoder) else "torch-text"


def _image_only_spec(spec: str) -> bool:
    """Whether a model spec names an image-only teacher (EfficientNet-Lite, timm), known without loading it."""
    if not str(spec).startswith("teacher:"):
        return False
    from .image_teachers import is_image_teacher

    return is_image_teacher(str(spec)[len("teacher:"):])


class Retriever:
    """Image or text query → Top-k gallery items, in one call.

    Either encoder may be given or left to load from the model the index was built with
    (``index.stats["model"]["spec"]``, in PyTorch) at the first query that needs it: a
    text-only server never loads an image tower, and an ONNX-only one never imports torch.

    Attributes:
        index: The :class:`~cnclip_kd.index.GalleryIndex`.
        encoder: The image encoder (:class:`OnnxEncoder` or :class:`TorchEncoder`; loaded on first use).
        text_encoder: The text encoder (:class:`OnnxTextEncoder` or a
            :class:`cnclip_kd.encoders.TextEncoder`; loaded on first use).
        fast_decode: Whether JPEG queries are decoded at reduced size (:func:`load_query_image`).
        max_pixels: Larger queries are refused.
        threads: Intra-op threads of encoders loaded on first use.
    """

    def __init__(self, index, encoder: OnnxEncoder | TorchEncoder | None = None, *,
                 text_encoder: OnnxTextEncoder | TextEncoder | None = None, fast_decode: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, backend: str = "auto", threads: int | None = None):
        """Pair an index with the encoders of the model it was built with.

        Args:
            index: A :class:`~cnclip_kd.index.GalleryIndex`.
            encoder: The image encoder; ``None``: the index's model with ``backend``
                (:func:`make_encoder`), loaded at the first image query.
            text_encoder: The text encoder; ``None``: the index's model in PyTorch
                (:func:`make_text_encoder`), loaded at the first text query.
            fast_decode: Decode JPEG queries at reduced size (see :func:`load_query_image`).
            max_pixels: Refuse larger query images.
            backend: Back-end of an image encoder loaded on first use (see :func:`make_encoder`).
            threads: Intra-op threads of encoders loaded on first use.

        Raises:
            ValueError: An encoder whose embedding size differs from the index's, or whose weights
                fingerprint differs from the one the index records (not the model it was built with);
                an unknown ``backend``.
        """
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
        self.index = index
        self.fast_decode = bool(fast_decode)
        self.max_pixels = int(max_pixels)
        self.threads = int(threads) if threads else None
        self._backend = backend
        self._encoder = None
        self._text_encoder = None
        self._text_error: Exception | None = None
        if encoder is not None:
            self._check_image_encoder(encoder)
            self._encoder = encoder
        if text_encoder is not None:
            self._check_text_encoder(text_encoder)
            self._text_encoder = text_encoder

    @classmethod
    def load(cls, index_dir: str | os.PathLike, encoder: str | os.PathLike | None = None, *,
             text_encoder: Any = None, backend: str = "auto", threads: int | None = None,
             fast_decode: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> Retriever:
        """Load a saved index folder and its encoders.

        Args:
            index_dir: A folder written by :meth:`GalleryIndex.save <cnclip_kd.index.GalleryIndex.save>`
                (notebook 03, ``cnclip-kd index``).
            encoder: Image encoder: an ``.onnx`` file, a checkpoint or a cn_clip pretrained name;
                ``None``: the model the index was built with (``stats["model"]["spec"]``), in
                PyTorch, loaded at the first image query.
            text_encoder: Text encoder: an ``.onnx`` text model (:func:`cnclip_kd.export.export_text_onnx`),
                or a checkpoint / spec for PyTorch (:func:`make_text_encoder`); ``None``: the index's
                model, loaded at the first text query (:func:`cnclip_kd.encoders.load_text_encoder`).
            backend: See :func:`make_encoder`.
            threads: Intra-op threads of the encoders.
            fast_decode: Decode JPEG queries at reduced size (see :func:`load_query_image`).
            max_pixels: Refuse larger query images.

        Raises:
            FileNotFoundError: Not a saved index, or a missing ``.onnx`` file.
            ValueError: No encoder given and the index does not name its model; an encoder
                that does not fit the index.
            cnclip_kd.tokenizer.NoTextTowerError: ``text_encoder`` names a model without a text tower.
        """
        from .index import GalleryIndex

        index = GalleryIndex.load(index_dir)
        if encoder is None and text_encoder is None and not (index.stats.get("model") or {}).get("spec"):
            raise ValueError(f"{index_dir}: the index does not name its model; pass encoder=<.onnx or checkpoint> "
                             "and/or text_encoder=<.onnx text model or checkpoint>")
        image = make_encoder(encoder, backend, threads=threads) if encoder is not None else None
        text = make_text_encoder(text_encoder, threads=threads) if text_encoder is not None else None
        return cls(index, image, text_encoder=text, fast_decode=fast_decode, max_pixels=max_pixels,
                   backend=backend, threads=threads)

    # ------------------------------------------------------------------ encoders and their checks

    @property
    def _model(self) -> dict:
        return self.index.stats.get("model") or {}

    def _check_image_encoder(self, encoder: Any) -> None:
        if encoder.dim != self.index.dim:
            raise ValueError(f"the encoder gives {encoder.dim}-d embeddings, the index holds {self.index.dim}-d: "
                             "not the model the index was built with")
        built_with, mine = self._model.get("fingerprint"), _fingerprint_of(encoder)
        if built_with and mine and built_with != mine:
            raise ValueError(f"the encoder ({mine}) is not the model the index was built with "
                             f"({built_with}, {self._model.get('spec')}); its embeddings "
                             "are not comparable. Export that checkpoint, or rebuild the index (notebook 03)")

    def _check_text_encoder(self, encoder: Any) -> None:
        if encoder.dim != self.index.dim:
            raise ValueError(f"the text encoder gives {encoder.dim}-d embeddings, the index holds "
                             f"{self.index.dim}-d: not the model the index was built with")
        spec = self._model.get("spec")
        for what, built_with, mine in (
                ("text tower", self._model.get("text_fingerprint"), _fingerprint_of(encoder)),
                ("image tower", self._model.get("fingerprint"), getattr(encoder, "image_fingerprint", None))):
            if built_with and mine and built_with != mine:
                raise ValueError(f"the text encoder ({what} {mine}) is not the model the index was built with "
                                 f"({built_with}, {spec}); its embeddings are not comparable. Export that "
                                 "model's text tower (export_text_onnx, `cnclip-kd export --text-out`), or "
                                 "rebuild the index (notebook 03)")

    @property
    def encoder(self) -> OnnxEncoder | TorchEncoder:
        """The image encoder, loaded from the index's model at first use when none was given.

        Raises:
            ValueError: The index does not name its model, or that model cannot serve (see :func:`make_encoder`).
        """
        if self._encoder is None:
            spec = self._model.get("spec")
            if not spec:
                raise ValueError("the index does not name its model and no image encoder was given; "
                                 "pass encoder=<.onnx or checkpoint>")
            encoder = make_encoder(spec, self._backend, threads=self.threads)
            self._check_image_encoder(encoder)
            self._encoder = encoder
        return self._encoder

    @property
    def text_encoder(self) -> OnnxTextEncoder | TextEncoder:
        """The text encoder, loaded from the index's model at first use when none was given.

        Raises:
            cnclip_kd.tokenizer.NoTextTowerError: The index's model has no text tower (an image-only
                teacher such as ``teacher:efficientnet-lite2``); the message names it. Known from the
                index (``stats["model"]["text_tower"]``) or the spec without loading any weights.
            ValueError: The index does not name its model, or its text tower does not fit the index.
        """
        if self._text_encoder is None:
            if self._text_error is not None:
                raise self._text_error  # a model without a text tower is not loaded again for every query
            self._text_encoder = self._load_text_encoder()
        return self._text_encoder

    def _load_text_encoder(self):
        spec = self._model.get("spec")
        if not spec:
            raise ValueError("the index does not name its model and no text encoder was given; pass "
                             "text_encoder=<.onnx text model or checkpoint> (export_text_onnx, "
                             "`cnclip-kd export --text-out`)")
        from .tokenizer import NoTextTowerError

        image_only = _image_only_spec(spec)
        if image_only or self._model.get("text_tower") is False:
            what = "an image-only model" if image_only else "the model this index was built with"
            self._text_error = NoTextTowerError(
                f"{spec}: {what} has no text tower for Chinese text queries (the index holds its image "
                "embeddings only); search it with images, or index with a Chinese-CLIP student or teacher for "
                "text → image")
            raise self._text_error
        try:
            encoder = make_text_encoder(spec, threads=self.threads, context_length=self._model.get("context_length"))
        except NoTextTowerError as err:
            self._text_error = err
            raise
        self._check_text_encoder(encoder)
        logger.info("text encoder loaded from the index's model %s (PyTorch)", spec)
        return encoder

    @property
    def backend(self) -> str:
        """The image encoder's name: ``onnx-fp32``, ``onnx-int8``, ``torch``, ``torch-bf16``, ``torch-compile``."""
        return self.encoder.name

    @property
    def text_backend(self) -> str:
        """The text encoder's name: ``onnx-text-fp32``, ``onnx-text-int8`` or ``torch-text``."""
        return _text_backend_name(self.text_encoder)

    # ------------------------------------------------------------------ queries

    def pixels(self, image: QuerySource) -> np.ndarray:
        """Decode + preprocess one query: ``[3, R, R]`` float32.

        Raises:
            BadImageError: The input is not a usable image.
        """
        r = self.encoder.resolution
        img = load_query_image(image, draft_size=r if self.fast_decode else None, max_pixels=self.max_pixels)
        return to_pixels(img, r)

    def embed(self, image: QuerySource) -> np.ndarray:
        """The query's ``[D]`` L2-normalised embedding."""
        return self.encoder.encode(self.pixels(image)[None])[0]

    def embed_text(self, text: str) -> np.ndarray:
        """A text query's ``[D]`` L2-normalised embedding.

        Raises:
            QueryError: Empty, whitespace only, or not a string.
        """
        return self.text_encoder.encode([check_query(text)])[0]

    def _answer(self, emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        t0 = time.perf_counter()
        scores, rows = self.index.search(emb, k)
        elapsed = time.perf_counter() - t0
        keep = rows[0] >= 0
        return scores[0][keep], rows[0][keep], elapsed

    def _result(self, scores: np.ndarray, rows: np.ndarray, timings: dict, query: dict | None = None) -> SearchResult:
        gallery = self.index.gallery
        return SearchResult(ids=gallery.ids[rows], scores=scores, rows=rows,
                            metadata=[dict(gallery.meta[int(r)]) for r in rows], timings_ms=timings, query=query)

    def search(self, image: QuerySource, k: int = 10) -> SearchResult:
        """The ``k`` most similar gallery items of a query image.

        Args:
            image: JPEG/PNG/… bytes, a file path, or a PIL image.
            k: Results wanted.

        Returns:
            ids, scores, rows, metadata and ``timings_ms`` (``decode``, ``encode``, ``search``, ``total``).

        Raises:
            BadImageError: Empty, truncated, not an image, or too large.
        """
        encoder = self.encoder  # loaded here on first use, outside the timings
        t0 = time.perf_counter()
        x = self.pixels(image)[None]
        t1 = time.perf_counter()
        emb = encoder.encode(x)
        t2 = time.perf_counter()
        scores, rows, search_s = self._answer(emb, k)
        return self._result(scores, rows, {"decode": (t1 - t0) * 1e3, "encode": (t2 - t1) * 1e3,
                                           "search": search_s * 1e3, "total": (t2 - t0 + search_s) * 1e3})

    def search_text(self, text: str, k: int = 10) -> SearchResult:
        """The ``k`` gallery images that best match a text query (text → image).

        The query is checked (:func:`cnclip_kd.tokenizer.check_query`), tokenised as cn_clip does
        at its own length (Chinese, Latin, digits, emoji, mixed scripts; characters outside the
        vocabulary become ``[UNK]``), encoded by the text tower and searched in the index.

        Args:
            text: The query, e.g. ``"白色连衣裙"``.
            k: Results wanted.

        Returns:
            ids, scores, rows, metadata, ``timings_ms`` (``decode`` = query check + tokenise,
            ``encode``, ``search``, ``total``) and ``query`` (``text``, ``truncated``: the query
            was longer than the context length and its end was cut, ``n_tokens``, ``context_length``).

        Raises:
            QueryError: Empty, whitespace only, or not a string (checked before any model loads).
            cnclip_kd.tokenizer.NoTextTowerError: The index's model has no text tower (names it).
        """
        if self._text_encoder is None:
            check_query(text)  # a bad query is refused before a model is loaded for it
        encoder = self.text_encoder  # loaded here on first use, outside the timings
        t0 = time.perf_counter()
        query = check_query(text)
        tokens = tokenize(query, encoder.context_length, pad_to_context=False)
        t1 = time.perf_counter()
        if isinstance(encoder, OnnxTextEncoder):
            emb = encoder.encode_ids(tokens.ids)
            truncated = bool(tokens.truncated[0])
        else:
            emb = encoder.encode([query])
            truncated = bool(encoder.truncated(query))
        t2 = time.perf_counter()
        scores, rows, search_s = self._answer(emb, k)
        info = {"text": query, "truncated": truncated, "n_tokens": int(tokens.lengths[0]),
                "context_length": int(encoder.context_length)}
        if truncated:
            logger.info("text query of %d word pieces cut to the model's %d tokens", int(tokens.n_pieces[0]) + 2,
                        encoder.context_length)
        return self._result(scores, rows, {"decode": (t1 - t0) * 1e3, "encode": (t2 - t1) * 1e3,
                                           "search": search_s * 1e3, "total": (t2 - t0 + search_s) * 1e3}, info)

    def __repr__(self) -> str:
        text = _text_backend_name(self._text_encoder) if self._text_encoder is not None else "on first text query"
        image = repr(self._encoder) if self._encoder is not None else "image encoder on first image query"
        return (f"Retriever({image}, text={text}, index={self.index.stats.get('kind')} × {len(self.index)}, "
                f"fast_decode={self.fast_decode})")


# --------------------------------------------------------------------------- latency


STAGES = ("decode", "encode", "search", "total")


def summarize_timings(runs: Sequence[Mapping[str, float]]) -> dict:
    """p50 / p95 (ms) of each stage over ``runs`` of :attr:`SearchResult.timings_ms`."""
    out: dict = {"n": len(runs)}
    for stage in STAGES:
        values = np.asarray([r[stage] for r in runs], dtype=np.float64)
        out[stage] = {"p50": round(float(np.percentile(values, 50)), 2),
                      "p95": round(float(np.percentile(values, 95)), 2)} if len(values) else None
    return out


def measure_latency(retriever: Retriever, queries: Sequence[QuerySource] | Sequence[str], *, repeats: int = 5,
                    warmup: int = 1, k: int = 10, text: bool = False) -> dict:
    """Time end-to-end queries: every query ``warmup`` times untimed, then ``repeats`` times.

    Args:
        retriever: The Retriever.
        queries: Images (:meth:`Retriever.search`) or, with ``text=True``, text queries
            (:meth:`Retriever.search_text`).
        repeats: Timed passes over the queries.
        warmup: Untimed passes first.
        k: Results per query.
        text: Time text queries.

    Returns:
        :func:`summarize_timings` of the timed runs, plus ``backend`` (the text encoder's for text).
    """
    search = retriever.search_text if text else retriever.search
    for _ in range(warmup):
        for q in queries:
            search(q, k)
    runs = [search(q, k).timings_ms for _ in range(repeats) for q in queries]
    return {"backend": retriever.text_backend if text else retriever.backend, **summarize_timings(runs)}


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 1 else f"{value:.1f}"  # a tokenised text query takes well under 1 ms


def latency_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Latency rows as a Markdown table (image or text queries: the same stages).

    Each row: ``backend``, optional ``query`` (e.g. ``"800×800"``, ``"text"``), the stages of
    :func:`summarize_timings`, and optional ``speedup`` (× baseline p50 total) and ``rss_mb``.
    """
    has_query = any("query" in r for r in rows)
    has_speed = any(r.get("speedup") is not None for r in rows)
    has_rss = any(r.get("rss_mb") is not None for r in rows)
    head = (["查询 query"] if has_query else []) + ["后端 backend", "总计 total p50", "p95",
                                                   "解码预处理/分词 decode p50", "编码 encode p50", "p95",
                                                   "检索 search p50"]
    head += (["加速 speed-up"] if has_speed else []) + (["峰值内存 peak RSS"] if has_rss else [])
    align = ["---"] * (2 if has_query else 1) + ["---:"] * (len(head) - (2 if has_query else 1))
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        cells = ([str(r.get("query", ""))] if has_query else []) + [str(r["backend"])]
        cells += [f"{r['total']['p50']:.1f} ms", f"{r['total']['p95']:.1f}", _ms(r['decode']['p50']),
                  f"{r['encode']['p50']:.1f}", f"{r['encode']['p95']:.1f}", f"{r['search']['p50']:.2f}"]
        if has_speed:
            cells.append("-" if r.get("speedup") is None else f"{r['speedup']:.2f}×")
        if has_rss:
            cells.append("-" if r.get("rss_mb") is None else f"{r['rss_mb']:.0f} MB")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

