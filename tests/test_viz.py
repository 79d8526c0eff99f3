"""Tests for cnclip_kd.notebook.viz and .fonts: CJK font set-up, photo grids, training curves, atomic saving."""

from __future__ import annotations

import csv
import io
import logging
import os
import random
import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib import font_manager
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from PIL import Image

from cnclip_kd import SAMPLE_DATA
from cnclip_kd.notebook import fonts, viz

MANIFEST = SAMPLE_DATA / "manifest.csv"


@pytest.fixture(scope="module")
def records():
    with open(MANIFEST, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(autouse=True)
def _restore_rc():
    # setup_cjk_font changes global rcParams; give each test a clean copy back.
    with matplotlib.rc_context():
        yield


@pytest.fixture
def no_cjk_font(monkeypatch):
    """Make discovery see only DejaVu Sans (no Chinese glyphs), and reset the once-only warning."""
    dejavu = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))
    monkeypatch.setattr(fonts, "_candidate_font_files", lambda: [dejavu])
    monkeypatch.setattr(fonts, "_warned_no_font", False)
    fonts._find_cjk_font.cache_clear()
    # Earlier figures in this process put the real CJK font first in rcParams; start from defaults.
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        yield
    fonts._find_cjk_font.cache_clear()


def _missing_glyph_warnings(fig: Figure) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(io.BytesIO(), format="png", dpi=60)
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def _paths(records, n, step=1):
    return [str(SAMPLE_DATA / r["image"]) for r in records[::step][:n]]


def _row(ax) -> int:
    return ax.get_subplotspec().rowspan.start


# ---------------------------------------------------------------- fonts


def test_setup_cjk_font_picks_a_font_with_all_caption_glyphs(records):
    name = fonts.setup_cjk_font()
    assert name is not None, f"no CJK font installed; {fonts.CJK_FONT_INSTALL_HINT}"
    assert matplotlib.rcParams["font.sans-serif"][0] == name
    assert matplotlib.rcParams["font.family"] == ["sans-serif"]
    assert matplotlib.rcParams["axes.unicode_minus"] is False

    path = font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)
    font = font_manager.get_font(path)  # the face matplotlib will draw with
    assert font.family_name == name
    assert font.style_name.lower() in ("regular", "normal", "book"), font.style_name
    chars = set("连衣裙帽子") | {ch for r in records for ch in r["text"] if not ch.isspace()}
    missing = sorted(ch for ch in chars if not font.get_char_index(ord(ch)))
    assert missing == [], f"{name} ({path}) lacks {missing}"


def test_setup_cjk_font_reapplies_rcparams_after_reset():
    name = fonts.setup_cjk_font()
    matplotlib.rcdefaults()
    assert matplotlib.rcParams["font.sans-serif"][0] != name
    assert fonts.setup_cjk_font() == name
    assert matplotlib.rcParams["font.sans-serif"][0] == name


def test_chinese_text_renders_without_missing_glyphs(records):
    fig = viz.image_grid(
        _paths(records, 3, step=60),
        [r["text"] for r in records[::60][:3]],
        title="检索结果 连衣裙帽子",
        subtitles=["第一", "第二", "第三"],
    )
    assert _missing_glyph_warnings(fig) == []


def test_missing_glyph_check_detects_tofu():
    # Control for the test above: without a CJK font the same check fires.
    with matplotlib.rc_context({"font.family": ["DejaVu Sans"]}):
        fig = Figure()
        fig.suptitle("连衣裙帽子")
        found = _missing_glyph_warnings(fig)
    assert found and "DejaVu Sans" in found[0]


def test_no_cjk_font_warns_once_with_install_commands(no_cjk_font, caplog, records):
    with caplog.at_level(logging.WARNING, logger="cnclip_kd.notebook.fonts"):
        assert fonts.setup_cjk_font() is None
        assert fonts.setup_cjk_font() is None
        # Figures still render, with boxes, and do not log again.
        fig = viz.image_grid(_paths(records, 1), ["连衣裙"])
        with pytest.warns(UserWarning, match="missing from font"):
            fig.savefig(io.BytesIO(), format="png", dpi=40)
    msgs = [r.getMessage() for r in caplog.records if r.name == "cnclip_kd.notebook.fonts"]
    assert len(msgs) == 1
    assert "pip install pylopdf-fonts-zh-cn" in msgs[0]
    assert "apt-get install -y fonts-noto-cjk" in msgs[0]


def test_font_ranking_prefers_simplified_chinese_regular(monkeypatch):
    faces = {
        "/fonts/pan-bold.ttc": [(0, "Noto Sans CJK JP", "Bold"), (2, "Noto Sans CJK SC", "Bold")],
        "/fonts/pan.ttc": [(0, "Noto Sans CJK JP", "Regular"), (2, "Noto Sans CJK SC", "Regular")],
        "/fonts/other.ttf": [(0, "Some Hei", "Regular")],
        "/fonts/latin.ttf": [],
    }
    monkeypatch.setattr(fonts, "_candidate_font_files", lambda: list(faces))
    monkeypatch.setattr(fonts, "_cjk_faces", faces.get)
    fonts._find_cjk_font.cache_clear()
    try:
        assert fonts._find_cjk_font() == ("/fonts/pan.ttc", 2, "Noto Sans CJK SC")
        del faces["/fonts/pan.ttc"], faces["/fonts/pan-bold.ttc"]
        fonts._find_cjk_font.cache_clear()
        assert fonts._find_cjk_font() == ("/fonts/other.ttf", 0, "Some Hei")
    finally:
        fonts._find_cjk_font.cache_clear()


def test_placeholder_fonts_do_not_count_as_cjk():
    # matplotlib's Last Resort font maps every ideograph to one box glyph.
    last_resort = Path(matplotlib.get_data_path(), "fonts", "ttf", "LastResortHE-Regular.ttf")
    dejavu = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))
    if last_resort.exists():
        assert fonts._cjk_faces(str(last_resort)) == []
    assert fonts._cjk_faces(dejavu) == []
    assert fonts._cjk_faces("/no/such/font.ttf") == []


# ---------------------------------------------------------------- image_grid


def test_image_grid_layout_captions_and_ids(records):
    paths = _paths(records, 7, step=50)
    captions = [r["text"] for r in records[::50][:7]]
    fig = viz.image_grid(paths, captions, ncols=3, title="标题")
    assert len(fig.axes) == 7
    assert [(_row(ax), ax.get_subplotspec().colspan.start) for ax in fig.axes] == [
        (i // 3, i % 3) for i in range(7)
    ]
    for ax, path, caption in zip(fig.axes, paths, captions):
        assert ax.get_gid() == path
        assert ax.get_xticks().size == 0 and ax.get_yticks().size == 0
        assert ax.get_xlabel() == caption
        assert len(ax.get_images()) == 1
    assert fig._suptitle.get_text() == "标题"


def test_image_grid_frame_colours_and_subtitles(records):
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("L", (20, 50), 128), *_paths(records, 1)]
    fig = viz.image_grid(images, frame_colors=["green", None, "#ff0000"], subtitles=["#1 0.93", None, "#3"])
    assert len(fig.axes) == 3
    assert [ax.get_gid() for ax in fig.axes] == [None, None, images[2]]
    for ax, colour in zip(fig.axes, ["green", None, "#ff0000"]):
        spines = list(ax.spines.values())
        if colour is None:
            assert not any(s.get_visible() for s in spines)
        else:
            assert all(s.get_visible() for s in spines)
            assert all(s.get_edgecolor() == to_rgba(colour) for s in spines)
            assert all(s.get_linewidth() >= 3 for s in spines)
    assert [ax.get_title() for ax in fig.axes] == ["#1 0.93", "", "#3"]
    # Cells are square and letterboxed on white, whatever the photo's shape.
    arr = fig.axes[1].get_images()[0].get_array()
    assert arr.shape[0] == arr.shape[1] and arr.shape[2] == 3
    assert tuple(arr[0, 0]) == (255, 255, 255)


def test_image_grid_wraps_long_captions_to_two_lines(records):
    long = "夏季新款女装连衣裙" * 8
    fig = viz.image_grid(_paths(records, 1), [long], cell_size=2.2)
    label = fig.axes[0].get_xlabel()
    lines = label.split("\n")
    assert len(lines) == 2
    assert label.endswith("…")
    assert label.replace("\n", "").rstrip("…") == long[: len(label.replace("\n", "")) - 1]


def test_image_grid_rejects_bad_input(records, tmp_path):
    paths = _paths(records, 2)
    with pytest.raises(ValueError, match="at least one image"):
        viz.image_grid([])
    with pytest.raises(ValueError, match="captions has 1 entries but there are 2 images"):
        viz.image_grid(paths, ["一"])
    with pytest.raises(ValueError, match="frame_colors has 3 entries"):
        viz.image_grid(paths, frame_colors=["red"] * 3)
    bad = tmp_path / "not.jpg"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="not.jpg"):  # BadImageError is a ValueError
        viz.image_grid([bad])


# ---------------------------------------------------------------- category_grid


def _relative(records):
    return [{"image": r["image"], "text": r["text"], "label": r["label"]} for r in records]


def _rows(fig):
    rows = {}
    for ax in fig.axes:
        rows.setdefault(_row(ax), []).append(ax)
    return rows


def test_category_grid_one_row_per_category(records):
    recs = _relative(records)
    labels = sorted({r["label"] for r in recs})
    fig = viz.category_grid(recs, per_category=2, image_root=SAMPLE_DATA)
    rows = _rows(fig)
    assert len(fig.axes) == 2 * len(labels)
    assert sorted(rows) == list(range(len(labels)))
    by_path = {str(SAMPLE_DATA / r["image"]): r for r in recs}
    for row, label in enumerate(labels):
        axes = rows[row]
        assert len(axes) == 2
        assert axes[0].get_ylabel() == label
        for ax in axes:
            rec = by_path[ax.get_gid()]  # gid is the resolved, existing path
            assert rec["label"] == label
            assert ax.get_xlabel() == rec["text"]


def test_category_grid_pick_is_deterministic(records, monkeypatch):
    monkeypatch.chdir(SAMPLE_DATA)  # relative paths, no image_root
    recs = _relative(records)
    shuffled = recs[:]
    random.Random(7).shuffle(shuffled)

    def picks(rs, seed):
        return [ax.get_gid() for ax in viz.category_grid(rs, per_category=2, seed=seed).axes]

    first = picks(recs, 0)
    assert picks(recs, 0) == first
    assert picks(shuffled, 0) == first  # input order does not matter
    assert picks(recs, 1) != first
    # Without image_root the paths stay as given (relative).
    assert all(not os.path.isabs(p) and p.startswith("images/") for p in first)


def test_category_grid_small_category_and_bad_record(records):
    recs = [r for r in records if r["label"] == "hat"][:5] + [r for r in records if r["label"] == "shoes"][:1]
    fig = viz.category_grid(recs, per_category=3, image_root=SAMPLE_DATA)
    rows = _rows(fig)
    assert [rows[0][0].get_ylabel(), rows[1][0].get_ylabel()] == ["hat", "shoes"]
    assert [len(rows[0]), len(rows[1])] == [3, 1]
    with pytest.raises(ValueError, match="record 1 has no 'label'"):
        viz.category_grid([recs[0], {"image": "x.jpg", "text": "帽子"}])
    with pytest.raises(ValueError, match="at least one record"):
        viz.category_grid([])


# ---------------------------------------------------------------- plot_history


def _history(n=30):
    rows = []
    for step in range(n):
        row = {
            "step": step * 10,
            "epoch": step // 10,
            "loss/total": 3.0 - 0.05 * step,
            "loss/contrastive": 2.5 - 0.04 * step,
            "lr": 1e-5 * (step + 1) / n,
            "samples_per_s": 120.0,
        }
        if step % 2 == 0:  # logged every other step only
            row["loss/kd_cosine"] = 0.5 - 0.01 * step
        rows.append(row)
    return rows


def test_plot_history_panels_and_lines():
    history = _history()
    fig = viz.plot_history(history)
    assert len(fig.axes) == 2
    loss_ax, lr_ax = fig.axes
    lines = {ln.get_label(): ln for ln in loss_ax.get_lines()}
    assert list(lines) == ["loss/total", "loss/contrastive", "loss/kd_cosine"]
    np.testing.assert_allclose(lines["loss/total"].get_xdata(), [r["step"] for r in history])
    np.testing.assert_allclose(lines["loss/total"].get_ydata(), [r["loss/total"] for r in history])
    np.testing.assert_allclose(lines["loss/kd_cosine"].get_xdata(), [r["step"] for r in history[::2]])
    assert "步数" in loss_ax.get_xlabel() and "step" in loss_ax.get_xlabel()
    np.testing.assert_allclose(lr_ax.get_lines()[0].get_ydata(), [r["lr"] for r in history])
    assert "学习率" in lr_ax.get_title()
    assert _missing_glyph_warnings(fig) == []


def test_plot_history_with_validation_and_keys():
    val = [{"epoch": 0, "p@10": 0.41}, {"epoch": 1, "p@10": 0.52}, {"epoch": 2, "p@10": 0.58}]
    fig = viz.plot_history(_history(), keys=["loss/total"], val=val)
    assert len(fig.axes) == 3
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["loss/total"]
    (p10,) = fig.axes[2].get_lines()
    assert p10.get_label() == "p@10"
    np.testing.assert_allclose(p10.get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(p10.get_ydata(), [0.41, 0.52, 0.58])
    assert "轮次" in fig.axes[2].get_xlabel()


def test_plot_history_without_lr_and_errors():
    history = [{"step": i, "loss/total": 1.0 / (i + 1)} for i in range(5)]
    assert len(viz.plot_history(history).axes) == 1
    with pytest.raises(ValueError, match="history is empty"):
        viz.plot_history([])
    with pytest.raises(ValueError, match=r"keys in history: \['lr', 'step'\]"):
        viz.plot_history([{"step": 0, "lr": 1e-5}])


# ---------------------------------------------------------------- save_figure


def _small_fig():
    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    return fig


def test_save_figure_writes_png_atomically(tmp_path):
    target = tmp_path / "a" / "b" / "curves.png"
    out = viz.save_figure(_small_fig(), target)
    assert out == target
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(target) as img:
        assert img.format == "PNG" and img.width > 100
    assert os.listdir(target.parent) == ["curves.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_figure_failure_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    fig = _small_fig()

    def broken_savefig(fh, **kwargs):
        fh.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", broken_savefig)
    with pytest.raises(RuntimeError, match="disk full"):
        viz.save_figure(fig, target)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["fig.png"]


def test_save_figure_replaces_existing_and_follows_suffix(tmp_path):
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    viz.save_figure(_small_fig(), target)
    assert target.read_bytes()[:4] == b"\x89PNG"
    svg = viz.save_figure(_small_fig(), tmp_path / "fig.svg")
    assert b"<svg" in svg.read_bytes()[:500]
    assert sorted(os.listdir(tmp_path)) == ["fig.png", "fig.svg"]


# ---------------------------------------------------------------- top-10 with a text query


def _hits(records, n=10):
    return [{"image": str(SAMPLE_DATA / r["image"]), "caption": r["text"], "label": r["label"],
             "score": 0.9 - i / 100} for i, r in enumerate(records[::13][:n])]


def _query_text(fig) -> str:
    (artist,) = [t for t in fig.axes[0].texts if t.get_gid() == "query-text"]
    return artist.get_text()


def test_top10_figure_shows_a_text_query_in_the_first_cell(records):
    hits = _hits(records)
    text = "白色连衣裙 长袖雪纺 women's white chiffon dress 2024"
    fig = viz.top10_figure(None, None, hits, query_text=text, title="模型 A")
    photo = viz.top10_figure(hits[0]["image"], None, hits, title="模型 A")

    assert [ax.get_gid() for ax in fig.axes] == ["query"] + [f"top-{i}" for i in range(1, 11)]
    query = fig.axes[0]
    shown = _query_text(fig)
    assert "".join(shown.split()) == "".join(text.split())  # all of it, wrapped at spaces or between characters
    assert "women's" in shown.split("\n")[1] or "women's" in shown.split("\n")[2]  # a Latin word is not split
    assert len(shown.split("\n")) > 1 and not shown.endswith("…")
    assert query.texts[0].get_fontname() == fonts.setup_cjk_font()  # the CJK font: characters, not boxes
    assert _missing_glyph_warnings(fig) == []
    # A blank photo-sized cell in the query's blue frame, labelled as a text query.
    arr = query.get_images()[0].get_array()
    assert arr.shape[0] == arr.shape[1] and (np.asarray(arr) == 255).all()
    assert to_rgba(query.spines["top"].get_edgecolor()) == to_rgba(viz.QUERY_COLOR)
    assert query.get_title() == "查询 query · 文本 text" and query.get_xlabel() == ""

    # Results laid out as for a photo query: same grid cells, same places on the page.
    def spans(f):
        return [(ax.get_subplotspec().rowspan.start, ax.get_subplotspec().colspan.start) for ax in f.axes]

    assert spans(fig) == spans(photo) == [(0, 0)] + [(r, c) for r in (0, 1) for c in range(1, 6)]
    fig.draw_without_rendering()
    photo.draw_without_rendering()
    np.testing.assert_allclose([ax.get_position().bounds for ax in fig.axes],
                               [ax.get_position().bounds for ax in photo.axes], atol=1e-3)
    # No query category: every hit grey, no same/other verdict.
    for i, ax in enumerate(fig.axes[1:]):
        assert to_rgba(ax.spines["top"].get_edgecolor()) == to_rgba(viz.UNKNOWN_COLOR)
        assert ax.get_title() == f"Top-{i + 1}  {hits[i]['score']:.3f}"
        assert ax.get_xlabel() == hits[i]["caption"]


def test_top10_figure_text_query_with_a_label_and_long_text(records, tmp_path):
    hits = _hits(records, 4)
    fig = viz.top10_figure(None, None, hits, query_text="连衣裙", query_label=hits[0]["label"])
    colours = [to_rgba(ax.spines["top"].get_edgecolor()) for ax in fig.axes[1:]]
    assert colours == [to_rgba(viz.HIT_COLOR if h["label"] == hits[0]["label"] else viz.MISS_COLOR) for h in hits]
    assert len(fig.axes) == 5 and fig.axes[0].get_title() == f"查询 query · 文本 text · {hits[0]['label']}"

    long = "夏季新款女装白色长袖雪纺连衣裙" * 10
    fig = viz.top10_figure(None, None, hits, query_text=long)
    shown = _query_text(fig)
    assert len(shown.split("\n")) == 6 and shown.endswith("…")
    assert long.startswith(shown.replace("\n", "").rstrip("…"))
    with Image.open(viz.save_figure(fig, tmp_path / "text.png")) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]


def test_top10_figure_needs_exactly_one_query(records):
    hits = _hits(records, 2)
    with pytest.raises(ValueError, match="exactly one query"):
        viz.top10_figure(None, None, hits)
    with pytest.raises(ValueError, match="exactly one query"):
        viz.top10_figure(hits[0]["image"], None, hits, query_text="连衣裙")
    with pytest.raises(ValueError, match="query_text is empty"):
        viz.top10_figure(None, None, hits, query_text=" \n ")
