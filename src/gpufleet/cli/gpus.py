"""``gpufleet gpus``: what NVML sees on this host (GPUs, topology, processes) and what a running
``gpufleet serve`` holds of it; ``gpufleet node-labels``: the Kubernetes labels for this node.
Thin: discovery is ``gpufleet.gpu.discovery``, the labels ``gpufleet.gpu.labels``; the only
work here is reading ``/proc`` to name processes and find serve's workers among them.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from gpufleet.cli.context import console, err_console, fail, print_json, state
from gpufleet.gpu.compat import fmt, parse_version
from gpufleet.gpu.discovery import GpuInfo, GpuProcess, HostInfo, cpu_ranges, discover
from gpufleet.gpu.labels import format_labels
from gpufleet.gpu.labels import node_labels as labels_of
from gpufleet.gpu.ledger import descendants, match_workers, read_allocations, serve_alive

ALLOCATIONS = Path("run") / "allocations.json"  # under the data dir, written by gpufleet serve
TOPOLOGY_LEGEND = (
    "X = self, NV# = # NVLinks, PIX = at most one PCIe bridge, PXB = several PCIe bridges, "
    "PHB = a PCIe host bridge, NODE = PCIe host bridges within a NUMA node, "
    "SYS = across NUMA nodes"
)


class LabelFormat(StrEnum):
    JSON = "json"
    YAML = "yaml"
    KUBECTL = "kubectl"


def gpus(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print the host as JSON."),
    record: Path | None = typer.Option(
        None, "--record", metavar="FILE", help="Record every NVML call to FILE (bug reports)."
    ),
    note: str = typer.Option("", "--note", help="With --record: a note stored in the file."),
    allocations: bool = typer.Option(
        False, "--allocations", help="Also show what the running gpufleet serve holds."
    ),
) -> None:
    """This host's GPUs: memory, capability, MIG, NUMA node and CPU affinity, topology and the
    processes using them. No GPU is not an error: serve then runs workers on CPU slots."""
    if record is not None:
        _record(record, note)
        return
    host = discover()
    path = state(ctx).settings.data_dir / ALLOCATIONS
    held = _read_or_fail(path) if allocations else None
    if json_out:
        data = host.to_dict()
        if allocations:
            data["allocations"] = None if held is None else _allocations_json(host, held, path)
        print_json(data)
        return
    if host.gpus:
        _print_host(host)
    else:
        _line(f"no GPU: {host.error}; gpufleet serve runs workers on CPU slots")
    if allocations:
        if held is None:
            _line(f"no allocations: gpufleet serve is not running under this data dir ({path})")
        else:
            _print_allocations(host, held)


def node_labels(
    output: LabelFormat = typer.Option(LabelFormat.JSON, "--format", help="Output format."),
    node: str | None = typer.Option(
        None, "--node", help="Node name for --format kubectl (default: env NODE_NAME, hostname)."
    ),
    runtime_cuda: str | None = typer.Option(
        None, "--runtime-cuda", help="CUDA the serving runtime was built with, e.g. 12.8."
    ),
) -> None:
    """The labels this Kubernetes node should carry (GPU Feature Discovery's names, and
    gpufleet.dev/* for node affinity). With no GPU: none, and a note on stderr."""
    try:
        runtime = parse_version(runtime_cuda) if runtime_cuda else None
    except ValueError:
        fail(f"--runtime-cuda must be a CUDA version such as 12.8, got {runtime_cuda!r}")
    host = discover()
    labels = labels_of(host, runtime_cuda=runtime)
    if not labels:
        what = "a command removing gpufleet.dev/* labels" if output == "kubectl" else "no labels"
        err_console.print(f"no GPU: {host.error}; {what}", markup=False, highlight=False)
    name = node or os.environ.get("NODE_NAME") or socket.gethostname()
    sys.stdout.write(format_labels(labels, output.value, node=name))


# --- the host --------------------------------------------------------------------------------


def _record(path: Path, note: str) -> None:
    from gpufleet.gpu.nvml import NvmlUnavailable, record

    try:
        host = record(path, note=note)
    except NvmlUnavailable as exc:
        fail(f"cannot record: {exc} (the failed nvmlInit() is in {path})")
    except OSError as exc:
        fail(f"cannot write {path}: {exc}")
    gpus = ", ".join(f"{g.index}: {g.name}" for g in host.gpus) or host.error
    _line(f"recorded NVML on this host ({gpus}) to {path}")
    _line(f"replay it with GPUFLEET_NVML_RECORDING={path} gpufleet gpus")


def _print_host(host: HostInfo) -> None:
    cuda = fmt(host.driver_cuda) if host.driver_cuda else "?"
    header = f"driver {host.driver_version or '?'}, CUDA (driver) {cuda}"
    if host.source != "nvml":
        header += f", replayed from {host.source}"
    _line(header)
    table = Table("GPU", "name", "memory used / total", "CC", "MIG", "compute mode", "NUMA")
    for column in ("CPU affinity", "util (mem)"):
        table.add_column(column)
    for g in host.gpus:
        util = "-" if g.utilization_gpu is None else f"{g.utilization_gpu}%"
        if g.utilization_memory is not None:
            util += f" ({g.utilization_memory}%)"
        mig = "-" if g.mig_mode is None else ("on" if g.mig_mode else "off")
        memory = f"{_gib(g.memory_used_mib)} / {_gib(g.memory_total_mib)} GiB"
        cells = [str(g.index), g.name, memory, f"{fmt(g.capability)} {g.family}", mig]
        cells += [g.compute_mode, _numa(g), cpu_ranges(g.cpu_affinity), util]
        table.add_row(*map(Text, cells))
    console.print(table)
    if len(host.gpus) > 1:
        console.print(_topology(host))
        _line(TOPOLOGY_LEGEND)
    _print_processes(host)


def _topology(host: HostInfo) -> Table:
    """The matrix of ``nvidia-smi topo -m``."""
    table = Table("", *(f"GPU{g.index}" for g in host.gpus), "CPU affinity", "NUMA affinity")
    for a in host.gpus:
        links = ["X" if a.index == b.index else host.link(a.index, b.index) for b in host.gpus]
        cells = [f"GPU{a.index}", *links, cpu_ranges(a.cpu_affinity), _numa(a)]
        table.add_row(*map(Text, cells))
    return table


def _print_processes(host: HostInfo) -> None:
    rows = [(g, p) for g in host.gpus for p in g.processes]
    if not rows:
        _line("no processes on the GPUs")
        return
    table = Table("GPU", "PID", "process", "GPU memory", "SM")
    for g, p in rows:
        table.add_row(*map(Text, [str(g.index), str(p.pid), _comm(p.pid), *_usage(p)]))
    console.print(table)


def _usage(p: GpuProcess | None) -> list[str]:
    if p is None:
        return ["-", "-"]
    memory = "n/a" if p.used_memory_mib is None else f"{p.used_memory_mib} MiB"
    return [memory, "-" if p.sm_util is None else f"{p.sm_util}%"]


# --- what serve holds ------------------------------------------------------------------------


def _read_or_fail(path: Path) -> dict[str, Any] | None:
    try:
        return read_allocations(path)
    except (OSError, ValueError) as exc:
        fail(f"cannot read the allocations file {path}: {exc}")


def _placements_on(held: dict[str, Any], index: int) -> list[dict[str, Any]]:
    return [p for p in held.get("placements", []) if index in (p.get("gpus") or [])]


@dataclass
class _GpuUse:
    """Who runs on one GPU: serve's workers by placement, serve's other processes, the rest."""

    workers: dict[str, GpuProcess] = field(default_factory=dict)
    unmatched: list[GpuProcess] = field(default_factory=list)
    others: list[GpuProcess] = field(default_factory=list)


def _gpu_use(host: HostInfo, held: dict[str, Any]) -> dict[int, _GpuUse]:
    pid = held.get("serve_pid")
    ours = descendants(pid) if isinstance(pid, int) and serve_alive(pid) else set()
    use = {}
    for g in host.gpus:
        mine = [p for p in g.processes if p.pid in ours]
        workers, unmatched = match_workers(_placements_on(held, g.index), mine)
        use[g.index] = _GpuUse(workers, unmatched, [p for p in g.processes if p.pid not in ours])
    return use


def _allocations_json(host: HostInfo, held: dict[str, Any], path: Path) -> dict[str, Any]:
    workers = {
        w: {"gpu": i, "pid": p.pid, "used_memory_mib": p.used_memory_mib}
        for i, use in _gpu_use(host, held).items()
        for w, p in use.workers.items()
    }
    stale = not serve_alive(held.get("serve_pid"))
    return {**held, "path": str(path), "stale": stale, "live": workers}


def _print_allocations(host: HostInfo, held: dict[str, Any]) -> None:
    pid = held.get("serve_pid")
    if not serve_alive(pid):
        _line(
            f"stale allocations: gpufleet serve (pid {pid}) is not running; they were written "
            f"at {held.get('written_at', '?')} on {held.get('host', '?')}"
        )
    else:
        since = held.get("written_at", "?")
        _line(f"gpufleet serve pid {pid}, policy {held.get('policy', '?')}, since {since}")
    use = _gpu_use(host, held)
    totals = {g.index: g.memory_total_mib for g in host.gpus}
    for g in held.get("gpus", []):
        index = g["index"]
        total = g.get("memory_total_mib") or totals.get(index, 0)
        _print_gpu_held(g, _placements_on(held, index), use.get(index, _GpuUse()), total)
    cpu = [p for p in held.get("placements", []) if not p.get("gpus")]
    if cpu:
        table = Table("worker", "model", "mode", "CPUs", title="CPU slots", title_justify="left")
        for p in cpu:
            cells = _placement_cells(p)
            table.add_row(*map(Text, [*cells[:3], cells[5]]))
        console.print(table)


def _print_gpu_held(
    gpu: dict[str, Any], placements: list[dict[str, Any]], here: _GpuUse, total: int
) -> None:
    title = f"GPU {gpu['index']} {gpu.get('name', '')} ({gpu.get('mode') or 'free'})"
    if not placements:
        _line(f"{title}: nothing placed")
        return
    table = Table("worker", "model", "mode", "memory limit", "compute", "CPUs", "PID")
    table.add_column("GPU memory")
    table.title, table.title_justify, table.caption_justify = title, "left", "left"
    for p in placements:
        proc = here.workers.get(p["worker"])
        table.add_row(*map(Text, [*_placement_cells(p), _pid(proc), _usage(proc)[0]]))
    for proc in here.unmatched:
        cells = ["(serve's, unmatched)", "", "", "", "", "", str(proc.pid), _usage(proc)[0]]
        table.add_row(*map(Text, cells))
    held_mib = sum(_held_mib(p, total) for p in placements)
    percent = sum(_held_percent(p) for p in placements)
    table.caption = f"held {_gib(held_mib)} / {_gib(total)} GiB memory, {percent}% / 100% compute"
    if held_mib > total or percent > 100:  # invariant 5 broken: say so loudly
        table.caption += " - OVER-COMMITTED"
    console.print(table)
    for proc in here.others:
        who = f"pid {proc.pid} ({_comm(proc.pid)}), {_usage(proc)[0]}"
        _line(f"  also on GPU {gpu['index']}, not serve's: {who}")


def _placement_cells(p: dict[str, Any]) -> list[str]:
    whole = p.get("mode") == "whole"
    memory = p.get("memory_mib")
    compute = p.get("compute_percent")
    return [
        str(p.get("worker", "?")),
        f"{p.get('model', '?')}@{p.get('version', '?')}",
        str(p.get("mode", "?")),
        "whole GPU" if whole and memory is None else ("-" if memory is None else f"{memory} MiB"),
        "100%" if whole and compute is None else ("-" if compute is None else f"{compute}%"),
        cpu_ranges(list(p.get("cpus") or [])),
    ]


def _held_mib(p: dict[str, Any], total: int) -> int:
    memory = p.get("memory_mib")
    return int(memory) if memory is not None else (total if p.get("mode") == "whole" else 0)


def _held_percent(p: dict[str, Any]) -> int:
    compute = p.get("compute_percent")
    return int(compute) if compute is not None else (100 if p.get("mode") == "whole" else 0)


# --- /proc -----------------------------------------------------------------------------------


def _comm(pid: int) -> str:
    """The process's name, when this host has it (a replayed recording's pids were another
    host's: the name is then whatever has that pid here, or "-")."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() or "-"
    except OSError:
        return "-"


def _pid(p: GpuProcess | None) -> str:
    return "-" if p is None else str(p.pid)


def _numa(g: GpuInfo) -> str:
    return "-" if g.numa_node is None else str(g.numa_node)


def _gib(mib: int) -> str:
    return f"{mib / 1024:.1f}"


def _line(text: str) -> None:
    console.print(text, markup=False, highlight=False)
