"""GPU sharing benchmark: total throughput of k workers sharing one GPU (time-slicing in mode
``fraction``, MPS in mode ``mps``) against one worker with a k-times larger batch.

Each worker is a real process set up the way ``gpufleet serve`` sets one up: the parent gives
it ``CUDA_VISIBLE_DEVICES=<GPU uuid>`` and ``WorkerLimits(mode, memory_mib, compute_percent,
cpus).to_env()``, plus ``MpsDaemon.client_env(...)`` in mode mps; the worker applies
``WorkerLimits.from_env().apply(device)`` (memory cap, CPU affinity) before it touches the
device. The model is a small MLP (``--layers`` x Linear(``--hidden``) + ReLU, fp16 on CUDA,
fp32 on CPU) whose small batches leave the GPU underused. Each forward pass copies its batch to
the device and its output back to the host, as a worker returns each batch's results.

Rows, for each k in ``--ks``:
- ``batch``: one worker (mode fraction, the whole budget, 100%) running batch k x b;
- ``fraction``: k workers, each 1/k of the memory budget and compute_percent 100//k, no MPS
  (the driver time-slices their contexts); k=1 is the batch row's run at batch b;
- ``mps``: k workers under one MPS daemon (``gpufleet.gpu.mps.MpsDaemon``, private pipe
  directory), each ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=100//k`` and a pinned memory limit of
  1/k of the budget: the shares the allocator hands out, which sum to at most 100%.

All workers of a row are started, warmed up (every batch size they will run) and released
together at one wall-clock instant; each runs for ``--seconds`` and reports its items/s, which
are summed. Ratios are against the batch row of the same k and against one worker at batch b.

    python bench/sharing_bench.py [--quick] [--json PATH] [--device cuda|cpu] [--ks 1,2,4]

On CPU (no GPU: the code paths only) each worker runs one torch thread on its own core and the
mps rows are skipped; the figures there compare cores, not GPU sharing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import Row, report, result  # noqa: E402

if TYPE_CHECKING:
    from gpufleet.gpu.mps import MpsDaemon

BENCH = "sharing_bench"
MODES = ("batch", "fraction", "mps")
MPS_NEEDS = "mps: needs an NVIDIA GPU and nvidia-cuda-mps-control"
START_TIMEOUT_S = 300.0  # for a row's workers to import torch, build the model and warm up
ROUND_SLACK_S = 60.0  # beyond --seconds, for a round's results
RELEASE_AHEAD_S = 0.2  # the workers are released together this long after "go" is sent
CPU_BUDGET_MIB = 4096  # on CPU the memory limit is only passed along (apply() caps CUDA only)
# Variables of the parent's environment a worker must not inherit: its limits are ours to set.
INHERITED_PREFIXES = ("CUDA_MPS_", "GPUFLEET_GPU_", "GPUFLEET_CPU_")


@dataclass(frozen=True)
class Config:
    device: str  # "cuda" or "cpu"
    ks: tuple[int, ...]
    batch: int
    hidden: int
    layers: int
    seconds: float
    warmup_s: float


@dataclass
class Gpu:
    """The GPU the rows share (NVML), or what is known without NVML."""

    uuid: str | None = None
    name: str = ""
    memory_mib: int | None = None
    cpus: tuple[int, ...] = ()
    driver: str | None = None
    error: str | None = None


@dataclass
class Group:
    """One row's measurements: ``rounds[i][w]`` is worker w's items/s at the i-th batch size."""

    batches: list[int]
    rounds: list[list[float]] = field(default_factory=list)
    ready: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""


# -- the worker process -----------------------------------------------------------------------


def child_main(argv: list[str]) -> None:
    """A worker: apply the limits from the environment, build the model, warm up each batch
    size, say ``ready``; then per batch size wait for ``go START``, run until START + seconds
    and print the items it did. Messages are JSON lines on stdout."""
    ap = argparse.ArgumentParser(prog="sharing_bench --child")
    ap.add_argument("--device", required=True)
    ap.add_argument("--batches", required=True, help="batch sizes, comma-separated, in order")
    ap.add_argument("--hidden", type=int, required=True)
    ap.add_argument("--layers", type=int, required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--warmup-s", type=float, required=True)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's own")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    import torch

    from gpufleet.worker.limits import WorkerLimits

    if args.threads:
        torch.set_num_threads(args.threads)
    limits = WorkerLimits.from_env()
    applied: object = limits.apply(args.device)  # before the model touches the device
    cuda = args.device.startswith("cuda")
    dtype = torch.float16 if cuda else torch.float32
    layers: list[torch.nn.Module] = []
    for _ in range(args.layers):
        layers += [torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers).to(args.device, dtype).eval()
    inputs = {b: torch.randn(b, args.hidden, dtype=dtype) for b in batches}  # host memory

    def forward(b: int) -> None:
        model(inputs[b].to(args.device)).cpu()  # the results come back, as a worker's do

    def loop(b: int, until: float) -> int:
        n = 0
        while time.perf_counter() < until or n == 0:
            forward(b)
            n += 1
        if cuda:
            torch.cuda.synchronize()
        return n

    with torch.inference_mode():
        for b in batches:
            loop(b, time.perf_counter() + args.warmup_s)
        _say(
            ready=True,
            pid=os.getpid(),
            torch=torch.__version__,
            device_name=torch.cuda.get_device_name(0) if cuda else "cpu",
            limits={"mode": limits.mode, "memory_mib": limits.memory_mib,
                    "compute_percent": limits.compute_percent, "cpus": list(limits.cpus)},
            mps_thread_percent=os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
            applied=applied,
        )  # fmt: skip
        for b in batches:
            line = sys.stdin.readline().split()
            if not line or line[0] != "go":
                return  # the parent is gone or gave up: stop quietly
            start_at = float(line[1])
            time.sleep(max(0.0, start_at - time.time()))
            t0 = time.perf_counter()
            n = loop(b, t0 + args.seconds)
            elapsed = time.perf_counter() - t0
            _say(batch=b, items=n * b, seconds=elapsed, items_per_s=n * b / elapsed)


def _say(**message: Any) -> None:
    print(json.dumps(message), flush=True)


# -- running a row's workers --------------------------------------------------------------


class Worker:
    """One worker process; its stdout is read by a thread into a queue of JSON messages."""

    def __init__(self, cmd: list[str], env: dict[str, str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        with stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                text=True, errors="replace",
            )  # fmt: skip
        self.messages: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    self.messages.put(json.loads(line))
        self.messages.put(None)  # end of output

    def send(self, text: str) -> None:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(text + "\n")
        stdin.flush()

    def expect(self, deadline: float) -> dict[str, Any]:
        try:
            msg = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(f"worker {self.proc.pid} did not answer in time") from None
        if msg is None:
            code = self.proc.wait(10)
            tail = self.stderr_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker {self.proc.pid} exited with {code}:\n{tail}")
        return msg

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.reader.join(5)  # it has read to the end: the pipe can be closed under it
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if pipe is not None:
                    pipe.close()


@contextlib.contextmanager
def workers(cmds: list[list[str]], envs: list[dict[str, str]], tmp: Path) -> Iterator[list[Worker]]:
    """Start the workers; on the way out (normal or not) kill whichever are still running."""
    started: list[Worker] = []
    try:
        for i, (cmd, env) in enumerate(zip(cmds, envs, strict=True)):
            started.append(Worker(cmd, env, tmp / f"worker-{time.monotonic_ns()}-{i}.err"))
        yield started
    finally:
        for w in started:
            w.kill()


def run_group(
    cfg: Config,
    envs: list[dict[str, str]],
    batches: list[int],
    tmp: Path,
    on_ready: Callable[[list[Worker]], str] | None = None,
) -> Group:
    """Start one worker per env, all running ``batches`` in turn; every worker starts each
    round at the same instant. ``on_ready`` may inspect the ready workers and return a note."""
    threads = 1 if cfg.device == "cpu" else 0
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child",
        "--device", "cpu" if cfg.device == "cpu" else "cuda:0",
        "--batches", ",".join(map(str, batches)), "--hidden", str(cfg.hidden),
        "--layers", str(cfg.layers), "--seconds", str(cfg.seconds),
        "--warmup-s", str(cfg.warmup_s), "--threads", str(threads),
    ]  # fmt: skip
    group = Group(batches)
    with workers([cmd] * len(envs), envs, tmp) as procs:
        deadline = time.monotonic() + START_TIMEOUT_S
        group.ready = [w.expect(deadline) for w in procs]
        if on_ready is not None:
            group.note = on_ready(procs)
        for _ in batches:
            start_at = time.time() + RELEASE_AHEAD_S
            for w in procs:
                w.send(f"go {start_at}")
            deadline = time.monotonic() + RELEASE_AHEAD_S + cfg.seconds + ROUND_SLACK_S
            group.rounds.append([float(w.expect(deadline)["items_per_s"]) for w in procs])
        for w in procs:
            w.proc.wait(30)
    return group


# -- the rows ---------------------------------------------------------------------------------


def find_gpu(index: int) -> Gpu:
    """The GPU's uuid, memory and CPUs from NVML (``gpufleet.gpu.discovery``), or the reason
    there are none. The parent never initialises CUDA itself."""
    from gpufleet.gpu.discovery import discover

    host = discover()
    match = [g for g in host.gpus if g.index == index]
    if not match:
        return Gpu(error=host.error or f"NVML lists no GPU {index}")
    g = match[0]
    return Gpu(g.uuid, g.name, g.memory_total_mib, tuple(g.cpu_affinity), host.driver_version)


def worker_env(gpu: Gpu, cfg: Config, limits_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(INHERITED_PREFIXES)}
    if cfg.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif gpu.uuid:
        env["CUDA_VISIBLE_DEVICES"] = gpu.uuid  # what the supervisor gives a worker's slot
    env.update(limits_env)
    return env


def run(cfg: Config, gpu: Gpu, budget_mib: int | None, tmp: Path) -> dict[str, Any]:
    from gpufleet.errors import Unavailable
    from gpufleet.gpu.mps import MpsDaemon
    from gpufleet.worker.limits import WorkerLimits

    def limits(mode: str, k: int) -> dict[str, str]:
        memory = None if budget_mib is None else budget_mib // k
        return WorkerLimits(mode, memory, 100 // k, gpu.cpus).to_env()

    b = cfg.batch
    groups: dict[tuple[str, int], Group] = {}
    # One worker alone: batch k x b for each k; its batch-b round is also fraction k=1.
    sizes = sorted({1, *cfg.ks})
    single = run_group(cfg, [worker_env(gpu, cfg, limits("fraction", 1))], [k * b for k in sizes],
                       tmp)  # fmt: skip
    for i, k in enumerate(sizes):
        groups["batch", k] = Group([k * b], [single.rounds[i]], single.ready)
    groups["fraction", 1] = groups["batch", 1]
    for k in cfg.ks:
        if k > 1:
            envs = [worker_env(gpu, cfg, limits("fraction", k)) for _ in range(k)]
            groups["fraction", k] = run_group(cfg, envs, [b], tmp)

    mps_skipped = ""
    if cfg.device == "cpu":
        mps_skipped = MPS_NEEDS
    elif gpu.uuid is None:
        mps_skipped = f"{MPS_NEEDS} (no GPU uuid from NVML: {gpu.error})"
    else:
        daemon = MpsDaemon(gpu.uuid, tmp / "mps", name=gpu.name or gpu.uuid)
        try:
            daemon.start()
            for k in cfg.ks:
                memory = None if budget_mib is None else budget_mib // k
                client = daemon.client_env(thread_percent=100 // k, memory_mib=memory)
                envs = [worker_env(gpu, cfg, {**limits("mps", k), **client}) for _ in range(k)]
                groups["mps", k] = run_group(
                    cfg, envs, [b], tmp, lambda ws: _mps_clients(daemon, ws)
                )
        except Unavailable as exc:  # the MPS daemon did not start: the other rows stand
            mps_skipped = f"{MPS_NEEDS}: {exc}"
        except (RuntimeError, TimeoutError) as exc:  # a worker under MPS failed
            mps_skipped = f"mps failed: {str(exc)[-800:]}; daemon log: {daemon.log_tail()}"
        finally:
            daemon.stop()
    return summarise(cfg, gpu, budget_mib, groups, mps_skipped)


def _mps_clients(daemon: MpsDaemon, procs: list[Worker]) -> str:
    """How many of the row's workers the MPS daemon lists as clients (proof they use MPS)."""
    pids = {w.proc.pid for w in procs}
    clients: set[int] = set()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for server in daemon.command("get_server_list").split():
            if server.isdigit():
                listed = daemon.command(f"get_client_list {server}").split()
                clients |= {int(p) for p in listed if p.isdigit()}
    return f"{len(pids & clients)}/{len(pids)} MPS clients"


def summarise(
    cfg: Config, gpu: Gpu, budget_mib: int | None, groups: dict[tuple[str, int], Group],
    mps_skipped: str,
) -> dict[str, Any]:  # fmt: skip
    b = cfg.batch
    total = {key: sum(g.rounds[0]) for key, g in groups.items()}
    one = total["batch", 1]
    metrics: dict[str, float] = {}
    for (mode, k), value in sorted(total.items(), key=lambda kv: (kv[0][1], MODES.index(kv[0][0]))):
        metrics[f"{mode}_k{k}_items_per_s"] = value
        metrics[f"{mode}_vs_one_k{k}"] = value / one
        if mode != "batch":
            metrics[f"{mode}_vs_batch_k{k}"] = value / total["batch", k]
    for k in cfg.ks:
        if ("mps", k) in total:
            metrics[f"mps_vs_fraction_k{k}"] = total["mps", k] / total["fraction", k]
    top = max(cfg.ks)
    targets: dict[str, tuple[str, float]] = {}
    if f"mps_vs_fraction_k{top}" in metrics:
        targets[f"mps_vs_fraction_k{top}"] = (">=", 1.0)  # MPS beats time-slicing
        if top >= 4:
            targets[f"mps_vs_one_k{top}"] = (">=", 3.0)  # the seeds: "3x QPS" with MPS

    ready = groups["batch", 1].ready[0]
    where = ready["device_name"] if cfg.device == "cuda" else "cpu, 1 torch thread per worker"
    dtype = "fp16" if cfg.device == "cuda" else "fp32"
    memory = "not applied on CPU" if cfg.device == "cpu" else f"of {budget_mib} MiB"
    rows: list[Row] = [
        (f"MLP {cfg.layers} x {cfg.hidden}, {dtype}, on {where}",
         f"b={b} per worker, {cfg.seconds:g} s per row", ""),
        (f"shares: 1/k of the memory ({memory}), 100//k % compute",
         "items/s; x batch k, x one worker", ""),
    ]  # fmt: skip
    for k in sorted({1, *cfg.ks}):
        for mode in MODES:
            if k in cfg.ks or mode == "batch":
                rows.append(_row(mode, k, cfg, groups, total, mps_skipped))
    if mps_skipped:
        rows.append((f"mps skipped: {mps_skipped}", "", ""))
    if cfg.device == "cpu":
        rows.append(("on CPU: k workers of 1 thread against one of 1 thread; "
                     "these rows compare cores, not GPU sharing", "", ""))  # fmt: skip
    if not targets:
        rows.append((f"no targets: mps_vs_fraction_k{top} >= 1 needs the mps rows", "", ""))
    machine: dict[str, Any] = {
        "device": cfg.device, "gpu": gpu.name or None, "driver": gpu.driver,
        "torch": ready["torch"], "ks": list(cfg.ks), "batch": b, "hidden": cfg.hidden,
        "layers": cfg.layers, "dtype": dtype, "seconds": cfg.seconds,
        "memory_budget_mib": budget_mib, "mps_thread_percent": "100//k per worker",
        "mps_skipped": mps_skipped or None,
        "mps_clients": {str(k): g.note for (m, k), g in groups.items() if m == "mps"},
    }  # fmt: skip
    return {**result(BENCH, metrics, targets, **machine), "_rows": rows}


def _row(
    mode: str, k: int, cfg: Config, groups: dict[tuple[str, int], Group],
    total: dict[tuple[str, int], float], mps_skipped: str,
) -> Row:  # fmt: skip
    b, pct = cfg.batch, 100 // k
    label = {
        "batch": f"k={k} batch: one worker, batch {k * b}",
        "fraction": f"k={k} fraction: {k} workers, {pct}% each"
        if k > 1 else "k=1 fraction: one worker (= batch k=1)",
        "mps": f"k={k} mps: {k} worker{'s' * (k > 1)}, {pct}% threads each",
    }[mode]  # fmt: skip
    if (mode, k) not in groups:
        return (label, "skipped" if mps_skipped else "not run", "")
    value = total[mode, k]
    per = groups[mode, k].rounds[0]
    text = f"{value:,.0f} items/s"
    if len(per) > 1:
        text += f" ({min(per):,.0f}-{max(per):,.0f})"
    text += f"; x{value / total['batch', k]:.2f}, x{value / total['batch', 1]:.2f}"
    if mode == "mps":
        text += f"; x{value / total['fraction', k]:.2f} fraction"
        if groups[mode, k].note:
            text += f"; {groups[mode, k].note}"
    target = ""
    if mode == "mps" and k == max(cfg.ks):
        target = ">= 1.0 x fraction" + (", >= 3.0 x one" if k >= 4 else "")
    return (label, text, target)


# -- command line -----------------------------------------------------------------------------


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        try:
            child_main(sys.argv[2:])
        except BaseException:
            traceback.print_exc()
            sys.exit(1)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model, 1 s rows: a minute")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--device", choices=["cuda", "cpu"], help="cuda when NVML sees a GPU")
    ap.add_argument("--gpu", type=int, default=0, help="the GPU's NVML index (default 0)")
    ap.add_argument("--ks", default="1,2,4", help="worker counts, comma-separated")
    ap.add_argument("--batch", type=int, help="batch per worker (16; quick 8)")
    ap.add_argument("--hidden", type=int, help="the MLP's width (2048; quick 1024)")
    ap.add_argument("--layers", type=int, help="Linear layers (8; quick 4)")
    ap.add_argument("--seconds", type=float, help="measured seconds per row (5; quick 1)")
    ap.add_argument(
        "--memory-budget-mib",
        type=int,
        help="GPU memory split among a row's workers (default: 90%% of the GPU's)",
    )
    args = ap.parse_args()  # fmt: skip
    q = args.quick
    ks = tuple(sorted({int(k) for k in args.ks.split(",")}))
    if not ks or min(ks) < 1:
        ap.error("--ks: worker counts of 1 or more")
    gpu = find_gpu(args.gpu) if args.device != "cpu" else Gpu(error="--device cpu")
    device = args.device or ("cuda" if gpu.uuid else "cpu")
    cfg = Config(
        device=device, ks=ks, batch=args.batch or (8 if q else 16),
        hidden=args.hidden or (1024 if q else 2048), layers=args.layers or (4 if q else 8),
        seconds=args.seconds or (1.0 if q else 5.0), warmup_s=0.2 if q else 0.5,
    )  # fmt: skip
    budget = args.memory_budget_mib
    if budget is None:
        total = gpu.memory_mib if device == "cuda" else CPU_BUDGET_MIB
        budget = None if total is None else int(total * 0.9)
    with tempfile.TemporaryDirectory(prefix="gpufleet-sharing-") as tmp:
        outcome = run(cfg, gpu, budget, Path(tmp))
    rows = outcome.pop("_rows")
    report(outcome, rows, args.json)


if __name__ == "__main__":
    main()
