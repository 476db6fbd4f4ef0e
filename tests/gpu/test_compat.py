"""The compatibility rules, on the devices the seeds name: each finding says what, why, fix."""

from __future__ import annotations

from gpufleet.gpu.compat import (
    DeviceFacts,
    Severity,
    check_arch,
    check_cuda_range,
    check_driver_runtime,
    check_model,
    check_precision,
    errors,
    parse_version,
)

T4 = DeviceFacts("cuda", "Tesla T4", (7, 5), "535.104", (12, 2), (12, 1))
V100 = DeviceFacts("cuda", "Tesla V100-SXM2-16GB", (7, 0), "535.104", (12, 2), (12, 1))
P100 = DeviceFacts("cuda", "Tesla P100", (6, 0), "535.104", (12, 2), (12, 1))
H100 = DeviceFacts("cuda", "NVIDIA H100 80GB HBM3", (9, 0), "580.82", (13, 0), (13, 0))
OLD_DRIVER = DeviceFacts("cuda", "NVIDIA A10", (8, 6), "515.65", (11, 7), (12, 1))
CPU = DeviceFacts("cpu")


def test_bf16_on_a_t4_is_refused_with_the_remedy() -> None:
    [finding] = check_precision("bf16", T4)
    assert finding.severity is Severity.ERROR
    assert "compute capability >= 8.0" in finding.message()
    assert "7.5" in finding.message()
    assert finding.fix == "set precision: fp16"


def test_fp8_needs_ada_or_hopper() -> None:
    assert errors(check_precision("fp8", DeviceFacts("cuda", "A100", (8, 0))))
    assert not check_precision("fp8", DeviceFacts("cuda", "L4", (8, 9)))
    assert not check_precision("fp8", H100)


def test_fp16_below_volta_is_only_slow() -> None:
    [finding] = check_precision("fp16", P100)
    assert finding.severity is Severity.WARNING and "tensor cores" in finding.why
    assert not check_precision("fp16", V100)
    assert not check_precision("fp32", P100)


def test_cpu_precisions() -> None:
    assert not check_precision("fp32", CPU) and not check_precision("bf16", CPU)
    assert check_precision("fp16", CPU)[0].severity is Severity.WARNING


def test_driver_older_than_runtime_major_is_an_error() -> None:
    [finding] = check_driver_runtime(OLD_DRIVER)
    assert finding.severity is Severity.ERROR
    assert "CUDA_ERROR_UNKNOWN (999)" in finding.why
    assert "11.7" in finding.found and "12.1" in finding.found


def test_minor_version_compatibility_is_a_warning() -> None:
    facts = DeviceFacts("cuda", "A10", (8, 6), "525", (12, 0), (12, 4))
    [finding] = check_driver_runtime(facts)
    assert finding.severity is Severity.WARNING
    assert "CUDA_ERROR_UNSUPPORTED_PTX_VERSION" in finding.why


def test_runtimes_two_majors_behind_are_flagged() -> None:
    facts = DeviceFacts("cuda", "H100", (9, 0), "580", (13, 0), (11, 8))
    assert check_driver_runtime(facts)[0].check == "cuda.major_versions_apart"
    assert not check_driver_runtime(H100)


def test_cuda_range_of_the_model() -> None:
    assert not check_cuda_range(">=12.2", H100, subject="m")
    [finding] = check_cuda_range(">=12.2,<13", H100, subject="m@1")
    assert "m@1 needs CUDA >=12.2,<13" in finding.found


def test_arch_binary_compatibility_within_a_major_only() -> None:
    assert not check_arch([(8, 0)], DeviceFacts("cuda", "A10", (8, 6)), subject="m")
    assert not check_arch([(9, 0)], H100, subject="m")
    [finding] = check_arch([(8, 0), (8, 6)], H100, subject="m")
    assert "TORCH_CUDA_ARCH_LIST" in finding.fix and "invalid device function" in finding.why
    assert check_arch([(8, 6)], DeviceFacts("cuda", "A100", (8, 0)), subject="m")


def test_check_model_collects_every_rule() -> None:
    findings = check_model(
        subject="llm@1", precision="bf16", cuda=">=12.2", archs=[(8, 0)], facts=T4
    )
    assert {f.check for f in errors(findings)} == {
        "model.cuda_range",
        "model.arch",
        "precision.bf16",
    }


def test_parse_version() -> None:
    assert parse_version("12.4.1") == (12, 4)
    assert parse_version("sm_90") == (9, 0)
    assert parse_version("sm_86") == (8, 6)
    assert parse_version("13") == (13, 0)
