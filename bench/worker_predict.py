"""How long ``predict`` takes inside the served worker, against the same runner in a bare loop.

``serve_bench`` says how far served throughput is from the bare loop; this says how much of
that gap is ``predict`` itself running slower in the worker (other threads, the collector,
CPU placement) rather than the platform around it. It starts ``gpufleet serve`` (one model,
SQLite), drives N closed-loop aiohttp clients at ``infer?wait``, and reads the worker's own
``gpufleet_task_seconds{stage="inference"}`` and ``gpufleet_batch_size`` from ``/metrics``
before and after: each task observes its batch's predict time, so their mean is the
task-weighted mean batch time. Then the bare loop on full batches, in the same run.

    python bench/worker_predict.py [--model digits] [--device cpu|cuda] [--clients 64,256]
        [--seconds 4] [--json out.json]

Environment passes through to the server, so A/B runs of a worker setting are one flag away:
``GPUFLEET_QUEUE_AGENT=off python bench/worker_predict.py ...``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import Row, report, result  # noqa: E402
from serve_bench import SERVED_NAME, Gpufleet, bare, model_input, sweep  # noqa: E402


def read_metrics(server: Gpufleet) -> dict[str, float]:
    """The worker's inference seconds and batch sizes so far (sums and counts, over labels)."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"Authorization": f"Bearer {server.key}"}
    text = httpx.get(server.url + "/metrics", headers=headers, timeout=10).text
    wanted = {
        "gpufleet_task_seconds": "inference",  # only its stage="inference" samples
        "gpufleet_batch_size": "batch",
    }
    out = {f"{name}_{kind}": 0.0 for name in wanted.values() for kind in ("sum", "count")}
    for family in text_string_to_metric_families(text):
        name = wanted.get(family.name)
        if name is None:
            continue
        for sample in family.samples:
            kind = sample.name.rsplit("_", 1)[-1]
            if kind in ("sum", "count") and sample.labels.get("stage", "inference") == "inference":
                out[f"{name}_{kind}"] += sample.value
    return out


def served(name: str, device: str, clients: int, seconds: float, work: Path) -> dict[str, float]:
    server = Gpufleet(name, device, work / f"c{clients}", None, None)
    server.wait_ready()
    try:
        headers = {"Authorization": f"Bearer {server.key}"}
        url = f"{server.url}/v1/models/{SERVED_NAME[name]}/infer?wait=60"
        body = {"input": model_input(name)}
        sweep(url, body, [clients], 1.0, headers)  # warm: the first batches and the window
        before = read_metrics(server)
        load = sweep(url, body, [clients], seconds, headers)[clients]
        after = read_metrics(server)
    finally:
        server.stop()
    d = {k: after[k] - before[k] for k in after}
    tasks = max(d["inference_count"], 1.0)
    batches = max(d["batch_count"], 1.0)
    return {
        "per_s": load.per_s,
        "p50_ms": load.summary()["p50_ms"],
        "batch_mean": d["batch_sum"] / batches,
        "predict_ms": d["inference_sum"] / tasks * 1000,  # task-weighted mean batch time
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="digits")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--clients", default="64,256")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    work = Path(tempfile.mkdtemp(prefix="gpufleet-worker-predict-"))
    metrics: dict[str, float] = {}
    rows: list[Row] = []
    for c in clients:
        r = served(args.model, args.device, c, args.seconds, work)
        for k, v in r.items():
            metrics[f"c{c}_{k}"] = v
        rows.append((f"{c} clients: served", f"{r['per_s']:,.0f} items/s, p50 "
                     f"{r['p50_ms']:.1f} ms", ""))  # fmt: skip
        rows.append((f"{c} clients: predict in the worker",
                     f"{r['predict_ms']:.2f} ms a batch of {r['batch_mean']:.1f}", ""))  # fmt: skip
    b = bare(args.model, args.device, max(args.seconds, 2.0))
    metrics["bare_per_s"] = b["per_s"]
    metrics["bare_batch_ms"] = b["batch"] / b["per_s"] * 1000
    rows.append(("bare loop", f"{metrics['bare_batch_ms']:.2f} ms a batch of {b['batch']:.0f}"
                 f" ({b['per_s']:,.0f} items/s)", ""))  # fmt: skip
    for c in clients:  # how much slower predict runs served; like for like at full batches
        metrics[f"c{c}_predict_vs_bare"] = metrics[f"c{c}_predict_ms"] / metrics["bare_batch_ms"]
        sizes = f"batches of {metrics[f'c{c}_batch_mean']:.1f} against {b['batch']:.0f}"
        rows.append((f"{c} clients: predict / bare",
                     f"{metrics[f'c{c}_predict_vs_bare']:.2f} ({sizes})", ""))  # fmt: skip
    out = result("worker_predict", metrics, {}, model=args.model, device=args.device,
                 clients=clients, seconds=args.seconds)  # fmt: skip
    report(out, rows, args.json)


if __name__ == "__main__":
    main()
