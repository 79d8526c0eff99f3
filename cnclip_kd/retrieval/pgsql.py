"""The SQL behind :mod:`cnclip_kd.retrieval.pgvector`: tables, the HNSW index, filters, binary COPY rows.

Every name that reaches SQL is checked first and quoted by psycopg (``sql.Identifier`` for tables
and columns, ``sql.Literal`` for attribute keys); every value travels as a query parameter.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .filters import Condition

__all__ = ["GALLERY_COLUMNS", "META_TABLE", "FingerprintMismatchError", "build_hnsw", "copy_payload", "count_rows",
           "create_attribute_index", "create_gallery_tables", "delete_ids", "drop_gallery", "fetch_rows",
           "filter_share", "gallery_table", "hnsw_index_sql", "nearest", "read_gallery_info", "upsert_rows",
           "where_sql"]

#: The table that records every gallery's settings and encoder.
META_TABLE = "cnclip_galleries"
#: The columns :func:`copy_payload` writes, in order (``added_at`` takes its default).
GALLERY_COLUMNS = ("id", "vector", "label", "title", "image", "attributes")
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_COPY_TRAILER = struct.pack(">h", -1)
_OPS = {("halfvec", "ip"): "halfvec_ip_ops", ("halfvec", "cosine"): "halfvec_cosine_ops",
        ("vector", "ip"): "vector_ip_ops", ("vector", "cosine"): "vector_cosine_ops"}
_SQL_OP = {"eq": "=", "ne": "<>", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


class FingerprintMismatchError(ValueError):
    """Embeddings of one encoder written to, or searched in, a gallery of another (names both)."""


def gallery_table(name: str) -> str:
    """The table that holds gallery ``name``."""
    return f"gallery_{name}"


def hnsw_index_sql(table: str, vector_type: str, metric: str, params: Mapping[str, Any]):
    """``CREATE INDEX`` for the gallery's HNSW index with its recorded ``m`` and ``ef_construction``."""
    from psycopg import sql

    return sql.SQL("CREATE INDEX {name} ON {table} USING hnsw (vector {ops}) WITH (m = {m}, ef_construction = {ef})"
                   ).format(name=sql.Identifier(f"{table}_hnsw"), table=sql.Identifier(table),
                            ops=sql.SQL(_OPS[(vector_type, metric)]), m=sql.Literal(int(params["m"])),
                            ef=sql.Literal(int(params["ef_construction"])))


def create_gallery_tables(conn, name: str, info: Mapping[str, Any], *, index: bool = True) -> None:
    """Create the metadata table (when missing), the gallery's table and indexes and its metadata row, at once."""
    from psycopg import sql

    table = gallery_table(name)
    ident = sql.Identifier(table)
    with conn.transaction():
        conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, dim integer NOT NULL, vector_type text NOT NULL, "
            "metric text NOT NULL, m integer NOT NULL, ef_construction integer NOT NULL, ef_search integer NOT NULL, "
            "fingerprint text NOT NULL, model jsonb NOT NULL DEFAULT '{{}}', "
            "created_at timestamptz NOT NULL DEFAULT now())").format(sql.Identifier(META_TABLE)))
        conn.execute(sql.SQL(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, vector {vt}({d}) NOT NULL, label text NOT NULL DEFAULT '', "
            "title text NOT NULL DEFAULT '', image text, attributes jsonb NOT NULL DEFAULT '{{}}', "
            "added_at timestamptz NOT NULL DEFAULT now())").format(
            t=ident, vt=sql.SQL(info["vector_type"]), d=sql.Literal(int(info["dim"]))))
        # A filter on label or on attribute equality can then find its rows without reading the whole table.
        conn.execute(sql.SQL("CREATE INDEX {} ON {} (label)").format(sql.Identifier(f"{table}_label"), ident))
        conn.execute(sql.SQL("CREATE INDEX {} ON {} USING gin (attributes jsonb_path_ops)").format(
            sql.Identifier(f"{table}_attributes"), ident))
        if index:
            conn.execute(hnsw_index_sql(table, info["vector_type"], info["metric"], info))
        conn.execute(sql.SQL(
            "INSERT INTO {} (name, dim, vector_type, metric, m, ef_construction, ef_search, fingerprint, model) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb)").format(sql.Identifier(META_TABLE)),
            (name, int(info["dim"]), info["vector_type"], info["metric"], int(info["m"]), int(info["ef_construction"]),
             int(info["ef_search"]), info["fingerprint"], json.dumps(info.get("model") or {}, ensure_ascii=False,
                                                                       default=str)))


def read_gallery_info(conn, name: str | None) -> dict | list[str] | None:
    """Gallery ``name``'s metadata row as a dict (``None`` when there is none); with ``name=None``, every name."""
    from psycopg import sql

    if conn.execute("SELECT to_regclass(%s)", (META_TABLE,)).fetchone()[0] is None:
        return [] if name is None else None
    meta = sql.Identifier(META_TABLE)
    if name is None:
        return [r[0] for r in conn.execute(sql.SQL("SELECT name FROM {} ORDER BY name").format(meta)).fetchall()]
    cur = conn.execute(sql.SQL("SELECT name, dim, vector_type, metric, m, ef_construction, ef_search, fingerprint, "
                               "model FROM {} WHERE name = %s").format(meta), (name,))
    row = cur.fetchone()
    if row is None:
        return None
    return dict(zip([d.name for d in cur.description], row))


def _condition_sql(cond: Condition):
    from psycopg import sql

    if cond.column:  # label: a text column (values were checked to be strings)
        col = sql.Identifier(cond.key)
        if cond.op == "in":
            return sql.SQL("{} = ANY(%s::text[])").format(col), [list(cond.value)]
        if cond.op in ("eq", "ne"):
            return sql.SQL("{} {} %s").format(col, sql.SQL(_SQL_OP[cond.op])), [cond.value]
        return sql.SQL('{} COLLATE "C" {} %s').format(col, sql.SQL(_SQL_OP[cond.op])), [cond.value]
    key = sql.Literal(cond.key)
    if cond.op in ("eq", "ne"):
        # Containment: equal by JSON value (1 = 1.0, true only equals true), and a GIN index can answer it.
        test = sql.SQL("attributes @> %s::jsonb")
        doc = json.dumps({cond.key: cond.value}, ensure_ascii=False)
        return (test if cond.op == "eq" else sql.SQL("NOT ({})").format(test)), [doc]
    if cond.op == "in":
        docs = [json.dumps({cond.key: v}, ensure_ascii=False) for v in cond.value]
        return sql.SQL("attributes @> ANY(%s::jsonb[])"), [docs]
    op = sql.SQL(_SQL_OP[cond.op])
    if isinstance(cond.value, str):  # strings by code point, whatever the database's collation
        return sql.SQL("(jsonb_typeof(attributes -> {k}) = 'string' AND (attributes ->> {k}) COLLATE \"C\" {op} %s)"
                       ).format(k=key, op=op), [cond.value]
    return sql.SQL("(jsonb_typeof(attributes -> {k}) = 'number' AND (attributes -> {k}) {op} %s::jsonb)").format(
        k=key, op=op), [json.dumps(cond.value)]


def where_sql(conditions: Sequence[Condition]):
    """A filter's SQL condition and its parameters (``TRUE`` and none for no filter).

    Returns:
        ``(sql.Composable, params)``: only fixed SQL, quoted keys and ``%s`` placeholders.
    """
    from psycopg import sql

    if not conditions:
        return sql.SQL("TRUE"), []
    parts, params = [], []
    for cond in conditions:
        part, values = _condition_sql(cond)
        parts.append(part)
        params += values
    return sql.SQL(" AND ").join(parts), params


def _text_field(value: str | None) -> bytes:
    if value is None:
        return b"\xff\xff\xff\xff"  # length -1: NULL
    data = value.encode("utf-8")
    return struct.pack(">i", len(data)) + data


def copy_payload(ids: np.ndarray, emb: np.ndarray, labels: Sequence[str], titles: Sequence[str],
                 images: Sequence[str | None], attributes: Sequence[str], *, halfvec: bool = True,
                 rows_per_chunk: int = 4096) -> Iterator[bytes]:
    """Rows for ``COPY … (id, vector, label, title, image, attributes) FROM STDIN WITH (FORMAT BINARY)``.

    The fixed-size part of every row (field count, id, vector) is packed by numpy at once; the
    text fields are appended row by row. Yields the header, chunks of rows and the trailer.

    Args:
        ids: ``[n]`` int64.
        emb: ``[n, D]`` float32 (sent as float16 when ``halfvec``).
        labels, titles: Text per row.
        images: Text or ``None`` per row.
        attributes: A JSON text per row (sent as jsonb).
        halfvec: The column's type is ``halfvec`` (else ``vector``).
        rows_per_chunk: Rows per yielded chunk.
    """
    n, d = emb.shape
    value = ">f2" if halfvec else ">f4"
    fixed = np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", ">i8"), ("vec_len", ">i4"), ("dim", ">i2"),
                      ("unused", ">i2"), ("vec", value, (d,))])
    yield _COPY_HEADER
    for s in range(0, n, rows_per_chunk):
        e = min(n, s + rows_per_chunk)
        rec = np.zeros(e - s, fixed)
        rec["fields"], rec["id_len"], rec["id"] = len(GALLERY_COLUMNS), 8, ids[s:e]
        rec["vec_len"], rec["dim"], rec["vec"] = 4 + d * fixed["vec"].base.itemsize, d, emb[s:e]
        raw, size = rec.tobytes(), fixed.itemsize
        parts = []
        for i in range(e - s):
            r = s + i
            doc = b"\x01" + attributes[r].encode("utf-8")  # jsonb's binary form: version 1, then the text
            parts += [raw[i * size:(i + 1) * size], _text_field(labels[r]), _text_field(titles[r]),
                      _text_field(images[r]), struct.pack(">i", len(doc)), doc]
        yield b"".join(parts)
    yield _COPY_TRAILER


# --------------------------------------------------------------------------- statements a gallery runs


def upsert_rows(conn, table: str, emb: np.ndarray, ids: np.ndarray, columns: tuple, *,
                halfvec: bool) -> tuple[int, int]:
    """Write rows in one transaction: binary COPY into a staging table, then ``INSERT … ON CONFLICT (id)``.

    A row whose id is there is updated (its ``added_at`` kept) only when something in it changed,
    so a retried batch writes nothing and duplicates nothing.

    Args:
        conn: An autocommit connection.
        table: The gallery's table.
        emb: ``[n, D]`` float32, normalised.
        ids: ``[n]`` distinct int64.
        columns: ``(labels, titles, images, attributes JSON texts)``.
        halfvec: The vector column is ``halfvec``.

    Returns:
        ``(inserted, updated)``; the rest were unchanged.
    """
    from psycopg import sql

    stage, ident = sql.Identifier(f"stage_{table}"), sql.Identifier(table)
    names = sql.SQL(", ").join(map(sql.Identifier, GALLERY_COLUMNS))
    rest = [sql.Identifier(c) for c in GALLERY_COLUMNS[1:]]
    changed = sql.SQL(" OR ").join(sql.SQL("g.{0} IS DISTINCT FROM EXCLUDED.{0}").format(c) for c in rest)
    updates = sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(c) for c in rest)
    with conn.transaction():
        conn.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                             ).format(stage, ident))
        with conn.cursor() as cur:
            with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT BINARY)").format(stage, names)) as copy:
                for chunk in copy_payload(ids, emb, *columns, halfvec=halfvec):
                    copy.write(chunk)
        rows = conn.execute(sql.SQL(
            "INSERT INTO {table} AS g ({names}) SELECT {names} FROM {stage} ON CONFLICT (id) DO UPDATE "
            "SET {updates} WHERE {changed} RETURNING (xmax = 0)").format(
            table=ident, names=names, stage=stage, updates=updates, changed=changed)).fetchall()
    inserted = sum(1 for (new,) in rows if new)
    return inserted, len(rows) - inserted


def build_hnsw(conn, table: str, info: Mapping[str, Any], *, rebuild: bool, maintenance_work_mem: str) -> bool:
    """Build the table's HNSW index with its recorded parameters (``False``: it was there already)."""
    from psycopg import sql

    conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (maintenance_work_mem,))
    try:
        if rebuild:
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(sql.Identifier(f"{table}_hnsw")))
        elif conn.execute("SELECT to_regclass(%s)", (f"{table}_hnsw",)).fetchone()[0] is not None:
            return False
        # Vacuum the freshly loaded rows first: otherwise autovacuum does it later, on the same CPUs as the
        # first live inserts and queries (measured: half the insert rate for a while after a 100k load).
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
        conn.execute(hnsw_index_sql(table, info["vector_type"], info["metric"], info))
    finally:
        conn.execute("RESET maintenance_work_mem")
    return True


def nearest(conn, table: str, op: str, vector: Any, k: int, conditions: Sequence[Condition], own: int | None, *,
            exact: bool) -> list[tuple]:
    """The ``k`` rows nearest to ``vector`` that pass the filter: ``(id, distance, label, title, image,
    attributes, added_at)``, nearest first.

    Args:
        conn: A connection with ``hnsw.ef_search`` / ``hnsw.iterative_scan`` set.
        table: The gallery's table.
        op: ``<#>`` (negative inner product) or ``<=>`` (cosine distance).
        vector: The query as a :class:`~cnclip_kd.retrieval.pgserver.VectorParam`.
        k: Rows wanted.
        conditions: The filter.
        own: An id to leave out, or ``None``.
        exact: Rank every row the filter keeps instead of walking the HNSW graph.
    """
    from psycopg import sql

    clause, params = where_sql(conditions)
    if own is not None:
        clause, params = sql.SQL("{} AND id <> %s").format(clause), [*params, own]
    fields = sql.SQL("id, vector {} %s AS distance, label, title, image, attributes, added_at").format(sql.SQL(op))
    if exact:
        # OFFSET 0 fences the subquery: the outer ORDER BY cannot use the HNSW index, so every row the
        # filter keeps is ranked (found by a bitmap scan when the label or GIN index covers the filter).
        query = sql.SQL("SELECT * FROM (SELECT {f} FROM {t} WHERE {w} OFFSET 0) s ORDER BY distance LIMIT %s")
    else:
        query = sql.SQL("SELECT {f} FROM {t} WHERE {w} ORDER BY distance LIMIT %s")
    rows = conn.execute(query.format(f=fields, t=sql.Identifier(table), w=clause), [vector, *params, k]).fetchall()
    # relaxed_order may hand back near-ties slightly out of order; callers want them sorted.
    return sorted(rows, key=lambda r: (r[1], r[0]))


def filter_share(conn, table: str, conditions: Sequence[Condition], sample_rows: int) -> tuple[float, float]:
    """``(rows in the table, share of them the filter keeps)``, from ~``sample_rows`` sampled rows.

    The row count is the planner's (``reltuples``; counted when the table was never analysed); the
    share comes from ``TABLESAMPLE SYSTEM`` (whole pages: about a millisecond). A share of ``0`` is
    returned when the sample holds no rows.
    """
    from psycopg import sql

    ident = sql.Identifier(table)
    n = conn.execute("SELECT reltuples FROM pg_class WHERE oid = to_regclass(%s)", (table,)).fetchone()[0]
    if n is None or n < 0:
        n = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0]
    if not n:
        return 0.0, 0.0
    clause, params = where_sql(conditions)
    pct = min(100.0, max(0.01, 100.0 * sample_rows / float(n)))
    kept, seen = conn.execute(sql.SQL("SELECT count(*) FILTER (WHERE {}), count(*) FROM {} TABLESAMPLE SYSTEM (%s)"
                                      ).format(clause, ident), [*params, pct]).fetchone()
    return float(n), (kept / seen if seen else 0.0)


def count_rows(conn, table: str, conditions: Sequence[Condition]) -> int:
    """Rows of the table that pass the filter."""
    from psycopg import sql

    clause, params = where_sql(conditions)
    return int(conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(sql.Identifier(table), clause),
                            params).fetchone()[0])


def fetch_rows(conn, table: str, ids: Sequence[int]) -> list[tuple]:
    """``(id, NULL, label, title, image, attributes, added_at)`` of the ids that are there."""
    from psycopg import sql

    return conn.execute(sql.SQL("SELECT id, NULL, label, title, image, attributes, added_at FROM {} "
                                "WHERE id = ANY(%s::bigint[])").format(sql.Identifier(table)), (list(ids),)).fetchall()


def delete_ids(conn, table: str, ids: Sequence[int]) -> int:
    """Delete rows by id (one statement, so one transaction); returns how many there were."""
    from psycopg import sql

    cur = conn.execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%s::bigint[])").format(sql.Identifier(table)),
                       (list(ids),))
    return int(cur.rowcount)


def create_attribute_index(conn, table: str, key: str) -> str:
    """A B-tree on ``attributes -> key`` (what a number range or equality filter on that key compares), then
    ``ANALYZE`` so the planner knows how many rows a value keeps. Returns the index name."""
    from psycopg import sql

    name = f"{table}_attr_{hashlib.sha1(key.encode('utf-8')).hexdigest()[:10]}"  # any key, ≤ 63 bytes
    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ((attributes -> {}))").format(
        sql.Identifier(name), sql.Identifier(table), sql.Literal(key)))
    conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
    return name


def drop_gallery(conn, name: str) -> None:
    """Drop a gallery's table and its metadata row, at once."""
    from psycopg import sql

    with conn.transaction():
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(gallery_table(name))))
        if conn.execute("SELECT to_regclass(%s)", (META_TABLE,)).fetchone()[0] is not None:
            conn.execute(sql.SQL("DELETE FROM {} WHERE name = %s").format(sql.Identifier(META_TABLE)), (name,))
