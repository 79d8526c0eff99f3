"""The HTTP search service (cnclip_kd/deploy/serve.py, `cnclip-kd serve`): good queries, bad and hostile input,
limits, the bounded queue, index hot swap, metrics, the query and admin keys, confined reloads, gallery-only
images; in-process (FastAPI's TestClient) and as a real server process queried over 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from badinputs import sample_photo, write_small_bomb_png
from demo_fixtures import build_saved_index
from fastapi.testclient import TestClient
from PIL import Image

from cnclip_kd.deploy.serve import SERVE_ENV, app_from_env, create_app, sniff_image_type, unguarded_write_routes

MAX_BODY = 1024 * 1024  # small limits keep the hostile cases cheap
MAX_PIXELS = 1_000_000
API_KEY = "s3cret-key"
ADMIN_KEY = "adm1n-s3cret"
ADMIN = {"X-API-Key": ADMIN_KEY}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(onnx_towers) -> dict:
    """The tiny student's image and text towers in ONNX (fp32; shared, read-only)."""
    return onnx_towers


@pytest.fixture(scope="module")
def indexes(checkpoint, data_dir, tmp_path_factory) -> dict:
    """Two good indexes of the same model (test and valid splits) and two broken folders."""
    root = tmp_path_factory.mktemp("serve-index")
    test = build_saved_index(checkpoint, data_dir, root / "test")
    valid = build_saved_index(checkpoint, data_dir, root / "valid", split="valid")
    empty = root / "empty"
    empty.mkdir()
    corrupt = shutil.copytree(test, root / "corrupt")
    (corrupt / "index.faiss").write_bytes(b"not a faiss index")
    other_model = shutil.copytree(test, root / "other-model")
    stats = json.loads((other_model / "stats.json").read_text(encoding="utf-8"))
    stats["model"]["fingerprint"] = "0123456789abcdef"  # built with some other model: not comparable
    (other_model / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    return {"test": test, "valid": valid, "empty": empty, "corrupt": corrupt, "other_model": other_model}


@pytest.fixture(scope="module")
def app(indexes, models):
    return create_app(indexes["test"], models["image"], models["text"], api_key=API_KEY, admin_key=ADMIN_KEY,
                      max_body_bytes=MAX_BODY, max_pixels=MAX_PIXELS, request_timeout_s=20, threads=1, pool_size=2)


@pytest.fixture
def client(app):
    with TestClient(app, raise_server_exceptions=False, headers={"X-API-Key": API_KEY}) as c:
        yield c


@pytest.fixture(scope="module")
def photo() -> bytes:
    return sample_photo(0).read_bytes()


def _error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return body


def _good_image_query(client, photo: bytes) -> dict:
    response = client.post("/search?k=3", content=photo, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["k"] == 3 and body["n"] == 3 and len(body["results"]) == 3
    return body


# --------------------------------------------------------------------------- good queries


def test_import_does_not_load_torch():
    code = "import sys, cnclip_kd.deploy.serve, fastapi, uvicorn; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_image_query_raw_and_multipart(client, photo):
    body = _good_image_query(client, photo)
    top = body["results"][0]
    assert {"id", "score", "rank", "image_url"} <= set(top) and top["rank"] == 1 and "image" not in top
    assert set(body["timings_ms"]) == {"decode", "encode", "search", "total"}
    assert body["index_version"]
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    multi = client.post("/search", data={"k": "3"}, files={"image": ("q.jpg", photo, "image/jpeg")})
    assert multi.status_code == 200, multi.text
    assert [r["id"] for r in multi.json()["results"]] == [r["id"] for r in body["results"]]


def test_text_query(client, photo):
    for response in (client.post("/search", params={"q": "白色连衣裙", "k": 5}),
                     client.post("/search", json={"q": "白色连衣裙", "k": 5}),
                     client.post("/search", data={"q": "白色连衣裙", "k": "5"})):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["n"] == 5 and body["query"]["text"] == "白色连衣裙" and not body["query"]["truncated"]
    _good_image_query(client, photo)


def test_gallery_image_by_id(client, photo):
    top = _good_image_query(client, photo)["results"][0]
    assert top["image_url"] == f"/images/{top['id']}"
    response = client.get(top["image_url"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg" and sniff_image_type(response.content) == "jpeg"
    Image.open(io.BytesIO(response.content)).verify()


def test_healthz_and_openapi(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["index_size"] > 0 and body["image_model"] == "onnx-fp32"
    assert body["text_model"] == "onnx-text-fp32"
    assert "/search" in client.get("/openapi.json").json()["paths"]


# --------------------------------------------------------------------------- bad and hostile input


def test_truncated_jpeg(client, photo):
    _error(client.post("/search", content=photo[: len(photo) // 2]), 400, "bad_image")
    _good_image_query(client, photo)


def test_zero_bytes(client, photo):
    _error(client.post("/search", content=b"", headers={"Content-Type": "image/jpeg"}), 400, "empty_query")
    _error(client.post("/search", files={"image": ("empty.jpg", b"", "image/jpeg")}), 400, "empty_query")
    _good_image_query(client, photo)


def test_text_named_jpg(client, photo):
    text = ("这不是图片 this is not an image\n" * 20).encode("utf-8")
    _error(client.post("/search", files={"image": ("photo.jpg", text, "image/jpeg")}), 415, "unsupported_type")
    _error(client.post("/search", content=text, headers={"Content-Type": "image/jpeg"}), 415, "unsupported_type")
    _good_image_query(client, photo)


def _png_header_bomb(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width × height`` pixels, with one tiny IDAT: nothing to decode."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_decompression_bombs(client, photo, tmp_path):
    # 10 Gpx declared (over PIL's own limit) and 4 Mpx of real PNG (over this server's 1 Mpx).
    _error(client.post("/search", content=_png_header_bomb(100_000, 100_000)), 413, "too_many_pixels")
    small = write_small_bomb_png(tmp_path / "bomb.png").read_bytes()
    assert len(small) < MAX_BODY
    _error(client.post("/search", content=small), 413, "too_many_pixels")
    _good_image_query(client, photo)


def test_body_over_the_limit_declared(client, photo):
    big = b"\xff\xd8\xff" + bytes(MAX_BODY + 10)
    _error(client.post("/search", content=big), 413, "too_large")
    _error(client.post("/search", files={"image": ("big.jpg", big, "image/jpeg")}), 413, "too_large")
    _good_image_query(client, photo)


def test_streamed_body_is_refused_before_it_is_read_whole(app, client, photo):
    """A chunked body without Content-Length: counted as it arrives, refused past the limit, rest unread."""
    chunk, n_chunks = 64 * 1024, 50 * 16  # 50 MB offered
    sent = {"n": 0}
    messages: list = []

    async def receive():
        if sent["n"] >= n_chunks:
            return {"type": "http.disconnect"}
        sent["n"] += 1
        return {"type": "http.request", "body": b"\xff\xd8\xff" + bytes(chunk - 3), "more_body": sent["n"] < n_chunks}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/search", "raw_path": b"/search", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"x-api-key", API_KEY.encode()),
                         (b"content-type", b"application/octet-stream"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1234), "server": ("testserver", 80)}
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 60))
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    assert start["status"] == 413 and json.loads(body)["error"]["code"] == "too_large"
    assert sent["n"] <= MAX_BODY // chunk + 2, f"read {sent['n']} of {n_chunks} chunks before refusing"
    _good_image_query(client, photo)


def test_declared_type_does_not_matter_the_bytes_do(client, photo):
    png = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(png, format="PNG")
    ok = client.post("/search?k=2", content=png.getvalue(), headers={"Content-Type": "text/plain"})
    assert ok.status_code == 200, ok.text
    _error(client.post("/search", content=b"%PDF-1.4\n...", headers={"Content-Type": "application/pdf"}),
           415, "unsupported_type")
    _error(client.post("/search", content=photo, headers={"Content-Type": "application/json"}), 400, "bad_request")
    # curl --data-binary @photo.jpg sends a form's type: the bytes decide.
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
    assert client.post("/search?k=2", content=photo, headers=form_type).status_code == 200
    assert client.post("/search", content="q=连衣裙&k=2".encode(), headers=form_type).json()["n"] == 2
    _error(client.post("/search", content=b"\x00\xff" * 100, headers=form_type), 415, "unsupported_type")
    _good_image_query(client, photo)


@pytest.mark.parametrize("k", ["0", "-1", str(10 ** 6), "abc", "1.5"])
def test_bad_k(client, photo, k):
    _error(client.post(f"/search?k={k}", content=photo), 400, "bad_k")
    _error(client.post("/search", params={"q": "连衣裙", "k": k}), 400, "bad_k")
    _good_image_query(client, photo)


def test_unknown_and_path_like_image_ids(client, photo):
    _error(client.get("/images/999999999"), 404, "not_found")
    _error(client.get("/images/-1"), 404, "not_found")
    for path in ("/images/..%2F..%2Fetc%2Fpasswd", "/images/../../etc/passwd", "/images/%2e%2e%2fstats.json",
                 "/images/1%00", "/images/%D9%A3"):  # the last: an Arabic-Indic digit, not an ASCII id
        response = client.get(path)
        assert response.status_code in (404, 422), (path, response.status_code)
        assert response.json()["error"]["code"] in ("not_found", "bad_request")
        assert b"root:" not in response.content
    _good_image_query(client, photo)


def test_empty_and_ambiguous_text_queries(client, photo):
    _error(client.post("/search", params={"q": ""}), 400, "empty_query")
    _error(client.post("/search", params={"q": "  \t "}), 400, "empty_query")
    _error(client.post("/search", json={"q": 42}), 400, "bad_query")
    _error(client.post("/search", json=["q"]), 400, "bad_request")
    _error(client.post("/search?q=连衣裙", content=photo), 400, "ambiguous_query")
    _error(client.post("/search", json={"q": "长" * 5000}), 400, "bad_query")
    _good_image_query(client, photo)


def test_text_query_on_an_image_only_server(indexes, models, photo):
    app = create_app(indexes["test"], models["image"], threads=1, pool_size=1)
    with TestClient(app, raise_server_exceptions=False) as client:
        _error(client.post("/search", params={"q": "白色连衣裙"}), 400, "no_text_tower")
        _good_image_query(client, photo)
        assert client.get("/healthz").json()["text_model"] is None


def test_api_key(app, client, photo):
    bare = TestClient(app, raise_server_exceptions=False)  # no default key header
    for headers in ({}, {"X-API-Key": ""}, {"X-API-Key": "wrong"}, {"X-API-Key": API_KEY + "x"},
                    {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        _error(bare.post("/search", content=photo, headers=headers), 401, "unauthorized")
        _error(bare.get("/images/1", headers=headers), 401, "unauthorized")
        _error(bare.post("/admin/reload", headers=headers), 401, "unauthorized")
    for headers in ({"X-API-Key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}):  # a query key is no admin key
        _error(bare.post("/admin/reload", headers=headers), 401, "unauthorized")
    ok = bare.post("/search?k=1", content=photo, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200, ok.text
    assert bare.get("/healthz").status_code == 200 and bare.get("/metrics").status_code == 200  # probes need no key
    _good_image_query(client, photo)


def test_unknown_route_and_method(client, photo):
    _error(client.get("/nope"), 404, "not_found")
    _error(client.get("/search"), 405, "method_not_allowed")
    _good_image_query(client, photo)


# --------------------------------------------------------------------------- queue, timeout


def test_full_queue_answers_busy_with_retry_after(indexes, models, photo):
    app = create_app(indexes["test"], models["image"], threads=1, pool_size=1, max_queue=1, request_timeout_s=30)
    service = app.state.service
    gate = threading.Event()
    original = service.search_image

    def blocked(*args):
        gate.wait(30)  # holds the only slot until the test lets go
        return original(*args)

    service.search_image = blocked
    with TestClient(app, raise_server_exceptions=False) as client:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(r=client.post("/search?k=1", content=photo)))
        worker.start()
        try:
            for _ in range(600):  # bounded: up to 30 s for the first query to take its slot
                if service.in_flight == 1:
                    break
                time.sleep(0.05)
            assert service.in_flight == 1
            busy = client.post("/search?k=1", content=photo)
            _error(busy, 503, "busy")
            assert busy.headers["Retry-After"] == "1"
        finally:
            gate.set()
            worker.join(60)
        assert first["r"].status_code == 200
        service.search_image = original
        _good_image_query(client, photo)
        metrics = client.get("/metrics").text
        assert 'cnclip_requests_total{endpoint="/search",outcome="busy"} 1.0' in metrics


def test_slow_query_times_out(indexes, models, photo):
    app = create_app(indexes["test"], models["image"], threads=1, pool_size=1, request_timeout_s=1.0)
    service = app.state.service
    original = service.search_image
    service.search_image = lambda *args: (time.sleep(3), original(*args))[1]
    with TestClient(app, raise_server_exceptions=False) as client:
        _error(client.post("/search", content=photo), 504, "timeout")
        service.search_image = original
        for _ in range(600):  # the slow one holds the only pool thread until it ends (bounded wait)
            if service.in_flight == 0:
                break
            time.sleep(0.05)
        _good_image_query(client, photo)


# --------------------------------------------------------------------------- hot swap and metrics


def test_reload_good_and_broken_indexes(app, client, indexes, photo):
    service = app.state.service
    before = client.get("/healthz").json()
    try:
        swapped = client.post("/admin/reload", json={"index_dir": str(indexes["valid"])}, headers=ADMIN)
        assert swapped.status_code == 200, swapped.text
        assert swapped.json()["previous"]["index_version"] == before["index_version"]
        valid_version = swapped.json()["index_version"]
        assert valid_version != before["index_version"]
        assert _good_image_query(client, photo)["index_version"] == valid_version
        valid_ids = set(service.current.retriever.index.gallery.ids.tolist())
        assert {r["id"] for r in _good_image_query(client, photo)["results"]} <= valid_ids

        for broken in ("empty", "corrupt", "other_model"):
            refused = client.post("/admin/reload", params={"index_dir": str(indexes[broken])}, headers=ADMIN)
            body = _error(refused, 422, "bad_index")
            assert valid_version in body["error"]["message"]
            assert client.get("/healthz").json()["index_version"] == valid_version  # old one keeps serving
            assert _good_image_query(client, photo)["index_version"] == valid_version
        _error(client.post("/admin/reload", params={"index_dir": str(indexes["test"] / "nope")}, headers=ADMIN),
               422, "bad_index")
    finally:
        back = client.post("/admin/reload", json={"index_dir": str(indexes["test"])}, headers=ADMIN)
        assert back.status_code == 200, back.text
    assert client.get("/healthz").json()["index_version"] == before["index_version"]
    metrics = client.get("/metrics").text
    assert 'cnclip_index_reloads_total{outcome="refused"} 4.0' in metrics, metrics
    info = [line for line in metrics.splitlines() if line.startswith("cnclip_index_info{")]
    assert len(info) == 1 and info[0].endswith(" 1.0"), info
    assert f'version="{before["index_version"]}"' in info[0] and f'index_dir="{indexes["test"].resolve()}"' in info[0]


def test_reload_during_load_fails_no_request(app, client, indexes, photo):
    """Queries from two threads while the index is swapped back and forth: every one answers 200."""
    statuses: list = []
    stop = threading.Event()

    def hammer():
        for _ in range(200):  # bounded
            if stop.is_set():
                break
            statuses.append(client.post("/search?k=2", content=photo).status_code)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for target in ("valid", "test", "valid", "test"):
            response = client.post("/admin/reload", json={"index_dir": str(indexes[target])}, headers=ADMIN)
            assert response.status_code == 200, response.text
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert statuses and set(statuses) == {200}, statuses
    assert client.get("/healthz").json()["index_dir"] == str(indexes["test"].resolve())


def test_reload_same_folder_by_default(app, client, photo):
    version = client.get("/healthz").json()["index_version"]
    response = client.post("/admin/reload", headers=ADMIN)
    assert response.status_code == 200 and response.json()["index_version"] == version
    _good_image_query(client, photo)


def test_metrics(indexes, models, photo):
    app = create_app(indexes["test"], models["image"], models["text"], threads=1, pool_size=1)
    with TestClient(app, raise_server_exceptions=False) as client:
        _good_image_query(client, photo)
        _good_image_query(client, photo)
        client.post("/search", params={"q": "连衣裙"})
        client.post("/search?k=0", content=photo)
        client.post("/search", content=b"hello")
        client.get("/images/abc")
        response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    n = len(app.state.service.current.retriever.index)
    for line in ('cnclip_requests_total{endpoint="/search",outcome="ok"} 3.0',
                 'cnclip_requests_total{endpoint="/search",outcome="bad_k"} 1.0',
                 'cnclip_requests_total{endpoint="/search",outcome="unsupported_type"} 1.0',
                 'cnclip_requests_total{endpoint="/images",outcome="not_found"} 1.0',
                 'cnclip_request_seconds_count{endpoint="/search"} 5.0',
                 f"cnclip_index_size {float(n)}", "cnclip_queue_limit 4.0", "cnclip_queries_in_flight 0.0"):
        assert line in text, line
    assert "cnclip_index_info{" in text


# --------------------------------------------------------------------------- the real server process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw_http(port: int, request: bytes, *, body_chunks=(), timeout: float = 30) -> bytes:
    """Send a raw request on a socket, then read the whole response (server closes or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        for part in body_chunks:
            if select.select([sock], [], [], 0)[0]:  # the server already answered: stop sending
                break
            sock.sendall(part)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                piece = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not piece:
                break
            data += piece
            if b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")]
                if length and len(rest) >= length[0]:
                    break
        return data


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (uvicorn's graceful stop), then SIGKILL if it does not end within 30 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        proc.wait(30)


def _key_file(path: Path, key: str) -> Path:
    path.write_text(key + "\n", encoding="utf-8")
    path.chmod(0o600)  # readable by this user only: no warning
    return path


def _spawn_server(args: list, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`cnclip-kd serve ARGS --port <free>` as a child process, once its /healthz answers 200: (process, base url)."""
    port = _free_port()
    with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "cnclip_kd.cli", "serve", *map(str, args), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "server did not start in 120 s"
            try:
                if httpx.get(base + "/healthz", timeout=5).status_code == 200:
                    return proc, base
            except httpx.TransportError:
                pass
            time.sleep(0.25)
    except BaseException:
        _stop(proc)
        raise


@pytest.fixture(scope="module")
def server(indexes, models, tmp_path_factory):
    """`cnclip-kd serve` (query and admin keys) as a child process on a free 127.0.0.1 port; stopped (SIGTERM,
    then SIGKILL) after."""
    tmp = tmp_path_factory.mktemp("serve-proc")
    args = ["--index", indexes["test"], "--model", models["image"], "--text-model", models["text"], "--threads", "1",
            "--pool", "2", "--max-body-mb", MAX_BODY / 2 ** 20, "--max-pixels", MAX_PIXELS, "--timeout", "60",
            "--body-timeout", "3", "--api-key-file", _key_file(tmp / "api.key", API_KEY),
            "--admin-key-file", _key_file(tmp / "admin.key", ADMIN_KEY)]
    proc, base = _spawn_server(args, tmp / "server.log")
    try:
        yield {"base": base, "port": int(base.rsplit(":", 1)[1]), "proc": proc, "log": tmp / "server.log"}
    finally:
        _stop(proc)


@pytest.mark.slow
def test_real_server_good_and_bad_requests(server, indexes, photo):
    base, port = server["base"], server["port"]
    headers = {"X-API-Key": API_KEY}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
        def good():
            r = http.post("/search?k=3", content=photo)
            assert r.status_code == 200, r.text
            assert len(r.json()["results"]) == 3

        good()
        text = http.post("/search", params={"q": "白色连衣裙", "k": 2})
        assert text.status_code == 200 and text.json()["n"] == 2
        cases = [
            (http.post("/search", content=photo[: len(photo) // 2]), 400, "bad_image"),
            (http.post("/search", content=b""), 400, "empty_query"),
            (http.post("/search", files={"image": ("x.jpg", b"not an image" * 10, "image/jpeg")}), 415,
             "unsupported_type"),
            (http.post("/search", content=_png_header_bomb(100_000, 100_000)), 413, "too_many_pixels"),
            (http.post("/search?k=0", content=photo), 400, "bad_k"),
            (http.post("/search?k=-1", content=photo), 400, "bad_k"),
            (http.post(f"/search?k={10 ** 6}", content=photo), 400, "bad_k"),
            (http.get("/images/999999999"), 404, "not_found"),
            (http.post("/search", content=photo, headers={"X-API-Key": "nope"}), 401, "unauthorized"),
            (http.post("/admin/reload", params={"index_dir": str(indexes["test"].parent / "nonexistent")},
                       headers=ADMIN), 422, "bad_index"),
            (http.post("/admin/reload", params={"index_dir": "/nonexistent"}, headers=ADMIN), 403, "forbidden_path"),
            (http.post("/admin/reload", params={"index_dir": str(indexes["valid"])}), 401, "unauthorized"),
        ]
        for response, status, code in cases:
            _error(response, status, code)
            good()
        # A literal path-like id, not normalised by a client.
        raw = _raw_http(port, b"GET /images/../../etc/passwd HTTP/1.1\r\nHost: x\r\nX-API-Key: " + API_KEY.encode()
                        + b"\r\nConnection: close\r\n\r\n")
        assert raw.split(b" ")[1] in (b"404", b"422") and b"root:" not in raw and b'"not_found"' in raw
        good()
        # 50 MB declared: refused from the headers alone, before one byte of the body is sent.
        raw = _raw_http(port, b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nX-API-Key: "
                        + API_KEY.encode() + b"\r\nContent-Length: 52428800\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 413") and b'"too_large"' in raw, raw[:300]
        good()
        assert "cnclip_requests_total" in http.get("/metrics").text
    maps = Path(f"/proc/{server['proc'].pid}/maps")
    if maps.exists():  # Linux: the serving process never loaded torch
        assert "libtorch" not in maps.read_text(errors="replace")


@pytest.mark.slow
def test_real_server_slow_client_times_out_others_unaffected(server, photo):
    """A client sending its body a byte at a time, then stalling, gets 408 at the 3 s body limit; a good
    query meanwhile answers. (It stops sending before the limit, so no byte races the server's close.)"""
    port = server["port"]
    result: dict = {}

    def slow():
        head = (b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nX-API-Key: " + API_KEY.encode()
                + b"\r\nContent-Length: 1000\r\n\r\n")
        result["raw"] = _raw_http(port, head, body_chunks=(bytes([b]) for b in photo[:20]
                                                           if time.sleep(0.05) is None), timeout=30)

    thread = threading.Thread(target=slow)
    t0 = time.monotonic()
    thread.start()
    try:
        time.sleep(0.5)
        with httpx.Client(base_url=server["base"], headers={"X-API-Key": API_KEY}, timeout=30) as http:
            r = http.post("/search?k=2", content=photo)
            assert r.status_code == 200, r.text
    finally:
        thread.join(60)
    assert result["raw"].startswith(b"HTTP/1.1 408"), result["raw"][:300]
    assert b'"timeout"' in result["raw"] and time.monotonic() - t0 < 30
    with httpx.Client(base_url=server["base"], headers={"X-API-Key": API_KEY}, timeout=30) as http:
        assert http.post("/search?k=2", content=photo).status_code == 200


@pytest.mark.slow
def test_real_server_sighup_reloads(server, photo):
    with httpx.Client(base_url=server["base"], headers={"X-API-Key": API_KEY}, timeout=30) as http:
        server["proc"].send_signal(signal.SIGHUP)
        line = 'cnclip_index_reloads_total{outcome="ok"} 1.0'
        for _ in range(200):  # bounded: up to ~20 s
            if line in http.get("/metrics").text:
                break
            time.sleep(0.1)
        assert line in http.get("/metrics").text, server["log"].read_text(errors="replace")[-2000:]
        assert http.post("/search?k=2", content=photo).status_code == 200
        assert server["proc"].poll() is None


def _spawned_workers(parent: int) -> set:
    """Live worker processes of uvicorn's supervisor ``parent`` (multiprocessing spawn children; not its
    resource tracker, not zombies)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # the process ended meanwhile
        if int(fields[1]) == parent and fields[0] != "Z" and b"spawn_main" in cmdline:
            found.add(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_real_server_survives_a_killed_worker(indexes, models, photo, tmp_path):
    """--workers 2: one worker killed with SIGKILL; the other keeps answering and uvicorn starts a new one."""
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "cnclip_kd.cli", "serve", "--index", str(indexes["test"]),
                             "--model", models["image"], "--port", str(port), "--threads", "1", "--workers", "2"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def good() -> int:
        # A fresh connection each time: never one that the killed worker held.
        with httpx.Client(base_url=base, timeout=30) as http:
            r = http.post("/search?k=2", content=photo)
            assert r.status_code == 200, r.text
            return http.get("/healthz").json()["pid"]

    try:
        deadline = time.monotonic() + 120
        pids: set = set()
        while len(pids) < 2:  # both workers up (each answers some connections)
            assert proc.poll() is None, (tmp_path / "server.log").read_text(errors="replace")
            assert time.monotonic() < deadline, f"workers seen: {pids}"
            try:
                with httpx.Client(base_url=base, timeout=10) as http:
                    response = http.get("/healthz")
                    if response.status_code == 200:
                        pids.add(response.json()["pid"])
            except httpx.TransportError:
                time.sleep(0.25)
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        for _ in range(200):  # bounded: until the kernel has ended it (a zombie accepts nothing)
            if victim not in _spawned_workers(proc.pid):
                break
            time.sleep(0.05)
        for _ in range(10):
            assert good() != victim
        for _ in range(240):  # bounded: uvicorn's supervisor replaces the dead worker
            workers = _spawned_workers(proc.pid)
            if len(workers) == 2 and victim not in workers:
                break
            time.sleep(0.25)
        assert len(workers) == 2 and victim not in workers, workers
        good()
    finally:
        _stop(proc)
        log.close()


@pytest.mark.slow
def test_serve_load_benchmark_quick_mode(tmp_path):
    out = tmp_path / "load.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_load.py"
    proc = subprocess.run([sys.executable, str(script), "--preset", "tiny", "--gallery", "300", "--duration", "1",
                           "--clients", "1,2", "--queries", "1", "--work-dir", str(tmp_path / "work"),
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert [r["clients"] for r in report["closed_loop"]] == [1, 2]
    assert all(r["ok"] > 0 and r["p99"] >= r["p50"] > 0 for r in report["closed_loop"])
    assert report["open_loop"]["ok"] > 0 and report["verdicts"]["other_5xx"] == 0
    assert "| 客户端 clients |" in report["markdown"]


# --------------------------------------------------------------------------- in a notebook


def test_background_server_answers_and_stops(indexes, models, photo):
    from cnclip_kd.deploy.serve import BackgroundServer

    with BackgroundServer(indexes["test"], models["image"], models["text"], threads=1) as server:
        assert server.url.startswith("http://127.0.0.1:")
        status, health = server.request("/healthz")
        assert status == 200 and health["status"] == "ok"
        status, reply = server.request("/search", body=photo, params={"k": 5})
        assert status == 200 and len(reply["results"]) == 5
        status, reply = server.request("/search", params={"q": "连衣裙", "k": 3})
        assert status == 200 and len(reply["results"]) == 3 and reply["query"]["text"] == "连衣裙"
        status, reply = server.request("/search", params={"q": "  "})
        assert status == 400 and reply["error"]["code"] == "empty_query"
        url = server.url
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.URLError):  # stopped: the port no longer answers
        urllib.request.urlopen(url + "/healthz", timeout=5)


@pytest.mark.slow
def test_real_server_reload_under_load_fails_no_request(server, indexes, photo):
    """Three clients query the real server while the index is swapped to another folder, a broken one is
    refused, and the first one comes back: every query answers 200."""
    from concurrent.futures import ThreadPoolExecutor

    headers = {"X-API-Key": API_KEY}
    stop = time.monotonic() + 4  # bounded in time and count

    def client_loop() -> list:
        codes = []
        with httpx.Client(base_url=server["base"], headers=headers, timeout=60) as http:
            while time.monotonic() < stop and len(codes) < 200:
                codes.append(http.post("/search?k=3", content=photo).status_code)
        return codes

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client_loop) for _ in range(3)]
        with httpx.Client(base_url=server["base"], headers=ADMIN, timeout=60) as admin:
            time.sleep(0.5)
            swapped = admin.post("/admin/reload", params={"index_dir": str(indexes["valid"])})
            broken = admin.post("/admin/reload", params={"index_dir": str(indexes["corrupt"])})
            back = admin.post("/admin/reload", params={"index_dir": str(indexes["test"])})
        codes = [c for f in futures for c in f.result()]
    assert swapped.status_code == 200 and back.status_code == 200, (swapped.text, back.text)
    _error(broken, 422, "bad_index")
    assert len(codes) >= 3 and set(codes) == {200}, sorted(set(codes))


# --------------------------------------------------------------------------- two keys, confined reloads, gallery images


@pytest.fixture(scope="module")
def file_gallery(indexes, tmp_path_factory) -> dict:
    """An index whose gallery reads files (not an LMDB) under one recorded image root, with rows that name a
    file outside it, a text file inside it, a symlink inside it that leads outside and a `..` path out of it.
    The index folder sits under the other indexes' folder (the default index root)."""
    from cnclip_kd.retrieval.gallery import Gallery

    index_dir = shutil.copytree(indexes["test"], indexes["test"].parent / "file-gallery")
    record = json.loads((index_dir / "gallery.json").read_text(encoding="utf-8"))
    ids = np.load(index_dir / "ids.npy")
    lmdb = Gallery.from_json(record, ids, base=index_dir)
    tmp = tmp_path_factory.mktemp("file-gallery")
    photos, outside = tmp / "photos", tmp / "outside"
    (photos / "shop").mkdir(parents=True)
    outside.mkdir()
    rows = list(record["meta"])
    for row, image_id in enumerate(ids.tolist()):
        path = photos / "shop" / f"{image_id}.jpg"
        path.write_bytes(lmdb.image_bytes(row))
        rows[row]["image"] = str(path)
    secret = outside / "secret.jpg"
    secret.write_bytes(lmdb.image_bytes(0))  # a real JPEG: only where it lies refuses it
    notes = photos / "shop" / "notes.jpg"
    notes.write_text("这不是图片 not an image\n" * 20, encoding="utf-8")
    link = photos / "shop" / "link.jpg"
    link.symlink_to(secret)
    cases = dict(zip(("good", "outside", "text", "symlink", "dotdot"), ids[:5].tolist()))
    rows[1]["image"] = str(secret)
    rows[2]["image"] = str(notes)
    rows[3]["image"] = str(link)
    rows[4]["image"] = f"{photos}/shop/../../outside/secret.jpg"
    record.update(lmdb_dir=None, meta=rows, image_roots=[str(photos)])
    record.pop("lmdb_dir_rel", None)
    (index_dir / "gallery.json").write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    return {"index": index_dir, "ids": cases, "photos": photos, "secret": secret}


def _write_routes(app) -> list[tuple[str, str]]:
    """``(method, path)`` of every route that may change the service (anything but GET and the POST query);
    a path parameter (``/items/{item_id}``) is given the value 1."""
    import re

    return [(method, re.sub(r"\{[^}]+\}", "1", route.path)) for route in app.routes
            for method in sorted(set(getattr(route, "methods", None) or ()) - {"GET", "HEAD"})
            if route.path != "/search"]


def test_admin_disabled_without_an_admin_key(indexes, models, photo):
    app = create_app(indexes["test"], models["image"], api_key=API_KEY, threads=1, pool_size=1)
    writes = _write_routes(app)
    assert {("POST", "/admin/reload"), ("POST", "/items"), ("DELETE", "/items/1")} <= set(writes)
    with TestClient(app, raise_server_exceptions=False) as client:
        version = client.get("/healthz").json()["index_version"]
        for method, path in writes:
            for headers in ({}, {"X-API-Key": API_KEY}, {"X-API-Key": ADMIN_KEY}, {"Authorization": "Bearer x"}):
                response = client.request(method, path, params={"index_dir": str(indexes["valid"])}, headers=headers)
                body = _error(response, 403, "admin_disabled")
                assert API_KEY not in json.dumps(body)
        health = client.get("/healthz").json()
        assert health["admin_enabled"] is False and health["index_version"] == version  # nothing was loaded
        assert client.post("/search?k=1", content=photo, headers={"X-API-Key": API_KEY}).status_code == 200
        _error(client.post("/search?k=1", content=photo), 401, "unauthorized")  # the query key still guards
    open_app = create_app(service=app.state.service)  # no key at all: queries open, admin still off
    with TestClient(open_app, raise_server_exceptions=False) as client:
        assert client.post("/search?k=1", content=photo).status_code == 200
        _error(client.post("/admin/reload"), 403, "admin_disabled")


def test_admin_key_may_query_and_keys_stay_secret(client, photo):
    health = client.get("/healthz").json()
    assert health["admin_enabled"] is True
    assert API_KEY not in json.dumps(health) and ADMIN_KEY not in json.dumps(health)
    top = _good_image_query(client, photo)["results"][0]
    as_admin = client.post("/search?k=3", content=photo, headers=ADMIN)
    assert as_admin.status_code == 200 and as_admin.json()["results"][0]["id"] == top["id"]
    assert client.get(top["image_url"], headers=ADMIN).status_code == 200
    for response in (client.post("/admin/reload", headers={"X-API-Key": API_KEY}),
                     client.post("/admin/reload", headers={"X-API-Key": ADMIN_KEY + "x"}),
                     client.post("/search", content=photo, headers={"X-API-Key": API_KEY[:-1]})):
        _error(response, 401, "unauthorized")
        assert API_KEY not in response.text and ADMIN_KEY not in response.text


def test_one_key_for_both_roles_is_refused():
    with pytest.raises(ValueError, match="differ"):
        create_app("never-loaded", api_key=API_KEY, admin_key=API_KEY)


def test_every_write_route_needs_the_admin_key(indexes, models):
    from fastapi import APIRouter

    from cnclip_kd.deploy.serve import add_admin_route

    app = create_app(indexes["test"], models["image"], threads=1, pool_size=1)
    assert unguarded_write_routes(app) == []

    async def write():
        return {}

    add_admin_route(app, "/admin/forget", write, methods=["POST", "DELETE"])  # the way to add one: guarded
    assert unguarded_write_routes(app) == []
    with TestClient(app, raise_server_exceptions=False) as client:
        _error(client.post("/admin/forget"), 403, "admin_disabled")
        _error(client.delete("/admin/forget"), 403, "admin_disabled")
    app.router.add_api_route("/forget", write, methods=["PUT"])  # added around the guard
    assert unguarded_write_routes(app) == ["PUT /forget"]
    app.router.routes.pop()
    router = APIRouter()
    router.add_api_route("/x", write, methods=["POST"])
    app.include_router(router)  # a route the check cannot see into counts as unguarded
    assert len(unguarded_write_routes(app)) == 1


def test_reload_escapes_are_forbidden(app, client, indexes, photo, tmp_path):
    root = indexes["test"].parent
    elsewhere = shutil.copytree(indexes["valid"], tmp_path / "elsewhere")  # a good index outside the root
    escape_link = root / "escape-link"
    escape_link.symlink_to(elsewhere, target_is_directory=True)
    alias = root / "valid-alias"
    alias.symlink_to(indexes["valid"], target_is_directory=True)  # a symlink that stays inside
    before = client.get("/healthz").json()["index_version"]
    escapes = ["../../etc", "/etc", str(elsewhere), str(escape_link),
               f"{root}/test/../../{tmp_path.name}/elsewhere", f"{root}/{'../' * 20}etc", str(root.parent)]
    metric = 'cnclip_index_reloads_total{outcome="forbidden"}'
    forbidden_before = next((float(line.split()[-1]) for line in client.get("/metrics").text.splitlines()
                             if line.startswith(metric)), 0.0)
    try:
        for target in escapes:
            body = _error(client.post("/admin/reload", json={"index_dir": target}, headers=ADMIN), 403,
                          "forbidden_path")
            assert str(elsewhere) not in body["error"]["message"]
            assert client.get("/healthz").json()["index_version"] == before  # the old index keeps serving
            assert _good_image_query(client, photo)["index_version"] == before
        for bad in (42, ["/etc"], ""):
            _error(client.post("/admin/reload", json={"index_dir": bad}, headers=ADMIN), 400, "bad_request")
        inside = client.post("/admin/reload", json={"index_dir": str(alias)}, headers=ADMIN)
        assert inside.status_code == 200, inside.text
        assert inside.json()["index_dir"] == str(indexes["valid"].resolve())
    finally:
        escape_link.unlink()
        alias.unlink()
        back = client.post("/admin/reload", json={"index_dir": str(indexes["test"])}, headers=ADMIN)
        assert back.status_code == 200, back.text
    metrics = client.get("/metrics").text
    assert f"{metric} {forbidden_before + len(escapes)}" in metrics


def test_explicit_index_root(indexes, models, tmp_path):
    root = tmp_path / "indexes"
    v2 = shutil.copytree(indexes["valid"], root / "v2")
    app = create_app(indexes["test"], models["image"], admin_key=ADMIN_KEY, index_root=root, threads=1, pool_size=1)
    assert app.state.service.index_root == root.resolve()
    with TestClient(app, raise_server_exceptions=False, headers=ADMIN) as client:
        ok = client.post("/admin/reload", params={"index_dir": str(v2)})
        assert ok.status_code == 200 and ok.json()["index_dir"] == str(v2.resolve()), ok.text
        # A sibling of the served folder is outside this root; the served folder itself always reloads.
        _error(client.post("/admin/reload", params={"index_dir": str(indexes["valid"])}), 403, "forbidden_path")
        assert client.get("/healthz").json()["index_dir"] == str(v2.resolve())
        back = client.post("/admin/reload", params={"index_dir": str(indexes["test"])})
        assert back.status_code == 200 and back.json()["index_dir"] == str(indexes["test"].resolve()), back.text


def test_images_only_from_the_gallery(file_gallery, models, caplog):
    app = create_app(file_gallery["index"], models["image"], threads=1, pool_size=1)
    ids = file_gallery["ids"]
    assert app.state.service.current.image_roots == (file_gallery["photos"].resolve(),)
    caplog.set_level(logging.WARNING, logger="cnclip_kd.deploy.service")
    with TestClient(app, raise_server_exceptions=False) as client:
        good = client.get(f"/images/{ids['good']}")
        assert good.status_code == 200 and good.headers["content-type"] == "image/jpeg"
        Image.open(io.BytesIO(good.content)).verify()
        for _ in range(2):  # asked twice, logged once
            for case in ("outside", "text", "symlink", "dotdot"):
                response = client.get(f"/images/{ids[case]}")
                _error(response, 404, "not_found")
                assert str(file_gallery["secret"]) not in response.text and "outside" not in response.text
    refusals = [r.getMessage() for r in caplog.records if "not served" in r.getMessage()]
    assert len(refusals) == 4, refusals
    by_id = {case: next(m for m in refusals if f"image id {ids[case]} " in m) for case in ids if case != "good"}
    for case in ("outside", "symlink", "dotdot"):
        assert "outside the gallery's image roots" in by_id[case], by_id[case]
    assert str(file_gallery["secret"]) in by_id["outside"]
    assert "not a JPEG, PNG" in by_id["text"]


def test_lmdb_image_missing_is_404_logged_once(indexes, models, caplog):
    index_dir = shutil.copytree(indexes["test"], indexes["test"].parent / "lmdb-missing")
    ids = np.load(index_dir / "ids.npy")
    ids[0] = 10 ** 9  # indexed, but not in the LMDB
    np.save(index_dir / "ids.npy", ids)
    app = create_app(index_dir, models["image"], threads=1, pool_size=1)
    caplog.set_level(logging.WARNING, logger="cnclip_kd.deploy.service")
    with TestClient(app, raise_server_exceptions=False) as client:
        for _ in range(2):
            _error(client.get(f"/images/{10 ** 9}"), 404, "not_found")
        good = client.get(f"/images/{int(ids[1])}")
        assert good.status_code == 200 and sniff_image_type(good.content) == "jpeg"
    refusals = [r.getMessage() for r in caplog.records if "not served" in r.getMessage()]
    assert len(refusals) == 1 and "LMDB" in refusals[0], refusals


def test_gallery_without_recorded_roots(tmp_path, caplog):
    from cnclip_kd.deploy.service import gallery_image_roots
    from cnclip_kd.retrieval.gallery import Gallery

    shop = tmp_path / "photos" / "shop"
    (shop / "a").mkdir(parents=True)
    (shop / "b").mkdir()

    def gallery(*paths):
        return Gallery(ids=np.arange(len(paths)), meta=[{"id": i, "image": str(p)} for i, p in enumerate(paths)])

    caplog.set_level(logging.WARNING, logger="cnclip_kd.deploy.service")
    assert gallery_image_roots(gallery(shop / "a" / "1.jpg", shop / "b" / "2.jpg")) == (shop.resolve(),)
    assert "records no image roots" in caplog.text
    assert gallery_image_roots(gallery(shop / "a" / "1.jpg"), ["../elsewhere"], base=shop) == (
        (tmp_path / "photos" / "elsewhere").resolve(),)
    assert gallery_image_roots(gallery(shop / "a" / "1.jpg", Path("/etc/passwd"))) == ()  # only "/" in common
    lmdb = Gallery(ids=np.arange(1), meta=[{"id": 0, "image": None}], lmdb_dir=str(tmp_path))
    assert gallery_image_roots(lmdb, [str(tmp_path)]) == ()  # an LMDB gallery serves from its LMDB only


def test_exposure_and_key_file_warnings(tmp_path, caplog):
    from cnclip_kd.deploy.service import (
        AccessKeys,
        is_loopback,
        read_key_file,
        warn_exposure,
    )

    caplog.set_level(logging.INFO, logger="cnclip_kd.deploy.service")
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.com"))
    open_keys, query_only = AccessKeys.of(), AccessKeys.of(API_KEY)
    assert warn_exposure("127.0.0.1", open_keys) == [] and warn_exposure("0.0.0.0", query_only) == []
    warnings = warn_exposure("0.0.0.0", open_keys)
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0] and "without a query key" in warnings[0]
    assert "admin endpoints off" in caplog.text
    caplog.clear()
    loose = tmp_path / "loose.key"
    loose.write_text(f"  {ADMIN_KEY}\n", encoding="utf-8")
    loose.chmod(0o644)
    assert read_key_file(loose, "admin") == ADMIN_KEY
    assert "readable by other users" in caplog.text and str(loose) in caplog.text
    caplog.clear()
    assert read_key_file(_key_file(tmp_path / "tight.key", API_KEY)) == API_KEY
    assert caplog.text == ""
    (tmp_path / "empty.key").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        read_key_file(tmp_path / "empty.key")
    assert repr(AccessKeys.of(API_KEY, ADMIN_KEY)) == "AccessKeys()"  # a logged object never shows a key
    assert ADMIN_KEY not in caplog.text and API_KEY not in caplog.text


def test_cli_and_worker_env_carry_the_new_settings(indexes, models, photo, tmp_path, monkeypatch, caplog):
    import uvicorn

    from cnclip_kd import cli

    api_file, admin_file = _key_file(tmp_path / "api.key", API_KEY), _key_file(tmp_path / "admin.key", ADMIN_KEY)
    caplog.set_level(logging.INFO)
    # The same key for both roles: refused before anything loads.
    assert cli.main(["serve", "--index", str(indexes["test"]), "--model", models["image"],
                     "--api-key-file", str(api_file), "--admin-key-file", str(api_file)]) == 2
    monkeypatch.setenv(SERVE_ENV, "")
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda target, **kw: ran.update(target=target, **kw))
    root = tmp_path / "root"
    shutil.copytree(indexes["valid"], root / "v2")
    assert cli.main(["serve", "--index", str(indexes["test"]), "--model", models["image"], "--workers", "2",
                     "--threads", "1", "--pool", "1", "--host", "0.0.0.0", "--index-root", str(root),
                     "--api-key-file", str(api_file), "--admin-key-file", str(admin_file)]) == 0
    assert ran["target"] == "cnclip_kd.deploy.serve:app_from_env" and ran["host"] == "0.0.0.0"
    env = os.environ[SERVE_ENV]
    assert API_KEY not in env and ADMIN_KEY not in env  # the keys travel as their files' paths
    config = json.loads(env)
    assert config["api_key_file"] == str(api_file) and config["index_root"] == str(root)
    assert API_KEY not in caplog.text and ADMIN_KEY not in caplog.text
    app = app_from_env()
    assert app.state.service.index_root == root.resolve()
    with TestClient(app, raise_server_exceptions=False) as client:
        _error(client.post("/search?k=1", content=photo), 401, "unauthorized")
        assert client.post("/search?k=1", content=photo, headers={"X-API-Key": API_KEY}).status_code == 200
        _error(client.post("/admin/reload", params={"index_dir": str(root / "v2")}, headers={"X-API-Key": API_KEY}),
               401, "unauthorized")
        _error(client.post("/admin/reload", params={"index_dir": str(indexes["valid"])}, headers=ADMIN), 403,
               "forbidden_path")
        assert client.post("/admin/reload", params={"index_dir": str(root / "v2")}, headers=ADMIN).status_code == 200
        assert client.get("/healthz").json()["admin_enabled"] is True


def test_background_server_with_two_keys(indexes, models, photo):
    from cnclip_kd.deploy.serve import BackgroundServer

    with BackgroundServer(indexes["test"], models["image"], threads=1, api_key=API_KEY,
                          admin_key=ADMIN_KEY) as server:
        status, reply = server.request("/search", body=photo, params={"k": 2}, key=API_KEY)
        assert status == 200 and len(reply["results"]) == 2
        assert server.request("/search", body=photo)[1]["error"]["code"] == "unauthorized"
        status, reply = server.request("/admin/reload", key=API_KEY)
        assert status == 401 and reply["error"]["code"] == "unauthorized"
        status, reply = server.request("/admin/reload", params={"index_dir": str(indexes["valid"])}, key=ADMIN_KEY)
        assert status == 200 and reply["index_dir"] == str(indexes["valid"].resolve())


@pytest.mark.slow
def test_real_server_admin_key_confined_reloads_and_gallery_images(server, indexes, models, file_gallery, photo,
                                                                   tmp_path):
    """Issue #22 on real `cnclip-kd serve` processes: without an admin key reloads answer 403 admin_disabled;
    with one, a reload under the root works and every escape is 403 while the old index keeps serving;
    /images of a file outside the gallery, or of a non-image inside it, is 404."""
    log_path = tmp_path / "no-admin.log"
    proc, base = _spawn_server(["--index", file_gallery["index"], "--model", models["image"], "--threads", "1",
                                "--pool", "1", "--api-key-file", _key_file(tmp_path / "api.key", API_KEY)], log_path)
    try:
        with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=30) as http:
            assert http.get("/healthz").json()["admin_enabled"] is False
            for headers in ({}, {"X-API-Key": API_KEY}, ADMIN):
                _error(http.post("/admin/reload", params={"index_dir": str(indexes["valid"])}, headers=headers),
                       403, "admin_disabled")
                _error(http.post("/admin/reload", headers=headers), 403, "admin_disabled")
            ids = file_gallery["ids"]
            good = http.get(f"/images/{ids['good']}")
            assert good.status_code == 200 and sniff_image_type(good.content) == "jpeg"
            for case in ("outside", "text", "symlink", "dotdot"):
                _error(http.get(f"/images/{ids[case]}"), 404, "not_found")
            assert http.post("/search?k=2", content=photo).status_code == 200
    finally:
        _stop(proc)
    log = log_path.read_text(errors="replace")
    assert "admin endpoints off" in log and API_KEY not in log
    assert log.count("not served") == 4 and "outside the gallery's image roots" in log

    root = indexes["test"].parent
    elsewhere = shutil.copytree(indexes["valid"], tmp_path / "elsewhere")
    escape_link = root / "escape-link-real"
    escape_link.symlink_to(elsewhere, target_is_directory=True)
    try:
        with httpx.Client(base_url=server["base"], headers=ADMIN, timeout=60) as admin:
            before = admin.get("/healthz").json()
            assert before["admin_enabled"] is True
            escapes = ("../../etc", str(elsewhere), str(escape_link), f"{root}/test/../../{tmp_path.name}/elsewhere")
            for target in escapes:
                _error(admin.post("/admin/reload", json={"index_dir": target}), 403, "forbidden_path")
                assert admin.get("/healthz").json()["index_version"] == before["index_version"]
                query = admin.post("/search?k=2", content=photo)
                assert query.status_code == 200 and query.json()["index_version"] == before["index_version"]
            swapped = admin.post("/admin/reload", json={"index_dir": str(indexes["valid"])})
            assert swapped.status_code == 200, swapped.text
            assert swapped.json()["index_version"] != before["index_version"]
            back = admin.post("/admin/reload", json={"index_dir": str(indexes["test"])})
            assert back.status_code == 200 and back.json()["index_version"] == before["index_version"]
    finally:
        escape_link.unlink()
    log = server["log"].read_text(errors="replace")
    assert API_KEY not in log and ADMIN_KEY not in log
