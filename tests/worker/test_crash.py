"""What a dead worker's tasks are told: the latest known CUDA failure in its last output, or
how it died."""

from __future__ import annotations

import signal

from gpufleet.worker.crash import crash_reason

OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
FAULT = "RuntimeError: CUDA error: an illegal memory access was encountered"


def test_the_latest_failure_explains_the_exit_not_an_older_handled_one() -> None:
    tail = [OOM, "retrying as 4 + 4", "worker ready", FAULT, "Aborted"]
    reason = crash_reason("w1", 134, tail)
    assert reason.startswith("worker w1 exited with 134: a kernel faulted")
    assert "out of memory" not in reason.lower()


def test_a_kill_is_named_and_not_blamed_on_old_output() -> None:
    reason = crash_reason("w1", -signal.SIGKILL, [OOM, "batch done"])
    assert reason == (
        "worker w1 was killed by SIGKILL (the kernel's out-of-memory killer, or a kill -9); "
        "its last output: batch done"
    )


def test_a_bus_error_points_at_a_mapped_file() -> None:
    reason = crash_reason("w1", -signal.SIGBUS, ["worker loading tiny-lm@1.0.0"])
    assert reason.startswith("worker w1 was killed by SIGBUS (a memory-mapped file")
    assert "cut short or could not be read" in reason


def test_without_a_known_failure_the_last_line_is_given() -> None:
    assert crash_reason("w1", 1, ["Traceback ...", "ValueError: bad weights", ""]) == (
        "worker w1 exited with 1; its last output: ValueError: bad weights"
    )
    assert crash_reason("w1", 1, []) == "worker w1 exited with 1"


def test_old_lines_far_up_the_tail_are_not_read() -> None:
    tail = [FAULT] + [f"line {i}" for i in range(20)]
    assert crash_reason("w1", 1, tail) == "worker w1 exited with 1; its last output: line 19"
