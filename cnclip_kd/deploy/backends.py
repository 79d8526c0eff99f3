"""CPU serving: query → Top-k gallery items, through ONNX Runtime (no torch) or PyTorch.

* :class:`Retriever` loads a saved index folder (:meth:`GalleryIndex.load
  <cnclip_kd.retrieval.index.GalleryIndex.load>`) with an image encoder and/or a text
  encoder and answers ``search(jpeg_bytes_or_path, k)`` (image → image) and
  ``search_text("白色连衣裙", k)`` (text → image) with ids, scores, metadata and
  the time each step took.
* Encoders: :class:`OnnxEncoder` / :class:`OnnxTextEncoder` run the models that
  :mod:`cnclip_kd.deploy.export` writes (``export_onnx``, ``export_text_onnx``) with ONNX
  Runtime; :class:`TorchEncoder` runs a student's image tower in PyTorch (fp32,
  bf16 autocast, ``torch.compile``) and :func:`cnclip_kd.retrieval.encoders.load_text_encoder`
  its text tower.
* :func:`measure_latency` / :func:`latency_markdown`: p50/p95 of decode,
  encode, search and the total, for notebook 06 and ``benchmarks/query_latency.py``.

**No torch on the ONNX path.** This module imports torch only inside the
PyTorch back-ends: ``Retriever.load(index_dir, "image_encoder.onnx",
text_encoder="text_encoder.onnx")`` followed by image and text searches runs on
numpy, PIL, FAISS, ONNX Runtime and cn_clip's tokenizer
(:mod:`cnclip_kd.core.tokenizer`) alone, and leaves ``"torch" not in sys.modules``
(a smaller, faster-starting server: ``import torch`` alone takes ~0.5 GB).

Image preprocessing is the training one (:func:`cnclip_kd.models.students.image_transform`:
square bicubic resize, CLIP mean/std), computed in numpy (:func:`to_pixels`, same
values; a few torch ops on one small image are slower than the model on a
busy 2-core machine). With ``fast_decode`` a JPEG query is decoded at a
reduced size by libjpeg's DCT scaling (PIL ``draft``, never below the model's
resolution) before the same resize; the embedding differs slightly from a
full decode (the benchmark reports the cosine). A text query is checked
(:func:`cnclip_kd.core.tokenizer.check_query`: empty or whitespace-only →
:class:`~cnclip_kd.core.tokenizer.QueryError`) and tokenised as cn_clip does, at its
own length (padding is masked, so it would not change the embedding); a query
longer than the context length is cut, and the result says so.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from ..core.images import CLIP_MEAN, CLIP_STD
from ..core.precision import native_bf16, set_torch_threads
from ..core.tokenizer import CONTEXT_LENGTH, Tokens, tokenize
from ..retrieval.session import QuerySource, load_query_image  # noqa: F401 - spelled in the session; public here

if TYPE_CHECKING:  # pragma: no cover
    from ..retrieval.encoders import TextEncoder

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS", "OnnxEncoder", "OnnxTextEncoder", "TorchEncoder", "load_query_image", "make_encoder",
    "make_text_encoder", "to_pixels",
]

#: Encoder back-ends a :class:`Retriever` can run.
BACKENDS = ("onnx", "torch", "torch-bf16", "torch-compile")
#: Input and output names of the exported graphs (image: ``pixel_values``, text: ``input_ids``).
ONNX_INPUT, ONNX_OUTPUT = "pixel_values", "embeddings"
ONNX_TEXT_INPUT = "input_ids"
ONNX_META_PREFIX = "cnclip_kd."
_MEAN = np.asarray(CLIP_MEAN, np.float32).reshape(3, 1, 1)
_STD = np.asarray(CLIP_STD, np.float32).reshape(3, 1, 1)


# --------------------------------------------------------------------------- preprocessing


def to_pixels(image: Image.Image, resolution: int) -> np.ndarray:
    """The training transform of one RGB image, in numpy: ``[3, R, R]`` float32.

    Same values as :func:`cnclip_kd.models.students.image_transform` (PIL bicubic resize to
    ``R × R``, scale to [0, 1], CLIP mean/std).
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size != (resolution, resolution):
        image = image.resize((resolution, resolution), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    return (pixels - _MEAN) / _STD


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
    if meta.get(ONNX_META_PREFIX + "kind") == other_kind or inp.name == other_input:
        raise ValueError(f"{path}: {other}")
    return session, meta, inp


def encoder_fingerprint(encoder: Any) -> str | None:
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
        self.resolution = int(meta.get(ONNX_META_PREFIX + "resolution") or inp.shape[-1])
        self.dim = int(meta.get(ONNX_META_PREFIX + "dim") or self.session.get_outputs()[0].shape[-1])
        self.precision = meta.get(ONNX_META_PREFIX + "precision", "fp32")
        self.int8_method = meta.get(ONNX_META_PREFIX + "int8_method") or None if self.precision == "int8" else None
        self.fingerprint = meta.get(ONNX_META_PREFIX + "fingerprint") or None
        self._normalized = meta.get(ONNX_META_PREFIX + "l2_normalized", "1") == "1"
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
    """An exported text encoder (:func:`cnclip_kd.deploy.export.export_text_onnx`) run by ONNX Runtime, without torch.

    Texts are tokenised as cn_clip tokenises them (:func:`cnclip_kd.core.tokenizer.tokenize`, numpy) and fed
    at the length of the longest text in the batch (the graph masks padding, both axes are dynamic).

    Attributes:
        path: The ``.onnx`` file.
        session: The ``onnxruntime.InferenceSession``.
        context_length: Tokens per text, ``[CLS]``/``[SEP]`` included; longer texts are cut.
        dim: Embedding size D.
        precision: ``"fp32"`` or ``"int8"``.
        fingerprint: The text tower's fingerprint (:meth:`cnclip_kd.retrieval.encoders.TextEncoder.fingerprint`,
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
        self.context_length = int(meta.get(ONNX_META_PREFIX + "context_length") or CONTEXT_LENGTH)
        self.dim = int(meta.get(ONNX_META_PREFIX + "dim") or self.session.get_outputs()[0].shape[-1])
        self.precision = meta.get(ONNX_META_PREFIX + "precision", "fp32")
        self.fingerprint = meta.get(ONNX_META_PREFIX + "fingerprint") or None
        self.image_fingerprint = meta.get(ONNX_META_PREFIX + "image_fingerprint") or None
        self._normalized = meta.get(ONNX_META_PREFIX + "l2_normalized", "1") == "1"
        self._input = inp.name
        self.name = f"onnx-text-{self.precision}"

    def tokenize(self, texts: str | Sequence[str]) -> Tokens:
        """cn_clip's token ids of ``texts`` at this model's context length, padded to the longest only."""
        return tokenize(texts, self.context_length, pad_to_context=False)

    def encode_ids(self, ids: np.ndarray) -> np.ndarray:
        """``[B, L]`` int64 token ids (``L`` ≤ :attr:`context_length`, zero padding) → ``[B, D]`` L2-normalised
        float32."""
        out = self.session.run(None, {self._input: np.ascontiguousarray(ids, dtype=np.int64)})[0]
        if not self._normalized:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32, copy=False)

    def encode(self, texts: str | Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Embeddings of texts, in batches (no query checks: see :func:`cnclip_kd.core.tokenizer.check_query`).

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
        fingerprint: As :meth:`cnclip_kd.retrieval.encoders.ImageEncoder.fingerprint` (what the index records).
        threads: ``torch.get_num_threads()`` after loading.
        name: ``"torch"``, ``"torch-bf16"`` or ``"torch-compile"``.
    """

    def __init__(self, spec: str | os.PathLike, *, precision: str = "fp32", compile: bool = False,
                 threads: int | None = None, vision_model: str | None = None, text_model: str | None = None):
        """Load ``spec`` (a student checkpoint or cn_clip pretrained name, see
        :func:`cnclip_kd.retrieval.encoders.load_encoder`) on the CPU.

        ``compile=True`` compiles the tower with inductor (weights frozen into the
        graph) and runs one warm-up batch here: tens of seconds for a ViT-B-16 on 2 cores.
        """
        import torch

        from ..retrieval.encoders import load_encoder

        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
        set_torch_threads(threads)
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


def _is_onnx(spec: Any) -> bool:
    return isinstance(spec, (str, os.PathLike)) and str(spec).lower().endswith(".onnx")


def make_encoder(spec: str | os.PathLike, backend: str = "auto", *, threads: int | None = None,
                 vision_model: str | None = None, text_model: str | None = None) -> OnnxEncoder | TorchEncoder:
    """An image encoder for a Retriever.

    Args:
        spec: An ``.onnx`` file (:func:`cnclip_kd.deploy.export.export_onnx`) or a student checkpoint /
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
        spec: An ``.onnx`` text model (:func:`cnclip_kd.deploy.export.export_text_onnx`; ONNX Runtime, no
            torch), or anything :func:`cnclip_kd.retrieval.encoders.load_text_encoder` takes (a student
            checkpoint, a cn_clip pretrained name, ``teacher:<…>``: PyTorch fp32 on the CPU). An
            already loaded text encoder is returned as it is.
        threads: Intra-op threads (torch's are process-wide).
        context_length: For a PyTorch model: tokens per text (default: the checkpoint's, else 52).
        vision_model: Architecture of a checkpoint that does not record it.
        text_model: Likewise.

    Raises:
        cnclip_kd.core.tokenizer.NoTextTowerError: The model has no text tower (the message names it).
        FileNotFoundError: A missing ``.onnx`` file.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    if _is_onnx(spec):
        return OnnxTextEncoder(spec, threads=threads)
    from ..retrieval.encoders import load_text_encoder

    set_torch_threads(threads)
    kwargs = {k: v for k, v in (("vision_model", vision_model), ("text_model", text_model)) if v}
    return load_text_encoder(spec, device="cpu", precision="fp32", context_length=context_length, **kwargs)
