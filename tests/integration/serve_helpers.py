"""Run a real ``gpufleet serve`` (API + supervisor + worker processes) on loopback for tests."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from gpufleet.gpu.ledger import process_children

KEY_RE = re.compile(r"admin key\s+(gfk_[A-Za-z0-9_\-]+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (the worker processes of a serve)."""
    return process_children().get(pid, [])


def gone(pid: int) -> bool:
    """No such process, or only its zombie (which nobody may reap in a container)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


class Serve:
    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "serve.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "GPUFLEET_DATA_DIR": str(data_dir), **(env or {})}
        self.env.pop("GPUFLEET_DATABASE_URL", None)
        self.cmd = [sys.executable, "-m", "gpufleet", "serve", "--port", str(self.port), *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.key = ""

    def start(
        self, timeout: float = 90, ready_path: str = "/healthz", *, own_group: bool = False
    ) -> Serve:
        """``own_group``: in a process group of its own, as a terminal's foreground job is,
        so a test can send it (and its workers) a Ctrl-C."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                process_group=0 if own_group else None,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited {self.proc.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}{ready_path}", timeout=2).status_code == 200:
                    # The banner (with a first start's admin key) is out before serving
                    # starts: read it after readiness, not before the look.
                    if not self.key and (m := KEY_RE.search(self.output())):
                        self.key = m.group(1)
                    return self
            time.sleep(0.2)
        raise TimeoutError(f"serve not ready in {timeout}s:\n{self.output()}")

    def wait_workers_ready(self, model: str, count: int, timeout: float = 90) -> Serve:
        """Until ``count`` workers of ``model`` are ready: ``/healthz`` is 200 with one, and on
        a loaded machine the others may still be loading the model."""
        want = f"{count}/{count} ready"
        deadline = time.monotonic() + timeout
        checks: dict[str, str] = {}
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                checks = httpx.get(f"{self.url}/healthz", timeout=2).json()["checks"]
                if checks.get(f"workers:{model}", "").startswith(want):
                    return self
            time.sleep(0.2)
        raise TimeoutError(f"{model}: not {want} in {timeout}s: {checks}\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key or self.key}"},
            timeout=60,
        )

    def workers(self) -> list[int]:
        assert self.proc is not None
        return children(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise

    def __enter__(self) -> Serve:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_done(client: httpx.Client, ids: list[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    views: dict[str, Any] = {}
    while time.monotonic() < deadline:
        views = {i: client.get(f"/v1/tasks/{i}").json() for i in ids}
        if all(v["status"] in ("succeeded", "failed", "cancelled") for v in views.values()):
            return views
        time.sleep(0.2)
    raise AssertionError(f"tasks not done: {[v['status'] for v in views.values()]}")


@contextlib.contextmanager
def serving(data_dir: Path, *args: str, **kw: Any) -> Iterator[Serve]:
    s = Serve(data_dir, *args, **kw)
    try:
        yield s.start()
    finally:
        s.stop()
