"""A model whose predict call costs a fixed time of real CPU work (numpy matrix products,
which release the GIL as GPU kernels leave the CPU free), so the platform's overhead can be
measured against the same model called in a bare loop."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from gpufleet.models import Batching, ModelInfo

BATCH_COST_MS = float(os.environ.get("FIXED_COST_MS", "400"))


class FixedCost:
    def __init__(self, model_dir: Path | None = None) -> None:
        self.info = ModelInfo(
            "fixed-cost",
            "1",
            input_schema={"type": "object"},
            example_input={"n": 1},
        )
        self.batching = Batching(16, 5)
        self.a = np.ones((1, 1), dtype=np.float32)
        self.rounds = 1

    def load(self, device: str) -> None:
        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((192, 192), dtype=np.float32)
        if os.environ.get("FIXED_COST_ROUNDS"):  # the benchmark calibrates once for all
            self.rounds = int(os.environ["FIXED_COST_ROUNDS"])
            return
        # Calibrate: how many products make BATCH_COST_MS on this machine.
        t0 = time.perf_counter()
        for _ in range(50):
            self.a @ self.a
        per = (time.perf_counter() - t0) / 50
        self.rounds = max(1, round(BATCH_COST_MS / 1000 / per))

    def warmup(self) -> None:
        self.predict([{}])

    def predict(self, inputs: list[Any]) -> list[Any]:
        x = self.a
        for _ in range(self.rounds):
            x = self.a @ self.a
        _ = float(x[0, 0])
        return [{"echo": i} for i in inputs]
