"""Kubernetes node labels from a host: GFD's names and values, the least capable GPU of a mixed
node, values Kubernetes accepts, and the JSON / YAML / kubectl outputs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gpufleet.gpu.discovery import HostInfo, discover
from gpufleet.gpu.labels import (
    OWN_KEYS,
    format_labels,
    is_label_value,
    kubectl_command,
    label_value,
    node_labels,
)
from gpufleet.gpu.nvml import RECORDING_ENV

H100 = Path(__file__).parent / "fixtures" / "h100.nvml.json"
H100_LABELS = {
    "nvidia.com/gpu.count": "1",
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/gpu.memory": "81559",
    "nvidia.com/gpu.family": "hopper",
    "nvidia.com/gpu.compute.major": "9",
    "nvidia.com/gpu.compute.minor": "0",
    "nvidia.com/mig.capable": "true",
    "nvidia.com/cuda.driver.major": "580",
    "nvidia.com/cuda.driver.minor": "159",
    "nvidia.com/cuda.driver.rev": "04",
    "nvidia.com/cuda.driver-version.major": "580",
    "nvidia.com/cuda.driver-version.minor": "159",
    "nvidia.com/cuda.driver-version.revision": "04",
    "nvidia.com/cuda.driver-version.full": "580.159.04",
    "nvidia.com/cuda.runtime.major": "13",
    "nvidia.com/cuda.runtime.minor": "0",
    "nvidia.com/cuda.runtime-version.major": "13",
    "nvidia.com/cuda.runtime-version.minor": "0",
    "nvidia.com/cuda.runtime-version.full": "13.0",
    "gpufleet.dev/cuda-major-version": "13",
    "gpufleet.dev/cuda-minor-version": "0",
    "gpufleet.dev/compute-capability": "9.0",
    "gpufleet.dev/gpu-memory-gb": "79",
}


def a_gpu(index: int, name: str, memory_mib: int, cc: str, mig: bool | None) -> dict[str, Any]:
    return {
        "index": index,
        "uuid": f"GPU-{index}",
        "name": name,
        "pci_bus_id": f"00000000:{index + 1:02X}:00.0",
        "memory_total_mib": memory_mib,
        "memory_used_mib": 0,
        "capability": cc,
        "mig_mode": mig,
        "compute_mode": "default",
        "numa_node": 0,
        "cpu_affinity": [0, 1],
        "utilization_gpu": 0,
        "utilization_memory": 0,
    }


def host_of(*gpus: dict[str, Any], driver: str = "570.86.15", cuda: str = "12.8") -> HostInfo:
    return HostInfo.from_dict({"gpus": list(gpus), "driver_version": driver, "driver_cuda": cuda})


@pytest.fixture
def h100(monkeypatch: pytest.MonkeyPatch) -> HostInfo:
    monkeypatch.setenv(RECORDING_ENV, str(H100))
    return discover()


def test_labels_of_the_lent_h100(h100: HostInfo) -> None:
    assert node_labels(h100) == H100_LABELS


def test_runtime_cuda_adds_its_own_labels(h100: HostInfo) -> None:
    labels = node_labels(h100, runtime_cuda=(12, 8))
    assert labels == H100_LABELS | {
        "gpufleet.dev/runtime-cuda-major-version": "12",
        "gpufleet.dev/runtime-cuda-minor-version": "8",
    }


def test_a_mixed_node_is_labelled_by_its_least_capable_gpu() -> None:
    host = host_of(
        a_gpu(0, "NVIDIA H100 80GB HBM3", 81559, "9.0", False),
        a_gpu(1, "NVIDIA L4", 23034, "8.9", None),
        a_gpu(2, "NVIDIA A100-SXM4-40GB", 40960, "8.0", False),
    )
    labels = node_labels(host)
    assert {k: labels[k] for k in labels if "cuda" not in k} == {
        "nvidia.com/gpu.count": "3",
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB",  # compute capability 8.0, the lowest
        "nvidia.com/gpu.memory": "23034",  # the L4's, the smallest
        "nvidia.com/gpu.family": "ampere",
        "nvidia.com/gpu.compute.major": "8",
        "nvidia.com/gpu.compute.minor": "0",
        "nvidia.com/mig.capable": "true",  # some GPU has MIG, as GFD says
        "gpufleet.dev/compute-capability": "8.0",
        "gpufleet.dev/gpu-memory-gb": "22",  # 22.5 GiB, floored: never promise more
    }
    assert labels["nvidia.com/cuda.driver.rev"] == "15"
    assert labels["gpufleet.dev/cuda-major-version"] == "12"
    assert labels["gpufleet.dev/cuda-minor-version"] == "8"


def test_same_capability_smaller_memory_names_the_product() -> None:
    host = host_of(
        a_gpu(0, "NVIDIA A100-SXM4-80GB", 81920, "8.0", False),
        a_gpu(1, "NVIDIA A100-SXM4-40GB", 40960, "8.0", False),
    )
    labels = node_labels(host)
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-A100-SXM4-40GB"
    assert labels["gpufleet.dev/gpu-memory-gb"] == "40"


def test_what_nvml_did_not_say_is_left_out() -> None:
    host = host_of(
        a_gpu(0, "NVIDIA GeForce RTX 4090", 24564, "0.0", None), driver="560.35", cuda=""
    )
    labels = node_labels(host)
    assert not any("compute" in k or "family" in k or "runtime" in k for k in labels)
    assert labels["nvidia.com/cuda.driver.rev"] == ""  # GFD's value for "X.Y" drivers
    assert labels["nvidia.com/mig.capable"] == "false"
    assert "gpufleet.dev/cuda-major-version" not in labels


def test_no_gpu_no_labels() -> None:
    host = HostInfo(gpus=[], error="the NVIDIA kernel driver is not loaded")
    assert node_labels(host) == {}


def test_every_value_is_a_valid_label_value(h100: HostInfo) -> None:
    odd = a_gpu(
        1, "NVIDIA  GeForce RTX™ 4090 (Laptop GPU) / engineering sample " * 3, 1, "8.9", True
    )
    host = host_of(odd, driver="535.x+y.01 beta", cuda="12.2")
    for labels in (node_labels(h100), node_labels(host)):
        bad = {k: v for k, v in labels.items() if not is_label_value(v)}
        assert not bad
    assert node_labels(host)["nvidia.com/gpu.product"] == (
        "NVIDIA-GeForce-RTX-4090-Laptop-GPU-engineering-sample-NVIDIA-Ge"
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"),
        ("NVIDIA H100 PCIe", "NVIDIA-H100-PCIe"),
        ("  -weird name_. ", "weird-name"),
        ("Tesla V100-SXM2-16GB", "Tesla-V100-SXM2-16GB"),
        ("...", ""),
        ("", ""),
        ("a" * 70, "a" * 63),
        ("a" * 62 + " b", "a" * 62),  # cut at 63 ends in "-": trimmed
    ],
)
def test_label_value(text: str, value: str) -> None:
    assert label_value(text) == value and is_label_value(value)


@given(st.text())
def test_label_value_is_always_valid(text: str) -> None:
    assert is_label_value(label_value(text))


def test_is_label_value_holds_kubernetes_rules() -> None:
    assert is_label_value("") and is_label_value("9.0") and is_label_value("a" * 63)
    assert not is_label_value("a" * 64)
    assert not is_label_value("-a") and not is_label_value("a.") and not is_label_value("a b")


def test_json_and_yaml_keep_every_value_a_string(h100: HostInfo) -> None:
    labels = node_labels(h100)
    assert json.loads(format_labels(labels, "json", node="n")) == labels
    text = format_labels(labels, "yaml", node="n")
    assert yaml.safe_load(text) == labels  # "9.0", "04", "true" stay strings
    assert "gpufleet.dev/compute-capability: '9.0'" in text
    assert format_labels({}, "json", node="n").strip() == "{}"
    assert yaml.safe_load(format_labels({}, "yaml", node="n")) == {}


def test_kubectl_command_is_quoted_for_a_shell(h100: HostInfo) -> None:
    labels = node_labels(h100)
    text = format_labels(labels, "kubectl", node="gpu node;rm -rf /")
    assert text.endswith(" --overwrite\n") and text.count("\n") == 1
    words = shlex.split(text)
    assert words[:4] == ["kubectl", "label", "node", "gpu node;rm -rf /"]
    assert words[-1] == "--overwrite"
    assert dict(w.split("=", 1) for w in words[4:-1]) == labels


def test_kubectl_on_a_node_without_gpu_removes_our_labels_only() -> None:
    words = shlex.split(kubectl_command({}, node="cpu-1"))
    assert words[:4] == ["kubectl", "label", "node", "cpu-1"]
    assert words[4:] == [f"{k}-" for k in OWN_KEYS]
    assert all(k.startswith("gpufleet.dev/") for k in OWN_KEYS)
    assert set(OWN_KEYS) >= {k for k in node_labels_with_runtime() if k.startswith("gpufleet")}


def node_labels_with_runtime() -> dict[str, str]:
    return node_labels(host_of(a_gpu(0, "x", 1024, "9.0", None)), runtime_cuda=(12, 8))
