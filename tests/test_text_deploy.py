"""Text → image search on the CPU: the ONNX text encoder (fp32 / int8) checked against PyTorch, Retriever.search_text,
its errors, the CLI, and a serving path without torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from demo_fixtures import build_saved_index

from cnclip_kd import SAMPLE_DATA
from cnclip_kd.cli import main as cli_main
from cnclip_kd.deploy.backends import OnnxEncoder, OnnxTextEncoder, make_text_encoder
from cnclip_kd.deploy.runtime import Retriever
from cnclip_kd.deploy.latency import measure_latency
from cnclip_kd.core.tokenizer import NoTextTowerError
from cnclip_kd.retrieval.encoders import load_text_encoder
from cnclip_kd.deploy.export import CHECK_QUERIES, ExportError, export_onnx, export_text_onnx
from cnclip_kd.retrieval.index import GalleryIndex
from cnclip_kd.deploy.quantize import int8_path
from cnclip_kd.core.tokenizer import QueryError, tokenize

PHOTO = sorted((SAMPLE_DATA / "images").glob("*/*.jpg"))[0]
LONG = "夏季新款女装宽松显瘦百搭纯棉短袖T恤上衣" * 6  # far more than 50 word pieces
VARIED = {
    "chinese": "白色连衣裙",
    "latin": "denim jacket",
    "digits": "2024 42码",
    "emoji": "👗❤️ 红色长裙",
    "mixed": "Nike运动鞋 ｘｌ 日本語 한국어",
    "long": LONG,
}


@pytest.fixture(scope="module")
def text_export(checkpoint, tmp_path_factory) -> dict:
    """fp32 + int8 export of the tiny student's text tower, checked on the sample captions and CHECK_QUERIES."""
    out = tmp_path_factory.mktemp("text-deploy") / "text_encoder.onnx"
    return export_text_onnx(checkpoint, out, quantize=True, max_images=120, threads=1)


@pytest.fixture(scope="module")
def image_onnx(checkpoint, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("image-deploy") / "image_encoder.onnx"
    return export_onnx(checkpoint, out, quantize=False, max_images=20, threads=1)["onnx"]


@pytest.fixture(scope="module")
def index_dir(checkpoint, data_dir, tmp_path_factory) -> Path:
    return build_saved_index(checkpoint, data_dir, tmp_path_factory.mktemp("text-index") / "tiny-finetune")


@pytest.fixture(scope="module")
def torch_text(checkpoint):
    return load_text_encoder(checkpoint, device="cpu", precision="fp32")


@pytest.fixture
def image_only_index(index_dir, tmp_path) -> Path:
    """A copy of the index whose stats say it was built with an image-only teacher (no text tower)."""
    copy = shutil.copytree(index_dir, tmp_path / "efficientnet-index")
    stats = json.loads((copy / "stats.json").read_text(encoding="utf-8"))
    stats["model"] = {"name": "efficientnet-lite2", "spec": "teacher:efficientnet-lite2", "role": "teacher 教师"}
    (copy / "stats.json").write_text(json.dumps(stats, ensure_ascii=False), encoding="utf-8")
    return copy


# --------------------------------------------------------------------------- export


def test_text_export_matches_torch_with_dynamic_axes(text_export, torch_text):
    out = Path(text_export["onnx"])
    assert out.is_file() and text_export["kind"] == "text" and text_export["opset"] >= 14
    assert json.loads(Path(text_export["report"]).read_text(encoding="utf-8")) == text_export
    assert Path(text_export["report"]).name == "text_encoder.report.json"
    # Checked on every distinct caption of the 120 photos (60 in all the sample data) plus the varied queries.
    assert 30 <= text_export["n_captions"] <= 60 and text_export["n_images"] == 120
    assert text_export["n_texts"] == text_export["n_captions"] + len(CHECK_QUERIES)
    assert text_export["fp32"]["cosine_min"] >= 0.999
    assert text_export["fingerprint"] == torch_text.fingerprint()
    assert text_export["context_length"] == torch_text.context_length and text_export["dim"] == torch_text.dim

    model = onnx.load(str(out))
    (inp,) = model.graph.input
    assert inp.name == "input_ids" and inp.type.tensor_type.elem_type == onnx.TensorProto.INT64
    dims = inp.type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"] and not any(d.HasField("dim_value") for d in dims)
    assert [o.name for o in model.graph.output] == ["embeddings"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["cnclip_kd.kind"] == "text" and meta["cnclip_kd.precision"] == "fp32"
    assert meta["cnclip_kd.l2_normalized"] == "1" and meta["cnclip_kd.context_length"] == str(torch_text.context_length)

    enc = OnnxTextEncoder(out, threads=1)
    assert (enc.context_length, enc.dim, enc.precision, enc.name) == (torch_text.context_length, torch_text.dim,
                                                                      "fp32", "onnx-text-fp32")
    assert enc.fingerprint == torch_text.fingerprint() and enc.image_fingerprint == text_export["image_fingerprint"]
    texts = list(VARIED.values()) + list(CHECK_QUERIES)
    got, ref = enc.encode(texts), torch_text.encode(texts)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised in the graph
    assert ((got * ref).sum(1) >= 0.999).all()
    one_by_one = np.concatenate([enc.encode(t) for t in texts])  # batch 1, each at its own length
    assert ((one_by_one * ref).sum(1) >= 0.999).all()


def test_padding_is_masked_inside_the_graph(text_export):
    enc = OnnxTextEncoder(text_export["onnx"], threads=1)
    short = tokenize("白色连衣裙", enc.context_length, pad_to_context=False).ids
    padded = tokenize("白色连衣裙", enc.context_length, pad_to_context=True).ids
    assert short.shape[1] == 7 and padded.shape[1] == enc.context_length
    a, b = enc.encode_ids(short), enc.encode_ids(padded)
    np.testing.assert_allclose(a, b, atol=1e-5)  # trimming the padding does not change the embedding
    batch = tokenize(["T恤", "白色连衣裙", LONG], enc.context_length, pad_to_context=False)
    assert batch.ids.shape == (3, enc.context_length) and batch.truncated.tolist() == [False, False, True]
    rows = enc.encode_ids(batch.ids)
    np.testing.assert_allclose(rows[1], a[0], atol=1e-5)
    assert enc.truncated(LONG) and not enc.truncated("白色连衣裙")


def test_text_int8_is_close_and_reports_its_cost(text_export):
    q = text_export["int8"]
    assert q["kept"] and Path(q["path"]) == int8_path(text_export["onnx"]) and Path(q["path"]).is_file()
    assert q["path"].endswith("text_encoder.int8.onnx") and q["mb"] < text_export["fp32"]["mb"]
    assert q["cosine_mean"] >= 0.99 and q["cosine_min"] > 0.95
    for block in ("torch", "fp32", "int8"):
        for key in ("p@10", "map@10", "encode_ms", "encode_ms_full"):
            assert text_export[block][key] is not None, (block, key)
    assert 0.0 <= q["p@10"] <= 1.0 and q["p@10_drop"] == pytest.approx(text_export["fp32"]["p@10"] - q["p@10"], abs=1e-4)
    assert text_export["fp32"]["p@10"] == pytest.approx(text_export["torch"]["p@10"], abs=0.01)
    enc = OnnxTextEncoder(q["path"])
    assert enc.precision == "int8" and enc.name == "onnx-text-int8"
    assert "MatMulInteger" in {n.op_type for n in onnx.load(q["path"]).graph.node}


def test_text_export_fails_loudly_and_writes_nothing_when_onnx_disagrees(checkpoint, tmp_path, monkeypatch):
    def wrong(self, texts, *, batch_size=64):
        return np.random.default_rng(0).normal(size=(len(texts), self.dim)).astype(np.float32)

    monkeypatch.setattr(OnnxTextEncoder, "encode", wrong)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_text_onnx(checkpoint, tmp_path / "text.onnx", max_images=20)
    assert list(tmp_path.iterdir()) == []  # no model, no report, no temp files


def test_text_export_accepts_a_text_encoder_or_a_model(torch_text, tmp_path):
    from cnclip_kd.models.students import load_student

    report = export_text_onnx(torch_text, tmp_path / "a.onnx", quantize=False, texts=["连衣裙", "鞋子"])
    assert report["fingerprint"] == torch_text.fingerprint() and "int8" not in report
    assert report["n_texts"] == 2 + len(CHECK_QUERIES) and report["fp32"]["p@10"] is None  # no categories given
    model, _ = load_student(None, preset="tiny")
    report = export_text_onnx(model, tmp_path / "b.onnx", quantize=False, max_images=30)
    assert report["fp32"]["cosine_min"] >= 0.999 and report["fingerprint"].startswith("text-")


def test_onnx_encoders_refuse_the_other_tower(text_export, image_onnx):
    with pytest.raises(ValueError, match="text encoder, not an image one"):
        OnnxEncoder(text_export["onnx"])
    with pytest.raises(ValueError, match="image encoder, not a text one"):
        OnnxTextEncoder(image_onnx)


# --------------------------------------------------------------------------- Retriever.search_text


def test_search_text_returns_k_results(index_dir, image_onnx, text_export):
    index = GalleryIndex.load(index_dir)
    retriever = Retriever.load(index_dir, image_onnx, text_encoder=text_export["onnx"], threads=1)
    assert retriever.text_backend == "onnx-text-fp32"
    result = retriever.search_text("  连衣裙 ", k=5)
    assert len(result.ids) == 5 and list(result.scores) == sorted(result.scores, reverse=True)
    assert [m["id"] for m in result.metadata] == result.ids.tolist()
    assert set(result.timings_ms) == {"decode", "encode", "search", "total"}
    assert result.query == {"text": "连衣裙", "truncated": False, "n_tokens": 5,
                            "context_length": retriever.text_encoder.context_length}
    # The same as embedding the text and searching the index directly.
    scores, rows = index.search(retriever.text_encoder.encode(["连衣裙"]), 5)
    assert result.ids.tolist() == index.gallery.ids[rows[0]].tolist()
    np.testing.assert_allclose(result.scores, scores[0], atol=1e-5)
    out = result.to_dict()
    assert out["query"]["truncated"] is False and [h["rank"] for h in out["results"]] == [1, 2, 3, 4, 5]
    assert {"caption", "label", "product_id"} <= set(out["results"][0])
    assert "query" not in retriever.search(PHOTO, k=3).to_dict()  # image results have no text block


@pytest.mark.parametrize("what", sorted(VARIED))
def test_search_text_takes_any_script(index_dir, text_export, what):
    retriever = Retriever.load(index_dir, text_encoder=text_export["onnx"], threads=1)
    result = retriever.search_text(VARIED[what], k=10)
    assert len(result.ids) == 10 and np.isfinite(result.scores).all()
    assert result.query["truncated"] is (what == "long")
    assert 3 <= result.query["n_tokens"] <= result.query["context_length"]
    if what == "long":
        assert result.query["n_tokens"] == result.query["context_length"]
    assert retriever._encoder is None  # text queries never load the image encoder


@pytest.mark.parametrize("bad", ["", "   ", "\n\t 　", None, 42])
def test_empty_or_non_text_query_is_refused_before_any_model_loads(index_dir, bad):
    retriever = Retriever.load(index_dir)  # the text tower would load on the first text query
    with pytest.raises(QueryError):
        retriever.search_text(bad)
    assert retriever._text_encoder is None


def test_torch_text_backend_is_loaded_lazily_and_agrees(index_dir, text_export):
    onnx_ret = Retriever.load(index_dir, text_encoder=text_export["onnx"], threads=1)
    torch_ret = Retriever.load(index_dir, threads=1)
    assert torch_ret._text_encoder is None
    a, b = onnx_ret.search_text("白色T恤", k=10), torch_ret.search_text("白色T恤", k=10)
    assert torch_ret.text_backend == "torch-text"
    assert a.ids.tolist() == b.ids.tolist() and a.query == b.query
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    long = torch_ret.search_text(LONG, k=3)
    assert long.query["truncated"] is True


def test_text_encoder_of_another_model_is_refused(index_dir, runs, tmp_path, torch_text):
    other = runs / "runs" / "tiny-kd-cosine" / "checkpoints" / "epoch_latest.pt"
    report = export_text_onnx(other, tmp_path / "other_text.onnx", quantize=False, max_images=20)
    # Known from the image tower's fingerprint the export records ...
    with pytest.raises(ValueError, match="not the model the index was built with"):
        Retriever.load(index_dir, text_encoder=report["onnx"])
    # ... and from the text fingerprint the index records.
    index = GalleryIndex.load(index_dir)
    index.stats["model"].pop("fingerprint")
    index.stats["model"]["text_fingerprint"] = torch_text.fingerprint()
    with pytest.raises(ValueError, match="text tower .* is not the model the index was built with"):
        Retriever(index, text_encoder=OnnxTextEncoder(report["onnx"]))
    Retriever(index, text_encoder=make_text_encoder(torch_text))  # its own text tower fits


@pytest.mark.parametrize("recorded", [True, False])
def test_image_only_model_has_no_text_tower(image_only_index, monkeypatch, recorded):
    """An index built with an image-only teacher: NoTextTowerError naming it, without loading the teacher."""
    if recorded:  # what the index builder writes for such a model
        stats = json.loads((image_only_index / "stats.json").read_text(encoding="utf-8"))
        stats["model"]["text_tower"] = False
        (image_only_index / "stats.json").write_text(json.dumps(stats), encoding="utf-8")

    def no_loading(*args, **kwargs):
        raise AssertionError("the teacher's weights were loaded")

    monkeypatch.setattr("cnclip_kd.retrieval.encoders.load_text_encoder", no_loading)
    retriever = Retriever.load(image_only_index)
    for _ in range(2):  # and again, without retrying a load
        with pytest.raises(NoTextTowerError, match="teacher:efficientnet-lite2.*no text tower"):
            retriever.search_text("连衣裙")


def test_text_encoder_of_an_image_only_teacher_names_it():
    with pytest.raises(NoTextTowerError, match="teacher:efficientnet-lite2: an image-only model"):
        make_text_encoder("teacher:efficientnet-lite2")


def test_text_latency(index_dir, text_export):
    retriever = Retriever.load(index_dir, text_encoder=text_export["int8"]["path"], threads=1)
    stats = measure_latency(retriever, ["连衣裙", "白色 T恤", LONG], repeats=2, warmup=1, text=True)
    assert stats["backend"] == "onnx-text-int8" and stats["n"] == 6
    for stage in ("decode", "encode", "search", "total"):
        assert 0 < stats[stage]["p50"] <= stats[stage]["p95"]


def test_onnx_image_and_text_search_never_import_torch(index_dir, image_onnx, text_export):
    script = f"""
import sys
from cnclip_kd.deploy import Retriever
from cnclip_kd.core.tokenizer import QueryError
r = Retriever.load({str(index_dir)!r}, {image_onnx!r}, text_encoder={text_export["int8"]["path"]!r}, threads=1)
image = r.search({str(PHOTO)!r}, 5)
text = r.search_text("白色连衣裙 👗", 5)
long = r.search_text({LONG!r}, 5)
try:
    r.search_text("   ")
except QueryError:
    pass
assert len(image.ids) == len(text.ids) == 5 and long.query["truncated"]
print("torch" in sys.modules, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "False []"


# --------------------------------------------------------------------------- CLI


def test_cli_search_text_prints_json(index_dir, text_export, capsys):
    assert cli_main(["search", "--index", str(index_dir), "--text", "白色连衣裙", "-k", "4",
                     "--text-model", text_export["onnx"], "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["k"] == 4 and out["backend"] == "onnx-text-fp32" and len(out["results"]) == 4
    assert out["query"] == {"text": "白色连衣裙", "truncated": False, "n_tokens": 7, "context_length": 52}
    expected = Retriever.load(index_dir, text_encoder=text_export["onnx"]).search_text("白色连衣裙", k=4)
    assert [r["id"] for r in out["results"]] == expected.ids.tolist()
    assert set(out["timings_ms"]) == {"decode", "encode", "search", "total"}

    assert cli_main(["search", "--index", str(index_dir), "--text", LONG, "--text-model", text_export["onnx"]]) == 0
    assert json.loads(capsys.readouterr().out)["query"]["truncated"] is True


def test_cli_search_text_errors_are_one_clear_line(index_dir, image_only_index, text_export, caplog):
    assert cli_main(["search", "--index", str(index_dir), "--text", "  ", "--text-model", text_export["onnx"]]) == 2
    assert "empty text query" in caplog.text
    caplog.clear()
    assert cli_main(["search", "--index", str(image_only_index), "--text", "连衣裙"]) == 2
    assert "teacher:efficientnet-lite2" in caplog.text and "no text tower" in caplog.text
    assert "Traceback" not in caplog.text


def test_cli_export_text_out(checkpoint, tmp_path, capsys):
    out, text_out = tmp_path / "deploy" / "image_encoder.onnx", tmp_path / "deploy" / "text_encoder.onnx"
    assert cli_main(["export", str(checkpoint), str(out), "--text-out", str(text_out), "--int8", "--max-images", "30",
                     "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["onnx"] == str(out.resolve()) and report["int8"]["kept"]
    text = report["text_encoder"]
    assert text["onnx"] == str(text_out.resolve()) and text["kind"] == "text" and text["int8"]["kept"]
    assert int8_path(text_out).is_file() and (tmp_path / "deploy" / "text_encoder.report.json").is_file()
