"""``OnnxRunner``: an ONNX graph served through onnxruntime as a tensor model.

The graph is read when the runner is created (without external weight files): its declared
inputs give names, dtypes and shapes, and its weights' float type must be the precision
``model.yaml`` states, since an ONNX model carries its precision and nothing here casts it.
CUDA devices use onnxruntime's CUDA provider when installed, else the CPU one, with a warning.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import numpy as np

from gpufleet.models.formats import tensors
from gpufleet.models.formats.spec import LoadSpec
from gpufleet.models.runtime import Batching, ModelInfo

logger = logging.getLogger(__name__)

# ONNX TensorProto data types (stable numbers of the ONNX spec) by what gpufleet calls them.
_FLOAT_TYPES = {
    1: "fp32",
    10: "fp16",
    16: "bf16",
    11: "fp64",
    17: "fp8",
    18: "fp8",
    19: "fp8",
    20: "fp8",
}
_TYPE_NAMES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp64": "float64",
    "fp8": "float8",
}
# Input types that numpy can hold, so items can be given in them.
_INPUT_DTYPES: dict[int, tuple[tensors.Kind, str]] = {
    1: ("float", "float32"),
    10: ("float", "float16"),
    11: ("float", "float64"),
    2: ("int", "uint8"),
    3: ("int", "int8"),
    4: ("int", "uint16"),
    5: ("int", "int16"),
    6: ("int", "int32"),
    7: ("int", "int64"),
    12: ("int", "uint32"),
    13: ("int", "uint64"),
    9: ("bool", "bool"),
}
# onnxruntime's error classes that mean "these inputs do not fit the graph".
_INPUT_ERRORS = {"InvalidArgument", "Fail"}


class OnnxRunner:
    """An ONNX model: one ``onnxruntime.InferenceSession``, items stacked on dimension 0."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        graph = _read_graph(spec)
        self._inputs, self._one_at_a_time = _declared_inputs(spec, graph)
        _check_precision(spec, graph)
        example = (
            spec.example_input
            if spec.example_input is not None
            else tensors.example_item(self._inputs)
        )
        self.info: ModelInfo = spec.model_info(tensors.input_schema(self._inputs), example)
        self.batching: Batching = spec.batching
        self.device: str | None = None
        self.providers: list[str] = []
        self._session: Any = None
        self._outputs: list[str] = []

    def load(self, device: str) -> None:
        import onnxruntime  # type: ignore[import-untyped, unused-ignore]

        available = onnxruntime.get_available_providers()
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" in available:
                index = int(device.partition(":")[2] or 0)
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
            else:
                logger.warning(
                    "%s: onnxruntime has no CUDAExecutionProvider (providers: %s); running "
                    "on CPU instead of %s. Install onnxruntime-gpu to use the GPU.",
                    self.spec.entry_label,
                    ", ".join(available),
                    device,
                )
        session = onnxruntime.InferenceSession(str(self.spec.entry), providers=providers)
        self._session, self.device = session, device
        self.providers = list(session.get_providers())
        self._outputs = [output.name for output in session.get_outputs()]

    def warmup(self) -> None:
        self.predict([self.info.example_input])

    def unload(self) -> None:
        self._session, self.device = None, None

    def predict(self, inputs: list[Any]) -> list[Any]:
        if self._session is None:
            raise RuntimeError("OnnxRunner.predict called before load()")
        return tensors.predict_tensors(inputs, self._inputs, self._run, _input_rejection)

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._one_at_a_time:
            results = self._session.run(self._outputs, batch)
        else:  # the graph fixes its batch dimension to 1
            rows = [
                self._session.run(self._outputs, {k: v[i : i + 1] for k, v in batch.items()})
                for i in range(len(next(iter(batch.values()))))
            ]
            results = [np.concatenate(parts) for parts in zip(*rows, strict=True)]
        return dict(zip(self._outputs, results, strict=True))


def _read_graph(spec: LoadSpec) -> Any:
    import onnx

    try:
        model = onnx.load(str(spec.entry), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends have no common base
        raise spec.invalid(
            "model.entry", f"{spec.entry_label} is not a readable ONNX model: {exc}"
        ) from exc
    return model.graph


def _declared_inputs(spec: LoadSpec, graph: Any) -> tuple[list[tensors.TensorInput], bool]:
    """The graph's real inputs (old exporters also list weights as inputs), and whether its
    batch dimension is fixed to 1."""
    weights = {init.name for init in graph.initializer}
    inputs, fixed_one = [], False
    for value in graph.input:
        if value.name in weights:
            continue
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in _INPUT_DTYPES:
            raise spec.invalid(
                "model.entry",
                f"{spec.entry_label} input {value.name!r} has ONNX element type "
                f"{tensor_type.elem_type}, which gpufleet cannot pass from JSON; use a float, "
                "int or bool input",
            )
        kind, dtype = _INPUT_DTYPES[tensor_type.elem_type]
        dims: list[tensors.Dim] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim
        ]
        if (
            not tensor_type.HasField("shape")
            or not dims
            or (isinstance(dims[0], int) and dims[0] != 1)
        ):
            got = tensors.format_shape(dims) if tensor_type.HasField("shape") else "unknown"
            raise spec.invalid(
                "model.entry",
                f"{spec.entry_label} input {value.name!r} has shape {got}; gpufleet stacks "
                "items along a first (batch) dimension: export it with a dynamic batch axis",
            )
        fixed_one = fixed_one or dims[0] == 1
        inputs.append(tensors.TensorInput(value.name, kind, np.dtype(dtype), tuple(dims[1:])))
    return inputs, fixed_one


def _check_precision(spec: LoadSpec, graph: Any) -> None:
    """The model's float type: that of most weight elements, else of its float inputs."""
    elements: Counter[str] = Counter()
    for init in graph.initializer:
        if init.data_type in _FLOAT_TYPES:
            elements[_FLOAT_TYPES[init.data_type]] += int(np.prod(init.dims, dtype=np.int64))
    if not elements:
        for value in graph.input:
            if value.type.tensor_type.elem_type in _FLOAT_TYPES:
                elements[_FLOAT_TYPES[value.type.tensor_type.elem_type]] += 1
    if not elements:
        return  # no floats at all: precision means nothing here
    found = elements.most_common(1)[0][0]
    if found != spec.precision:
        remedy = "" if found == "fp64" else f" or set precision: {found}"
        raise spec.invalid(
            "model.precision",
            f"{spec.entry_label} is {_TYPE_NAMES[found]} but model.yaml says precision: "
            f"{spec.precision}; export it in {spec.precision}{remedy}",
        )


def _input_rejection(exc: BaseException) -> str | None:
    if type(exc).__name__ not in _INPUT_ERRORS:
        return None
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
