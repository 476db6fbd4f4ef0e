"""``gpufleet watch`` against a real ``gpufleet serve`` on loopback (API keys on, a worker
process serving the demo model): one frame (``--once``, ``--json``) after tasks ran, and the
live view ended by Ctrl-C (SIGINT): exit 0, no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gpufleet.cli.watch import Read, frame
from gpufleet.wire import QueueView, WorkerCounts
from tests.integration.serve_helpers import Serve, serving, wait_done

pytestmark = pytest.mark.slow
SEVEN = {"prompt": "a handwritten 7", "seed": 1, "steps": 8}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with serving(tmp_path_factory.mktemp("watch")) as s:
        yield s


def env_for(served: Serve, key: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    return env | {"GPUFLEET_URL": served.url, "GPUFLEET_API_KEY": key or served.key,
                  "COLUMNS": "80", "NO_COLOR": "1"}  # fmt: skip


def watch(served: Serve, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpufleet", "watch", *args],
                          env=env_for(served, key), capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip


def finished(served: Serve) -> int:
    with served.client() as c:
        return int(c.get("/v1/queue").json()["finished"].get("digits", 0))


def test_the_finished_counter_adds_up_the_worker_processes(served: Serve) -> None:
    """What watch's rate is made of: the serve's worker process counts each task it ends."""
    before = finished(served)
    with served.client() as c:
        ids = [c.post("/v1/tasks", json={"model": "digits", "input": SEVEN}).json()["id"]
               for _ in range(3)]  # fmt: skip
        wait_done(c, ids)
    deadline = time.monotonic() + 30  # counted right after the result is committed
    while finished(served) != before + 3:
        assert time.monotonic() < deadline, (before, finished(served))
        time.sleep(0.1)


def test_the_rate_is_the_change_between_two_reads() -> None:
    def read(at: float, done: int) -> Read:
        view = QueueView(depth=[], workers={"digits": WorkerCounts(ready=1, total=2)},
                         finished={"digits": done})  # fmt: skip
        return Read(view, at, datetime.now(UTC))

    f = frame("http://x", read(12.0, 130), read(10.0, 100))
    assert f.interval_s == 2.0
    assert f.models["digits"].finished_per_s == 15.0 and f.models["digits"].workers == (1, 2)
    assert frame("http://x", read(12.0, 5), read(10.0, 100)).models["digits"].finished_per_s == 0
    assert frame("http://x", read(12.0, 5), None).models["digits"].finished_per_s is None


def test_json_frame(served: Serve) -> None:
    proc = watch(served, "--json", "--interval", "0.2")
    assert proc.returncode == 0, proc.stderr
    frame = json.loads(proc.stdout)
    assert frame["url"] == served.url and frame["interval_s"] > 0
    digits = frame["models"]["digits"]
    assert digits["workers"] == {"ready": 1, "total": 1}
    assert isinstance(digits["finished_per_s"], float) and digits["finished_per_s"] >= 0
    for lane in digits["lanes"].values():  # live tasks only: often none here
        assert set(lane) == {"queued", "running", "oldest_queued_s"}


def test_once_prints_one_frame_that_fits_80_columns(served: Serve) -> None:
    proc = watch(served, "--once", "--interval", "0.2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.rstrip("\n").splitlines()
    assert lines[0].startswith(served.url) and "queued" in lines[0] and "done/s" in lines[0]
    header = lines[1].split()
    assert header == ["model", "lane", "queued", "running", "oldest", "wait", "workers", "done/s"]
    assert any(line.split()[:1] == ["digits"] and "1/1" in line for line in lines[2:])
    assert max(len(line) for line in lines) <= 80


def test_a_wrong_key_is_one_line(served: Serve) -> None:
    proc = watch(served, "--once", key="gfk_000000000000_" + "x" * 43)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("unauthorized: ") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_ctrl_c_ends_the_live_view_cleanly(served: Serve) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "gpufleet", "watch", "--interval", "0.2"],
                            env=env_for(served), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stderr is not None
        started = proc.stderr.readline()  # the view is up once it says so
        assert started.startswith(f"watching {served.url} every 0.2 s; Ctrl-C ends"), started
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err + out and "KeyboardInterrupt" not in err + out
    assert "digits" in out  # the last frame stays on the screen


def test_no_server_is_one_line(tmp_path: Path) -> None:
    from tests.integration.serve_helpers import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, "-m", "gpufleet", "watch", "--url", url],
                          env=env, capture_output=True, text=True, timeout=60,
                          check=False)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.startswith("unavailable: ")
    assert url in proc.stderr and "Traceback" not in proc.stderr
