"""BatchWindow: a batch waits for more work only while waiting can help."""

from __future__ import annotations

from gpufleet.worker.batching import PROBE_EVERY, BatchWindow


def test_a_full_batch_or_a_lone_task_never_waits() -> None:
    w = BatchWindow(max_batch=8, max_delay_s=0.01)
    assert not w.should_wait(8)
    assert not w.should_wait(1)
    assert not w.should_wait(0)


def test_no_window_means_no_wait() -> None:
    assert not BatchWindow(max_batch=8, max_delay_s=0).should_wait(3)


def test_tasks_arriving_together_wait_while_waits_pay() -> None:
    w = BatchWindow(max_batch=8, max_delay_s=0.01)
    for _ in range(20):
        assert w.should_wait(3)
        w.waited(2)


def test_waits_that_gain_nothing_stop_and_are_probed_again() -> None:
    w = BatchWindow(max_batch=8, max_delay_s=0.01)
    while w.should_wait(2):
        w.waited(0)  # closed-loop clients: nothing arrives while we wait
    decisions = [w.should_wait(2) for _ in range(PROBE_EVERY * 2)]
    assert decisions.count(True) == 2  # one probe every PROBE_EVERY batches
    w.waited(5)  # the load grew: the probe paid
    assert w.should_wait(2)
