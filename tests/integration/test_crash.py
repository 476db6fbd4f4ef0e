"""A worker killed with SIGKILL mid-task loses nothing: its tasks finish elsewhere, once each."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpufleet.queue import LeaseReaper, TaskQueue, TaskSpec, TaskStatus
from gpufleet.store import LocalBlobStore, create_engine

ROOT = Path(__file__).resolve().parents[2]


def _worker(url: str, blobs: Path, name: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.claimer", url, str(blobs), name, *extra],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_sigkill_mid_task_loses_nothing(db_url: str, tmp_path: Path) -> None:
    engine = create_engine(db_url)
    from gpufleet.store import upgrade

    upgrade(engine)
    blobs = tmp_path / "blobs"
    queue = TaskQueue(engine, LocalBlobStore(blobs), lease_s=2.0)
    n = 60
    ids = [s.task.id for s in queue.submit_many([TaskSpec("m", "1", i) for i in range(n)])]

    victim = _worker(db_url, blobs, "victim", "--hang")
    assert victim.stdout is not None
    line = victim.stdout.readline().split()
    assert line[0] == "claimed"
    lost_ids = line[1:]
    victim.kill()  # SIGKILL: no cleanup, no release, heartbeats stop
    victim.wait()
    assert all(queue.get(t).status == TaskStatus.RUNNING for t in lost_ids)

    reaper = LeaseReaper(queue, interval_s=0.2).start()
    survivors = [_worker(db_url, blobs, f"w{i}", "--idle-exit-s", "4") for i in range(2)]
    done: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if queue.stats().count() == 0:
                break
            time.sleep(0.2)
    finally:
        reaper.stop()
        for p in survivors:
            out, _ = p.communicate(timeout=30)
            done += [ln.split()[1] for ln in out.splitlines() if ln.startswith("done")]

    # Every task succeeded, and each was completed exactly once across all workers.
    assert sorted(done) == sorted(ids)
    for tid in ids:
        task = queue.get(tid)
        assert task.status == TaskStatus.SUCCEEDED
        assert task.result["by"] in ("w0", "w1")
    for tid in lost_ids:
        assert queue.get(tid).attempts == 2  # the killed attempt counted, then retried
    assert reaper.recovered >= len(lost_ids)
    queue.close()
    engine.dispose()
