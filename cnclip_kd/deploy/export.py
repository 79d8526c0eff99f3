"""ONNX export of a student's two towers, each checked against PyTorch before it is written.

* :func:`export_onnx` writes the **image** tower: input ``pixel_values``
  ``[batch, 3, R, R]`` (:func:`cnclip_kd.deploy.backends.to_pixels`), output
  ``embeddings`` ``[batch, D]`` L2-normalised inside the graph.
* :func:`export_text_onnx` writes the **text** tower: input ``input_ids``
  ``[batch, seq]`` (int64, cn_clip's tokenizer, :func:`cnclip_kd.core.tokenizer.tokenize`;
  both axes dynamic, so a short query runs at its own length), the attention
  mask computed inside the graph as ``input_ids != 0`` (cn_clip's ``[PAD]``),
  output ``embeddings`` ``[batch, D]`` L2-normalised inside the graph.

Both check the ONNX model against PyTorch before anything is put in place
(fp32 cosine ≥ 0.999 on every check input, else :class:`ExportError` and no
file), optionally write an int8 copy (:mod:`cnclip_kd.deploy.quantize`: dynamic, or
static for the image tower) with its measured cost, and save a
``<stem>.report.json`` beside the model. Every file is
written to a temp name and renamed into place. The models are served by
:class:`cnclip_kd.deploy.backends.OnnxEncoder` / :class:`cnclip_kd.deploy.backends.OnnxTextEncoder`
(ONNX Runtime, no torch).

Exported with the TorchScript exporter (``dynamo=False``: the dynamo one needs
onnxscript) at opset ≥ 14 (cn_clip's own exporter uses 13, where
``scaled_dot_product_attention`` does not export on torch ≥ 2.x).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..core.images import CLIP_MEAN, CLIP_STD
from ..core.precision import set_torch_threads
from .backends import (
    ONNX_INPUT,
    ONNX_META_PREFIX,
    ONNX_OUTPUT,
    ONNX_TEXT_INPUT,
    OnnxEncoder,
    OnnxTextEncoder,
    to_pixels,
)
from .quantize import (
    INT8_METHODS,
    calibration_record,
    quantize_dynamic_file,
    quantize_static_file,
)
from .tower_export import (
    ExportError,
    TowerExport,
    batched,
    category_metrics,
    check_records,
    file_mb,
    median_ms,
    metric_fields,
    preflight,
    text_to_image_metrics,
)

logger = logging.getLogger(__name__)

__all__ = ["CHECK_QUERIES", "ExportError", "export_onnx", "export_text_onnx", "quantize_image_onnx"]

#: Varied queries every text export is checked on, beside the sample captions: Latin, digits, emoji,
#: full-width forms, accents, curly quotes, other scripts, punctuation only, and a text longer than
#: the context length (cut, as in training).
CHECK_QUERIES = (
    "白色连衣裙",
    "T-shirt",
    "Nike 运动鞋 42码",
    "iPhone 15 Pro Max 手机壳",
    "2024新款 韩版 oversize 卫衣 XL",
    "👗 红色 长裙 ❤️🔥",
    "ＡＢＣ全角１２３",
    "café naïve 夏装",
    "“复古”风 牛仔外套",
    "日本語のテキスト と 한국어 混排",
    "12345",
    "!!!???",
    "a",
    "夏季新款女装 宽松显瘦 百搭 纯棉短袖T恤 " * 8,
)




# --------------------------------------------------------------------------- image tower


class _NormalizedTower(torch.nn.Module):
    """The image tower with the L2 normalisation, as one module to export."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.visual(pixel_values), dim=-1)


def _resolve_source(source: Any, vision_model: str | None,
                    text_model: str | None) -> tuple[torch.nn.Module, str, str | None]:
    """(image tower on the CPU in fp32, description, fingerprint or None) of what export_onnx was given."""
    from ..retrieval.encoders import ImageEncoder, load_encoder

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


def quantize_image_onnx(src: str | os.PathLike, dst: str | os.PathLike, method: str = "static", *,
                        calibration_images: str | os.PathLike | None = None, calibration_size: int = 64,
                        seed: int = 0) -> dict:
    """Quantise an exported image model (:func:`export_onnx`'s fp32 file) to int8 with ``method``, unchecked.

    For timing and planning (``cnclip-kd plan``, ``benchmarks/query_latency.py``),
    where every method's file is wanted side by side; a model to deploy is
    exported with :func:`export_onnx`, which measures each method against
    PyTorch and keeps the fastest within tolerance. Written to a temp name and
    renamed into place.

    Args:
        src: The fp32 ``.onnx`` image model.
        dst: Where the int8 model goes.
        method: ``"dynamic"`` or ``"static"`` (:data:`INT8_METHODS`).
        calibration_images: Photos for static calibration (default: the sample data).
        calibration_size: Calibration photos (seeded subset).
        seed: Seeds the subset.

    Returns:
        ``{"path", "method", "mb", "quantize_s", "calibration"}`` (``calibration`` None for dynamic).

    Raises:
        ValueError: Unknown method.
        FileNotFoundError: No ``src``.
    """
    if method not in INT8_METHODS:
        raise ValueError(f"unknown int8 method {method!r}; choose from {INT8_METHODS}")
    src, dst = Path(src), Path(dst)
    enc = OnnxEncoder(src)  # FileNotFoundError / ValueError (a text model) with the fix in the message
    meta = {k[len(ONNX_META_PREFIX):]: v for k, v in enc.session.get_modelmeta().custom_metadata_map.items()
            if k.startswith(ONNX_META_PREFIX)}
    resolution = enc.resolution
    del enc
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.stem}.{os.getpid()}.tmp.onnx")
    calibration = None
    try:
        if method == "static":
            pics, used = check_records(calibration_images, calibration_size, seed + 1)
            pixels = np.stack([to_pixels(p, resolution) for p in pics])
            calibration = calibration_record(str(calibration_images or "sample_data"), used, seed)
            quantize_s = quantize_static_file(src, tmp, meta, pixels)
        else:
            quantize_s = quantize_dynamic_file(src, tmp, meta, preprocess=True)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(dst.resolve()), "method": method, "mb": file_mb(dst),
            "quantize_s": quantize_s, "calibration": calibration}


def _calibration_pixels(calibration_images, calibration_size: int, pixels: np.ndarray, records: list,
                        resolution: int, seed: int, check_source) -> tuple[np.ndarray, dict]:
    """The photos static int8 is calibrated on (a seeded subset), and what the report records of them."""
    if calibration_images is None:
        rows = np.arange(len(pixels))
        if len(rows) > calibration_size:
            rows = np.sort(np.random.default_rng(seed + 1).choice(len(rows), calibration_size, replace=False))
        calib, used, source = pixels[rows], [records[i] for i in rows], str(check_source or "sample_data")
    else:
        pics, used = check_records(calibration_images, calibration_size, seed + 1)
        calib, source = np.stack([to_pixels(p, resolution) for p in pics]), str(calibration_images)
    return calib, calibration_record(source, used, seed)


class _ImageExport(TowerExport):
    """The image tower on the shared path: checked on photos, int8 by each requested method."""

    what, noun, unit, encoder_cls, record_methods = "image encoder", "model", "image", OnnxEncoder, True

    def __init__(self, source: Any, *, images, max_images: int | None, seed: int, vision_model: str | None,
                 text_model: str | None, calibration_images, calibration_size: int, threads: int | None,
                 timing_runs: int):
        super().__init__(threads, timing_runs)
        self.source, self.images, self.max_images, self.seed = source, images, max_images, seed
        self.vision_model, self.text_model = vision_model, text_model
        self.calibration_images, self.calibration_size = calibration_images, calibration_size

    def prepare(self) -> None:
        visual, self.name, self.fingerprint = _resolve_source(self.source, self.vision_model, self.text_model)
        set_torch_threads(self.threads)
        self.resolution, self.dim = int(visual.input_resolution), int(visual.output_dim)
        self.module = _NormalizedTower(visual).eval()
        pics, self.records = check_records(self.images, self.max_images, self.seed)
        self.labels = [rec.label for rec in self.records]
        self.inputs = np.stack([to_pixels(p, self.resolution) for p in pics])
        self.ref = batched(self.torch_encode, self.inputs)
        self.example = torch.from_numpy(self.inputs[:2].copy())
        self.input_name, self.dynamic_axes = ONNX_INPUT, {ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}}
        self.meta = {"kind": "image", "resolution": self.resolution, "dim": self.dim, "l2_normalized": 1,
                     "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "fingerprint": self.fingerprint or "",
                     "source": self.name, "precision": "fp32"}

    def torch_encode(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(x)).numpy()

    def measure(self, enc: Any, got: np.ndarray, cos: np.ndarray) -> dict:
        return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                "encode_ms": median_ms(enc.encode, self.inputs[:1], self.timing_runs),
                **metric_fields(category_metrics(got, self.labels))}

    def report_fields(self, opset: int, export_s: float) -> dict:
        torch_metrics = category_metrics(self.ref, self.labels)
        return {"opset": int(opset), "resolution": self.resolution, "dim": self.dim, "l2_normalized": True,
                "dynamic_batch": True, "source": self.name, "fingerprint": self.fingerprint,
                "n_images": len(self.inputs), "images": str(self.images or "sample_data"),
                "threads": self.threads or torch.get_num_threads(), "export_s": round(export_s, 2),
                "torch": {"encode_ms": median_ms(self.torch_encode, self.inputs[:1], self.timing_runs),
                          **metric_fields(torch_metrics)}}

    def int8_blocks(self, src: Path, files: Mapping[str, Path], report: dict) -> dict[str, dict]:
        calibration = None
        if "static" in files:
            calibration, report["calibration"] = _calibration_pixels(
                self.calibration_images, self.calibration_size, self.inputs, self.records, self.resolution,
                self.seed, self.images)
        return {m: self.int8_block(m, src, dst, calibration) for m, dst in files.items()}

    def int8_block(self, method: str, src: Path, dst: Path, calibration: np.ndarray | None) -> dict:
        """int8 (``method``) of ``src`` into ``dst``, measured against PyTorch: its block."""
        if method == "dynamic":
            quantize_s = quantize_dynamic_file(src, dst, self.meta, preprocess=True)
        elif method == "static":
            quantize_s = quantize_static_file(src, dst, self.meta, calibration)
        else:
            raise ValueError(f"unknown int8 method {method!r}; choose from {INT8_METHODS}")
        enc = OnnxEncoder(dst, threads=self.threads)
        # Batches of 32, not the fp32 check's mixed sizes: dynamic int8's activation ranges depend on the batch.
        got = batched(enc.encode, self.inputs)
        cos = (got * self.ref).sum(1)
        return {"mb": file_mb(dst), **self.measure(enc, got, cos), "quantize_s": quantize_s}


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
    int8_methods: Sequence[str] = INT8_METHODS,
    calibration_images: str | os.PathLike | None = None,
    calibration_size: int = 256,
) -> dict:
    """Export a student's image encoder to ONNX, check it on real photos, optionally quantise to int8.

    The graph takes ``pixel_values`` ``[batch, 3, R, R]`` (float32, :func:`cnclip_kd.deploy.backends.to_pixels`)
    and returns ``embeddings`` ``[batch, D]``, **already L2-normalised** (the normalisation is inside the
    graph); the batch axis is dynamic. Exported with the TorchScript exporter (``dynamo=False``) at
    ``opset`` ≥ 14.

    Checks, on ``images`` (default: the embedded sample data, 600 photos): cosine between ONNX and PyTorch
    embeddings (fp32 must reach ``min_cosine`` on every image, or :class:`ExportError` and nothing is
    written), category P@10 (leave-one-out image→image) of PyTorch, fp32 and each int8 model, and the
    batch-1 encode time of each.

    int8 comes two ways (``int8_methods``), both with signed 8-bit per-channel weights at a 7-bit range
    (``reduce_range``: CPUs without VNNI multiply u8×s8 with 16-bit saturation, which costs accuracy at
    full range): ONNX Runtime's **dynamic** quantisation (activation ranges found at run time; good for
    transformers, but it turns convolutions into ConvInteger, several times *slower* than fp32) and
    **static** QDQ quantisation, its activation ranges calibrated (min/max) on ``calibration_size`` photos
    (default: a seeded subset of the check photos; the set is recorded in the report). Of the methods
    within tolerance (see ``quantize``) the **fastest is kept** (:func:`choose_int8`), and the report's
    ``serve`` names the fastest of fp32 and that int8 model (:func:`serving_choice`): what notebook 06 and
    ``cnclip-kd plan`` serve.

    Files (each written to a temp name and renamed into place): ``out_path``, ``<stem>.int8.onnx`` (the
    kept int8 model, when one is kept) and ``<stem>.report.json`` (the returned report).

    Args:
        source: A student checkpoint path or spec (:func:`cnclip_kd.retrieval.encoders.load_encoder`),
            an :class:`~cnclip_kd.retrieval.encoders.ImageEncoder` of a student, or a cn_clip ``CLIP`` module.
        out_path: The fp32 ``.onnx`` file.
        quantize: ``True``: also write int8; ``False``: fp32 only; ``None`` (default): write
            int8 and keep it only when its measured cost is within ``int8_max_p10_drop``
            (absolute category P@10) and ``int8_min_cosine`` (mean cosine to PyTorch).
            Either way the fastest method within that tolerance is the one kept.
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
        int8_methods: The int8 methods to measure, of :data:`INT8_METHODS`.
        calibration_images: Photos (folder or manifest) to calibrate static int8 on, e.g. the
            gallery (default: the check photos).
        calibration_size: At most this many calibration photos (seeded subset).

    Returns:
        The report: ``onnx``, ``report``, ``opset``, ``resolution``, ``dim``, ``l2_normalized``,
        ``dynamic_batch``, ``source``, ``fingerprint``, ``n_images``, ``images``, ``threads``,
        ``torch`` / ``fp32`` / ``int8`` blocks (``path``, ``mb``, ``cosine_min``, ``cosine_mean``,
        ``p@10``, ``map@10``, ``encode_ms``); ``int8`` is the chosen method's block, with
        ``method``, ``kept``, ``within_tolerance``, ``p@10_drop`` and ``reason``;
        ``int8_methods`` (every measured method's block), ``calibration`` (when static int8
        was measured: ``images``, ``n_images``, ``seed``, ``method``, ``sources_sha1``) and ``serve``.

    Raises:
        ExportError: Export failed, or fp32 disagrees with PyTorch.
        ValueError: ``opset`` < 14, or an unknown int8 method.
    """
    preflight(opset)
    methods = list(dict.fromkeys(int8_methods))
    if quantize is not False and (not methods or set(methods) - set(INT8_METHODS)):
        raise ValueError(f"int8_methods {list(int8_methods)}: choose one or more of {INT8_METHODS}")
    job = _ImageExport(source, images=images, max_images=max_images, seed=seed, vision_model=vision_model,
                       text_model=text_model, calibration_images=calibration_images,
                       calibration_size=calibration_size, threads=threads, timing_runs=timing_runs)
    return job.run(out_path, opset=opset, quantize=quantize, methods=methods, min_cosine=min_cosine,
                   int8_min_cosine=int8_min_cosine, int8_max_p10_drop=int8_max_p10_drop)


# --------------------------------------------------------------------------- text tower


class _TextTower(torch.nn.Module):
    """cn_clip's ``CLIP.encode_text`` with the L2 normalisation, as one module to export.

    The attention mask is computed from the ids (``[PAD]`` is id 0), as ``encode_text`` does,
    so the graph takes only ``input_ids`` and zero padding never changes the embedding.
    """

    def __init__(self, bert: torch.nn.Module, text_projection: torch.Tensor, pad_id: int = 0):
        super().__init__()
        self.bert = bert
        self.text_projection = torch.nn.Parameter(text_projection.detach().clone(), requires_grad=False)
        self.pad_id = int(pad_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = input_ids.ne(self.pad_id).to(self.text_projection.dtype)
        hidden = self.bert(input_ids, attention_mask=mask)[0]
        return torch.nn.functional.normalize(hidden[:, 0, :] @ self.text_projection, dim=-1)


def _clip_image_fn(clip: torch.nn.Module) -> Callable[[Sequence[Image.Image]], np.ndarray] | None:
    """Photos → L2-normalised features of a cn_clip model's image tower (CPU fp32), or None without one."""
    visual = getattr(clip, "visual", None)
    if visual is None or not hasattr(visual, "input_resolution") or not hasattr(clip, "encode_image"):
        return None
    resolution = int(visual.input_resolution)
    device = next(clip.parameters()).device

    def encode(pics: Sequence[Image.Image]) -> np.ndarray:
        x = torch.from_numpy(np.stack([to_pixels(p, resolution) for p in pics])).to(device)
        with torch.no_grad():
            feats = clip.encode_image(x.to(next(visual.parameters()).dtype))
        return torch.nn.functional.normalize(feats.float(), dim=-1).cpu().numpy()

    return encode


def _resolve_text_source(source: Any, context_length: int | None, vision_model: str | None,
                         text_model: str | None):
    """(TextEncoder, cn_clip CLIP module, description, image fingerprint or None, image feature fn or None)."""
    from ..models.students import image_transform
    from ..retrieval.encoders import ImageEncoder, TextEncoder, load_encoder, text_encoder_for

    image_fingerprint, image_fn = None, None
    if isinstance(source, (str, os.PathLike)):
        kwargs = {k: v for k, v in (("vision_model", vision_model), ("text_model", text_model)) if v}
        source = load_encoder(source, device="cpu", precision="fp32", **kwargs)
    if isinstance(source, ImageEncoder):
        image_fingerprint = source.fingerprint()
        image_fn = source.encode_pil
        name = str(source.info.get("spec", source.name))
        text = text_encoder_for(source, context_length=context_length)  # NoTextTowerError names the model
    elif isinstance(source, TextEncoder):
        text, name = source, str(source.info.get("spec", source.name))
    elif isinstance(source, torch.nn.Module):
        model = getattr(source, "module", source)
        if not hasattr(model, "encode_text"):
            raise ExportError(f"{type(model).__name__}: not a cn_clip CLIP module (no encode_text)")
        name = type(model).__name__
        resolution = int(getattr(getattr(model, "visual", None), "input_resolution", 224))
        wrapper = ImageEncoder(model.encode_image if hasattr(model, "encode_image") else model.encode_text,
                               name=name, dim=int(model.text_projection.shape[1]),
                               transform=image_transform(resolution), device=next(model.parameters()).device,
                               fingerprint="", model=model)
        text = text_encoder_for(wrapper, context_length=context_length)
    else:
        raise TypeError(f"export_text_onnx needs a checkpoint path, a model spec, a TextEncoder, an ImageEncoder "
                        f"or a CLIP module, got {type(source).__name__}")
    clip = text.model
    if clip is None or not hasattr(clip, "bert") or not hasattr(clip, "text_projection"):
        raise ExportError(f"{name}: only cn_clip text towers (BERT + text_projection) can be exported; "
                          f"{type(clip).__name__} is not one")
    if image_fn is None:
        image_fn = _clip_image_fn(clip)
    return text, clip, name, image_fingerprint, image_fn


def _check_texts(records: Sequence, texts: Sequence[str] | None) -> tuple[list[str], list[str], int]:
    """(check texts, their categories ('' for the fixed queries), number of captions among them)."""
    if isinstance(texts, str):
        texts = [texts]
    if texts is not None:
        captions, labels = [str(t) for t in texts], [""] * len(texts)
    else:
        pairs = list(dict.fromkeys((t, rec.label) for rec in records for t in rec.texts if t.strip()))
        captions, labels = [t for t, _ in pairs], [lab for _, lab in pairs]
    extra = [q for q in CHECK_QUERIES if q not in captions]
    return captions + extra, labels + [""] * len(extra), len(captions)



class _TextExport(TowerExport):
    """The text tower on the shared path: checked on captions and :data:`CHECK_QUERIES`, dynamic int8."""

    what, noun, unit, encoder_cls = "text encoder", "text model", "text", OnnxTextEncoder

    def __init__(self, source: Any, *, texts: Sequence[str] | None, images, max_images: int | None,
                 context_length: int | None, seed: int, vision_model: str | None, text_model: str | None,
                 threads: int | None, timing_runs: int):
        super().__init__(threads, timing_runs)
        self.source, self.texts, self.images, self.max_images = source, texts, images, max_images
        self.context_length, self.seed = context_length, seed
        self.vision_model, self.text_model = vision_model, text_model

    def prepare(self) -> None:
        from ..core.tokenizer import tokenize

        text_enc, clip, self.name, self.image_fingerprint, image_fn = _resolve_text_source(
            self.source, self.context_length, self.vision_model, self.text_model)
        set_torch_threads(self.threads)
        self.length, self.dim, self.fingerprint = text_enc.context_length, int(text_enc.dim), text_enc.fingerprint()
        pad_id = 0
        self.module = _TextTower(copy.deepcopy(clip.bert).to("cpu", torch.float32).eval(),
                                 clip.text_projection.to("cpu", torch.float32), pad_id).eval()
        pics, records = check_records(self.images, self.max_images, self.seed) if self.texts is None else ([], [])
        self.inputs, check_labels, self.n_captions = _check_texts(records, self.texts)
        self.image_labels = [rec.label for rec in records]
        self.image_feats = batched(image_fn, pics) if image_fn is not None and pics else None
        self.n_images = len(pics) if self.image_feats is not None else 0
        self.cap_labels = check_labels[:self.n_captions]
        if text_enc.device.type == "cpu" and text_enc.autocast_dtype is None:
            self.ref = text_enc.encode(self.inputs, batch_size=32)  # the kit's own PyTorch path
        else:
            self.ref = batched(lambda ts: self.torch_ids(tokenize(ts, self.length, pad_to_context=False).ids),
                                self.inputs)
        self.short = CHECK_QUERIES[0]
        self.one_short = tokenize(self.short, self.length, pad_to_context=False).ids
        self.one_full = tokenize(CHECK_QUERIES[-1], self.length, pad_to_context=False).ids
        self.example = torch.from_numpy(tokenize([self.short, "T-shirt 42码"], self.length, pad_to_context=False).ids)
        self.input_name = ONNX_TEXT_INPUT
        self.dynamic_axes = {ONNX_TEXT_INPUT: {0: "batch", 1: "sequence"}, ONNX_OUTPUT: {0: "batch"}}
        self.meta = {"kind": "text", "context_length": self.length, "dim": self.dim, "l2_normalized": 1,
                     "pad_id": pad_id, "fingerprint": self.fingerprint or "",
                     "image_fingerprint": self.image_fingerprint or "", "source": self.name, "precision": "fp32"}

    def torch_ids(self, ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.module(torch.from_numpy(ids)).numpy()

    def detail(self, i: int) -> str:
        return f"{self.inputs[i][:40]!r}; "

    def metrics(self, feats: np.ndarray) -> dict:
        """P@10 / mAP@10 of the captions among ``feats`` querying the photos."""
        return metric_fields(text_to_image_metrics(feats[:self.n_captions], self.cap_labels, self.image_feats,
                                                     self.image_labels))

    def measure(self, enc: Any, got: np.ndarray, cos: np.ndarray) -> dict:
        return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), **self.metrics(got),
                "encode_ms": median_ms(enc.encode_ids, self.one_short, self.timing_runs),
                "encode_ms_full": median_ms(enc.encode_ids, self.one_full, self.timing_runs)}

    def report_fields(self, opset: int, export_s: float) -> dict:
        return {
            "kind": "text", "opset": int(opset), "context_length": self.length, "dim": self.dim,
            "l2_normalized": True, "dynamic_axes": {"input_ids": ["batch", "sequence"], "embeddings": ["batch"]},
            "source": self.name, "fingerprint": self.fingerprint, "image_fingerprint": self.image_fingerprint,
            "n_texts": len(self.inputs), "n_captions": self.n_captions, "n_images": self.n_images,
            "images": str(self.images or "sample_data"), "threads": self.threads or torch.get_num_threads(),
            "export_s": round(export_s, 2),
            "timing_texts": {"short": self.short, "short_tokens": int(self.one_short.shape[1]),
                             "full_tokens": int(self.one_full.shape[1])},
            "torch": {"encode_ms": median_ms(self.torch_ids, self.one_short, self.timing_runs),
                      "encode_ms_full": median_ms(self.torch_ids, self.one_full, self.timing_runs),
                      **self.metrics(self.ref)},
        }

    def int8_blocks(self, src: Path, files: Mapping[str, Path], report: dict) -> dict[str, dict]:
        blocks = {}
        for method, dst in files.items():  # dynamic only: static calibration feeds photos
            quantize_s = quantize_dynamic_file(src, dst, self.meta)
            enc = OnnxTextEncoder(dst, threads=self.threads)
            blocks[method] = {"mb": file_mb(dst), **self.measure(enc, *self.compare(enc)), "quantize_s": quantize_s}
        return blocks


def export_text_onnx(
    source: Any,
    out_path: str | os.PathLike,
    *,
    quantize: bool | None = None,
    opset: int = 17,
    texts: Sequence[str] | None = None,
    images: str | os.PathLike | None = None,
    max_images: int | None = 1000,
    context_length: int | None = None,
    min_cosine: float = 0.999,
    int8_max_p10_drop: float = 0.02,
    int8_min_cosine: float = 0.99,
    threads: int | None = None,
    timing_runs: int = 5,
    seed: int = 0,
    vision_model: str | None = None,
    text_model: str | None = None,
) -> dict:
    """Export a model's text encoder to ONNX, check it against PyTorch, optionally quantise to int8.

    The graph takes ``input_ids`` ``[batch, seq]`` (int64, cn_clip's tokenizer: ``[CLS]`` … ``[SEP]``, zero
    padding; :func:`cnclip_kd.core.tokenizer.tokenize`) with **both axes dynamic**: a query is fed at its own
    length (padding is masked, so trimming it gives the same embedding for less work), at most the context
    length. The attention mask is computed inside the graph (``input_ids != 0``) and the output
    ``embeddings`` ``[batch, D]`` are **L2-normalised inside the graph**. Exported with the TorchScript
    exporter (``dynamo=False``) at ``opset`` ≥ 14. Metadata (``cnclip_kd.*``): ``kind`` (``text``),
    ``context_length``, ``dim``, ``fingerprint`` (the text tower's,
    :meth:`cnclip_kd.retrieval.encoders.TextEncoder.fingerprint`, what an index records as
    ``text_fingerprint``), ``image_fingerprint`` (the same model's image tower, when known), ``precision``,
    ``l2_normalized``, ``source``.

    Checks, before anything is written: the cosine between ONNX and PyTorch embeddings of every check text
    (fp32 must reach ``min_cosine`` on each, or :class:`ExportError` and nothing is written), run in mixed
    batch sizes and padded lengths. Check texts: the captions of ``images`` (default: the sample data's
    manifest; one per distinct caption) plus :data:`CHECK_QUERIES` (Latin, digits, emoji, mixed scripts, a
    text longer than the context length). Measured per precision (PyTorch, fp32, int8): category-level
    text→image P@10 / mAP@10 (each caption queries the photos, a hit is a photo of its category; the photo
    embeddings come from the same model's image tower in PyTorch) and the batch-1 encode time of a short
    query and of one that fills the context.

    int8 is ONNX Runtime's dynamic quantisation (signed 8-bit per-channel weights, 7-bit range as the image
    export). With ``quantize=None`` it is **kept only when its mean cosine to PyTorch is ≥
    ``int8_min_cosine`` (0.99) and its text→image P@10 is at most ``int8_max_p10_drop`` (0.02) below
    fp32's**; otherwise it is measured, reported and not written.

    Files (each written to a temp name and renamed into place): ``out_path``, ``<stem>.int8.onnx`` (when
    kept) and ``<stem>.report.json`` (the returned report).

    Args:
        source: A checkpoint path or model spec (:func:`cnclip_kd.retrieval.encoders.load_encoder`), a
            :class:`~cnclip_kd.retrieval.encoders.TextEncoder` from
            :func:`~cnclip_kd.retrieval.encoders.load_text_encoder`, an
            :class:`~cnclip_kd.retrieval.encoders.ImageEncoder` of a model with a text tower, or a cn_clip
            ``CLIP`` module.
        out_path: The fp32 ``.onnx`` file, e.g. ``out/deploy/text_encoder.onnx``.
        quantize: ``True``: also write int8; ``False``: fp32 only; ``None`` (default): see above.
        opset: ONNX opset (≥ 14).
        texts: Check texts instead of the captions of ``images`` (:data:`CHECK_QUERIES` are
            always added); they have no category, so no P@10 is measured.
        images: A photo folder or manifest (default: the sample data): its captions, categories
            and photos.
        max_images: A seeded random subset of at most this many records (``None``: all).
        context_length: Tokens per text (default: the checkpoint's, else cn_clip's 52).
        min_cosine: Lowest fp32 cosine to PyTorch accepted on any check text.
        int8_max_p10_drop: See ``quantize=None``.
        int8_min_cosine: See ``quantize=None``.
        threads: ONNX Runtime / torch threads for the checks and timings.
        timing_runs: Batch-1 timings per model (median reported).
        seed: Seeds the subset.
        vision_model: Architecture of a checkpoint that does not record it.
        text_model: Likewise.

    Returns:
        The report: ``onnx``, ``report``, ``kind`` (``"text"``), ``opset``, ``context_length``,
        ``dim``, ``l2_normalized``, ``dynamic_axes``, ``source``, ``fingerprint``,
        ``image_fingerprint``, ``n_texts``, ``n_captions``, ``n_images``, ``images``, ``threads``,
        ``export_s``, ``timing_texts``, and ``torch`` / ``fp32`` / ``int8`` blocks (``path``, ``mb``,
        ``cosine_min``, ``cosine_mean``, ``p@10``, ``map@10``, ``encode_ms`` (short query),
        ``encode_ms_full`` (full context)); ``int8`` also ``p@10_drop``, ``kept`` and ``reason``.

    Raises:
        ExportError: Not a cn_clip text tower, export failed, or fp32 disagrees with PyTorch.
        cnclip_kd.retrieval.encoders.NoTextTowerError: The model has no text tower (e.g. an EfficientNet teacher).
        ValueError: ``opset`` < 14.
    """
    preflight(opset)
    job = _TextExport(source, texts=texts, images=images, max_images=max_images, context_length=context_length,
                      seed=seed, vision_model=vision_model, text_model=text_model, threads=threads,
                      timing_runs=timing_runs)
    return job.run(out_path, opset=opset, quantize=quantize, methods=("dynamic",), min_cosine=min_cosine,
                   int8_min_cosine=int8_min_cosine, int8_max_p10_drop=int8_max_p10_drop)
