"""``BatchWindow``: whether a batch that is not full waits for more work before it runs.

Triton's dynamic batcher always waits ``max_queue_delay`` for a fuller batch, so a request
alone on an idle server pays the whole window. Here the window is used only while more work
is arriving, which the claims themselves show:

- a claim that came back full runs at once (nothing to wait for);
- a claim of one task runs at once when the worker was idle (its last batch was one task,
  or ended longer ago than a batch runs plus the window): the request is alone. Right after
  a batch of several, one task is the first of the next wave (closed-loop clients sending
  again as their answers arrive): it waits like any partial batch, or the wave would split
  into a batch of one and a batch of the rest, each paying a whole run;
- a claim of several, not full, means requests are arriving together: the worker waits up to
  the window for more, unless waiting has stopped paying. Each wait's gain (tasks it added)
  feeds a moving average; while waits gain nothing (closed-loop clients that only send their
  next request after the answer), the worker runs at once and tries a wait again every
  ``PROBE_EVERY`` batches, so it notices when the load grows.
- a wait in a wave ends as soon as the wave is in: as many tasks as the larger of the last two
  batches (closed-loop clients answered together send that many again), rather than at the
  window's end, which every batch of a closed loop short of ``max_batch`` would otherwise pay;
- a wait never lasts longer than a batch takes to run (a moving average of ``predict``'s
  time): tasks that arrive after the batch started would be finished by a second batch as
  early as a longer wait would let the first one finish, and the tasks in hand would have
  waited for nothing. So a model faster than the platform (a few milliseconds or less) runs
  at once, and a window as long as a 30 ms model's only while arrivals keep filling it.

Under load the batches fill anyway: the tasks that arrive while a batch runs are claimed
together by the next claim.
"""

from __future__ import annotations

import time

PROBE_EVERY = 16
MIN_WAIT_S = 0.0002  # shorter than a claim's round trip: not worth a wait
_ALPHA = 0.25  # weight of the latest wait in the moving average
_PAYS = 0.5  # tasks a wait must add on average to be worth its delay


def moving_average(average: float | None, latest: float) -> float:
    """The latest value weighed in (``_ALPHA``); the first one alone starts the average."""
    return latest if average is None else (1 - _ALPHA) * average + _ALPHA * latest


class BatchWindow:
    def __init__(self, max_batch: int, max_delay_s: float) -> None:
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.gain = 1.0  # moving average of tasks a wait added (optimistic at start)
        self.run_s: float | None = None  # moving average of a batch's predict time
        self._last_size = 0  # the last batch's tasks, and when it ended (monotonic)
        self._size_before = 0  # the one before it
        self._last_end = 0.0
        self._skipped = 0

    @property
    def wait_s(self) -> float:
        """How long a batch that waits waits at most: the window, or a batch's run time if
        that is shorter."""
        if self.run_s is None:
            return self.max_delay_s
        return min(self.max_delay_s, self.run_s)

    def should_wait(self, claimed: int) -> bool:
        """Whether a batch of ``claimed`` tasks waits for more before it runs."""
        if self.wait_s < MIN_WAIT_S or claimed >= self.max_batch or claimed < 1:
            return False
        if claimed == 1 and not self._in_a_wave():
            return False
        if self.gain >= _PAYS:
            return True
        self._skipped += 1
        if self._skipped >= PROBE_EVERY:  # has the load changed? wait once and see
            self._skipped = 0
            return True
        return False

    def wave_size(self) -> int:
        """How many tasks a wait gathers before it ends early: in a wave, the larger of the
        last two batches (the wave that was just answered; two, so a wave that split once
        can join up again); otherwise a full batch."""
        if not self._in_a_wave():
            return self.max_batch
        return min(self.max_batch, max(self._last_size, self._size_before))

    def waited(self, added: int) -> None:
        """A wait is over: it added ``added`` tasks to the batch."""
        self.gain = moving_average(self.gain, added)

    def _in_a_wave(self) -> bool:
        idle_for = time.monotonic() - self._last_end
        return self._last_size > 1 and idle_for <= (self.run_s or 0.0) + self.max_delay_s

    def ran(self, seconds: float, size: int) -> None:
        """A batch of ``size`` tasks ran: its ``predict`` took ``seconds``."""
        self._size_before = self._last_size
        self._last_size, self._last_end = size, time.monotonic()
        self.run_s = moving_average(self.run_s, seconds)
