"""Queries, spelled once: an image or a text → the Top-k of a saved index, without any UI.

Two layers, both torch-free at import:

* **The query steps** every front end shares: :func:`load_query_image` decodes an
  image query, :func:`encode_text_query` checks, tokenises and encodes a text query,
  :func:`search_image_query` / :func:`search_text_query` run one query end to end and
  :func:`search_embedding` searches an embedding; each answers with a
  :class:`SearchResult` (ids, scores, rows, metadata, timings, and for a text what was
  searched). The serving :class:`cnclip_kd.deploy.runtime.Retriever` (``cnclip-kd search``,
  the HTTP service) runs its queries through them with its ONNX or PyTorch encoders.
* **A query session**: :class:`QuerySession` holds one or more saved indexes (one per
  model, written by notebook 03 / :func:`cnclip_kd.retrieval.evaluate.index_model`) and
  answers a :class:`Query` (a gallery image, an uploaded or local image, a text) with a
  :class:`QueryAnswer` whose rows say, when the query's category is known, whether each
  hit is in it. The notebook's :class:`cnclip_kd.notebook.widget.QueryDemo` is its UI.

A gallery query searches with the embedding stored in the model's index (one index
search, no model run) and leaves the query image itself out of its results; an image is
encoded by the model's encoder, loaded on first use from the spec the index recorded
(``stats["model"]["spec"]``, :func:`cnclip_kd.retrieval.encoders.load_encoder`, which is
when torch is imported); a text is encoded by the same model's text tower
(:func:`cnclip_kd.retrieval.encoders.text_encoder_for`, sharing the loaded model). A bad
text is refused (:class:`~cnclip_kd.core.tokenizer.QueryError`) before any model loads;
a model without a text tower raises :class:`~cnclip_kd.core.tokenizer.NoTextTowerError`.
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.images import DEFAULT_MAX_PIXELS, load_image, load_strict
from ..core.tokenizer import NoTextTowerError, check_query, tokenize

if TYPE_CHECKING:  # pragma: no cover
    from .encoders import ImageEncoder, TextEncoder
    from .index import GalleryIndex

logger = logging.getLogger(__name__)

__all__ = [
    "GALLERY", "TEXT", "UPLOAD", "Query", "QueryAnswer", "QuerySession", "QuerySource", "SearchResult",
    "encode_text_query", "load_query_image", "results_markdown", "search_embedding", "search_image_query",
    "search_text_query",
]

#: A :class:`Query`'s ``source``: a gallery image, an uploaded (or local) image, a text.
GALLERY, UPLOAD, TEXT = "gallery", "upload", "text"

QuerySource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]


# --------------------------------------------------------------------------- the shared query steps


def load_query_image(source: QuerySource, *, draft_size: int | None = None,
                     max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> Image.Image:
    """Decode a query into RGB, optionally letting libjpeg shrink a JPEG while decoding.

    Args:
        source: Encoded bytes, a file path, or a PIL image (converted to RGB).
        draft_size: For an RGB/greyscale JPEG, decode at the smallest DCT scale
            (1/2, 1/4, 1/8) that keeps both sides ≥ ``draft_size`` (PIL ``draft``).
            ``None``: full decode. Every other input goes through
            :func:`cnclip_kd.core.images.load_image`.
        max_pixels: Refuse larger images (decompression bombs).
        name: How to name the input in errors (default: the path, or ``<bytes>``).

    Returns:
        An RGB image, EXIF orientation applied.

    Raises:
        BadImageError: Empty, missing, not an image, truncated or too large.
    """
    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else source.convert("RGB")
    if draft_size is None:
        return load_image(source, max_pixels=max_pixels, name=name)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or "<bytes>"
    else:
        path = Path(source)
        if not path.is_file():
            return load_image(source, max_pixels=max_pixels, name=name)  # raises its "file not found"
        data, name = path.read_bytes(), name or str(source)
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return load_image(data, name=name, max_pixels=max_pixels)  # raises the clear error
    width, height = img.size
    if img.format != "JPEG" or img.mode not in ("RGB", "L") or not 0 < width * height <= max_pixels:
        img.close()
        return load_image(data, name=name, max_pixels=max_pixels)
    img.draft("RGB", (int(draft_size), int(draft_size)))
    try:
        load_strict(img)  # a truncated upload fails here even when a library turned PIL's flag on
    except (OSError, SyntaxError, ValueError):
        img.close()
        return load_image(data, name=name, max_pixels=max_pixels)  # raises "truncated or corrupt"
    img = ImageOps.exif_transpose(img)
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass
class SearchResult:
    """One query's answer.

    Attributes:
        ids: ``[n]`` gallery image ids, best first (``n ≤ k``: missing results dropped).
        scores: ``[n]`` cosine similarities.
        rows: ``[n]`` gallery rows (``index.gallery.meta[row]``).
        metadata: ``n`` metadata rows (``id``, ``caption``, ``label``, ``product_id``, ``image`` …).
        timings_ms: ``decode`` (image: decode + preprocess; text: query check + tokenise),
            ``encode``, ``search``, ``total``.
        query: For a text query: ``text`` (as searched, surrounding whitespace stripped),
            ``truncated`` (the text had more tokens than the model reads: its end was cut),
            ``n_tokens`` (tokens fed, ``[CLS]``/``[SEP]`` included) and ``context_length``;
            ``None`` for an image query.
    """

    ids: np.ndarray
    scores: np.ndarray
    rows: np.ndarray
    metadata: list[dict]
    timings_ms: dict = field(default_factory=dict)
    query: dict | None = None

    def hits(self) -> list[dict]:
        """One dict per result: ``rank``, ``id``, ``score`` and the metadata fields."""
        return [{**meta, "rank": rank, "id": int(i), "score": round(float(s), 6)}
                for rank, (i, s, meta) in enumerate(zip(self.ids, self.scores, self.metadata), 1)]

    def to_dict(self) -> dict:
        """JSON-ready: ``results`` (:meth:`hits`), ``timings_ms`` and, for a text query, ``query``."""
        out = {"results": self.hits(), "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()}}
        if self.query is not None:
            out["query"] = dict(self.query)
        return out


def search_embedding(index: GalleryIndex, embedding: np.ndarray, k: int, *, exclude_id: int | None = None,
                     timings: Mapping[str, float] | None = None, query: dict | None = None,
                     where: Mapping[str, Any] | None = None) -> SearchResult:
    """Search one query embedding in an index: the last step of every query.

    Args:
        index: The :class:`~cnclip_kd.retrieval.index.GalleryIndex`.
        embedding: ``[1, D]`` (or ``[D]``) query embedding.
        k: Results wanted.
        exclude_id: A gallery id to leave out of the results (the query image itself).
        timings: ``decode`` and ``encode`` milliseconds spent before (default 0).
        query: What :attr:`SearchResult.query` holds (a text query's facts).
        where: Only items this filter keeps (:mod:`cnclip_kd.retrieval.filters`), passed to the index.

    Returns:
        The :class:`SearchResult`, missing results (``-1`` rows) dropped, with ``search`` and
        ``total`` added to the timings.
    """
    options: dict[str, Any] = {}
    if exclude_id is not None:
        options["exclude_ids"] = [exclude_id]
    if where:
        options["where"] = where
    t0 = time.perf_counter()
    scores, rows = index.search(embedding, k, **options)
    search_ms = (time.perf_counter() - t0) * 1e3
    keep = rows[0] >= 0
    scores, rows = scores[0][keep], rows[0][keep]
    decode, encode = float((timings or {}).get("decode", 0.0)), float((timings or {}).get("encode", 0.0))
    gallery = index.gallery
    return SearchResult(ids=gallery.ids[rows], scores=scores, rows=rows,
                        metadata=[dict(gallery.meta[int(r)]) for r in rows], query=query,
                        timings_ms={"decode": decode, "encode": encode, "search": search_ms,
                                    "total": decode + encode + search_ms})


def search_image_query(index: GalleryIndex, image: Any, k: int, *, prepare: Callable[[Any], Any],
                       encode: Callable[[Any], np.ndarray], exclude_id: int | None = None,
                       where: Mapping[str, Any] | None = None) -> SearchResult:
    """An image query, end to end: ``prepare`` (decode), ``encode``, search; each step timed.

    Args:
        index: The :class:`~cnclip_kd.retrieval.index.GalleryIndex` of the encoder's model.
        image: The query, as ``prepare`` takes it (bytes, a path, a PIL image, a gallery row …).
        k: Results wanted.
        prepare: Query → the encoder's input (e.g. :func:`load_query_image`, plus the
            encoder's preprocessing); timed as ``decode``.
        encode: That input → ``[1, D]`` embedding; timed as ``encode``. Load the encoder before
            calling, so that loading is not timed.
        exclude_id: A gallery id to leave out of the results.
        where: Only items this filter keeps (:func:`search_embedding`).

    Raises:
        BadImageError: From ``prepare``: the input is not a usable image.
    """
    t0 = time.perf_counter()
    x = prepare(image)
    t1 = time.perf_counter()
    emb = encode(x)
    t2 = time.perf_counter()
    return search_embedding(index, emb, k, exclude_id=exclude_id, where=where,
                            timings={"decode": (t1 - t0) * 1e3, "encode": (t2 - t1) * 1e3})


def encode_text_query(encoder: Any, text: object) -> tuple[np.ndarray, dict, dict]:
    """Check, tokenise and encode one text query.

    The query is checked (:func:`cnclip_kd.core.tokenizer.check_query`) and tokenised as cn_clip does,
    at its own length; an encoder that takes token ids (an ONNX text encoder, ``encode_ids``) is fed
    those, any other (a PyTorch :class:`~cnclip_kd.retrieval.encoders.TextEncoder`) encodes the text
    with its own tokeniser and says itself whether the text was cut.

    Args:
        encoder: A text encoder: ``context_length``, ``encode(texts)`` and ``truncated(text)``, or
            ``encode_ids(ids)``.
        text: The query as typed.

    Returns:
        ``(embedding [1, D], query, timings)``: ``query`` is ``text`` (stripped), ``truncated``,
        ``n_tokens`` and ``context_length``; ``timings`` holds ``decode`` (check + tokenise) and
        ``encode`` in milliseconds.

    Raises:
        QueryError: Empty, whitespace only, not a string, or too long.
    """
    t0 = time.perf_counter()
    query = check_query(text)
    tokens = tokenize(query, encoder.context_length, pad_to_context=False)
    t1 = time.perf_counter()
    if hasattr(encoder, "encode_ids"):
        emb = encoder.encode_ids(tokens.ids)
        truncated = bool(tokens.truncated[0])
    else:
        emb = encoder.encode([query])
        truncated = bool(encoder.truncated(query))
    t2 = time.perf_counter()
    if truncated:
        logger.info("text query of %d word pieces cut to the model's %d tokens", int(tokens.n_pieces[0]) + 2,
                    encoder.context_length)
    info = {"text": query, "truncated": truncated, "n_tokens": int(tokens.lengths[0]),
            "context_length": int(encoder.context_length)}
    return emb, info, {"decode": (t1 - t0) * 1e3, "encode": (t2 - t1) * 1e3}


def search_text_query(index: GalleryIndex, text: object, k: int, text_encoder: Callable[[], Any], *,
                      where: Mapping[str, Any] | None = None) -> SearchResult:
    """A text query, end to end (text → image): checked, then encoded (:func:`encode_text_query`) and searched.

    Args:
        index: The :class:`~cnclip_kd.retrieval.index.GalleryIndex` of the text encoder's model.
        text: The query as typed, e.g. ``"白色连衣裙"``.
        k: Results wanted.
        text_encoder: Returns the text encoder (loading it on first use); called only once the
            query passed its checks, and outside the timings.
        where: Only items this filter keeps (:func:`search_embedding`).

    Returns:
        The :class:`SearchResult`, ``query`` set (``text``, ``truncated``, ``n_tokens``, ``context_length``).

    Raises:
        QueryError: Empty, whitespace only, or not a string (before ``text_encoder`` is called).
        cnclip_kd.core.tokenizer.NoTextTowerError: From ``text_encoder``: the model has no text tower.
    """
    check_query(text)  # a bad query is refused before a model is loaded for it
    encoder = text_encoder()
    emb, info, timings = encode_text_query(encoder, text)
    return search_embedding(index, emb, k, timings=timings, query=info, where=where)


def results_markdown(results: Sequence[Mapping[str, Any]]) -> str:
    """Hits (:attr:`QueryAnswer.results`) as a Markdown table, for a notebook's ``display(Markdown(...))``.

    Columns: rank, id, score, same category (✓ / ✗, blank when the query has no category,
    e.g. a text), category, caption.
    """
    mark = {True: "✓", False: "✗", None: ""}

    def cell(value: Any) -> str:
        # A "|" in a caption would end the cell; a newline the row.
        return " ".join(str(value).split()).replace("|", "\\|")

    lines = ["| # | id | 得分 score | 同类 same | 类目 label | 标题 caption |", "|---:|---:|---:|:---:|---|---|"]
    lines += [f"| {r['rank']} | {r['id']} | {r['score']:.3f} | {mark[r['same_category']]} | {cell(r['label'])} | "
              f"{cell(r['caption'])} |" for r in results]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the session


@dataclass(frozen=True)
class Query:
    """One query of a :class:`QuerySession`.

    Attributes:
        source: ``"gallery"``, ``"upload"`` (an image from outside the gallery) or ``"text"``.
        name: How to show it: ``id 42``, the file name, or the text in quotes.
        id: The gallery image id (gallery queries only).
        row: Its row in the session's gallery (gallery queries only).
        label: Its category (``""``: unknown, always for uploads and texts).
        caption: Its caption (gallery queries only).
        text: The text as typed (text queries only).
        image: The decoded image (uploads only).
    """

    source: str
    name: str
    id: int | None = None
    row: int | None = None
    label: str = ""
    caption: str = ""
    text: str | None = None
    image: Image.Image | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """``source``, ``id``, ``label``, ``caption``, ``name``, plus ``row`` (gallery) or ``text`` (text)."""
        out = {"source": self.source, "id": self.id, "label": self.label, "caption": self.caption, "name": self.name}
        if self.source == GALLERY:
            out["row"] = self.row
        elif self.source == TEXT:
            out["text"] = self.text
        return out


@dataclass
class QueryAnswer:
    """A :class:`QuerySession` search: the model, the query and its :class:`SearchResult`."""

    model: str
    query: Query
    result: SearchResult

    @property
    def results(self) -> list[dict]:
        """The hits, best first: ``rank``, ``id``, ``row``, ``score``, ``caption``, ``label``, ``product_id``,
        ``same_category`` (whether the hit is in the query's category; ``None`` when either is unknown)."""
        out = []
        for rank, (score, row, meta) in enumerate(zip(self.result.scores, self.result.rows, self.result.metadata), 1):
            label = meta.get("label") or ""
            out.append({"rank": rank, "id": int(meta["id"]), "row": int(row), "score": float(score),
                        "caption": meta.get("caption") or "", "label": label,
                        "product_id": meta.get("product_id") or "",
                        "same_category": (label == self.query.label) if self.query.label and label else None})
        return out

    @property
    def timings(self) -> dict[str, float]:
        """``encode_ms`` (the model run; 0 for a stored embedding), ``search_ms`` and ``total_ms`` (their sum).

        Decoding (or checking and tokenising a text) is in ``result.timings_ms["decode"]``.
        """
        t = self.result.timings_ms
        return {"encode_ms": t["encode"], "search_ms": t["search"], "total_ms": t["encode"] + t["search"]}

    @property
    def truncated(self) -> bool:
        """Whether a text query was longer than the model's context length (its end was not seen)."""
        return bool((self.result.query or {}).get("truncated"))

    @property
    def context_length(self) -> int | None:
        """Tokens the text tower reads (text queries only)."""
        return (self.result.query or {}).get("context_length")

    @property
    def same_category(self) -> int:
        """How many hits are in the query's category (0 when it is unknown)."""
        return sum(bool(r["same_category"]) for r in self.results)


class _Model:
    """One model of a session: its index and (lazily) its image and text encoders."""

    def __init__(self, name: str, index: GalleryIndex, encoder: ImageEncoder | None, device: str | None):
        self.name, self.index, self._device = name, index, device
        self._encoder = encoder
        self._text_encoder: TextEncoder | None = None
        self._no_text: str | None = None  # why the model has no text tower, once found out
        self.spec = (index.stats.get("model") or {}).get("spec")
        self._row_of = {int(i): r for r, i in enumerate(index.gallery.ids)}

    def row_of(self, image_id: int) -> int | None:
        return self._row_of.get(int(image_id))

    def encoder(self) -> ImageEncoder:
        if self._encoder is None:
            if not self.spec:
                raise ValueError(f"model {self.name}: its index records no model spec (stats['model']['spec']); "
                                 "pass the encoder to QueryDemo to search with uploaded photos or text")
            from .encoders import load_encoder  # torch: only when a model has to run

            t0 = time.perf_counter()
            self._encoder = load_encoder(self.spec, device=self._device)
            logger.info("query session: loaded %s (%s) in %.1f s", self.name, self.spec, time.perf_counter() - t0)
        return self._encoder

    def text_encoder(self) -> TextEncoder:
        """The text tower (the image encoder's model, loaded once); a missing one is remembered."""
        if self._text_encoder is None:
            if self._no_text is None and (self.index.stats.get("model") or {}).get("text_tower") is False \
                    and self._encoder is None:
                # Found out when the index was built: no need to load a (possibly large) model to say no.
                self._no_text = (f"{self.spec or self.name}: the index records that this model has no text tower "
                                 "(an image-only model); search it with images, or use a Chinese-CLIP model for text")
            if self._no_text is not None:
                raise NoTextTowerError(self._no_text)
            from .encoders import text_encoder_for

            try:
                self._text_encoder = text_encoder_for(self.encoder())
            except NoTextTowerError as err:
                self._no_text = str(err)
                raise
            logger.info("query session: %s text tower, context length %d", self.name,
                        self._text_encoder.context_length)
        return self._text_encoder


class QuerySession:
    """Image and text queries over one or more saved indexes (one per model), without any UI.

    Example::

        session = QuerySession.from_dirs({"distilled": "out/index/tiny-kd-cosine"})
        answer = session.search(session.gallery_query(7), k=10)
        answer.results[0]       # {"rank": 1, "id": …, "score": …, "label": …, "same_category": True, …}
        session.search(session.text_query("白色连衣裙")).results
        session.search(session.image_query(Path("photo.jpg").read_bytes(), name="photo.jpg"))

    Attributes:
        models: Model names, in the order given (the first is the default model).
        gallery: The first model's gallery: gallery queries are its rows.
    """

    def __init__(self, models: Mapping[str, GalleryIndex | tuple[ImageEncoder | None, GalleryIndex]], *,
                 device: str | None = None):
        """Wrap loaded indexes.

        Args:
            models: Model name → :class:`~cnclip_kd.retrieval.index.GalleryIndex`, or → ``(encoder, index)``
                with an already loaded :class:`~cnclip_kd.retrieval.encoders.ImageEncoder` (``None``: load it
                from the index's spec when an image or text query needs it).
            device: Where encoders loaded here run (default: cuda when available).

        Raises:
            ValueError: No model, or an empty index.
        """
        if not models:
            raise ValueError("QuerySession needs at least one (name → index) model")
        self._models: dict[str, _Model] = {}
        for name, value in models.items():
            encoder, index = value if isinstance(value, tuple) else (None, value)
            if len(index) == 0:
                raise ValueError(f"model {name}: the index is empty")
            self._models[str(name)] = _Model(str(name), index, encoder, device)
        self.models = list(self._models)
        self.gallery = self._models[self.models[0]].index.gallery

    @classmethod
    def from_dirs(cls, index_dirs: Mapping[str, str | os.PathLike], **kwargs: Any) -> QuerySession:
        """Load saved indexes (folders written by :meth:`GalleryIndex.save`, e.g. ``OUTPUT_DIR/index/<model>``).

        Raises:
            FileNotFoundError: A folder is not a saved index (the message names notebook 03).
        """
        from .index import GalleryIndex

        return cls({name: GalleryIndex.load(Path(d)) for name, d in index_dirs.items()}, **kwargs)

    def index(self, model: str | None = None) -> GalleryIndex:
        """A model's index (default: the first model's).

        Raises:
            KeyError: No such model.
        """
        return self._models[model or self.models[0]].index

    # ------------------------------------------------------------------ queries

    def gallery_query(self, row: int | None = None, *, image_id: int | None = None) -> Query:
        """A gallery image as the query, by its row in :attr:`gallery` or by its image id.

        Raises:
            KeyError: ``image_id`` is not in the gallery.
            IndexError: ``row`` is outside the gallery.
        """
        if image_id is not None:
            row = self.gallery.row_of(int(image_id))
        if row is None or not 0 <= int(row) < len(self.gallery):
            raise IndexError(f"query row {row} is outside the gallery (0 … {len(self.gallery) - 1})")
        meta = self.gallery.meta[int(row)]
        return Query(GALLERY, f"id {meta['id']}", id=int(meta["id"]), row=int(row), label=meta.get("label") or "",
                     caption=meta.get("caption") or "")

    def image_query(self, source: QuerySource, name: str | None = None, *,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> Query:
        """An image from outside the gallery as the query, decoded now (:func:`load_query_image`).

        Args:
            source: Encoded bytes (an upload), a file path, or a PIL image.
            name: How to show it (default: the file name, else ``"upload"``).
            max_pixels: Refuse larger images.

        Raises:
            BadImageError: Not a usable image (empty, not an image, truncated, too large).
        """
        if name is None:
            name = Path(source).name if isinstance(source, (str, os.PathLike)) else "upload"
        image = load_query_image(source, max_pixels=max_pixels, name=name)
        return Query(UPLOAD, str(name), image=image)

    def text_query(self, text: str) -> Query:
        """A text as the query (checked when searched: :meth:`check`).

        Raises:
            TypeError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"a text query must be a string, got {type(text).__name__}")
        shown = " ".join(text.split())
        shown = shown if len(shown) <= 40 else shown[:39] + "…"
        return Query(TEXT, f"“{shown}”", text=text)

    @staticmethod
    def check(query: Query) -> None:
        """Refuse a query that cannot be searched, before any model loads.

        Raises:
            QueryError: A text query that is empty, whitespace only or too long.
        """
        if query.source == TEXT:
            check_query(query.text)

    # ------------------------------------------------------------------ search

    def search(self, query: Query, model: str | None = None, k: int = 10) -> QueryAnswer:
        """Run a query with one model (default: the first) and ``k``.

        Raises:
            QueryError: A bad text query (before any model loads).
            cnclip_kd.core.tokenizer.NoTextTowerError: A text query for a model without a text tower.
            BadImageError: A gallery image that cannot be read (an index saved without embeddings).
            KeyError: No such model.
        """
        m = self._models[model or self.models[0]]
        if query.source == TEXT:
            result = search_text_query(m.index, query.text, k, m.text_encoder)
        elif query.source == GALLERY and m.row_of(query.id) is not None and m.index.embeddings is not None:
            emb = np.asarray(m.index.embeddings[m.row_of(query.id)], np.float32)[None]
            result = search_embedding(m.index, emb, k, exclude_id=query.id)
        else:
            if query.source == GALLERY:
                image, prepare = query.row, self.gallery.image
                exclude = query.id if m.row_of(query.id) is not None else None
            else:
                image, prepare, exclude = query.image, load_query_image, None
            encoder = m.encoder()  # loaded once, outside the timings
            result = search_image_query(m.index, image, k, prepare=prepare,
                                        encode=lambda img: encoder.encode_pil([img]), exclude_id=exclude)
        return QueryAnswer(m.name, query, result)
