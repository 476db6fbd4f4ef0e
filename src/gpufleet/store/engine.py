"""Engine creation for SQLite (WAL, the embedded default) and PostgreSQL (psycopg 3).

SQLite: pysqlite's own transaction handling is switched off so that gpufleet says ``BEGIN
IMMEDIATE`` for writes; a deferred transaction that later writes can fail with SQLITE_BUSY at
upgrade time whatever the busy timeout, while an immediate one waits its turn up front.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Engine

from gpufleet.errors import InvalidInput, StorageFull, Unavailable

SQLITE_BUSY_TIMEOUT_MS = 30_000


def create_engine(url: str, *, pool_size: int = 5, echo: bool = False) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``)."""
    try:
        parsed = sa.engine.make_url(url)
    except exc.ArgumentError as e:
        raise InvalidInput(f"database URL is not valid: {e}", field="database_url") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed, echo=echo)
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        # No pre-ping: it costs a round trip per transaction. A connection broken by a server
        # restart fails once (Unavailable) and the pool then replaces all of them.
        # Sessions in UTC, so timestamps read back the same on PostgreSQL as on SQLite.
        return sa.create_engine(
            parsed,
            pool_size=pool_size,
            max_overflow=pool_size,
            echo=echo,
            connect_args={"options": "-c TimeZone=UTC"},
        )
    raise InvalidInput(
        f"unsupported database {backend!r}; use sqlite:///PATH or postgresql://...",
        field="database_url",
    )


def _sqlite_engine(url: sa.URL, *, echo: bool) -> Engine:
    if not url.database or url.database == ":memory:":
        raise InvalidInput(
            "SQLite needs a file (sqlite:///PATH): workers in other processes share it",
            field="database_url",
        )
    Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url,
        echo=echo,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cur = dbapi_conn.cursor()
        _set_wal(cur)
        # FULL: a task the API accepted survives power loss, not only a process crash.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        raw: sqlite3.Connection = conn.connection.dbapi_connection  # type: ignore[assignment]
        if mode == "IMMEDIATE" and not conn.get_execution_options().get("sqlite_turn"):
            _begin_immediate(raw)
        else:
            # A writer holding its turn (_WriterTurn) waits only for writers that are not
            # gpufleet's, which SQLite's busy handler is good enough for.
            raw.execute(f"BEGIN {mode}")

    return engine


def _set_wal(cur: sqlite3.Cursor) -> None:
    """``PRAGMA journal_mode=WAL``, again while it says the database is locked: the switch
    needs the file to itself, and SQLite answers "locked" at once rather than through the
    busy handler when several processes open a new database together (seen in the test of
    concurrent upgrades)."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _begin_immediate(raw: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, waiting for another process's write lock in short steps. SQLite's own
    busy handler sleeps 1, 2, 5, 10 ... up to 100 ms between tries, so a writer that arrives
    during another process's 3 ms commit waited about 8 ms: the API's submits and a worker's
    claims slowed each other to a crawl. Here a waiter tries again every 0.5-2 ms."""
    raw.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        pause = 0.0005
        while True:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e):
                    raise Unavailable(f"the task database failed to start a write: {e}") from e
                if time.monotonic() > deadline:
                    raise Unavailable(
                        f"the task database stayed locked by another process for "
                        f"{SQLITE_BUSY_TIMEOUT_MS / 1000:.0f} s"
                    ) from e
                time.sleep(pause)
                pause = min(pause * 1.5, 0.002)
    finally:
        raw.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


class _WriterTurn:
    """One writer at a time among this host's gpufleet processes on one SQLite file, handed on
    at once: a thread lock within the process, then ``flock`` on a file beside the database.

    SQLite makes a writer that finds the database locked poll (its busy handler sleeps up to
    100 ms; ``_begin_immediate`` polls every 0.5-2 ms), so with several API processes and a
    worker the write lock sat free between polls while everyone slept: the no-op model's
    ceiling on the H200 was about 2,000 tasks/s with the worker a third busy. A waiter blocked
    in ``flock`` is woken by the kernel the moment the holder lets go. A holder that dies
    releases it; BEGIN IMMEDIATE still guards against writers that are not gpufleet's."""

    def __init__(self, database: Path) -> None:
        self.path = database.parent / f".{database.name}.writer"
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = 0
        self._owner: int | None = None  # the thread holding the turn (it may nest)
        self._depth = 0

    def _lock_fd(self) -> int | None:
        if self._pid != os.getpid():  # after a fork: our own open file, not the parent's
            self._fd, self._pid = None, os.getpid()
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:  # a read-only directory: SQLite's own locking alone
                self._fd = None
        return self._fd

    def __enter__(self) -> bool:
        """Whether this process now holds the host-wide turn (not only the thread lock)."""
        me = threading.get_ident()
        if self._owner == me:  # already ours (write_turn around write_tx)
            self._depth += 1
            return self._fd is not None
        self._thread_lock.acquire()
        try:
            fd = self._lock_fd()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        self._owner, self._depth = me, 1
        return fd is not None

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth:
            return
        self._owner = None
        try:
            if self._fd is not None and self._pid == os.getpid():
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()


_write_locks: dict[str, _WriterTurn] = {}  # by database file: engines on one file share
_engine_locks: weakref.WeakKeyDictionary[Engine, _WriterTurn] = weakref.WeakKeyDictionary()
_write_locks_guard = threading.Lock()


def _sqlite_write_lock(engine: Engine) -> AbstractContextManager[bool | None]:
    """SQLite: one writer at a time, queued (``_WriterTurn``), so only the turn is waited for
    and SQLite's busy handler almost never runs."""
    if engine.dialect.name != "sqlite":
        return nullcontext()
    lock = _engine_locks.get(engine)  # resolved once per engine: this is every write's path
    if lock is None:
        path = Path(engine.url.database or "").expanduser().resolve()
        with _write_locks_guard:
            lock = _write_locks.get(str(path))
            if lock is None:
                lock = _write_locks[str(path)] = _WriterTurn(path)
            _engine_locks[engine] = lock
    return lock


def write_turn(engine: Engine) -> AbstractContextManager[bool | None]:
    """Hold the writer's turn across several steps (SQLite; nothing on PostgreSQL). A group
    commit takes the turn first and only then gathers what is waiting, so the longer it waited
    for the turn, the more its one commit carries (see ``queue.batcher``)."""
    return _sqlite_write_lock(engine)


@contextmanager
def write_tx(engine: Engine, *, durable: bool = True) -> Iterator[Connection]:
    """One write transaction: BEGIN IMMEDIATE on SQLite, READ COMMITTED on PostgreSQL.

    ``durable=False`` commits without waiting for the disk flush (PostgreSQL
    ``synchronous_commit = off``, SQLite ``synchronous = NORMAL``): still atomic and crash-safe
    for the database, but the last moments of such commits may be lost if the host or the
    database crashes. Only for writes whose loss is harmless (claims, heartbeats).
    """
    lock = _sqlite_write_lock(engine)
    with lock as turn, translate_db_errors(), engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        # Straight to the driver: through SQLAlchemy the PRAGMA would begin a transaction.
        raw = conn.connection.dbapi_connection if sqlite and not durable else None
        if raw is not None:
            raw.execute("PRAGMA synchronous=NORMAL")
        try:
            conn = conn.execution_options(sqlite_begin="IMMEDIATE", sqlite_turn=bool(turn))
            with conn.begin():
                if not durable and not sqlite:
                    conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
                yield conn
        finally:
            if raw is not None:
                raw.execute("PRAGMA synchronous=FULL")


def relaxed_engine(engine: Engine) -> Engine | None:
    """PostgreSQL: a small second pool for writes that are one statement and whose loss in a
    crash is harmless (claims, heartbeats). Each statement is its own transaction (autocommit:
    one round trip instead of BEGIN, SET, statement, COMMIT) and commits without waiting for
    the WAL flush. None on SQLite, where ``write_tx(durable=False)`` does the same job."""
    if engine.dialect.name != "postgresql":
        return None
    return sa.create_engine(
        engine.url,
        isolation_level="AUTOCOMMIT",
        connect_args={"options": "-c synchronous_commit=off -c TimeZone=UTC"},
        pool_size=2,
        max_overflow=8,
    )


@contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    """A connection whose every statement commits on its own: for single-statement writes."""
    with translate_db_errors(), engine.connect() as conn:
        yield conn.execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def read_tx(engine: Engine) -> Iterator[Connection]:
    with translate_db_errors(), engine.connect() as conn, conn.begin():
        yield conn


def _is_disk_full(e: exc.DBAPIError) -> bool:
    orig = e.orig
    if getattr(orig, "sqlstate", None) == "53100":  # PostgreSQL disk_full
        return True
    if isinstance(orig, sqlite3.Error):
        return getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
            "disk is full" in str(orig)
        )
    return False


@contextmanager
def translate_db_errors() -> Iterator[None]:
    """Turn "disk full" and "database unreachable" into gpufleet errors; re-raise the rest."""
    try:
        yield
    except exc.DBAPIError as e:
        if _is_disk_full(e):
            raise StorageFull(
                "the task database is out of disk space; free space or grow the volume"
            ) from e
        if isinstance(e, exc.OperationalError | exc.InterfaceError) and (
            e.connection_invalidated or _is_unreachable(e)
        ):
            raise Unavailable(f"the task database is unavailable: {_first_line(e.orig)}") from e
        raise


def _is_unreachable(e: exc.DBAPIError) -> bool:
    text = str(e.orig).lower()
    return any(
        s in text
        for s in ("connection refused", "could not connect", "database is locked", "timeout")
    )


def _first_line(obj: object) -> str:
    return str(obj).strip().splitlines()[0] if str(obj).strip() else type(obj).__name__
