"""int8 copies of the exported ONNX encoders, and the rule that chooses which model is kept and served.

* :func:`quantize_dynamic_file`: ONNX Runtime's dynamic int8 (int8 weights,
  activation ranges found at run time; good for transformers, but convolutions
  become slow ConvInteger).
* :func:`quantize_static_file`: static QDQ int8, activation ranges calibrated
  (min/max) on photos; fast for convolutional and transformer students alike.
* :func:`choose_int8` keeps the fastest method within tolerance of PyTorch;
  :func:`serving_choice` serves the faster of fp32 and that model.

Both quantisers use signed 8-bit per-channel weights at a 7-bit range. The
export functions that measure each method against PyTorch live in
:mod:`cnclip_kd.deploy.export`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .backends import ONNX_INPUT, ONNX_META_PREFIX

logger = logging.getLogger(__name__)

__all__ = [
    "INT8_METHODS", "calibration_record", "choose_int8", "int8_path", "quantize_dynamic_file",
    "quantize_static_file", "serving_choice", "write_metadata",
]

#: How the image export can quantise to int8: ONNX Runtime's **dynamic** quantisation (int8 weights, activation
#: ranges found at run time; convolutions become ConvInteger, which is slow) and **static** QDQ (activation ranges
#: calibrated on gallery photos; fast for convolutional and transformer students alike).
INT8_METHODS = ("dynamic", "static")


def int8_path(out_path: str | os.PathLike) -> Path:
    """Where the int8 model of ``out_path`` goes (``x.onnx`` → ``x.int8.onnx``), for either tower."""
    out = Path(out_path)
    return out.with_name(f"{out.stem}.int8{out.suffix or '.onnx'}")


def write_metadata(path: Path, props: Mapping[str, Any]) -> None:
    """Add ``props`` to an ONNX file's metadata as ``cnclip_kd.<key>`` (what :mod:`cnclip_kd.deploy` reads)."""
    import onnx

    model = onnx.load(str(path))
    existing = {p.key: p.value for p in model.metadata_props}
    existing.update({ONNX_META_PREFIX + k: str(v) for k, v in props.items()})
    onnx.helper.set_model_props(model, existing)
    onnx.save(model, str(path))


def _drop_preprocess_advice(record: logging.LogRecord) -> bool:
    """onnxruntime's quantiser logs per-tensor notes and advice for static quantisation on the root logger."""
    return record.levelno >= logging.ERROR or not (record.name == "root" or "quantiz" in record.getMessage().lower())


@contextlib.contextmanager
def _quantizer_input(src: Path, dst: Path, preprocess: bool):
    """The model the quantiser reads: ``src`` itself, or ``src`` pre-processed for quantisation.

    Pre-processing (``quant_pre_process``: shape inference and ONNX Runtime's
    basic optimisations, which fold the exporter's weight subgraphs into
    initializers) is needed for a convolutional model: in the raw export a
    Conv weight is not an initializer, which both quantisers require. Symbolic
    shape inference is skipped (it fails on these graphs and is not needed).
    onnxruntime's advice logged on the root logger is dropped meanwhile.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_name(f"{dst.stem}.pre.onnx")
    root = logging.getLogger()
    root.addFilter(_drop_preprocess_advice)
    try:
        if preprocess:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        yield pre if preprocess else src
    finally:
        root.removeFilter(_drop_preprocess_advice)
        pre.unlink(missing_ok=True)


def quantize_dynamic_file(src: Path, dst: Path, meta: Mapping[str, Any], *, preprocess: bool = False) -> float:
    """ONNX Runtime dynamic int8 of ``src`` into ``dst`` (signed per-channel weights, 7-bit range); seconds taken."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    with _quantizer_input(src, dst, preprocess) as model:
        quantize_dynamic(str(model), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)
    write_metadata(dst, {**meta, "precision": "int8", "int8_method": "dynamic"})
    return round(time.perf_counter() - t0, 2)


def _tolerance(block: dict, fp32: Mapping[str, Any], min_cos: float, max_drop: float) -> tuple[bool, str]:
    """Whether an int8 block is within the tolerance (mean cosine to PyTorch and P@10 drop), and its cost in words."""
    p_ref, p_q = fp32["p@10"], block["p@10"]
    drop = None if p_ref is None or p_q is None else round(p_ref - p_q, 4)
    block["p@10_drop"] = drop
    within = block["cosine_mean"] >= min_cos and (drop is None or drop <= max_drop)
    cost = (f"cosine to PyTorch {block['cosine_mean']:.4f} (min {block['cosine_min']:.4f}), "
            f"P@10 {'n/a' if drop is None else f'{p_q:.3f} vs {p_ref:.3f}'}, "
            f"{block['encode_ms']:.1f} vs {fp32['encode_ms']:.1f} ms")
    return within, cost


def choose_int8(candidates: Mapping[str, dict], fp32: Mapping[str, Any], *, quantize: bool | None = None,
                min_cosine: float = 0.99, max_p10_drop: float = 0.02) -> dict:
    """Pick the int8 model to keep among the measured quantisation methods.

    The rule: a method is *within tolerance* when its mean cosine to PyTorch is
    ≥ ``min_cosine`` and its category P@10 is at most ``max_p10_drop`` below
    fp32's (or P@10 cannot be measured). The **fastest** method within
    tolerance (batch-1 ``encode_ms``) is kept. When none is within tolerance,
    the most faithful one (highest mean cosine) is reported and kept only if
    int8 was requested (``quantize=True``, with a warning).

    Every candidate block gains ``method``, ``within_tolerance``, ``p@10_drop``,
    ``kept`` and ``reason``.

    Args:
        candidates: Method name → measured block (``cosine_mean``, ``cosine_min``, ``p@10``, ``encode_ms``).
        fp32: The fp32 block (``p@10``, ``encode_ms``).
        quantize: ``True``: int8 was requested; ``None``: keep only within tolerance.
        min_cosine: See above.
        max_p10_drop: See above.

    Returns:
        The chosen block (the same dict as in ``candidates``).

    Raises:
        ValueError: ``candidates`` is empty.
    """
    if not candidates:
        raise ValueError("no int8 candidate was measured")
    costs = {}
    for method, block in candidates.items():
        block["method"] = method
        block["within_tolerance"], costs[method] = _tolerance(block, fp32, min_cosine, max_p10_drop)
        block["kept"] = False
    within = [m for m, b in candidates.items() if b["within_tolerance"]]
    if within:
        method = min(within, key=lambda m: candidates[m]["encode_ms"])
        why = ("requested; " if quantize else "") + f"the fastest int8 within tolerance ({method})"
    else:
        method = max(candidates, key=lambda m: candidates[m]["cosine_mean"])
        why = ("requested" if quantize else "over tolerance") + f": none within tolerance, the most faithful is {method}"
        if quantize:
            logger.warning("int8 (%s) is over the tolerance (%s) but was requested; check its cost", method,
                           costs[method])
    chosen = candidates[method]
    chosen["kept"] = bool(within) or bool(quantize)
    others = "; ".join(f"{m}: {costs[m]}" + ("" if candidates[m]["within_tolerance"] else " (over tolerance)")
                       for m in candidates if m != method)
    for m, block in candidates.items():
        block["reason"] = f"{why}: {costs[method]}" + (f"; {others}" if others else "") if m == method else \
            ("within" if block["within_tolerance"] else "over") + f" tolerance, not chosen: {costs[m]}"
    return chosen


def serving_choice(report: Mapping[str, Any]) -> dict:
    """What to serve from an export report: the fastest of fp32 and the kept int8 model within tolerance.

    fp32 is always within tolerance (it was checked against PyTorch); an int8
    model kept only because it was requested, over tolerance, is never chosen
    here (pass its path explicitly to serve it). A tie (timings are rounded to
    0.01 ms, so tiny models tie) goes to fp32, the exact one.

    Returns:
        ``{"precision", "method", "path", "encode_ms", "reason"}``.
    """
    fp32 = report["fp32"]
    q = report.get("int8")
    options = [("fp32", None, fp32["path"], fp32["encode_ms"])]
    if q and q.get("kept") and q.get("within_tolerance") and q.get("path"):
        options.append(("int8", q.get("method"), q["path"], q["encode_ms"]))
    precision, method, path, ms = min(options, key=lambda o: o[3])
    what = f"int8 ({method})" if precision == "int8" else "fp32"
    if len(options) == 1:
        reason = "fp32: no int8 model within tolerance" if q else "fp32: int8 not measured"
    else:
        reason = f"{what}: the fastest within tolerance ({options[0][3]:.1f} ms fp32 vs {options[1][3]:.1f} ms int8)"
    return {"precision": precision, "method": method, "path": path, "encode_ms": ms, "reason": reason}


def quantize_static_file(src: Path, dst: Path, meta: Mapping[str, Any], calibration: np.ndarray,
                         batch_size: int = 4) -> float:
    """ONNX Runtime **static** int8 (QDQ) of the image model ``src`` into ``dst``; seconds taken.

    Activation ranges are calibrated (min/max) on ``calibration`` pixels; the
    raw export is pre-processed first (:func:`_quantizer_input`). Weights are signed 8-bit per channel at a
    7-bit range, as the dynamic model, so AVX2 CPUs without VNNI do not saturate.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Pixels(CalibrationDataReader):
        """Calibration batches; ``set_range`` lets the calibrator take them a stride at a time."""

        def __init__(self) -> None:
            self.starts = list(range(0, len(calibration), batch_size))
            self.set_range(0, len(self.starts))

        def __len__(self) -> int:
            return len(self.starts)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.batches = iter(self.starts[start_index:end_index])

        def get_next(self):
            start = next(self.batches, None)
            return None if start is None else {ONNX_INPUT: calibration[start:start + batch_size]}

    t0 = time.perf_counter()
    with _quantizer_input(src, dst, preprocess=True) as model:
        # The calibration model returns every calibrated tensor of a batch (about 1 GB for ViT-B-16 at batch 4)
        # and onnxruntime keeps them all until the end: CalibStridedMinMax folds each batch into the min/max
        # ranges before the next, so memory stays that of one batch whatever the calibration set's size.
        # (Not CalibMaxIntermediateOutputs: onnxruntime 1.32 drops the batches it has collected at that limit.)
        quantize_static(str(model), str(dst), _Pixels(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, extra_options={"CalibStridedMinMax": 1})
    write_metadata(dst, {**meta, "precision": "int8", "int8_method": "static"})
    return round(time.perf_counter() - t0, 2)


def calibration_record(source: str, records: Sequence, seed: int) -> dict:
    """What a report records of a calibration set: where from, how many, the subset's seed and a hash of its files."""
    names = "\n".join(str(rec.source) for rec in records)
    return {"images": source, "n_images": len(records), "seed": seed + 1, "method": "minmax",
            "sources_sha1": hashlib.sha1(names.encode("utf-8")).hexdigest()[:16]}
