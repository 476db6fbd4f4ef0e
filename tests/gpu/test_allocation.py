"""The allocator: whole GPUs topology-aware, fractions and MPS shares never over-committed,
refusals that name the GPU and the shortfall."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpufleet.errors import InsufficientGpu, InvalidInput
from gpufleet.gpu.allocation import (
    CONTEXT_MIB,
    GpuRequest,
    Placement,
    allocate,
)
from gpufleet.gpu.discovery import GpuInfo, HostInfo, discover
from gpufleet.gpu.ledger import write_allocations

FIXTURES = Path(__file__).parent / "fixtures"


def gpu(index: int, *, mem_gb: int = 80, numa: int | None = 0, **kw: Any) -> GpuInfo:
    fields: dict[str, Any] = {
        "index": index,
        "uuid": f"GPU-{index:08x}-0000",
        "name": "NVIDIA H100 80GB HBM3",
        "pci_bus_id": f"00000000:{index + 10:02X}:00.0",
        "memory_total_mib": mem_gb * 1024,
        "memory_used_mib": 0,
        "capability": (9, 0),
        "mig_mode": False,
        "compute_mode": "default",
        "numa_node": numa,
        "cpu_affinity": list(range(8 * (numa or 0), 8 * (numa or 0) + 8)),
        "utilization_gpu": 0,
        "utilization_memory": 0,
    }
    fields.update(kw)
    return GpuInfo(**fields)


def host(*gpus: GpuInfo, nvlink: Sequence[tuple[int, int]] = ()) -> HostInfo:
    topo = {}
    for a in range(len(gpus)):
        for b in range(a + 1, len(gpus)):
            same = gpus[a].numa_node == gpus[b].numa_node
            topo[f"{a}-{b}"] = "NV18" if (a, b) in nvlink else ("NODE" if same else "SYS")
    return HostInfo(list(gpus), "580.159.04", (13, 0), topology=topo)


def h100(monkeypatch: pytest.MonkeyPatch) -> HostInfo:
    monkeypatch.setenv("GPUFLEET_NVML_RECORDING", str(FIXTURES / "h100.nvml.json"))
    return discover()


def test_without_gpus_every_model_gets_cpu_slots() -> None:
    placements = allocate(
        HostInfo([], error="no driver"),
        [GpuRequest("a", "1", "whole"), GpuRequest("b", "1", "fraction", None, 4, 50)],
        cpu_slots=2,
        workers_per_gpu=2,
    )
    assert [(p.model, p.slot, p.mode, p.gpus) for p in placements] == [
        ("a", "cpu0", "none", ()), ("a", "cpu1", "none", ()),
        ("a", "cpu0", "none", ()), ("a", "cpu1", "none", ()),
        ("b", "cpu0", "none", ()), ("b", "cpu1", "none", ()),
        ("b", "cpu0", "none", ()), ("b", "cpu1", "none", ()),
    ]  # fmt: skip
    assert len({p.worker for p in placements}) == 8


def test_a_whole_gpu_on_the_recorded_h100(monkeypatch: pytest.MonkeyPatch) -> None:
    h = h100(monkeypatch)
    [p] = allocate(h, [GpuRequest("digits", "1", "whole")])
    assert p.gpus == (0,) and p.uuids == ("GPU-af91ef83-f5c3-a266-d2cc-70f469a8ed11",)
    assert p.cpus == tuple(range(16))  # pinned to the GPU's CPU affinity
    assert p.worker == "digits@1/gpu0.0"


def test_a_whole_gpu_is_held_by_one_model_only(monkeypatch: pytest.MonkeyPatch) -> None:
    h = h100(monkeypatch)
    with pytest.raises(InsufficientGpu) as e:
        allocate(h, [GpuRequest("a", "1", "whole"), GpuRequest("b", "2", "whole")])
    assert "b@2 asks for 1 whole GPU" in e.value.message
    assert "GPU 0 is held whole by a@1" in e.value.message


def test_whole_gpus_are_split_evenly_between_models() -> None:
    h = host(*[gpu(i) for i in range(4)])
    placements = allocate(h, [GpuRequest("a", "1", "whole"), GpuRequest("b", "1", "whole")])
    assert {p.model: p.gpus for p in placements if p.replica == 0} == {"a": (0,), "b": (2,)}
    assert sorted(p.gpus for p in placements) == [(0,), (1,), (2,), (3,)]


def test_two_gpus_prefer_nvlink_then_one_numa_node() -> None:
    # GPUs 0-3 on NUMA 0, 4-7 on NUMA 1; NVLink joins 1-2 and 5-6 only.
    gpus = [gpu(i, numa=0 if i < 4 else 1) for i in range(8)]
    h = host(*gpus, nvlink=[(1, 2), (5, 6)])
    placements = allocate(h, [GpuRequest("llm", "1", "whole", count=2, replicas=3)])
    assert [p.gpus for p in placements] == [(1, 2), (5, 6), (0, 3)]
    assert placements[0].slot == "gpu1+2"
    assert placements[2].cpus == tuple(range(8))  # both on NUMA 0: its CPUs


def test_whole_groups_never_cross_numa_when_one_node_has_room() -> None:
    gpus = [gpu(0, numa=0), gpu(1, numa=1), gpu(2, numa=1)]
    [p] = allocate(host(*gpus), [GpuRequest("llm", "1", "whole", count=2, replicas=1)])
    assert p.gpus == (1, 2)


def test_too_few_whole_gpus_names_what_is_free() -> None:
    h = host(gpu(0), gpu(1, mig_mode=True))
    with pytest.raises(InsufficientGpu) as e:
        allocate(h, [GpuRequest("llm", "1", "whole", count=2)])
    msg = e.value.message
    assert "llm@1 asks for 2 whole GPUs" in msg
    assert "1 of 2 GPUs free" in msg and "GPU 1: MIG is enabled" in msg


def test_fractions_share_a_gpu_up_to_its_memory_and_compute() -> None:
    h = host(gpu(0))
    # 4 x (19 GB + 0.75 GB for each worker's CUDA context) = 79 GB of the 80.
    req = GpuRequest("small", "1", "fraction", memory_gb=19, compute_percent=25)
    placements = allocate(h, [req], workers_per_gpu=4)
    assert [p.replica for p in placements] == [0, 1, 2, 3]
    assert all(p.memory_mib == 19 * 1024 and p.compute_percent == 25 for p in placements)
    with pytest.raises(InsufficientGpu) as e:
        allocate(h, [req], workers_per_gpu=5)
    assert "worker 5 does not fit" in e.value.message
    assert "GPU 0 (NVIDIA H100 80GB HBM3)" in e.value.message
    assert "25% of compute short (0% left)" in e.value.message


def test_memory_is_never_over_committed_and_the_shortfall_is_named() -> None:
    h = host(gpu(0, mem_gb=80, memory_used_mib=2048))  # 78 GB free
    req = GpuRequest("big", "1", "fraction", memory_gb=40, compute_percent=10)
    with pytest.raises(InsufficientGpu) as e:
        allocate(h, [req], workers_per_gpu=2)
    assert (
        "3.5 GB of memory short (37.2 GB left; a worker takes 40.75 GB with its CUDA context)"
        in e.value.message
    )


def test_cuda_contexts_of_workers_standbys_and_the_mps_server_are_reserved() -> None:
    h = host(gpu(0, mem_gb=10))  # 10240 MiB
    frac = GpuRequest("f", "1", "fraction", memory_gb=4, compute_percent=10)
    assert len(allocate(h, [frac], workers_per_gpu=2)) == 2  # 2 x 4.75 GB
    with pytest.raises(InsufficientGpu, match=r"a worker takes 5\.50 GB"):
        allocate(h, [frac], workers_per_gpu=2, standby_per_worker=1)
    mps = GpuRequest("m", "1", "mps", memory_gb=4, compute_percent=10)
    with pytest.raises(InsufficientGpu, match="worker 2 does not fit"):
        allocate(h, [mps], workers_per_gpu=2)  # the MPS server's context too


def test_fraction_and_mps_never_share_a_gpu() -> None:
    frac = GpuRequest("a", "1", "fraction", memory_gb=8, compute_percent=30, replicas=1)
    mps = GpuRequest("b", "1", "mps", memory_gb=8, compute_percent=30, replicas=1)
    with pytest.raises(InsufficientGpu) as e:
        allocate(host(gpu(0)), [frac, mps])
    assert "already shared in mode fraction, not mps" in e.value.message
    placements = allocate(host(gpu(0), gpu(1)), [frac, mps])
    assert {p.model: p.gpus for p in placements} == {"a": (0,), "b": (1,)}


def test_binpack_fills_one_gpu_and_spread_uses_them_all() -> None:
    h = host(gpu(0), gpu(1))
    req = GpuRequest("s", "1", "mps", memory_gb=4, compute_percent=25, replicas=4)
    packed = allocate(h, [req], policy="binpack")
    spread = allocate(h, [req], policy="spread")
    assert [p.gpus[0] for p in packed] == [0, 0, 0, 0]
    assert [p.gpus[0] for p in spread] == [0, 1, 0, 1]
    assert len({p.worker for p in spread}) == 4


def test_whole_and_shared_models_split_the_gpus() -> None:
    h = host(*[gpu(i) for i in range(4)])
    placements = allocate(
        h,
        [
            GpuRequest("llm", "1", "whole"),
            GpuRequest("emb", "1", "fraction", memory_gb=10, compute_percent=50),
        ],
    )
    by_model: dict[str, list[tuple[int, ...]]] = {}
    for p in placements:
        by_model.setdefault(p.model, []).append(p.gpus)
    assert by_model == {"llm": [(0,), (1,)], "emb": [(2,), (3,)]}


def test_gpus_gpufleet_must_not_use_are_skipped() -> None:
    h = host(gpu(0, compute_mode="prohibited"), gpu(1, mig_mode=True), gpu(2))
    placements = allocate(h, [GpuRequest("a", "1", "whole")])
    assert [p.gpus for p in placements] == [(2,)]


def test_exclusive_process_gpus_take_one_fraction_worker() -> None:
    h = host(gpu(0, compute_mode="exclusive_process"))
    req = GpuRequest("a", "1", "fraction", memory_gb=4, compute_percent=10)
    assert len(allocate(h, [req])) == 1
    with pytest.raises(InsufficientGpu, match="exclusive_process: one process only"):
        allocate(h, [req], workers_per_gpu=2)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (GpuRequest("a", "1", "half"), "GPU mode must be one of none, whole, fraction, mps"),
        (GpuRequest("a", "1", "mps", memory_gb=4), "mode mps needs memory_gb and compute"),
        (GpuRequest("a", "1", "whole", replicas=0), "replicas must be at least 1"),
    ],
)
def test_bad_requests_are_refused(request_: GpuRequest, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        allocate(host(gpu(0)), [request_])


shares = st.builds(
    GpuRequest,
    model=st.sampled_from(["a", "b", "c"]),
    version=st.just("1"),
    mode=st.sampled_from(["whole", "fraction", "mps"]),
    count=st.integers(1, 3),
    memory_gb=st.sampled_from([1.0, 7.5, 20.0, 39.0, 70.0]),
    compute_percent=st.integers(1, 100),
    replicas=st.one_of(st.none(), st.integers(1, 6)),
)


@settings(max_examples=300, deadline=None)
@given(
    requests=st.lists(shares, min_size=1, max_size=3, unique_by=lambda r: r.model),
    n_gpus=st.integers(1, 6),
    per_gpu=st.integers(1, 3),
    policy=st.sampled_from(["binpack", "spread"]),
)
def test_no_gpu_is_ever_given_more_than_it_has(
    requests: list[GpuRequest], n_gpus: int, per_gpu: int, policy: Any
) -> None:
    requests = [
        r if r.mode != "whole" else GpuRequest(r.model, r.version, "whole", r.count, None, None,
                                               r.replicas)
        for r in requests
    ]  # fmt: skip
    h = host(*[gpu(i, memory_used_mib=1024 * (i % 3)) for i in range(n_gpus)])
    try:
        placements = allocate(h, requests, workers_per_gpu=per_gpu, policy=policy)
    except InsufficientGpu:
        return
    whole_owner: dict[int, str] = {}
    used_mib: dict[int, int] = {}
    used_pct: dict[int, int] = {}
    modes: dict[int, set[str]] = {}
    for p in placements:
        for i in p.gpus:
            modes.setdefault(i, set()).add(p.mode)
            if p.mode == "whole":
                assert whole_owner.setdefault(i, f"{p.model}") == p.model
            else:
                server = CONTEXT_MIB if p.mode == "mps" and i not in used_mib else 0
                used = (p.memory_mib or 0) + CONTEXT_MIB + server  # the worker's own context
                used_mib[i] = used_mib.get(i, 0) + used
                used_pct[i] = used_pct.get(i, 0) + (p.compute_percent or 0)
    for i, m in modes.items():
        assert len(m) == 1, f"GPU {i} mixes modes {m}"
    for i, mib in used_mib.items():
        g = h.gpus[i]
        assert mib <= g.memory_total_mib - g.memory_used_mib
        assert used_pct[i] <= 100
    assert len({p.worker for p in placements}) == len(placements)
    for r in requests:  # every model got at least one worker, and as many as it fixed
        mine = [p for p in placements if p.model == r.model]
        assert mine


def test_the_allocations_file_says_who_holds_what(tmp_path: Path) -> None:
    h = host(gpu(0), gpu(1))
    placements = allocate(h, [GpuRequest("s", "1", "fraction", None, 8, 40, replicas=2)])
    path = tmp_path / "run" / "allocations.json"
    write_allocations(path, h, placements, policy="binpack")
    data = json.loads(path.read_text())
    assert data["policy"] == "binpack" and data["serve_pid"] > 0
    assert [g["mode"] for g in data["gpus"]] == ["fraction", None]
    assert data["placements"][1] == {
        "worker": "s@1/gpu0.1",
        "model": "s",
        "version": "1",
        "mode": "fraction",
        "gpus": [0],
        "memory_mib": 8192,
        "compute_percent": 40,
        "cpus": list(range(8)),
    }
    assert isinstance(placements[0], Placement)
