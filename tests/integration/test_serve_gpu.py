"""On a GPU machine (``pytest -m gpu``): ``gpufleet serve`` finds the GPUs, runs two demo
workers on one GPU, and they serve tasks on CUDA."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.integration.serve_helpers import serving, wait_done

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no NVIDIA GPU here"),
]


def test_two_demo_workers_share_one_gpu(tmp_path: Path) -> None:
    env = {"CUDA_VISIBLE_DEVICES": "0"}
    with serving(tmp_path, "--workers-per-gpu", "2", env=env) as s, s.client() as c:
        deadline = time.monotonic() + 60  # ready once one worker is; wait for the second
        while time.monotonic() < deadline:
            [model] = c.get("/v1/models").json()["models"]
            if model["workers"]["ready"] == 2:
                break
            time.sleep(0.2)
        assert model["workers"] == {"ready": 2, "total": 2}
        ids = [
            c.post("/v1/tasks", json={"model": "digits",
                                      "input": {"prompt": str(i % 10), "seed": i}}).json()["id"]
            for i in range(200)
        ]  # fmt: skip
        views = wait_done(c, ids)
        assert all(v["status"] == "succeeded" for v in views.values())
        digits = [c.get(f"/v1/tasks/{i}/result").json()["result"]["digit"] for i in ids[:20]]
        assert digits == [i % 10 for i in range(20)]
        log = s.output()
    # Both workers loaded the model onto the GPU.
    assert log.count("on cuda:0") >= 2
