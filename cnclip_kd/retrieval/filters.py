"""Metadata filters for gallery searches, one syntax and one meaning for both back-ends.

A filter is a dict, every entry of which must hold (AND)::

    {"label": "dress"}                        # label equals "dress"
    {"price": {"lt": 100}}                    # the price attribute is a number below 100
    {"label": {"in": ["dress", "skirt"]}, "price": {"ge": 20, "lt": 100}, "in_stock": True}

A key is ``label`` (the category) or the name of an attribute (any other metadata field);
its value is a plain value (``eq``) or a dict of operators: ``eq``, ``ne``, ``lt``, ``le``,
``gt``, ``ge`` and ``in`` (a non-empty list). Values are strings, numbers or booleans.

What each operator means, in :func:`matches` (the FAISS side) and in the SQL that
:mod:`cnclip_kd.retrieval.pgvector` writes from the same parsed :class:`Condition`:

* ``eq`` / ``in``: equal to the value (to one of them). Numbers compare by value (``1 == 1.0``);
  a boolean equals only a boolean; a missing field equals nothing.
* ``ne``: not ``eq``, so a row *without* the field matches.
* ``lt`` / ``le`` / ``gt`` / ``ge``: numbers with numbers, strings with strings (by code point, as
  ``COLLATE "C"`` sorts them); a field of another type, or a missing one, never matches.

A bad filter (unknown operator, a key that is not a name, a column that cannot be filtered, a
value of the wrong type) raises :class:`FilterError` naming it, before any search runs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["FILTER_COLUMNS", "OPERATORS", "RESERVED_KEYS", "Condition", "FilterError", "canonical", "match_mask",
           "matches", "parse_where"]

#: The operators a filter may use.
OPERATORS = ("eq", "ne", "lt", "le", "gt", "ge", "in")
#: Keys that are columns of their own (strings only), not attributes.
FILTER_COLUMNS = ("label",)
#: Fields every gallery row has that filters do not cover (search by id with ``get``; by text with the model).
RESERVED_KEYS = ("id", "image", "caption", "title", "added_at", "vector", "attributes")
_ORDERED = ("lt", "le", "gt", "ge")
# A name PostgreSQL could hold as one identifier (63 bytes): letters (any script), digits, underscores.
_KEY = re.compile(r"[^\W\d]\w{0,62}")
_MISSING = object()


class FilterError(ValueError):
    """A ``where`` filter that cannot be run: the message names the bad key, operator or value and the fix."""


@dataclass(frozen=True)
class Condition:
    """One parsed test of a filter.

    Attributes:
        key: ``label`` or an attribute name.
        op: One of :data:`OPERATORS`.
        value: A string, number or boolean; for ``in`` a tuple of them.
    """

    key: str
    op: str
    value: Any

    @property
    def column(self) -> bool:
        """Whether the key is a column of its own (``label``) rather than an attribute."""
        return self.key in FILTER_COLUMNS


def _check_scalar(key: str, op: str, value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or isinstance(value, str):
        pass
    elif isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise FilterError(f"where[{key!r}][{op!r}] = {value!r}: use a finite number")
    else:
        raise FilterError(f"where[{key!r}][{op!r}] = {value!r} ({type(value).__name__}): filter values are strings, "
                          "numbers or booleans (a list only for 'in')")
    if key in FILTER_COLUMNS and not isinstance(value, str):
        raise FilterError(f"where[{key!r}][{op!r}] = {value!r}: {key} is text; compare it with a string")
    if op in _ORDERED and isinstance(value, bool):
        raise FilterError(f"where[{key!r}][{op!r}] = {value!r}: {op} compares numbers or strings, not booleans")
    return value


def _conditions_of(key: str, spec: Any) -> list[Condition]:
    if not isinstance(spec, Mapping):
        return [Condition(key, "eq", _check_scalar(key, "eq", spec))]
    if not spec:
        raise FilterError(f"where[{key!r}] is an empty dict; give a value or operators such as {{'lt': 100}}")
    out = []
    for op, value in spec.items():
        if op not in OPERATORS:
            raise FilterError(f"where[{key!r}]: unknown operator {op!r}; use one of {', '.join(OPERATORS)}")
        if op == "in":
            if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
                raise FilterError(f"where[{key!r}]['in'] = {value!r}: give a non-empty list of values")
            values = tuple(_check_scalar(key, op, v) for v in value)
            if not values:
                raise FilterError(f"where[{key!r}]['in'] is empty: it would match nothing; drop it or add values")
            out.append(Condition(key, op, values))
        else:
            out.append(Condition(key, op, _check_scalar(key, op, value)))
    return out


def parse_where(where: Mapping[str, Any] | None) -> tuple[Condition, ...]:
    """Check a filter and split it into :class:`Condition` s (an empty tuple for ``None`` or ``{}``).

    Args:
        where: ``{key: value}`` or ``{key: {operator: value, ...}}``; see the module docstring.

    Returns:
        The conditions, sorted by key and operator (the same filter always gives the same tuple).

    Raises:
        FilterError: Not a dict, a key that is not a name or is reserved (``id``, ``image``, …), an
            unknown operator, or a value of the wrong type.
    """
    if where is None:
        return ()
    if not isinstance(where, Mapping):
        raise FilterError(f"where must be a dict such as {{'label': 'dress', 'price': {{'lt': 100}}}}, "
                          f"got {type(where).__name__}")
    out: list[Condition] = []
    for key, spec in where.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise FilterError(f"where key {key!r} is not a field name: use letters, digits and '_' "
                              "(not starting with a digit, at most 63 characters)")
        if key in RESERVED_KEYS:
            raise FilterError(f"where key {key!r} cannot be filtered; filter on 'label' or on an attribute "
                              f"(not one of {', '.join(RESERVED_KEYS)})")
        out += _conditions_of(key, spec)
    return tuple(sorted(out, key=lambda c: (c.key, c.op, repr(c.value))))


def canonical(conditions: Sequence[Condition]) -> str:
    """A string that is the same for the same filter (a cache key)."""
    return json.dumps([[c.key, c.op, list(c.value) if c.op == "in" else c.value] for c in conditions],
                      ensure_ascii=False)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return isinstance(a, str) and isinstance(b, str) and a == b


def _holds(cond: Condition, value: Any) -> bool:
    """Whether one field value (or ``_MISSING``) passes one condition."""
    if cond.op == "ne":
        return value is _MISSING or not _equal(value, cond.value)
    if value is _MISSING:
        return False
    if cond.op == "eq":
        return _equal(value, cond.value)
    if cond.op == "in":
        return any(_equal(value, v) for v in cond.value)
    want_number = not isinstance(cond.value, str)
    if want_number:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
    elif not isinstance(value, str):
        return False
    if cond.op == "lt":
        return value < cond.value
    if cond.op == "le":
        return value <= cond.value
    if cond.op == "gt":
        return value > cond.value
    return value >= cond.value


def matches(conditions: Sequence[Condition], row: Mapping[str, Any]) -> bool:
    """Whether one metadata row passes every condition (Python's reading of the filter)."""
    return all(_holds(c, row.get(c.key, _MISSING)) for c in conditions)


def match_mask(conditions: Sequence[Condition], columns: Mapping[str, Sequence[Any]], n: int) -> np.ndarray:
    """Which of ``n`` rows pass every condition, from their values column by column.

    Args:
        conditions: From :func:`parse_where`.
        columns: Key → the ``n`` rows' values of that field (``None`` where a row lacks it; a stored
            ``null`` reads as missing too).
        n: Rows.

    Returns:
        ``[n]`` bool.
    """
    mask = np.ones(n, dtype=bool)
    for cond in conditions:
        values = columns[cond.key]
        hit = np.fromiter((_holds(cond, _MISSING if v is None else v) for v in values), dtype=bool, count=n)
        mask &= hit
    return mask
