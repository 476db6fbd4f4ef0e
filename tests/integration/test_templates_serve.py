"""``gpufleet models init`` directories serve as written: one real ``gpufleet serve`` on
loopback with a model of every template, each answering its own example input."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.models.templates import TEMPLATES, write_template
from tests.integration.serve_helpers import serving, wait_done

pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")


@pytest.mark.slow  # four workers import torch, onnxruntime and transformers
def test_every_template_serves_its_example(tmp_path: Path) -> None:
    args = []
    for template in TEMPLATES:
        write_template(f"new-{template}", template, tmp_path / f"new-{template}")
        args += ["--model", str(tmp_path / f"new-{template}")]
    with serving(tmp_path / "data", *args) as s, s.client() as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert set(models) == {f"new-{t}" for t in TEMPLATES}
        ids = {}
        for name, model in models.items():
            task = {"model": name, "input": model["example_input"]}
            ids[c.post("/v1/tasks", json=task).json()["id"]] = name
        views = wait_done(c, list(ids), timeout=300)  # four workers start: torch, transformers
        assert {v["status"] for v in views.values()} == {"succeeded"}, views
        results = {ids[i]: c.get(f"/v1/tasks/{i}/result").json()["result"] for i in ids}
    assert results["new-python"] == {"words": 2, "shouted": "HELLO WORLD"}
    assert len(results["new-torchscript"]) == 3 and len(results["new-onnx"]) == 3
    assert results["new-hf"]["label"] in ("negative", "positive")
    assert 0.5 <= results["new-hf"]["score"] <= 1
