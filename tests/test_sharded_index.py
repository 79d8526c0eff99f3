"""Galleries past one process: sharded, resumable embedding (gloo on CPU), decode choice, FAISS on the GPU (CPU checks)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as tmp_mp
from PIL import Image

import cnclip_kd.retrieval.gallery as gallery_mod
import cnclip_kd.retrieval.index as index_mod
from cnclip_kd.cli import main as cli_main
from cnclip_kd.core.distributed import Dist
from cnclip_kd.retrieval.encoders import ImageEncoder
from cnclip_kd.retrieval.gallery import (_encode_chunks, _GpuDecoder, _tensor_transform, choose_decode,
    default_num_workers, embed_gallery, gallery_from_source)
from cnclip_kd.retrieval.index import GalleryIndex
from cnclip_kd.models.students import image_transform

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
CHUNK = 4
N_PHOTOS = 22  # 6 chunks of 4 (the last one 2)


def _photos(root: Path, n: int = N_PHOTOS) -> Path:
    for i in range(n):
        folder = root / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (40 + i, 32), (10 * i % 256, 255 - 9 * i, 60 + 5 * i))
        img.paste((200, 20 * (i % 7), 90), (0, 0, 12, 10 + i % 9))  # some structure per quadrant
        img.save(folder / f"{i:03d}.jpg", quality=90)
    return root


class ToyEncoder(ImageEncoder):
    """Deterministic and cheap (mean colour of 4 quadrants, 12-d); counts calls; optionally fails on call N."""

    def __init__(self, fail_on_call: int | None = None, transform=None):
        from torchvision.transforms import Compose, Resize, ToTensor

        def fn(x):
            self.calls += 1
            if fail_on_call is not None and self.calls == fail_on_call:
                raise RuntimeError("simulated crash of this rank")
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1) + 1e-3

        super().__init__(fn, name="toy", dim=12, transform=transform or Compose([Resize((8, 8)), ToTensor()]),
                         device="cpu", fingerprint="toy-sharded-v1")
        self.calls = 0


def _rank_main(rank: int, world: int, init_file: str, photos: str, run: str, copy_to: str, report: str) -> None:
    """One rank of a gloo run (spawned).

    Round 1: rank 1 crashes on its second chunk (after saving its first); rank 0 finishes its shard, and
    after the barrier finds chunks missing. Rank 0 copies that state to ``copy_to``. Round 2: both rerun.
    Each rank records its encoder calls per round; rank 0 saves the result.
    """
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    d, out = Dist(rank=rank, world_size=world), Path(report)
    gallery = gallery_from_source(photos, check_images=False)
    crashing = ToyEncoder(fail_on_call=2 if rank == 1 else None)
    try:
        embed_gallery(crashing, gallery, run, batch_size=CHUNK, chunk_size=CHUNK, num_workers=0, dist=d)
        raise AssertionError("round 1 should fail on every rank")
    except RuntimeError as err:
        (out / f"round1-rank{rank}.txt").write_text(str(err))
        if rank == 1:
            tdist.barrier()  # the barrier rank 0 waits at inside embed_gallery, which rank 1 never reached
    if rank == 0:
        shutil.copytree(run, copy_to)
    tdist.barrier()
    encoder = ToyEncoder()
    emb = embed_gallery(encoder, gallery, run, batch_size=CHUNK, chunk_size=CHUNK, num_workers=0, dist=d)
    (out / f"round2-rank{rank}.json").write_text(json.dumps({"calls": encoder.calls}))
    if rank == 0:
        np.save(out / "emb.npy", emb)
    else:
        assert emb is None
    tdist.destroy_process_group()


def test_sharded_embedding_resumes_at_any_world_size_and_equals_one_process(tmp_path, monkeypatch):
    photos = _photos(tmp_path / "photos")
    gallery = gallery_from_source(photos, check_images=False)
    single = ToyEncoder()
    ref = embed_gallery(single, gallery, tmp_path / "single", batch_size=CHUNK, chunk_size=CHUNK)
    assert single.calls == 6 and ref.shape == (N_PHOTOS, 12)

    run, crashed, report = tmp_path / "two", tmp_path / "crashed", tmp_path / "report"
    report.mkdir()
    tmp_mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(photos), str(run), str(crashed), str(report)),
                 nprocs=2, join=True)
    assert "simulated crash" in (report / "round1-rank1.txt").read_text()
    assert "embedding chunks are missing" in (report / "round1-rank0.txt").read_text()
    (chunk_dir,) = crashed.glob("chunks-*")
    done = sorted(p.name for p in chunk_dir.glob("chunk-*.npy"))
    # Whole chunks in contiguous shards: rank 0 did chunks 0-2; rank 1 saved chunk 3, then crashed.
    assert done == [f"chunk-{c:05d}.npy" for c in range(4)]
    assert not (crashed / "embeddings.npy").exists()

    # Round 2 (two ranks): only the two missing chunks were encoded, one per rank; same rows, same order.
    calls = [json.loads((report / f"round2-rank{r}.json").read_text())["calls"] for r in range(2)]
    assert calls == [1, 1]
    np.testing.assert_allclose(np.load(report / "emb.npy"), ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.load(run / "embeddings.npy"), ref, rtol=0, atol=1e-6)
    stamp = json.loads((run / "embeddings.json").read_text())
    assert stamp["world_size"] == 2 and stamp["decode"] == "cpu" and not list(run.glob("chunks-*"))

    # The crashed state rerun in one process (a notebook): the two-rank chunks are reused untouched.
    mtimes = {p.name: p.stat().st_mtime_ns for p in chunk_dir.glob("chunk-*.npy")}
    written: list[str] = []
    real_save = gallery_mod.atomic_save_npy
    monkeypatch.setattr(gallery_mod, "atomic_save_npy", lambda p, a: (written.append(Path(p).name), real_save(p, a)))
    monkeypatch.setattr(gallery_mod.shutil, "rmtree", lambda *a, **k: None)  # keep the chunks to look at
    one = ToyEncoder()
    emb1 = embed_gallery(one, gallery, crashed, batch_size=CHUNK, chunk_size=CHUNK)
    assert one.calls == 2
    assert sorted(w for w in written if w.startswith("chunk-")) == ["chunk-00004.npy", "chunk-00005.npy"]
    assert {n: (chunk_dir / n).stat().st_mtime_ns for n in done} == mtimes
    np.testing.assert_allclose(emb1, ref, rtol=0, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_cli_index_shards_and_rank0_alone_builds(tmp_path, capsys):
    """``torchrun --nproc_per_node 2 -m cnclip_kd.cli index``: one index, equal to a one-process run's (the
    image check shared between the ranks drops the same broken file)."""
    photos = _photos(tmp_path / "photos")
    (photos / "c0" / "000-broken.jpg").write_bytes(b"not a jpeg")  # checked by rank 0, dropped by both
    model = "teacher:random:preset:tiny"
    common = ["--source", str(photos), "--no-text", "--kind", "flat", "--chunk-size", "4", "--batch-size", "4",
              "--device", "cpu", "--decode", "auto"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "cnclip_kd.cli", "index", model, "out/index/two", *common]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)  # exactly one summary: rank 0's (rank 1 builds nothing)
    assert summary["n"] == N_PHOTOS and summary["kind"] == "flat"
    assert "rank 1: embedding shard done" in proc.stderr and "000-broken.jpg" in proc.stderr

    assert cli_main(["index", model, str(tmp_path / "out" / "index" / "one"), *common]) == 0
    capsys.readouterr()
    two = GalleryIndex.load(tmp_path / "out" / "index" / "two")
    one = GalleryIndex.load(tmp_path / "out" / "index" / "one")
    assert two.gallery.ids.tolist() == one.gallery.ids.tolist()
    np.testing.assert_allclose(two.embeddings, one.embeddings, rtol=0, atol=1e-5)
    assert json.loads((tmp_path / "out" / "index" / "_embeddings" / "two" / "embeddings.json").read_text()
                      )["world_size"] == 2


# --------------------------------------------------------------------------- decoding


def test_decode_choice_on_cpu_is_cpu_and_gives_the_same_embeddings(tmp_path):
    photos = _photos(tmp_path / "photos", 9)
    gallery = gallery_from_source(photos, check_images=False)
    enc = ToyEncoder()
    assert choose_decode(enc, gallery) == ("cpu", {"reason": "encoder on cpu"})
    assert choose_decode(enc, gallery, decode="cpu")[0] == "cpu"
    with pytest.raises(ValueError, match="CUDA device"):
        choose_decode(enc, gallery, decode="gpu")
    with pytest.raises(ValueError, match="decode must be"):
        choose_decode(enc, gallery, decode="nvjpeg")
    assert default_num_workers("cpu") == 0 and 1 <= default_num_workers("cuda", 1) <= 8

    auto = embed_gallery(enc, gallery, tmp_path / "auto", batch_size=4, chunk_size=4)
    cpu = embed_gallery(ToyEncoder(), gallery, tmp_path / "cpu", batch_size=4, chunk_size=4, decode="cpu")
    np.testing.assert_array_equal(auto, cpu)
    assert json.loads((tmp_path / "auto" / "embeddings.json").read_text())["decode"] == "cpu"


def test_measured_decode_choice_takes_the_faster_path(tmp_path, monkeypatch):
    """On a (faked) CUDA encoder, auto measures both paths and keeps the faster; a failing GPU decode → CPU."""
    gallery = gallery_from_source(_photos(tmp_path / "photos", 5), check_images=False)
    enc = ToyEncoder(transform=image_transform(32))
    enc.device = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    rates = iter([100.0, 900.0, 800.0, 50.0])  # cpu, gpu; then cpu, gpu
    monkeypatch.setattr(gallery_mod, "_rate_after_first", lambda batches, sync: next(rates))
    assert choose_decode(enc, gallery) == ("gpu", {"reason": "measured", "cpu_img_s": 100.0, "gpu_img_s": 900.0})
    assert choose_decode(enc, gallery)[0] == "cpu"
    assert choose_decode(enc, gallery, decode="gpu") == ("gpu", {"reason": "asked for"})

    def broken(batches, sync):
        raise RuntimeError("nvjpeg: unsupported")

    monkeypatch.setattr(gallery_mod, "_rate_after_first", broken)
    how, facts = choose_decode(enc, gallery)
    assert how == "cpu" and "unsupported" in facts["reason"]
    enc.transform = lambda im: im  # no tensor version of this transform: never the GPU
    assert choose_decode(enc, gallery)[1]["reason"] == "the encoder's transform has no tensor version"


def test_gpu_decode_path_matches_pil_on_cpu_tensors(tmp_path):
    """The nvJPEG path's logic (batched decode_jpeg, tensor transform, PNG fallback), run with CPU tensors."""
    photos = _photos(tmp_path / "photos", 7)
    Image.new("RGB", (30, 20), (5, 200, 90)).save(photos / "c0" / "png.png")  # not a JPEG: the PIL fallback
    gallery = gallery_from_source(photos, check_images=False)
    tf = image_transform(32)
    tensor_tf = _tensor_transform(tf)
    assert tensor_tf is not None and _tensor_transform(lambda im: im) is None
    enc = ToyEncoder(transform=tf)
    decoder = _GpuDecoder(enc, gallery, tensor_tf)
    rows = list(range(len(gallery)))
    batch = decoder(rows, [gallery_mod._GalleryBytes(gallery)[r] for r in rows])
    pil = torch.stack([tf(gallery.image(r)) for r in rows])
    assert batch.shape == pil.shape == (len(gallery), 3, 32, 32)
    png_row = next(r for r in rows if gallery.meta[r]["image"].endswith(".png"))
    torch.testing.assert_close(batch[png_row], pil[png_row], rtol=0, atol=0)  # the CPU fallback: identical
    # Another resize implementation and JPEG decoder: within a few grey levels (std-normalised ≈ 0.07 each).
    assert float((batch - pil).abs().mean()) < 0.02 and float((batch - pil).abs().max()) < 0.5

    # The whole chunk loop with tensor decoding: embeddings close to the PIL path's.
    out = tmp_path / "chunks"
    bounds = [(s, min(len(gallery), s + 4)) for s in range(0, len(gallery), 4)]
    paths = [out / f"chunk-{c:05d}.npy" for c in range(len(bounds))]
    _encode_chunks(enc, gallery, bounds, paths, batch_size=3, num_workers=0, decode="gpu", desc="t")
    via_tensor = np.concatenate([np.load(p) for p in paths])
    ref = embed_gallery(ToyEncoder(transform=tf), gallery, tmp_path / "ref", batch_size=3, chunk_size=4)
    assert via_tensor.shape == ref.shape and float(np.abs(via_tensor - ref).max()) < 0.02


# --------------------------------------------------------------------------- FAISS on the GPU


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _toy(n: int):
    from cnclip_kd.retrieval.gallery import Gallery

    return Gallery(ids=np.arange(n) + 10, meta=[{"id": i + 10, "image": None, "caption": "", "label": "",
                                                  "product_id": "", "split": None} for i in range(n)])


def _clustered(n=3000, dim=32):
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(30, dim))
    return _unit(centres[rng.integers(0, 30, n)] + 0.4 * rng.normal(size=(n, dim)))


def test_faiss_on_cpu_builds_on_cpu_and_the_saved_index_searches_the_same(tmp_path):
    emb = _clustered()
    idx = GalleryIndex.build(emb, _toy(len(emb)), kind="ivfsq", recall_sample=100)
    assert index_mod._gpu_count() == 0
    assert idx.stats["built_on"] == "cpu" and idx.stats["faiss_gpu"] is False
    assert idx._search_index is idx.index
    loaded = GalleryIndex.load(idx.save(tmp_path / "ivfsq"))
    np.testing.assert_array_equal(loaded.search(emb[:20], 10)[1], idx.search(emb[:20], 10)[1])


class GpuFakeIndex:
    """Stands in for a faiss GPU index on a machine without one: a CPU clone behind another class name."""

    def __init__(self, inner, log):
        self.inner, self.log = inner, log

    def __getattr__(self, name):
        if name in ("train", "add"):
            self.log.append(name)
        return getattr(self.inner, name)


def test_gpu_faiss_path_trains_on_the_gpu_copy_and_saves_a_cpu_index(tmp_path, monkeypatch):
    """With faiss reporting a GPU (faked), flat/IVF are trained + filled on the 'GPU' copy and copied back
    with index_gpu_to_cpu before saving; HNSW stays on the CPU; a CPU process loads and searches it alike."""
    log: list[str] = []
    monkeypatch.setattr(index_mod, "_gpu_count", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus",
                        lambda index, *a, **k: (log.append("to_gpu"), GpuFakeIndex(faiss.clone_index(index), log))[1],
                        raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu",
                        lambda index: (log.append("to_cpu"), faiss.clone_index(index.inner))[1], raising=False)
    emb = _clustered()
    idx = GalleryIndex.build(emb, _toy(len(emb)), kind="ivf", recall_sample=100)
    assert log[:4] == ["to_gpu", "train", "add", "to_cpu"], log
    assert idx.stats["built_on"] == "gpu" and isinstance(idx.index, faiss.IndexIVFFlat)
    assert faiss.extract_index_ivf(idx.index).nprobe == idx.stats["params"]["nprobe"]
    assert isinstance(idx._search_index, GpuFakeIndex)  # searches go to the GPU copy
    saved = idx.save(tmp_path / "ivf")
    hnsw_log_start = len(log)
    hnsw = GalleryIndex.build(emb, _toy(len(emb)), kind="hnsw", recall_sample=50)
    assert hnsw.stats["built_on"] == "cpu" and "to_gpu" not in log[hnsw_log_start:]

    monkeypatch.setattr(index_mod, "_gpu_count", lambda: 0)  # the CPU server
    loaded = GalleryIndex.load(saved)
    assert isinstance(loaded.index, faiss.IndexIVFFlat) and loaded._search_index is loaded.index
    np.testing.assert_array_equal(loaded.search(emb[:30], 10)[1], idx.search(emb[:30], 10)[1])
    cpu_built = GalleryIndex.build(emb, _toy(len(emb)), kind="ivf", recall_sample=100)
    np.testing.assert_array_equal(loaded.search(emb[:30], 10)[1], cpu_built.search(emb[:30], 10)[1])


def test_faiss_gpu_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("CNCLIP_KD_FAISS_GPU", "0")
    assert index_mod._gpu_count() == 0
