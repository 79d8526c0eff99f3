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

import contextlib
import copy
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..core.files import atomic_write_json
from ..core.images import CLIP_MEAN, CLIP_STD, BadImageError, load_image
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
    choose_int8,
    int8_path,
    quantize_dynamic_file,
    quantize_static_file,
    serving_choice,
    write_metadata,
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


class ExportError(RuntimeError):
    """The exported model does not reproduce PyTorch's embeddings (or cannot be exported)."""


# --------------------------------------------------------------------------- shared helpers


def _check_records(images: str | os.PathLike | None, max_images: int | None, seed: int) -> tuple[list[Image.Image], list]:
    """Readable photos of a folder or manifest (default: the sample data) and their records, seeded subset."""
    from .. import SAMPLE_DATA
    from ..data.prepare import read_source

    records = read_source(images or SAMPLE_DATA)
    if max_images and len(records) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(len(records), int(max_images), replace=False))
        records = [records[i] for i in rows]
    pics, kept = [], []
    for rec in records:
        try:
            pics.append(load_image(rec.data if rec.data is not None else rec.source))
            kept.append(rec)
        except BadImageError as err:
            logger.warning("export check: skipped %s (%s)", rec.source, err.reason)
    if not pics:
        raise ExportError(f"{images or SAMPLE_DATA}: no readable image to check the export with")
    return pics, kept


def _batched(fn: Callable[[Any], np.ndarray], items, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([fn(items[s:s + batch_size]) for s in range(0, len(items), batch_size)])


def _category_metrics(feats: np.ndarray, labels: Sequence[str]) -> dict | None:
    from ..core.metrics import image_to_image_metrics

    labels = np.asarray(labels, dtype=object)
    if not all(labels) or len(set(labels)) == len(labels):
        return None  # no categories, or no two images share one: P@10 means nothing
    return image_to_image_metrics(torch.from_numpy(feats), labels.astype(str), k=10)


def _text_to_image_metrics(text_feats: np.ndarray, text_labels: Sequence[str], image_feats: np.ndarray | None,
                           image_labels: Sequence[str], k: int = 10) -> dict | None:
    """Category-level text→image P@k / mAP@k: a hit is an image of the caption's category."""
    from ..core.metrics import label_hits, ranking_metrics

    if image_feats is None or not len(text_labels) or not all(image_labels) or not all(text_labels):
        return None
    depth = min(k, len(image_labels))
    top = np.argsort(-(text_feats @ image_feats.T), axis=1, kind="stable")[:, :depth]
    hits, n_relevant = label_hits(text_labels, image_labels, top)
    return ranking_metrics(hits, n_relevant, ks=[x for x in (1, 5, 10) if x <= depth])


def _metric_fields(metrics: Mapping[str, Any] | None) -> dict:
    if not metrics:
        return {"p@10": None, "map@10": None}
    return {"p@10": metrics.get("p@10"), "map@10": metrics.get("map@10")}


def _median_ms(fn, x, runs: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(max(1, runs)):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1000, 2)


def _torchscript_export(module: torch.nn.Module, args: tuple, path: Path, name: str, opset: int, *,
                        input_names: list[str], dynamic_axes: dict) -> float:
    """``torch.onnx.export`` (TorchScript exporter) with its deprecation noise silenced; seconds taken."""
    t0 = time.perf_counter()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=".*dynamo.*|.*TorchScript.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(module, args, str(path), input_names=input_names, output_names=[ONNX_OUTPUT],
                              dynamic_axes=dynamic_axes, opset_version=int(opset), do_constant_folding=True,
                              dynamo=False)
        except Exception as err:  # the exporter raises many types; all mean "this model does not export"
            raise ExportError(f"{name}: torch.onnx.export failed at opset {opset} "
                              f"({type(err).__name__}: {err})") from err
    return time.perf_counter() - t0


@contextlib.contextmanager
def _staging(out: Path):
    """Temp names beside ``out`` for the fp32 and int8 files (checked there, then renamed into place);
    whatever is left of them — and onnxruntime's side files — is removed on the way out."""
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.onnx")
    tmp_q = out.with_name(f".{out.stem}.{os.getpid()}.tmp.int8.onnx")
    try:
        yield tmp, tmp_q
    finally:
        tmp.unlink(missing_ok=True)
        tmp_q.unlink(missing_ok=True)
        for stray in out.parent.glob(f".{out.stem}.{os.getpid()}.tmp*"):
            stray.unlink(missing_ok=True)


def _log_export(what: str, out: Path, report: Mapping[str, Any]) -> None:
    int8 = report.get("int8")
    logger.info("exported %s %s: fp32 cosine ≥ %.5f%s", what, out, report["fp32"]["cosine_min"],
                f"; int8 {'kept' if int8['kept'] else 'not kept'} ({int8['reason']})" if int8 else "")


# --------------------------------------------------------------------------- image tower


class _NormalizedTower(torch.nn.Module):
    """The image tower with the L2 normalisation, as one module to export."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.visual(pixel_values), dim=-1)


def _resolve_source(source: Any, vision_model: str | None, text_model: str | None) -> tuple[torch.nn.Module, str, str | None]:
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


def _measure_int8_image(method: str, src: Path, dst: Path, meta: dict, pixels: np.ndarray, ref: np.ndarray,
                        labels: Sequence[str], calibration: np.ndarray, threads: int | None,
                        timing_runs: int) -> dict:
    """int8 (``method``) of the image model ``src`` into ``dst``, measured against PyTorch: its block."""
    if method == "dynamic":
        quantize_s = quantize_dynamic_file(src, dst, meta, preprocess=True)
    elif method == "static":
        quantize_s = quantize_static_file(src, dst, meta, calibration)
    else:
        raise ValueError(f"unknown int8 method {method!r}; choose from {INT8_METHODS}")
    enc = OnnxEncoder(dst, threads=threads)
    got = _batched(enc.encode, pixels)
    cos = (got * ref).sum(1)
    return {"mb": round(dst.stat().st_size / 2 ** 20, 2), "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()), "encode_ms": _median_ms(enc.encode, pixels[:1], timing_runs),
            **_metric_fields(_category_metrics(got, labels)), "quantize_s": quantize_s}


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
            pics, used = _check_records(calibration_images, calibration_size, seed + 1)
            pixels = np.stack([to_pixels(p, resolution) for p in pics])
            calibration = calibration_record(str(calibration_images or "sample_data"), used, seed)
            quantize_s = quantize_static_file(src, tmp, meta, pixels)
        else:
            quantize_s = quantize_dynamic_file(src, tmp, meta, preprocess=True)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(dst.resolve()), "method": method, "mb": round(dst.stat().st_size / 2 ** 20, 2),
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
        pics, used = _check_records(calibration_images, calibration_size, seed + 1)
        calib, source = np.stack([to_pixels(p, resolution) for p in pics]), str(calibration_images)
    return calib, calibration_record(source, used, seed)


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

    The graph takes ``pixel_values`` ``[batch, 3, R, R]`` (float32,
    :func:`cnclip_kd.deploy.backends.to_pixels`) and returns ``embeddings`` ``[batch, D]``,
    **already L2-normalised** (the normalisation is inside the graph); the batch
    axis is dynamic. Exported with the TorchScript exporter (``dynamo=False``)
    at ``opset`` ≥ 14.

    Checks, on ``images`` (default: the embedded sample data, 600 photos):
    cosine between ONNX and PyTorch embeddings (fp32 must reach ``min_cosine``
    on every image, or :class:`ExportError` and nothing is written), category
    P@10 (leave-one-out image→image) of PyTorch, fp32 and each int8 model, and
    the batch-1 encode time of each.

    int8 comes two ways (``int8_methods``), both with signed 8-bit per-channel
    weights at a 7-bit range (``reduce_range``: CPUs without VNNI multiply
    u8×s8 with 16-bit saturation, which costs accuracy at full range):
    ONNX Runtime's **dynamic** quantisation (activation ranges found at run
    time; good for transformers, but it turns convolutions into ConvInteger,
    several times *slower* than fp32) and **static** QDQ quantisation, its
    activation ranges calibrated (min/max) on ``calibration_size`` photos
    (default: a seeded subset of the check photos; the set is recorded in the
    report). Of the methods within tolerance (see ``quantize``) the **fastest
    is kept** (:func:`choose_int8`), and the report's ``serve`` names the
    fastest of fp32 and that int8 model (:func:`serving_choice`): what
    notebook 06 and ``cnclip-kd plan`` serve.

    Files (each written to a temp name and renamed into place): ``out_path``,
    ``<stem>.int8.onnx`` (the kept int8 model, when one is kept) and
    ``<stem>.report.json`` (the returned report).

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
    import onnxruntime  # noqa: F401  (fail early when it is missing)

    if opset < 14:
        raise ValueError(f"opset {opset} < 14: scaled_dot_product_attention needs opset ≥ 14")
    methods = list(dict.fromkeys(int8_methods))
    if quantize is not False and (not methods or set(methods) - set(INT8_METHODS)):
        raise ValueError(f"int8_methods {list(int8_methods)}: choose one or more of {INT8_METHODS}")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    q_out, report_path = int8_path(out), out.with_name(f"{out.stem}.report.json")
    visual, name, fingerprint = _resolve_source(source, vision_model, text_model)
    set_torch_threads(threads)
    resolution, dim = int(visual.input_resolution), int(visual.output_dim)
    wrapper = _NormalizedTower(visual).eval()

    pics, records = _check_records(images, max_images, seed)
    labels = [rec.label for rec in records]
    pixels = np.stack([to_pixels(p, resolution) for p in pics])

    def torch_encode(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return wrapper(torch.from_numpy(x)).numpy()

    ref = _batched(torch_encode, pixels)
    with _staging(out) as (tmp, tmp_q):
        export_s = _torchscript_export(wrapper, (torch.from_numpy(pixels[:2].copy()),), tmp, name, opset,
                                       input_names=[ONNX_INPUT],
                                       dynamic_axes={ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}})
        meta = {"kind": "image", "resolution": resolution, "dim": dim, "l2_normalized": 1, "mean": list(CLIP_MEAN),
                "std": list(CLIP_STD), "fingerprint": fingerprint or "", "source": name, "precision": "fp32"}
        write_metadata(tmp, meta)
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
            calibration = None
            if "static" in methods:
                calibration, report["calibration"] = _calibration_pixels(
                    calibration_images, calibration_size, pixels, records, resolution, seed, images)
            files = {m: tmp_q.with_name(f"{tmp_q.stem}-{m}.onnx") for m in methods}
            candidates = {m: _measure_int8_image(m, tmp, files[m], meta, pixels, ref, labels, calibration, threads,
                                                 timing_runs) for m in methods}
            chosen = choose_int8(candidates, report["fp32"], quantize=quantize, min_cosine=int8_min_cosine,
                                 max_p10_drop=int8_max_p10_drop)
            os.replace(files[chosen["method"]], tmp_q)
            chosen["path"] = str(q_out.resolve()) if chosen["kept"] else None
            report["int8"], report["int8_methods"] = chosen, candidates
        report["serve"] = serving_choice(report)
        _put_in_place(out, tmp, q_out, tmp_q, report_path, report, quantize)
    _log_export("image encoder", out, report)
    return report


def _put_in_place(out: Path, tmp: Path, q_out: Path, tmp_q: Path, report_path: Path, report: dict,
                  quantize: bool | None) -> None:
    """Rename the checked files into place; an int8 file of an older export is removed when none is kept."""
    os.replace(tmp, out)
    if quantize is not False and report["int8"]["kept"]:
        os.replace(tmp_q, q_out)
    elif q_out.exists():
        q_out.unlink()  # an older int8 file would no longer match the fp32 one
    atomic_write_json(report_path, report)


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

    The graph takes ``input_ids`` ``[batch, seq]`` (int64, cn_clip's tokenizer:
    ``[CLS]`` … ``[SEP]``, zero padding; :func:`cnclip_kd.core.tokenizer.tokenize`) with
    **both axes dynamic**: a query is fed at its own length (padding is masked,
    so trimming it gives the same embedding for less work), at most the context
    length. The attention mask is computed inside the graph (``input_ids != 0``)
    and the output ``embeddings`` ``[batch, D]`` are **L2-normalised inside the
    graph**. Exported with the TorchScript exporter (``dynamo=False``) at
    ``opset`` ≥ 14. Metadata (``cnclip_kd.*``): ``kind`` (``text``),
    ``context_length``, ``dim``, ``fingerprint`` (the text tower's,
    :meth:`cnclip_kd.retrieval.encoders.TextEncoder.fingerprint`, what an index records as
    ``text_fingerprint``), ``image_fingerprint`` (the same model's image tower,
    when known), ``precision``, ``l2_normalized``, ``source``.

    Checks, before anything is written: the cosine between ONNX and PyTorch
    embeddings of every check text (fp32 must reach ``min_cosine`` on each, or
    :class:`ExportError` and nothing is written), run in mixed batch sizes and
    padded lengths. Check texts: the captions of ``images`` (default: the
    sample data's manifest; one per distinct caption) plus :data:`CHECK_QUERIES`
    (Latin, digits, emoji, mixed scripts, a text longer than the context
    length). Measured per precision (PyTorch, fp32, int8): category-level
    text→image P@10 / mAP@10 (each caption queries the photos, a hit is a photo
    of its category; the photo embeddings come from the same model's image
    tower in PyTorch) and the batch-1 encode time of a short query and of one
    that fills the context.

    int8 is ONNX Runtime's dynamic quantisation (signed 8-bit per-channel
    weights, 7-bit range as the image export). With ``quantize=None`` it is
    **kept only when its mean cosine to PyTorch is ≥ ``int8_min_cosine``
    (0.99) and its text→image P@10 is at most ``int8_max_p10_drop`` (0.02)
    below fp32's**; otherwise it is measured, reported and not written.

    Files (each written to a temp name and renamed into place): ``out_path``,
    ``<stem>.int8.onnx`` (when kept) and ``<stem>.report.json`` (the returned report).

    Args:
        source: A checkpoint path or model spec (:func:`cnclip_kd.retrieval.encoders.load_encoder`), a
            :class:`~cnclip_kd.retrieval.encoders.TextEncoder` from :func:`~cnclip_kd.retrieval.encoders.load_text_encoder`,
            an :class:`~cnclip_kd.retrieval.encoders.ImageEncoder` of a model with a text tower, or a cn_clip
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
    import onnxruntime  # noqa: F401  (fail early when it is missing)

    from ..core.tokenizer import tokenize

    if opset < 14:
        raise ValueError(f"opset {opset} < 14: scaled_dot_product_attention needs opset ≥ 14")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    q_out, report_path = int8_path(out), out.with_name(f"{out.stem}.report.json")
    text_enc, clip, name, image_fingerprint, image_fn = _resolve_text_source(source, context_length, vision_model,
                                                                             text_model)
    set_torch_threads(threads)
    length, dim, fingerprint = text_enc.context_length, int(text_enc.dim), text_enc.fingerprint()
    pad_id = 0
    wrapper = _TextTower(copy.deepcopy(clip.bert).to("cpu", torch.float32).eval(),
                         clip.text_projection.to("cpu", torch.float32), pad_id).eval()

    pics, records = _check_records(images, max_images, seed) if texts is None else ([], [])
    check, check_labels, n_captions = _check_texts(records, texts)
    image_labels = [rec.label for rec in records]
    image_feats = _batched(image_fn, pics) if image_fn is not None and pics else None
    cap_labels = check_labels[:n_captions]

    def torch_ids(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return wrapper(torch.from_numpy(ids)).numpy()

    if text_enc.device.type == "cpu" and text_enc.autocast_dtype is None:
        ref = text_enc.encode(check, batch_size=32)  # the kit's own PyTorch path
    else:
        ref = _batched(lambda ts: torch_ids(tokenize(ts, length, pad_to_context=False).ids), check)
    short, full = CHECK_QUERIES[0], CHECK_QUERIES[-1]
    one_short = tokenize(short, length, pad_to_context=False).ids
    one_full = tokenize(full, length, pad_to_context=False).ids
    with _staging(out) as (tmp, tmp_q):
        example = tokenize([short, "T-shirt 42码"], length, pad_to_context=False).ids
        export_s = _torchscript_export(wrapper, (torch.from_numpy(example),), tmp, name, opset,
                                       input_names=[ONNX_TEXT_INPUT],
                                       dynamic_axes={ONNX_TEXT_INPUT: {0: "batch", 1: "sequence"},
                                                     ONNX_OUTPUT: {0: "batch"}})
        meta = {"kind": "text", "context_length": length, "dim": dim, "l2_normalized": 1, "pad_id": pad_id,
                "fingerprint": fingerprint or "", "image_fingerprint": image_fingerprint or "", "source": name,
                "precision": "fp32"}
        write_metadata(tmp, meta)
        fp32 = OnnxTextEncoder(tmp, threads=threads)

        def measure(enc: OnnxTextEncoder) -> tuple[np.ndarray, np.ndarray, dict]:
            # Batch 1 first, then batches of 7: the dynamic axes (batch and padded length) are exercised.
            got = np.concatenate([enc.encode(check[:1]), _batched(enc.encode, check[1:], 7)]) if len(check) > 1 \
                else enc.encode(check)
            cos = (got * ref).sum(1)
            fields = _metric_fields(_text_to_image_metrics(got[:n_captions], cap_labels, image_feats, image_labels))
            return got, cos, {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), **fields,
                              "encode_ms": _median_ms(enc.encode_ids, one_short, timing_runs),
                              "encode_ms_full": _median_ms(enc.encode_ids, one_full, timing_runs)}

        _, cos, fp32_block = measure(fp32)
        if float(cos.min()) < min_cosine:
            worst = int(np.argmin(cos))
            raise ExportError(f"{name}: the ONNX text model disagrees with PyTorch: cosine {cos.min():.6f} < "
                              f"{min_cosine} on text {worst} ({check[worst][:40]!r}; mean {cos.mean():.6f}); "
                              "not written")
        torch_metrics = _text_to_image_metrics(ref[:n_captions], cap_labels, image_feats, image_labels)
        report: dict[str, Any] = {
            "onnx": str(out.resolve()), "report": str(report_path.resolve()), "kind": "text", "opset": int(opset),
            "context_length": length, "dim": dim, "l2_normalized": True,
            "dynamic_axes": {"input_ids": ["batch", "sequence"], "embeddings": ["batch"]},
            "source": name, "fingerprint": fingerprint, "image_fingerprint": image_fingerprint,
            "n_texts": len(check), "n_captions": n_captions,
            "n_images": len(pics) if image_feats is not None else 0, "images": str(images or "sample_data"),
            "threads": threads or torch.get_num_threads(), "export_s": round(export_s, 2),
            "timing_texts": {"short": short, "short_tokens": int(one_short.shape[1]),
                             "full_tokens": int(one_full.shape[1])},
            "torch": {"encode_ms": _median_ms(torch_ids, one_short, timing_runs),
                      "encode_ms_full": _median_ms(torch_ids, one_full, timing_runs), **_metric_fields(torch_metrics)},
            "fp32": {"path": str(out.resolve()), "mb": round(tmp.stat().st_size / 2 ** 20, 2), **fp32_block},
        }
        del fp32
        if quantize is not False:
            quantize_s = quantize_dynamic_file(tmp, tmp_q, meta)
            _, _, block = measure(OnnxTextEncoder(tmp_q, threads=threads))
            block = {"mb": round(tmp_q.stat().st_size / 2 ** 20, 2), **block, "quantize_s": quantize_s}
            report["int8"] = choose_int8({"dynamic": block}, report["fp32"], quantize=quantize,
                                         min_cosine=int8_min_cosine, max_p10_drop=int8_max_p10_drop)
            report["int8"]["path"] = str(q_out.resolve()) if report["int8"]["kept"] else None
        report["serve"] = serving_choice(report)
        _put_in_place(out, tmp, q_out, tmp_q, report_path, report, quantize)
    _log_export("text encoder", out, report)
    return report
