"""``TorchScriptRunner``: a ``torch.jit`` archive served as a tensor model, cast to fp32, fp16
or bf16. Input names come from ``forward``'s signature once loaded; dtypes from the example.

fp8 is refused: a TorchScript module's layers are compiled code, so they cannot be swapped
for fp8 ones the way ``fp8.py`` swaps a transformers model's Linear layers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from gpufleet.models.formats import tensors
from gpufleet.models.formats.spec import LoadSpec, torch_dtype
from gpufleet.models.runtime import Batching, ModelInfo, release_cuda_cache

if TYPE_CHECKING:
    import torch

_NUMPY_DTYPES: dict[tensors.Kind, np.dtype[Any]] = {
    # Floats are parsed in float32 and cast to the module's dtype by torch (numpy has no bf16).
    "float": np.dtype(np.float32),
    "int": np.dtype(np.int64),
    "bool": np.dtype(np.bool_),
}


class TorchScriptRunner:
    """A TorchScript module: ``torch.jit.load`` on the device, ``forward`` on stacked items."""

    def __init__(self, spec: LoadSpec) -> None:
        if spec.precision == "fp8":
            raise spec.invalid(
                "model.precision",
                "fp8 is not available for torchscript: its layers are compiled and cannot be "
                "swapped for fp8 ones; use bf16 or fp16, or ship the model as format: hf",
            )
        self.spec = spec
        self._kinds: dict[str, tensors.Kind] | tensors.Kind = "float"
        if spec.example_input is not None:
            try:
                self._kinds = tensors.example_kinds(spec.example_input)
            except ValueError as exc:
                raise spec.invalid("model.example_input", str(exc)) from exc
        self.info: ModelInfo = spec.model_info(tensors.input_schema(None), spec.example_input)
        self.batching: Batching = spec.batching
        self.device: str | None = None
        self._module: Any = None
        self._dtype: torch.dtype | None = None
        self._inputs: list[tensors.TensorInput] = []

    def load(self, device: str) -> None:
        import torch

        try:
            module = torch.jit.load(  # type: ignore[no-untyped-call, unused-ignore]
                str(self.spec.entry), map_location=device
            )
        except (RuntimeError, ValueError) as exc:
            raise self.spec.invalid(
                "model.entry",
                f"{self.spec.entry_label} is not a TorchScript archive that this torch "
                f"({torch.__version__}) can load: {str(exc).strip().splitlines()[0]}",
            ) from exc
        dtype = torch_dtype(self.spec.precision)
        module = module.to(dtype=dtype).eval()
        arguments = module.forward.schema.arguments[1:]  # [0] is self
        inputs = []
        for arg in arguments:
            kind = self._kinds if isinstance(self._kinds, str) else self._kinds.get(arg.name)
            inputs.append(
                tensors.TensorInput(
                    name=arg.name,
                    kind=kind or "float",
                    dtype=_NUMPY_DTYPES[kind or "float"],
                    required=not arg.has_default_value(),
                )
            )
        if isinstance(self._kinds, dict) and (
            unknown := set(self._kinds) - {a.name for a in arguments}
        ):
            raise self.spec.invalid(
                "model.example_input",
                f"names inputs {sorted(unknown)} that forward() does not take "
                f"({', '.join(a.name for a in arguments)})",
            )
        self._module, self._dtype, self._inputs, self.device = module, dtype, inputs, device
        self.info = self.spec.model_info(tensors.input_schema(inputs), self.spec.example_input)

    def warmup(self) -> None:
        if self.spec.example_input is not None:
            self.predict([self.spec.example_input])

    def unload(self) -> None:
        device, self._module, self.device = self.device, None, None
        release_cuda_cache(device)

    def predict(self, inputs: list[Any]) -> list[Any]:
        if self._module is None:
            raise RuntimeError("TorchScriptRunner.predict called before load()")
        import torch

        with torch.inference_mode():
            return tensors.predict_tensors(inputs, self._inputs, self._run, _input_rejection)

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = {}
        for name, array in batch.items():
            tensor = torch.from_numpy(array).to(self.device)
            args[name] = tensor.to(self._dtype) if tensor.is_floating_point() else tensor
        result = self._module(**args)
        if isinstance(result, torch.Tensor):
            named = {"output": result}
        elif isinstance(result, tuple | list):
            named = {f"output_{i}": t for i, t in enumerate(result)}
        elif isinstance(result, dict):
            named = {str(k): t for k, t in result.items()}
        else:
            raise RuntimeError(
                f"forward() returned {type(result).__name__}; gpufleet serves tensors, "
                "tuples / lists of tensors and dicts of tensors"
            )
        return {name: _to_numpy(tensor, name) for name, tensor in named.items()}


def _to_numpy(tensor: Any, name: str) -> np.ndarray:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise RuntimeError(f"forward() output {name!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        tensor = tensor.float()  # fp16 / bf16 -> float32: numpy has no bf16, JSON has one float
    array: np.ndarray = tensor.detach().cpu().numpy()
    return array


def _input_rejection(exc: BaseException) -> str | None:
    """A RuntimeError from ``forward`` on inputs of one shape is the module refusing them
    (wrong size, rank or dtype). TorchScript puts its traceback first and the cause last."""
    if not isinstance(exc, RuntimeError):
        return None
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
