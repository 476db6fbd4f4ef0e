"""``BatchWindow``: whether a batch that is not full waits for more work before it runs.

Triton's dynamic batcher always waits ``max_queue_delay`` for a fuller batch, so a request
alone on an idle server pays the whole window. Here the window is used only while more work
is arriving, which the claims themselves show:

- a claim that came back full runs at once (nothing to wait for);
- a claim of one task runs at once: nothing else was queued, so the request is alone;
- a claim of several, not full, means requests are arriving together: the worker waits up to
  the window for more, unless waiting has stopped paying. Each wait's gain (tasks it added)
  feeds a moving average; while waits gain nothing (closed-loop clients that only send their
  next request after the answer), the worker runs at once and tries a wait again every
  ``PROBE_EVERY`` batches, so it notices when the load grows.

Under load the batches fill anyway: the tasks that arrive while a batch runs are claimed
together by the next claim.
"""

from __future__ import annotations

PROBE_EVERY = 16
_ALPHA = 0.25  # weight of the latest wait in the moving average
_PAYS = 0.5  # tasks a wait must add on average to be worth its delay


class BatchWindow:
    def __init__(self, max_batch: int, max_delay_s: float) -> None:
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.gain = 1.0  # moving average of tasks a wait added (optimistic at start)
        self._skipped = 0

    def should_wait(self, claimed: int) -> bool:
        """Whether a batch of ``claimed`` tasks waits for more before it runs."""
        if self.max_delay_s <= 0 or claimed >= self.max_batch or claimed <= 1:
            return False
        if self.gain >= _PAYS:
            return True
        self._skipped += 1
        if self._skipped >= PROBE_EVERY:  # has the load changed? wait once and see
            self._skipped = 0
            return True
        return False

    def waited(self, added: int) -> None:
        """A wait is over: it added ``added`` tasks to the batch."""
        self.gain = (1 - _ALPHA) * self.gain + _ALPHA * added
