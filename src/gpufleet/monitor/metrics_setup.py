"""Set up Prometheus multiprocess mode; importable without creating any metric."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def use_multiprocess_dir(path: Path) -> None:
    """Start a fresh multiprocess directory (samples of a previous run are stale) and point
    this process and its children at it. Must run before ``gpufleet.monitor.metrics`` is
    imported: prometheus-client picks its storage when the metrics are created."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
