"""The query demo (cnclip_kd.notebook.widget.QueryDemo) driven from Python, its UI-free query session
(cnclip_kd.retrieval.session.QuerySession), and notebook 05 headless.

Two tiny trained students (demo_fixtures.demo_output) are indexed over the
prepared sample's test split (120 images, 10 categories) once per module; an
image-only teacher (timm's tiny ``test_convnext``, random weights in a local
file) is indexed too where a test needs a model without a text tower.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from cnclip_kd import SAMPLE_DATA
from cnclip_kd.core.images import BadImageError, load_image
from cnclip_kd.core.tokenizer import NoTextTowerError, QueryError
from cnclip_kd.deploy.runtime import Retriever
from cnclip_kd.retrieval.encoders import load_encoder, text_encoder_for
from cnclip_kd.retrieval.evaluate import index_model
from cnclip_kd.retrieval.gallery import Gallery, gallery_from_split
from cnclip_kd.retrieval.index import GalleryIndex
from cnclip_kd.retrieval.session import Query, QuerySession, SearchResult, results_markdown
from cnclip_kd.notebook.widget import CSS, DEFAULT_MAX_UPLOAD_BYTES, QueryDemo
from demo_fixtures import DEMO_RUNS, build_saved_index, copy_output, demo_output, prepare_sample

MODELS = list(DEMO_RUNS)  # ["tiny-finetune", "tiny-kd-cosine"]
PHOTO = sorted((SAMPLE_DATA / "images").glob("*/*.jpg"))[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return prepare_sample(tmp_path_factory)


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory, data_dir) -> Path:
    """An OUTPUT_DIR as notebook 03 leaves it: runs/<model> and index/<model> for both students."""
    out = copy_output(demo_output(tmp_path_factory), tmp_path_factory.mktemp("widget") / "out")
    for name in MODELS:
        build_saved_index(out / "runs" / name / "checkpoints" / "epoch_latest.pt", data_dir, out / "index" / name)
    return out


@pytest.fixture(scope="module")
def indexes(output_dir) -> dict:
    return {name: GalleryIndex.load(output_dir / "index" / name) for name in MODELS}


@pytest.fixture
def demo(output_dir) -> QueryDemo:
    return QueryDemo.from_dirs({name: output_dir / "index" / name for name in MODELS}, k=10).build()


@pytest.fixture(scope="module")
def image_only_index(tmp_path_factory, data_dir) -> Path:
    """A saved index of an image-only teacher: timm's tiny ``test_convnext`` (random weights in a file), ~4 s."""
    import timm
    import torch

    root = tmp_path_factory.mktemp("image-only")
    weights = root / "test_convnext.pth"
    torch.save(timm.create_model("test_convnext", pretrained=False).state_dict(), weights)
    index_model(f"teacher:timm:test_convnext={weights}", gallery_from_split(data_dir, "test"), root / "index",
                kind="flat", device="cpu")
    return root / "index"


def _expected(index: GalleryIndex, row: int, k: int) -> tuple[list[int], np.ndarray]:
    scores, rows = index.search(index.embeddings[row][None], k, exclude_ids=[int(index.gallery.ids[row])])
    return [int(index.gallery.ids[r]) for r in rows[0]], scores[0]


_TEXT_ENCODERS: dict = {}


def _text_encoder(index: GalleryIndex):
    """The text tower of the model an index was built with, loaded independently of the demo."""
    spec = index.stats["model"]["spec"]
    if spec not in _TEXT_ENCODERS:
        _TEXT_ENCODERS[spec] = text_encoder_for(load_encoder(spec, device="cpu"))
    return _TEXT_ENCODERS[spec]


def _text_expected(index: GalleryIndex, text: str, k: int) -> tuple[list[int], np.ndarray]:
    scores, rows = index.search(_text_encoder(index).encode([text]), k)
    return [int(index.gallery.ids[r]) for r in rows[0]], scores[0]


def _grid_thumbnails(demo: QueryDemo) -> list[bytes]:
    return [cell.children[0].value for cell in demo.grid.children]


def test_build_makes_widgets_without_searching(demo, indexes):
    assert demo.models == MODELS
    assert demo.model_picker.options == tuple(MODELS) and demo.model_picker.value == MODELS[0]
    assert demo.k_picker.value == 10 and demo.k_picker.max == 50  # max_k, under the 120-image gallery
    # Every gallery image can be picked, in gallery order.
    assert [value for _, value in demo.query_picker.options] == list(range(120))
    assert demo.results == [] and demo.grid.children == () and demo.last_query_ms is None
    assert demo.query["source"] == "gallery" and demo.query["id"] == int(indexes[MODELS[0]].gallery.ids[0])


def test_large_gallery_offers_evenly_spaced_choices(output_dir, indexes):
    demo = QueryDemo.from_dirs({"m": output_dir / "index" / MODELS[0]}, max_choices=10, max_k=500).build()
    rows = [value for _, value in demo.query_picker.options]
    assert len(rows) == 10 and rows[0] == 0 and rows[-1] == 119 and rows == sorted(rows)
    assert demo.k_picker.max == 120  # capped at the gallery size
    demo.select_query(5)  # not offered: added to the dropdown
    assert demo.query_picker.value == 5 and 5 in [value for _, value in demo.query_picker.options]
    assert demo.query["id"] == int(indexes[MODELS[0]].gallery.ids[5])


def test_gallery_query_fills_the_grid_with_the_index_top_k(demo, indexes):
    index = indexes[MODELS[0]]
    demo.query_picker.value = 5
    demo.k_picker.value = 7
    demo.search_button.click()

    ids, scores = _expected(index, 5, 7)
    query = index.gallery.meta[5]
    assert [r["id"] for r in demo.results] == ids
    assert [r["rank"] for r in demo.results] == list(range(1, 8))
    np.testing.assert_allclose([r["score"] for r in demo.results], scores, rtol=1e-6)
    got = [r["score"] for r in demo.results]
    assert got == sorted(got, reverse=True)
    assert query["id"] not in ids  # the query itself is left out
    for r in demo.results:
        meta = index.gallery.meta[r["row"]]
        assert (r["caption"], r["label"]) == (meta["caption"], meta["label"])
        assert r["same_category"] == (meta["label"] == query["label"])
    thumbs = _grid_thumbnails(demo)
    assert len(thumbs) == 7 and all(t[:2] == b"\xff\xd8" for t in thumbs)  # JPEG thumbnails
    assert demo.last_query_ms is not None and demo.last_query_ms >= 0
    assert demo.timings["encode_ms"] == 0.0  # the stored embedding, no model run
    assert f"{demo.last_query_ms:.1f} ms" in demo.time_html.value
    assert demo.status.startswith(f"{MODELS[0]}: 7 ") and f"id {query['id']}" in demo.status
    assert f"id {query['id']}" in demo.query_text.value and demo.query_image.value[:2] == b"\xff\xd8"


def test_model_switch_and_select_by_id(demo, indexes):
    other = indexes[MODELS[1]]
    image_id = int(other.gallery.ids[11])
    demo.select_query(image_id=image_id)
    demo.model_picker.value = MODELS[1]
    demo.k_picker.value = 10
    results = demo.update()
    assert [r["id"] for r in results] == _expected(other, 11, 10)[0]
    assert demo.status.startswith(f"{MODELS[1]}: 10 ")
    with pytest.raises(KeyError, match="not in the gallery"):
        demo.select_query(image_id=-5)
    with pytest.raises(IndexError):
        demo.select_query(120)


def test_index_without_embeddings_encodes_the_gallery_image(output_dir, indexes):
    saved = indexes[MODELS[0]]
    bare = GalleryIndex(saved.index, saved.gallery, saved.stats, embeddings=None)
    demo = QueryDemo({"bare": bare}, k=5).build()
    demo.select_query(3)
    results = demo.update()
    assert len(results) == 5 and int(saved.gallery.ids[3]) not in [r["id"] for r in results]
    assert demo.timings["encode_ms"] > 0  # the model ran (loaded from the spec the index recorded)
    # Same model, same image: the same scores as with the stored embedding (up to batch-size rounding).
    np.testing.assert_allclose([r["score"] for r in results], _expected(saved, 3, 5)[1], atol=1e-4)


def test_uploaded_photo_is_encoded_and_searched(demo, indexes):
    demo.k_picker.value = 6
    demo.uploader.value = ({"name": PHOTO.name, "type": "image/jpeg", "size": PHOTO.stat().st_size,
                            "content": memoryview(PHOTO.read_bytes()),
                            "last_modified": dt.datetime.now(dt.timezone.utc)},)
    assert demo.status.startswith(f"已上传 uploaded {PHOTO.name}")
    assert demo.query == {"source": "upload", "id": None, "label": "", "caption": "", "name": PHOTO.name}
    assert demo.uploader.value == ()  # reset, so the same file can be uploaded again
    demo.search_button.click()

    index = indexes[MODELS[0]]
    encoder = load_encoder(index.stats["model"]["spec"], device="cpu")
    scores, rows = index.search(encoder.encode_pil([load_image(PHOTO)]), 6)
    assert [r["id"] for r in demo.results] == [int(index.gallery.ids[r]) for r in rows[0]]
    np.testing.assert_allclose([r["score"] for r in demo.results], scores[0], rtol=1e-5)
    assert all(r["same_category"] is None for r in demo.results)  # an upload has no category
    assert len(_grid_thumbnails(demo)) == 6
    assert demo.timings["encode_ms"] > 0 and demo.status.startswith(f"{MODELS[0]}: 6 ")
    assert PHOTO.name in demo.header_html.value

    # An encoder handed in is used as it is (nothing loaded from the spec).
    calls = []
    encode_pil = encoder.encode_pil
    encoder.encode_pil = lambda images, **kw: calls.append(len(images)) or encode_pil(images, **kw)
    given = QueryDemo({"given": (encoder, index)}, k=6).build()
    given.upload(PHOTO.read_bytes(), name=PHOTO.name)
    assert [r["id"] for r in given.update()] == [r["id"] for r in demo.results] and calls == [1]


@pytest.mark.parametrize("data, name, message", [
    (b"just some notes\n", "notes.txt", "not a usable image (not an image file"),
    (PHOTO.read_bytes()[:2000], "cut.jpg", "not a usable image (truncated or corrupt"),
    (b"", "empty.png", "not a usable image (empty data"),
    # A decodable JPEG, but over the limit: refused by size, before decoding.
    (PHOTO.read_bytes() + bytes(DEFAULT_MAX_UPLOAD_BYTES), "huge.jpg", "文件太大 too large (10.0 MB > 10 MB)"),
], ids=["text", "truncated", "empty", "too-large"])
def test_bad_upload_is_refused_in_the_panel(demo, data, name, message):
    demo.select_query(2)
    demo.update()
    assert len(demo.results) == 10
    demo.upload(data, name=name)  # must not raise
    assert demo.status.startswith(f"{name}: ") and message in demo.status
    assert message.split(" (")[0] in demo.status_html.value
    assert demo.results == [] and demo.grid.children == ()  # no stale results under a refused upload
    assert demo.query is None
    assert demo.update() == []  # searching now explains instead of failing
    assert "upload a photo first" in demo.status
    demo.select_query(2)  # and a gallery pick works again
    assert len(demo.update()) == 10


# --------------------------------------------------------------------------- text queries


def test_text_query_fills_the_grid_with_the_text_towers_top_k(demo, indexes):
    index = indexes[MODELS[0]]
    demo.k_picker.value = 7
    assert demo.source_picker.value == "gallery"
    assert "文本 text" in [label for label, _ in demo.source_picker.options]
    assert "白色连衣裙" in demo.text_box.placeholder and CSS["text"] in demo.text_box._dom_classes
    demo.text_box.value = "白色连衣裙"  # typing in the box selects the text source
    assert demo.source_picker.value == "text"
    assert demo.query == {"source": "text", "text": "白色连衣裙", "id": None, "label": "", "caption": "",
                          "name": "“白色连衣裙”"}
    assert "白色连衣裙" in demo.query_text.value and demo.query_image.layout.display == "none"
    assert demo.results == []  # typing alone does not search
    demo.search_button.click()

    ids, scores = _text_expected(index, "白色连衣裙", 7)
    assert [r["id"] for r in demo.results] == ids and len(set(ids)) == 7
    np.testing.assert_allclose([r["score"] for r in demo.results], scores, rtol=1e-5, atol=1e-6)
    got = [r["score"] for r in demo.results]
    assert got == sorted(got, reverse=True) and [r["rank"] for r in demo.results] == list(range(1, 8))
    for r in demo.results:
        meta = index.gallery.meta[r["row"]]
        assert (r["id"], r["caption"], r["label"]) == (meta["id"], meta["caption"], meta["label"])
        assert r["same_category"] is None  # a text has no category: grey frames, no verdict
    thumbs = _grid_thumbnails(demo)
    assert len(thumbs) == 7 and all(t[:2] == b"\xff\xd8" for t in thumbs)
    assert demo.status == f"{MODELS[0]}: 7 个结果 results for 文本 text “白色连衣裙”"
    assert demo.truncated is False and "截断" not in demo.status
    assert demo.timings["encode_ms"] > 0 and f"{demo.last_query_ms:.1f} ms" in demo.time_html.value
    assert "白色连衣裙" in demo.header_html.value and "grey" in demo.header_html.value

    # Enter in the box: the front end's "submit" message runs the search.
    demo.k_picker.value = 3
    demo.text_box._handle_custom_msg({"event": "submit"}, [])
    assert [r["id"] for r in demo.results] == ids[:3] and len(demo.grid.children) == 3

    # The other model answers with its own text tower and index.
    demo.model_picker.value = MODELS[1]
    assert [r["id"] for r in demo.search_text("白色连衣裙")] == _text_expected(indexes[MODELS[1]], "白色连衣裙", 3)[0]
    assert demo.status.startswith(f"{MODELS[1]}: 3 ")

    # Picking a gallery image goes back to image search; the typed text stays in the box.
    demo.select_query(2)
    assert demo.query["source"] == "gallery" and demo.text_box.value == "白色连衣裙"
    assert [r["id"] for r in demo.update()] == _expected(indexes[MODELS[1]], 2, 3)[0]
    assert demo.query_image.layout.display != "none"


@pytest.mark.parametrize("text", ["", "   ", "\t\n\u3000 "], ids=["empty", "spaces", "mixed-whitespace"])
def test_empty_text_query_is_refused_in_the_panel(demo, text):
    demo.select_query(2)
    assert len(demo.update()) == 10
    assert demo.search_text(text) == []  # must not raise
    assert demo.status.startswith("文本查询无效 invalid text query: empty text query")
    assert "invalid text query" in demo.status_html.value
    assert demo.grid.children == () and demo.header_html.value == ""  # no stale results under the message
    assert len(demo.search_text("连衣裙")) == 10  # and a real text works again


def test_long_text_query_is_searched_and_reported_cut(demo, indexes):
    index = indexes[MODELS[0]]
    length = _text_encoder(index).context_length
    text = "白色长袖雪纺连衣裙" * 10  # 90 characters: far more word pieces than the context holds
    assert _text_encoder(index).truncated(text)
    demo.k_picker.value = 5
    results = demo.search_text(text)
    assert [r["id"] for r in results] == _text_expected(index, text, 5)[0]
    assert demo.truncated is True
    assert demo.status.endswith(f"; 查询过长，已截断 truncated to {length} tokens")
    assert demo.status.startswith(f"{MODELS[0]}: 5 个结果 results for 文本 text “白色长袖")
    demo.search_text("连衣裙")
    assert demo.truncated is False and "truncated" not in demo.status


@pytest.mark.parametrize("text", ["👗✨", "white dress", "2024 36码", "Nike 运动鞋 42码 👟 ok!"],
                         ids=["emoji", "latin", "digits", "mixed"])
def test_any_script_is_a_text_query(demo, indexes, text):
    demo.k_picker.value = 4
    results = demo.search_text(text)
    assert [r["id"] for r in results] == _text_expected(indexes[MODELS[0]], text, 4)[0]
    assert demo.status.startswith(f"{MODELS[0]}: 4 ") and len(demo.grid.children) == 4
    assert demo.query["text"] == text


def test_model_without_a_text_tower_says_so_and_the_others_still_work(output_dir, image_only_index, monkeypatch):
    saved = GalleryIndex.load(image_only_index)
    spec = saved.stats["model"]["spec"]
    assert spec.startswith("teacher:timm:test_convnext=")
    # As an index built before text towers were recorded: the model is loaded to find out.
    model = {k: v for k, v in saved.stats["model"].items() if k != "text_tower"}
    unrecorded = GalleryIndex(saved.index, saved.gallery, {**saved.stats, "model": model}, saved.embeddings)
    demo = QueryDemo({"image-only": unrecorded, MODELS[0]: GalleryIndex.load(output_dir / "index" / MODELS[0])},
                     k=5).build()
    demo.select_query(1)
    assert len(demo.update()) == 5
    assert demo.search_text("连衣裙") == []  # must not raise
    assert demo.status.startswith("image-only: ") and "no text tower" in demo.status and spec in demo.status
    assert demo.grid.children == ()
    assert demo.search_text("连衣裙") == [] and "no text tower" in demo.status  # remembered, asked again
    demo.model_picker.value = MODELS[0]
    assert len(demo.update()) == 5 and demo.status.startswith(f"{MODELS[0]}: 5 ")
    demo.model_picker.value = "image-only"
    demo.select_query(1)
    assert len(demo.update()) == 5  # the image-only model still searches with images

    # An index that records "no text tower" answers at once, without loading the model.
    recorded = GalleryIndex(saved.index, saved.gallery,
                            {**saved.stats, "model": {**model, "text_tower": False}}, saved.embeddings)
    # The session loads encoders lazily, from cnclip_kd.retrieval.encoders (never imported before a model must run).
    monkeypatch.setattr("cnclip_kd.retrieval.encoders.load_encoder",
                        lambda *a, **kw: pytest.fail("the model was loaded"))
    quick = QueryDemo({"image-only": recorded}, k=5).build()
    assert quick.search_text("连衣裙") == []
    assert quick.status.startswith("image-only: ") and "no text tower" in quick.status and spec in quick.status


def test_set_text_is_typed_not_searched(demo):
    demo.select_query(0)
    demo.update()
    demo.set_text("连衣裙")
    assert demo.query["source"] == "text" and len(demo.results) == 10  # nothing searched yet
    demo.select_query(0)
    demo.set_text("连衣裙")  # the same text again still selects the text source
    assert demo.query["source"] == "text"
    with pytest.raises(TypeError, match="must be a string"):
        demo.set_text(None)


def test_upload_limit_is_configurable(output_dir):
    demo = QueryDemo.from_dirs({"m": output_dir / "index" / MODELS[0]}, max_upload_bytes=1000, k=3).build()
    demo.upload(PHOTO.read_bytes(), name="p.jpg")
    assert demo.status == f"p.jpg: 文件太大 too large ({PHOTO.stat().st_size / 1024:.0f} KB > 1000 B)"
    assert demo.query is None
    assert "(≤ 1000 B)" in demo.uploader.description  # the button states the limit


def test_constructor_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        QueryDemo({})
    with pytest.raises(FileNotFoundError, match="03_build_index"):
        QueryDemo.from_dirs({"nothing": tmp_path})


# --------------------------------------------------------------------------- the query session, without the UI


def _toy_index() -> GalleryIndex:
    """Four gallery items in 2-d, two categories: from item 1, item 2 is nearest (same category), then 3 and 4."""
    meta = [{"id": i, "image": None, "caption": f"item {i}", "label": label, "product_id": f"p{i}"}
            for i, label in zip((1, 2, 3, 4), ("dress", "dress", "shoe", "shoe"))]
    angles = np.radians([0.0, 10.0, 30.0, 120.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    return GalleryIndex.build(emb, Gallery(ids=[1, 2, 3, 4], meta=meta), kind="flat", use_gpu=False)


def test_session_labels_hits_and_misses_against_the_query():
    session = QuerySession({"toy": _toy_index()})
    query = session.gallery_query(image_id=1)
    assert query == Query("gallery", "id 1", id=1, row=0, label="dress", caption="item 1")
    answer = session.search(query, k=3)
    assert isinstance(answer.result, SearchResult) and answer.model == "toy"
    assert [r["id"] for r in answer.results] == [2, 3, 4]  # the query itself is left out
    assert [r["same_category"] for r in answer.results] == [True, False, False]
    assert answer.same_category == 1 and answer.results[0]["product_id"] == "p2"
    assert [r["rank"] for r in answer.results] == [1, 2, 3]
    assert answer.timings["encode_ms"] == 0.0 and answer.truncated is False  # the stored embedding
    # An unlabelled query or hit has no verdict.
    unlabelled = session.search(Query("gallery", "id 1", id=1, row=0), k=2)
    assert [r["same_category"] for r in unlabelled.results] == [None, None]
    # More than the gallery holds: the missing results are dropped, not returned as -1 rows.
    assert [r["id"] for r in session.search(query, k=10).results] == [2, 3, 4]
    md = results_markdown(answer.results)
    assert md.splitlines()[2] == "| 1 | 2 | 0.985 | ✓ | dress | item 2 |" and "| ✗ |" in md


def test_session_image_query_from_a_path_or_bytes_equals_the_encoder(indexes):
    index = indexes[MODELS[0]]
    session = QuerySession(indexes)
    from_path = session.image_query(PHOTO)
    from_bytes = session.image_query(PHOTO.read_bytes(), name="p.jpg")
    assert (from_path.source, from_path.name, from_bytes.name) == ("upload", PHOTO.name, "p.jpg")
    assert from_path.to_dict() == {"source": "upload", "id": None, "label": "", "caption": "", "name": PHOTO.name}
    answer = session.search(from_path, k=6)
    encoder = load_encoder(index.stats["model"]["spec"], device="cpu")
    scores, rows = index.search(encoder.encode_pil([load_image(PHOTO)]), 6)
    assert [r["id"] for r in answer.results] == [int(index.gallery.ids[r]) for r in rows[0]]
    np.testing.assert_allclose([r["score"] for r in answer.results], scores[0], rtol=1e-5)
    assert all(r["same_category"] is None for r in answer.results)  # an image from outside has no category
    assert [r["id"] for r in session.search(from_bytes, k=6).results] == [r["id"] for r in answer.results]
    assert answer.timings["encode_ms"] > 0 and set(answer.result.timings_ms) == {"decode", "encode", "search", "total"}
    # The other model answers with its own encoder and index.
    other = session.search(from_path, MODELS[1], k=6)
    assert other.model == MODELS[1] and len(other.results) == 6


def test_session_text_query_is_the_retrievers(indexes):
    index = indexes[MODELS[0]]
    session = QuerySession(indexes)
    answer = session.search(session.text_query("  白色连衣裙 "), k=5)
    ids, scores = _text_expected(index, "白色连衣裙", 5)
    assert [r["id"] for r in answer.results] == ids
    np.testing.assert_allclose([r["score"] for r in answer.results], scores, rtol=1e-5, atol=1e-6)
    length = _text_encoder(index).context_length
    assert answer.result.query == {"text": "白色连衣裙", "truncated": False, "n_tokens": 7, "context_length": length}
    assert answer.same_category == 0 and all(r["same_category"] is None for r in answer.results)
    long = session.search(session.text_query("白色长袖雪纺连衣裙" * 10), k=3)
    assert long.truncated is True and long.context_length == length
    # One spelling: the serving Retriever (PyTorch text tower of the same index) answers the same.
    served = Retriever(index, text_encoder=_text_encoder(index)).search_text("  白色连衣裙 ", k=5)
    assert type(served) is SearchResult and served.query == answer.result.query
    assert served.ids.tolist() == answer.result.ids.tolist() and served.rows.tolist() == answer.result.rows.tolist()


def test_session_refuses_bad_queries_with_clear_errors(indexes, image_only_index, monkeypatch):
    with pytest.raises(ValueError, match="at least one"):
        QuerySession({})
    monkeypatch.setattr("cnclip_kd.retrieval.encoders.load_encoder",
                        lambda *a, **kw: pytest.fail("a model was loaded for a bad query"))
    session = QuerySession(indexes)
    for text in ("", "   ", "\t\n\u3000 "):
        with pytest.raises(QueryError, match="empty text query"):
            session.check(session.text_query(text))
        with pytest.raises(QueryError, match="empty text query"):
            session.search(session.text_query(text))  # refused before any model loads
    with pytest.raises(TypeError, match="must be a string"):
        session.text_query(None)
    with pytest.raises(KeyError, match="not in the gallery"):
        session.gallery_query(image_id=-5)
    with pytest.raises(IndexError, match="outside the gallery"):
        session.gallery_query(120)
    with pytest.raises(KeyError):
        session.search(session.gallery_query(0), "no-such-model")
    for data, reason in ((b"just some notes\n", "not an image file"), (b"", "empty data"),
                         (PHOTO.read_bytes()[:2000], "truncated or corrupt")):
        with pytest.raises(BadImageError, match=reason) as info:
            session.image_query(data, name="bad.jpg")
        assert info.value.source == "bad.jpg"
    # A model without a text tower (recorded in its index): NoTextTowerError naming it, nothing loaded.
    saved = GalleryIndex.load(image_only_index)
    recorded = GalleryIndex(saved.index, saved.gallery,
                            {**saved.stats, "model": {**saved.stats["model"], "text_tower": False}}, saved.embeddings)
    image_only = QuerySession({"image-only": recorded})
    for _ in range(2):
        with pytest.raises(NoTextTowerError, match="no text tower"):
            image_only.search(image_only.text_query("连衣裙"))
    assert len(image_only.search(image_only.gallery_query(1), k=5).results) == 5  # images still work


# --------------------------------------------------------------------------- notebook 05


@pytest.mark.notebook
@pytest.mark.slow
def test_notebook_05_on_saved_indexes(notebook_runner, output_dir, indexes):
    rec = notebook_runner("05_query_demo.ipynb", {"OUTPUT_DIR": str(output_dir), "K": 5, "QUERY": 4,
                                                   "UPLOAD": str(PHOTO), "TEXT_QUERY": "白色连衣裙"})
    assert rec["models"] == MODELS and rec["k"] == 5
    first = indexes[MODELS[0]]
    assert rec["query_row"] == 4 and rec["query_id"] == int(first.gallery.ids[4])
    assert rec["n_results"] == rec["grid_items"] == 5
    ids, scores = _expected(first, 4, 5)
    assert rec["result_ids"] == ids
    np.testing.assert_allclose(rec["result_scores"], scores, rtol=1e-6)
    assert 0 <= rec["same_category"] <= 5 and rec["query_ms"] >= 0
    assert rec["status"].startswith(f"{MODELS[0]}: 5 ")
    up = rec["upload"]
    assert up["name"] == PHOTO.name and up["n_results"] == 5 and len(set(up["ids"])) == 5
    assert up["scores"] == sorted(up["scores"], reverse=True) and up["query_ms"] > 0
    # The text example: the first model's text tower, searched in its index.
    text = rec["text"]
    assert text["text"] == "白色连衣裙" and text["model"] == MODELS[0]
    assert text["n_results"] == text["grid_items"] == 5 and text["truncated"] is False
    ids, scores = _text_expected(first, "白色连衣裙", 5)
    assert text["ids"] == ids
    np.testing.assert_allclose(text["scores"], scores, rtol=1e-5, atol=1e-6)
    assert text["labels"] == [first.gallery.meta[first.gallery.row_of(i)]["label"] for i in ids]
    assert text["status"] == f"{MODELS[0]}: 5 个结果 results for 文本 text “白色连衣裙”" and text["query_ms"] > 0


@pytest.mark.notebook
@pytest.mark.slow
def test_notebook_05_builds_missing_indexes(notebook_runner, tmp_path_factory, tmp_path, data_dir):
    out = copy_output(demo_output(tmp_path_factory), tmp_path / "out")  # runs/ only, no index/
    rec = notebook_runner("05_query_demo.ipynb", {"OUTPUT_DIR": str(out), "DATA_DIR": str(data_dir), "K": 3,
                                                   "MODELS": [MODELS[1]], "TEXT_QUERY": ""})
    assert rec["models"] == [MODELS[1]] and rec["n_results"] == 3 and rec["upload"] == {} and rec["text"] == {}
    built = GalleryIndex.load(out / "index" / MODELS[1])
    assert len(built) == 120 and rec["result_ids"] == _expected(built, 0, 3)[0]


@pytest.mark.notebook
def test_notebook_05_without_models_names_notebook_03(notebook_runner, tmp_path):
    with pytest.raises(pytest.fail.Exception, match="03_build_index.ipynb"):
        notebook_runner("05_query_demo.ipynb", {"OUTPUT_DIR": str(tmp_path / "empty")})
