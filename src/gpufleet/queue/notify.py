"""Wake-ups for claimers waiting on an empty queue, so idle latency is low without busy polling.

- PostgreSQL: ``pg_notify`` inside the submitting transaction (delivered on commit, dropped on
  rollback) and a ``LISTEN`` connection per waiting thread.
- SQLite: the embedded server runs its workers as separate processes, so an in-process
  condition alone would not reach them. Each waiting thread binds a Unix datagram socket in a
  directory derived from the database file, and a committer sends one datagram to each. A
  waiter in the same process is reached the same way; a socket whose process died is removed.

Waiters always wait with a timeout too (the caller's safety-net poll), so a lost wake-up costs
latency, never a task. Payloads are model names; a waiter ignores other models' wake-ups.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import socket
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.engine import Connection, Engine

CHANNEL = "gpufleet_tasks"


class Notifier(Protocol):
    def in_transaction(self, conn: Connection, models: Iterable[str]) -> None:
        """Called inside the write transaction that made work available."""

    def after_commit(self, models: Iterable[str]) -> None:
        """Called once that transaction has committed."""

    def wait(self, model: str, timeout: float) -> bool:
        """Block until work for ``model`` may be there, or ``timeout`` seconds; True if woken."""

    def close(self) -> None: ...


def notifier_for(engine: Engine) -> Notifier:
    if engine.dialect.name == "postgresql":
        return PostgresNotifier(engine)
    database = engine.url.database
    assert database, "SQLite notifier needs a database file"
    return SocketNotifier(Path(database))


class PostgresNotifier:
    def __init__(self, engine: Engine) -> None:
        self._url = engine.url.set(drivername="postgresql")
        self._local = threading.local()
        self._conns: list[object] = []
        self._lock = threading.Lock()

    def in_transaction(self, conn: Connection, models: Iterable[str]) -> None:
        for model in set(models):
            conn.exec_driver_sql("SELECT pg_notify(%(ch)s, %(m)s)", {"ch": CHANNEL, "m": model})

    def after_commit(self, models: Iterable[str]) -> None:
        pass

    def _listener(self) -> tuple[object, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn, False
        import psycopg

        url = self._url
        params: dict[str, Any] = {k: v for k, v in url.query.items() if isinstance(v, str)}
        params |= {"host": url.host or "localhost", "port": url.port or 5432}
        params |= {"user": url.username, "password": url.password, "dbname": url.database}
        conn = psycopg.connect(autocommit=True, **params)
        conn.execute(f"LISTEN {CHANNEL}")
        self._local.conn = conn
        with self._lock:
            self._conns.append(conn)
        return conn, True

    def wait(self, model: str, timeout: float) -> bool:
        conn, new = self._listener()
        if new:
            # Work may have arrived before LISTEN took effect: let the caller look again.
            return True
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            for note in conn.notifies(timeout=left, stop_after=1):  # type: ignore[attr-defined]
                if note.payload == model:
                    return True
        return False

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(Exception):
                    conn.close()  # type: ignore[attr-defined]
            self._conns.clear()


def _socket_dir(database: Path) -> Path:
    # AF_UNIX paths are limited to 108 bytes, so the directory lives in the temp dir under a
    # short name derived from the database's absolute path.
    key = hashlib.sha256(str(database.expanduser().resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"gpufleet-wake-{key}"


class SocketNotifier:
    def __init__(self, database: Path) -> None:
        self.dir = _socket_dir(database)
        self._local = threading.local()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._sender: socket.socket | None = None

    def in_transaction(self, conn: Connection, models: Iterable[str]) -> None:
        pass

    def after_commit(self, models: Iterable[str]) -> None:
        payloads = [m.encode() for m in set(models)]
        if not payloads:
            return
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return  # nobody has ever waited
        sender = self._get_sender()
        for name in names:
            path = str(self.dir / name)
            for payload in payloads:
                try:
                    sender.sendto(payload, path)
                except (ConnectionRefusedError, FileNotFoundError):
                    # The waiter's process is gone without cleaning up.
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    break
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.ENOBUFS):
                        break  # its buffer is full of wake-ups already
                    raise

    def _get_sender(self) -> socket.socket:
        with self._lock:
            if self._sender is None:
                self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sender.setblocking(False)
            return self._sender

    def _receiver(self) -> tuple[socket.socket, bool]:
        sock: socket.socket | None = getattr(self._local, "sock", None)
        if sock is not None and getattr(self._local, "pid", None) == os.getpid():
            return sock, False
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = self.dir / f"{os.getpid()}-{threading.get_ident() % 10**8}-{os.urandom(3).hex()}"
        sock.bind(str(path))
        sock.setblocking(False)
        self._local.sock, self._local.pid, self._local.path = sock, os.getpid(), path
        with self._lock:
            self._socks.append(sock)
        return sock, True

    def wait(self, model: str, timeout: float) -> bool:
        sock, new = self._receiver()
        if new:
            return True  # see PostgresNotifier.wait
        want = model.encode()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                return False
            woken = False
            with contextlib.suppress(BlockingIOError):
                while True:  # drain everything pending: one look serves them all
                    if sock.recv(256) == want:
                        woken = True
            if woken:
                return True
        return False

    def close(self) -> None:
        with self._lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    name = sock.getsockname()
                    sock.close()
                    if isinstance(name, str) and name:
                        os.unlink(name)
            self._socks.clear()
            if self._sender is not None:
                self._sender.close()
                self._sender = None
