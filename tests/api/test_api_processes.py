"""``ApiProcesses``: serve's API processes kept running, an exited one started again after a
backoff that doubles while it keeps dying and resets after a healthy minute. Real child
processes; the clock is passed in, so nothing here depends on how fast the machine is."""

from __future__ import annotations

import subprocess
import sys

from gpufleet.api.process import BACKOFF_MAX_S, BACKOFF_MIN_S, HEALTHY_AFTER_S, ApiProcesses


def _dies() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])


def _lives() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _exit_all(procs: ApiProcesses) -> None:
    for p in procs.procs:
        p.wait(30)


def test_a_process_that_keeps_dying_is_restarted_with_a_doubling_backoff() -> None:
    started: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        started.append(_dies())
        return started[-1]

    procs = ApiProcesses(1, start, now=0.0)
    _exit_all(procs)
    t = 0.0
    waits = []
    for _ in range(8):
        procs.check(t)  # notices the exit: no new process yet
        assert procs.procs == [] and len(started) == len(waits) + 1
        wait = procs.slots[0].next_start - t
        procs.check(t + wait - 0.01)  # not before the backoff is over
        assert len(started) == len(waits) + 1
        t += wait
        procs.check(t)
        assert len(started) == len(waits) + 2
        waits.append(wait)
        _exit_all(procs)
    assert waits[:3] == [BACKOFF_MIN_S, 2 * BACKOFF_MIN_S, 4 * BACKOFF_MIN_S]
    assert max(waits) == BACKOFF_MAX_S


def test_the_backoff_resets_after_a_healthy_minute_and_stop_ends_them_all() -> None:
    kinds = iter([_dies, _dies, _lives, _dies, _lives, _lives])
    procs = ApiProcesses(2, lambda: next(kinds)(), now=0.0)
    procs.slots[0].proc.wait(30)  # type: ignore[union-attr]
    procs.slots[1].proc.wait(30)  # type: ignore[union-attr]
    procs.check(0.0)
    procs.check(BACKOFF_MIN_S)  # both back: the first lives, the second dies again
    procs.slots[1].proc.wait(30)  # type: ignore[union-attr]
    procs.check(BACKOFF_MIN_S + 0.1)
    assert procs.slots[1].next_start == BACKOFF_MIN_S + 0.1 + 2 * BACKOFF_MIN_S
    procs.check(BACKOFF_MIN_S + HEALTHY_AFTER_S)  # the first one has lived a minute
    assert procs.slots[0].backoff_s == BACKOFF_MIN_S
    assert len(procs.procs) == 2
    alive = procs.procs
    procs.stop(timeout=30)
    assert all(p.poll() is not None for p in alive)
