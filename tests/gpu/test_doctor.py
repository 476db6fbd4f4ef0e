"""The doctor's rules over whole hosts: the saved-facts fixtures (an A10 on an old driver, a T4,
V100s on old and new drivers, the lent H100) and variations of them, with models read from
model.yaml files as ``gpufleet doctor`` reads them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from gpufleet.gpu.compat import Finding, Severity
from gpufleet.gpu.discovery import HostInfo
from gpufleet.gpu.doctor import counts, diagnose, gpu_groups
from gpufleet.gpu.facts import HostFacts, HostTools, ModelCheck, Runtime
from gpufleet.models.manifest import ModelManifest

HOSTS = Path(__file__).parent / "fixtures" / "hosts"
DIGITS = ModelCheck("digits@1")  # what builtin:digits is: fp32, one whole GPU, torch


def facts(name: str) -> HostFacts:
    return HostFacts.load(HOSTS / f"{name}.json")


def run(f: HostFacts, *models: ModelCheck) -> list[Finding]:
    return diagnose(f.host, list(f.runtimes), list(models), tools=f.tools)


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity is Severity.ERROR]


def model(
    tmp_path: Path, body: str, name: str = "m", version: str = "1", form: str = "hf"
) -> ModelCheck:
    """A model.yaml in its own directory, read and validated as the CLI does."""
    path = tmp_path / f"{name}-{version}"
    path.mkdir()
    (path / "model.yaml").write_text(
        f"model:\n  name: {name}\n  version: '{version}'\n  format: {form}\n{body}"
    )
    return ModelCheck.from_spec(ModelManifest.from_yaml(path).model)


def test_every_fixture_round_trips() -> None:
    for path in sorted(HOSTS.glob("*.json")):
        loaded = HostFacts.load(path)
        assert HostFacts.from_dict(loaded.to_dict()) == loaded, path.name
        assert loaded.host.gpus and loaded.runtimes, path.name


def test_a10_on_driver_515_with_a_cu121_torch(tmp_path: Path) -> None:
    fp16 = model(tmp_path, "  precision: fp16\n", "a")
    found = run(facts("a10-driver515-cu121"), DIGITS, fp16)
    [error] = errors(found)  # once for the host, not once per model or GPU
    assert error.check == "cuda.driver_older_than_runtime"
    assert error.subject == "driver 515.65.01"
    assert "torch 2.5.1+cu121 is built for CUDA 12.1" in error.found
    assert "supports CUDA up to 11.7" in error.found
    assert "pick a base image / wheel built for CUDA 11.x" in error.fix


def test_t4_refuses_bf16_with_the_fp16_remedy(tmp_path: Path) -> None:
    t4 = facts("t4-driver535")
    bf16 = model(tmp_path, "  precision: bf16\n", "llm")
    [error] = errors(run(t4, bf16))
    assert error.check == "precision.bf16" and error.fix == "set precision: fp16"
    assert error.subject == "llm@1 on GPU 0 Tesla T4"
    assert "compute capability 7.5" in error.found
    fp16 = model(tmp_path, "  precision: fp16\n", "llm", "2")
    ok = run(t4, fp16)
    assert not errors(ok) and counts(ok) == (0, 0)
    assert [f.found for f in ok if f.check == "model.ok"] == [
        "1 whole GPU, fp16: fits GPU 0 Tesla T4"
    ]


MPS = "  resources: {gpu: {mode: mps, memory_gb: 6, compute_percent: 50}}\n"


def test_v100_on_a_cuda_11_4_driver_cannot_limit_mps_memory(tmp_path: Path) -> None:
    [error] = errors(run(facts("v100-driver470"), model(tmp_path, MPS)))
    assert error.check == "mps.memory_limit"
    assert "CUDA >= 11.5" in error.why and "11.4" in error.found
    assert "R495" in error.fix and "mode fraction" in error.fix


def test_v100_on_a_new_driver_runs_mps(tmp_path: Path) -> None:
    found = run(facts("v100-driver535"), model(tmp_path, MPS))
    assert counts(found) == (0, 0)
    advice = next(f for f in found if f.check == "sharing.mps_compute_mode")
    assert advice.severity is Severity.INFO and "EXCLUSIVE_PROCESS" in advice.fix


def test_the_lent_h100_has_nothing_wrong() -> None:
    h100 = facts("h100-driver580-cu130")
    assert h100.host.driver_version == "580.159.04" and h100.host.driver_cuda == (13, 0)
    assert h100.runtimes[0].name == "torch 2.11.0+cu130" and h100.runtimes[0].cuda == (13, 0)
    found = run(h100, DIGITS)
    assert counts(found) == (0, 0)
    assert [(f.check, f.subject) for f in found] == [
        ("host.driver", "host"),
        ("host.gpu", "GPU 0 NVIDIA H100 80GB HBM3"),
        ("model.ok", "digits@1"),
    ]


def test_the_h100_runs_fp8_and_cuda_13_models_and_refuses_a_cuda_12_build(tmp_path: Path) -> None:
    h100 = facts("h100-driver580-cu130")
    fp8 = model(tmp_path, "  precision: fp8\n  compatibility: {cuda: '>=12.8', arch: ['9.0']}\n")
    assert not errors(run(h100, fp8))
    old = model(tmp_path, "  compatibility: {cuda: '>=12.2,<13', arch: ['8.0', '8.6']}\n", "o")
    checks = sorted(f.check for f in errors(run(h100, old)))
    assert checks == ["model.arch", "model.cuda_range"]


def test_a_gpu_newer_than_the_torch_build_is_refused() -> None:
    t4 = facts("t4-driver535")
    blackwell = replace(t4.host.gpus[0], name="NVIDIA RTX PRO 6000", capability=(12, 0))
    host = replace(t4.host, gpus=[blackwell], driver_cuda=(12, 8))
    [error] = errors(diagnose(host, list(t4.runtimes), []))
    assert error.check == "cuda.runtime_arch" and "sm_120" in error.fix
    with_ptx = Runtime("torch 2.3.1+cu121", (12, 1), ("sm_80", "sm_90", "compute_90"))
    assert not errors(diagnose(host, [with_ptx], []))
    hopper_only = Runtime("x 1", (12, 1), ("sm_90a",))
    assert errors(diagnose(host, [hopper_only], []))


def _host(base: HostInfo, n: int, **gpu: object) -> HostInfo:
    gpus = [replace(base.gpus[0], index=i, uuid=f"GPU-{i}", **gpu) for i in range(n)]
    return replace(base, gpus=gpus)


def test_identical_gpus_are_checked_once(tmp_path: Path) -> None:
    t4 = facts("t4-driver535")
    host = _host(t4.host, 4)
    assert [label for label, _ in gpu_groups(host)] == ["GPU 0-3 Tesla T4"]
    bf16 = model(tmp_path, "  precision: bf16\n")
    [error] = errors(diagnose(host, list(t4.runtimes), [bf16]))
    assert error.subject == "m@1 on GPU 0-3 Tesla T4"


def test_mig_gpus_are_skipped_and_an_error_only_when_none_is_left(tmp_path: Path) -> None:
    h100 = facts("h100-driver580-cu130")
    mixed = _host(h100.host, 2)
    mixed.gpus[1].mig_mode = True
    found = diagnose(mixed, list(h100.runtimes), [DIGITS])
    assert not errors(found)
    [skip] = [f for f in found if f.check == "sharing.mig"]
    assert skip.severity is Severity.INFO and "It runs on the other GPUs." in skip.why
    all_mig = _host(h100.host, 2, mig_mode=True)
    [error] = errors(diagnose(all_mig, list(h100.runtimes), [DIGITS]))
    assert error.check == "sharing.mig" and "-mig 0" in error.fix


def test_compute_modes(tmp_path: Path) -> None:
    h100 = facts("h100-driver580-cu130")
    rts = list(h100.runtimes)
    prohibited = _host(h100.host, 1, compute_mode="prohibited")
    [error] = errors(diagnose(prohibited, rts, [DIGITS]))
    assert error.check == "sharing.prohibited" and "-c DEFAULT" in error.fix
    exclusive = _host(h100.host, 1, compute_mode="exclusive_process")
    fraction = model(
        tmp_path, "  resources: {gpu: {mode: fraction, memory_gb: 8, compute_percent: 25}}\n"
    )
    found = diagnose(exclusive, rts, [fraction])
    assert counts(found) == (0, 1)
    [warning] = [f for f in found if f.severity is Severity.WARNING]
    assert warning.check == "sharing.exclusive_process" and "mode mps" in warning.fix
    mps = model(tmp_path, MPS, "p")
    found = diagnose(exclusive, rts, [mps], tools=h100.tools)
    assert counts(found) == (0, 0)
    [note] = [f for f in found if f.check == "sharing.exclusive_process"]
    assert note.severity is Severity.INFO and "recommends with MPS" in note.why


def test_mps_needs_volta_and_its_control_program(tmp_path: Path) -> None:
    t4 = facts("t4-driver535")
    p100 = _host(t4.host, 1, name="Tesla P100-PCIE-16GB", capability=(6, 0))
    first, second = model(tmp_path, MPS, "a"), model(tmp_path, MPS, "b")
    found = diagnose(p100, list(t4.runtimes), [first, second], tools=HostTools())
    checks = [f.check for f in errors(found)]
    assert checks.count("mps.control_missing") == 1  # a host fact: once for both models
    assert checks.count("mps.volta") == 2
    [missing] = [f for f in found if f.check == "mps.control_missing"]
    assert "a@1, b@1" in missing.found and "nvidia-cuda-mps-control" in missing.found


def test_a_share_larger_than_the_gpu_and_more_gpus_than_the_host(tmp_path: Path) -> None:
    t4 = facts("t4-driver535")
    big = model(
        tmp_path, "  resources: {gpu: {mode: fraction, memory_gb: 24, compute_percent: 50}}\n"
    )
    [error] = errors(run(t4, big))
    assert error.check == "model.memory" and "15.0 GiB" in error.found and "at most 15" in error.fix
    two = model(tmp_path, "  resources: {gpu: {mode: whole, count: 2}}\n", "two")
    [error] = errors(run(t4, two))
    assert error.check == "model.gpu_count" and "1 it can use" in error.found
    peak = model(tmp_path, "  metrics: {vram_peak_gb: 20}\n", "peak")
    [warning] = [f for f in run(t4, peak) if f.severity is Severity.WARNING]
    assert warning.check == "model.vram_peak"


def test_the_driver_rule_is_reported_once_for_the_host(tmp_path: Path) -> None:
    a10 = facts("a10-driver515-cu121")
    models = [model(tmp_path, "", f"m{i}") for i in range(3)]
    found = diagnose(_host(a10.host, 2, name="NVIDIA A10G"), list(a10.runtimes), models)
    assert [f.check for f in errors(found)] == ["cuda.driver_older_than_runtime"]


def test_runtimes_without_cuda(tmp_path: Path) -> None:
    t4 = facts("t4-driver535")
    cpu_torch = [Runtime("torch 2.13.0+cpu")]
    found = diagnose(t4.host, cpu_torch, [DIGITS])
    [warning] = [f for f in found if f.severity is Severity.WARNING]
    assert warning.check == "runtime.no_cuda" and "cu122" in warning.fix
    onnx = model(tmp_path, "", "o", form="onnx")
    assert onnx.runtime == "onnxruntime"
    found = diagnose(t4.host, list(t4.runtimes), [onnx])
    assert [f.found for f in found if f.check == "runtime.no_cuda"] == [
        "no CUDA build of onnxruntime found"
    ]


def test_a_host_without_gpus(tmp_path: Path) -> None:
    none = HostInfo(gpus=[], error="no NVIDIA driver: the NVML library is not installed")
    fp16 = model(tmp_path, "  precision: fp16\n")
    found = diagnose(none, [], [DIGITS, fp16])
    assert counts(found) == (0, 1)  # fp16 on a CPU: slow, not wrong
    assert found[0].check == "host.no_gpu" and found[0].severity is Severity.INFO
    assert any(f.check == "model.ok" and "CPU slots" in f.found for f in found)


@pytest.mark.parametrize(
    ("error", "fix"),
    [
        (
            "the NVIDIA kernel module and libnvidia-ml differ in version (a driver upgrade without "
            "a reboot): reload the nvidia module or reboot",
            "reboot the host",
        ),
        ("NVML failed to start: Driver/library version mismatch", "reboot the host"),
        ("NVML cannot open GPU 1: GPU is lost", "drain the GPU"),
    ],
)
def test_nvml_failing_where_there_are_gpus_is_an_error(error: str, fix: str) -> None:
    host = HostInfo(gpus=[], error=error, source="none")
    tools = HostTools("/usr/bin/nvidia-smi", None, ("/dev/nvidia0",))
    [finding] = diagnose(host, [], [], tools=tools)
    assert finding.severity is Severity.ERROR and finding.check == "host.nvml"
    assert error in finding.found and "/dev/nvidia0" in finding.why and fix in finding.fix


def test_facts_file_errors_are_readable(tmp_path: Path) -> None:
    from gpufleet.errors import InvalidInput

    with pytest.raises(InvalidInput, match="cannot read facts file"):
        HostFacts.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text('{"gpus": []}')
    with pytest.raises(InvalidInput, match="not a gpufleet doctor facts file"):
        HostFacts.load(tmp_path / "x.json")
