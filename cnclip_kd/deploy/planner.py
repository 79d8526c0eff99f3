"""Which student answers a query within a latency budget on *this* CPU: measured, not guessed.

:func:`plan` times candidate students — real cn_clip architectures at given
input sides (``ViT-B-16@224``, ``RN50@224`` …; random weights: the speed does
not depend on the values) — through every serving back-end (PyTorch eager
fp32, ONNX fp32, ONNX dynamic int8, ONNX static int8), end to end as a query
is served (JPEG bytes → decode + preprocess → encode → FAISS search over a
synthetic index of the given size), and picks the first candidate, in the
order given (best expected quality first), whose fastest back-end meets the
budget. It says what the CPU has (AVX2 / AVX-512 / VNNI / AMX), because that
decides the answer: int8 runs several times faster with VNNI.

The choice comes with the command that trains that student by distillation
and the command that exports it. ``cnclip-kd plan --budget-ms 50`` and
notebook 06 call it; ``benchmarks/query_latency.py`` shares its inputs
(:func:`cpu_features`, :func:`synthetic_index`, :func:`sample_queries`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS", "DEFAULT_CANDIDATES", "Candidate", "PlanResult", "candidate_encoders", "clustered_vectors",
    "cpu_features", "plan", "sample_queries", "synthetic_index",
]

#: Candidates in order of expected retrieval quality, best first (Chinese-CLIP's published zero-shot results put
#: ViT-B-16 well above RN50; a smaller input side costs a ViT some quality, measured on the demo by
#: ``benchmarks/resolution_quality.py``).
DEFAULT_CANDIDATES = ("ViT-B-16@224", "ViT-B-16@160", "RN50@224", "ViT-B-16@128")
#: Serving back-ends timed for each candidate.
BACKENDS = ("torch", "onnx-fp32", "onnx-int8-dynamic", "onnx-int8-static")
#: The text tower each vision architecture is published with (cn_clip's pretrained pairs).
_TEXT_FOR = {"RN50": "RBT3-chinese", "ViT-H-14": "RoBERTa-wwm-ext-large-chinese"}
_ISA = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_features() -> dict:
    """What this CPU is and has: ``cpu`` (model name), ``isa`` (of AVX2 / AVX-512 / VNNI / bf16 / AMX), ``cores``.

    ``summary`` says it in one line, with what it means for int8 (VNNI or AMX: fast
    u8×s8 dot products; AVX2 only: int8 helps less and saturates at full range).
    """
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and cpu in ("", platform.processor(), platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in _ISA if f in flags]
    vnni = any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    note = ("int8 with VNNI" + (" and AMX" if "amx_int8" in flags else "") + ": fast int8 dot products"
            if vnni else "no VNNI: int8 gains less, and u8×s8 saturates at full range (the kit quantises at 7 bits)")
    return {"cpu": cpu, "isa": isa, "cores": cores, "vnni": vnni,
            "summary": f"{cpu}, {cores} cores, {', '.join(isa) or 'no AVX2'} ({note})"}


@dataclass(frozen=True)
class Candidate:
    """A student shape to time: a cn_clip vision architecture (or a kit preset) at an input side."""

    arch: str
    side: int

    @classmethod
    def parse(cls, spec: str) -> "Candidate":
        """``"RN50@224"``, ``"ViT-B-16@160"``, or an architecture / preset alone (its own side).

        Raises:
            ValueError: Unknown architecture or preset, or a bad side.
        """
        from ..models.students import ModelLoadError

        arch, _, side = str(spec).strip().partition("@")
        try:
            info = _info(arch)
        except ModelLoadError as err:
            raise ValueError(f"candidate {spec!r}: {err}") from None
        if side and not side.isdigit():
            raise ValueError(f"candidate {spec!r}: the side after '@' must be a number of pixels, e.g. RN50@224")
        side_px = int(side) if side else int(info["image_resolution"])
        patch = info.get("vision_patch_size")
        if side_px < 16 or (patch and side_px % int(patch)):
            raise ValueError(f"candidate {spec!r}: side {side_px} px must be ≥ 16"
                             + (f" and a multiple of the patch size {patch}" if patch else ""))
        return cls(arch, side_px)

    @property
    def name(self) -> str:
        return f"{self.arch}@{self.side}"

    @property
    def preset(self) -> str | None:
        from ..models.students import PRESETS

        return self.arch if self.arch in PRESETS else None

    @property
    def text_model(self) -> str | None:
        return None if self.preset else _TEXT_FOR.get(self.arch, "RoBERTa-wwm-ext-base-chinese")

    def info(self) -> dict:
        """The merged cn_clip config at this side."""
        return {**_info(self.arch), "image_resolution": self.side}


def _info(arch: str) -> dict:
    from ..models.students import PRESETS, model_info

    if arch in PRESETS:
        return model_info(preset=arch)
    return model_info(arch, _TEXT_FOR.get(arch, "RoBERTa-wwm-ext-base-chinese"))


# --------------------------------------------------------------------------- inputs (shared with the benchmark)


def clustered_vectors(n: int, dim: int, *, n_clusters: int | None = None, seed: int = 0,
                      centre_seed: int | None = None, chunk: int = 100_000) -> np.ndarray:
    """``n`` float32 unit vectors around random centres, as product photos of one kind cluster.

    Args:
        n: Vectors.
        dim: Their size.
        n_clusters: Centres (default one per ~50 vectors).
        seed: Seeds the vectors' centres and noise.
        centre_seed: Seeds the centres alone (default ``seed``): queries drawn with another ``seed`` and the
            same ``centre_seed`` fall in the gallery's clusters.
        chunk: Vectors generated at a time, so 1M × 512 needs no float64 temporary of the whole.
    """
    centres = np.random.default_rng(seed if centre_seed is None else centre_seed).normal(
        size=(n_clusters or max(1, n // 50), dim)).astype(np.float32)
    rng = np.random.default_rng([seed, 1])
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        x = centres[rng.integers(0, len(centres), e - s)] + 0.7 * rng.standard_normal((e - s, dim), dtype=np.float32)
        out[s:e] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def synthetic_index(directory: str | os.PathLike, n: int, dim: int, kind: str = "auto", seed: int = 0):
    """A saved :class:`~cnclip_kd.retrieval.index.GalleryIndex` of ``n`` clustered unit vectors (reused when there).

    Clusters of ~50 vectors (:func:`clustered_vectors`): approximate indexes
    behave as they do on real embeddings.

    Returns:
        ``(index folder, its stats)``.
    """
    from ..retrieval.gallery import Gallery
    from ..retrieval.index import GalleryIndex

    index_dir = Path(directory) / f"index-{n}-{dim}-{kind}"
    if (index_dir / "stats.json").is_file():
        return index_dir, json.loads((index_dir / "stats.json").read_text(encoding="utf-8"))
    emb = clustered_vectors(n, dim, seed=seed)
    meta = [{"id": i, "image": None, "caption": f"商品 {i}", "label": f"c{i % 100}", "product_id": f"p{i // 5}",
             "split": None} for i in range(n)]
    index = GalleryIndex.build(emb, Gallery(ids=np.arange(n), meta=meta), kind=kind)
    index.save(index_dir)
    return index_dir, index.stats


def sample_queries(n: int, size: tuple[int, int] = (800, 800), quality: int = 90) -> list[bytes]:
    """``n`` sample photos of different categories upscaled to ``size`` and saved as JPEG: what users send."""
    from PIL import Image

    from .. import SAMPLE_DATA
    from ..core.images import encode_jpeg, load_image

    folders = sorted(p for p in (SAMPLE_DATA / "images").iterdir() if p.is_dir())
    photos = [sorted(folders[i % len(folders)].glob("*.jpg"))[i // len(folders)] for i in range(n)]
    return [encode_jpeg(load_image(p).resize(tuple(size), Image.BICUBIC), quality) for p in photos]


# --------------------------------------------------------------------------- the plan


@dataclass
class PlanResult:
    """What :func:`plan` measured and chose.

    Attributes:
        budget_ms: The p50 budget of one end-to-end query.
        cpu: :func:`cpu_features`.
        gallery: Index size; ``index_kind`` its kind.
        query_size: The query photos' size (width, height).
        threads: Threads per back-end.
        rows: One per (candidate, back-end): ``candidate``, ``backend``, ``total`` / ``decode`` /
            ``encode`` / ``search`` p50 and p95 (ms), ``meets``.
        choice: The chosen row plus ``train_command`` and ``export_command``, or ``None`` when nothing
            meets the budget.
        notes: What the numbers rest on.
    """

    budget_ms: float
    cpu: dict
    gallery: int
    index_kind: str
    query_size: tuple[int, int]
    threads: int | None
    rows: list[dict] = field(default_factory=list)
    choice: dict | None = None
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        """The table, the CPU and the choice, as Markdown."""
        lines = [f"**CPU**: {self.cpu['summary']}", "",
                 f"Budget: p50 ≤ {self.budget_ms:g} ms per query, end to end ({self.query_size[0]}×"
                 f"{self.query_size[1]} JPEG → decode → encode → search in {self.gallery:,} vectors, "
                 f"{self.index_kind}), {self.threads or 'default'} threads.", "",
                 "| candidate | back-end | p50 ms | p95 ms | decode | encode | search | meets |",
                 "|---|---|---:|---:|---:|---:|---:|:---:|"]
        for r in self.rows:
            lines.append(f"| {r['candidate']} | {r['backend']} | {r['total']['p50']:.1f} | {r['total']['p95']:.1f} "
                         f"| {r['decode']['p50']:.1f} | {r['encode']['p50']:.1f} | {r['search']['p50']:.2f} "
                         f"| {'yes' if r['meets'] else 'no'} |")
        lines.append("")
        if self.choice:
            c = self.choice
            lines += [f"**Choice: {c['candidate']} served by {c['backend']}** (p50 {c['total']['p50']:.1f} ms): "
                      "the first candidate, in order of expected quality, within the budget.", "",
                      "Train it by distillation, then export it:", "", "```bash", c["train_command"],
                      c["export_command"], "```"]
        else:
            fastest = min(self.rows, key=lambda r: r["total"]["p50"]) if self.rows else None
            lines.append(f"**No candidate meets {self.budget_ms:g} ms on this CPU**"
                         + (f"; the fastest is {fastest['candidate']} with {fastest['backend']} at "
                            f"{fastest['total']['p50']:.1f} ms. Try a smaller side or RN50, more threads, or a "
                            "larger budget." if fastest else "."))
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"budget_ms": self.budget_ms, "cpu": self.cpu, "gallery": self.gallery, "index_kind": self.index_kind,
                "query_size": list(self.query_size), "threads": self.threads, "rows": self.rows,
                "choice": self.choice, "notes": self.notes}


def _random_checkpoint(cand: Candidate, path: Path) -> Path:
    """A random-weight student of ``cand`` in the kit's checkpoint format (reused when there)."""
    import torch

    from ..models.students import build_model, cnclip_state_dict

    if not path.is_file():
        torch.manual_seed(0)
        info = cand.info()
        model = build_model(info)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"state_dict": cnclip_state_dict(model), "model_info": info}, tmp)
        os.replace(tmp, path)
    return path


def candidate_encoders(cand: Candidate, work: str | os.PathLike, backends: Sequence[str] = BACKENDS,
                       threads: int | None = None) -> dict[str, Path]:
    """Back-end name → what it loads (a random-weight checkpoint or an ONNX file) for a candidate.

    Exported once into ``work/<candidate>/`` and reused: ``random.pt``, ``image_encoder.onnx`` (checked
    against PyTorch) and ``image_encoder.int8-{dynamic,static}.onnx``.
    """
    work = Path(work)
    from .export import export_onnx, quantize_image_onnx

    folder = work / cand.name.replace("/", "-")
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = _random_checkpoint(cand, folder / "random.pt")
    files: dict[str, Path] = {"torch": ckpt}
    onnx = folder / "image_encoder.onnx"
    if any(b.startswith("onnx") for b in backends):
        if not onnx.is_file() or onnx.stat().st_mtime < ckpt.stat().st_mtime:
            # Random weights: the fp32 check still proves the graph; the int8 quality checks would mean nothing.
            export_onnx(ckpt, onnx, quantize=False, max_images=8, threads=threads, timing_runs=1)
        files["onnx-fp32"] = onnx
    for method in ("dynamic", "static"):
        name = f"onnx-int8-{method}"
        if name in backends:
            path = folder / f"image_encoder.int8-{method}.onnx"
            if not path.is_file() or path.stat().st_mtime < onnx.stat().st_mtime:
                quantize_image_onnx(onnx, path, method, calibration_size=32)
            files[name] = path
    return files


def _train_command(cand: Candidate, teacher: str) -> str:
    parts = ["cnclip-kd train --train-data out/data/lmdb/train --val-data out/data/lmdb/valid",
             f"--name {cand.arch.lower()}-{cand.side}-kd"]
    if cand.preset:
        parts.append(f"--preset {cand.preset}")
    else:
        parts.append(f"--vision-model {cand.arch} --text-model {cand.text_model} --resume {cand.arch}")
    if cand.side != int(_info(cand.arch)["image_resolution"]):
        parts.append(f"--image-resolution {cand.side}")
    parts.append(f"--distillation --teacher-model-name {teacher}")
    return " ".join(parts)


def _export_command(cand: Candidate, backend: str) -> str:
    ckpt = f"out/runs/{cand.arch.lower()}-{cand.side}-kd/checkpoints/epoch_latest.pt"
    method = {"onnx-int8-dynamic": " --int8-method dynamic", "onnx-int8-static": " --int8-method static"}.get(
        backend, "")
    return f"cnclip-kd export {ckpt} out/deploy/image_encoder.onnx{method}"


def plan(
    budget_ms: float = 50.0,
    *,
    candidates: Sequence[str | Candidate] = DEFAULT_CANDIDATES,
    backends: Sequence[str] = BACKENDS,
    gallery: int = 100_000,
    index_kind: str = "auto",
    query_size: tuple[int, int] = (800, 800),
    queries: int = 3,
    repeats: int = 5,
    warmup: int = 1,
    threads: int | None = 2,
    work_dir: str | os.PathLike = "out/plan",
    teacher: str = "ViT-H-14",
) -> PlanResult:
    """Time each candidate student with each back-end end to end on this machine; choose one for the budget.

    Per candidate a random-weight student of that architecture and side is
    saved, exported to ONNX (fp32, checked against PyTorch) and quantised
    both ways (dynamic, and static QDQ calibrated on sample photos); each
    back-end is loaded as a :class:`~cnclip_kd.deploy.runtime.Retriever` over a
    synthetic index of ``gallery`` clustered vectors of the candidate's
    embedding size. Each round, the back-ends of a candidate answer the same
    queries in a shuffled order, so a machine whose speed drifts slows them
    alike. Everything is kept in ``work_dir`` and reused by a rerun. Run it on
    an otherwise idle machine: PyTorch's thread pool in particular slows down
    many times when other processes hold the cores.

    The choice: the first candidate, in the order given, whose fastest
    back-end has p50 ≤ ``budget_ms``; served by that back-end.

    Args:
        budget_ms: p50 budget of one query, end to end (ms).
        candidates: ``"ARCH@SIDE"`` strings or :class:`Candidate`, best expected quality first.
        backends: Of :data:`BACKENDS`.
        gallery: Index size (vectors).
        index_kind: :meth:`~cnclip_kd.retrieval.index.GalleryIndex.build` kind (``auto``: flat ≤ 50k, else HNSW).
        query_size: Query photo size (width, height), saved as JPEG.
        queries: Different query photos.
        repeats: Timed passes over the queries.
        warmup: Untimed passes first.
        threads: Threads per back-end (ONNX Runtime intra-op / torch).
        work_dir: Models, indexes and the result (``plan.json``) go here.
        teacher: Teacher named in the training command.

    Returns:
        The :class:`PlanResult` (also written to ``work_dir/plan.json``).

    Raises:
        ValueError: Bad candidate, back-end, budget or sizes.
    """
    from tqdm.auto import tqdm

    from ..core.files import atomic_write_json
    from .latency import summarize_timings

    cands = _plan_candidates(budget_ms, candidates, backends, gallery, queries, repeats)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    result = PlanResult(float(budget_ms), cpu_features(), int(gallery), index_kind, tuple(query_size), threads)
    logger.info("plan: %s", result.cpu["summary"])
    photos = sample_queries(queries, query_size)
    rng = random.Random(0)
    for cand in tqdm(cands, desc="plan: candidates", unit="model"):
        t0 = time.perf_counter()
        runs, result.index_kind = _time_candidate(cand, work, photos, rng, backends=backends, gallery=gallery,
                                                  index_kind=index_kind, repeats=repeats, warmup=warmup,
                                                  threads=threads)
        for b in backends:
            s = summarize_timings(runs[b])
            result.rows.append({"candidate": cand.name, "arch": cand.arch, "side": cand.side, "backend": b, **s,
                                "meets": s["total"]["p50"] <= budget_ms})
        logger.info("plan: %s timed in %.0f s", cand.name, time.perf_counter() - t0)
    result.choice = _choose(cands, result.rows, teacher)
    result.notes = [
        "Random weights: speed does not depend on the values. Quality differs by architecture and side; see "
        "benchmarks/resolution_quality.py and notebook 02 for what a smaller student costs on your photos.",
        "A student trained at another side serves at that side (`--image-resolution`).",
        f"Machine speed drifts; rerun when the machine is otherwise idle (load average now "
        f"{os.getloadavg()[0]:.1f}).",
    ]
    atomic_write_json(work / "plan.json", result.to_dict())
    return result


def _plan_candidates(budget_ms: float, candidates: Sequence[str | Candidate], backends: Sequence[str], gallery: int,
                     queries: int, repeats: int) -> list[Candidate]:
    """The candidates :func:`plan` times, parsed, once its arguments are checked (ValueError when one is bad)."""
    if not budget_ms > 0:
        raise ValueError(f"budget_ms must be > 0, got {budget_ms}")
    if gallery < 1 or queries < 1 or repeats < 1:
        raise ValueError("gallery, queries and repeats must be ≥ 1")
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise ValueError(f"unknown back-ends {unknown}; choose from {BACKENDS}")
    cands = [c if isinstance(c, Candidate) else Candidate.parse(c) for c in candidates]
    if not cands:
        raise ValueError("no candidate to time")
    return cands


def _time_candidate(cand: Candidate, work: Path, photos: Sequence[bytes], rng: random.Random, *,
                    backends: Sequence[str], gallery: int, index_kind: str, repeats: int, warmup: int,
                    threads: int | None) -> tuple[dict[str, list[dict]], str]:
    """Every back-end of one candidate answering ``photos`` end to end: (back-end → timed queries, index kind).

    Each round the back-ends go in a shuffled order (``rng``), so a machine whose speed drifts slows them alike.
    """
    from ..retrieval.index import GalleryIndex
    from .backends import make_encoder
    from .runtime import Retriever

    index_dir, stats = synthetic_index(work, gallery, int(cand.info()["embed_dim"]), index_kind)
    index = GalleryIndex.load(index_dir)
    files = candidate_encoders(cand, work, backends, threads)
    retrievers = {b: Retriever(index, make_encoder(files[b], "torch" if b == "torch" else "onnx",
                                                   threads=threads), threads=threads) for b in backends}
    runs: dict[str, list[dict]] = {b: [] for b in backends}
    for rep in range(warmup + repeats):
        order = list(backends)
        rng.shuffle(order)
        # One back-end answers every query of a round in a row: torch's and ONNX Runtime's thread pools
        # spin for a while after their work, and alternating them query by query makes each wait for the other.
        for b in order:
            for q in photos:
                timing = retrievers[b].search(q, 10).timings_ms
                if rep >= warmup:
                    runs[b].append(timing)
    return runs, stats.get("kind", index_kind)


def _choose(cands: Sequence[Candidate], rows: Sequence[dict], teacher: str) -> dict | None:
    """The first candidate whose fastest back-end meets the budget, with its commands; None when none does."""
    for cand in cands:
        best = min((r for r in rows if r["candidate"] == cand.name), key=lambda r: r["total"]["p50"])
        if best["meets"]:
            return {**best, "train_command": _train_command(cand, teacher),
                    "export_command": _export_command(cand, best["backend"])}
    return None
