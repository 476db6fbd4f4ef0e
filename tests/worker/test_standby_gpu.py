"""A standby prepares a real CUDA device: context, cuBLAS and the first kernels."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpufleet.models import weights
from gpufleet.models.demo.tiny_lm import TinyLM, generate_model_dir
from gpufleet.worker.standby import prepare_device

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


def test_prepare_device_makes_the_first_matmul_fast(tmp_path: Path) -> None:
    before = torch.cuda.memory_reserved("cuda:0")  # what earlier tests left cached
    seconds = prepare_device("cuda:0")
    assert seconds > 0
    # The large matmuls' operands (up to 512 MiB each) went back to the GPU.
    assert torch.cuda.memory_reserved("cuda:0") < before + 256 * 2**20
    assert weights._reserved and weights._reserved[0].is_pinned()
    a = torch.randn(256, 256, device="cuda:0", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    a @ a
    torch.cuda.synchronize()
    assert time.perf_counter() - t0 < 0.05  # cuBLAS is already up: no second of set-up
    # The first load takes the pinned staging buffer and lets it go: none is kept.
    generate_model_dir(tmp_path, 2e6, dtype="bf16", progress=False)
    runner = TinyLM(tmp_path)
    runner.load("cuda:0")
    assert weights._reserved == []
    assert runner.predict([{"prompt": "hi", "max_new_tokens": 4, "seed": 1}])[0]["tokens"] >= 1


def test_a_standby_process_on_the_gpu_says_standby_and_leaves_on_eof() -> None:
    cmd = [sys.executable, "-m", "gpufleet.worker.process", "--standby", "--device", "cuda:0"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"})  # fmt: skip
    out, _ = proc.communicate("", timeout=120)
    assert proc.returncode == 0
    assert out.strip() == "standby"
