"""A small python-format model directory for registry tests: reads a weights file at load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

RUNNER = """
from pathlib import Path

from safetensors.numpy import load_file

from gpufleet.models import Batching, ModelInfo


class ScaleRunner:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.info = ModelInfo(name="scale", version="0")
        self.batching = Batching(max_batch_size=4)

    def load(self, device: str) -> None:
        self.scale = float(load_file(self.model_dir / "weights.safetensors")["scale"][0])

    def warmup(self) -> None:
        pass

    def predict(self, inputs):
        return [{"y": x["x"] * self.scale} for x in inputs]
"""


def make_scale_model(
    path: Path, *, version: str = "1.0.0", scale: float = 3.0, extra: str = ""
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "runner.py").write_text(RUNNER)
    save_file({"scale": np.array([scale], dtype=np.float32)}, str(path / "weights.safetensors"))
    (path / "model.yaml").write_text(
        "model:\n"
        "  name: scale\n"
        f"  version: '{version}'\n"
        "  format: python\n"
        "  runtime: python:runner.py:ScaleRunner\n"
        "  batching: {max_batch_size: 8, max_queue_delay_ms: 2}\n" + extra
    )
    return path
