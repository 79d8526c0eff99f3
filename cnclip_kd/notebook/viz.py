"""Figures for the notebooks: photo grids with Chinese captions, training curves.

Chinese product titles must show as characters, not boxes ("tofu"), so every
figure function first calls :func:`setup_cjk_font`, which finds an installed
font with Chinese glyphs and puts it first in matplotlib's sans-serif list.
The kit depends on the PyPI package ``pylopdf-fonts-zh-cn`` (Noto Sans SC,
SIL OFL 1.1) for that; a system CJK font (Debian/Ubuntu ``fonts-noto-cjk``,
``fonts-wqy-microhei``, ...) or ``mplfonts`` works as well.

The functions return plain :class:`matplotlib.figure.Figure` objects that are
not registered with pyplot (no global state, no leaked figures in loops and
tests). In a notebook, make the figure the cell's last value or call
``IPython.display.display(fig)`` (with ``%matplotlib inline``); save it with
:func:`save_figure`.
"""

from __future__ import annotations

import math
import os
import random
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageOps

from ..core.images import load_image
from .fonts import setup_cjk_font

ImageLike = Union[Image.Image, str, os.PathLike, bytes]


# ---------------------------------------------------------------- grids


def _text_width(ch: str) -> float:
    """Approximate width of a character in units of one CJK character."""
    return 1.0 if unicodedata.east_asian_width(ch) in ("W", "F") else 0.55


def _wrap_caption(text: str, max_units: float, max_lines: int = 2) -> str:
    """Wrap mixed Chinese/Latin text to lines of ``max_units`` CJK widths, with an ellipsis if cut."""
    lines, line, used = [], "", 0.0
    for ch in " ".join(str(text).split()):
        w = _text_width(ch)
        if line and used + w > max_units:
            lines.append(line)
            line, used = "", 0.0
            if ch == " ":
                continue
        line += ch
        used += w
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:-1] + "…"
    return "\n".join(lines)


def _wrap_words(text: str, max_units: float, max_lines: int) -> str:
    """Like :func:`_wrap_caption`, but a Latin word or number moves to the next line whole when it fits there.

    CJK characters may break anywhere (as in Chinese typesetting); a run of other
    non-space characters is a word, cut only when it is longer than a line.
    """
    words, word = [], ""
    for ch in " ".join(str(text).split()):
        if ch == " " or _text_width(ch) == 1.0:
            if word:
                words.append(word)
                word = ""
            words.append(ch)
        else:
            word += ch
    if word:
        words.append(word)
    lines, line, used = [], "", 0.0
    for token in words:
        width = sum(_text_width(ch) for ch in token)
        if line and used + width > max_units and width <= max_units:
            lines.append(line.rstrip())
            line, used = "", 0.0
            if token == " ":
                continue
        if width > max_units:  # longer than a line: character by character
            for ch in token:
                if line and used + _text_width(ch) > max_units:
                    lines.append(line.rstrip())
                    line, used = "", 0.0
                line += ch
                used += _text_width(ch)
            continue
        line += token
        used += width
    if line.strip():
        lines.append(line.rstrip())
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:-1] + "…"
    return "\n".join(lines)


def _as_square_array(image: ImageLike, side: int) -> np.ndarray:
    """Load ``image`` and letterbox it on white to a ``side`` x ``side`` RGB array."""
    if isinstance(image, Image.Image):
        img = image.convert("RGB")
    else:
        img = load_image(image)
    # Shrink first so padding and drawing work on a thumbnail, not a 12 MP photo.
    img.thumbnail((side, side), Image.BICUBIC)
    return np.asarray(ImageOps.pad(img, (side, side), color=(255, 255, 255)))


def _image_id(image: ImageLike) -> str | None:
    """A path-like image's path, used as the cell's ``gid``."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return None


def _check_len(name: str, values: Sequence | None, n: int) -> None:
    if values is not None and len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries but there are {n} images")


def _draw_cells(
    cells: Sequence[dict[str, Any]],
    nrows: int,
    ncols: int,
    *,
    title: str | None,
    cell_size: float,
    row_labels: Mapping[int, str] | None = None,
) -> Figure:
    """Draw one axes per cell at ``cell["row"], cell["col"]``; returns the figure."""
    setup_cjk_font()
    has_sub = any(c.get("subtitle") for c in cells)
    cap_lines = max((c["caption"].count("\n") + 1 for c in cells if c.get("caption")), default=0)
    # Room under each photo for caption lines and above it for a subtitle.
    row_h = cell_size + 0.18 * cap_lines + (0.25 if has_sub else 0.0)
    label_w = 1.0 if row_labels else 0.0
    fig = Figure(
        figsize=(ncols * cell_size + label_w, nrows * row_h + (0.45 if title else 0.1)),
        layout="constrained",
    )
    grid = fig.add_gridspec(nrows, ncols)
    # About one image pixel per output pixel at save_figure's dpi, with a little headroom.
    side = max(64, int(round(cell_size * 128)))
    for cell in cells:
        ax = fig.add_subplot(grid[cell["row"], cell["col"]])
        if cell.get("text") is not None:
            # A blank square keeps the cell the size and shape of a photo cell; the text sits on it.
            ax.imshow(np.full((side, side, 3), 255, dtype=np.uint8))
            ax.text(0.5, 0.5, cell["text"], transform=ax.transAxes, ha="center", va="center",
                    fontsize=cell.get("fontsize", 12), linespacing=1.4, gid=cell.get("text_gid"))
        else:
            ax.imshow(_as_square_array(cell["image"], side))
        ax.set_xticks([])
        ax.set_yticks([])
        if cell.get("gid"):
            ax.set_gid(cell["gid"])
        frame = cell.get("frame")
        for spine in ax.spines.values():
            spine.set_visible(frame is not None)
            if frame is not None:
                spine.set_edgecolor(frame)
                spine.set_linewidth(4)
        if cell.get("caption"):
            ax.set_xlabel(cell["caption"], fontsize=8, labelpad=3)
        if cell.get("subtitle"):
            ax.set_title(cell["subtitle"], fontsize=8, pad=3)
        if row_labels and cell["col"] == 0 and cell["row"] in row_labels:
            ax.set_ylabel(row_labels[cell["row"]], fontsize=11, rotation=0, ha="right", va="center", labelpad=8)
    if title:
        fig.suptitle(title, fontsize=12)
    return fig


def image_grid(
    images: Sequence[ImageLike],
    captions: Sequence[str | None] | None = None,
    *,
    ncols: int = 5,
    title: str | None = None,
    cell_size: float = 2.2,
    frame_colors: Sequence[Any] | None = None,
    subtitles: Sequence[str | None] | None = None,
) -> Figure:
    """Show photos in a grid, with Chinese captions under them.

    Photos are letterboxed on white to square cells. Each image axes has no
    ticks; when an image is given as a path, the axes' ``gid`` is that path.

    Args:
        images: PIL images, image file paths, or encoded image bytes.
        captions: Text under each photo (wrapped to two lines, cut with "…"),
            or ``None`` entries for none.
        ncols: Cells per row.
        title: Figure title.
        cell_size: Width of one cell in inches.
        frame_colors: One matplotlib colour per cell (e.g. green for a Top-10
            hit, red for a miss), or ``None`` for no frame.
        subtitles: Short text above each photo (e.g. "#1 0.93"), or ``None``.

    Returns:
        The figure, with exactly ``len(images)`` axes.

    Raises:
        ValueError: No images, ``ncols < 1``, or a per-cell list whose length
            differs from ``images``.
        cnclip_kd.core.images.BadImageError: An image file cannot be read.
    """
    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    for name, values in (("captions", captions), ("frame_colors", frame_colors), ("subtitles", subtitles)):
        _check_len(name, values, len(images))
    ncols = min(ncols, len(images))
    max_units = cell_size * 72 / 8 * 0.95  # CJK characters per line at 8 pt
    cells = []
    for i, image in enumerate(images):
        caption = captions[i] if captions is not None else None
        cells.append(
            {
                "row": i // ncols,
                "col": i % ncols,
                "image": image,
                "gid": _image_id(image),
                "caption": _wrap_caption(caption, max_units) if caption else None,
                "subtitle": subtitles[i] if subtitles is not None else None,
                "frame": frame_colors[i] if frame_colors is not None else None,
            }
        )
    return _draw_cells(cells, math.ceil(len(images) / ncols), ncols, title=title, cell_size=cell_size)


def category_grid(
    records: Iterable[Mapping[str, Any]],
    *,
    per_category: int = 4,
    image_root: str | os.PathLike | None = None,
    seed: int = 0,
) -> Figure:
    """Show a few photos of each category: one row per category, captions under the photos.

    The pick is deterministic: for each category, ``per_category`` records are
    sampled (with a generator seeded by ``seed`` and the category) from that
    category's records sorted by image path, so the input order does not
    matter. Rows are in sorted category order; the row label is the category.

    Args:
        records: Dicts with keys ``"image"`` (path or encoded bytes),
            ``"text"`` (caption) and ``"label"`` (category).
        per_category: Photos per row (fewer when a category has fewer).
        image_root: Folder that relative image paths are relative to.
        seed: Changes which photos are picked.

    Returns:
        The figure; each photo's axes has ``gid`` = its resolved path.

    Raises:
        ValueError: No records, ``per_category < 1``, or a record without one
            of the three keys.
    """
    if per_category < 1:
        raise ValueError(f"per_category must be >= 1, got {per_category}")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for i, rec in enumerate(records):
        missing = [k for k in ("image", "text", "label") if k not in rec]
        if missing:
            raise ValueError(f"record {i} has no {', '.join(map(repr, missing))} (keys: {sorted(rec)})")
        groups.setdefault(str(rec["label"]), []).append(rec)
    if not groups:
        raise ValueError("category_grid needs at least one record")

    def resolve(image: Any) -> Any:
        if image_root is not None and isinstance(image, (str, os.PathLike)) and not Path(image).is_absolute():
            return os.fspath(Path(image_root) / image)
        return image

    max_units = 2.2 * 72 / 8 * 0.95
    cells, row_labels = [], {}
    for row, label in enumerate(sorted(groups)):
        # Sort so the pick depends on the records, not the order they came in.
        pool = sorted(groups[label], key=lambda r: (str(r["image"]), str(r["text"])))
        # A per-category generator: one category's size cannot change another's pick.
        picked = random.Random(f"{seed}:{label}").sample(pool, min(per_category, len(pool)))
        row_labels[row] = label
        for col, rec in enumerate(picked):
            image = resolve(rec["image"])
            cells.append(
                {
                    "row": row,
                    "col": col,
                    "image": image,
                    "gid": _image_id(image),
                    "caption": _wrap_caption(rec["text"], max_units) if rec["text"] else None,
                }
            )
    return _draw_cells(cells, len(groups), per_category, title=None, cell_size=2.2, row_labels=row_labels)


# ---------------------------------------------------------------- curves


def _series(rows: Sequence[Mapping[str, Any]], x_key: str, key: str) -> tuple[list, list]:
    """(x, y) for the rows that have a numeric ``key``; x falls back to the row index."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            xs.append(row.get(x_key, i))
            ys.append(float(value))
    return xs, ys


def plot_history(
    history: Sequence[Mapping[str, Any]],
    *,
    keys: Sequence[str] | None = None,
    val: Sequence[Mapping[str, Any]] | None = None,
) -> Figure:
    """Plot training curves: losses, learning rate, and optional validation metrics.

    Panels, left to right: the loss curves against ``step``; the learning rate
    (when any row has ``"lr"``); the validation metrics against ``epoch``
    (when ``val`` is given: every numeric key except ``"epoch"``, e.g.
    ``"p@10"``). Rows missing a key are skipped for that curve.

    Args:
        history: One dict per logged step, e.g. ``{"step": 10, "epoch": 0,
            "loss/total": 2.1, "loss/contrastive": 1.9, "loss/kd_cosine": 0.2,
            "lr": 1e-5}``.
        keys: Loss keys to draw; default: every key starting with ``"loss/"``,
            in order of first appearance.
        val: One dict per evaluation, e.g. ``{"epoch": 1, "p@10": 0.62}``.

    Returns:
        The figure (one axes per panel; each curve's line label is its key).

    Raises:
        ValueError: ``history`` is empty, or none of the loss keys has a value.
    """
    history = list(history)
    if not history:
        raise ValueError("history is empty: nothing to plot")
    if keys is None:
        keys = list(dict.fromkeys(k for row in history for k in row if k.startswith("loss/")))
    curves = {k: _series(history, "step", k) for k in keys}
    curves = {k: xy for k, xy in curves.items() if xy[1]}
    if not curves:
        available = sorted({k for row in history for k in row})
        raise ValueError(f"no loss values to plot for keys {list(keys)}; keys in history: {available}")
    lr = _series(history, "step", "lr")
    val = list(val or [])
    val_keys = list(dict.fromkeys(k for row in val for k in row if k != "epoch"))
    val_curves = {k: _series(val, "epoch", k) for k in val_keys}
    val_curves = {k: xy for k, xy in val_curves.items() if xy[1]}

    setup_cjk_font()
    n_panels = 1 + bool(lr[1]) + bool(val_curves)
    fig = Figure(figsize=(5.0 * n_panels, 3.6), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]

    ax = axes[0]
    for key, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=key, linewidth=1.2)
    ax.set_title("训练损失 training loss")
    ax.set_xlabel("步数 step")
    ax.set_ylabel("损失 loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    panel = 1
    if lr[1]:
        ax = axes[panel]
        ax.plot(*lr, label="lr", color="tab:purple", linewidth=1.2)
        ax.set_title("学习率 learning rate")
        ax.set_xlabel("步数 step")
        ax.set_ylabel("学习率 lr")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        panel += 1
    if val_curves:
        ax = axes[panel]
        for key, (xs, ys) in val_curves.items():
            ax.plot(xs, ys, marker="o", label=key, linewidth=1.2)
        ax.set_title("验证集 validation")
        ax.set_xlabel("轮次 epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("指标 metric")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig


# ---------------------------------------------------------------- saving


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Save ``fig`` atomically: readers never see a half-written file.

    The figure is written to a temporary file in the target folder and moved
    into place with :func:`os.replace`. Parent folders are created. The format
    follows the suffix (PNG when there is none); the figure is not closed.

    Args:
        fig: The figure.
        path: Target file, e.g. ``out/figures/top10.png``.
        dpi: Resolution for raster formats.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # os.open with 0o666 honours the umask (mkstemp would leave the file 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=fmt, dpi=dpi, bbox_inches="tight", facecolor="white")
        os.replace(tmp, path)
    except BaseException:
        # Leave no temp file behind, whatever went wrong (also Ctrl-C).
        tmp.unlink(missing_ok=True)
        raise
    return path


def latency_quality_figure(points: Sequence[Mapping[str, Any]], *, budget_ms: float | None = None,
                           title: str = "") -> Figure:
    """Retrieval quality against query latency: one line per student family, one marker per variant.

    Args:
        points: Dicts with ``family`` (a line, e.g. ``"ViT"``), ``variant`` (a marker series, e.g.
            ``"KD"``), ``latency_ms`` (x), ``quality`` (y, e.g. held-out P@10), optional
            ``quality_sd`` (an error bar) and ``label`` (written beside the point, e.g. ``"ViT-B-16@160"``).
        budget_ms: Draw the latency budget as a vertical line.
        title: Figure title.

    Returns:
        The figure (save it with :func:`save_figure`).
    """
    setup_cjk_font()
    fig = Figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    markers = ["o", "s", "^", "D", "v"]
    variants = list(dict.fromkeys(str(p["variant"]) for p in points))
    for family in dict.fromkeys(str(p["family"]) for p in points):
        for vi, variant in enumerate(variants):
            pts = sorted((p for p in points if str(p["family"]) == family and str(p["variant"]) == variant),
                         key=lambda p: p["latency_ms"])
            if not pts:
                continue
            xs, ys = [p["latency_ms"] for p in pts], [p["quality"] for p in pts]
            ax.errorbar(xs, ys, yerr=[p.get("quality_sd") or 0.0 for p in pts], marker=markers[vi % len(markers)],
                        capsize=3, label=f"{family} · {variant}")
            for p in pts:
                if p.get("label") and vi == 0:
                    ax.annotate(str(p["label"]), (p["latency_ms"], p["quality"]), textcoords="offset points",
                                xytext=(4, -12), fontsize=8)
    if budget_ms:
        ax.axvline(budget_ms, color="#d62728", linestyle="--", linewidth=1, label=f"budget {budget_ms:g} ms")
    ax.set_xlabel("query latency p50, ms (end to end, CPU)")
    ax.set_ylabel("held-out P@10")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- top-10


#: Frame colours of :func:`top10_figure`.
HIT_COLOR = "#2ca02c"  # same category as the query
MISS_COLOR = "#d62728"  # another category
UNKNOWN_COLOR = "#9e9e9e"  # the query's or the hit's category is unknown
QUERY_COLOR = "#1f77b4"


def _hit_color(query_label: Any, label: Any) -> str:
    if query_label in (None, "") or label in (None, ""):
        return UNKNOWN_COLOR
    return HIT_COLOR if str(label) == str(query_label) else MISS_COLOR


#: Font size (points) of a text query in the top-left cell of :func:`top10_figure`.
QUERY_TEXT_FONTSIZE = 12
# Lines of a text query shown before it is cut with "…" (a cell holds about this many at 12 pt).
_QUERY_TEXT_LINES = 6


def top10_figure(
    query_image: ImageLike | None,
    query_caption: str | None,
    results: Sequence[Mapping[str, Any]],
    *,
    title: str | None = None,
    query_label: str | None = None,
    cell_size: float = 2.0,
    query_text: str | None = None,
) -> Figure:
    """The Top-10 layout: the query at the top left, Top-1 … Top-10 to its right in two rows of five.

    Each hit is framed green when it has the query's category, red when it has
    another, grey when either is unknown; above it "Top-i", its score and 同类/异类
    (same/other category), under it its caption (Chinese renders as characters).

    The query is a photo (``query_image``) or a text (``query_text``, e.g. "白色连衣裙"):
    a text query is written, wrapped and in the CJK font, on a blank cell of the
    photo's size, so the results sit exactly where they sit for a photo. A text
    has no category of its own, so unless ``query_label`` is given its hits are
    framed grey.

    Example::

        top10_figure(None, None, index.results(scores[0], rows[0]), query_text="白色连衣裙")

    Args:
        query_image: The query photo (PIL image, path or encoded bytes), or ``None`` with ``query_text``.
        query_caption: Its caption (under the query cell), or ``None``.
        results: Up to 10 hits, best first, each a dict with ``"image"`` (PIL image,
            path or bytes) and optionally ``"score"``, ``"caption"``, ``"label"``
            (e.g. :meth:`cnclip_kd.retrieval.index.GalleryIndex.results`).
        title: Figure title (e.g. the model's name).
        query_label: The query's category; ``None`` frames every hit grey.
        cell_size: Width of one photo in inches.
        query_text: A text query, shown in place of the photo (give ``query_image=None``).

    Returns:
        The figure: 11 (or fewer) image axes, ``gid`` ``"query"`` and ``"top-1"`` …
        ``"top-10"``, and a legend under the grid. A text query is the ``"query"``
        axes' text artist with ``gid`` ``"query-text"`` (wrapped with newlines, cut with "…"
        after six lines).

    Raises:
        ValueError: More than 10 results, a result without ``"image"``, or not exactly one
            of ``query_image`` and ``query_text`` (an empty text included).
    """
    results = list(results)
    if len(results) > 10:
        raise ValueError(f"top10_figure shows at most 10 results, got {len(results)}")
    for i, hit in enumerate(results):
        if "image" not in hit or hit["image"] is None:
            raise ValueError(f"result {i + 1} has no 'image' (keys: {sorted(hit)})")
    if (query_image is None) == (query_text is None):
        raise ValueError("top10_figure needs exactly one query: query_image (a photo) or query_text (a text)")
    if query_text is not None and not str(query_text).strip():
        raise ValueError("query_text is empty: nothing to show as the query")
    max_units = cell_size * 72 / 8 * 0.95
    query_sub = "查询 query" + (" · 文本 text" if query_text is not None else "") + (
        f" · {query_label}" if query_label else "")
    query_cell = {"row": 0, "col": 0, "image": query_image, "gid": "query", "frame": QUERY_COLOR,
                  "subtitle": query_sub,
                  "caption": _wrap_caption(query_caption, max_units) if query_caption else None}
    if query_text is not None:
        # CJK widths per line at the text's size, leaving a margin inside the frame.
        text_units = cell_size * 72 / QUERY_TEXT_FONTSIZE * 0.85
        query_cell.update(text=_wrap_words(query_text, text_units, max_lines=_QUERY_TEXT_LINES),
                          text_gid="query-text", fontsize=QUERY_TEXT_FONTSIZE)
    cells = [query_cell]
    for i, hit in enumerate(results):
        color = _hit_color(query_label, hit.get("label"))
        verdict = {HIT_COLOR: " 同类", MISS_COLOR: " 异类", UNKNOWN_COLOR: ""}[color]
        score = hit.get("score")
        subtitle = f"Top-{i + 1}" + (f"  {float(score):.3f}" if score is not None else "") + verdict
        caption = hit.get("caption")
        cells.append({"row": i // 5, "col": 1 + i % 5, "image": hit["image"], "gid": f"top-{i + 1}",
                      "frame": color, "subtitle": subtitle,
                      "caption": _wrap_caption(caption, max_units) if caption else None})
    fig = _draw_cells(cells, 2 if len(results) > 5 else 1, 6, title=title, cell_size=cell_size)
    fig.supxlabel("绿框 同类目 green: same category · 红框 其他类目 red: other category · "
                  "灰框 类目未知 grey: unknown", fontsize=8, color="#444444")
    return fig
