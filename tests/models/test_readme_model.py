"""The README's "Your model" example works as printed: its runner.py and model.yaml, copied
out of the README, pass validate, and predict gives the output the README shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gpufleet.models.directory import load_model_dir
from gpufleet.models.validation import try_model_dir

README = Path(__file__).resolve().parents[2] / "README.md"


def section_blocks() -> dict[str, str]:
    text = README.read_text()
    section = text.split("### Your model\n", 1)[1].split("\n### ", 1)[0]
    return {lang: body for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, re.S)}


def test_the_readme_model_validates_and_answers_as_shown(tmp_path: Path) -> None:
    blocks = section_blocks()
    model = tmp_path / "word-count"
    model.mkdir()
    (model / "runner.py").write_text(blocks["python"])
    (model / "model.yaml").write_text(blocks["yaml"])
    trial = try_model_dir(model)
    assert trial.ok and trial.device == "cpu" and trial.predicted == 2, trial
    match = re.search(r"--input '(.*?)' --wait\n# (.*)\n", blocks["sh"])
    assert match is not None, blocks["sh"]
    submit, shown = match.groups()
    runner = load_model_dir(model)
    runner.load("cpu")
    assert runner.predict([json.loads(submit)]) == [json.loads(shown)]
