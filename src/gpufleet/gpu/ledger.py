"""The allocations file: what a running ``gpufleet serve`` gave each worker
(``DATA_DIR/run/allocations.json``), read back by ``gpufleet gpus --allocations`` and matched
to the processes NVML sees on each GPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpufleet.gpu.discovery import GpuProcess, HostInfo

if TYPE_CHECKING:
    from gpufleet.gpu.allocation import Placement, Policy


def write_allocations(
    path: Path, host: HostInfo, placements: list[Placement], *, policy: Policy
) -> None:
    """What a running ``gpufleet serve`` holds, for ``gpufleet gpus --allocations``."""
    modes: dict[int, str] = {}
    for p in placements:
        for i in p.gpus:
            modes[i] = p.mode
    data: dict[str, Any] = {
        "serve_pid": os.getpid(),
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": os.uname().nodename,
        "policy": policy,
        "gpus": [
            {
                "index": g.index,
                "uuid": g.uuid,
                "name": g.name,
                "memory_total_mib": g.memory_total_mib,
                "mode": modes.get(g.index),
            }
            for g in host.gpus
        ],
        "placements": [
            {
                "worker": p.worker,
                **{k: v for k, v in asdict(p).items() if k not in ("slot", "replica", "uuids")},
            }
            for p in placements
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def read_allocations(path: Path) -> dict[str, Any] | None:
    """The allocations file a running ``gpufleet serve`` keeps; None when there is none."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None

    def ints(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(i, int) for i in value)

    gpus, placements = (
        data.get(k) if isinstance(data, dict) else None for k in ("gpus", "placements")
    )
    if not (
        isinstance(gpus, list)
        and isinstance(placements, list)
        and all(isinstance(g, dict) and isinstance(g.get("index"), int) for g in gpus)
        and all(
            isinstance(p, dict) and isinstance(p.get("worker"), str) and ints(p.get("gpus", []))
            for p in placements
        )
    ):
        raise ValueError("not an allocations file of gpufleet serve")
    checked: dict[str, Any] = data
    return checked


def serve_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:  # os.kill(0, …) would mean our process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def match_workers(
    placements: list[dict[str, Any]], processes: list[GpuProcess]
) -> tuple[dict[str, GpuProcess], list[GpuProcess]]:
    """Which of serve's ``processes`` on one GPU is which placement's worker: the one whose
    command line names the worker, else the only one left for the only placement left.
    Returns the matches and serve's processes left over."""
    matched: dict[str, GpuProcess] = {}
    left = list(processes)
    for p in list(left):
        args = [f"/{a}/" for a in _cmdline(p.pid)]  # worker ids: host/NAME/pid
        for pl in placements:
            name = f"/{pl['worker']}/"
            if pl["worker"] not in matched and any(name in a for a in args):
                matched[pl["worker"]] = p
                left.remove(p)
                break
    waiting = [pl["worker"] for pl in placements if pl["worker"] not in matched]
    if len(waiting) == 1 and len(left) == 1:
        matched[waiting[0]] = left.pop()
    return matched, left


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def process_children() -> dict[int, list[int]]:
    """Every process's direct children, by parent pid, from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        # field 2, the name, may hold blanks and parentheses: the ppid is 2nd after the last ")"
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(root: int) -> set[int]:
    """Every process under ``root``: workers may sit below a forkserver or a shell."""
    children = process_children()
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
