"""A model's ``input_schema`` (JSON Schema, as ``GET /v1/models`` publishes it) checked when a
task is submitted: an input that breaks it is refused at once, 422 ``invalid_input`` naming the
field and the reason, instead of being accepted and failed by the worker, which in a busy
batch lane is much later.

The worker's own checks stay (a model may check more than its schema says); this only moves
what the schema can tell forward. A model without a schema (``{}``) accepts anything here. A
schema that is not valid JSON Schema is not used (logged once): refusing every request because
of a model's typo would be worse than checking late. An input of more than ``MAX_NODES``
values (an image as nested lists: 150,000 numbers took 0.7 s to check) is left to the worker:
the check runs on the API's event loop, where a typical input costs about 30 µs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gpufleet.errors import InvalidInput

log = logging.getLogger(__name__)

InputCheck = Callable[[Any], None]
MAX_NODES = 1000  # values in one input checked at submit (about 5 ms at the most)


def input_check(model: str, schema: dict[str, Any] | None) -> InputCheck | None:
    """A function that raises ``InvalidInput`` for an input ``schema`` refuses; None when
    there is nothing to check."""
    if not schema:
        return None
    import jsonschema  # only where a model publishes a schema: a tenth of a second to import
    from jsonschema.exceptions import best_match

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        log.warning(
            "model %s: its input_schema is not valid JSON Schema (%s at %s); inputs are "
            "checked by the worker only",
            model,
            e.message,
            "/".join(str(p) for p in e.absolute_path) or "the top",
        )
        return None
    validator = cls(schema)

    def check(value: Any) -> None:
        if not _at_most(value, MAX_NODES) or validator.is_valid(value):
            return
        error = best_match(validator.iter_errors(value))
        assert error is not None
        field = "input" + "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path
        )
        raise InvalidInput(
            f"{field}: {_short(error.message)} (the input_schema of model {model}, in "
            "GET /v1/models)",
            field=field,
        )

    return check


def _at_most(value: Any, budget: int) -> bool:
    """Whether ``value`` holds at most ``budget`` values (itself, its items, theirs...),
    found without walking more than that."""
    stack, seen = [value], 0
    while stack:
        v = stack.pop()
        seen += 1
        if isinstance(v, dict | list):
            if seen + len(stack) + len(v) > budget:
                return False
            stack.extend(v.values() if isinstance(v, dict) else v)
        elif seen > budget:
            return False
    return True


def _short(message: str, limit: int = 200) -> str:
    """jsonschema quotes the whole offending value; a large input must not fill the error."""
    return message if len(message) <= limit else message[: limit - 3] + "..."
