"""A model's input_schema checked at submit: the field and the reason, or nothing to check."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from gpufleet.errors import InvalidInput
from gpufleet.models.demo.runner import DigitsInput
from gpufleet.models.input_check import MAX_NODES, input_check

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "maxLength": 10},
        "sizes": {"type": "array", "items": {"type": "integer", "minimum": 1}},
    },
    "required": ["prompt"],
    "additionalProperties": False,
}


def _refusal(schema: dict[str, Any], value: Any) -> InvalidInput:
    check = input_check("m", schema)
    assert check is not None
    with pytest.raises(InvalidInput) as e:
        check(value)
    return e.value


def test_a_valid_input_passes() -> None:
    check = input_check("m", SCHEMA)
    assert check is not None
    check({"prompt": "a cat", "sizes": [1, 2]})


@pytest.mark.parametrize(
    ("value", "field", "reason"),
    [
        ({"sizes": [1]}, "input", "'prompt' is a required property"),
        ({"prompt": 7}, "input.prompt", "7 is not of type 'string'"),
        ({"prompt": "x", "sizes": [1, 2, 0]}, "input.sizes[2]", "0 is less than the minimum of 1"),
        ({"prompt": "x", "size": [1]}, "input", "('size' was unexpected)"),
        ("a cat", "input", "is not of type 'object'"),
    ],
)
def test_a_refusal_names_the_field_and_the_reason(value: Any, field: str, reason: str) -> None:
    e = _refusal(SCHEMA, value)
    assert e.details["field"] == field
    assert e.message.startswith(f"{field}: ") and reason in e.message
    assert "input_schema of model m" in e.message


def test_a_pydantic_models_schema_is_checked_as_the_demo_publishes_it() -> None:
    e = _refusal(DigitsInput.model_json_schema(), {"prompt": "a 7", "steps": 200})
    assert e.details["field"] == "input.steps"
    assert "200 is greater than the maximum of 100" in e.message


def test_a_huge_offending_value_is_not_quoted_whole() -> None:
    e = _refusal(SCHEMA, {"prompt": "x" * 100_000})
    assert len(e.message) < 400


def test_no_schema_means_no_check() -> None:
    assert input_check("m", {}) is None
    assert input_check("m", None) is None


def test_a_schema_that_is_not_json_schema_is_not_used(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert input_check("m", {"type": "objekt"}) is None
    assert "model m: its input_schema is not valid JSON Schema" in caplog.text


def test_an_input_too_large_to_check_on_the_event_loop_is_left_to_the_worker() -> None:
    check = input_check("m", {"type": "array", "items": {"type": "integer"}})
    assert check is not None
    check(["not a number"] * (MAX_NODES + 1))  # too many values: the worker will judge it
    with pytest.raises(InvalidInput):
        check(["not a number"] * (MAX_NODES - 1))
