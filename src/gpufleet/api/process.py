"""API processes: ``gpufleet serve --api-workers N`` runs the HTTP API in N processes.

One Python process serves HTTP on one core. With N > 1, ``serve`` binds the listening socket
itself and starts N of these, each accepting on that one socket (as gunicorn's workers do), each
with its own ``TaskService``: its own group commit, and a watcher woken only for the tasks its
own clients wait on (finished wake-ups carry ids). They share nothing but the database, so this
is the same code an API replica on another host runs.

``python -m gpufleet.api.process --fd FD --config FILE``: settings come from the environment
(``GPUFLEET_*``, as ``serve`` passes them down); FILE is the JSON ``serve`` writes (the models'
descriptions, auth, limits, and the file where it publishes its workers' readiness). SIGTERM or
SIGINT stops serving: open requests finish, event streams get ``timeout_graceful_shutdown``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpufleet.api.app import DeployedModel
from gpufleet.models.runtime import Batching, ModelInfo

log = logging.getLogger(__name__)

WORKERS_FILE = "workers.json"
STATUS_TTL_S = 0.5


def default_api_workers(cpus: int | None = None) -> int:
    """One API process per four cores, up to 8: the rest are for workers, the database and
    the load itself. One on a machine of fewer than 8 cores, where a second process only
    contends with the workers for the same cores."""
    n = (os.cpu_count() or 1) if cpus is None else cpus
    return max(1, min(8, n // 4)) if n >= 8 else 1


def write_config(
    path: Path,
    *,
    models: list[DeployedModel],
    insecure_no_auth: bool,
    max_body_bytes: int,
    status_file: Path,
    log_level: str,
) -> None:
    doc = {
        "models": [{"info": asdict(m.info), "batching": asdict(m.batching)} for m in models],
        "insecure_no_auth": insecure_no_auth,
        "max_body_bytes": max_body_bytes,
        "status_file": str(status_file),
        "log_level": log_level,
    }
    path.write_text(json.dumps(doc))


def write_status(path: Path, counts: dict[str, tuple[int, int, int]]) -> None:
    """Publish (ready, total, refused) workers per model for the API processes, atomically."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(counts))
    os.replace(tmp, path)


class StatusReader:
    """The workers' readiness as ``serve`` last published it, re-read at most every
    ``STATUS_TTL_S``. Missing or unreadable: no worker is ready."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._at = 0.0
        self._counts: dict[str, list[int]] = {}

    def _load(self) -> dict[str, list[int]]:
        now = time.monotonic()
        if now - self._at >= STATUS_TTL_S:
            try:
                self._counts = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._counts = {}
            self._at = now
        return self._counts

    def workers(self, model: str) -> tuple[int, int]:
        ready, total, _ = self._load().get(model, [0, 0, 0])
        return ready, total

    def refused(self, model: str) -> int:
        return self._load().get(model, [0, 0, 0])[2]


def spawn(
    n: int, sock: socket.socket, config: Path, env: dict[str, str]
) -> list[subprocess.Popen[bytes]]:
    """Start ``n`` API processes accepting on ``sock``."""
    fd = sock.fileno()
    cmd = [sys.executable, "-m", "gpufleet.api.process", "--fd", str(fd), "--config", str(config)]
    return [subprocess.Popen(cmd, env=env, pass_fds=(fd,)) for _ in range(n)]


# As the supervisor restarts workers: 1 s doubling to 60 s, back to 1 s after a healthy minute.
BACKOFF_MIN_S, BACKOFF_MAX_S, HEALTHY_AFTER_S = 1.0, 60.0, 60.0


@dataclass
class _Slot:
    proc: subprocess.Popen[bytes] | None
    started_at: float
    backoff_s: float = BACKOFF_MIN_S
    next_start: float = 0.0


class ApiProcesses:
    """``n`` API processes kept running: one that exits is started again after a backoff, so
    one that dies at once (a broken config, a database it cannot open) does not spin a core
    and flood the log. ``check(now)`` is called by ``serve``'s loop; ``start`` makes one
    process (``spawn`` in ``serve``)."""

    def __init__(self, n: int, start: Callable[[], subprocess.Popen[bytes]], now: float) -> None:
        self._start = start
        self.slots = [_Slot(start(), now) for _ in range(n)]

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        return [s.proc for s in self.slots if s.proc is not None]

    def check(self, now: float) -> None:
        for slot in self.slots:
            if slot.proc is None:
                if now >= slot.next_start:
                    slot.proc, slot.started_at = self._start(), now
                continue
            code = slot.proc.poll()
            if code is None:
                if now - slot.started_at >= HEALTHY_AFTER_S:
                    slot.backoff_s = BACKOFF_MIN_S
                continue
            log.warning(
                "API process %d exited with %s; starting another in %.0fs",
                slot.proc.pid, code, slot.backoff_s,
            )  # fmt: skip
            slot.proc, slot.next_start = None, now + slot.backoff_s
            slot.backoff_s = min(slot.backoff_s * 2, BACKOFF_MAX_S)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to each (open requests finish), SIGKILL to any still there after
        ``timeout``."""
        procs = self.procs
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def serve_on(fd: int, config_path: Path) -> None:
    import uvicorn

    from gpufleet.api.app import ApiContext, create_app
    from gpufleet.api.keys import KeyStore
    from gpufleet.queue import TaskQueue
    from gpufleet.settings import Settings

    doc: dict[str, Any] = json.loads(config_path.read_text())
    logging.basicConfig(
        level=doc["log_level"].upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings()
    queue = TaskQueue.from_settings(settings)
    models = [
        DeployedModel(ModelInfo(**m["info"]), Batching(**m["batching"])) for m in doc["models"]
    ]
    status = StatusReader(Path(doc["status_file"]))
    workers: Callable[[str], tuple[int, int]] = status.workers
    app = create_app(
        ApiContext(
            queue=queue,
            models=models,
            keys=None if doc["insecure_no_auth"] else KeyStore(queue.engine),
            insecure_no_auth=doc["insecure_no_auth"],
            max_body_bytes=doc["max_body_bytes"],
            workers=workers,
            refused=status.refused,
        )
    )
    sock = socket.socket(fileno=fd)
    config = uvicorn.Config(
        app, log_level=doc["log_level"].lower(), access_log=False, timeout_graceful_shutdown=5
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        queue.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="gpufleet.api.process")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--config", type=Path, required=True)
    args = ap.parse_args(argv)
    serve_on(args.fd, args.config)


if __name__ == "__main__":
    main()
