"""Workers: the loop that claims, batches, predicts and completes (``loop``), the process that
runs one (``process``), and the supervisor that runs one per slot per model (``supervisor``)."""

from gpufleet.worker.loop import Worker, WorkerConfig, WorkerStats

__all__ = ["Worker", "WorkerConfig", "WorkerStats"]
