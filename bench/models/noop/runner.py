"""A model that costs nothing: ``predict`` echoes its inputs. Served, every millisecond and
every request a second it cannot reach is the platform's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpufleet.models import Batching, ModelInfo


class Noop:
    def __init__(self, model_dir: Path | None = None) -> None:
        self.info = ModelInfo("noop", "1", input_schema={"type": "object"}, example_input={"n": 1})
        self.batching = Batching(32, 5)

    def load(self, device: str) -> None:
        pass

    def warmup(self) -> None:
        pass

    def predict(self, inputs: list[Any]) -> list[Any]:
        return [{"echo": i} for i in inputs]
