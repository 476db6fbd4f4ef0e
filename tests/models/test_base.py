"""The model contract: a class with ``predict`` (the ``Model`` base, a plain class, or a
``ModelRunner`` subclass) gets its name, version, batching, schema and example from
model.yaml."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import gpufleet
from gpufleet.errors import InvalidInput
from gpufleet.models import Batching, Model, ModelRunner
from gpufleet.models.directory import load_model_dir
from gpufleet.models.input_check import input_check

RUNNERS = """
from pydantic import BaseModel, Field

from gpufleet import Model, ModelRunner
from gpufleet.models import Batching


class Text(BaseModel):
    text: str = Field(max_length=10)


class Reverse(Model):
    input_model = Text
    batching = Batching(max_batch_size=4, max_queue_delay_ms=2)  # a default model.yaml may change

    def predict(self, inputs):
        return [{"reversed": self.parse(x).text[::-1], "dir": self.model_dir.name} for x in inputs]


class Plain:
    def predict(self, inputs):
        return [len(str(x)) for x in inputs]


class FromProtocol(ModelRunner):
    def predict(self, inputs):
        return [x for x in inputs]


class ProtocolNoPredict(ModelRunner):
    pass


class BaseNoPredict(Model):
    pass


class BadInputModel(Model):
    input_model = dict

    def predict(self, inputs):
        return inputs
"""


def model_dir(tmp_path: Path, runtime: str, extra: str = "") -> Path:
    (tmp_path / "runner.py").write_text(RUNNERS)
    (tmp_path / "model.yaml").write_text(
        textwrap.dedent(f"""\
            model:
              name: contract
              version: "1.0"
              format: python
              runtime: python:runner.py:{runtime}
            """)
        + extra
    )
    return tmp_path


def test_the_base_class_gets_info_from_model_yaml_and_schema_from_its_input_model(
    tmp_path: Path,
) -> None:
    extra = "  description: reverses\n  example_input: {text: abc}\n"
    runner = load_model_dir(model_dir(tmp_path, "Reverse", extra))
    assert isinstance(runner, Model) and isinstance(runner, ModelRunner)
    assert (runner.info.name, runner.info.version, runner.info.description) == (
        "contract",
        "1.0",
        "reverses",
    )
    assert runner.info.example_input == {"text": "abc"}
    assert runner.info.input_schema["properties"]["text"]["maxLength"] == 10
    assert runner.batching == Batching(max_batch_size=4, max_queue_delay_ms=2)
    runner.load("cpu")
    runner.warmup()
    assert runner.predict([{"text": "abc"}]) == [{"reversed": "cba", "dir": tmp_path.name}]
    assert runner.device == "cpu"  # type: ignore[attr-defined]
    check = input_check("contract", runner.info.input_schema)
    assert check is not None
    with pytest.raises(InvalidInput, match=r"input\.text: 'much too long' is too long"):
        check({"text": "much too long"})


def test_model_yaml_overrides_class_defaults(tmp_path: Path) -> None:
    extra = (
        "  batching: {max_batch_size: 8}\n"
        "  input_schema: {type: object, required: [text], properties: {text: {type: string}}}\n"
    )
    runner = load_model_dir(model_dir(tmp_path, "Reverse", extra))
    assert runner.batching == Batching(max_batch_size=8, max_queue_delay_ms=2)
    assert runner.info.input_schema["required"] == ["text"]
    assert "maxLength" not in runner.info.input_schema["properties"]["text"]


@pytest.mark.parametrize("runtime", ["Plain", "FromProtocol"])
def test_a_class_with_only_predict_serves(tmp_path: Path, runtime: str) -> None:
    runner = load_model_dir(model_dir(tmp_path, runtime, "  example_input: hello\n"))
    assert runner.info.name == "contract" and runner.info.example_input == "hello"
    assert runner.batching == Batching()
    runner.load("cpu")
    runner.warmup()
    assert runner.predict(["hello", "x"]) == ([5, 1] if runtime == "Plain" else ["hello", "x"])


@pytest.mark.parametrize(
    ("runtime", "words"),
    [
        ("ProtocolNoPredict", "has no predict(self, inputs) method"),
        ("BaseNoPredict", "has no predict(self, inputs) method"),
        ("BadInputModel", "input_model must be a pydantic BaseModel subclass"),
    ],
)
def test_a_class_that_breaks_the_contract_is_named(
    tmp_path: Path, runtime: str, words: str
) -> None:
    with pytest.raises(InvalidInput, match=r"model\.runtime") as caught:
        load_model_dir(model_dir(tmp_path, runtime))
    assert words in caught.value.message and runtime in caught.value.message


def test_an_input_schema_that_is_not_json_schema_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"model\.input_schema: not valid JSON Schema"):
        load_model_dir(model_dir(tmp_path, "Plain", "  input_schema: {type: strnig}\n"))


def test_the_contract_is_exported_lazily_from_gpufleet() -> None:
    assert gpufleet.Model is Model and gpufleet.ModelRunner is ModelRunner
    assert {"Model", "ModelRunner", "ItemError"} <= set(gpufleet.__all__)
