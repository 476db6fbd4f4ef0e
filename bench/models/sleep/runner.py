"""A stand-in for a GPU model: each ``predict`` call takes a fixed wall time (``SLEEP_MS``,
14 ms: digits' batch of 32 on the lent H200) whatever the batch size, and leaves the CPU and
the GIL free meanwhile, as a CUDA batch does while its kernels run. On a machine without a GPU
it shows how the platform batches and overlaps its own work with a device-bound model: the
ceiling is ``max_batch_size / SLEEP_MS``, and every gap to it is the platform's."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from gpufleet.models import Batching, ModelInfo

SLEEP_S = float(os.environ.get("SLEEP_MS", "14")) / 1000


class Sleep:
    def __init__(self, model_dir: Path | None = None) -> None:
        self.info = ModelInfo("sleep", "1", input_schema={"type": "object"}, example_input={"n": 1})
        self.batching = Batching(32, 5)

    def load(self, device: str) -> None:
        pass

    def warmup(self) -> None:
        pass

    def predict(self, inputs: list[Any]) -> list[Any]:
        time.sleep(SLEEP_S)
        return [{"echo": x} for x in inputs]
