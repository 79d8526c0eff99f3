"""The query-time retriever: one encoder (ONNX or torch) plus one gallery index, for images and text.

Its queries run through the steps :mod:`cnclip_kd.retrieval.session` spells once for every front end
(decoding, the text checks, tokenising, the search and :class:`SearchResult`); this module adds the
serving encoders (ONNX Runtime or PyTorch on the CPU), loaded on first use and checked against the index.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from ..core.images import DEFAULT_MAX_PIXELS
from ..retrieval.session import (
    QuerySource,
    SearchResult,
    encode_text_query,
    load_query_image,
    search_image_query,
    search_text_query,
)
from .backends import (
    BACKENDS,
    OnnxEncoder,
    OnnxTextEncoder,
    TorchEncoder,
    encoder_fingerprint,
    make_encoder,
    make_text_encoder,
    to_pixels,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..retrieval.encoders import TextEncoder

logger = logging.getLogger(__name__)

__all__ = ["Retriever", "SearchResult"]


def _text_backend_name(encoder: Any) -> str:
    return encoder.name if isinstance(encoder, OnnxTextEncoder) else "torch-text"


def _image_only_spec(spec: str) -> bool:
    """Whether a model spec names an image-only teacher (EfficientNet-Lite, timm), known without loading it."""
    if not str(spec).startswith("teacher:"):
        return False
    from ..models.image_teachers import is_image_teacher

    return is_image_teacher(str(spec)[len("teacher:"):])


def _check_where(where: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """``where`` if it is a usable filter (checked here, before any decoding or encoding), else ``None``.

    Raises:
        cnclip_kd.retrieval.filters.FilterError: A bad filter (names the key, operator or value).
    """
    from ..retrieval.filters import parse_where

    return where if parse_where(where) else None


class Retriever:
    """Image or text query → Top-k gallery items, in one call.

    Either encoder may be given or left to load from the model the index was built with
    (``index.stats["model"]["spec"]``, in PyTorch) at the first query that needs it: a
    text-only server never loads an image tower, and an ONNX-only one never imports torch.

    Attributes:
        index: The :class:`~cnclip_kd.retrieval.index.GalleryIndex`.
        encoder: The image encoder (:class:`OnnxEncoder` or :class:`TorchEncoder`; loaded on first use).
        text_encoder: The text encoder (:class:`OnnxTextEncoder` or a
            :class:`cnclip_kd.retrieval.encoders.TextEncoder`; loaded on first use).
        fast_decode: Whether JPEG queries are decoded at reduced size (:func:`load_query_image`).
        max_pixels: Larger queries are refused.
        threads: Intra-op threads of encoders loaded on first use.
    """

    def __init__(self, index, encoder: OnnxEncoder | TorchEncoder | None = None, *,
                 text_encoder: OnnxTextEncoder | TextEncoder | None = None, fast_decode: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS, backend: str = "auto", threads: int | None = None):
        """Pair an index with the encoders of the model it was built with.

        Args:
            index: A :class:`~cnclip_kd.retrieval.index.GalleryIndex`.
            encoder: The image encoder; ``None``: the index's model with ``backend``
                (:func:`make_encoder`), loaded at the first image query.
            text_encoder: The text encoder; ``None``: the index's model in PyTorch
                (:func:`make_text_encoder`), loaded at the first text query.
            fast_decode: Decode JPEG queries at reduced size (see :func:`load_query_image`).
            max_pixels: Refuse larger query images.
            backend: Back-end of an image encoder loaded on first use (see :func:`make_encoder`).
            threads: Intra-op threads of encoders loaded on first use.

        Raises:
            ValueError: An encoder whose embedding size differs from the index's, or whose weights
                fingerprint differs from the one the index records (not the model it was built with);
                an unknown ``backend``.
        """
        if backend not in ("auto",) + BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
        self.index = index
        self.fast_decode = bool(fast_decode)
        self.max_pixels = int(max_pixels)
        self.threads = int(threads) if threads else None
        self._backend = backend
        self._encoder = None
        self._text_encoder = None
        self._text_error: Exception | None = None
        if encoder is not None:
            self._check_image_encoder(encoder)
            self._encoder = encoder
        if text_encoder is not None:
            self._check_text_encoder(text_encoder)
            self._text_encoder = text_encoder

    @classmethod
    def load(cls, index_dir: str | os.PathLike, encoder: str | os.PathLike | None = None, *,
             text_encoder: Any = None, backend: str = "auto", threads: int | None = None,
             fast_decode: bool = True, max_pixels: int = DEFAULT_MAX_PIXELS) -> Retriever:
        """Load a saved index folder and its encoders.

        Args:
            index_dir: A folder written by :meth:`GalleryIndex.save <cnclip_kd.retrieval.index.GalleryIndex.save>`
                (notebook 03, ``cnclip-kd index``).
            encoder: Image encoder: an ``.onnx`` file, a checkpoint or a cn_clip pretrained name;
                ``None``: the model the index was built with (``stats["model"]["spec"]``), in
                PyTorch, loaded at the first image query.
            text_encoder: Text encoder: an ``.onnx`` text model (:func:`cnclip_kd.deploy.export.export_text_onnx`),
                or a checkpoint / spec for PyTorch (:func:`make_text_encoder`); ``None``: the index's
                model, loaded at the first text query (:func:`cnclip_kd.retrieval.encoders.load_text_encoder`).
            backend: See :func:`make_encoder`.
            threads: Intra-op threads of the encoders.
            fast_decode: Decode JPEG queries at reduced size (see :func:`load_query_image`).
            max_pixels: Refuse larger query images.

        Raises:
            FileNotFoundError: Not a saved index, or a missing ``.onnx`` file.
            ValueError: No encoder given and the index does not name its model; an encoder
                that does not fit the index.
            cnclip_kd.core.tokenizer.NoTextTowerError: ``text_encoder`` names a model without a text tower.
        """
        from ..retrieval.index import GalleryIndex

        index = GalleryIndex.load(index_dir)
        if encoder is None and text_encoder is None and not (index.stats.get("model") or {}).get("spec"):
            raise ValueError(f"{index_dir}: the index does not name its model; pass encoder=<.onnx or checkpoint> "
                             "and/or text_encoder=<.onnx text model or checkpoint>")
        image = make_encoder(encoder, backend, threads=threads) if encoder is not None else None
        text = make_text_encoder(text_encoder, threads=threads) if text_encoder is not None else None
        return cls(index, image, text_encoder=text, fast_decode=fast_decode, max_pixels=max_pixels,
                   backend=backend, threads=threads)

    # ------------------------------------------------------------------ encoders and their checks

    @property
    def _model(self) -> dict:
        return self.index.stats.get("model") or {}

    def _check_image_encoder(self, encoder: Any) -> None:
        if encoder.dim != self.index.dim:
            raise ValueError(f"the encoder gives {encoder.dim}-d embeddings, the index holds {self.index.dim}-d: "
                             "not the model the index was built with")
        built_with, mine = self._model.get("fingerprint"), encoder_fingerprint(encoder)
        if built_with and mine and built_with != mine:
            raise ValueError(f"the encoder ({mine}) is not the model the index was built with "
                             f"({built_with}, {self._model.get('spec')}); its embeddings "
                             "are not comparable. Export that checkpoint, or rebuild the index (notebook 03)")

    def _check_text_encoder(self, encoder: Any) -> None:
        if encoder.dim != self.index.dim:
            raise ValueError(f"the text encoder gives {encoder.dim}-d embeddings, the index holds "
                             f"{self.index.dim}-d: not the model the index was built with")
        spec = self._model.get("spec")
        for what, built_with, mine in (
                ("text tower", self._model.get("text_fingerprint"), encoder_fingerprint(encoder)),
                ("image tower", self._model.get("fingerprint"), getattr(encoder, "image_fingerprint", None))):
            if built_with and mine and built_with != mine:
                raise ValueError(f"the text encoder ({what} {mine}) is not the model the index was built with "
                                 f"({built_with}, {spec}); its embeddings are not comparable. Export that "
                                 "model's text tower (export_text_onnx, `cnclip-kd export --text-out`), or "
                                 "rebuild the index (notebook 03)")

    @property
    def encoder(self) -> OnnxEncoder | TorchEncoder:
        """The image encoder, loaded from the index's model at first use when none was given.

        Raises:
            ValueError: The index does not name its model, or that model cannot serve (see :func:`make_encoder`).
        """
        if self._encoder is None:
            spec = self._model.get("spec")
            if not spec:
                raise ValueError("the index does not name its model and no image encoder was given; "
                                 "pass encoder=<.onnx or checkpoint>")
            encoder = make_encoder(spec, self._backend, threads=self.threads)
            self._check_image_encoder(encoder)
            self._encoder = encoder
        return self._encoder

    @property
    def text_encoder(self) -> OnnxTextEncoder | TextEncoder:
        """The text encoder, loaded from the index's model at first use when none was given.

        Raises:
            cnclip_kd.core.tokenizer.NoTextTowerError: The index's model has no text tower (an image-only
                teacher such as ``teacher:efficientnet-lite2``); the message names it. Known from the
                index (``stats["model"]["text_tower"]``) or the spec without loading any weights.
            ValueError: The index does not name its model, or its text tower does not fit the index.
        """
        if self._text_encoder is None:
            if self._text_error is not None:
                raise self._text_error  # a model without a text tower is not loaded again for every query
            self._text_encoder = self._load_text_encoder()
        return self._text_encoder

    def _load_text_encoder(self):
        spec = self._model.get("spec")
        if not spec:
            raise ValueError("the index does not name its model and no text encoder was given; pass "
                             "text_encoder=<.onnx text model or checkpoint> (export_text_onnx, "
                             "`cnclip-kd export --text-out`)")
        from ..core.tokenizer import NoTextTowerError

        image_only = _image_only_spec(spec)
        if image_only or self._model.get("text_tower") is False:
            what = "an image-only model" if image_only else "the model this index was built with"
            self._text_error = NoTextTowerError(
                f"{spec}: {what} has no text tower for Chinese text queries (the index holds its image "
                "embeddings only); search it with images, or index with a Chinese-CLIP student or teacher for "
                "text → image")
            raise self._text_error
        try:
            encoder = make_text_encoder(spec, threads=self.threads, context_length=self._model.get("context_length"))
        except NoTextTowerError as err:
            self._text_error = err
            raise
        self._check_text_encoder(encoder)
        logger.info("text encoder loaded from the index's model %s (PyTorch)", spec)
        return encoder

    @property
    def backend(self) -> str:
        """The image encoder's name: ``onnx-fp32``, ``onnx-int8``, ``torch``, ``torch-bf16``, ``torch-compile``."""
        return self.encoder.name

    @property
    def text_backend(self) -> str:
        """The text encoder's name: ``onnx-text-fp32``, ``onnx-text-int8`` or ``torch-text``."""
        return _text_backend_name(self.text_encoder)

    # ------------------------------------------------------------------ queries

    def pixels(self, image: QuerySource) -> np.ndarray:
        """Decode + preprocess one query: ``[3, R, R]`` float32.

        Raises:
            BadImageError: The input is not a usable image.
        """
        r = self.encoder.resolution
        img = load_query_image(image, draft_size=r if self.fast_decode else None, max_pixels=self.max_pixels)
        return to_pixels(img, r)

    def embed(self, image: QuerySource) -> np.ndarray:
        """The query's ``[D]`` L2-normalised embedding."""
        return self.encoder.encode(self.pixels(image)[None])[0]

    def embed_text(self, text: str) -> np.ndarray:
        """A text query's ``[D]`` L2-normalised embedding.

        Raises:
            QueryError: Empty, whitespace only, or not a string.
        """
        return encode_text_query(self.text_encoder, text)[0][0]

    def search(self, image: QuerySource, k: int = 10, *, where: Mapping[str, Any] | None = None) -> SearchResult:
        """The ``k`` most similar gallery items of a query image.

        Args:
            image: JPEG/PNG/… bytes, a file path, or a PIL image.
            k: Results wanted.
            where: Only items this filter keeps (:mod:`cnclip_kd.retrieval.filters`), e.g.
                ``{"label": "dress", "price": {"lt": 100}}``; FAISS and pgvector read it alike.

        Returns:
            ids, scores, rows, metadata and ``timings_ms`` (``decode``, ``encode``, ``search``, ``total``).

        Raises:
            BadImageError: Empty, truncated, not an image, or too large.
            cnclip_kd.retrieval.filters.FilterError: A bad filter (before the image is decoded).
        """
        where = _check_where(where)
        encoder = self.encoder  # loaded here on first use, outside the timings
        return search_image_query(self.index, image, k, prepare=self.pixels, encode=lambda x: encoder.encode(x[None]),
                                  where=where)

    def search_text(self, text: str, k: int = 10, *, where: Mapping[str, Any] | None = None) -> SearchResult:
        """The ``k`` gallery images that best match a text query (text → image).

        The query is checked (:func:`cnclip_kd.core.tokenizer.check_query`), tokenised as cn_clip does
        at its own length (Chinese, Latin, digits, emoji, mixed scripts; characters outside the
        vocabulary become ``[UNK]``), encoded by the text tower and searched in the index
        (:func:`cnclip_kd.retrieval.session.search_text_query`, as the notebook's query session does).

        Args:
            text: The query, e.g. ``"白色连衣裙"``.
            k: Results wanted.
            where: Only items this filter keeps (as :meth:`search`).

        Returns:
            ids, scores, rows, metadata, ``timings_ms`` (``decode`` = query check + tokenise,
            ``encode``, ``search``, ``total``) and ``query`` (``text``, ``truncated``: the query
            was longer than the context length and its end was cut, ``n_tokens``, ``context_length``).

        Raises:
            QueryError: Empty, whitespace only, or not a string (checked before any model loads).
            cnclip_kd.core.tokenizer.NoTextTowerError: The index's model has no text tower (names it).
            cnclip_kd.retrieval.filters.FilterError: A bad filter (before the text is encoded).
        """
        return search_text_query(self.index, text, k, lambda: self.text_encoder, where=_check_where(where))

    def __repr__(self) -> str:
        text = _text_backend_name(self._text_encoder) if self._text_encoder is not None else "on first text query"
        image = repr(self._encoder) if self._encoder is not None else "image encoder on first image query"
        return (f"Retriever({image}, text={text}, index={self.index.stats.get('kind')} × {len(self.index)}, "
                f"fast_decode={self.fast_decode})")
