"""The compatibility rules against the real GPU: facts read from torch and the driver, and a
model built for another architecture refused before its weights load."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.errors import IncompatibleGpu
from gpufleet.gpu.compat import check_driver_runtime, errors
from gpufleet.gpu.device import facts_for_device
from gpufleet.models.loader import open_model
from tests.models.registry_helpers import make_scale_model

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_facts_of_the_real_gpu() -> None:
    facts = facts_for_device("cuda:0")
    major, minor = torch.cuda.get_device_capability(0)
    assert facts.capability == (major, minor)
    assert facts.name == torch.cuda.get_device_name(0)
    assert facts.driver_cuda is not None and facts.runtime_cuda is not None
    assert facts.driver_version and facts.driver_version[0].isdigit()
    assert not errors(check_driver_runtime(facts))  # this machine runs torch: they agree
    print(f"\n{facts}")


def test_a_model_for_another_architecture_is_refused_before_load(tmp_path: Path) -> None:
    major, minor = torch.cuda.get_device_capability(0)
    other = "7.5" if major >= 8 else "9.0"
    model = make_scale_model(tmp_path / "m", extra=f"  compatibility: {{arch: ['{other}']}}\n")
    runner = open_model(str(model))
    with pytest.raises(IncompatibleGpu, match="TORCH_CUDA_ARCH_LIST") as caught:
        runner.load("cuda:0")
    assert f"{major}.{minor}" in caught.value.message
    assert not hasattr(runner.runner, "scale")  # the runner's own load never ran


def test_precisions_this_gpu_supports_load(tmp_path: Path) -> None:
    major, minor = torch.cuda.get_device_capability(0)
    for precision, needed in (("fp16", (7, 0)), ("bf16", (8, 0)), ("fp8", (8, 9))):
        model = make_scale_model(tmp_path / precision, extra=f"  precision: {precision}\n")
        runner = open_model(str(model))
        if (major, minor) >= needed:
            runner.load("cuda:0")
            assert runner.predict([{"x": 1}]) == [{"y": 3.0}]
        else:
            with pytest.raises(IncompatibleGpu, match=f"precision {precision}"):
                runner.load("cuda:0")
