"""Trying a model in a child process before it is packaged: each kind of problem, found by
really building, loading and calling the model."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gpufleet.models.validation import try_model_dir

RUNNERS = """
import os
import time

import numpy as np

from gpufleet import ItemError, Model


class Good(Model):
    def predict(self, inputs):
        return [{"n": len(x["text"])} for x in inputs]


def read_weights(path):
    return open(path / "weights.bin", "rb").read()


class NoWeights(Model):
    def __init__(self, model_dir):
        super().__init__(model_dir)
        self.weights = read_weights(model_dir)

    def predict(self, inputs):
        return inputs


class OneForAll(Model):
    def predict(self, inputs):
        return [{"n": len(inputs)}]


class Raises(Model):
    def predict(self, inputs):
        return [x["missing"] for x in inputs]


class Refuses(Model):
    def predict(self, inputs):
        return [ItemError("refused", "no thanks") for _ in inputs]


class NotJson(Model):
    def predict(self, inputs):
        return [np.float32(1.5) for _ in inputs]


class GpuOnly(Model):
    def load(self, device):
        if device == "cpu":
            raise RuntimeError("needs CUDA")

    def predict(self, inputs):
        return inputs


class Exits(Model):
    def load(self, device):
        print("bye from the model")
        os._exit(3)

    def predict(self, inputs):
        return inputs


class Hangs(Model):
    def load(self, device):
        time.sleep(600)

    def predict(self, inputs):
        return inputs
"""

SCHEMA = "{type: object, required: [text], properties: {text: {type: string}}}"


def model_dir(tmp_path: Path, runtime: str, extra: str = "") -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "runner.py").write_text(RUNNERS)
    (tmp_path / "model.yaml").write_text(
        textwrap.dedent(f"""\
            model:
              name: tried
              version: "1"
              format: python
              runtime: python:runner.py:{runtime}
              batching: {{max_batch_size: 4}}
            """)
        + extra
    )
    return tmp_path


EXAMPLE = f"  example_input: {{text: hello}}\n  input_schema: {SCHEMA}\n"


def test_a_good_model_is_loaded_on_cpu_and_answers_its_example(tmp_path: Path) -> None:
    trial = try_model_dir(model_dir(tmp_path, "Good", EXAMPLE))
    assert trial.ok, trial.problems
    assert (trial.device, trial.predicted, trial.notes) == ("cpu", 2, [])


def test_without_an_example_predict_is_not_tried_and_a_note_says_so(tmp_path: Path) -> None:
    trial = try_model_dir(model_dir(tmp_path, "Good"))
    assert trial.ok and trial.device == "cpu" and trial.predicted == 0
    assert "add model.example_input" in trial.notes[0]


@pytest.mark.parametrize(
    ("runtime", "extra", "where", "words"),
    [
        ("Missing", EXAMPLE, "model.runtime", "'runner.py' has no class 'Missing'"),
        ("OneForAll", EXAMPLE, "predict", "returned 1 outputs for a batch of 2 input(s)"),
        ("Raises", EXAMPLE, "predict", "raised KeyError: 'missing' on a batch of 1"),
        ("Refuses", EXAMPLE, "model.example_input", "predict failed the example: refused"),
        ("NotJson", EXAMPLE, "predict", "its output is not a JSON value"),
        (
            "Good",
            f"  example_input: {{txt: hello}}\n  input_schema: {SCHEMA}\n",
            "model.example_input",
            "breaks the model's input_schema: input: 'text' is a required property",
        ),
    ],
)
def test_each_problem_names_its_place(
    tmp_path: Path, runtime: str, extra: str, where: str, words: str
) -> None:
    trial = try_model_dir(model_dir(tmp_path, runtime, extra))
    assert [p.where for p in trial.problems] == [where]
    assert words in trial.problems[0].message


def test_a_missing_runtime_file_is_a_problem(tmp_path: Path) -> None:
    model = model_dir(tmp_path, "Good", EXAMPLE)
    (model / "runner.py").unlink()
    [problem] = try_model_dir(model).problems
    assert problem.where == "model.runtime" and "cannot import 'runner.py'" in problem.message


def test_a_constructor_error_shows_the_models_frames_only(tmp_path: Path) -> None:
    [problem] = try_model_dir(model_dir(tmp_path, "NoWeights", EXAMPLE)).problems
    assert problem.where == "model.runtime"
    assert "creating python:runner.py:NoWeights failed: FileNotFoundError" in problem.message
    frames = problem.traceback.splitlines()
    assert frames[0].startswith('  File "runner.py", line') and "__init__" in frames[0]
    assert "in read_weights" in problem.traceback
    assert "gpufleet" not in problem.traceback  # the loader's frames are left out
    assert frames[-1].startswith("FileNotFoundError:")


def test_a_gpu_model_that_cannot_load_on_cpu_is_noted_not_failed(tmp_path: Path) -> None:
    trial = try_model_dir(model_dir(tmp_path, "GpuOnly", EXAMPLE))
    assert trial.ok and trial.device is None
    assert "asks for a GPU (resources.gpu.mode whole) while none is here" in trial.notes[0]
    cpu_only = model_dir(tmp_path, "GpuOnly", EXAMPLE + "  resources: {gpu: {mode: none}}\n")
    [problem] = try_model_dir(cpu_only).problems
    assert problem.where == "load" and "RuntimeError: needs CUDA" in problem.message


def test_a_model_that_exits_or_hangs_is_stopped_and_reported(tmp_path: Path) -> None:
    [exited] = try_model_dir(model_dir(tmp_path / "a", "Exits", EXAMPLE)).problems
    assert "exited with code 3" in exited.message and "bye from the model" in exited.traceback
    [hung] = try_model_dir(model_dir(tmp_path / "b", "Hangs", EXAMPLE), timeout=3).problems
    assert "took more than 3 s" in hung.message
