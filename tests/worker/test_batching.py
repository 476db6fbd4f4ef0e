"""BatchWindow: a batch waits for more work only while waiting can help."""

from __future__ import annotations

import time

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


def test_a_wait_lasts_no_longer_than_a_batch_runs() -> None:
    w = BatchWindow(max_batch=8, max_delay_s=0.010)
    assert w.wait_s == 0.010  # nothing has run yet: the window
    w.ran(0.004, 3)
    assert w.wait_s == 0.004
    w.ran(0.050, 3)
    assert w.wait_s == 0.010  # a slow model: the whole window


def test_a_model_faster_than_a_claim_never_waits() -> None:
    w = BatchWindow(max_batch=8, max_delay_s=0.010)
    w.ran(0.00005, 3)
    assert not w.should_wait(3)


def test_one_task_after_a_batch_of_several_waits_for_the_rest_of_its_wave() -> None:
    """Closed-loop clients answered together send again together; the first to arrive waits
    for the others instead of running alone and splitting the wave in two."""
    w = BatchWindow(max_batch=8, max_delay_s=0.010)
    w.ran(0.030, 6)
    assert w.should_wait(1)


def test_one_task_after_a_lone_one_or_a_pause_runs_at_once() -> None:
    w = BatchWindow(max_batch=8, max_delay_s=0.010)
    w.ran(0.030, 1)
    assert not w.should_wait(1)
    w = BatchWindow(max_batch=8, max_delay_s=0.001)
    w.ran(0.001, 6)
    time.sleep(0.01)  # longer than a run and the window: the wave is over
    assert not w.should_wait(1)


def test_a_wave_is_gathered_until_it_is_in_not_until_the_window_ends() -> None:
    """Right after batches of 6 and 4, a wait gathers 6 tasks (the larger of the two waves
    just answered) and ends; an idle worker's wait gathers a full batch."""
    w = BatchWindow(max_batch=32, max_delay_s=0.010)
    assert w.wave_size() == 32  # nothing ran: no wave
    w.ran(0.030, 6)
    w.ran(0.030, 4)
    assert w.wave_size() == 6
    w.ran(0.030, 5)
    assert w.wave_size() == 5  # the 6 is two batches back
    w = BatchWindow(max_batch=8, max_delay_s=0.001)
    w.ran(0.001, 6)
    time.sleep(0.01)  # longer than a run and the window: the wave is over
    assert w.wave_size() == 8
