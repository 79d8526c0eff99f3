"""Text queries: cn_clip's own tokenizer (without importing torch) and the checks a query goes through.

:func:`tokenize` gives exactly the ids of ``cn_clip.clip.tokenize`` — ``[CLS]``,
at most ``context_length - 2`` word pieces, ``[SEP]``, zero padding — as a
numpy array, and says which texts were cut. It runs cn_clip's
``FullTokenizer`` with cn_clip's ``vocab.txt``; the module is loaded from its
file because ``import cn_clip.clip`` imports torch, which the CPU serving path
(ONNX Runtime) does without.

:func:`check_query` refuses what cannot be a query (not a string, empty, only
whitespace) with :class:`QueryError`; everything else — Chinese, Latin,
digits, emoji, mixed scripts — is tokenised as cn_clip tokenises it
(characters outside the vocabulary become ``[UNK]``).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["CONTEXT_LENGTH", "NoTextTowerError", "QueryError", "Tokens", "check_query", "preprocess_text", "tokenize"]

#: cn_clip's default text context length (``--context-length``), ``[CLS]`` and ``[SEP]`` included.
CONTEXT_LENGTH = 52
#: Queries longer than this many characters are refused before tokenising (a pasted document is no query).
MAX_QUERY_CHARS = 1000


class QueryError(ValueError):
    """A text query that cannot be searched (empty, whitespace only, not text, or absurdly long)."""


class NoTextTowerError(ValueError):
    """The model has no text tower the kit can use (an image-only teacher such as EfficientNet-Lite).

    Defined here, with no torch import, so a CPU server can catch it; :mod:`cnclip_kd.retrieval.encoders` raises it.
    """


def preprocess_text(text: str) -> str:
    """What cn_clip does to a text before tokenising it (training and evaluation alike): lower case, straight quotes."""
    return text.lower().replace("“", '"').replace("”", '"')


def check_query(text: object) -> str:
    """A usable query, stripped of surrounding whitespace.

    Raises:
        QueryError: ``text`` is not a string, is empty or only whitespace, or is over
            :data:`MAX_QUERY_CHARS` characters.
    """
    if not isinstance(text, str):
        raise QueryError(f"a text query must be a string, got {type(text).__name__}")
    stripped = text.strip()
    if not stripped:
        raise QueryError("empty text query: type a few words, e.g. 白色连衣裙 (white dress)")
    if len(stripped) > MAX_QUERY_CHARS:
        raise QueryError(f"text query of {len(stripped)} characters; at most {MAX_QUERY_CHARS} "
                         "(only the first tokens are used anyway)")
    return stripped


@functools.lru_cache(maxsize=1)
def _full_tokenizer():
    """cn_clip's ``FullTokenizer`` with cn_clip's vocabulary, loaded without running ``cn_clip/clip/__init__``."""
    spec = importlib.util.find_spec("cn_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("cn_clip is not installed: pip install cn_clip")
    clip_dir = Path(next(iter(spec.submodule_search_locations))) / "clip"
    source = clip_dir / "bert_tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("_cnclip_kd_bert_tokenizer", source)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.FullTokenizer(vocab_file=str(clip_dir / "vocab.txt"))


@dataclass
class Tokens:
    """Token ids of a batch of texts.

    Attributes:
        ids: ``[N, L]`` int64, each row ``[CLS] … [SEP]`` then zeros (``[PAD]``); ``L`` is the
            context length, or the longest row when tokenised with ``pad_to_context=False``.
        lengths: ``[N]`` tokens in each row, ``[CLS]``/``[SEP]`` included.
        truncated: ``[N]`` whether the text had more word pieces than the context length holds.
        n_pieces: ``[N]`` word pieces of each text before any cut.
        context_length: The context length used.
    """

    ids: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray
    n_pieces: np.ndarray
    context_length: int


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, *,
             pad_to_context: bool = True) -> Tokens:
    """Tokenise as ``cn_clip.clip.tokenize`` does (after :func:`preprocess_text`), in numpy.

    Args:
        texts: One text or several.
        context_length: Tokens per row, ``[CLS]`` and ``[SEP]`` included (≥ 3).
        pad_to_context: Pad every row to ``context_length`` (cn_clip's shape); ``False``
            pads only to the longest row, which gives the same embeddings (padding is
            masked out) for less work.

    Returns:
        :class:`Tokens`.
    """
    if isinstance(texts, str):
        texts = [texts]
    if int(context_length) < 3:
        raise ValueError(f"context_length {context_length} < 3: no room for a word between [CLS] and [SEP]")
    tok = _full_tokenizer()
    cls_id, sep_id = tok.vocab["[CLS]"], tok.vocab["[SEP]"]
    rows, pieces = [], []
    for text in texts:
        ids = tok.convert_tokens_to_ids(tok.tokenize(preprocess_text(str(text))))
        pieces.append(len(ids))
        rows.append([cls_id] + ids[:context_length - 2] + [sep_id])
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    width = int(context_length) if pad_to_context else int(lengths.max(initial=2))
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    n_pieces = np.array(pieces, dtype=np.int64)
    return Tokens(ids=out, lengths=lengths, truncated=n_pieces > context_length - 2, n_pieces=n_pieces,
                  context_length=int(context_length))
