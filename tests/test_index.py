"""Retrieval: encoders, galleries, resumable embedding, FAISS indexes, evaluation, Top-10 figure, CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from PIL import Image

from cnclip_kd.notebook import viz
from cnclip_kd.cli import main as cli_main
from cnclip_kd.data.dataset import read_labels
from cnclip_kd.retrieval.encoders import ImageEncoder, load_encoder
from cnclip_kd.retrieval.evaluate import chance_p_at_k, compare_models, evaluate_index
from cnclip_kd.retrieval.discovery import discover_models, latest_checkpoint
from cnclip_kd.retrieval.gallery import embed_gallery, Gallery, gallery_from_source, gallery_from_split, MetaRows
from cnclip_kd.retrieval.index import choose_index_kind, EXACT_MAX, GalleryIndex
from cnclip_kd.core.metrics import grouped_ranking_metrics, neighbour_agreement, neighbour_hits
from cnclip_kd.models.students import ModelLoadError
from demo_fixtures import build_saved_index


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _toy_gallery(n: int, labels=None, products=None) -> Gallery:
    labels = labels or [f"c{i % 5}" for i in range(n)]
    products = products or [""] * n
    meta = [{"id": 100 + i, "image": None, "caption": f"商品 {i}", "label": labels[i], "product_id": products[i],
             "split": None} for i in range(n)]
    return Gallery(ids=np.arange(100, 100 + n), meta=meta)


def _clustered(n: int, dim: int, n_clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    return _unit(centres[rng.integers(0, n_clusters, n)] + 0.35 * rng.normal(size=(n, dim)))


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    """20 small photos in two category folders (distinct colours), plus one broken file."""
    root = tmp_path / "photos"
    for c, label in enumerate(("红色", "blue")):
        (root / label).mkdir(parents=True)
        for i in range(10):
            colour = (200 + i, 20 * c, 30 + 20 * c) if c == 0 else (10, 20 + i, 200 + 5 * i)
            Image.new("RGB", (40 + i, 30), colour).save(root / label / f"{i:02d}.jpg")
    (root / "blue" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


class CountingEncoder(ImageEncoder):
    """A cheap deterministic encoder (mean colour of 4 quadrants) that counts its calls, optionally failing."""

    def __init__(self, fail_on_call: int | None = None, fingerprint: str = "toy-v1"):
        from torchvision.transforms import Compose, Resize, ToTensor

        def fn(x):
            self.calls += 1
            if fail_on_call is not None and self.calls == fail_on_call:
                raise KeyboardInterrupt("simulated interruption")
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1) + 1e-3

        super().__init__(fn, name="toy", dim=12, transform=Compose([Resize((8, 8)), ToTensor()]), device="cpu",
                         fingerprint=fingerprint)
        self.calls = 0


# --------------------------------------------------------------------------- metrics helpers


def test_neighbour_hits_and_grouped_metrics_by_hand():
    labels = ["a", "a", "b", ""]
    neighbours = np.array([[1, 2], [2, 0], [0, -1], [0, 1]])
    hits, n_rel = neighbour_hits(labels, neighbours)
    assert hits.tolist() == [[True, False], [False, True], [False, False], [False, False]]
    assert n_rel.tolist() == [1, 1, 0, 0]  # "b" has no other item; "" is unknown
    per = grouped_ranking_metrics(hits, n_rel, labels, ks=(1, 2))
    assert sorted(per) == ["a", "b"]
    assert per["a"] == {"n_queries": 2, "p@2": 0.5, "map@2": 0.75, "r@1": 0.5, "r@2": 1.0}
    assert per["b"]["n_queries"] == 0


# --------------------------------------------------------------------------- index


def test_flat_search_equals_numpy_brute_force():
    rng = np.random.default_rng(1)
    emb = _unit(rng.normal(size=(500, 32)))
    queries = rng.normal(size=(25, 32)).astype(np.float32)  # not normalised: search normalises
    idx = GalleryIndex.build(emb, _toy_gallery(500), kind="flat")
    scores, rows = idx.search(queries, 10)

    sims = _unit(queries) @ emb.T
    expected = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(rows, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, expected, axis=1), rtol=1e-5, atol=1e-5)
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (25, 10)

    # Leave-one-out: a gallery item as the query, itself excluded by id.
    own = np.array([3, 77, 499])
    scores, rows = idx.search(emb[own], 10, exclude_ids=idx.gallery.ids[own])
    sims = emb[own] @ emb.T
    sims[np.arange(3), own] = -np.inf
    np.testing.assert_array_equal(rows, np.argsort(-sims, axis=1, kind="stable")[:, :10])
    assert not (rows == own[:, None]).any()
    assert idx.stats["kind"] == "flat" and idx.stats["n"] == 500 and idx.stats["recall@10"] == 1.0


def test_search_pads_when_the_gallery_is_smaller_than_k():
    idx = GalleryIndex.build(_unit(np.eye(4, 8) + 0.1), _toy_gallery(4), kind="flat")
    scores, rows = idx.search(idx.embeddings[:1], 10, exclude_ids=[idx.gallery.ids[0]])
    assert rows.shape == (1, 10)
    assert sorted(rows[0, :3].tolist()) == [1, 2, 3] and (rows[0, 3:] == -1).all()
    assert np.isneginf(scores[0, 3:]).all() and np.isfinite(scores[0, :3]).all()
    with pytest.raises(ValueError, match="dimension 5"):
        idx.search(np.ones((1, 5)), 3)


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfsq"])
def test_approximate_index_measures_recall(kind):
    emb = _clustered(20_000, 32, 50)
    idx = GalleryIndex.build(emb, _toy_gallery(20_000), kind=kind, recall_sample=300)
    recall = idx.stats["recall@10"]
    assert 0.0 <= recall <= 1.0
    assert recall > 0.8, idx.stats  # clustered data, default parameters
    assert idx.stats["kind"] == kind and idx.stats["n"] == 20_000 and idx.stats["bytes"] > 0
    assert idx.stats["params"] and idx.stats["search_ms"] >= 0
    scores, rows = idx.search(emb[:5], 10)
    assert rows.shape == (5, 10) and (rows >= 0).all()
    if kind == "ivfsq":
        assert idx.stats["bytes"] < 20_000 * 32 * 4 / 2  # 8-bit codes: well below the flat size


def test_hnsw_stores_fp16_vectors_by_default_for_half_the_memory():
    import faiss

    emb = _clustered(20_000, 64, 50)
    half = GalleryIndex.build(emb, _toy_gallery(20_000), kind="hnsw", recall_sample=300)
    full = GalleryIndex.build(emb, _toy_gallery(20_000), kind="hnsw", params={"storage": "float32"}, recall_sample=300)
    assert isinstance(half.index, faiss.IndexHNSWSQ) and half.stats["params"]["storage"] == "fp16"
    assert isinstance(full.index, faiss.IndexHNSWFlat)
    assert half.stats["recall@10"] >= full.stats["recall@10"] - 0.01 and half.stats["recall@10"] > 0.95
    vectors = 20_000 * 64 * 4
    assert full.stats["bytes"] - half.stats["bytes"] == pytest.approx(vectors / 2, rel=0.05)


def test_gallery_metadata_rows_are_compact_and_read_only():
    rows = [{"id": i, "caption": f"白色连衣裙 {i}", "label": "dress" if i % 2 else "", "image": None,
             "score": np.float32(0.5)} for i in range(1000)]
    gallery = Gallery(ids=np.arange(1000), meta=rows)
    meta = gallery.meta
    assert isinstance(meta, MetaRows) and len(meta) == 1000 and meta[7]["caption"] == "白色连衣裙 7"
    assert meta[-1]["id"] == 999 and meta[2:4] == [meta[2], meta[3]] and meta[5]["score"] == 0.5
    meta[3]["caption"] = "changed"  # a row read is a copy
    assert meta[3]["caption"] == "白色连衣裙 3"
    assert meta == [{**r, "score": 0.5} for r in rows] and list(gallery.column("label"))[:2] == ["", "dress"]
    with pytest.raises(IndexError, match="out of range"):
        meta[1000]
    assert Gallery.from_json(json.loads(json.dumps(gallery.to_json())), gallery.ids).meta == meta


def test_auto_kind_follows_size_and_memory_budget():
    assert choose_index_kind(1000, 512) == "flat"
    assert choose_index_kind(EXACT_MAX, 512) == "flat"
    assert choose_index_kind(EXACT_MAX + 1, 512) == "hnsw"
    assert choose_index_kind(2_000_000, 512) == "ivf"  # too many for an HNSW build
    assert choose_index_kind(200_000, 512, memory_budget_mb=150) == "ivfsq"  # flat/hnsw/ivf ≥ 400 MB
    assert choose_index_kind(200_000, 512, memory_budget_mb=50) == "ivfpq"
    assert choose_index_kind(10_000, 512, memory_budget_mb=10) == "ivfsq"  # flat would be 20 MB
    emb = _clustered(300, 16, 5)
    assert GalleryIndex.build(emb, _toy_gallery(300)).stats["kind"] == "flat"
    with pytest.raises(ValueError, match="unknown index kind 'lsh'"):
        GalleryIndex.build(emb, _toy_gallery(300), kind="lsh")
    with pytest.raises(ValueError, match="do not fit a gallery of 299"):
        GalleryIndex.build(emb, _toy_gallery(299))


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_save_load_round_trip(tmp_path, kind):
    emb = _clustered(2000, 16, 8)
    gallery = _toy_gallery(2000, products=[f"p{i // 3}" for i in range(2000)])
    idx = GalleryIndex.build(emb, gallery, kind=kind, recall_sample=100)
    assert 0.0 <= idx.stats["recall@10"] <= 1.0
    if kind == "ivfpq":
        assert idx.stats["bytes"] < 2000 * 16 * 4  # compressed codes
    idx.stats["eval"] = evaluate_index(idx, k=5)
    saved = idx.save(tmp_path / "index" / "m")
    assert sorted(p.name for p in saved.iterdir()) == ["embeddings.npy", "gallery.json", "ids.npy", "index.faiss",
                                                       "stats.json"]
    assert [p.name for p in saved.parent.iterdir()] == ["m"]  # no temp folder left beside it

    back = GalleryIndex.load(saved)
    np.testing.assert_array_equal(back.gallery.ids, gallery.ids)
    assert back.gallery.ids.dtype == np.int64
    assert back.gallery.meta == gallery.meta
    assert back.stats == json.loads(json.dumps(idx.stats))
    np.testing.assert_array_equal(back.embeddings, emb)
    q = emb[:50]
    for a, b in zip(idx.search(q, 10, exclude_ids=gallery.ids[:50]), back.search(q, 10, exclude_ids=gallery.ids[:50])):
        np.testing.assert_array_equal(a, b)

    # Saving again replaces the folder as a whole; a foreign folder is never replaced.
    back.stats["note"] = "second"
    back.save(saved)
    assert json.loads((saved / "stats.json").read_text())["note"] == "second"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_text("precious")
    with pytest.raises(FileExistsError, match="not a saved index"):
        idx.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.docx").read_text() == "precious"
    with pytest.raises(FileNotFoundError, match="03_build_index"):
        GalleryIndex.load(tmp_path / "mine")


# --------------------------------------------------------------------------- evaluation


def test_neighbour_agreement_by_hand():
    # Points on a line: every point's 2 nearest (by cosine, after an offset) are its two neighbours on the line.
    angles = torch.linspace(0, 1.2, 6)
    line = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    assert neighbour_agreement(line, line, k=2) == 1.0
    assert neighbour_agreement(line, line * 3.0, k=2) == 1.0  # only the ranking counts
    # Reversing the order of the points maps each one's neighbours onto other indices.
    flipped = line.flip(0)
    a = torch.tensor([[1, 2], [0, 2], [1, 3], [2, 4], [3, 5], [3, 4]])
    b = (5 - a.flip(0))  # the neighbour lists of the flipped points, in the original indices
    expected = np.mean([len(set(x.tolist()) & set(y.tolist())) / 2 for x, y in zip(a, b)])
    assert neighbour_agreement(line, flipped, k=2) == pytest.approx(expected)
    with pytest.raises(ValueError, match="reference rows"):
        neighbour_agreement(line, line[:3])


def test_evaluate_index_matches_hand_computed_metrics():
    # Points on a circle: cosine order = angular order, so every ranking is known by hand.
    angles = np.deg2rad([0, 10, 30, 65, 110, 205])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    gallery = _toy_gallery(6, labels=["a", "a", "a", "b", "b", "c"], products=["p1", "p1", "p2", "p3", "p3", ""])
    idx = GalleryIndex.build(emb, gallery, kind="flat")
    # Neighbours (self excluded): 0→[1,2,3] 1→[0,2,3] 2→[1,0,3] 3→[2,4,1] 4→[3,2,5] 5→[4,3,0]
    _, rows = idx.search(emb, 3, exclude_ids=gallery.ids)
    assert rows.tolist() == [[1, 2, 3], [0, 2, 3], [1, 0, 3], [2, 4, 1], [3, 2, 5], [4, 3, 0]]

    ev = evaluate_index(idx, k=3, ks=(1, 3))
    cat = ev["label"]
    assert cat["n_queries"] == 5  # "c" has no other item
    assert cat["p@3"] == pytest.approx(8 / 15)
    assert cat["map@3"] == pytest.approx((1 + 1 + 1 + 0.5 + 1) / 5)
    assert cat["r@1"] == pytest.approx(4 / 5) and cat["r@3"] == pytest.approx(1.0)
    prod = ev["product_id"]
    assert prod["n_queries"] == 4  # p2 is alone, item 5 has no product id
    assert prod["p@3"] == pytest.approx(1 / 3)
    assert prod["map@3"] == pytest.approx(3.5 / 4)
    assert prod["r@1"] == pytest.approx(3 / 4) and prod["r@3"] == pytest.approx(1.0)
    assert ev["per_label"]["a"]["p@3"] == pytest.approx(2 / 3)
    assert ev["per_label"]["b"]["map@3"] == pytest.approx(0.75)
    assert ev["per_label"]["c"]["n_queries"] == 0
    assert ev["k"] == 3 and ev["n_gallery"] == 6

    # Product ids that no two images share: that field is left out, not reported as 0.
    unique = _toy_gallery(6, labels=["a"] * 6, products=[f"p{i}" for i in range(6)])
    assert "product_id" not in evaluate_index(GalleryIndex.build(emb, unique, kind="flat"), k=3)


def test_chance_p_at_k_by_hand_and_by_random_rankings():
    # a, a, b, b, b: each "a" has 1 of 4 others alike, each "b" 2 of 4 → (2 × 1/4 + 3 × 2/4) / 5 = 0.4.
    assert chance_p_at_k(["a", "a", "b", "b", "b"]) == pytest.approx(0.4)
    assert chance_p_at_k(["a", "a", "b", "b", "b"], k=1) == pytest.approx(0.4)  # k does not change it
    # A label no other item has, or none at all, is not a query (as in evaluate_index) but is in the gallery.
    assert chance_p_at_k(["a", "a", "c", ""]) == pytest.approx(1 / 3)
    # The mean P@k of random rankings (leave-one-out) converges to it.
    labels = np.array(list("aaaabbbbbbcccccccccccd"))
    rng = np.random.default_rng(0)
    k, trials, hits = 10, 400, []
    for _ in range(trials):
        for q in range(len(labels)):
            if (labels == labels[q]).sum() < 2:
                continue
            others = rng.permutation(np.delete(np.arange(len(labels)), q))[:k]
            hits.append((labels[others] == labels[q]).mean())
    assert np.mean(hits) == pytest.approx(chance_p_at_k(labels.tolist(), k=k), abs=0.01)
    for bad in ([], ["a"], ["a", "b"]):
        with pytest.raises(ValueError):
            chance_p_at_k(bad)


# --------------------------------------------------------------------------- galleries and embedding


def test_gallery_from_split_reads_labels_and_lmdb(data_dir):
    gallery = gallery_from_split(data_dir, "test")
    rows = read_labels(data_dir, "test")
    assert len(gallery) == len(rows) == 120
    assert gallery.ids.tolist() == [r["image_id"] for r in rows]
    m = gallery.meta[0]
    assert m["caption"] == rows[0]["text"] and m["label"] == rows[0]["label"] and m["split"] == "test"
    assert m["image"] is None and Path(gallery.lmdb_dir).name == "test"
    img = gallery.image(5)
    assert img.mode == "RGB" and max(img.size) <= 128
    assert gallery.row_of(int(gallery.ids[7])) == 7
    with pytest.raises(KeyError, match="not in the gallery"):
        gallery.row_of(-5)
    from cnclip_kd.data.dataset import DataError
    with pytest.raises(DataError, match="prepared"):
        gallery_from_split(data_dir, "nosuch")


def test_gallery_from_source_skips_broken_images(photo_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="cnclip_kd.retrieval.gallery"):
        gallery = gallery_from_source(photo_folder)
    assert len(gallery) == 20
    assert "broken.jpg" in caplog.text
    assert sorted(set(gallery.column("label"))) == ["blue", "红色"]
    assert all(Path(m["image"]).is_file() for m in gallery.meta)
    assert gallery.image(0).size == (40, 30)


def test_a_file_gallery_records_its_image_roots_through_save_and_load(photo_folder, tmp_path):
    gallery = gallery_from_source(photo_folder)
    assert gallery.image_roots == (str(photo_folder.resolve()),)  # the service serves files from under it only
    emb = _unit(np.random.default_rng(0).standard_normal((len(gallery), 8)).astype(np.float32))
    GalleryIndex.build(emb, gallery, kind="flat").save(tmp_path / "idx")
    assert GalleryIndex.load(tmp_path / "idx").gallery.image_roots == gallery.image_roots

    # A manifest that names a photo outside its own folder records that photo's folder too.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / "x.jpg"
    Image.new("RGB", (32, 32), "red").save(outside)
    manifest = photo_folder / "manifest.csv"
    inside = next(photo_folder.glob("*/00.jpg"))
    manifest.write_text(f"image,text,label\n{inside.relative_to(photo_folder)},红色上衣,a\n{outside},外面,b\n",
                        encoding="utf-8")
    assert gallery_from_source(manifest).image_roots == tuple(sorted([str(photo_folder.resolve()),
                                                                      str(elsewhere.resolve())]))


def test_embedding_resumes_after_an_interruption(photo_folder, tmp_path):
    gallery = gallery_from_source(photo_folder)  # 20 images: chunks of 8, 8, 4 at batch 4 → 2 + 2 + 1 calls
    reference = embed_gallery(CountingEncoder(), gallery, tmp_path / "ref", batch_size=4, chunk_size=8)
    assert reference.shape == (20, 12) and reference.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, rtol=1e-5)

    out = tmp_path / "emb"
    interrupted = CountingEncoder(fail_on_call=3)  # dies on the first batch of chunk 2
    with pytest.raises(KeyboardInterrupt):
        embed_gallery(interrupted, gallery, out, batch_size=4, chunk_size=8)
    chunk_dirs = list(out.glob("chunks-*"))
    assert len(chunk_dirs) == 1 and [p.name for p in chunk_dirs[0].iterdir()] == ["chunk-00000.npy"]
    assert not (out / "embeddings.npy").exists()

    resumed = CountingEncoder()
    emb = embed_gallery(resumed, gallery, out, batch_size=4, chunk_size=8)
    assert resumed.calls == 3  # only chunks 2 and 3
    np.testing.assert_allclose(emb, reference, rtol=1e-6)
    assert (out / "embeddings.npy").is_file() and not list(out.glob("chunks-*"))

    again = CountingEncoder()
    np.testing.assert_array_equal(embed_gallery(again, gallery, out, batch_size=4, chunk_size=8), emb)
    assert again.calls == 0  # finished embeddings are reused

    other = CountingEncoder(fingerprint="another-model")
    embed_gallery(other, gallery, out, batch_size=4, chunk_size=8)
    assert other.calls == 5  # a different model never reuses them
    assert json.loads((out / "embeddings.json").read_text())["encoder_fingerprint"] == "another-model"


def test_load_encoder_kinds(checkpoint, runs, photo_folder):
    enc = load_encoder(checkpoint, device="cpu")
    assert enc.dim == 32 and enc.info["role"].startswith("fine-tuned") and enc.device.type == "cpu"
    images = [Image.new("RGB", (50, 40), (i * 20, 100, 50)) for i in range(5)]
    feats = enc.encode_pil(images, batch_size=2)
    assert feats.shape == (5, 32) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)

    kd = load_encoder(runs / "runs" / "tiny-kd-cosine" / "checkpoints" / "epoch_latest.pt", device="cpu")
    assert kd.info["role"] == "distilled 蒸馏 (cosine)" and kd.info["teacher"] == "random:preset:tiny"
    assert kd.fingerprint() != enc.fingerprint()
    assert load_encoder(checkpoint, device="cpu").fingerprint() == enc.fingerprint()

    teacher = load_encoder("teacher:random:preset:tiny", device="cpu")
    assert teacher.info["role"].startswith("teacher") and teacher.dim == 32
    np.testing.assert_allclose(np.linalg.norm(teacher.encode_pil(images), axis=1), 1.0, rtol=1e-5)

    with pytest.raises(ModelLoadError, match="not a model"):
        load_encoder(photo_folder / "nothing.pt")


def test_build_saved_index_fixture(checkpoint, data_dir, tmp_path):
    saved = GalleryIndex.load(build_saved_index(checkpoint, data_dir, tmp_path / "index" / "tiny"))
    assert len(saved) == 120 and saved.stats["model"]["role"].startswith("fine-tuned")
    assert saved.embeddings.shape == (120, 32) and saved.gallery.image(0).mode == "RGB"


def test_discover_and_latest_checkpoint(runs, tmp_path):
    specs = discover_models(runs)
    # The students, then the teacher the distilled one learnt from (read from its checkpoint), once.
    assert list(specs) == ["tiny-finetune", "tiny-kd-cosine", "random-preset-tiny"]
    assert specs["random-preset-tiny"] == "teacher:random:preset:tiny"
    assert latest_checkpoint(runs).parent.parent.name == "tiny-kd-cosine"  # trained last
    with pytest.raises(FileNotFoundError, match="02_distill"):
        latest_checkpoint(tmp_path)


def test_compare_models_writes_the_table(runs, data_dir, tmp_path):
    gallery = gallery_from_split(data_dir, "test")
    specs = discover_models(runs)
    rows = compare_models(specs, gallery, tmp_path / "index", device="cpu")
    assert [r["model"] for r in rows] == ["tiny-finetune", "tiny-kd-cosine", "random-preset-tiny"]
    for r in rows:
        assert r["n"] == 120 and r["n_queries"] == 120 and r["index"] == "flat"
        for key in ("p@10", "map@10", "r@1", "r@5", "r@10"):
            assert 0.0 <= r[key] <= 1.0
        assert r["r@1"] <= r["r@5"] <= r["r@10"]
        loaded = GalleryIndex.load(tmp_path / "index" / r["model"])
        assert len(loaded) == 120 and loaded.stats["eval"]["label"]["p@10"] == r["p@10"]
    table = json.loads((tmp_path / "index" / "comparison.json").read_text(encoding="utf-8"))
    assert table["rows"] == rows and table["gallery"]["n"] == 120
    csv_text = (tmp_path / "index" / "comparison.csv").read_text(encoding="utf-8-sig")
    assert csv_text.splitlines()[0].startswith("model,role,spec") and "蒸馏" in csv_text


# --------------------------------------------------------------------------- figure


def test_top10_figure_layout_and_frames(tmp_path):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    results = [{"image": Image.new("RGB", (60, 40), colours[i % 3]), "score": 0.9 - i / 100,
                "caption": f"连衣裙 第{i + 1}名", "label": ["dress", "hat", None][i % 3]} for i in range(10)]
    fig = viz.top10_figure(Image.new("RGB", (50, 50), "white"), "查询的连衣裙", results, title="模型 A",
                           query_label="dress")
    image_axes = [ax for ax in fig.axes if ax.images]
    assert len(image_axes) == 11
    by_gid = {ax.get_gid(): ax for ax in image_axes}
    assert set(by_gid) == {"query"} | {f"top-{i}" for i in range(1, 11)}
    # The query top-left; Top-1..5 to its right in the first row, Top-6..10 in the second.
    pos = {g: (ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for g, ax in by_gid.items()}
    assert pos["query"] == (0, 0)
    assert [pos[f"top-{i}"] for i in range(1, 11)] == [(r, c) for r in (0, 1) for c in range(1, 6)]
    expected = {0: viz.HIT_COLOR, 1: viz.MISS_COLOR, 2: viz.UNKNOWN_COLOR}
    for i in range(10):
        ax = by_gid[f"top-{i + 1}"]
        assert to_rgba(ax.spines["top"].get_edgecolor()) == to_rgba(expected[i % 3])
        assert f"{results[i]['score']:.3f}" in ax.get_title()
        assert ax.get_xlabel().startswith("连衣裙")
    assert "同类" in by_gid["top-1"].get_title() and "异类" in by_gid["top-2"].get_title()
    path = viz.save_figure(fig, tmp_path / "figures" / "top10.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] > 200

    # Without a query category every frame is grey.
    fig = viz.top10_figure(Image.new("RGB", (50, 50)), None, results[:3])
    assert {to_rgba(ax.spines["top"].get_edgecolor()) for ax in fig.axes if ax.get_gid() != "query" and ax.images} \
        == {to_rgba(viz.UNKNOWN_COLOR)}
    with pytest.raises(ValueError, match="at most 10"):
        viz.top10_figure(Image.new("RGB", (5, 5)), None, results + results[:1])


# --------------------------------------------------------------------------- CLI


def test_cli_index_and_eval(checkpoint, data_dir, tmp_path, capsys):
    out = tmp_path / "index" / "tiny"
    assert cli_main(["index", str(checkpoint), str(out), "--data", str(data_dir), "--split", "test",
                     "--kind", "hnsw"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "hnsw" and summary["n"] == 120 and 0.0 <= summary["recall@10"] <= 1.0
    assert 0.0 <= summary["eval"]["label"]["p@10"] <= 1.0
    assert GalleryIndex.load(out).stats["model"]["spec"] == str(checkpoint.resolve())
    assert summary["text_eval"]["n_images"] == 120 and 0.0 <= summary["text_eval"]["t2i"]["r@10"] <= 1.0

    plain = tmp_path / "index" / "no-text"
    assert cli_main(["index", str(checkpoint), str(plain), "--data", str(data_dir), "--no-text"]) == 0
    assert json.loads(capsys.readouterr().out)["text_eval"] is None and not (plain / "texts.jsonl").exists()

    assert cli_main(["eval", str(out), "--out", str(tmp_path / "table")]) == 0
    text = capsys.readouterr().out
    assert "| tiny | fine-tuned 微调 | hnsw | 120 |" in text
    assert (tmp_path / "table" / "comparison.csv").is_file()

    assert cli_main(["eval", str(tmp_path / "missing")]) == 2
    assert cli_main(["index", str(tmp_path / "nope.pt"), str(out), "--data", str(data_dir)]) == 2
