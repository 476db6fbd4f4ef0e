"""``LoadSpec``: what ``create_runner`` hands to a format's runner (the resolved entry path and
the ``model.yaml`` fields), and the one way a format reports a mistake in the model directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.errors import InvalidInput
from gpufleet.models.runtime import Batching, ModelInfo

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.yaml"

# Spelled as torch's attribute names, so that this module needs no torch to name them.
TORCH_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class LoadSpec:
    model_dir: Path
    entry: Path  # the file (torchscript, onnx) or directory (hf) to open, inside model_dir
    name: str
    version: str
    description: str
    precision: str
    batching: Batching
    example_input: Any = None

    def invalid(self, field: str, problem: str) -> InvalidInput:
        return model_dir_error(self.model_dir, field, problem)

    def model_info(self, input_schema: dict[str, Any], example_input: Any) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            version=self.version,
            description=self.description,
            input_schema=input_schema,
            example_input=example_input,
        )

    @property
    def entry_label(self) -> str:
        """The entry as the model's author knows it: relative to the model directory (the
        directory itself by its path)."""
        if self.entry == self.model_dir or not self.entry.is_relative_to(self.model_dir):
            return str(self.entry)
        return str(self.entry.relative_to(self.model_dir))


def model_dir_error(model_dir: Path, field: str, problem: str) -> InvalidInput:
    """An error in a model directory, in the form ``load_model_dir`` uses: the ``model.yaml``
    path, the field, what is wrong and what to do."""
    yaml_path = model_dir / MODEL_FILE
    return InvalidInput(f"{yaml_path}: {field}: {problem}", path=str(yaml_path), field=field)


def torch_dtype(precision: str) -> torch.dtype:
    """The torch dtype that a module computes in at ``precision`` (fp8 weights compute in bf16)."""
    import torch

    name = TORCH_DTYPE_NAMES.get(precision, "bfloat16")
    dtype: torch.dtype = getattr(torch, name)
    return dtype
