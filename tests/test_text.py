"""Text side: cn_clip's tokenizer without torch, text encoders, text ↔ image metrics against cn_clip's own evaluation."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from cnclip_kd.core.tokenizer import NoTextTowerError
from cnclip_kd.retrieval.encoders import TextEncoder, load_encoder, load_text_encoder, text_encoder_for
from cnclip_kd.retrieval.evaluate import (TEXT_COLUMNS, embed_texts, evaluate_text, index_model, metrics_row,
    write_muge_predictions)
from cnclip_kd.retrieval.report import comparison_markdown
from cnclip_kd.retrieval.gallery import Gallery, gallery_from_split, gallery_texts
from cnclip_kd.retrieval.index import GalleryIndex
from cnclip_kd.core.metrics import recall_metrics
from cnclip_kd.models.students import cnclip_state_dict, load_student
from cnclip_kd.core.tokenizer import QueryError, check_query, preprocess_text, tokenize

QUERIES = ["白色连衣裙", "Nike 跑鞋 42码", "夏季 T-shirt 😀", "2024新款 ins风 短裤!!", "“引号” ABC", "连衣裙 " * 40]


# --------------------------------------------------------------------------- tokenizer


def test_tokenize_equals_cn_clip_and_needs_no_torch():
    from cn_clip.clip import tokenize as cn_tokenize

    for length in (24, 52):
        got = tokenize(QUERIES, length)
        want = cn_tokenize([preprocess_text(q) for q in QUERIES], context_length=length).numpy()
        np.testing.assert_array_equal(got.ids, want)
        assert got.truncated.tolist() == [False] * 5 + [True]
        assert got.lengths[-1] == length and got.n_pieces[-1] == 120
    short = tokenize(QUERIES[:2], 52, pad_to_context=False)
    assert short.ids.shape == (2, int(short.lengths.max()))
    # The serving path tokenises in a process that never imports torch.
    code = ("import sys; from cnclip_kd.core.tokenizer import tokenize; t = tokenize(['白色连衣裙']); "
            "print(t.ids[0, :7].tolist(), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[101, 4635, 5682, 6825, 6132, 6170, 102] False"


@pytest.mark.parametrize("bad", ["", "   ", "\n\t ", None, 42])
def test_check_query_refuses_empty_and_non_text(bad):
    with pytest.raises(QueryError):
        check_query(bad)


def test_check_query_keeps_any_script():
    for q in QUERIES[:-1]:
        assert check_query(f"  {q} ") == q.strip()
    with pytest.raises(QueryError, match="characters"):
        check_query("长" * 5000)


# --------------------------------------------------------------------------- text encoders


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model, info = load_student(None, preset="tiny")
    path = tmp_path_factory.mktemp("tiny-text") / "tiny.pt"
    torch.save({"state_dict": cnclip_state_dict(model), "model_info": info, "context_length": 24}, path)
    return path, model.eval()


def test_text_embeddings_equal_cn_clip_encode_text(tiny_checkpoint):
    from cn_clip.clip import tokenize as cn_tokenize

    path, model = tiny_checkpoint
    encoder = load_text_encoder(path, device="cpu")
    assert encoder.context_length == 24  # read from the checkpoint
    got = encoder.encode(QUERIES, batch_size=4)
    with torch.no_grad():
        want = model.encode_text(cn_tokenize([preprocess_text(q) for q in QUERIES], context_length=24))
    want = torch.nn.functional.normalize(want.float(), dim=-1).numpy()
    assert got.shape == (len(QUERIES), 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [encoder.truncated(q) for q in QUERIES] == [False] * 5 + [True]
    # The text tower of an already loaded image encoder is the same model, not a second load.
    image_encoder = load_encoder(path, device="cpu")
    again = text_encoder_for(image_encoder)
    assert again.model is image_encoder.model and again.fingerprint() == encoder.fingerprint()
    assert text_encoder_for(image_encoder, context_length=52).fingerprint() != encoder.fingerprint()


def test_image_only_teacher_has_no_text_tower():
    with pytest.raises(NoTextTowerError, match="efficientnet-lite2.*no text tower"):
        load_text_encoder("teacher:efficientnet-lite2", device="cpu")


def test_modelscope_clip_teacher_text_equals_its_own_encode_text(tmp_path):
    from modelscope.models import Model
    from teacher_fixtures import make_tiny_clip_teacher_dir

    folder = make_tiny_clip_teacher_dir(tmp_path / "clip-teacher")
    encoder = load_text_encoder(f"teacher:{folder}", device="cpu")
    ms = Model.from_pretrained(str(folder))
    ids = torch.from_numpy(tokenize(QUERIES[:3], 52).ids)
    with torch.no_grad():
        want = torch.nn.functional.normalize(ms.clip_model.encode_text(ids).float(), dim=-1).numpy()
    np.testing.assert_allclose(encoder.encode(QUERIES[:3]), want, atol=1e-5)
    assert encoder.context_length == 52 and encoder.dim == want.shape[1]


@pytest.mark.slow
def test_team_teacher_text_equals_its_own_forward(tmp_path):
    from modelscope.models import Model
    from teacher_fixtures import make_team_teacher_dir

    folder = make_team_teacher_dir(tmp_path / "team")
    encoder = load_text_encoder(f"teacher:{folder}", device="cpu")
    ms = Model.from_pretrained(str(folder), device_id=-1)
    want = np.stack([ms.forward({"text": q})["text_embedding"][0] for q in QUERIES[:2]])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.encode(QUERIES[:2]), want, atol=1e-5)
    assert encoder.context_length == 30 and encoder.truncated("连衣裙" * 20) and not encoder.truncated("连衣裙")


# --------------------------------------------------------------------------- metrics


def test_recall_metrics_counts_queries_with_a_hit():
    m = recall_metrics([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [{2}, {9, 4}, set()], ks=(1, 2, 3))
    assert m == {"n_queries": 2, "r@1": 0.5, "r@2": 1.0, "r@3": 1.0, "mean_recall": pytest.approx(2.5 / 3)}


def _toy(n_per: int = 6):
    """A gallery of 3 categories whose embeddings are the category axis plus a per-image offset, and a text
    encoder that maps a text naming a category (``"c1 #4"``) onto that category's axis and its image."""
    dim = 8
    labels = [f"c{i // n_per}" for i in range(3 * n_per)]
    ids = np.arange(500, 500 + len(labels))
    rng = np.random.default_rng(0)
    emb = np.zeros((len(labels), dim), np.float32)
    for r, lab in enumerate(labels):
        emb[r, int(lab[1])] = 1.0
        emb[r, 3 + r % 5] = 0.3 + 0.01 * r
    emb += 0.01 * rng.normal(size=emb.shape).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    meta = [{"id": int(i), "image": None, "caption": f"{lab} #{r}", "label": lab, "product_id": "", "split": None}
            for r, (i, lab) in enumerate(zip(ids, labels))]
    gallery = Gallery(ids=ids, meta=meta)

    calls = []

    def encode_fn(texts):
        calls.append(list(texts))
        out = []
        for t in texts:
            lab, row = t.split(" #")
            out.append(emb[int(row)] if lab == labels[int(row)] else np.eye(dim, dtype=np.float32)[int(lab[1])])
        return torch.tensor(np.stack(out))

    encoder = TextEncoder(encode_fn, name="toy", dim=dim, context_length=52, count_tokens=lambda t: len(t) + 2,
                          fingerprint="toy-text")
    return gallery, emb, encoder, calls


def test_evaluate_text_values_and_cn_clip_agreement(tmp_path):
    gallery, emb, encoder, calls = _toy()
    index = GalleryIndex.build(emb, gallery, kind="flat")
    texts = gallery_texts(gallery)  # a gallery read from files: one text per image (its caption)
    assert [t["text_id"] for t in texts] == gallery.ids.tolist()
    # A text pointing at the wrong category's axis: relevant image still its own.
    texts.append({"text_id": 9999, "text": "c2 #0", "image_ids": [500]})
    ev = evaluate_text(index, encoder, texts, cache_dir=tmp_path / "cache")
    # Each exact caption is its own image's embedding: text → image R@1 is 1 for those 18 texts, 0 for the odd one.
    assert ev["t2i"]["r@1"] == pytest.approx(18 / 19) and ev["t2i"]["n_queries"] == 19
    assert ev["i2t"]["n_queries"] == 18 and ev["i2t"]["r@1"] == 1.0
    # Category level: a hit is an image of the category of the text's image, counted by brute force here.
    labels = gallery.column("label")
    vectors = encoder.encode([t["text"] for t in texts])
    top = np.argsort(-(vectors @ emb.T), axis=1, kind="stable")[:, :10]
    want = np.mean([(labels[row] == labels[gallery.row_of(t["image_ids"][0])]).mean() for t, row in zip(texts, top)])
    assert ev["t2i_category"]["p@10"] == pytest.approx(want, abs=1e-9)
    assert 0.55 < want < 0.6  # 18 captions find their 6 category images (0.6), the odd text none in its top 6
    assert ev["n_texts"] == 19 and ev["n_images"] == 18 and ev["truncated"] == 0
    # Our numbers are cn_clip's MUGE evaluation's, on the files we write in its formats.
    paths = write_muge_predictions(tmp_path / "muge", ev)
    from cn_clip.eval import evaluation, evaluation_tr

    mean, r1, r5, r10 = evaluation.compute_score(str(paths["texts.jsonl"]), str(paths["t2i_predictions.jsonl"]))
    assert [mean, r1, r5, r10] == pytest.approx([100 * ev["t2i"][k] for k in ("mean_recall", "r@1", "r@5", "r@10")])
    mean, r1, r5, r10 = evaluation_tr.compute_score(str(paths["texts.tr.jsonl"]), str(paths["i2t_predictions.jsonl"]))
    assert [mean, r1, r5, r10] == pytest.approx([100 * ev["i2t"][k] for k in ("mean_recall", "r@1", "r@5", "r@10")])
    # Text embeddings are cached: the same texts with the same encoder are not encoded again.
    n_calls = len(calls)
    again = embed_texts(encoder, [t["text"] for t in texts], tmp_path / "cache")
    assert len(calls) == n_calls and again.shape == (19, 8)
    embed_texts(encoder, ["c0 #0"], tmp_path / "cache")
    assert len(calls) == n_calls + 1


def test_evaluate_text_refuses_no_texts():
    gallery, emb, encoder, _ = _toy()
    with pytest.raises(ValueError, match="no texts"):
        evaluate_text(GalleryIndex.build(emb, gallery, kind="flat"), encoder, [])


def test_index_model_evaluates_text_and_saves_cn_clip_files(data_dir, checkpoint, tmp_path, capsys):
    gallery = gallery_from_split(data_dir, "test")
    texts = gallery_texts(gallery)
    lines = (data_dir / "test_texts.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(lines) and texts[0] == json.loads(lines[0])
    index = index_model(checkpoint, gallery, tmp_path / "index" / "tiny")
    model = index.stats["model"]
    assert model["text_tower"] is True and model["text_fingerprint"].startswith("text-")
    ev = index.stats["text_eval"]
    assert ev["n_texts"] == len(texts) and ev["n_images"] == len(gallery)
    assert set(ev) >= {"t2i", "i2t", "t2i_category"} and "files" not in ev
    from cn_clip.eval import evaluation

    folder = tmp_path / "index" / "tiny"
    score = evaluation.compute_score(str(folder / "texts.jsonl"), str(folder / "t2i_predictions.jsonl"))
    assert score[1:] == pytest.approx([100 * ev["t2i"][k] for k in ("r@1", "r@5", "r@10")])
    saved = GalleryIndex.load(folder)
    row = metrics_row("tiny", saved)
    assert all(row[c] is not None for c in TEXT_COLUMNS)
    assert row["t2i/mean"] == pytest.approx(ev["t2i"]["mean_recall"])
    table = comparison_markdown([row], part="text")
    assert "t2i/r@1" in table.splitlines()[0] and "p@10 |" not in table.splitlines()[0].replace("cat-p@10 |", "")
    # `cnclip-kd eval` reports the text columns recorded with the index beside the image metrics it recomputes.
    from cnclip_kd.cli import main as cli_main

    assert cli_main(["eval", str(folder), "--out", str(tmp_path / "table")]) == 0
    head, _, first = capsys.readouterr().out.splitlines()[:3]
    cells = [c.strip() for c in first.split("|")]
    assert "t2i/mean" in head and "p@10" in head
    assert cells[[c.strip() for c in head.split("|")].index("t2i/mean")] == f"{ev['t2i']['mean_recall']:.3f}"


def test_index_model_without_text_tower_leaves_text_columns_empty(tmp_path, monkeypatch):
    from cnclip_kd.retrieval import evaluate as evaluate_mod
    from cnclip_kd.retrieval.encoders import ImageEncoder

    gallery, emb, _, _ = _toy()
    # An image-only encoder (as an EfficientNet teacher is): kind "efficientnet", no text tower.
    encoder = ImageEncoder(lambda x: x, name="image-only", dim=8, transform=lambda im: im,
                           fingerprint="img-only", info={"role": "teacher", "kind": "efficientnet"})
    monkeypatch.setattr(evaluate_mod, "embed_gallery", lambda *a, **k: emb)  # the toy gallery has no image files
    index = index_model("image-only", gallery, tmp_path / "idx", encoder=encoder)
    row = metrics_row("image-only", GalleryIndex.load(tmp_path / "idx"))
    assert index.stats["model"]["text_tower"] is False and "text_eval" not in index.stats
    assert all(row[c] is None for c in TEXT_COLUMNS)
    assert not (tmp_path / "idx" / "texts.jsonl").exists()
    assert "| - | - |" in comparison_markdown([row], part="text")
