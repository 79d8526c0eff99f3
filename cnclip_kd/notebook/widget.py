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

A gallery query searches with the embedding stored in the model's index (so it
costs one index search) and leaves the query image itself out of its results;
an uploaded photo is decoded with :func:`cnclip_kd.core.images.load_image` and
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
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image, ImageOps

from ..core.images import BadImageError, encode_jpeg, fit_max_side, load_image
from ..core.tokenizer import NoTextTowerError, QueryError, check_query
from ..retrieval.encoders import ImageEncoder, TextEncoder, load_encoder, text_encoder_for
from ..retrieval.index import GalleryIndex
from .viz import HIT_COLOR, MISS_COLOR, QUERY_COLOR, UNKNOWN_COLOR

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_UPLOAD_BYTES", "QueryDemo"]

#: Uploads larger than this are refused (10 MB: any phone photo fits).
DEFAULT_MAX_UPLOAD_BYTES = 10 * 2 ** 20
#: Accepted by the upload button's file dialog (the check itself decodes the file).
_ACCEPT = "image/*,.jpg,.jpeg,.png,.webp,.bmp,.gif,.tif,.tiff"
_GALLERY, _UPLOAD, _TEXT = "gallery", "upload", "text"
_TEXT_PLACEHOLDER = "输入商品描述 type a description, e.g. 白色连衣裙"
_THUMB_CACHE = 512  # thumbnails kept in memory (a few KB each)

# CSS classes on the widgets, for the browser test and for styling.
CSS = {"root": "cnclip-demo", "search": "cnclip-search", "upload": "cnclip-upload", "text": "cnclip-text",
       "grid": "cnclip-grid", "hit": "cnclip-hit", "status": "cnclip-status", "time": "cnclip-time",
       "header": "cnclip-header"}


class _Model:
    """One model of the demo: its index and (lazily) its image and text encoders."""

    def __init__(self, name: str, index: GalleryIndex, encoder: ImageEncoder | None = None,
                 device: str | None = None):
        self.name = name
        self.index = index
        self._encoder = encoder
        self._text_encoder: TextEncoder | None = None
        self._no_text: str | None = None  # why the model has no text tower, once found out
        self._device = device
        self.spec = (index.stats.get("model") or {}).get("spec")
        self._row_of = {int(i): r for r, i in enumerate(index.gallery.ids)}

    def row_of(self, image_id: int) -> int | None:
        return self._row_of.get(int(image_id))

    def encoder(self) -> ImageEncoder:
        if self._encoder is None:
            if not self.spec:
                raise ValueError(f"model {self.name}: its index records no model spec (stats['model']['spec']); "
                                 "pass the encoder to QueryDemo to search with uploaded photos or text")
            t0 = time.perf_counter()
            self._encoder = load_encoder(self.spec, device=self._device)
            logger.info("query demo: loaded %s (%s) in %.1f s", self.name, self.spec, time.perf_counter() - t0)
        return self._encoder

    def text_encoder(self) -> TextEncoder:
        """The model's text tower (the image encoder's model, loaded once).

        Raises:
            NoTextTowerError: The model has none (remembered: asked again, it raises at once).
        """
        if self._text_encoder is None:
            if self._no_text is None and (self.index.stats.get("model") or {}).get("text_tower") is False \
                    and self._encoder is None:
                # Found out when the index was built: no need to load a (possibly large) model to say no.
                self._no_text = (f"{self.spec or self.name}: the index records that this model has no text tower "
                                 "(an image-only model); search it with images, or use a Chinese-CLIP model for text")
            if self._no_text is not None:
                raise NoTextTowerError(self._no_text)
            try:
                self._text_encoder = text_encoder_for(self.encoder())
            except NoTextTowerError as err:
                self._no_text = str(err)
                raise
            logger.info("query demo: %s text tower, context length %d", self.name,
                        self._text_encoder.context_length)
        return self._text_encoder


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


class QueryDemo:
    """Image search panel (query by photo or by text) over one or more saved indexes.

    Example (in a notebook)::

        demo = QueryDemo.from_dirs({"distilled": "out/index/tiny-kd-cosine"})
        demo.show()                      # pick / upload / type, choose model and k, click Search
        demo.select_query(7); demo.update()
        demo.results[0]                  # {"rank": 1, "id": …, "score": …, "caption": …, "label": …, …}
        demo.search_text("白色连衣裙")     # the same as typing it and pressing Enter

    Attributes:
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
        self._models: dict[str, _Model] = {}
        for name, value in models.items():
            encoder, index = value if isinstance(value, tuple) else (None, value)
            if len(index) == 0:
                raise ValueError(f"model {name}: the index is empty")
            self._models[str(name)] = _Model(str(name), index, encoder, device)
        self.models = list(self._models)
        first = self._models[self.models[0]].index
        self._gallery = first.gallery
        self._max_k = max(1, min(int(max_k), max(len(m.index) for m in self._models.values())))
        self._k0 = max(1, min(int(k), self._max_k))
        self.max_upload_bytes = int(max_upload_bytes)
        self._max_choices = max(1, int(max_choices))
        self._thumb_px = int(thumb_px)
        self._thumbs: OrderedDict = OrderedDict()
        self._upload: dict | None = None  # {"name", "image", "bytes"} of the accepted upload
        self._status = ("", "info")
        self.results: list[dict] = []
        self.last_query_ms: float | None = None
        self.timings: dict[str, float] = {}
        self.truncated = False
        self.widget = None
        self._built = False

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dirs(cls, index_dirs: Mapping[str, str | os.PathLike], **kwargs: Any) -> "QueryDemo":
        """Load saved indexes (folders written by :meth:`GalleryIndex.save`, e.g. ``OUTPUT_DIR/index/<model>``).

        Encoders are loaded later, from each index's recorded spec, when an upload needs one.

        Args:
            index_dirs: Model name → index folder.
            **kwargs: As in :class:`QueryDemo`.

        Raises:
            FileNotFoundError: A folder is not a saved index (the message names notebook 03).
        """
        return cls({name: GalleryIndex.load(Path(d)) for name, d in index_dirs.items()}, **kwargs)

    def _choice_rows(self) -> list[int]:
        n = len(self._gallery)
        if n <= self._max_choices:
            return list(range(n))
        return sorted({int(r) for r in np.linspace(0, n - 1, self._max_choices).round()})

    def _choice_label(self, row: int) -> str:
        meta = self._gallery.meta[row]
        label = f" · {meta['label']}" if meta.get("label") else ""
        return f"#{row} · id {meta['id']}{label} · {_short(str(meta.get('caption') or ''), 24)}"

    def build(self) -> "QueryDemo":
        """Create the widgets and wire their events. Reads no file; safe to call again (no-op).

        Returns:
            ``self``, so ``QueryDemo(...).build().show()`` works.
        """
        if self._built:
            return self
        import ipywidgets as w

        self.source_picker = w.ToggleButtons(options=[("图库 gallery", _GALLERY), ("上传 upload", _UPLOAD),
                                                      ("文本 text", _TEXT)],
                                             value=_GALLERY, description="查询 query")
        self.query_picker = w.Dropdown(options=[(self._choice_label(r), r) for r in self._choice_rows()],
                                       description="图库 gallery", layout=w.Layout(width="420px"))
        self.uploader = w.FileUpload(accept=_ACCEPT, multiple=False,
                                     description=f"上传照片 upload (≤ {_size(self.max_upload_bytes)})",
                                     layout=w.Layout(width="260px"))
        self.uploader.add_class(CSS["upload"])
        # continuous_update: every keystroke reaches the kernel, so typing selects the text source at once
        # and Enter searches what was typed.
        self.text_box = w.Text(value="", placeholder=_TEXT_PLACEHOLDER, description="文本 text",
                               continuous_update=True, layout=w.Layout(width="420px"))
        self.text_box.add_class(CSS["text"])
        self.model_picker = w.Dropdown(options=self.models, value=self.models[0], description="模型 model")
        self.k_picker = w.IntSlider(value=self._k0, min=1, max=self._max_k, description="k")
        self.search_button = w.Button(description="搜索 search", button_style="primary", icon="search")
        self.search_button.add_class(CSS["search"])
        self.query_image = w.Image(format="jpeg", layout=w.Layout(width=f"{self._thumb_px}px",
                                                                 border=f"3px solid {QUERY_COLOR}"))
        self.query_text = w.HTML()
        self.status_html = w.HTML()
        self.status_html.add_class(CSS["status"])
        self.time_html = w.HTML()
        self.time_html.add_class(CSS["time"])
        self.header_html = w.HTML()
        self.header_html.add_class(CSS["header"])
        self.grid = w.GridBox(layout=w.Layout(grid_template_columns=f"repeat(5, {self._thumb_px + 16}px)",
                                              grid_gap="6px"))
        self.grid.add_class(CSS["grid"])

        self.source_picker.observe(lambda _change: self._refresh_preview(), names="value")
        self.query_picker.observe(self._on_pick, names="value")
        self.uploader.observe(self._on_upload, names="value")
        self.text_box.observe(self._on_type, names="value")
        # Enter arrives as the front end's "submit" message; Text.on_submit (the same thing) is deprecated.
        self.text_box.on_msg(self._on_text_message)
        self.search_button.on_click(lambda _button: self.update())

        controls = w.VBox([self.source_picker, self.query_picker, self.uploader, self.text_box, self.model_picker,
                           self.k_picker, self.search_button])
        preview = w.VBox([self.query_image, self.query_text])
        self.widget = w.VBox([w.HBox([controls, preview]), self.status_html, self.time_html, self.header_html,
                              self.grid])
        self.widget.add_class(CSS["root"])
        self._built = True
        self._render_status()
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
        if image_id is not None:
            row = self._gallery.row_of(int(image_id))
        if row is None or not 0 <= int(row) < len(self._gallery):
            raise IndexError(f"query row {row} is outside the gallery (0 … {len(self._gallery) - 1})")
        row = int(row)
        if row not in {value for _, value in self.query_picker.options}:
            self.query_picker.options = list(self.query_picker.options) + [(self._choice_label(row), row)]
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
        if not isinstance(text, str):
            raise TypeError(f"a text query must be a string, got {type(text).__name__}")
        self.text_box.value = text
        self.source_picker.value = _TEXT  # also when the box already held this text (no change event)
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
        if self.source_picker.value == _TEXT:
            text = self.text_box.value
            return {"source": _TEXT, "text": text, "id": None, "label": "", "caption": "",
                    "name": f"“{_short(' '.join(text.split()), 40)}”"}
        if self.source_picker.value == _UPLOAD:
            if self._upload is None:
                return None
            return {"source": _UPLOAD, "id": None, "label": "", "caption": "", "name": self._upload["name"]}
        row = self.query_picker.value
        meta = self._gallery.meta[row]
        return {"source": _GALLERY, "id": int(meta["id"]), "row": int(row), "label": meta.get("label") or "",
                "caption": meta.get("caption") or "", "name": f"id {meta['id']}"}

    def results_markdown(self) -> str:
        """The last search's results as a Markdown table (for a notebook's ``display(Markdown(...))``).

        Columns: rank, id, score, same category (✓ / ✗, blank when the query has no category,
        e.g. a text), category, caption.
        """
        mark = {True: "✓", False: "✗", None: ""}

        def cell(value: Any) -> str:
            # A "|" in a caption would end the cell; a newline the row.
            return " ".join(str(value).split()).replace("|", "\\|")

        lines = ["| # | id | 得分 score | 同类 same | 类目 label | 标题 caption |", "|---:|---:|---:|:---:|---|---|"]
        lines += [f"| {r['rank']} | {r['id']} | {r['score']:.3f} | {mark[r['same_category']]} | {cell(r['label'])} | "
                  f"{cell(r['caption'])} |" for r in self.results]
        return "\n".join(lines)

    @property
    def status(self) -> str:
        """The status line's text (what the last action did, or why it was refused)."""
        return self._status[0]

    def _on_pick(self, change: Mapping[str, Any]) -> None:
        self.source_picker.value = _GALLERY
        self._refresh_preview()

    def _on_type(self, change: Mapping[str, Any]) -> None:
        if self.source_picker.value != _TEXT:
            self.source_picker.value = _TEXT  # its observer refreshes the preview
        else:
            self._refresh_preview()

    def _on_text_message(self, _widget: Any, content: Mapping[str, Any], _buffers: Any) -> None:
        if isinstance(content, Mapping) and content.get("event") == "submit":
            self.source_picker.value = _TEXT
            self.update()

    def _on_upload(self, change: Mapping[str, Any]) -> None:
        files = change.get("new") or ()
        if not files:
            return  # our own reset below
        item = files[-1]
        name = str(item.get("name") or "upload")
        try:
            self._accept_upload(item, name)
        except BadImageError as err:
            self._refuse_upload(f"{name}: 不是可用的图片 not a usable image ({err.reason})")
        except Exception as err:  # noqa: BLE001 — UI boundary: a message in the panel, the traceback in the log
            logger.exception("query demo: upload %s failed", name)
            self._refuse_upload(f"{name}: 无法读取 cannot read it ({type(err).__name__}: {err})")
        finally:
            # Cleared so that uploading the same file again is a new event.
            self.uploader.value = ()

    def _accept_upload(self, item: Mapping[str, Any], name: str) -> None:
        size = int(item.get("size") or len(item.get("content") or b""))
        if size > self.max_upload_bytes:
            self._refuse_upload(f"{name}: 文件太大 too large ({_size(size)} > {_size(self.max_upload_bytes)})")
            return
        data = bytes(item.get("content") or b"")
        if len(data) > self.max_upload_bytes:  # the browser's size field is only a claim
            self._refuse_upload(f"{name}: 文件太大 too large ({_size(len(data))} > {_size(self.max_upload_bytes)})")
            return
        image = load_image(data, name=name)
        self._upload = {"name": name, "image": image, "bytes": len(data)}
        self.source_picker.value = _UPLOAD
        self._refresh_preview()
        self._set_status(f"已上传 uploaded {name} ({image.width}×{image.height}); 点击搜索 click search", "info")

    def _refuse_upload(self, message: str) -> None:
        self._upload = None
        self.source_picker.value = _UPLOAD
        self._clear_results()
        self._refresh_preview()
        self._set_status(message, "error")

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
        query = self.query
        model = self._models[self.model_picker.value]
        k = int(self.k_picker.value)
        self.truncated = False
        if query is None:
            self._clear_results()
            self._set_status("请先上传一张照片 upload a photo first (or pick a gallery image)", "error")
            return self.results
        if query["source"] == _TEXT:
            try:
                query["text"] = check_query(query["text"])
            except QueryError as err:
                self._clear_results()
                self._set_status(f"文本查询无效 invalid text query: {err}", "error")
                return self.results
        # Shown while it runs: the first upload or text search with a model loads the model (seconds).
        self._set_status(f"搜索中 searching with {model.name} …", "info")
        self.search_button.disabled = True
        try:
            self._search(model, query, k)
        except NoTextTowerError as err:
            logger.info("query demo: %s has no text tower: %s", model.name, err)
            self._clear_results()
            self._set_status(f"{model.name}: 该模型没有文本编码器，不能用文本搜索 · {err}", "error")
        except Exception as err:  # noqa: BLE001 — UI boundary: a message in the panel, the traceback in the log
            logger.exception("query demo: search failed")
            self._clear_results()
            self._set_status(f"搜索失败 search failed ({model.name}): {type(err).__name__}: {err}", "error")
        finally:
            self.search_button.disabled = False
        return self.results

    def _query_vector(self, model: _Model, query: dict) -> tuple[np.ndarray, int | None, float]:
        """(embedding [1, D], gallery id to exclude, encode ms)."""
        if query["source"] == _TEXT:
            text_encoder = model.text_encoder()  # loaded once, outside the timed part
            self.truncated = text_encoder.truncated(query["text"])
            t0 = time.perf_counter()
            vector = text_encoder.encode([query["text"]])
            return vector, None, (time.perf_counter() - t0) * 1000
        if query["source"] == _GALLERY:
            own = model.row_of(query["id"])
            if own is not None and model.index.embeddings is not None:
                return np.asarray(model.index.embeddings[own], np.float32)[None], query["id"], 0.0
            image = self._gallery.image(query["row"])
            exclude = query["id"] if own is not None else None
        else:
            image, exclude = self._upload["image"], None
        encoder = model.encoder()  # loaded once, outside the timed part
        t0 = time.perf_counter()
        vector = encoder.encode_pil([image])
        return vector, exclude, (time.perf_counter() - t0) * 1000

    def _search(self, model: _Model, query: dict, k: int) -> None:
        vector, exclude, encode_ms = self._query_vector(model, query)
        t0 = time.perf_counter()
        scores, rows = model.index.search(vector, k, exclude_ids=None if exclude is None else [exclude])
        search_ms = (time.perf_counter() - t0) * 1000
        self.timings = {"encode_ms": encode_ms, "search_ms": search_ms, "total_ms": encode_ms + search_ms}
        self.last_query_ms = encode_ms + search_ms
        query_label = query.get("label") or ""
        results = []
        for rank, (score, row) in enumerate(zip(scores[0], rows[0]), 1):
            if row < 0:
                continue
            meta = model.index.gallery.meta[int(row)]
            label = meta.get("label") or ""
            results.append({"rank": rank, "id": int(meta["id"]), "row": int(row), "score": float(score),
                            "caption": meta.get("caption") or "", "label": label,
                            "product_id": meta.get("product_id") or "",
                            "same_category": (label == query_label) if query_label and label else None})
        self.results = results
        self._render_results(model, query)
        self.time_html.value = (f"<b>查询耗时 query time: {self.last_query_ms:.1f} ms</b> "
                                f"(编码 encode {encode_ms:.1f} ms · 检索 search {search_ms:.2f} ms · "
                                f"{model.index.stats.get('kind', '?')} index, N = {len(model.index)})")
        same = sum(bool(r["same_category"]) for r in results)
        verdict = f"; 同类 same category {same}/{len(results)}" if query_label else ""
        what = f"文本 text {query['name']}" if query["source"] == _TEXT else query["name"]
        cut = ""
        if self.truncated:
            length = model.text_encoder().context_length
            cut = f"; 查询过长，已截断 truncated to {length} tokens"
        self._set_status(f"{model.name}: {len(results)} 个结果 results for {what}{verdict}{cut}", "ok")

    # ------------------------------------------------------------------ rendering

    def _thumb(self, key: tuple, make: Callable[[], Image.Image]) -> bytes:
        if key in self._thumbs:
            self._thumbs.move_to_end(key)
            return self._thumbs[key]
        data = _thumbnail_bytes(make(), self._thumb_px)
        self._thumbs[key] = data
        if len(self._thumbs) > _THUMB_CACHE:
            self._thumbs.popitem(last=False)
        return data

    def _gallery_thumb(self, gallery, row: int) -> bytes:
        return self._thumb((id(gallery), int(row)), lambda: gallery.image(int(row)))

    def _refresh_preview(self) -> None:
        if not self._built:
            return
        query = self.query
        # A text query has no picture: the image is hidden rather than shown empty.
        self.query_image.layout.display = "none" if query is not None and query["source"] == _TEXT else None
        if query is None:
            self.query_image.value = b""
            self.query_text.value = "<i>还没有可用的上传 no usable upload yet</i>"
            return
        if query["source"] == _TEXT:
            text = " ".join(query["text"].split())
            self.query_text.value = (f"<b>查询 query</b> 文本 text<br>{html.escape(_short(text, 120))}" if text
                                     else f"<i>{html.escape(_TEXT_PLACEHOLDER)}</i>")
            return
        try:
            if query["source"] == _GALLERY:
                self.query_image.value = self._gallery_thumb(self._gallery, query["row"])
            else:
                self.query_image.value = _thumbnail_bytes(self._upload["image"], self._thumb_px)
        except BadImageError as err:
            self.query_image.value = b""
            self._set_status(f"查询图无法读取 cannot read the query image: {err}", "error")
        label = f" · {html.escape(query['label'])}" if query["label"] else ""
        caption = f"<br>{html.escape(_short(query['caption'], 40))}" if query["caption"] else ""
        self.query_text.value = f"<b>查询 query</b> {html.escape(query['name'])}{label}{caption}"

    def _clear_results(self) -> None:
        self.results = []
        if self._built:
            self.grid.children = ()
            self.header_html.value = ""
            self.time_html.value = ""

    def _render_results(self, model: _Model, query: dict) -> None:
        import ipywidgets as w

        cells = []
        for hit in self.results:
            color = {True: HIT_COLOR, False: MISS_COLOR, None: UNKNOWN_COLOR}[hit["same_category"]]
            verdict = {True: " 同类", False: " 异类", None: ""}[hit["same_category"]]
            try:
                thumb = self._gallery_thumb(model.index.gallery, hit["row"])
            except BadImageError as err:
                logger.warning("query demo: cannot show gallery image %s: %s", hit["id"], err)
                thumb = b""
            image = w.Image(value=thumb, format="jpeg", layout=w.Layout(width=f"{self._thumb_px}px"))
            label = f" · {html.escape(hit['label'])}" if hit["label"] else ""
            text = w.HTML(f"<div style='font-size:12px;line-height:1.3'><b style='color:{color}'>"
                          f"Top-{hit['rank']}</b> {hit['score']:.3f}{verdict}<br>"
                          f"<span title='{html.escape(hit['caption'], quote=True)}'>"
                          f"{html.escape(_short(hit['caption'], 30))}</span><br>"
                          f"<span style='color:#666'>id {hit['id']}{label}</span></div>",
                          layout=w.Layout(width=f"{self._thumb_px}px"))
            cell = w.VBox([image, text], layout=w.Layout(border=f"3px solid {color}", padding="3px"))
            cell.add_class(CSS["hit"])
            cells.append(cell)
        self.grid.children = tuple(cells)
        label = f" · {html.escape(query['label'])}" if query["label"] else ""
        if query["label"]:
            legend = " · 绿框 同类目 green: same category · 红框 其他类目 red: other"
        elif query["source"] == _TEXT:
            legend = " · 灰框：文本查询没有类目 grey: a text query has no category"
        else:
            legend = ""
        kind = "文本 text " if query["source"] == _TEXT else ""
        self.header_html.value = (f"<b>Top-{len(self.results)}</b> · 模型 model <b>{html.escape(model.name)}</b> · "
                                  f"查询 query {kind}{html.escape(query['name'])}{label}{legend}")

    def _set_status(self, text: str, level: str) -> None:
        self._status = (text, level)
        self._render_status()

    def _render_status(self) -> None:
        if not self._built:
            return
        text, level = self._status
        color = {"error": MISS_COLOR, "ok": HIT_COLOR}.get(level, "#444444")
        self.status_html.value = f"<span style='color:{color}'>{html.escape(text)}</span>" if text else ""
