"""Schemathesis generates requests from the OpenAPI document (valid and invalid ones) and sends
them to the real app on loopback: no request may produce a 500."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.api.conftest import LiveApi

pytestmark = pytest.mark.slow


def test_no_generated_request_gets_a_500(live_api: LiveApi) -> None:
    schema = schemathesis.openapi.from_url(f"{live_api.url}/openapi.json")
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        if operation.path == "/v1/tasks/{task_id}/events":
            continue  # a stream: covered by the client tests

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            if case.query and "wait" in case.query:  # infer: keep waits short
                case.query = {**case.query, "wait": 0}
            case.call_and_validate(checks=[not_a_server_error], timeout=30)

        check()
    assert "POST /v1/tasks" in labels
    assert "POST /v1/models/{name}/infer" in labels
