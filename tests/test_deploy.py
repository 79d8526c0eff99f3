"""CPU deployment: ONNX export (fp32 / int8) checked against PyTorch, the Retriever, query decoding, CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image, ImageFile

from cnclip_kd import SAMPLE_DATA
from cnclip_kd.cli import main as cli_main
from cnclip_kd.deploy.backends import OnnxEncoder, TorchEncoder, load_query_image, make_encoder, to_pixels
from cnclip_kd.deploy.runtime import Retriever
from cnclip_kd.deploy.latency import latency_markdown, measure_latency
from cnclip_kd.deploy.export import ExportError, export_onnx
from cnclip_kd.core.images import BadImageError, encode_jpeg, load_image
from cnclip_kd.retrieval.encoders import load_encoder
from cnclip_kd.retrieval.index import GalleryIndex
from cnclip_kd.models.students import image_transform
from cnclip_kd.deploy.quantize import int8_path
from demo_fixtures import build_saved_index

PHOTO = sorted((SAMPLE_DATA / "images").glob("*/*.jpg"))[0]


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory) -> dict:
    """fp32 + int8 export of the tiny student, checked on 120 sample photos."""
    out = tmp_path_factory.mktemp("deploy") / "image_encoder.onnx"
    return export_onnx(checkpoint, out, quantize=True, max_images=120, threads=1)


@pytest.fixture(scope="module")
def index_dir(checkpoint, data_dir, tmp_path_factory) -> Path:
    return build_saved_index(checkpoint, data_dir, tmp_path_factory.mktemp("deploy-index") / "tiny-finetune")


@pytest.fixture
def restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _jpeg(size=(1920, 1080), quality=90) -> bytes:
    return encode_jpeg(load_image(PHOTO).resize(size, Image.BICUBIC), quality)


# --------------------------------------------------------------------------- preprocessing and decoding


def test_to_pixels_is_the_training_transform():
    img = load_image(PHOTO)
    assert img.size[0] != img.size[1]
    for r in (32, 224):
        ours = to_pixels(img, r)
        assert ours.shape == (3, r, r) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, image_transform(r)(img).numpy(), atol=1e-5)


def test_draft_decode_shrinks_jpegs_but_not_below_the_resolution():
    data = _jpeg((1920, 1080))
    full = load_query_image(data)
    small = load_query_image(data, draft_size=224)
    assert full.size == (1920, 1080)
    assert small.mode == "RGB" and small.size == (480, 270)  # DCT scale 1/4: both sides still ≥ 224
    assert load_query_image(data, draft_size=2000).size == (1920, 1080)
    png = io.BytesIO()
    load_image(PHOTO).resize((800, 600)).save(png, format="PNG")
    assert load_query_image(png.getvalue(), draft_size=64).size == (800, 600)  # not a JPEG: full decode


def test_draft_decode_applies_exif_orientation():
    img = load_image(PHOTO).resize((1600, 800))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (800, 1600)
    assert load_query_image(buf.getvalue(), draft_size=100).size == (100, 200)  # DCT scale 1/8, then rotated


BAD_INPUTS = {
    "text": "这不是图片 not an image".encode(),
    "empty": b"",
    "truncated": None,  # filled in below from a real JPEG
}


@pytest.mark.parametrize("draft_size", [None, 32])
@pytest.mark.parametrize("what", sorted(BAD_INPUTS))
def test_bad_query_bytes_raise_bad_image_error(what, draft_size, monkeypatch):
    data = BAD_INPUTS[what] if what != "truncated" else _jpeg((800, 800))[:5000]
    # Some libraries turn on PIL's LOAD_TRUNCATED_IMAGES at import; a truncated upload must still fail.
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(BadImageError) as err:
        load_query_image(data, draft_size=draft_size)
    assert err.value.source == "<bytes>"
    assert {"text": "not an image", "empty": "empty", "truncated": "truncated"}[what] in err.value.reason


def test_missing_query_file_is_a_bad_image(tmp_path):
    with pytest.raises(BadImageError, match="file not found"):
        load_query_image(tmp_path / "nope.jpg", draft_size=64)


# --------------------------------------------------------------------------- export


def test_export_matches_torch_with_normalisation_inside(exported, checkpoint):
    out = Path(exported["onnx"])
    assert out.is_file() and exported["opset"] >= 14
    assert exported["fp32"]["cosine_min"] >= 0.999 and exported["n_images"] == 120
    assert exported["l2_normalized"] and exported["dynamic_batch"]
    # The saved report is the returned one.
    assert json.loads(Path(exported["report"]).read_text(encoding="utf-8")) == exported
    assert Path(exported["report"]).name == "image_encoder.report.json"

    enc = load_encoder(checkpoint, device="cpu", precision="fp32")
    onnx_enc = OnnxEncoder(out, threads=1)
    assert (onnx_enc.resolution, onnx_enc.dim, onnx_enc.precision) == (32, enc.dim, "fp32")
    assert onnx_enc.fingerprint == enc.fingerprint()  # so a Retriever can check it against the index
    model = onnx.load(str(out))
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch" and not batch_dim.HasField("dim_value")

    photos = [load_image(p) for p in sorted((SAMPLE_DATA / "images").glob("*/*.jpg"))[:7]]
    pixels = np.stack([to_pixels(p, 32) for p in photos])
    ref = enc.encode(torch.from_numpy(pixels)).numpy()
    for batch in (1, 3, 7):  # dynamic batch axis
        got = onnx_enc.encode(pixels[:batch])
        assert got.shape == (batch, enc.dim)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised in the graph
        assert ((got * ref[:batch]).sum(1) >= 0.999).all()


def test_int8_is_close_and_reports_its_cost(exported):
    q = exported["int8"]
    assert q["kept"] and Path(q["path"]) == int8_path(exported["onnx"]) and Path(q["path"]).is_file()
    assert q["path"].endswith("image_encoder.int8.onnx")
    assert q["cosine_mean"] >= 0.99 and q["cosine_min"] > 0.95
    assert q["mb"] < exported["fp32"]["mb"]
    for key in ("p@10", "map@10", "encode_ms", "p@10_drop"):
        assert q[key] is not None
    assert 0.0 <= q["p@10"] <= 1.0 and q["p@10_drop"] == pytest.approx(exported["fp32"]["p@10"] - q["p@10"], abs=1e-4)
    assert exported["fp32"]["p@10"] == pytest.approx(exported["torch"]["p@10"], abs=0.01)
    enc = OnnxEncoder(q["path"])
    assert enc.precision == "int8" and enc.name == "onnx-int8"
    # The method kept (the fastest within tolerance) is what the file holds: MatMulInteger for dynamic int8,
    # QuantizeLinear / DequantizeLinear pairs for static QDQ.
    ops = {n.op_type for n in onnx.load(q["path"]).graph.node}
    assert q["method"] in ("dynamic", "static") and enc.int8_method == q["method"]
    assert ("MatMulInteger" in ops) == (q["method"] == "dynamic") and ("QuantizeLinear" in ops) == (q["method"] == "static")


def test_export_without_int8_removes_a_stale_one(checkpoint, tmp_path):
    out = tmp_path / "enc.onnx"
    int8_path(out).write_bytes(b"old int8 of another model")
    report = export_onnx(checkpoint, out, quantize=False, max_images=30)
    assert out.is_file() and "int8" not in report and not int8_path(out).exists()


def test_export_fails_loudly_and_writes_nothing_when_onnx_disagrees(checkpoint, tmp_path, monkeypatch):
    def wrong(self, pixels):
        return np.random.default_rng(0).normal(size=(len(pixels), self.dim)).astype(np.float32)

    monkeypatch.setattr(OnnxEncoder, "encode", wrong)
    out = tmp_path / "enc.onnx"
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_onnx(checkpoint, out, max_images=20)
    assert list(tmp_path.iterdir()) == []  # no model, no report, no temp files


def test_export_refuses_old_opsets(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="opset 13 < 14"):
        export_onnx(checkpoint, tmp_path / "enc.onnx", opset=13)


def test_export_accepts_a_model_object(tmp_path):
    from cnclip_kd.models.students import load_student

    model, _ = load_student(None, preset="tiny")
    report = export_onnx(model, tmp_path / "m.onnx", quantize=False, max_images=20)
    assert report["fp32"]["cosine_min"] >= 0.999 and report["fingerprint"] is None


# --------------------------------------------------------------------------- retriever


@pytest.mark.parametrize("encoder", ["onnx", "checkpoint"])
def test_retriever_equals_the_index_own_search(index_dir, exported, encoder):
    index = GalleryIndex.load(index_dir)
    retriever = Retriever.load(index_dir, exported["onnx"] if encoder == "onnx" else None, threads=1,
                               fast_decode=False)
    assert retriever.backend == ("onnx-fp32" if encoder == "onnx" else "torch")
    for row in (0, 5, 42):
        result = retriever.search(index.gallery.image_bytes(row), k=10)
        scores, rows = index.search(index.embeddings[row][None], 10)
        assert result.ids.tolist() == index.gallery.ids[rows[0]].tolist()
        np.testing.assert_allclose(result.scores, scores[0], atol=1e-4)
        assert result.ids[0] == index.gallery.ids[row] and result.scores[0] == pytest.approx(1.0, abs=1e-4)
        assert [m["id"] for m in result.metadata] == result.ids.tolist()
        assert set(result.timings_ms) == {"decode", "encode", "search", "total"}
        hit = result.hits()[0]
        assert hit["rank"] == 1 and {"caption", "label", "product_id"} <= set(hit)


def test_retriever_int8_and_fast_decode_agree_with_the_index(index_dir, exported):
    index = GalleryIndex.load(index_dir)
    retriever = Retriever.load(index_dir, exported["int8"]["path"], threads=1)
    assert retriever.backend == "onnx-int8" and retriever.fast_decode
    big = encode_jpeg(index.gallery.image(3).resize((1600, 1200), Image.BICUBIC), 95)
    emb = retriever.embed(big)
    assert float(emb @ index.embeddings[3]) > 0.98
    assert retriever.search(big, k=5).ids.tolist()[0] == index.gallery.ids[3]


def test_retriever_accepts_paths_and_pil_images(index_dir, exported, tmp_path):
    retriever = Retriever.load(index_dir, exported["onnx"], fast_decode=False)
    img = load_image(PHOTO)
    path = tmp_path / "q.jpg"
    path.write_bytes(PHOTO.read_bytes())
    a, b = retriever.search(path, k=5), retriever.search(img, k=5)
    assert a.ids.tolist() == b.ids.tolist() and len(a.ids) == 5


def test_retriever_refuses_another_models_encoder(index_dir, runs, tmp_path):
    other = runs / "runs" / "tiny-kd-cosine" / "checkpoints" / "epoch_latest.pt"
    report = export_onnx(other, tmp_path / "other.onnx", quantize=False, max_images=20)
    with pytest.raises(ValueError, match="not the model the index was built with"):
        Retriever.load(index_dir, report["onnx"])


@pytest.mark.parametrize("data", [b"plain text, not a JPEG", b""])
def test_retriever_bad_bytes(index_dir, exported, data):
    retriever = Retriever.load(index_dir, exported["onnx"])
    with pytest.raises(BadImageError):
        retriever.search(data)


def test_thread_setting_is_honoured(index_dir, exported, checkpoint, restore_torch_threads):
    retriever = Retriever.load(index_dir, exported["onnx"], threads=1)
    assert retriever.encoder.session.get_session_options().intra_op_num_threads == 1
    torch_enc = TorchEncoder(checkpoint, threads=1)
    assert torch_enc.threads == 1 and torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert make_encoder(checkpoint, "torch", threads=2).threads == 2


def test_backend_choices(checkpoint, exported):
    assert isinstance(make_encoder(exported["onnx"]), OnnxEncoder)
    assert make_encoder(checkpoint).name == "torch"
    with pytest.raises(ValueError, match="export it first"):
        make_encoder(checkpoint, "onnx")
    with pytest.raises(ValueError, match="needs a checkpoint"):
        make_encoder(exported["onnx"], "torch-bf16")
    with pytest.raises(ValueError, match="unknown backend"):
        make_encoder(checkpoint, "tensorrt")


def test_torch_bf16_is_close_to_fp32(checkpoint):
    pixels = to_pixels(load_image(PHOTO), 32)[None]
    fp32 = make_encoder(checkpoint, "torch").encode(pixels)
    bf16 = make_encoder(checkpoint, "torch-bf16").encode(pixels)
    assert bf16.dtype == np.float32 and float((fp32 * bf16).sum()) > 0.99


@pytest.mark.slow
def test_torch_compile_backend(checkpoint):
    pixels = to_pixels(load_image(PHOTO), 32)[None]
    fp32 = make_encoder(checkpoint, "torch").encode(pixels)
    compiled = make_encoder(checkpoint, "torch-compile")
    assert compiled.name == "torch-compile" and float((fp32 * compiled.encode(pixels)).sum()) > 0.99


def test_latency_summary_and_table(index_dir, exported):
    retriever = Retriever.load(index_dir, exported["onnx"], threads=1)
    stats = measure_latency(retriever, [_jpeg((800, 800)), PHOTO.read_bytes()], repeats=3, warmup=1)
    assert stats["backend"] == "onnx-fp32" and stats["n"] == 6
    for stage in ("decode", "encode", "search", "total"):
        assert 0 < stats[stage]["p50"] <= stats[stage]["p95"]
    table = latency_markdown([{**stats, "query": "800×800", "speedup": 1.0, "rss_mb": 300.0}])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[2].startswith("| 800×800 | onnx-fp32 |") and "1.00×" in lines[2]
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")


# --------------------------------------------------------------------------- CLI


def test_cli_search_prints_json(index_dir, exported, tmp_path, capsys):
    query = tmp_path / "q.jpg"
    query.write_bytes(_jpeg((800, 800)))
    assert cli_main(["search", "--index", str(index_dir), "--image", str(query), "-k", "5",
                     "--model", exported["onnx"], "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 5 and out["backend"] == "onnx-fp32" and len(out["results"]) == 5
    expected = Retriever.load(index_dir, exported["onnx"]).search(query, k=5)
    assert [r["id"] for r in out["results"]] == expected.ids.tolist()
    assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4, 5]
    assert set(out["timings_ms"]) == {"decode", "encode", "search", "total"}


def test_cli_search_bad_image_is_one_clear_error(index_dir, tmp_path, caplog):
    bad = tmp_path / "fake.jpg"
    bad.write_text("not a photo")
    assert cli_main(["search", "--index", str(index_dir), "--image", str(bad)]) == 2
    assert "fake.jpg: not an image file" in caplog.text


def test_cli_export(checkpoint, tmp_path, capsys):
    out = tmp_path / "deploy" / "enc.onnx"
    assert cli_main(["export", str(checkpoint), str(out), "--int8", "--max-images", "30", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["onnx"] == str(out.resolve()) and report["int8"]["kept"] and int8_path(out).is_file()
    assert cli_main(["export", str(checkpoint), str(tmp_path / "x.onnx"), "--opset", "12"]) == 2


# --------------------------------------------------------------------------- module split


def test_deploy_imports_no_torch():
    import subprocess
    import sys

    script = ("import sys; import cnclip_kd.deploy.runtime, cnclip_kd.deploy.backends, cnclip_kd.deploy.latency, "
              "cnclip_kd.deploy.quantize, cnclip_kd.retrieval.index, cnclip_kd.retrieval.gallery, cnclip_kd.core.tokenizer; "
              "from cnclip_kd.deploy import Retriever, make_encoder, measure_latency; "
              "from cnclip_kd.retrieval import GalleryIndex; from cnclip_kd.core import load_image, tokenize; "
              "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["False"]  # the serving path's modules; the export lives in cnclip_kd.deploy.export


def test_clip_constants_live_in_images():
    from cnclip_kd.core import images
    from cnclip_kd.models import students as models

    assert models.MEAN == images.CLIP_MEAN and models.STD == images.CLIP_STD
    assert images.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
