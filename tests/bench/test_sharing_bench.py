"""The sharing benchmark runs end to end in --quick mode on CPU (real worker processes with
their limits from the environment, released together; the mps rows skipped with the reason)
and writes the agreed JSON shape. Its figures are not asserted: on a shared 2-core machine they
say nothing; bench/README.md keeps the GPU's table. The figures and targets of a GPU run (with
the mps rows) are checked on made-up measurements."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers import BENCH_TIMEOUT_S

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "sharing_bench.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sharing_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sharing_bench_quick_on_cpu_writes_results(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "sharing_bench.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--device", "cpu", "--ks", "1,2",
           "--seconds", "0.5", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharing_bench: all measurements" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("└")  # the targets table, last
    assert "sharing_bench: targets" in proc.stdout
    assert "nvidia-cuda-mps-control" in proc.stdout  # why the mps rows are missing

    result = json.loads(out.read_text())
    assert result["bench"] == "sharing_bench"
    machine = result["machine"]
    assert machine["device"] == "cpu" and machine["ks"] == [1, 2]
    assert machine["mps_skipped"].startswith("mps: needs an NVIDIA GPU")
    m = result["metrics"]
    for name in ("batch_k1", "fraction_k1", "batch_k2", "fraction_k2"):
        assert m[f"{name}_items_per_s"] > 0
    assert m["fraction_k1_items_per_s"] == m["batch_k1_items_per_s"]  # the same run
    assert m["fraction_vs_batch_k2"] > 0 and m["batch_vs_one_k2"] > 0
    assert not any(name.startswith("mps") for name in m)
    assert result["targets"] == {}  # both targets need the mps rows


def test_figures_and_targets_with_mps_rows() -> None:
    bench = _bench()
    cfg = bench.Config("cuda", (1, 2, 4), 16, 2048, 8, 5.0, 0.5)
    ready = [{"torch": "2.11.0", "device_name": "NVIDIA H100 80GB HBM3"}]

    def group(*per_worker: float, note: str = "") -> object:
        return bench.Group([16], [list(per_worker)], ready, note)

    groups = {
        ("batch", 1): group(100.0),
        ("batch", 2): group(180.0),
        ("batch", 4): group(300.0),
        ("fraction", 2): group(60.0, 60.0),
        ("fraction", 4): group(30.0, 30.0, 30.0, 30.0),
        ("mps", 1): group(95.0, note="1/1 MPS clients"),
        ("mps", 2): group(90.0, 90.0, note="2/2 MPS clients"),
        ("mps", 4): group(80.0, 80.0, 80.0, 80.0, note="4/4 MPS clients"),
    }
    groups["fraction", 1] = groups["batch", 1]
    gpu = bench.Gpu("GPU-0000", "NVIDIA H100 80GB HBM3", 81559, (0, 1), "580.65")
    out = bench.summarise(cfg, gpu, 73403, groups, "")
    m = out["metrics"]
    assert m["mps_k4_items_per_s"] == 320.0
    assert m["fraction_k4_items_per_s"] == 120.0
    assert m["batch_k4_items_per_s"] == 300.0
    assert m["mps_vs_fraction_k4"] == pytest.approx(320 / 120, abs=1e-3)
    assert m["mps_vs_batch_k4"] == pytest.approx(320 / 300, abs=1e-3)
    assert m["mps_vs_one_k4"] == 3.2
    assert m["fraction_vs_batch_k2"] == pytest.approx(120 / 180, abs=1e-3)
    t = out["targets"]
    assert set(t) == {"mps_vs_fraction_k4", "mps_vs_one_k4"}
    for target in t.values():
        assert set(target) == {"value", "op", "target", "met"}
    assert t["mps_vs_fraction_k4"]["op"] == ">=" and t["mps_vs_fraction_k4"]["target"] == 1.0
    assert t["mps_vs_fraction_k4"]["met"] is True
    assert t["mps_vs_one_k4"]["target"] == 3.0 and t["mps_vs_one_k4"]["met"] is True
    assert out["machine"]["mps_clients"]["4"] == "4/4 MPS clients"
    rows = "\n".join(" | ".join(r) for r in out["_rows"])
    assert "k=4 mps: 4 workers, 25% threads each" in rows
    assert "k=4 fraction: 4 workers, 25% each" in rows


def test_worker_env_carries_the_limits_and_hides_inherited_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = _bench()
    from gpufleet.worker.limits import WorkerLimits

    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")  # a system-wide daemon's
    monkeypatch.setenv("GPUFLEET_GPU_COMPUTE_PERCENT", "7")
    gpu = bench.Gpu("GPU-1234", "H100", 81559, (2, 3))
    cfg = bench.Config("cuda", (4,), 8, 1024, 4, 1.0, 0.2)
    env = bench.worker_env(gpu, cfg, WorkerLimits("fraction", 1000, 25, (2, 3)).to_env())
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1234"
    assert "CUDA_MPS_PIPE_DIRECTORY" not in env
    assert WorkerLimits.from_env(env) == WorkerLimits("fraction", 1000, 25, (2, 3))
    cpu = bench.worker_env(gpu, bench.Config("cpu", (4,), 8, 1024, 4, 1.0, 0.2), {})
    assert cpu["CUDA_VISIBLE_DEVICES"] == ""
