"""Periodic queue housekeeping in a background thread: lease recovery (and retention).

``gpufleet serve`` runs one; with several servers on one PostgreSQL each may run one, since
``recover_expired`` skips rows another recoverer holds.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from gpufleet.errors import GpufleetError
from gpufleet.queue.manager import TaskQueue
from gpufleet.queue.tasks import Recovery

log = logging.getLogger(__name__)


class LeaseReaper:
    def __init__(
        self,
        queue: TaskQueue,
        *,
        interval_s: float = 1.0,
        retention: timedelta | None = None,
        grace_s: float | None = None,
    ) -> None:
        self.queue = queue
        self.interval_s = interval_s
        self.retention = retention
        # After the database was unreachable, healthy workers could not heartbeat either: give
        # them one lease period to renew before treating a lapsed lease as a dead worker.
        self.grace_s = queue.lease_s if grace_s is None else grace_s
        self._resume_at = 0.0
        self._failing = False
        self.recovered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpufleet-lease-reaper", daemon=True)

    def start(self) -> LeaseReaper:
        self._thread.start()
        return self

    def run_once(self) -> Recovery:
        if time.monotonic() < self._resume_at:
            self.queue.stats()  # still check that the database answers
            return Recovery()
        report = self.queue.recover_expired()
        self.recovered += report.total
        if report.total:
            log.warning(
                "recovered %d tasks with expired leases: %d requeued, %d failed, %d cancelled",
                report.total,
                len(report.requeued),
                len(report.failed),
                len(report.cancelled),
            )
        if self.retention is not None:
            self.queue.purge_finished(self.retention)
        return report

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:
                log.exception("lease recovery failed")

    def tick(self) -> Recovery | None:
        """One round; after a failure, recovery waits ``grace_s`` once the database is back."""
        try:
            if self._failing:
                self.queue.stats()
                self._failing = False
                self._resume_at = time.monotonic() + self.grace_s
                log.warning(
                    "database reachable again; lease recovery resumes in %.0f s", self.grace_s
                )
            return self.run_once()
        except GpufleetError as e:
            self._failing = True
            log.error("lease recovery failed: %s", e)
            return None

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
