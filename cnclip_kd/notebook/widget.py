"""Interactive query demo (notebook ``05_query_demo``): pick or upload a photo, or type a description; see the Top-k.

:class:`QueryDemo` wraps one or more saved indexes (one per model, written by
notebook 03 / :func:`cnclip_kd.retrieval.evaluate.index_model`) in an ipywidgets panel:

* the query is a gallery image (dropdown with a thumbnail), an uploaded photo
  (``FileUpload``; files over the size limit and files that are not images are
  refused with a message in the panel, never a traceback) or a text
  ("白色连衣裙", typed in the text box; Enter or **Search** runs it);
* the model and ``k`` are chosen in the panel; **Search** runs the query and
  fills a grid of thumbnails with rank, score, caption and a same / other
  category frame (when the query's category is known), plus the query time.

The three steps are separate so that tests and notebooks can drive the panel
without a browser: :meth:`QueryDemo.build` creates the widgets (no file is
read), :meth:`QueryDemo.update` runs the current query, :meth:`QueryDemo.show`
displays the panel. The outcome is kept on the object (:attr:`QueryDemo.results`,
:attr:`QueryDemo.status`, :attr:`QueryDemo.last_query_ms`).

The panel is only the UI: the queries are a :class:`cnclip_kd.retrieval.session.QuerySession`
(:attr:`QueryDemo.session`), which spells them as the CPU server and ``cnclip-kd search`` do.
A gallery query searches with the embedding stored in the model's index (so it
costs one index search) and leaves the query image itself out of its results;
an uploaded photo is decoded (:func:`cnclip_kd.retrieval.session.load_query_image`) and
encoded by the model's encoder, loaded on first use from the spec the index
recorded (``stats["model"]["spec"]``). A text query is checked with
:func:`cnclip_kd.core.tokenizer.check_query` and encoded by the same model's text
tower (:func:`cnclip_kd.retrieval.encoders.text_encoder_for`, sharing the loaded model);
a model without one (an image-only teacher such as EfficientNet-Lite) says so
in the status line, and the other models still answer text. A text has no
category, so its hits are framed grey.
"""

from __future__ import annotations

import html
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
from PIL import Image, ImageOps

from ..core.images import BadImageError, encode_jpeg, fit_max_side
from ..core.tokenizer import NoTextTowerError, QueryError
from ..retrieval.session import GALLERY, TEXT, UPLOAD, Query, QueryAnswer, QuerySession, results_markdown
from .viz import HIT_COLOR, MISS_COLOR, QUERY_COLOR, UNKNOWN_COLOR

if TYPE_CHECKING:  # pragma: no cover
    from ..retrieval.encoders import ImageEncoder
    from ..retrieval.gallery import Gallery
    from ..retrieval.index import GalleryIndex

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "QueryDemo"]

#: Uploads larger than this are refused (10 MB: any phone photo fits).
DEFAULT_MAX_UPLOAD_BYTES = 10 * 2 ** 20
#: Accepted by the upload button's file dialog (the check itself decodes the file).
_ACCEPT = "image/*,.jpg,.jpeg,.png,.webp,.bmp,.gif,.tif,.tiff"
_TEXT_PLACEHOLDER = "输入商品描述 type a description, e.g. 白色连衣裙"
_THUMB_CACHE = 512  # thumbnails kept in memory (a few KB each)
_FRAME = {True: HIT_COLOR, False: MISS_COLOR, None: UNKNOWN_COLOR}

# CSS classes on the widgets, for the browser test and for styling.
CSS = {"root": "cnclip-demo", "search": "cnclip-search", "upload": "cnclip-upload", "text": "cnclip-text",
       "grid": "cnclip-grid", "hit": "cnclip-hit", "status": "cnclip-status", "time": "cnclip-time",
       "header": "cnclip-header"}


def _thumbnail_bytes(img: Image.Image, side: int) -> bytes:
    """A ``side`` × ``side`` JPEG, the photo fitted inside on white (an even grid whatever the aspect ratio)."""
    small = fit_max_side(img.convert("RGB"), side)
    return encode_jpeg(ImageOps.pad(small, (side, side), color=(255, 255, 255)), quality=85)


def _size(n: int) -> str:
    """A byte count for people: ``10 MB``, ``10.4 MB``, ``200 KB``, ``900 B``."""
    if n >= 2 ** 20:
        mb = n / 2 ** 20
        return f"{mb:.0f} MB" if mb == int(mb) else f"{mb:.1f} MB"
    return f"{n / 1024:.0f} KB" if n >= 1024 else f"{n} B"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Thumbnails:
    """The last ``_THUMB_CACHE`` thumbnails (JPEG bytes), by key."""

    def __init__(self, side: int):
        self.side = side
        self._cache: OrderedDict = OrderedDict()

    def get(self, key: tuple, make: Callable[[], Image.Image]) -> bytes:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        data = self._cache[key] = _thumbnail_bytes(make(), self.side)
        if len(self._cache) > _THUMB_CACHE:
            self._cache.popitem(last=False)
        return data

    def of_row(self, gallery, row: int) -> bytes:
        return self.get((id(gallery), int(row)), lambda: gallery.image(int(row)))


def _hit_cell(w: Any, hit: Mapping[str, Any], thumb: bytes, px: int) -> Any:
    """One grid cell: the thumbnail, rank, score, verdict, caption and id, in a frame of the verdict's colour."""
    color = _FRAME[hit["same_category"]]
    verdict = {True: " 同类", False: " 异类", None: ""}[hit["same_category"]]
    image = w.Image(value=thumb, format="jpeg", layout=w.Layout(width=f"{px}px"))
    label = f" · {html.escape(hit['label'])}" if hit["label"] else ""
    text = w.HTML(f"<div style='font-size:12px;line-height:1.3'><b style='color:{color}'>"
                  f"Top-{hit['rank']}</b> {hit['score']:.3f}{verdict}<br>"
                  f"<span title='{html.escape(hit['caption'], quote=True)}'>"
                  f"{html.escape(_short(hit['caption'], 30))}</span><br>"
                  f"<span style='color:#666'>id {hit['id']}{label}</span></div>", layout=w.Layout(width=f"{px}px"))
    cell = w.VBox([image, text], layout=w.Layout(border=f"3px solid {color}", padding="3px"))
    cell.add_class(CSS["hit"])
    return cell


def _header(model: str, query: Query, n: int) -> str:
    """The line above the grid: Top-n, the model, the query and what the frame colours mean."""
    label = f" · {html.escape(query.label)}" if query.label else ""
    if query.label:
        legend = " · 绿框 同类目 green: same category · 红框 其他类目 red: other"
    elif query.source == TEXT:
        legend = " · 灰框：文本查询没有类目 grey: a text query has no category"
    else:
        legend = ""
    kind = "文本 text " if query.source == TEXT else ""
    return (f"<b>Top-{n}</b> · 模型 model <b>{html.escape(model)}</b> · "
            f"查询 query {kind}{html.escape(query.name)}{label}{legend}")


def _summary(answer: QueryAnswer) -> str:
    """The status line of a search: results, the query, the category verdict, a cut text."""
    query, results = answer.query, answer.results
    verdict = f"; 同类 same category {answer.same_category}/{len(results)}" if query.label else ""
    what = f"文本 text {query.name}" if query.source == TEXT else query.name
    cut = f"; 查询过长，已截断 truncated to {answer.context_length} tokens" if answer.truncated else ""
    return f"{answer.model}: {len(results)} 个结果 results for {what}{verdict}{cut}"


class _PanelView:
    """The panel's widgets and how they show a query, an answer and the status line: the view half of
    :class:`QueryDemo`, which holds the state (:attr:`QueryDemo.session`, the thumbnails …) and the events."""

    # Set by QueryDemo.__init__.
    session: QuerySession
    models: list[str]
    max_upload_bytes: int
    _gallery: Gallery
    _upload: Query | None
    _thumbs: _Thumbnails
    _thumb_px: int
    _max_choices: int
    _k0: int
    _max_k: int
    _status: tuple[str, str]
    _built: bool

    def _choice(self, row: int) -> tuple[str, int]:
        meta = self._gallery.meta[row]
        label = f" · {meta['label']}" if meta.get("label") else ""
        return f"#{row} · id {meta['id']}{label} · {_short(str(meta.get('caption') or ''), 24)}", row

    def _create_widgets(self) -> None:
        """The panel's widgets, laid out in :attr:`widget` (no events yet)."""
        import ipywidgets as w

        n, px = len(self._gallery), self._thumb_px
        rows = range(n) if n <= self._max_choices else sorted(
            {int(r) for r in np.linspace(0, n - 1, self._max_choices).round()})
        self.source_picker = w.ToggleButtons(options=[("图库 gallery", GALLERY), ("上传 upload", UPLOAD),
                                                      ("文本 text", TEXT)], value=GALLERY, description="查询 query")
        self.query_picker = w.Dropdown(options=[self._choice(r) for r in rows], description="图库 gallery",
                                       layout=w.Layout(width="420px"))
        self.uploader = w.FileUpload(accept=_ACCEPT, multiple=False, layout=w.Layout(width="260px"),
                                     description=f"上传照片 upload (≤ {_size(self.max_upload_bytes)})")
        # continuous_update: every keystroke reaches the kernel, so typing selects the text source at once
        # and Enter searches what was typed.
        self.text_box = w.Text(value="", placeholder=_TEXT_PLACEHOLDER, description="文本 text",
                               continuous_update=True, layout=w.Layout(width="420px"))
        self.model_picker = w.Dropdown(options=self.models, value=self.models[0], description="模型 model")
        self.k_picker = w.IntSlider(value=self._k0, min=1, max=self._max_k, description="k")
        self.search_button = w.Button(description="搜索 search", button_style="primary", icon="search")
        self.query_image = w.Image(format="jpeg", layout=w.Layout(width=f"{px}px", border=f"3px solid {QUERY_COLOR}"))
        self.query_text, self.status_html, self.time_html, self.header_html = w.HTML(), w.HTML(), w.HTML(), w.HTML()
        self.grid = w.GridBox(layout=w.Layout(grid_template_columns=f"repeat(5, {px + 16}px)", grid_gap="6px"))
        for widget, css in ((self.uploader, "upload"), (self.text_box, "text"), (self.search_button, "search"),
                            (self.status_html, "status"), (self.time_html, "time"), (self.header_html, "header"),
                            (self.grid, "grid")):
            widget.add_class(CSS[css])

        controls = w.VBox([self.source_picker, self.query_picker, self.uploader, self.text_box, self.model_picker,
                           self.k_picker, self.search_button])
        self.widget = w.VBox([w.HBox([controls, w.VBox([self.query_image, self.query_text])]), self.status_html,
                              self.time_html, self.header_html, self.grid])
        self.widget.add_class(CSS["root"])

    def _query(self) -> Query | None:
        """The query the panel holds now (``None``: an upload was refused)."""
        if self.source_picker.value == TEXT:
            return self.session.text_query(self.text_box.value)
        if self.source_picker.value == UPLOAD:
            return self._upload
        return self.session.gallery_query(self.query_picker.value)

    def _show_answer(self, answer: QueryAnswer) -> None:
        import ipywidgets as w

        index = self.session.index(answer.model)
        self.results, self.timings, self.truncated = answer.results, answer.timings, answer.truncated
        self.last_query_ms = self.timings["total_ms"]
        cells = []
        for hit in self.results:
            try:
                thumb = self._thumbs.of_row(index.gallery, hit["row"])
            except BadImageError as err:
                logger.warning("query demo: cannot show gallery image %s: %s", hit["id"], err)
                thumb = b""
            cells.append(_hit_cell(w, hit, thumb, self._thumb_px))
        self.grid.children = tuple(cells)
        self.header_html.value = _header(answer.model, answer.query, len(self.results))
        t = self.timings
        self.time_html.value = (f"<b>查询耗时 query time: {self.last_query_ms:.1f} ms</b> "
                                f"(编码 encode {t['encode_ms']:.1f} ms · 检索 search {t['search_ms']:.2f} ms · "
                                f"{index.stats.get('kind', '?')} index, N = {len(index)})")
        self._set_status(_summary(answer), "ok")

    def _refresh_preview(self) -> None:
        if not self._built:
            return
        query = self._query()
        # A text query has no picture: the image is hidden rather than shown empty.
        self.query_image.layout.display = "none" if query is not None and query.source == TEXT else None
        if query is None:
            self.query_image.value = b""
            self.query_text.value = "<i>还没有可用的上传 no usable upload yet</i>"
            return
        if query.source == TEXT:
            text = " ".join(query.text.split())
            self.query_text.value = (f"<b>查询 query</b> 文本 text<br>{html.escape(_short(text, 120))}" if text
                                     else f"<i>{html.escape(_TEXT_PLACEHOLDER)}</i>")
            return
        try:
            self.query_image.value = (self._thumbs.of_row(self._gallery, query.row) if query.source == GALLERY
                                      else _thumbnail_bytes(query.image, self._thumb_px))
        except BadImageError as err:
            self.query_image.value = b""
            self._set_status(f"查询图无法读取 cannot read the query image: {err}", "error")
        label = f" · {html.escape(query.label)}" if query.label else ""
        caption = f"<br>{html.escape(_short(query.caption, 40))}" if query.caption else ""
        self.query_text.value = f"<b>查询 query</b> {html.escape(query.name)}{label}{caption}"

    def _fail(self, message: str) -> list[dict]:
        """No results (and no stale grid) under an error ``message`` in the status line."""
        self.results = []
        if self._built:
            self.grid.children = ()
            self.header_html.value = ""
            self.time_html.value = ""
        self._set_status(message, "error")
        return self.results

    @property
    def status(self) -> str:
        """The status line's text (what the last action did, or why it was refused)."""
        return self._status[0]

    def _set_status(self, text: str, level: str) -> None:
        self._status = (text, level)
        if self._built:
            color = {"error": MISS_COLOR, "ok": HIT_COLOR}.get(level, "#444444")
            self.status_html.value = f"<span style='color:{color}'>{html.escape(text)}</span>" if text else ""


class QueryDemo(_PanelView):
    """Image search panel (query by photo or by text) over one or more saved indexes.

    Example (in a notebook)::

        demo = QueryDemo.from_dirs({"distilled": "out/index/tiny-kd-cosine"})
        demo.show()                      # pick / upload / type, choose model and k, click Search
        demo.select_query(7); demo.update()
        demo.results[0]                  # {"rank": 1, "id": …, "score": …, "caption": …, "label": …, …}
        demo.search_text("白色连衣裙")     # the same as typing it and pressing Enter

    Attributes:
        session: The :class:`~cnclip_kd.retrieval.session.QuerySession` that runs the queries.
        models: Model names, in the order of the model dropdown.
        results: The last search's hits, best first: ``rank``, ``id``, ``row``, ``score``,
            ``caption``, ``label``, ``product_id``, ``same_category`` (``True``/``False``, or
            ``None`` when the query's category is unknown). Empty before a search and after a
            refused upload or a failed search.
        last_query_ms: Encode + search time of the last search in milliseconds (``None`` before).
        timings: ``{"encode_ms", "search_ms", "total_ms"}`` of the last search.
        query: The current query: ``source`` (``"gallery"`` / ``"upload"`` / ``"text"``), ``id``,
            ``label``, ``caption``, ``name``, and for a text ``text`` (as typed; a text has no
            ``id``, ``label`` or ``caption``). ``None`` when an upload was refused.
        truncated: Whether the last text query was longer than the model's context length
            (its end was not seen); ``False`` for image queries.
        widget: The root widget (after :meth:`build`).
    """

    def __init__(self, models: Mapping[str, GalleryIndex | tuple[ImageEncoder | None, GalleryIndex]], *,
                 k: int = 10, max_k: int = 50, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
                 max_choices: int = 1000, thumb_px: int = 150, device: str | None = None):
        """Wrap loaded indexes.

        Args:
            models: Model name → :class:`~cnclip_kd.retrieval.index.GalleryIndex`, or → ``(encoder, index)``
                with an already loaded encoder (``None``: load it from the index's spec when an
                upload needs it). The first model's gallery lists the gallery queries.
            k: Initial number of results.
            max_k: Largest ``k`` the slider offers (capped at the gallery size).
            max_upload_bytes: Uploads larger than this are refused.
            max_choices: Gallery images offered in the query dropdown (evenly spaced over a
                larger gallery; :meth:`select_query` reaches any of them).
            thumb_px: Side of the (square, white-padded) thumbnails, in pixels.
            device: Where encoders loaded here run (default: cuda when available).

        Raises:
            ValueError: No model, or a gallery without images.
        """
        if not models:
            raise ValueError("QueryDemo needs at least one (name → index) model")
        self.session = QuerySession(models, device=device)
        self.models = list(self.session.models)
        self._gallery = self.session.gallery
        self._max_k = max(1, min(int(max_k), max(len(self.session.index(m)) for m in self.models)))
        self._k0 = max(1, min(int(k), self._max_k))
        self.max_upload_bytes = int(max_upload_bytes)
        self._max_choices = max(1, int(max_choices))
        self._thumb_px = int(thumb_px)
        self._thumbs = _Thumbnails(self._thumb_px)
        self._upload: Query | None = None  # the accepted upload, decoded
        self._status = ("", "info")
        self.results: list[dict] = []
        self.last_query_ms: float | None = None
        self.timings: dict[str, float] = {}
        self.truncated = False
        self.widget = None
        self._built = False

    @classmethod
    def from_dirs(cls, index_dirs: Mapping[str, str | os.PathLike], **kwargs: Any) -> QueryDemo:
        """Load saved indexes (folders written by :meth:`GalleryIndex.save`, e.g. ``OUTPUT_DIR/index/<model>``).

        Encoders are loaded later, from each index's recorded spec, when an upload needs one.

        Raises:
            FileNotFoundError: A folder is not a saved index (the message names notebook 03).
        """
        from ..retrieval.index import GalleryIndex

        return cls({name: GalleryIndex.load(Path(d)) for name, d in index_dirs.items()}, **kwargs)

    def build(self) -> QueryDemo:
        """Create the widgets and wire their events. Reads no file; safe to call again (no-op).

        Returns:
            ``self``, so ``QueryDemo(...).build().show()`` works.
        """
        if self._built:
            return self
        self._create_widgets()
        self.source_picker.observe(lambda _change: self._refresh_preview(), names="value")
        self.query_picker.observe(self._on_pick, names="value")
        self.uploader.observe(self._on_upload, names="value")
        self.text_box.observe(self._on_type, names="value")
        # Enter arrives as the front end's "submit" message; Text.on_submit (the same thing) is deprecated.
        self.text_box.on_msg(self._on_text_message)
        self.search_button.on_click(lambda _button: self.update())
        self._built = True
        self._set_status(*self._status)
        return self

    def show(self) -> None:
        """Display the panel (building it first if needed) with the selected query's thumbnail."""
        from IPython.display import display

        self.build()
        self._refresh_preview()
        display(self.widget)

    # ------------------------------------------------------------------ query selection

    def select_query(self, row: int | None = None, *, image_id: int | None = None) -> None:
        """Make a gallery image the query (as picking it in the dropdown does).

        Args:
            row: Its row in the first model's gallery.
            image_id: Or its image id.

        Raises:
            KeyError: ``image_id`` is not in the gallery.
            IndexError: ``row`` is outside the gallery.
        """
        self.build()
        row = self.session.gallery_query(row, image_id=image_id).row
        if row not in {value for _, value in self.query_picker.options}:
            self.query_picker.options = list(self.query_picker.options) + [self._choice(row)]
        if self.query_picker.value == row:
            self._on_pick({"new": row})  # no change event, but the source may have been "upload"
        else:
            self.query_picker.value = row

    def upload(self, data: bytes, name: str = "photo.jpg", mime: str = "") -> None:
        """Upload a file from Python exactly as the browser's upload button would (for notebooks and tests).

        Args:
            data: The file's bytes.
            name: Its file name.
            mime: Its MIME type as a browser reports it (may be empty).
        """
        import datetime as dt

        self.build()
        self.uploader.value = ({"name": name, "type": mime, "size": len(data), "content": memoryview(bytes(data)),
                                "last_modified": dt.datetime.now(dt.timezone.utc)},)

    def set_text(self, text: str) -> None:
        """Make a text the query, as typing it in the text box does (nothing is searched yet).

        Args:
            text: The query as typed (checked only when searched: an empty one is refused then).

        Raises:
            TypeError: ``text`` is not a string (the box holds only text).
        """
        self.build()
        self.session.text_query(text)  # raises TypeError for anything but a string
        self.text_box.value = text
        self.source_picker.value = TEXT  # also when the box already held this text (no change event)
        self._refresh_preview()

    def search_text(self, text: str) -> list[dict]:
        """Search with a text, as typing it and pressing Enter does: :meth:`set_text`, then :meth:`update`.

        Never raises for a bad query (empty, whitespace, a model without a text tower): the status
        line says why and the results are empty.

        Returns:
            :attr:`results`.
        """
        self.set_text(text)
        return self.update()

    @property
    def query(self) -> dict | None:
        """The current query (see the class attributes)."""
        self.build()
        query = self._query()
        return None if query is None else query.to_dict()

    def results_markdown(self) -> str:
        """The last search's results as a Markdown table (for a notebook's ``display(Markdown(...))``).

        Columns: rank, id, score, same category (✓ / ✗, blank when the query has no category,
        e.g. a text), category, caption.
        """
        return results_markdown(self.results)

    def _on_pick(self, change: Mapping[str, Any]) -> None:
        self.source_picker.value = GALLERY
        self._refresh_preview()

    def _on_type(self, change: Mapping[str, Any]) -> None:
        if self.source_picker.value != TEXT:
            self.source_picker.value = TEXT  # its observer refreshes the preview
        else:
            self._refresh_preview()

    def _on_text_message(self, _widget: Any, content: Mapping[str, Any], _buffers: Any) -> None:
        if isinstance(content, Mapping) and content.get("event") == "submit":
            self.source_picker.value = TEXT
            self.update()

    def _on_upload(self, change: Mapping[str, Any]) -> None:
        files = change.get("new") or ()
        if not files:
            return  # our own reset below
        item = files[-1]
        name = str(item.get("name") or "upload")
        try:
            data = bytes(item.get("content") or b"")
            for size in (int(item.get("size") or len(data)), len(data)):  # the browser's size is only a claim
                if size > self.max_upload_bytes:
                    self._refuse_upload(f"{name}: 文件太大 too large ({_size(size)} > {_size(self.max_upload_bytes)})")
                    return
            self._upload = self.session.image_query(data, name=name)
            self.source_picker.value = UPLOAD
            self._refresh_preview()
            image = self._upload.image
            self._set_status(f"已上传 uploaded {name} ({image.width}×{image.height}); 点击搜索 click search", "info")
        except BadImageError as err:
            self._refuse_upload(f"{name}: 不是可用的图片 not a usable image ({err.reason})")
        except Exception as err:  # noqa: BLE001 — UI boundary: a message in the panel, the traceback in the log
            logger.exception("query demo: upload %s failed", name)
            self._refuse_upload(f"{name}: 无法读取 cannot read it ({type(err).__name__}: {err})")
        finally:
            # Cleared so that uploading the same file again is a new event.
            self.uploader.value = ()

    def _refuse_upload(self, message: str) -> None:
        self._upload = None
        self.source_picker.value = UPLOAD
        self._refresh_preview()
        self._fail(message)

    # ------------------------------------------------------------------ search

    def update(self) -> list[dict]:
        """Run the current query (gallery image, upload or text) with the selected model and ``k``; fill the grid.

        Never raises for a bad query (a refused upload, an empty or whitespace text, a text
        for a model without a text tower): what went wrong is shown in the status line (and
        :attr:`status`), and :attr:`results` is empty.

        Returns:
            :attr:`results`.
        """
        self.build()
        query, model = self._query(), self.model_picker.value
        self.truncated = False
        if query is None:
            return self._fail("请先上传一张照片 upload a photo first (or pick a gallery image)")
        try:
            self.session.check(query)
        except QueryError as err:
            return self._fail(f"文本查询无效 invalid text query: {err}")
        # Shown while it runs: the first upload or text search with a model loads the model (seconds).
        self._set_status(f"搜索中 searching with {model} …", "info")
        self.search_button.disabled = True
        try:
            self._show_answer(self.session.search(query, model, int(self.k_picker.value)))
        except NoTextTowerError as err:
            logger.info("query demo: %s has no text tower: %s", model, err)
            self._fail(f"{model}: 该模型没有文本编码器，不能用文本搜索 · {err}")
        except Exception as err:  # noqa: BLE001 — UI boundary: a message in the panel, the traceback in the log
            logger.exception("query demo: search failed")
            self._fail(f"搜索失败 search failed ({model}): {type(err).__name__}: {err}")
        finally:
            self.search_button.disabled = False
        return self.results
