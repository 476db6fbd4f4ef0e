"""A worker process that dies on a CUDA failure: ``gpufleet serve`` hands its task back at
once (not when the lease runs out), with the failure explained, and restarts the worker."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.serve_helpers import serving, wait_done

pytestmark = pytest.mark.slow  # a real gpufleet serve and its workers

RUNNER = """
import os
import sys

from gpufleet.models import Batching, ModelInfo


class CrashRunner:
    def __init__(self, model_dir):
        self.info = ModelInfo(name="crashy", version="0")
        self.batching = Batching(max_batch_size=1)

    def load(self, device):
        pass

    def warmup(self):
        pass

    def predict(self, inputs):
        if inputs[0].get("crash"):
            # What a CUDA library prints before it aborts the process.
            print("terminate called after throwing an instance of 'c10::Error'", file=sys.stderr)
            print("  what():  CUDA error: an illegal memory access was encountered",
                  file=sys.stderr, flush=True)
            os._exit(134)
        return [{"ok": True, "pid": os.getpid()}]
"""


def _model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "runner.py").write_text(RUNNER)
    (path / "model.yaml").write_text(
        "model:\n  name: crashy\n  version: '1'\n  format: python\n"
        "  runtime: python:runner.py:CrashRunner\n"
        "  batching: {max_batch_size: 1, max_queue_delay_ms: 0}\n"
    )
    return path


def test_a_crashed_workers_task_comes_back_at_once_with_the_reason(tmp_path: Path) -> None:
    model = _model(tmp_path / "m")
    # A long lease: only the supervisor's hand-back can end the task within the test.
    env = {"GPUFLEET_LEASE_S": "600"}
    with serving(tmp_path / "d", "--model", str(model), env=env) as s, s.client() as c:
        [pid] = s.workers()
        started = time.monotonic()
        tid = c.post(
            "/v1/tasks", json={"model": "crashy", "input": {"crash": True}, "max_attempts": 1}
        ).json()["id"]
        view = wait_done(c, [tid], timeout=30)[tid]
        took = time.monotonic() - started
        assert view["status"] == "failed", view
        error = view["error"]
        assert error["code"] == "worker_died"
        assert "exited with 134" in error["message"]
        assert "a kernel faulted" in error["message"]
        assert "Fix: the worker restarts" in error["message"]
        assert "(attempt 1 of 1)" in error["message"]
        assert took < 20  # not the 600 s lease
        # The worker was restarted and serves again.
        tid2 = c.post("/v1/tasks", json={"model": "crashy", "input": {}}).json()["id"]
        assert wait_done(c, [tid2], timeout=60)[tid2]["status"] == "succeeded"
        assert s.workers() and s.workers() != [pid]
        log = s.output()
    assert "CUDA error: an illegal memory access was encountered" in log  # passed through
