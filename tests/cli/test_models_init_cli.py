"""``gpufleet models init``: each template writes a directory that validate passes (its
model really built, loaded and run); mistakes are one line and exit code 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture
def cli(models_cli: Any) -> Any:
    return models_cli


@pytest.mark.parametrize(
    ("template", "files"),
    [
        ("python", ["model.yaml", "runner.py"]),
        ("torchscript", ["model.pt", "model.yaml"]),
        ("onnx", ["model.onnx", "model.yaml"]),
        ("hf", ["config.json", "model.safetensors", "model.yaml", "tokenizer.json"]),
    ],
)
def test_each_template_validates_as_written(
    cli: Any, tmp_path: Path, template: str, files: list[str]
) -> None:
    target = tmp_path / "models" / f"my-{template}"
    out = cli("init", f"my-{template}", "--template", template, "--dir", str(target), "--json")
    assert out.exit_code == 0, out.output
    written = json.loads(out.stdout)
    assert set(files) <= set(written["files"]) and written["path"] == str(target)
    manifest = yaml.safe_load((target / "model.yaml").read_text())["model"]
    assert (manifest["name"], manifest["format"]) == (f"my-{template}", template)
    assert "# " in (target / "model.yaml").read_text()  # explained, field by field
    checked = cli("validate", str(target))
    assert checked.exit_code == 0, checked.output
    assert "loaded on cpu, predict answered the example_input" in checked.output


def test_the_python_template_explains_the_contract(cli: Any, tmp_path: Path) -> None:
    assert cli("init", "shout", "--dir", str(tmp_path / "shout")).exit_code == 0
    code = (tmp_path / "shout" / "runner.py").read_text()
    for words in (
        "class Shout(Model)",
        "input_model = ShoutInput",
        "def load(self, device",
        "def warmup",
        "ItemError",
        "unload",
    ):
        assert words in code, words


def test_mistakes_are_one_line(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    cases = [
        (("init", "taken", "--dir", str(tmp_path / "taken")), "conflict: "),
        (("init", "Bad!", "--dir", str(tmp_path / "bad")), "is not a model name"),
        (("init", "m", "--template", "tf", "--dir", str(tmp_path / "m")), "unknown template"),
    ]
    # A module that is None in sys.modules cannot be imported: as if onnxruntime were absent.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    cases.append(
        (
            ("init", "o", "--template", "onnx", "--dir", str(tmp_path / "o")),
            "the onnx template needs onnxruntime: pip install 'gpufleet[onnx]' "
            "(from a checkout: pip install -e '.[onnx]')",
        )
    )
    for args, words in cases:
        out = cli(*args)
        assert out.exit_code == 1, out.output
        assert len(out.output.strip().splitlines()) == 1 and words in out.output, out.output
    assert (tmp_path / "taken" / "x").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing half-written
