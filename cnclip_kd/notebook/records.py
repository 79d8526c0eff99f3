"""Record a notebook's results so that tests (and people) can read them back.

A notebook's last cell calls :func:`record` with the numbers that matter
(metrics, file paths, counts).  Inside Jupyter the values become one display
output carrying a custom MIME type, :data:`RECORD_MIME`, next to a plain-text
and an HTML rendering for humans.  After a headless run (papermill),
:func:`read_records` pulls the values back out of the executed notebook.
This is the idea of scrapbook's ``glue``, without the dependency.

Values must be JSON-serialisable after a light conversion: numpy / torch
scalars and arrays (anything with ``.tolist()`` or ``.item()``), tuples and
sets become lists, :class:`pathlib.Path` becomes ``str``.  Non-finite floats
(NaN, ±inf) are not valid JSON: they are stored as ``null`` (the human
renderings still show the original value) and a warning is logged.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Union

logger = logging.getLogger(__name__)

#: MIME type of the display output that carries the recorded values.
RECORD_MIME = "application/vnd.cnclip-kd.record+json"


def _to_json(value: Any, where: str) -> Any:
    """Convert ``value`` to plain JSON types; ``where`` names it in errors."""
    if value is None:
        return None
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str(value)  # plain str, not numpy.str_
    if isinstance(value, int):
        return int(value)  # also turns IntEnum and friends into plain ints
    if isinstance(value, float):
        if not math.isfinite(value):
            logger.warning("record: %s is %r, stored as null (JSON has no NaN/inf)", where, value)
            return None
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                # Silent str(key) would make a read-back dict differ from what was recorded.
                raise TypeError(f"record: {where} has a non-string key {key!r}; JSON keys must be strings")
            out[key] = _to_json(item, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return [_to_json(item, f"{where}[...]") for item in sorted(value, key=repr)]
    # numpy / torch scalars and arrays, duck-typed so neither is imported here.
    if hasattr(value, "tolist"):
        return _to_json(value.tolist(), where)
    if hasattr(value, "item"):
        return _to_json(value.item(), where)
    raise TypeError(
        f"record: {where} has type {type(value).__name__}, which is not JSON-serialisable; "
        "record numbers, strings, lists or dicts"
    )


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _RecordDisplay:
    """Display object: IPython picks the MIME bundle from ``_repr_mimebundle_``."""

    def __init__(self, values: dict, originals: dict):
        self.values = values
        self.originals = originals

    def _repr_mimebundle_(self, include=None, exclude=None):
        lines = [f"{name}: {_short(value)}" for name, value in self.originals.items()]
        rows = "".join(
            f"<tr><td><code>{html.escape(name)}</code></td><td>{html.escape(_short(value))}</td></tr>"
            for name, value in self.originals.items()
        )
        return {
            RECORD_MIME: self.values,
            "text/plain": "recorded:\n  " + "\n  ".join(lines),
            "text/html": f"<table><caption>recorded</caption>{rows}</table>",
        }


def record(**values: Any) -> None:
    """Record named results of a notebook run.

    Call it in a notebook's last cell, e.g.
    ``record(map_at_10=map10, n_images=len(paths))``.  In IPython the values
    are displayed as one output with MIME type :data:`RECORD_MIME` (read back
    by :func:`read_records`) plus text and HTML renderings; outside IPython
    they are only logged.

    Args:
        **values: Names and values to record.  Values must be numbers,
            strings, booleans, ``None``, lists or dicts of those, numpy/torch
            scalars or arrays, or paths.

    Raises:
        TypeError: If a value cannot be converted to JSON.
    """
    converted = {name: _to_json(value, name) for name, value in values.items()}
    # Fail here, in the notebook, rather than in the kernel's message packer.
    json.dumps(converted, allow_nan=False)
    logger.info("record: %s", json.dumps(converted, ensure_ascii=False))

    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is None:
        return
    display(_RecordDisplay(converted, dict(values)))


def read_records(notebook: Union[str, os.PathLike, Mapping]) -> dict:
    """Read the values recorded by :func:`record` from an executed notebook.

    Args:
        notebook: Path to an ``.ipynb`` file, or an already loaded notebook
            (``nbformat.NotebookNode`` or a plain dict in nbformat 4 layout).

    Returns:
        All recorded values merged in output order (a later ``record`` call
        overrides an earlier value of the same name); empty if none.
    """
    if isinstance(notebook, (str, os.PathLike)):
        with open(Path(notebook), encoding="utf-8") as f:
            notebook = json.load(f)
    merged: dict = {}
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        for output in cell.get("outputs", []):
            data = output.get("data") or {}
            if RECORD_MIME not in data:
                continue
            payload = data[RECORD_MIME]
            if isinstance(payload, str):
                # Some writers store JSON MIME data as a string.
                payload = json.loads(payload)
            # Round-trip through JSON so callers get plain dicts/lists, not NotebookNodes.
            merged.update(json.loads(json.dumps(payload)))
    return merged
