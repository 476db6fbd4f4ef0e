"""Weights-load sweep: ``weights.load_safetensors`` in one warm process (torch imported, the
device initialised), over reader threads and block sizes, against ``cat FILE > /dev/null``
with the file in the page cache. It shows where the loader's time goes for a given size,
which ``cold_start.py`` (a fresh process per run) cannot.

    python bench/weights_load.py [--quick] [--json PATH] [--size-gb 1] [--device cuda:0|cpu]
        [--threads 4,8,16] [--block-mb 2,8,32] [--workdir DIR] [--repeats 3]

Each setting is timed with the file's chunk digests checked (as a registry load does) and
without them; the median of ``--repeats`` runs is kept.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import Row, report, result  # noqa: E402
from cold_start import WEIGHTS, cat_seconds, model_dir  # noqa: E402


def _load_seconds(file: Path, device: str, threads: int, block: int, digest: Any) -> float:
    import torch

    from gpufleet.models import integrity, weights

    if digest is not None:
        integrity.expect({file: digest})
    t0 = time.perf_counter()
    tensors = weights.load_safetensors(file, device, threads=threads, block_size=block)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    del tensors
    return seconds


def run(
    gb: float, device: str, workdir: Path, threads: list[int], blocks_mb: list[int], repeats: int
) -> dict[str, Any]:
    import torch

    from gpufleet.models import integrity

    directory = model_dir(workdir, gb, "bf16")
    file = directory / WEIGHTS
    size_gb = file.stat().st_size / 1e9
    if device.startswith("cuda"):
        torch.empty(1, device=device)  # the device is initialised before any timing
    digest = integrity.hash_file(file)
    cat_seconds(file)
    cat = statistics.median(cat_seconds(file) for _ in range(repeats))
    metrics: dict[str, float] = {"file_gb": size_gb, "cat_warm_s": cat}
    rows: list[Row] = [(f"{size_gb:.2f} GB on {device}: cat warm", f"{cat:.3f} s", "")]
    best = float("inf")
    for n in threads:
        for mb in blocks_mb:
            block = mb * 1024 * 1024
            _load_seconds(file, device, n, block, None)  # the first allocation of its kind
            for checked in (False, True):
                runs = [
                    _load_seconds(file, device, n, block, digest if checked else None)
                    for _ in range(repeats)
                ]
                s = statistics.median(runs)
                key = f"t{n}_b{mb}_{'checked' if checked else 'unchecked'}"
                metrics[f"{key}_s"] = s
                metrics[f"{key}_vs_cat"] = s / cat
                if checked:
                    best = min(best, s / cat)
                label = "digests checked" if checked else "no digests"
                rows.append((
                    f"  {n} threads, {mb} MiB blocks, {label}",
                    f"{s:.3f} s ({size_gb / s:.1f} GB/s) = {s / cat:.2f}x cat", "",
                ))  # fmt: skip
    metrics["best_checked_vs_cat"] = best
    return {
        **result("weights_load", metrics, {"best_checked_vs_cat": ("<=", 1.5)},
                 device=device, size_gb=gb, repeats=repeats),
        "_rows": rows,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 0.05 GB file, two settings")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--device", help="cuda:0 when CUDA is available, else cpu")
    ap.add_argument("--threads", default="4,8,16", help="reader threads, comma-separated")
    ap.add_argument("--block-mb", default="2,8,32", help="block sizes in MiB, comma-separated")
    ap.add_argument("--workdir", type=Path, help="where the model dir is made (default: temp)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import torch

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    gb, threads, blocks = args.size_gb, args.threads, args.block_mb
    if args.quick:
        gb, threads, blocks = 0.05, "2", "1,8"
    with tempfile.TemporaryDirectory(prefix="gpufleet-weights-") as tmp:
        out = run(
            gb, device, args.workdir or Path(tmp),
            [int(x) for x in threads.split(",")], [int(x) for x in blocks.split(",")],
            1 if args.quick else args.repeats,
        )  # fmt: skip
    rows = out.pop("_rows")
    report(out, rows, args.json)


if __name__ == "__main__":
    main()
