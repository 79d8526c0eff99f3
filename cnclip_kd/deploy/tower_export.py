"""The one path both tower exports take: stage → TorchScript export → check against PyTorch → int8 → in place.

:class:`TowerExport` runs the steps; :mod:`cnclip_kd.deploy.export` fills in what differs per tower
(the module, its inputs, the check metrics, the int8 methods). Every file is written to a temp name
in the output folder and renamed into place only after the check passed.
"""

from __future__ import annotations

import contextlib
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
from ..core.images import BadImageError, load_image
from .backends import (
    ONNX_OUTPUT,
    OnnxEncoder,
)
from .quantize import (
    choose_int8,
    int8_path,
    serving_choice,
    write_metadata,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ExportError", "TowerExport", "batched", "category_metrics", "check_records", "file_mb", "median_ms",
    "metric_fields", "preflight", "text_to_image_metrics",
]


class ExportError(RuntimeError):
    """The exported model does not reproduce PyTorch's embeddings (or cannot be exported)."""


# --------------------------------------------------------------------------- shared helpers


def check_records(images: str | os.PathLike | None, max_images: int | None,
                   seed: int) -> tuple[list[Image.Image], list]:
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


def batched(fn: Callable[[Any], np.ndarray], items, batch_size: int = 32) -> np.ndarray:
    return np.concatenate([fn(items[s:s + batch_size]) for s in range(0, len(items), batch_size)])


def category_metrics(feats: np.ndarray, labels: Sequence[str]) -> dict | None:
    from ..core.metrics import image_to_image_metrics

    labels = np.asarray(labels, dtype=object)
    if not all(labels) or len(set(labels)) == len(labels):
        return None  # no categories, or no two images share one: P@10 means nothing
    return image_to_image_metrics(torch.from_numpy(feats), labels.astype(str), k=10)


def text_to_image_metrics(text_feats: np.ndarray, text_labels: Sequence[str], image_feats: np.ndarray | None,
                           image_labels: Sequence[str], k: int = 10) -> dict | None:
    """Category-level text→image P@k / mAP@k: a hit is an image of the caption's category."""
    from ..core.metrics import label_hits, ranking_metrics

    if image_feats is None or not len(text_labels) or not all(image_labels) or not all(text_labels):
        return None
    depth = min(k, len(image_labels))
    top = np.argsort(-(text_feats @ image_feats.T), axis=1, kind="stable")[:, :depth]
    hits, n_relevant = label_hits(text_labels, image_labels, top)
    return ranking_metrics(hits, n_relevant, ks=[x for x in (1, 5, 10) if x <= depth])


def metric_fields(metrics: Mapping[str, Any] | None) -> dict:
    if not metrics:
        return {"p@10": None, "map@10": None}
    return {"p@10": metrics.get("p@10"), "map@10": metrics.get("map@10")}


def median_ms(fn, x, runs: int) -> float:
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


def file_mb(path: Path) -> float:
    return round(path.stat().st_size / 2 ** 20, 2)


def preflight(opset: int) -> None:
    """Fail before any work when ONNX Runtime is missing or ``opset`` is too old."""
    import onnxruntime  # noqa: F401  (fail early when it is missing)

    if opset < 14:
        raise ValueError(f"opset {opset} < 14: scaled_dot_product_attention needs opset ≥ 14")


def _put_in_place(out: Path, tmp: Path, q_out: Path, tmp_q: Path, report_path: Path, report: dict,
                  quantize: bool | None) -> None:
    """Rename the checked files into place; an int8 file of an older export is removed when none is kept."""
    os.replace(tmp, out)
    if quantize is not False and report["int8"]["kept"]:
        os.replace(tmp_q, q_out)
    elif q_out.exists():
        q_out.unlink()  # an older int8 file would no longer match the fp32 one
    atomic_write_json(report_path, report)


class TowerExport:
    """The path both towers share: stage → ``torch.onnx.export`` → check against PyTorch → int8 → put in place.

    A subclass's :meth:`prepare` resolves its source and check inputs and sets what the path needs: the
    tower ``module`` with its dummy input ``example``, ``input_name`` and ``dynamic_axes``; the ONNX
    metadata ``meta`` (``cnclip_kd.*``); ``name`` (the source, in messages); the check ``inputs`` and
    PyTorch's embeddings of them, ``ref``. Its other methods are the steps that differ between towers.
    """

    what = ""  # "exported <what> <path>" in the log line
    noun = ""  # "the ONNX <noun> disagrees with PyTorch" in the error
    unit = ""  # what one check input is called in that error
    encoder_cls: Callable[..., Any] = OnnxEncoder  # ONNX Runtime encoder of an exported file
    record_methods = False  # the report keeps every measured int8 method's block as ``int8_methods``

    def __init__(self, threads: int | None, timing_runs: int):
        self.threads, self.timing_runs = threads, timing_runs
        self.module: torch.nn.Module | None = None
        self.example: torch.Tensor | None = None
        self.input_name, self.dynamic_axes, self.meta, self.name = "", {}, {}, ""
        self.inputs: Sequence[Any] = []
        self.ref = np.zeros((0, 0), np.float32)

    def prepare(self) -> None:
        """Resolve the source and the check inputs; set the attributes the class docstring lists."""
        raise NotImplementedError

    def detail(self, i: int) -> str:
        """What the disagreement error says of check input ``i`` before its mean cosine."""
        return ""

    def measure(self, enc: Any, got: np.ndarray, cos: np.ndarray) -> dict:
        """An ONNX encoder's block (cosines, metrics, timings) from its embeddings ``got`` of the check inputs."""
        raise NotImplementedError

    def report_fields(self, opset: int, export_s: float) -> dict:
        """The report's fields between ``report`` and ``fp32``, the ``torch`` block included."""
        raise NotImplementedError

    def int8_blocks(self, src: Path, files: Mapping[str, Path], report: dict) -> dict[str, dict]:
        """Each method's int8 of ``src`` written to ``files[method]`` and measured: method → block."""
        raise NotImplementedError

    def compare(self, enc: Any) -> tuple[np.ndarray, np.ndarray]:
        """An ONNX encoder's embeddings of the check inputs and their cosine to PyTorch's."""
        # Batch 1 first, then batches of 7: the dynamic axes are exercised, not just one batch size.
        got = np.concatenate([enc.encode(self.inputs[:1]), batched(enc.encode, self.inputs[1:], 7)]) \
            if len(self.inputs) > 1 else enc.encode(self.inputs)
        return got, (got * self.ref).sum(1)

    def run(self, out_path: str | os.PathLike, *, opset: int, quantize: bool | None, methods: Sequence[str],
            min_cosine: float, int8_min_cosine: float, int8_max_p10_drop: float) -> dict:
        """Export, check, quantise and write; the report (see :func:`export_onnx`)."""
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        q_out, report_path = int8_path(out), out.with_name(f"{out.stem}.report.json")
        self.prepare()
        with _staging(out) as (tmp, tmp_q):
            export_s = _torchscript_export(self.module, (self.example,), tmp, self.name, opset,
                                           input_names=[self.input_name], dynamic_axes=self.dynamic_axes)
            write_metadata(tmp, self.meta)
            fp32 = self.encoder_cls(tmp, threads=self.threads)
            got, cos = self.compare(fp32)
            if float(cos.min()) < min_cosine:
                worst = int(np.argmin(cos))
                raise ExportError(f"{self.name}: the ONNX {self.noun} disagrees with PyTorch: cosine {cos.min():.6f} "
                                  f"< {min_cosine} on {self.unit} {worst} ({self.detail(worst)}mean "
                                  f"{cos.mean():.6f}); not written")
            fp32_block = self.measure(fp32, got, cos)
            report: dict[str, Any] = {"onnx": str(out.resolve()), "report": str(report_path.resolve()),
                                      **self.report_fields(opset, export_s),
                                      "fp32": {"path": str(out.resolve()), "mb": file_mb(tmp), **fp32_block}}
            del fp32
            if quantize is not False:
                # Each method into its own temp file; the chosen one becomes the int8 candidate to put in place.
                files = {m: tmp_q.with_name(f"{tmp_q.stem}-{m}.onnx") for m in methods}
                candidates = self.int8_blocks(tmp, files, report)
                chosen = choose_int8(candidates, report["fp32"], quantize=quantize, min_cosine=int8_min_cosine,
                                     max_p10_drop=int8_max_p10_drop)
                os.replace(files[chosen["method"]], tmp_q)
                chosen["path"] = str(q_out.resolve()) if chosen["kept"] else None
                report["int8"] = chosen
                if self.record_methods:
                    report["int8_methods"] = candidates
            report["serve"] = serving_choice(report)
            _put_in_place(out, tmp, q_out, tmp_q, report_path, report, quantize)
        _log_export(self.what, out, report)
        return report
