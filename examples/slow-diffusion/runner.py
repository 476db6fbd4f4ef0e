"""A diffusion-like model: seeded noise denoised step by step towards a ring pattern.

Slow on purpose (``step_ms`` of sleep per step, for the whole batch at once), so that
batching, cancellation and waiting clients can be watched. Progress goes to the worker's
log (one line per quarter of the steps); the result carries the distance to the target
after every step (``trace``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from gpufleet import Model

log = logging.getLogger("gpufleet.examples.slow_diffusion")


def ring(size: int) -> np.ndarray:
    """The target: concentric rings, values 0..1."""
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1) - 0.5
    return 0.5 + 0.5 * np.cos(np.hypot(x, y) * 6 * np.pi)


class SlowDiffusion(Model):
    def predict(self, inputs: list[Any]) -> list[Any]:
        items = [{"seed": 0, "steps": 20, "size": 16, "step_ms": 50, **(x or {})} for x in inputs]
        images = [
            np.random.default_rng(it["seed"]).standard_normal((it["size"], it["size"]))
            for it in items
        ]
        targets = [ring(it["size"]) for it in items]
        traces: list[list[float]] = [[] for _ in items]
        started = time.perf_counter()
        total = max(it["steps"] for it in items)
        for step in range(total):
            # One step for every item still running: as a batched sampler does.
            time.sleep(max(it["step_ms"] for it in items if step < it["steps"]) / 1000)
            for i, it in enumerate(items):
                if step >= it["steps"]:
                    continue
                left = it["steps"] - step  # steps to go, this one included
                noise = np.random.default_rng([it["seed"], step]).standard_normal(images[i].shape)
                images[i] += (targets[i] - images[i]) / left + noise * 0.1 * (left - 1) / left
                traces[i].append(round(float(np.abs(images[i] - targets[i]).mean()), 4))
            if (step + 1) % max(1, total // 4) == 0 or step + 1 == total:
                log.info("batch of %d: step %d/%d", len(items), step + 1, total)
        seconds = round(time.perf_counter() - started, 3)
        return [
            {
                "image": np.clip(img * 255, 0, 255).round().astype(int).tolist(),
                "steps": it["steps"],
                "trace": trace,
                "seconds": seconds,
            }
            for img, it, trace in zip(images, items, traces, strict=True)
        ]
