"""The torchscript, onnx and hf loaders on ``cuda:0``: fp16, bf16 and fp8 outputs close to
fp32 on the CPU, and onnxruntime's fallback to the CPU when it has no CUDA provider."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnxruntime = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

from gpufleet.models import ItemError  # noqa: E402
from gpufleet.models.formats import fp8  # noqa: E402
from tests.models import format_fixtures as fx  # noqa: E402

LOW_PRECISIONS = [("fp16", 0.01), ("bf16", 0.05)]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("formats_gpu")
    return {
        "ts": fx.make_torchscript_dir(base / "ts"),
        "onnx": fx.make_onnx_dir(base / "onnx"),
        "lm": fx.make_hf_causal_lm_dir(base / "lm"),
        "cls": fx.make_hf_classifier_dir(base / "cls"),
    }


def loaded(model_dir: Path, device: str, **overrides: Any) -> Any:
    runner = fx.runner_from_dir(model_dir, **overrides)
    runner.load(device)
    runner.warmup()
    return runner


def fp8_tensor_cores() -> bool:
    return torch.cuda.get_device_capability(0) >= (8, 9)


def supports(precision: str) -> bool:
    return precision != "bf16" or torch.cuda.is_bf16_supported()


@pytest.mark.parametrize(("precision", "tolerance"), LOW_PRECISIONS)
def test_torchscript_on_cuda(dirs: dict[str, Path], precision: str, tolerance: float) -> None:
    if not supports(precision):
        pytest.skip(f"{precision} needs a newer GPU")
    items = [[0.1, 0.2, 0.3, 0.4], [2.0, -1.0, 0.5, 3.0], [[1.0, 0.0, 0.0, 0.0]] * 3, [1.0]]
    want = loaded(dirs["ts"], "cpu").predict(items)
    runner = loaded(dirs["ts"], "cuda:0", precision=precision)
    assert {p.device.type for p in runner._module.parameters()} == {"cuda"}
    got = runner.predict(items)
    assert isinstance(got[3], ItemError) and isinstance(want[3], ItemError)
    np.testing.assert_allclose(got[0], want[0], rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(got[2], want[2], rtol=tolerance, atol=tolerance)
    runner.unload()


def test_onnx_on_cuda_uses_the_cuda_provider_or_says_it_falls_back(
    dirs: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    has_cuda_provider = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    with caplog.at_level(logging.WARNING, logger="gpufleet.models.formats.onnx"):
        runner = loaded(dirs["onnx"], "cuda:0")
    fallback = [r for r in caplog.records if "no CUDAExecutionProvider" in r.getMessage()]
    if has_cuda_provider:
        assert runner.providers[0] == "CUDAExecutionProvider" and not fallback
    else:
        assert runner.providers == ["CPUExecutionProvider"] and len(fallback) == 1
    items = [[0.5, -1.0, 2.0, 0.25], [1.0, 2.0, 3.0, 4.0]]
    np.testing.assert_allclose(
        runner.predict(items), loaded(dirs["onnx"], "cpu").predict(items), rtol=1e-4, atol=1e-5
    )


def _first_logits(runner: Any, text: str) -> np.ndarray:
    ids = runner._loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        logits = runner.model(input_ids=ids.to(runner.model.device)).logits
    return logits.float().cpu().numpy()


# fp8 on compute capability >= 8.9 also rounds activations to fp8 (per row): on this tiny
# random model that moves logits by about 25% of their range, against 9% for weights alone.
@pytest.mark.parametrize(("precision", "tolerance"), [*LOW_PRECISIONS, ("fp8", 0.35)])
def test_causal_lm_on_cuda(dirs: dict[str, Path], precision: str, tolerance: float) -> None:
    if not supports(precision):
        pytest.skip(f"{precision} needs a newer GPU")
    cpu = loaded(dirs["lm"], "cpu")
    runner = loaded(dirs["lm"], "cuda:0", precision=precision)
    assert runner.model.device.type == "cuda"
    text = "the quick brown fox jumps"
    want, got = _first_logits(cpu, text), _first_logits(runner, text)
    assert np.abs(got - want).max() <= tolerance * np.abs(want).max()

    items = [
        {"prompt": "hello world", "max_new_tokens": 8},
        {"prompt": "once upon a time there was", "max_new_tokens": 3},
        {"prompt": "a good movie", "temperature": 1.5, "seed": 11, "max_new_tokens": 6},
        {"prompt": "x", "max_new_tokens": 0},
    ]
    outputs = runner.predict(items)
    assert isinstance(outputs[3], ItemError)
    for output, item in zip(outputs[:3], items, strict=False):
        assert 1 <= output["tokens"] <= item["max_new_tokens"]
    assert runner.predict([items[2]])[0]["text"] == outputs[2]["text"]  # seeded on CUDA too
    if precision == "fp8":
        layers = [m for m in runner.model.modules() if isinstance(m, fp8.Fp8Linear)]
        assert layers and all(m.weight.dtype == fp8.FP8 for m in layers)
        if fp8_tensor_cores():  # the fp8 matmul ran, instead of falling back to bf16
            assert torch.device("cuda:0") not in fp8._scaled_mm_failed
    runner.unload()


@pytest.mark.parametrize(("precision", "tolerance"), [*LOW_PRECISIONS, ("fp8", 0.08)])
def test_classifier_on_cuda(dirs: dict[str, Path], precision: str, tolerance: float) -> None:
    if not supports(precision):
        pytest.skip(f"{precision} needs a newer GPU")
    texts = ["a good movie with a great story", "a bad movie", "the lazy dog, hello world"]
    want = loaded(dirs["cls"], "cpu").predict([{"text": t} for t in texts])
    got = loaded(dirs["cls"], "cuda:0", precision=precision).predict([{"text": t} for t in texts])
    for full, low in zip(want, got, strict=True):
        assert low["score"] == pytest.approx(full["score"], abs=tolerance)
        if abs(full["score"] - 0.5) > tolerance:
            assert low["label"] == full["label"]


@pytest.mark.skipif(
    not torch.cuda.is_available() or not fp8_tensor_cores(), reason="needs compute capability 8.9"
)
def test_fp8_scaled_mm_matches_dequantized_matmul() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128).cuda()
    layer = fp8.Fp8Linear(linear.weight, linear.bias).cuda()
    x = torch.randn(3, 7, 256, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        fast = layer._forward_scaled_mm(x).float()
        weight = (layer.weight.float() * layer.weight_scale[:, None]).to(x.dtype)
        slow = torch.nn.functional.linear(x, weight, layer.bias.to(x.dtype)).float()
        exact = linear(x.float())
    assert fast.shape == (3, 7, 128)
    scale = exact.abs().max()
    assert (fast - slow).abs().max() <= 0.05 * scale
    assert (fast - exact).abs().max() <= 0.08 * scale
