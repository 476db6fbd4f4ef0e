"""The digits demo model on CUDA: same images as on CPU for the same seeds, and big batches."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from gpufleet.models.demo import DigitsRunner
from tests.models.test_demo import nearest_centroid

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_matches_cpu_and_runs_a_batch_of_256() -> None:
    inputs = [
        {"prompt": str(i % 10), "seed": i, "steps": (20, 8, 50)[i % 3], "guidance": i % 5}
        for i in range(40)
    ]
    cpu, gpu = DigitsRunner(), DigitsRunner()
    cpu.load("cpu")
    gpu.load("cuda:0")
    gpu.warmup()
    try:
        for c, g in zip(cpu.predict(inputs), gpu.predict(inputs), strict=True):
            assert (c["digit"], c["seed"], c["steps"]) == (g["digit"], g["seed"], g["steps"])
            diff = np.abs(np.subtract(c["pixels"], g["pixels"]))
            assert diff.max() <= 1, (c["seed"], diff.max())  # float32 on GPU, float64 on CPU

        big = gpu.predict([{"prompt": str(i % 10), "seed": i} for i in range(256)])
        centroids = load_file(gpu.weights_path)["centroids"]
        hits = [nearest_centroid(out["pixels"], centroids) == i % 10 for i, out in enumerate(big)]
        assert sum(hits) / len(hits) >= 0.9
        loaded = torch.cuda.memory_allocated()
    finally:
        gpu.unload()
    # The weights are about 1 MB in float32; cuBLAS's workspace stays allocated on purpose.
    assert loaded - torch.cuda.memory_allocated() >= 1_000_000
