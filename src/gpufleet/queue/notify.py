"""Wake-ups for claimers waiting on an empty queue, so idle latency is low without busy polling.

- PostgreSQL: ``pg_notify`` inside the submitting transaction (delivered on commit, dropped on
  rollback) and one ``LISTEN`` connection per process, read by a background thread.
- SQLite: the embedded server runs its workers as separate processes, so an in-process
  condition alone would not reach them. Each waiting thread binds a Unix datagram socket in a
  directory derived from the database file, and a committer sends one datagram to each. A
  waiter in the same process is reached the same way; a socket whose process died is removed.

Waiters always wait with a timeout too (the caller's safety-net poll), so a lost wake-up costs
latency, never a task. Payloads are model names (work to claim), or ``FINISHED`` (some task
ended) followed by ``:`` and the ids that ended (``finished_topics``), so a process waiting on
results reads only the tasks it waits for (``wait_finished``); a waiter ignores other topics.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import select
import socket
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.engine import Connection, Engine

CHANNEL = "gpufleet_tasks"
# The topic of "some task ended" wake-ups, for waiters on results (the API's ``wait``, events).
# No model can have this name: model names start with a letter or digit.
FINISHED = "*finished"
log = logging.getLogger(__name__)
# A "finished" payload stays under PostgreSQL's NOTIFY limit of 8,000 bytes.
PAYLOAD_BYTES = 7000
# A result this small rides on the wake-up itself, so a waiter needs no database read to answer.
OUTCOME_BYTES = 1024


@dataclass
class Ended:
    """What ``wait_finished`` hands over: the ids of tasks that ended; for those whose result
    was small, the outcome itself (status and result, as committed); and
    ``unknown`` when others may have ended unsaid (a bare wake-up, a reconnected listener)."""

    ids: set[str] = field(default_factory=set)
    outcomes: dict[str, tuple[str, Any]] = field(default_factory=dict)
    unknown: bool = False


def finished_topics(
    task_ids: Iterable[str], outcomes: Mapping[str, tuple[str, bytes | None]] | None = None
) -> list[str]:
    """The wake-ups that say these tasks ended: ``*finished:ID,ID,...``, then, after a
    newline, a JSON object of the outcomes given (``{id: [status, result]}``) for results of
    up to ``OUTCOME_BYTES``, in payloads of at most ``PAYLOAD_BYTES``."""
    outcomes = outcomes or {}
    payloads: list[str] = []
    ids: list[str] = []
    parts: list[str] = []
    size = 0
    for tid in sorted(set(task_ids)):
        part = ""
        status, doc = outcomes.get(tid, ("", None))
        if status and (doc is None or len(doc) <= OUTCOME_BYTES):
            value = "null" if doc is None else doc.decode()
            part = f"{json.dumps(tid)}:[{json.dumps(status)},{value}]"
        if ids and size + len(tid) + len(part) + 2 > PAYLOAD_BYTES:
            payloads.append(_payload(ids, parts))
            ids, parts, size = [], [], 0
        ids.append(tid)
        if part:
            parts.append(part)
        size += len(tid) + len(part) + 2
    if ids:
        payloads.append(_payload(ids, parts))
    return payloads


def _payload(ids: list[str], parts: list[str]) -> str:
    text = f"{FINISHED}:{','.join(ids)}"
    return text + "\n{" + ",".join(parts) + "}" if parts else text


class FinishedInbox:
    """The tasks that ended, gathered as wake-ups arrive, for ``wait_finished``. A bare
    ``FINISHED`` (a sender that did not say which, or a listener that reconnected and may have
    missed some) sets ``unknown``: the taker must look at every task it waits on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ended = Ended()

    def add(self, payload: str) -> None:
        head, _, tail = payload.partition("\n")
        topic, _, ids = head.partition(":")
        if topic != FINISHED:
            return
        outcomes: dict[str, tuple[str, Any]] = {}
        if tail:
            try:
                for tid, (status, result) in json.loads(tail).items():
                    outcomes[str(tid)] = (str(status), result)
            except (ValueError, TypeError):  # not ours: the ids still count
                outcomes = {}
        with self._cond:
            if ids:
                self._ended.ids.update(ids.split(","))
                self._ended.outcomes.update(outcomes)
            else:
                self._ended.unknown = True
            self._cond.notify_all()

    def mark_unknown(self) -> None:
        with self._cond:
            self._ended.unknown = True
            self._cond.notify_all()

    def take(self, timeout: float) -> Ended:
        """What ended since the last take; waits up to ``timeout`` for the first."""
        with self._cond:
            self._cond.wait_for(lambda: self._ended.ids or self._ended.unknown, timeout)
            ended, self._ended = self._ended, Ended()
        return ended


class _FinishedWaits(ABC):
    """``wait_finished`` and ``interrupt_finished`` over a ``FinishedInbox`` that the notifier's
    own listener fills; ``_listen_finished`` starts that listener, once, on the first call."""

    _inbox: FinishedInbox | None
    _inbox_lock: threading.Lock

    @abstractmethod
    def _listen_finished(self) -> None:
        """Start the thread that fills ``_inbox``; return once it listens."""

    def wait_finished(self, timeout: float) -> Ended:
        if self._inbox is None:
            with self._inbox_lock:
                first = self._inbox is None
                if first:
                    self._inbox = FinishedInbox()
            if first:
                self._listen_finished()
                return Ended(unknown=True)
        assert self._inbox is not None
        return self._inbox.take(timeout)

    def interrupt_finished(self) -> None:
        if self._inbox is not None:
            self._inbox.mark_unknown()


class Notifier(Protocol):
    def in_transaction(self, conn: Connection, models: Iterable[str]) -> None:
        """Called inside the write transaction that made work available."""

    def after_commit(self, models: Iterable[str]) -> None:
        """Called once that transaction has committed."""

    def wait(self, model: str, timeout: float) -> bool:
        """Block until work for ``model`` may be there, or ``timeout`` seconds; True if woken."""

    def wait_finished(self, timeout: float) -> Ended:
        """What ended since the last call (waiting up to ``timeout`` for something). The
        first call subscribes, and says ``unknown``."""

    def interrupt_finished(self) -> None:
        """Make a ``wait_finished`` in progress return now (its waiter is stopping)."""

    def close(self) -> None: ...


def notifier_for(engine: Engine) -> Notifier:
    if engine.dialect.name == "postgresql":
        return PostgresNotifier(engine)
    database = engine.url.database
    assert database, "SQLite notifier needs a database file"
    return SocketNotifier(Path(database))


class PostgresNotifier(_FinishedWaits):
    """One LISTEN connection per process, read by a background thread that counts wake-ups per
    model; waiting threads block on a condition. A single reader matters: a LISTEN connection
    nobody reads stops PostgreSQL from trimming its notification queue, and a full queue makes
    every NOTIFY, and so every submit, fail."""

    def __init__(self, engine: Engine) -> None:
        self._url = engine.url.set(drivername="postgresql")
        self._cond = threading.Condition()
        self._counts: dict[str, int] = {}
        self._epoch = 0  # bumped when the listener (re)connects: wake-ups may have been missed
        self._local = threading.local()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._conn: Any = None
        self._inbox = None
        self._inbox_lock = threading.Lock()

    def in_transaction(self, conn: Connection, models: Iterable[str]) -> None:
        for model in sorted(set(models)):
            conn.exec_driver_sql("SELECT pg_notify(%(ch)s, %(m)s)", {"ch": CHANNEL, "m": model})

    def after_commit(self, models: Iterable[str]) -> None:
        pass

    def _connect(self) -> Any:
        import psycopg

        url = self._url
        params: dict[str, Any] = {k: v for k, v in url.query.items() if isinstance(v, str)}
        params |= {"host": url.host or "localhost", "port": url.port or 5432}
        params |= {"user": url.username, "password": url.password, "dbname": url.database}
        conn = psycopg.connect(autocommit=True, connect_timeout=10, **params)
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    def _listen(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._conn = self._connect()
                with self._cond:
                    self._epoch += 1
                    self._cond.notify_all()
                if self._inbox is not None:  # wake-ups may have been missed meanwhile
                    self._inbox.mark_unknown()
                self._listening.set()
                backoff = 0.5
                while not self._stop.is_set():
                    for note in self._conn.notifies(timeout=1.0):
                        if note.payload.startswith(FINISHED):
                            if self._inbox is not None:
                                self._inbox.add(note.payload)
                            continue
                        with self._cond:
                            self._counts[note.payload] = self._counts.get(note.payload, 0) + 1
                            self._cond.notify_all()
            except Exception as e:  # the database went away: waiters fall back to their timeout
                if self._stop.is_set():
                    break
                log.warning("wake-up listener lost its connection (%s); reconnecting", e)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                with contextlib.suppress(Exception):
                    self._conn.close()

    def _seen(self) -> dict[str, tuple[int, int]]:
        seen: dict[str, tuple[int, int]] | None = getattr(self._local, "seen", None)
        if seen is None:
            seen = self._local.seen = {}
        return seen

    def _start(self) -> None:
        if self._thread is None:
            with self._cond:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._listen, name="gpufleet-wakeups", daemon=True
                    )
                    self._thread.start()
        # Once per process: until LISTEN is in place a submit's wake-up would be lost.
        self._listening.wait(5.0)

    def _listen_finished(self) -> None:
        self._start()

    def wait(self, model: str, timeout: float) -> bool:
        self._start()
        seen = self._seen()
        with self._cond:
            state = (self._epoch, self._counts.get(model, 0))
            # Anything since this thread last looked (or its first look) counts, as a buffered
            # notification would: work may have arrived between its empty claim and this wait.
            if seen.get(model) != state:
                seen[model] = state
                return True
            self._cond.wait_for(lambda: (self._epoch, self._counts.get(model, 0)) != state, timeout)
            now = (self._epoch, self._counts.get(model, 0))
            seen[model] = now
            return now != state

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()
        if self._thread is not None:
            self._thread.join(3)


def _socket_dir(database: Path) -> Path:
    """Beside the database, so it has the database's owner and permissions. AF_UNIX paths are
    limited to 108 bytes: for a deeply nested database, a per-user directory in the temp dir."""
    database = database.expanduser().resolve()
    beside = database.parent / f".{database.name}.wake"
    if len(str(beside)) <= 70:  # room for "/<role>-<pid>-<thread>-<random>"
        return beside
    key = hashlib.sha256(str(database).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"gpufleet-{os.getuid()}-wake-{key}"


FULL_WAIT_S = 0.01  # how long a finished wake-up waits for room in a full receiver


def _send_patiently(sender: socket.socket, payload: bytes, path: str) -> None:
    """A finished wake-up, waiting up to ``FULL_WAIT_S`` while its receiver's queue is full
    (``net.unix.max_dgram_qlen``, 10 datagrams by default): unlike a work wake-up it says
    something no other datagram says (which tasks ended), and dropped, its waiters would hear
    only at the watcher's safety look, half a second later. The receiver is a thread that does
    nothing but drain (``_drain_finished``), so room comes within milliseconds."""
    deadline = time.monotonic() + FULL_WAIT_S
    while True:
        try:
            sender.sendto(payload, path)
            return
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ENOBUFS) or time.monotonic() > deadline:
                raise
            time.sleep(0.0005)


class SocketNotifier(_FinishedWaits):
    def __init__(self, database: Path) -> None:
        self.dir = _socket_dir(database)
        self._local = threading.local()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._sender: socket.socket | None = None
        self._inbox = None
        self._inbox_lock = threading.Lock()
        self._closed = threading.Event()

    def in_transaction(self, conn: Connection, models: Iterable[str]) -> None:
        pass

    def after_commit(self, models: Iterable[str]) -> None:
        # The work is committed by now: a wake-up that cannot be sent costs latency (waiters
        # poll), so it must never turn an accepted submit into an error.
        try:
            self._send([m.encode() for m in set(models)])
        except OSError as e:
            log.warning("could not send wake-ups through %s: %s", self.dir, e)

    def _send(self, payloads: list[bytes]) -> None:
        if not payloads:
            return
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return  # nobody has ever waited
        sender = self._get_sender()
        finished = FINISHED.encode()
        for name in names:
            path = str(self.dir / name)
            # A socket says what it is for: "w-" waits for work, "f-" for tasks that ended
            # (other names, of an older gpufleet, get both). A submit's wake-up must not wake
            # the API's own finished-inbox thread, nor every result a worker's wait socket.
            role = name[:2]
            for payload in payloads:
                if (role == "w-" and payload.startswith(finished)) or (
                    role == "f-" and not payload.startswith(finished)
                ):
                    continue
                try:
                    if payload.startswith(finished):
                        _send_patiently(sender, payload, path)
                    else:
                        sender.sendto(payload, path)
                except (ConnectionRefusedError, FileNotFoundError):
                    # The waiter's process is gone without cleaning up.
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    break
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.ENOBUFS):
                        break  # work wake-ups: one already queued says as much
                    raise

    def _get_sender(self) -> socket.socket:
        with self._lock:
            if self._sender is None:
                self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sender.setblocking(False)
            return self._sender

    def _receiver(self, role: str) -> tuple[socket.socket, bool]:
        sock: socket.socket | None = getattr(self._local, "sock", None)
        if sock is not None and getattr(self._local, "pid", None) == os.getpid():
            return sock, False
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.dir.stat().st_uid != os.getuid():
            raise PermissionError(f"{self.dir} belongs to another user; refusing to use it")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        tid = threading.get_ident() % 10**8
        path = self.dir / f"{role}-{os.getpid()}-{tid}-{os.urandom(3).hex()}"
        sock.bind(str(path))
        sock.setblocking(False)
        self._local.sock, self._local.pid, self._local.path = sock, os.getpid(), path
        with self._lock:
            self._socks.append(sock)
        return sock, True

    def _listen_finished(self) -> None:
        """Finished ids are gathered by a thread of their own that does nothing but drain its
        socket: a Unix datagram socket holds only ``net.unix.max_dgram_qlen`` datagrams (10 by
        default) and senders drop what does not fit, so a waiter that also reads the database
        between waits would lose wake-ups under load."""
        ready = threading.Event()
        threading.Thread(
            target=self._drain_finished, args=(ready,), name="finished-inbox", daemon=True
        ).start()
        ready.wait(5.0)

    def _drain_finished(self, ready: threading.Event) -> None:
        assert self._inbox is not None
        try:
            sock, _ = self._receiver("f")
        except OSError as e:
            log.warning("cannot receive wake-ups in %s (%s); polling instead", self.dir, e)
            ready.set()
            return
        ready.set()
        while not self._closed.is_set():
            try:
                readable, _, _ = select.select([sock], [], [], 1.0)
                if not readable:
                    continue
                with contextlib.suppress(BlockingIOError):
                    while True:
                        payload = sock.recv(65536)
                        if payload.startswith(FINISHED.encode()):
                            self._inbox.add(payload.decode(errors="replace"))
            except (OSError, ValueError):  # closed under us
                if self._closed.is_set():
                    return
                self._inbox.mark_unknown()
                time.sleep(0.1)

    def wait(self, model: str, timeout: float) -> bool:
        try:
            sock, new = self._receiver("w")
        except OSError as e:  # no wake-ups possible here: degrade to polling, loudly
            log.warning("cannot receive wake-ups in %s (%s); polling instead", self.dir, e)
            time.sleep(timeout)
            return False
        if new:
            return True  # work may have arrived before this thread subscribed: look again
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
        self._closed.set()
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
