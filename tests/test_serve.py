"""The HTTP search service (cnclip_kd/serve.py, `cnclip-kd serve`): good queries, bad and hostile input,
limits, the bounded queue, index hot swap, metrics; in-process (FastAPI's TestClient) and as a real
server process queried over 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
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
import pytest
from badinputs import sample_photo, write_small_bomb_png
from demo_fixtures import build_saved_index
from fastapi.testclient import TestClient
from PIL import Image

from cnclip_kd.deploy.serve import create_app, sniff_image_type

MAX_BODY = 1024 * 1024  # small limits keep the hostile cases cheap
MAX_PIXELS = 1_000_000
API_KEY = "s3cret-key"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models(checkpoint, tmp_path_factory) -> dict:
    """The tiny student's image and text towers exported to ONNX (fp32)."""
    from cnclip_kd.deploy.export import export_onnx, export_text_onnx

    out = tmp_path_factory.mktemp("serve-models")
    image = export_onnx(checkpoint, out / "image_encoder.onnx", quantize=False, max_images=8, threads=1)["onnx"]
    text = export_text_onnx(checkpoint, out / "text_encoder.onnx", quantize=False, max_images=8, threads=1)["onnx"]
    return {"image": str(image), "text": str(text)}


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
    return create_app(indexes["test"], models["image"], models["text"], api_key=API_KEY, max_body_bytes=MAX_BODY,
                      max_pixels=MAX_PIXELS, request_timeout_s=20, threads=1, pool_size=2)


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
        swapped = client.post("/admin/reload", json={"index_dir": str(indexes["valid"])})
        assert swapped.status_code == 200, swapped.text
        assert swapped.json()["previous"]["index_version"] == before["index_version"]
        valid_version = swapped.json()["index_version"]
        assert valid_version != before["index_version"]
        assert _good_image_query(client, photo)["index_version"] == valid_version
        valid_ids = set(service.current.retriever.index.gallery.ids.tolist())
        assert {r["id"] for r in _good_image_query(client, photo)["results"]} <= valid_ids

        for broken in ("empty", "corrupt", "other_model"):
            refused = client.post("/admin/reload", params={"index_dir": str(indexes[broken])})
            body = _error(refused, 422, "bad_index")
            assert valid_version in body["error"]["message"]
            assert client.get("/healthz").json()["index_version"] == valid_version  # old one keeps serving
            assert _good_image_query(client, photo)["index_version"] == valid_version
        _error(client.post("/admin/reload", params={"index_dir": str(indexes["test"] / "nope")}), 422, "bad_index")
    finally:
        back = client.post("/admin/reload", json={"index_dir": str(indexes["test"])})
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
            response = client.post("/admin/reload", json={"index_dir": str(indexes[target])})
            assert response.status_code == 200, response.text
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert statuses and set(statuses) == {200}, statuses
    assert client.get("/healthz").json()["index_dir"] == str(indexes["test"].resolve())


def test_reload_same_folder_by_default(app, client, photo):
    version = client.get("/healthz").json()["index_version"]
    response = client.post("/admin/reload")
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


@pytest.fixture(scope="module")
def server(indexes, models, tmp_path_factory):
    """`cnclip-kd serve` as a child process on a free 127.0.0.1 port; stopped (SIGTERM, then SIGKILL) after."""
    tmp = tmp_path_factory.mktemp("serve-proc")
    key_file = tmp / "api.key"
    key_file.write_text(API_KEY + "\n", encoding="utf-8")
    port = _free_port()
    log = open(tmp / "server.log", "wb")
    cmd = [sys.executable, "-m", "cnclip_kd.cli", "serve", "--index", str(indexes["test"]), "--model",
           models["image"], "--text-model", models["text"], "--port", str(port), "--threads", "1", "--pool", "2",
           "--max-body-mb", str(MAX_BODY / 2 ** 20), "--max-pixels", str(MAX_PIXELS), "--timeout", "60",
           "--body-timeout", "3",
           "--api-key-file", str(key_file)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text(errors="replace")
            assert time.monotonic() < deadline, "server did not start in 120 s"
            try:
                if httpx.get(base + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        yield {"base": base, "port": port, "proc": proc, "log": tmp / "server.log"}
    finally:
        _stop(proc)
        log.close()


@pytest.mark.slow
def test_real_server_good_and_bad_requests(server, photo):
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
            (http.post("/admin/reload", params={"index_dir": "/nonexistent"}), 422, "bad_index"),
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
        with httpx.Client(base_url=server["base"], headers=headers, timeout=60) as admin:
            time.sleep(0.5)
            swapped = admin.post("/admin/reload", params={"index_dir": str(indexes["valid"])})
            broken = admin.post("/admin/reload", params={"index_dir": str(indexes["corrupt"])})
            back = admin.post("/admin/reload", params={"index_dir": str(indexes["test"])})
        codes = [c for f in futures for c in f.result()]
    assert swapped.status_code == 200 and back.status_code == 200, (swapped.text, back.text)
    _error(broken, 422, "bad_index")
    assert len(codes) >= 3 and set(codes) == {200}, sorted(set(codes))
