"""Loading model directories (model.yaml + a python runner) and the built-in models."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gpufleet.errors import InvalidInput
from gpufleet.models import ModelRunner
from gpufleet.models.demo import DigitsRunner
from gpufleet.models.directory import builtin_models, load_model_dir

RUNNER_FILE = """
from pathlib import Path

from gpufleet.models import Batching, ModelInfo


class EchoRunner:
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self.info = ModelInfo(name="echo-from-code", version="0", description="echoes")
        self.batching = Batching(max_batch_size=4, max_queue_delay_ms=1)

    def load(self, device: str) -> None:
        self.device = device

    def warmup(self) -> None:
        pass

    def predict(self, inputs):
        return [{"echo": x, "dir": self.model_dir.name} for x in inputs]


class NoArgRunner(EchoRunner):
    def __init__(self) -> None:
        super().__init__(Path("none"))


class NotARunner:
    info = None
"""

MODEL_YAML = """
model:
  name: echo
  version: 1.4.2
  format: python
  runtime: python:runner.py:EchoRunner
  description: Echo for tests
  batching: {max_batch_size: 16, max_queue_delay_ms: 10}
  files: [{path: runner.py}]
promote:
  tests: [smoke]
"""


def model_dir(tmp_path: Path, yaml_text: str = MODEL_YAML) -> Path:
    (tmp_path / "runner.py").write_text(RUNNER_FILE)
    (tmp_path / "model.yaml").write_text(textwrap.dedent(yaml_text))
    return tmp_path


def test_loads_a_python_runner_file(tmp_path: Path) -> None:
    runner = load_model_dir(model_dir(tmp_path))
    assert isinstance(runner, ModelRunner)
    assert (runner.info.name, runner.info.version) == ("echo", "1.4.2")
    assert runner.info.description == "Echo for tests"
    assert (runner.batching.max_batch_size, runner.batching.max_queue_delay_ms) == (16, 10)
    runner.load("cpu")
    assert runner.predict([1, "a"]) == [
        {"echo": 1, "dir": tmp_path.name},
        {"echo": "a", "dir": tmp_path.name},
    ]


def test_partial_batching_keeps_the_runner_defaults_and_int_versions_are_text(
    tmp_path: Path,
) -> None:
    yaml_text = MODEL_YAML.replace("1.4.2", "2").replace(
        "{max_batch_size: 16, max_queue_delay_ms: 10}", "{max_batch_size: 8}"
    )
    runner = load_model_dir(model_dir(tmp_path, yaml_text))
    assert runner.info.version == "2"
    assert (runner.batching.max_batch_size, runner.batching.max_queue_delay_ms) == (8, 1)


def test_constructor_without_arguments(tmp_path: Path) -> None:
    runner = load_model_dir(model_dir(tmp_path, MODEL_YAML.replace("EchoRunner", "NoArgRunner")))
    runner.load("cpu")
    assert runner.predict([0]) == [{"echo": 0, "dir": "none"}]


def test_module_runtime_gets_the_model_directory(tmp_path: Path) -> None:
    yaml_text = MODEL_YAML.replace(
        "runner.py:EchoRunner", "gpufleet.models.demo.runner:DigitsRunner"
    ).replace("name: echo", "name: my-digits")
    (tmp_path / "digits.safetensors").write_bytes(DigitsRunner().weights_path.read_bytes())
    runner = load_model_dir(model_dir(tmp_path, yaml_text))
    assert isinstance(runner, DigitsRunner)
    assert runner.weights_path.parent == tmp_path
    assert runner.info.name == "my-digits"
    runner.load("cpu")
    assert runner.predict([{"prompt": "5", "steps": 2}])[0]["digit"] == 5


def test_builtin_models() -> None:
    runner = builtin_models()["digits"]()
    assert isinstance(runner, DigitsRunner)
    assert runner.info.name == "digits"


@pytest.mark.parametrize(
    ("yaml_text", "words"),
    [
        ("model: [unclosed", "is not valid YAML"),
        ("- just\n- a list\n", "(top level): must be a mapping"),
        ("promote: {}\n", "model: required"),
        (MODEL_YAML.replace("  name: echo\n", ""), "model.name: required"),
        (MODEL_YAML.replace("1.4.2", "1.10"), "model.version: quote the version"),
        (MODEL_YAML.replace("name: echo", "name: Echo!"), "model.name: 'Echo!' is not allowed"),
        (MODEL_YAML.replace("  description", "  descripton"), "model.descripton: unknown key"),
        (MODEL_YAML.replace("format: python", "format: tensorflow"), "model.format: Input should"),
        (MODEL_YAML.replace("format: python", "format: onnx"), "runtime only applies to format"),
        (MODEL_YAML.replace("  runtime: python:runner.py:EchoRunner\n", ""), "needs runtime"),
        (MODEL_YAML.replace("python:runner.py", "java:runner.py"), "expected 'python:"),
        (MODEL_YAML.replace("runner.py:", "missing.py:"), "cannot import 'missing.py'"),
        (MODEL_YAML.replace("runner.py:", "../runner.py:"), "outside the model directory"),
        (MODEL_YAML.replace("runner.py:", "no_such_pkg.mod:"), "No module named 'no_such_pkg'"),
        (MODEL_YAML.replace("EchoRunner", "Nope"), "has no class 'Nope'"),
        (MODEL_YAML.replace("EchoRunner", "NotARunner"), "does not implement gpufleet.ModelRunner"),
        (MODEL_YAML.replace("max_batch_size: 16", "max_batch_size: 0"), "greater than or equal"),
        (MODEL_YAML.replace("max_batch_size: 16", "max_batch_size: 2000"), "max_batch_size: In"),
    ],
)
def test_bad_model_yaml_says_which_file_and_field(
    tmp_path: Path, yaml_text: str, words: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        load_model_dir(model_dir(tmp_path, yaml_text))
    assert str(tmp_path / "model.yaml") in caught.value.message
    assert words in caught.value.message


def test_missing_model_yaml(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"model\.yaml not found"):
        load_model_dir(tmp_path)


def test_runner_file_that_fails_to_import(tmp_path: Path) -> None:
    model_dir(tmp_path)
    (tmp_path / "runner.py").write_text("raise RuntimeError('weights missing')\n")
    with pytest.raises(InvalidInput, match=r"model\.runtime: cannot import.*weights missing"):
        load_model_dir(tmp_path)
