"""A python-format model for GPU sharing tests: an input either holds ``mib`` MiB of device
memory for the length of its predict, or runs ``n`` fp16 matrix products and reports their
rate. Written into a model directory with the ``resources.gpu`` a test asks for."""

from __future__ import annotations

from pathlib import Path

RUNNER = """
import os
import time

from gpufleet.models import Batching, ModelInfo


class ShareRunner:
    def __init__(self, model_dir):
        self.info = ModelInfo(name="share", version="0")
        self.batching = Batching(max_batch_size=1)

    def load(self, device):
        import torch

        self.torch = torch
        self.device = device
        dtype = torch.float32 if device == "cpu" else torch.float16
        self.x = torch.randn(4096, 4096, device=device, dtype=dtype)

    def warmup(self):
        self.predict([{"n": 2}])

    def _sync(self):
        if self.device != "cpu":
            self.torch.cuda.synchronize()

    def predict(self, inputs):
        out = []
        for item in inputs:
            if "mib" in item:
                size = int(item["mib"]) << 20
                held = self.torch.empty(size, dtype=self.torch.uint8, device=self.device)
                held.fill_(1)
                self._sync()
                del held
                out.append({"pid": os.getpid(), "held_mib": item["mib"]})
                continue
            n = int(item.get("n", 10))
            self._sync()
            started = time.perf_counter()
            for _ in range(n):
                y = self.x @ self.x
            self._sync()
            out.append({"pid": os.getpid(), "matmul_per_s": n / (time.perf_counter() - started)})
        return out
"""


def make_share_model(path: Path, name: str, gpu: str, *, max_attempts: int | None = None) -> Path:
    """``gpu``: the YAML flow mapping of ``resources.gpu``, e.g.
    ``{mode: fraction, memory_gb: 4, compute_percent: 50}``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "runner.py").write_text(RUNNER)
    (path / "model.yaml").write_text(
        "model:\n"
        f"  name: {name}\n"
        "  version: '1'\n"
        "  format: python\n"
        "  runtime: python:runner.py:ShareRunner\n"
        "  batching: {max_batch_size: 1, max_queue_delay_ms: 0}\n"
        f"  resources: {{gpu: {gpu}}}\n"
    )
    return path
