"""The error hierarchy: stable codes and HTTP statuses the API and CLI rely on."""

from __future__ import annotations

import inspect
import re

import pytest

import gpufleet
from gpufleet import errors
from gpufleet.errors import GpufleetError

SUBCLASSES = sorted(
    (
        obj
        for _, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, GpufleetError) and obj is not GpufleetError
    ),
    key=lambda cls: cls.__name__,
)
ALL = [GpufleetError, *SUBCLASSES]
by_name = pytest.mark.parametrize("cls", ALL, ids=lambda cls: cls.__name__)


def test_the_module_defines_the_documented_errors() -> None:
    names = {cls.__name__ for cls in SUBCLASSES}
    assert {"InvalidInput", "NotFound", "Conflict", "Unavailable", "StorageFull"} <= names


def test_codes_are_unique() -> None:
    codes = [cls.code for cls in ALL]
    assert len(set(codes)) == len(codes), codes


@by_name
def test_code_and_status(cls: type[GpufleetError]) -> None:
    assert re.fullmatch(r"[a-z][a-z_]*", cls.code)
    assert isinstance(cls.http_status, int)
    assert 400 <= cls.http_status <= 599


@by_name
def test_to_dict_and_str(cls: type[GpufleetError]) -> None:
    err = cls("priority must be an integer between -100 and 100, got 'high!'", field="priority")
    body = err.to_dict()
    assert body["code"] == cls.code
    assert (
        body["message"]
        == err.message
        == "priority must be an integer between -100 and 100, got 'high!'"
    )
    assert body["details"] == {"field": "priority"}
    assert str(err) == f"{cls.code}: {err.message}"
    assert "details" not in cls("plain").to_dict()


@pytest.mark.parametrize("cls", SUBCLASSES, ids=lambda cls: cls.__name__)
def test_the_module_docstring_tree_names_every_subclass_with_its_code(
    cls: type[GpufleetError],
) -> None:
    doc = errors.__doc__ or ""
    lines = [line for line in doc.splitlines() if re.search(rf"\b{cls.__name__}\b", line)]
    assert lines, f"{cls.__name__} is missing from the errors.py docstring tree"
    assert re.search(rf"\b{cls.code}\b", lines[0]), lines[0]
    status = re.search(r"\b([45]\d\d)\b", lines[0])
    if status is not None:
        assert int(status.group(1)) == cls.http_status, lines[0]


@pytest.mark.parametrize("cls", ALL, ids=lambda cls: cls.__name__)
def test_every_error_is_exported_from_the_package(cls: type[GpufleetError]) -> None:
    assert getattr(gpufleet, cls.__name__, None) is cls
    assert cls.__name__ in gpufleet.__all__


def test_every_error_class_lives_in_errors_py() -> None:
    """One place to look: the API maps exactly the classes errors.py documents."""
    import gpufleet.cli.main
    import gpufleet.queue
    import gpufleet.store  # noqa: F401

    seen: list[type[GpufleetError]] = []
    stack = [GpufleetError]
    while stack:
        cls = stack.pop()
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    strays = [
        f"{c.__module__}.{c.__qualname__}"
        for c in seen
        if c.__module__ != "gpufleet.errors" and c.__module__.startswith("gpufleet")
    ]
    assert strays == []
    assert set(seen) >= set(ALL)
