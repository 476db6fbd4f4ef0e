"""The safetensors loader and tiny-lm on CUDA: the same bytes as a CPU load, integrity
checked on the pinned-buffer path, and bf16 generation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet.errors import IntegrityError
from gpufleet.models import integrity
from gpufleet.models.demo.tiny_lm import TinyLM, generate_model_dir
from gpufleet.models.weights import load_safetensors
from tests.models.test_weights import SPECS, _bits, _write

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def _forget_digests() -> Iterator[None]:
    yield
    with integrity._lock:
        integrity._expected.clear()
        integrity._verified.clear()


@pytest.mark.parametrize("block_size", [4096, 8 << 20])
def test_cuda_load_equals_cpu_load(tmp_path: Path, block_size: int) -> None:
    path = tmp_path / "all.safetensors"
    _write(path)
    cpu = load_safetensors(path, "cpu")
    gpu = load_safetensors(path, "cuda:0", threads=4, block_size=block_size)
    assert set(gpu) == {s.name for s in SPECS}
    for name, tensor in cpu.items():
        assert gpu[name].device.type == "cuda"
        assert (gpu[name].dtype, gpu[name].shape) == (tensor.dtype, tensor.shape)
        assert torch.equal(_bits(gpu[name].cpu()), _bits(tensor)), name


def test_large_file_over_many_blocks_and_threads(tmp_path: Path) -> None:
    generate_model_dir(tmp_path / "m", 5e7, dtype="bf16", progress=False)
    path = tmp_path / "m" / "model.safetensors"
    integrity.expect({path: integrity.hash_file(path, chunk_size=4 << 20)})
    gpu = load_safetensors(path, "cuda:0", block_size=1 << 20)
    assert integrity.unverified([path]) == []
    cpu = load_safetensors(path, "cpu")
    for name, tensor in cpu.items():
        assert torch.equal(gpu[name].cpu(), tensor), name


def test_integrity_mismatch_raises_on_the_cuda_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    _write(path)
    integrity.expect({path: integrity.hash_file(path, chunk_size=256)})
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x80
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        load_safetensors(path, "cuda:0", block_size=128)
    assert integrity.unverified([path]) == [path]


def test_tiny_lm_generates_in_bf16_on_cuda(tmp_path: Path) -> None:
    generate_model_dir(tmp_path, 2e7, dtype="bf16", progress=False)
    runner = TinyLM(tmp_path)
    runner.load("cuda:0")
    runner.warmup()
    try:
        assert runner._net is not None
        assert runner._net.w["embed.weight"].dtype == torch.bfloat16
        items = [{"prompt": f"prompt {i}", "max_new_tokens": 16, "seed": i} for i in range(16)]
        outputs = runner.predict(items)
        assert all(1 <= o["tokens"] <= 16 and o["tokens_per_s"] > 0 for o in outputs)
        sampled = {"prompt": "abc", "max_new_tokens": 16, "temperature": 0.8, "seed": 5}
        first, second = runner.predict([sampled])[0], runner.predict([sampled])[0]
        assert first["text"] == second["text"]
    finally:
        runner.unload()
