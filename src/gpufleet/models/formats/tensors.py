"""Inputs and outputs of tensor models (``torchscript``, ``onnx``): items as nested lists,
checked against what is known of each model input, grouped by shape, stacked into batches,
and split back into one output per item. numpy only: the frameworks stay in their runners.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from gpufleet.models.runtime import ItemError, is_out_of_memory

Kind = Literal["float", "int", "bool"]
# A dimension of one item: a fixed size, a named size that inputs share (ONNX's dim_param),
# or None: any size.
Dim = int | str | None

_JSON_TYPES: dict[Kind, str] = {"float": "number", "int": "integer", "bool": "boolean"}
_ANY_TENSOR = {"anyOf": [{"type": "number"}, {"type": "array"}]}


@dataclass(frozen=True)
class TensorInput:
    """One model input, as far as it is known. ``dtype`` is what the batch is stacked in;
    ``shape`` leaves the batch dimension out (None: any rank)."""

    name: str
    kind: Kind
    dtype: np.dtype[Any]
    shape: tuple[Dim, ...] | None = None
    required: bool = True


# Stacked inputs by name -> outputs by name, each with the batch along its first dimension.
RunBatch = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def predict_tensors(
    inputs: list[Any],
    model_inputs: Sequence[TensorInput],
    run: RunBatch,
    input_rejection: Callable[[BaseException], str | None],
) -> list[Any]:
    """One output (or ``ItemError``) per item. Items whose arrays have the same shapes run in
    one batch. When ``input_rejection`` reads a batch's error as the model refusing those
    inputs (it returns the reason), only that batch's items fail; other errors (and out of
    memory) propagate to the worker."""
    outputs: list[Any] = [None] * len(inputs)
    groups: dict[tuple[Any, ...], list[tuple[int, dict[str, np.ndarray]]]] = {}
    for i, raw in enumerate(inputs):
        parsed = parse_tensor_item(raw, model_inputs)
        if isinstance(parsed, ItemError):
            outputs[i] = parsed
            continue
        key = tuple((name, arr.shape, arr.dtype.str) for name, arr in sorted(parsed.items()))
        groups.setdefault(key, []).append((i, parsed))
    for members in groups.values():
        batch = {name: np.stack([arrays[name] for _, arrays in members]) for name in members[0][1]}
        try:
            result = run(batch)
        except Exception as exc:
            reason = None if is_out_of_memory(exc) else input_rejection(exc)
            if reason is None:
                raise
            shapes = ", ".join(f"{name} {list(a.shape[1:])}" for name, a in batch.items())
            error = ItemError("invalid_input", f"the model rejected input {shapes}: {reason}")
            for i, _ in members:
                outputs[i] = error
            continue
        for row, (i, _) in enumerate(members):
            outputs[i] = _item_output(result, row, len(members))
    return outputs


def parse_tensor_item(
    raw: Any, model_inputs: Sequence[TensorInput]
) -> dict[str, np.ndarray] | ItemError:
    """One item's arrays by input name, in each input's dtype, or why they cannot be."""
    by_name = {spec.name: spec for spec in model_inputs}
    required = [spec.name for spec in model_inputs if spec.required]
    if isinstance(raw, dict):
        if set(raw) != {"inputs"} or not isinstance(raw["inputs"], dict):
            return _bad(
                'a named input must be {"inputs": {name: nested list}}, '
                f"got an object with keys {sorted(raw)}"
            )
        values: dict[str, Any] = raw["inputs"]
        unknown = sorted(set(values) - set(by_name))
        missing = [name for name in required if name not in values]
        if unknown or missing:
            problem = f"unknown {unknown}" if unknown else f"missing {missing}"
            return _bad(f"inputs {problem}; this model takes {_names(model_inputs)}")
    elif len(required) == 1:
        values = {required[0]: raw}
    else:
        return _bad(f'this model has inputs {_names(model_inputs)}: send {{"inputs": {{...}}}}')
    arrays: dict[str, np.ndarray] = {}
    named_sizes: dict[str, tuple[str, int]] = {}
    for name, value in values.items():
        spec = by_name[name]
        array = _to_array(value, spec)
        if isinstance(array, ItemError):
            return array
        if spec.shape is not None:
            mismatch = _shape_problem(spec, array.shape, named_sizes)
            if mismatch:
                return _bad(mismatch)
        arrays[name] = array
    return arrays


def _to_array(value: Any, spec: TensorInput) -> np.ndarray | ItemError:
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):  # ragged nested lists
        return _bad(f"input {spec.name!r} must be a rectangular nested list of numbers")
    if array.dtype.kind not in "biuf":
        return _bad(f"input {spec.name!r} must hold numbers only, got {_sample(value)}")
    if spec.kind == "int" and array.dtype.kind == "f" and not _whole(array):
        return _bad(f"input {spec.name!r} takes whole numbers ({spec.dtype}), got fractions")
    if spec.kind == "bool" and not np.isin(array, (0, 1)).all():
        return _bad(f"input {spec.name!r} takes booleans (or 0 / 1)")
    if spec.kind == "int" and array.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            return _bad(f"input {spec.name!r} has values outside {spec.dtype}'s range")
    return array.astype(spec.dtype, copy=False)


def _whole(array: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(array)) and np.all(array == np.round(array)))


def _shape_problem(
    spec: TensorInput, shape: tuple[int, ...], named_sizes: dict[str, tuple[str, int]]
) -> str | None:
    want = spec.shape or ()
    fits = len(shape) == len(want) and all(
        d is None or isinstance(d, str) or d == n for d, n in zip(want, shape, strict=True)
    )
    if not fits:
        return (
            f"input {spec.name!r} must have shape {format_shape(want)} "
            f"(one item, batch dimension left out), got {list(shape)}"
        )
    for dim, size in zip(want, shape, strict=True):
        if isinstance(dim, str):
            other, seen = named_sizes.setdefault(dim, (spec.name, size))
            if seen != size:
                return (
                    f"inputs {other!r} and {spec.name!r} must agree on dimension {dim!r}, "
                    f"got {seen} and {size}"
                )
    return None


def _item_output(result: dict[str, np.ndarray], row: int, batch_size: int) -> Any:
    for name, array in result.items():
        if array.ndim == 0 or array.shape[0] != batch_size:
            raise RuntimeError(
                f"model output {name!r} has shape {list(array.shape)}: its first dimension "
                f"should be the batch ({batch_size}); export the model batch-first"
            )
    if len(result) == 1:
        return next(iter(result.values()))[row].tolist()
    return {name: array[row].tolist() for name, array in result.items()}


def format_shape(shape: Sequence[Dim]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def input_schema(model_inputs: Sequence[TensorInput] | None) -> dict[str, Any]:
    """JSON schema of one item. ``None``: the inputs are not known before the model loads."""
    if model_inputs is None:
        return {
            "title": "tensor input",
            "description": 'a nested list of numbers, or {"inputs": {name: nested list}}',
            "anyOf": [_ANY_TENSOR, _named({}, extra=_ANY_TENSOR)],
        }
    named = _named({spec.name: _tensor_schema(spec) for spec in model_inputs})
    named["properties"]["inputs"]["required"] = [s.name for s in model_inputs if s.required]
    required = [spec for spec in model_inputs if spec.required]
    if len(required) == 1:
        return {"title": "tensor input", "anyOf": [_tensor_schema(required[0]), named]}
    return {"title": "tensor input", **named}


def example_item(model_inputs: Sequence[TensorInput]) -> Any:
    """Zeros of the right shape (named or open sizes: 1) for each required input."""
    arrays = {
        spec.name: np.zeros(
            [d if isinstance(d, int) else 1 for d in spec.shape or ()], dtype=spec.dtype
        ).tolist()
        for spec in model_inputs
        if spec.required
    }
    return next(iter(arrays.values())) if len(arrays) == 1 else {"inputs": arrays}


def example_kinds(example: Any) -> dict[str, Kind] | Kind:
    """The dtype kind of each input of an example item (of the single input's, for a nested
    list): whole numbers everywhere make an integer input, anything else a float one."""
    if isinstance(example, dict):
        if set(example) != {"inputs"} or not isinstance(example["inputs"], dict):
            raise ValueError('must be a nested list or {"inputs": {name: nested list}}')
        return {name: _kind(value, name) for name, value in example["inputs"].items()}
    return _kind(example, "input")


def _kind(value: Any, name: str) -> Kind:
    try:
        array = np.asarray(value)
    except (ValueError, OverflowError):
        raise ValueError(f"{name!r} is not a rectangular nested list of numbers") from None
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{name!r} must hold numbers only")
    return {"b": "bool", "i": "int", "u": "int"}.get(array.dtype.kind, "float")  # type: ignore[return-value]


def _tensor_schema(spec: TensorInput) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": _JSON_TYPES[spec.kind]}
    if spec.shape is None:  # any rank: a number or a nested list of them
        return {"anyOf": [schema, {"type": "array"}]}
    for dim in reversed(spec.shape or ()):
        schema = {"type": "array", "items": schema}
        if isinstance(dim, int):
            schema.update(minItems=dim, maxItems=dim)
    return schema


def _named(properties: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    inputs: dict[str, Any] = {"type": "object", "properties": properties}
    inputs["additionalProperties"] = extra if extra is not None else False
    return {
        "type": "object",
        "properties": {"inputs": inputs},
        "required": ["inputs"],
        "additionalProperties": False,
    }


def _names(model_inputs: Sequence[TensorInput]) -> str:
    return ", ".join(f"{s.name}{'' if s.required else ' (optional)'}" for s in model_inputs)


def _sample(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(message: str) -> ItemError:
    return ItemError("invalid_input", message)
