"""Gallery throughput end to end: JPEG files on disk → embeddings → a saved FAISS index, img/s per stage.

The photos are the sample data's product images, re-encoded as ``--n`` distinct
JPEG files of ``--side`` px (a random crop and flip each; made once and kept in
``--work-dir``). The model is a real architecture with random weights (speed
does not depend on the values): ``teacher:random:ViT-B-16`` by default.

Stages, each timed on its own and then together:

* **list**: :func:`cnclip_kd.retrieval.gallery.gallery_from_source` over the folder (no image check).
* **decode**: files → the encoder's input tensors on its device, through the
  path :func:`cnclip_kd.retrieval.gallery.choose_decode` picks (on a GPU: CPU workers vs
  nvJPEG measured on a sample, both rates printed; on a CPU: the CPU).
* **encode**: the image tower alone on ready tensors (autocast bf16/fp16 on a GPU).
* **embed**: :func:`cnclip_kd.retrieval.gallery.embed_gallery` (decode + encode + chunk
  saves, overlapped as in real use).
* **index**: :meth:`cnclip_kd.retrieval.index.GalleryIndex.build` (``auto``) and :meth:`save`.

End to end = ``n / (list + embed + index build + save)``. On CUDA the verdict
against the target (≥ 3,000 img/s for ViT-B-16 on one H100) is printed; on a
CPU the figures are printed without one.

Usage::

    python benchmarks/gallery_throughput.py --n 50000 --batch-size 512 --out out/bench/gallery_throughput.json

Quick check of the script itself (tiny model, CPU)::

    python benchmarks/gallery_throughput.py --model teacher:random:preset:tiny --n 48 --side 64 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import emit

logger = logging.getLogger("gallery_throughput")

REPO = Path(__file__).resolve().parent.parent
#: End-to-end target on one H100 with ViT-B-16 (img/s).
TARGET_IMG_S = 3000.0


def make_photos(folder: Path, n: int, side: int, seed: int = 0) -> Path:
    """``n`` distinct JPEGs of ``side`` px cut from the sample images (reused when the folder holds them)."""
    from PIL import Image, ImageOps

    stamp = folder / "photos.json"
    want = {"n": n, "side": side, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    sources = sorted((REPO / "sample_data" / "images").rglob("*.jpg"))
    if not sources:
        raise SystemExit(f"no sample images under {REPO / 'sample_data' / 'images'}")
    rng = np.random.default_rng(seed)
    plans = [(i, sources[i % len(sources)], rng.uniform(0.7, 1.0), rng.uniform(0, 1, 2), bool(rng.integers(2)))
             for i in range(n)]

    def one(plan) -> None:
        i, src, frac, (fx, fy), flip = plan
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            cw, ch = int(w * frac), int(h * frac)
            x, y = int((w - cw) * fx), int((h - ch) * fy)
            im = im.crop((x, y, x + cw, y + ch)).resize((side, side), Image.BICUBIC)
            if flip:
                im = ImageOps.mirror(im)
            out = folder / f"c{i % 10}" / f"{i:07d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            im.save(out, quality=90)

    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(one, plans))
    stamp.write_text(json.dumps(want))
    return folder


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_decode(encoder, gallery, how: str, batch_size: int, num_workers: int) -> float:
    """Seconds to turn every gallery image into encoder input on the encoder's device, by ``how``."""
    from torch.utils.data import DataLoader

    from cnclip_kd.retrieval.gallery import (_chunk_batches, _collate_list, _GalleryBytes, _GalleryImages, _GpuDecoder,
        _tensor_transform)

    batches = _chunk_batches([(0, len(gallery))], batch_size)
    t0 = time.perf_counter()
    if how == "gpu":
        gpu = _GpuDecoder(encoder, gallery, _tensor_transform(encoder.transform))
        loader = DataLoader(_GalleryBytes(gallery), batch_sampler=batches, num_workers=num_workers,
                            collate_fn=_collate_list)
        for rows, data in zip(batches, loader):
            gpu(rows, data)
    else:
        loader = DataLoader(_GalleryImages(gallery, transform=encoder.transform), batch_sampler=batches,
                            num_workers=num_workers, pin_memory=encoder.device.type == "cuda")
        for images in loader:
            images.to(encoder.device, non_blocking=True)
    _sync(encoder.device)
    return time.perf_counter() - t0


def time_encode(encoder, n: int, batch_size: int, resolution: int) -> float:
    """Seconds to encode ``n`` images (ready tensors on the device; one warm-up batch not counted)."""
    import torch

    x = torch.randn(batch_size, 3, resolution, resolution, device=encoder.device)
    encoder.encode(x)
    _sync(encoder.device)
    t0 = time.perf_counter()
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        encoder.encode(x[:b])
        done += b
    _sync(encoder.device)
    return time.perf_counter() - t0


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    import re

    try:
        model = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        name = model.group(1) if model else platform.processor()
    except OSError:
        name = platform.processor()
    return f"CPU {name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="teacher:random:ViT-B-16", help="encoder spec (cnclip_kd.load_encoder)")
    ap.add_argument("--n", type=int, default=None, help="images (default: 20,000 on a GPU, 128 on a CPU)")
    ap.add_argument("--side", type=int, default=500, help="JPEG side in px (product photos are ~500-800)")
    ap.add_argument("--batch-size", type=int, default=None, help="images per forward pass (default 512 GPU, 32 CPU)")
    ap.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: the package's)")
    ap.add_argument("--decode", default="auto", choices=["auto", "cpu", "gpu"])
    ap.add_argument("--device", default=None, help="cpu, cuda … (default: cuda when available)")
    ap.add_argument("--work-dir", default=None, help="where the photos are made and kept (default: a temp folder)")
    ap.add_argument("--out", default=None, help="also write the report here as JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import torch
    from PIL import Image

    from cnclip_kd.retrieval.encoders import load_encoder
    from cnclip_kd.retrieval.gallery import choose_decode, default_num_workers, embed_gallery, gallery_from_source
    from cnclip_kd.retrieval.index import GalleryIndex

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    n = args.n or (20_000 if on_gpu else 128)
    batch = args.batch_size or (512 if on_gpu else 32)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gallery_throughput-"))
    t0 = time.perf_counter()
    photos = make_photos(work / f"photos-{n}-{args.side}", n, args.side)
    logger.info("%d photos of %d px ready in %.1f s", n, args.side, time.perf_counter() - t0)

    encoder = load_encoder(args.model, device=device)
    resolution = int(encoder.transform(Image.new("RGB", (8, 8))).shape[-1])
    workers = default_num_workers(device.type) if args.num_workers is None else args.num_workers
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    gallery = gallery_from_source(photos, check_images=False)
    times["list"] = time.perf_counter() - t0
    how, decode_facts = choose_decode(encoder, gallery, decode=args.decode, batch_size=batch, num_workers=workers)
    times["decode"] = time_decode(encoder, gallery, how, batch, workers)
    times["encode"] = time_encode(encoder, n, batch, resolution)

    cache = work / "embeddings"
    shutil.rmtree(cache, ignore_errors=True)
    t0 = time.perf_counter()
    emb = embed_gallery(encoder, gallery, cache, batch_size=batch, num_workers=workers, decode=how)
    times["embed"] = time.perf_counter() - t0
    import faiss  # noqa: F401 (loaded before the clock starts, as in a running service)

    t0 = time.perf_counter()
    index = GalleryIndex.build(emb, gallery, kind="auto", recall_sample=200)
    times["index_build"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.save(work / "index")
    times["index_save"] = time.perf_counter() - t0
    total = times["list"] + times["embed"] + times["index_build"] + times["index_save"]
    rate = {k: n / v if v > 0 else float("inf") for k, v in times.items()}
    e2e = n / total

    dev_name = _device_name(device)
    precision = str(encoder.autocast_dtype).replace("torch.", "") if encoder.autocast_dtype else "fp32"
    lines = [f"Gallery throughput: {args.model}, {n:,} JPEGs of {args.side} px → saved {index.stats['kind']} index; "
             f"{dev_name}; batch {batch}, {workers} workers, {precision}, decode on the {how.upper()} "
             f"({decode_facts.get('reason')}"
             + (f": CPU {decode_facts['cpu_img_s']:.0f} img/s, GPU {decode_facts['gpu_img_s']:.0f} img/s"
                if "cpu_img_s" in decode_facts else "") + ").", "",
             "| stage | seconds | img/s |", "|---|---|---|"]
    names = {"list": "list files", "decode": "decode + preprocess (alone)", "encode": "encode (alone)",
             "embed": "embed (decode + encode + chunk saves)", "index_build": "index build", "index_save": "index save"}
    for key, label in names.items():
        lines.append(f"| {label} | {times[key]:.2f} | {rate[key]:,.0f} |")
    lines.append(f"| **end to end** (list + embed + build + save) | {total:.2f} | **{e2e:,.0f}** |")
    lines.append("")
    if on_gpu:
        verdict = "meets" if e2e >= TARGET_IMG_S else "misses"
        lines.append(f"Target ≥ {TARGET_IMG_S:,.0f} img/s end to end (ViT-B-16, one H100): {verdict} it "
                     f"({e2e:,.0f} img/s on {dev_name}).")
    else:
        lines.append(f"No GPU here: the target (≥ {TARGET_IMG_S:,.0f} img/s on one H100) is not evaluated.")
    emit("\n".join(lines), args.out, {"n": n, "side": args.side, "model": args.model, "device": dev_name,
                                      "batch_size": batch, "num_workers": workers, "precision": precision,
                                      "decode": how, "decode_facts": decode_facts, "seconds": times,
                                      "img_per_s": rate, "end_to_end_img_s": e2e, "index": index.stats,
                                      "target_img_s": TARGET_IMG_S if on_gpu else None})
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
