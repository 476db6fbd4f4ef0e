"""Cold-start benchmark: from process start to the first result of a tiny-lm model, against
reading its weights file with ``cat``.

For each size a random tiny-lm directory is generated once (in ``--workdir``, reused), with
its digests in ``digests.json``. Then, with the file in the page cache (warm) and evicted
from it (cold, ``posix_fadvise(DONTNEED)``, checked with ``mincore``):

- ``cat FILE > /dev/null``: the baseline, the file's read time;
- a fresh probe process that does what a worker does with a registry version: a
  ``CheckedRunner`` over ``TinyLM(dir)`` holding the weights' digests, ``load(device)``,
  ``warmup()`` (which returns once the digests are checked: without a prefetch the load
  reads at full speed and the check runs in background threads during the warm-up), one
  ``predict``. It reports wall-clock
  timestamps per phase. Three variants: ``plain`` (everything in order), ``prefetch``
  (reading and checking started before ``import torch``, overlapping the import and device
  initialisation), and ``standby`` (the process was started ahead, as ``serve --standby``
  keeps one per GPU: torch imported and the device prepared by
  ``worker.standby.prepare_device``; the clock starts when the model is handed to it).

    python bench/cold_start.py [--quick] [--json PATH] [--sizes 1,10] [--device cuda:0|cpu]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import Row, report, result  # noqa: E402

WEIGHTS, DIGESTS = "model.safetensors", "digests.json"
PHASES = ("interpreter", "imports", "device", "weights", "warm", "first_result")
VARIANTS = ("plain", "prefetch", "standby")

# The probe: a fresh interpreter that starts a model as a worker would. Timestamps are
# time.time() (wall clock), so the parent can measure from just before it spawned the probe.
PROBE = r"""
import time
t = {"interpreter": time.time()}
import json, sys
from pathlib import Path
model_dir, device, variant = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
from gpufleet.models import integrity
from gpufleet.models.demo.tiny_lm import TinyLM
from gpufleet.models.loader import CheckedRunner

def checked():
    # As the registry hands a worker a version: the weights' digests to check on the way.
    deferred = {}
    for name, d in json.loads((model_dir / "digests.json").read_text()).items():
        d["chunks"] = tuple(d["chunks"])
        deferred[(model_dir / name).resolve()] = integrity.FileDigest(**d)
    return CheckedRunner(TinyLM(model_dir), deferred=deferred, source=str(model_dir))

if variant == "prefetch":
    runner = checked()
    runner.prefetch()
import torch
t["imports"] = time.time()
if variant == "standby":
    from gpufleet.worker.standby import prepare_device
    prepare_device(device)
    print("standby", flush=True)
    sys.stdin.readline()  # the model is handed over: the clock starts (in the parent)
    t = {"interpreter": time.time(), "imports": time.time()}
    runner = checked()  # the load reads at full speed; the check runs during the warm-up
elif device.startswith("cuda"):
    torch.cuda.init()
    torch.empty(1, device=device)
t["device"] = time.time()
if variant == "plain":
    runner = checked()
runner.load(device)
if device.startswith("cuda"):
    torch.cuda.synchronize(device)
t["weights"] = time.time()
runner.warmup()  # returns once the digests' verdict is in
assert not integrity.unverified([model_dir / "model.safetensors"])
t["warm"] = time.time()
out = runner.predict([{"prompt": "Hello", "max_new_tokens": 8, "seed": 0}])
t["first_result"] = time.time()
print(json.dumps({"t": t, "tokens": out[0]["tokens"]}))
"""


# -- the page cache -----------------------------------------------------------------------


def evict(path: Path) -> None:
    """Drop the file's clean pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float | None:
    """Share of the file's pages in the page cache (``mincore``), or None where it cannot
    be asked (no libc mincore)."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        with path.open("rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
            anchor = ctypes.c_char.from_buffer(mm)  # a private mapping is writable: has an address
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
            del anchor  # the mmap cannot close while a ctypes object points into it
    except (OSError, AttributeError, ValueError):
        return None
    if rc != 0:
        return None
    return (pages - bytes(vec).count(0)) / pages


def cat_seconds(path: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


# -- the model directories ----------------------------------------------------------------


def model_dir(workdir: Path, gb: float, dtype: str) -> Path:
    """A tiny-lm directory of about ``gb`` GB, generated once with its digests."""
    from gpufleet.models import integrity
    from gpufleet.models.demo.tiny_lm import generate_model_dir

    out = workdir / f"tiny-lm-{gb:g}gb-{dtype}"
    weights, digests = out / WEIGHTS, out / DIGESTS
    if digests.is_file() and weights.is_file():
        recorded = json.loads(digests.read_text())[WEIGHTS]
        if recorded["size"] == weights.stat().st_size and recorded.get("blake3"):
            return out
    params = gb * 1e9 / (4 if dtype == "fp32" else 2)
    generate_model_dir(out, params, dtype=dtype)  # type: ignore[arg-type]
    digests.write_text(json.dumps({WEIGHTS: asdict(integrity.hash_file(weights))}) + "\n")
    return out


# -- the probe ----------------------------------------------------------------------------


def probe(directory: Path, device: str, variant: str) -> dict[str, float]:
    """Seconds from spawning the probe to the end of each phase."""
    env = {**os.environ}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, str(directory), device, variant], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    if variant == "standby":
        proc.stdout.readline()  # "standby": started ahead, as a serve keeps it
        t0 = time.time()
        proc.stdin.write("go\n")
        proc.stdin.flush()
    out, err = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"probe failed ({variant}):\n{out[-2000:]}{err[-3000:]}")
    stamps = json.loads(out.strip().splitlines()[-1])["t"]
    return {phase: stamps[phase] - t0 for phase in PHASES}


def measure_size(directory: Path, device: str, repeats: int) -> tuple[dict[str, float], list[Row]]:
    weights = directory / WEIGHTS
    gb = weights.stat().st_size / 1e9
    m: dict[str, float] = {"file_gb": gb}
    cat_seconds(weights)  # now it is in the page cache
    m["cat_warm_s"] = statistics.median(cat_seconds(weights) for _ in range(repeats))
    colds, left = [], []
    for _ in range(repeats):
        evict(weights)
        left.append(resident_fraction(weights))
        colds.append(cat_seconds(weights))
    m["cat_cold_s"] = statistics.median(colds)
    known = [x for x in left if x is not None]
    m["resident_after_evict"] = max(known) if known else -1.0  # -1: could not be checked
    for cache in ("warm", "cold"):
        for variant in VARIANTS:
            runs = []
            for _ in range(repeats):
                if cache == "cold":
                    evict(weights)
                else:
                    cat_seconds(weights)
                runs.append(probe(directory, device, variant))
            for phase in PHASES:
                m[f"{cache}_{variant}_{phase}_s"] = statistics.median(r[phase] for r in runs)
            ends = [statistics.median(r[p] for r in runs) for p in PHASES]
            m[f"{cache}_{variant}_weights_phase_s"] = ends[3] - ends[2]  # load returned
            m[f"{cache}_{variant}_ready_phase_s"] = ends[4] - ends[2]  # loaded, checked, warm
    for cache in ("warm", "cold"):
        base = m[f"cat_{cache}_s"]
        m[f"ready_vs_cat_{cache}"] = m[f"{cache}_plain_ready_phase_s"] / base
        for variant in VARIANTS:
            m[f"process_vs_cat_{cache}_{variant}"] = m[f"{cache}_{variant}_first_result_s"] / base
    return m, _rows(m)


def _rows(m: dict[str, float]) -> list[Row]:
    gb = m["file_gb"]
    evicted = m["resident_after_evict"]
    check = "not checkable" if evicted < 0 else f"{evicted:.1%} of pages still cached after"
    rows: list[Row] = [
        (f"  {gb:.2f} GB: cat warm / cold", f"{m['cat_warm_s']:.3f} / {m['cat_cold_s']:.3f} s "
         f"({gb / m['cat_warm_s']:.1f} / {gb / m['cat_cold_s']:.1f} GB/s)", ""),
        ("  eviction (posix_fadvise DONTNEED, mincore)", check, ""),
    ]  # fmt: skip
    for cache in ("warm", "cold"):
        for variant in VARIANTS:
            p = f"{cache}_{variant}_"
            ends = [m[p + f"{ph}_s"] for ph in PHASES]
            steps = " / ".join(f"{b - a:.2f}" for a, b in zip([0.0, *ends], ends, strict=False))
            w = m[p + "weights_phase_s"]
            rows.append((
                f"  probe {cache} {variant}: interp / imports / device / weights / warm-up "
                "(digests checked) / first result",
                f"{steps} s = {ends[-1]:.2f} s; load {gb / w:.1f} GB/s, "
                f"whole process {gb / ends[-1]:.2f} GB/s", "",
            ))  # fmt: skip
    rows += [
        ("  load + check + warm-up / cat, warm (plain)", f"{m['ready_vs_cat_warm']:.2f}",
         "<= 1.5"),
        ("  load + check + warm-up / cat, cold (plain)", f"{m['ready_vs_cat_cold']:.2f}", ""),
        ("  to first result / cat, warm: plain / prefetch / standby",
         " / ".join(f"{m[f'process_vs_cat_warm_{v}']:.2f}" for v in VARIANTS),
         "<= 1.5"),
        ("  to first result / cat, cold: plain / prefetch / standby",
         " / ".join(f"{m[f'process_vs_cat_cold_{v}']:.2f}" for v in VARIANTS), ""),
    ]  # fmt: skip
    return rows


def run(sizes: list[float], device: str, workdir: Path, repeats: int, dtype: str) -> dict[str, Any]:
    metrics: dict[str, float] = {}
    targets: dict[str, tuple[str, float]] = {}
    rows: list[Row] = []
    for gb in sizes:
        directory = model_dir(workdir, gb, dtype)
        m, size_rows = measure_size(directory, device, repeats)
        key = f"{gb:g}gb"
        metrics.update({f"{name}_{key}": value for name, value in m.items()})
        targets[f"ready_vs_cat_warm_{key}"] = ("<=", 1.5)
        targets[f"process_vs_cat_warm_prefetch_{key}"] = ("<=", 1.5)
        targets[f"process_vs_cat_warm_standby_{key}"] = ("<=", 1.5)
        rows.append((f"tiny-lm {gb:g} GB ({dtype}) on {device}", "", ""))
        rows += size_rows
    rows.append(("cold: only the weights file is evicted; Python and torch stay cached", "", ""))
    return {
        **result("cold_start", metrics, targets, device=device, sizes_gb=sizes, dtype=dtype,
                 repeats=repeats),
        "_rows": rows,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes on cpu, under a minute")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--sizes", help="model sizes in GB, comma-separated (default 1,10)")
    ap.add_argument("--device", help="cuda:0 when CUDA is available, else cpu")
    ap.add_argument("--workdir", type=Path, help="where model dirs are made (default: temp dir)")
    ap.add_argument("--repeats", type=int, help="runs per measurement, median kept (3; quick 1)")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="bf16")
    args = ap.parse_args()
    sizes = [float(s) for s in (args.sizes or ("0.05,0.2" if args.quick else "1,10")).split(",")]
    device = args.device or ("cpu" if args.quick else _default_device())
    repeats = args.repeats or (1 if args.quick else 3)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        outcome = run(sizes, device, args.workdir, repeats, args.dtype)
    else:
        with tempfile.TemporaryDirectory(prefix="gpufleet-cold-start-") as tmp:
            outcome = run(sizes, device, Path(tmp), repeats, args.dtype)
    rows = outcome.pop("_rows")
    report(outcome, rows, args.json)


def _default_device() -> str:
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda:0" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
