"""CPU deployment: the student's image encoder as ONNX (fp32 / int8), and a one-call :class:`Retriever`.

* :func:`export_onnx` writes the image tower of a student as an ONNX model with
  a dynamic batch axis and the **L2 normalisation inside the graph** (its
  output rows have unit length), optionally also a dynamically quantised int8
  copy. Before a file is put in place its outputs are checked against PyTorch
  on real photos (cosine ≥ 0.999 for fp32, else :class:`ExportError`), and the
  report (cosine, category P@10, batch-1 encode time, file size of fp32 vs
  int8) is returned and saved beside the model.
* :class:`Retriever` loads an encoder (ONNX Runtime, or PyTorch fp32 / bf16 /
  ``torch.compile``) and a saved index folder (:meth:`GalleryIndex.load
  <cnclip_kd.index.GalleryIndex.load>`) and answers ``search(jpeg_bytes_or_path, k)``
  with ids, scores, metadata and the time each step took.
* :func:`measure_latency` / :func:`latency_markdown`: p50/p95 of decode,
  encode, search and the total, for notebook 06 and ``benchmarks/query_latency.py``.

Preprocessing is the training one (:func:`cnclip_kd.models.image_transform`:
square bicubic resize, CLIP mean/std), computed in numpy (:func:`to_pixels`, same
values; a few torch ops on one small image are slower than the model on a
busy 2-core machine). With ``fast_decode`` a JPEG query is decoded at a
reduced size by libjpeg's DCT scaling (PIL ``draft``, never below the model's
resolution) before the same resize; the embedding differs slightly from a
full decode (the benchmark reports the cosine).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .images import DEFAULT_MAX_PIXELS, BadImageError, _load_strict, load_image
from .models import MEAN, STD

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "ExportError",
    "OnnxEncoder",
    "Retriever",
    "SearchResult",
    "TorchEncoder",
    "export_onnx",
    "int8_path",
    "latency_markdown",
    "load_query_image",
    "make_encoder",
    "measure_latency",
    "native_bf16",
    "summarize_timings",
    "to_pixels",
]

#: Encoder back-ends a :class:`Retriever` can run.
BACKENDS = ("onnx", "torch", "torch-bf16", "torch-compile")
#: Input and output names of the exported graph.
ONNX_INPUT, ONNX_OUTPUT = "pixel_values", "embeddings"
_META = "cnclip_kd."
_MEAN = np.asarray(MEAN, np.float32).reshape(3, 1, 1)
_STD = np.asarray(STD, np.float32).reshape(3, 1, 1)

QuerySource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


class ExportError(RuntimeError):
    """The exported model does not reproduce PyTorch's embeddings (or cannot be exported)."""


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
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _set_torch_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))  # process-wide: torch has one intra-op pool


class OnnxEncoder:
    """An exported image encoder run by ONNX Runtime on the CPU.

    Attributes:
        path: The ``.onnx`` file.
        session: The ``onnxruntime.InferenceSession``.
        resolution: Input side R.
        dim: Embedding size D.
        precision: ``"fp32"`` or ``"int8"`` (from the file's metadata).
        fingerprint: The source weights' fingerprint (as the index records it), or ``None``.
        threads: Intra-op threads (``None``: ONNX Runtime's default).
        name: ``"onnx-fp32"`` / ``"onnx-int8"``.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        """Open ``path`` with ``threads`` intra-op threads (one inter-op thread)."""
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no ONNX model; export one with export_onnx / "
                                    "`cnclip-kd export` (notebook 06_deploy_cpu.ipynb)")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.inter_op_num_threads = 1
        opts.intra_op_num_threads = int(threads or 0)
        self.threads = int(threads) if threads else None
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        inp = self.session.get_inputs()[0]
        self.resolution = int(meta.get(_META + "resolution") or inp.shape[-1])
        self.dim = int(meta.get(_META + "dim") or self.session.get_outputs()[0].shape[-1])
        self.precision = meta.get(_META + "precision", "fp32")
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

        if self.precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _compile(self) -> None:
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
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        with torch.no_grad(), self._autocast():
            feats = self._fn(x)
        return torch.nn.functional.normalize(feats.float(), dim=-1).numpy()

    def __repr__(self) -> str:
        return f"TorchEncoder({self.name}, threads={self.threads})"


# --------------------------------------------------------------------------- export


class _NormalizedTower(torch.nn.Module):
    """The image tower with the L2 normalisation, as one module to export."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.visual(pixel_values), dim=-1)


def _resolve_source(source: Any, vision_model: str | None, text_model: str | None) -> tuple[torch.nn.Module, str, str | None]:
    """(image tower on the CPU in fp32, description, fingerprint or None) of what export_onnx was given."""
    from .encoders import ImageEncoder, load_encoder

    if isinstance(source, (str, os.PathLike)):
        kwargs = {k: v for k, v in (("vision_model", vision_model), ("text_model", text_model)) if v}
        source = load_encoder(source, device="cpu", precision="fp32", **kwargs)
    if isinstance(source, ImageEncoder):
        if source.model is None or not hasattr(source.model, "visual"):
            raise ExportError(f"{source.name}: only cn_clip students can be exported (got {source!r})")
        visual, name, fingerprint = source.model.visual, str(source.info.get("spec", source.name)), source.fingerprint()
    elif isinstance(source, torch.nn.Module):
        model = getattr(source, "module", source)
        visual, name, fingerprint = getattr(model, "visual", model), type(model).__name__, None
    else:
        raise TypeError(f"export_onnx needs a checkpoint path, a model spec, an ImageEncoder or a CLIP module, "
                        f"got {type(source).__name__}")
    if not hasattr(visual, "input_resolution") or not hasattr(visual, "output_dim"):
        raise ExportError(f"{name}: not a cn_clip image tower (no input_resolution/output_dim)")
    return copy.deepcopy(visual).to("cpu", torch.float32).eval(), name, fingerprint


def _set_metadata(path: Path, props: Mapping[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path))
    existing = {p.key: p.value for p in model.metadata_props}
    existing.update({_META + k: str(v) for k, v in props.items()})
    onnx.helper.set_model_props(model, existing)
    onnx.save(model, str(path))


def _check_images(images: str | os.PathLike | None, max_images: int | None, seed: int) -> tuple[list[Image.Image], list[str]]:
    """Real photos (and their categories) for the export check: a folder or manifest, default the sample data."""
    from . import SAMPLE_DATA
    from .data import read_source

    records = read_source(images or SAMPLE_DATA)
    if max_images and len(records) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(len(records), int(max_images), replace=False))
        records = [records[i] for i in rows]
    pics, labels = [], []
    for rec in records:
        try:
            pics.append(load_image(rec.data if rec.data is not None else rec.source))
            labels.append(rec.label)
        except BadImageError as err:
            logger.warning("export check: skipped %s (%s)", rec.source, err.reason)
    if not pics:
        raise ExportError(f"{images or SAMPLE_DATA}: no readable image to check the export with")
    return pics, labels


def _batched(fn, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([fn(pixels[s:s + batch_size]) for s in range(0, len(pixels), batch_size)])


def _category_metrics(feats: np.ndarray, labels: Sequence[str]) -> dict | None:
    from .metrics import image_to_image_metrics

    labels = np.asarray(labels, dtype=object)
    if not all(labels) or len(set(labels)) == len(labels):
        return None  # no categories, or no two images share one: P@10 means nothing
    return image_to_image_metrics(torch.from_numpy(feats), labels.astype(str), k=10)


def _median_ms(fn, x: np.ndarray, runs: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1000, 2)


def _atomic_json(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def int8_path(out_path: str | os.PathLike) -> Path:
    """Where :func:`export_onnx` writes the int8 model of ``out_path`` (``x.onnx`` → ``x.int8.onnx``)."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.int8{out.suffix or '.onnx'}")


def export_onnx(
    source: Any,
    out_path: str | os.PathLike,
    *,
    quantize: bool | None = None,
    opset: int = 17,
    images: str | os.PathLike | None = None,
    max_images: int | None = 1000,
    min_cosine: float = 0.999,
    int8_max_p10_drop: float = 0.02,
    int8_min_cosine: float = 0.99,
    threads: int | None = None,
    timing_runs: int = 5,
    seed: int = 0,
    vision_model: str | None = None,
    text_model: str | None = None,
) -> dict:
    """Export a student's image encoder to ONNX, check it on real photos, optionally quantise to int8.

    The graph takes ``pixel_values`` ``[batch, 3, R, R]`` (float32, :func:`to_pixels`)
    and returns ``embeddings`` ``[batch, D]``, **already L2-normalised** (the
    normalisation is inside the graph); the batch axis is dynamic. Exported with
    the TorchScript exporter (``dynamo=False``; the dynamo one needs onnxscript)
    at ``opset`` ≥ 14 (cn_clip's own exporter uses 13, where
    ``scaled_dot_product_attention`` does not export on torch ≥ 2.x).

    Checks, on ``images`` (default: the embedded sample data, 600 photos):
    cosine between ONNX and PyTorch embeddings (fp32 must reach ``min_cosine``
    on every image, or :class:`ExportError` and nothing is written), category
    P@10 (leave-one-out image→image) of PyTorch, fp32 and int8, and the batch-1
    encode time of each. int8 is ONNX Runtime's dynamic quantisation with
    signed 8-bit per-channel weights, 7-bit range (``reduce_range``: CPUs
    without VNNI multiply u8×s8 with 16-bit saturation, which costs accuracy
    at full range).

    Files (each written to a temp name and renamed into place): ``out_path``,
    ``<stem>.int8.onnx`` (when kept) and ``<stem>.report.json`` (the returned report).

    Args:
        source: A student checkpoint path or spec (:func:`cnclip_kd.encoders.load_encoder`),
            an :class:`~cnclip_kd.encoders.ImageEncoder` of a student, or a cn_clip ``CLIP`` module.
        out_path: The fp32 ``.onnx`` file.
        quantize: ``True``: also write int8; ``False``: fp32 only; ``None`` (default): write
            int8 and keep it only when its measured cost is within ``int8_max_p10_drop``
            (absolute category P@10) and ``int8_min_cosine`` (mean cosine to PyTorch).
        opset: ONNX opset (≥ 14).
        images: A photo folder or manifest for the checks (default: the sample data).
        max_images: Use a seeded random subset of at most this many photos (``None``: all).
            The P@10 compares fp32 with int8 on the same photos; it is not a held-out evaluation.
        min_cosine: Lowest fp32 cosine to PyTorch accepted on any photo.
        int8_max_p10_drop: See ``quantize=None``.
        int8_min_cosine: See ``quantize=None``.
        threads: ONNX Runtime / torch threads for the checks and timings.
        timing_runs: Batch-1 timings per model (median reported).
        seed: Seeds the photo subset.
        vision_model: Architecture of a checkpoint that does not record it.
        text_model: Likewise.

    Returns:
        The report: ``onnx``, ``report``, ``opset``, ``resolution``, ``dim``, ``l2_normalized``,
        ``dynamic_batch``, ``source``, ``fingerprint``, ``n_images``, ``images``, ``threads``,
        ``torch`` / ``fp32`` / ``int8`` blocks (``path``, ``mb``, ``cosine_min``, ``cosine_mean``,
        ``p@10``, ``map@10``, ``encode_ms``), ``int8["kept"]`` and ``int8["reason"]``.

    Raises:
        ExportError: Export failed, or fp32 disagrees with PyTorch.
        ValueError: ``opset`` < 14.
    """
    import onnxruntime  # noqa: F401  (fail early when it is missing)

    if opset < 14:
        raise ValueError(f"opset {opset} < 14: scaled_dot_product_attention needs opset ≥ 14")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    q_out, report_path = int8_path(out), out.with_name(f"{out.stem}.report.json")
    visual, name, fingerprint = _resolve_source(source, vision_model, text_model)
    _set_torch_threads(threads)
    resolution, dim = int(visual.input_resolution), int(visual.output_dim)
    wrapper = _NormalizedTower(visual).eval()

    pics, labels = _check_images(images, max_images, seed)
    pixels = np.stack([to_pixels(p, resolution) for p in pics])

    def torch_encode(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return wrapper(torch.from_numpy(x)).numpy()

    ref = _batched(torch_encode, pixels)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.onnx")
    tmp_q = out.with_name(f".{out.stem}.{os.getpid()}.tmp.int8.onnx")
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", message=".*dynamo.*|.*TorchScript.*", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            try:
                torch.onnx.export(wrapper, (torch.from_numpy(pixels[:2].copy()),), str(tmp),
                                  input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                                  dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}},
                                  opset_version=int(opset), do_constant_folding=True, dynamo=False)
            except Exception as err:  # the exporter raises many types; all mean "this model does not export"
                raise ExportError(f"{name}: torch.onnx.export failed at opset {opset} "
                                  f"({type(err).__name__}: {err})") from err
        export_s = time.perf_counter() - t0
        meta = {"resolution": resolution, "dim": dim, "l2_normalized": 1, "mean": list(MEAN), "std": list(STD),
                "fingerprint": fingerprint or "", "source": name, "precision": "fp32"}
        _set_metadata(tmp, meta)
        fp32 = OnnxEncoder(tmp, threads=threads)
        # Mixed batch sizes: the dynamic axis is exercised, not just batch 32.
        got = np.concatenate([fp32.encode(pixels[:1]), _batched(fp32.encode, pixels[1:], 7)]) if len(pixels) > 1 \
            else fp32.encode(pixels)
        cos = (got * ref).sum(1)
        if float(cos.min()) < min_cosine:
            worst = int(np.argmin(cos))
            raise ExportError(f"{name}: the ONNX model disagrees with PyTorch: cosine {cos.min():.6f} < {min_cosine} "
                              f"on image {worst} (mean {cos.mean():.6f}); not written")

        torch_metrics, fp32_metrics = _category_metrics(ref, labels), _category_metrics(got, labels)
        one = pixels[:1]
        report: dict[str, Any] = {
            "onnx": str(out.resolve()), "report": str(report_path.resolve()), "opset": int(opset),
            "resolution": resolution, "dim": dim, "l2_normalized": True, "dynamic_batch": True,
            "source": name, "fingerprint": fingerprint, "n_images": len(pics),
            "images": str(images or "sample_data"), "threads": threads or torch.get_num_threads(),
            "export_s": round(export_s, 2),
            "torch": {"encode_ms": _median_ms(torch_encode, one, timing_runs), **_metric_fields(torch_metrics)},
            "fp32": {"path": str(out.resolve()), "mb": round(tmp.stat().st_size / 2 ** 20, 2),
                     "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                     "encode_ms": _median_ms(fp32.encode, one, timing_runs), **_metric_fields(fp32_metrics)},
        }
        del fp32
        if quantize is not False:
            report["int8"] = _quantize(tmp, tmp_q, meta, pixels, ref, labels, report, quantize, threads,
                                       timing_runs, int8_max_p10_drop, int8_min_cosine)
            report["int8"]["path"] = str(q_out.resolve()) if report["int8"]["kept"] else None
        os.replace(tmp, out)
        if quantize is not False and report["int8"]["kept"]:
            os.replace(tmp_q, q_out)
        elif q_out.exists():
            q_out.unlink()  # an older int8 file would no longer match the fp32 one
        _atomic_json(report_path, report)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_q.unlink(missing_ok=True)
        for stray in out.parent.glob(f".{out.stem}.{os.getpid()}.tmp*"):  # onnxruntime's side files
            stray.unlink(missing_ok=True)
    logger.info("exported %s: fp32 cosine ≥ %.5f%s", out, report["fp32"]["cosine_min"],
                f"; int8 {'kept' if report['int8']['kept'] else 'not kept'} ({report['int8']['reason']})"
                if "int8" in report else "")
    return report


def _metric_fields(metrics: Mapping[str, Any] | None) -> dict:
    if not metrics:
        return {"p@10": None, "map@10": None}
    return {"p@10": metrics.get("p@10"), "map@10": metrics.get("map@10")}


def _drop_preprocess_advice(record: logging.LogRecord) -> bool:
    """onnxruntime's quantiser logs per-tensor notes and advice for static quantisation on the root logger."""
    return record.levelno >= logging.ERROR or not (record.name == "root" or "quantiz" in record.getMessage().lower())


def _quantize(src: Path, dst: Path, meta: dict, pixels: np.ndarray, ref: np.ndarray, labels: Sequence[str],
              report: dict, quantize: bool | None, threads: int | None, timing_runs: int, max_drop: float,
              min_cos: float) -> dict:
    """Dynamic int8 of ``src`` into ``dst``, measured against PyTorch; decides whether it is kept."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    root = logging.getLogger()
    root.addFilter(_drop_preprocess_advice)  # quantize_dynamic logs advice for static quantisation
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    finally:
        root.removeFilter(_drop_preprocess_advice)
    _set_metadata(dst, {**meta, "precision": "int8"})
    enc = OnnxEncoder(dst, threads=threads)
    got = _batched(enc.encode, pixels)
    cos = (got * ref).sum(1)
    fields = _metric_fields(_category_metrics(got, labels))
    block = {"mb": round(dst.stat().st_size / 2 ** 20, 2), "cosine_min": float(cos.min()),
             "cosine_mean": float(cos.mean()), "encode_ms": _median_ms(enc.encode, pixels[:1], timing_runs),
             **fields, "quantize_s": round(time.perf_counter() - t0, 2)}
    p_ref, p_q = report["fp32"]["p@10"], fields["p@10"]
    drop = None if p_ref is None or p_q is None else round(p_ref - p_q, 4)
    block["p@10_drop"] = drop
    within = block["cosine_mean"] >= min_cos and (drop is None or drop <= max_drop)
    cost = (f"cosine to PyTorch {block['cosine_mean']:.4f} (min {block['cosine_min']:.4f}), "
            f"P@10 {'n/a' if drop is None else f'{p_q:.3f} vs {p_ref:.3f}'}, "
            f"{block['encode_ms']:.1f} vs {report['fp32']['encode_ms']:.1f} ms")
    if quantize is None:
        block["kept"] = within
        block["reason"] = ("within" if within else "over") + f" tolerance: {cost}"
    else:
        block["kept"] = True
        block["reason"] = f"requested: {cost}"
        if not within:
            logger.warning("int8 model is over the tolerance (%s) but was requested; check its cost", cost)
    return block


# --------------------------------------------------------------------------- retrieval


@dataclass
class SearchResult:
    """One query's answer.

    Attributes:
        ids: ``[n]`` gallery image ids, best first (``n ≤ k``: missing results dropped).
        scores: ``[n]`` cosine similarities.
        rows: ``[n]`` gallery rows (``index.gallery.meta[row]``).
        metadata: ``n`` metadata rows (``id``, ``caption``, ``label``, ``product_id``, ``image`` …).
        timings_ms: ``decode`` (decode + preprocess), ``encode``, ``search``, ``total``.
    """

    ids: np.ndarray
    scores: np.ndarray
    rows: np.ndarray
    metadata: list[dict]
    timings_ms: dict = field(default_factory=dict)

    def hits(self) -> list[dict]:
        """One dict per result: ``rank``, ``id``, ``score`` and the metadata fields."""
        return [{**meta, "rank": rank, "id": int(i), "score": round(float(s), 6)}
                for rank, (i, s, meta) in enumerate(zip(self.ids, self.scores, self.metadata), 1)]

    def to_dict(self) -> dict:
        """JSON-ready: ``results`` (:meth:`hits`) and ``timings_ms``."""
        return {"results": self.hits(), "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}}


def _is_onnx(spec: Any) -> bool:
    return isinstance(spec, (str, os.PathLike)) and str(spec).lower().endswith(".onnx")


def make_encoder(spec: str | os.PathLike, backend: str = "auto", *, threads: int | None = None,
                 vision_model: str | None = None, text_model: str | None = None) -> OnnxEncoder | TorchEncoder:
    """An encoder for a Retriever.

    Args:
        spec: An ``.onnx`` file (:func:`export_onnx`) or a student checkpoint / cn_clip pretrained name.
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


class Retriever:
    """Image query → Top-k gallery items, in one call.

    Attributes:
        index: The :class:`~cnclip_kd.index.GalleryIndex`.
        encoder: An :class:`OnnxEncoder` or :class:`TorchEncoder`.
        fast_decode: Whether JPEG queries are decoded at reduced size (:func:`load_query_image`).
        max_pixels: Larger queries are refused.
    """

    def __init__(self, index, encoder: OnnxEncoder | TorchEncoder, *, fast_decode: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        """Pair an index with the encoder of the model it was built with.

        Raises:
            ValueError: The embedding sizes differ, or both record a weights fingerprint and
                they differ (the encoder is not the index's model).
        """
        if encoder.dim != index.dim:
            raise ValueError(f"the encoder gives {encoder.dim}-d embeddings, the index holds {index.dim}-d: "
                             "not the model the index was built with")
        built_with = (index.stats.get("model") or {}).get("fingerprint")
        if built_with and encoder.fingerprint and built_with != encoder.fingerprint:
            raise ValueError(f"the encoder ({encoder.fingerprint}) is not the model the index was built with "
                             f"({built_with}, {(index.stats.get('model') or {}).get('spec')}); its embeddings "
                             "are not comparable. Export that checkpoint, or rebuild the index (notebook 03)")
        self.index = index
        self.encoder = encoder
        self.fast_decode = bool(fast_decode)
        self.max_pixels = int(max_pixels)

    @classmethod
    def load(cls, index_dir: str | os.PathLike, encoder: str | os.PathLike | None = None, *,
             backend: str = "auto", threads: int | None = None, fast_decode: bool = True,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> "Retriever":
        """Load a saved index folder and an encoder.

        Args:
            index_dir: A folder written by :meth:`GalleryIndex.save <cnclip_kd.index.GalleryIndex.save>`
                (notebook 03, ``cnclip-kd index``).
            encoder: An ``.onnx`` file, a checkpoint or a cn_clip pretrained name; ``None``: the
                model the index was built with (``stats["model"]["spec"]``), in PyTorch.
            backend: See :func:`make_encoder`.
            threads: Intra-op threads of the encoder.
            fast_decode: Decode JPEG queries at reduced size (see :func:`load_query_image`).
            max_pixels: Refuse larger query images.

        Raises:
            FileNotFoundError: Not a saved index, or a missing ``.onnx`` file.
            ValueError: No encoder given and the index does not name its model; an encoder
                that does not fit the index.
        """
        from .index import GalleryIndex

        index = GalleryIndex.load(index_dir)
        if encoder is None:
            encoder = (index.stats.get("model") or {}).get("spec")
            if not encoder:
                raise ValueError(f"{index_dir}: the index does not name its model; pass encoder=<.onnx or checkpoint>")
        return cls(index, make_encoder(encoder, backend, threads=threads), fast_decode=fast_decode,
                   max_pixels=max_pixels)

    @property
    def backend(self) -> str:
        """The encoder's name: ``onnx-fp32``, ``onnx-int8``, ``torch``, ``torch-bf16``, ``torch-compile``."""
        return self.encoder.name

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
        t0 = time.perf_counter()
        x = self.pixels(image)[None]
        t1 = time.perf_counter()
        emb = self.encoder.encode(x)
        t2 = time.perf_counter()
        scores, rows = self.index.search(emb, k)
        t3 = time.perf_counter()
        keep = rows[0] >= 0
        rows, scores = rows[0][keep], scores[0][keep]
        gallery = self.index.gallery
        return SearchResult(ids=gallery.ids[rows], scores=scores, rows=rows,
                            metadata=[dict(gallery.meta[int(r)]) for r in rows],
                            timings_ms={"decode": (t1 - t0) * 1e3, "encode": (t2 - t1) * 1e3,
                                        "search": (t3 - t2) * 1e3, "total": (t3 - t0) * 1e3})

    def __repr__(self) -> str:
        return (f"Retriever({self.encoder!r}, index={self.index.stats.get('kind')} × {len(self.index)}, "
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


def measure_latency(retriever: Retriever, queries: Sequence[QuerySource], *, repeats: int = 5, warmup: int = 1,
                    k: int = 10) -> dict:
    """Time end-to-end queries: every query ``warmup`` times untimed, then ``repeats`` times.

    Returns:
        :func:`summarize_timings` of the timed runs, plus ``backend``.
    """
    for _ in range(warmup):
        for q in queries:
            retriever.search(q, k)
    runs = [retriever.search(q, k).timings_ms for _ in range(repeats) for q in queries]
    return {"backend": retriever.backend, **summarize_timings(runs)}


def latency_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Latency rows as a Markdown table.

    Each row: ``backend``, optional ``query`` (e.g. ``"800×800"``), the stages of
    :func:`summarize_timings`, and optional ``speedup`` (× baseline p50 total) and ``rss_mb``.
    """
    has_query = any("query" in r for r in rows)
    has_speed = any(r.get("speedup") is not None for r in rows)
    has_rss = any(r.get("rss_mb") is not None for r in rows)
    head = (["查询 query"] if has_query else []) + ["后端 backend", "总计 total p50", "p95",
                                                   "解码+预处理 decode p50", "编码 encode p50", "p95",
                                                   "检索 search p50"]
    head += (["加速 speed-up"] if has_speed else []) + (["峰值内存 peak RSS"] if has_rss else [])
    align = ["---"] * (2 if has_query else 1) + ["---:"] * (len(head) - (2 if has_query else 1))
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        cells = ([str(r.get("query", ""))] if has_query else []) + [str(r["backend"])]
        cells += [f"{r['total']['p50']:.1f} ms", f"{r['total']['p95']:.1f}", f"{r['decode']['p50']:.1f}",
                  f"{r['encode']['p50']:.1f}", f"{r['encode']['p95']:.1f}", f"{r['search']['p50']:.2f}"]
        if has_speed:
            cells.append("-" if r.get("speedup") is None else f"{r['speedup']:.2f}×")
        if has_rss:
            cells.append("-" if r.get("rss_mb") is None else f"{r['rss_mb']:.0f} MB")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

