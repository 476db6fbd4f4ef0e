"""The supervisor: one worker process per slot per deployed model, kept alive, drained on stop.

A slot is what one worker runs on: GPUs (the worker sees only them: ``CUDA_VISIBLE_DEVICES``)
with the limits of its share (``env``: memory cap, MPS pipe and percentages, CPU affinity), or
a CPU slot on a host without GPUs. ``gpufleet.gpu.allocation`` decides the placements; without
them every deployment runs ``workers_per_slot`` workers on every slot.

A worker that exits on its own is restarted with exponential backoff (1 s doubling to 60 s,
back to 1 s after a minute of healthy running), so a model that crashes at load does not spin.
One that exits with ``EXIT_REFUSED`` (incompatible GPU, corrupted files) is not restarted.
The tasks it held are not lost: ``on_exit`` hands them back at once (the queue's
``recover_worker``) with the reason, a known CUDA failure in the worker's last output explained
(``gpu.cuda_errors``); failing that, their leases expire and the queue hands them on. Workers'
stderr passes through to ours, and its last lines are kept for that reason.

``standby_per_slot`` keeps that many standby processes per slot (``worker.standby``): torch
imported, the device initialised, no model. A worker that must start (a restart, a new
version) takes a standby's process when the slot has one, and a new standby is started
behind it, so a restart is bound by reading the model's weights, not by ``import torch``.

``stop`` drains: SIGTERM to every worker (each stops claiming, finishes its batch, writes its
results, and releases the rest at the end of its grace period), then SIGKILL for any still
running a little after the grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpufleet.worker.crash import TAIL_LINES, crash_reason, forward_output
from gpufleet.worker.process import EXIT_REFUSED
from gpufleet.worker.standby import Assignment

log = logging.getLogger(__name__)

BACKOFF_MIN_S, BACKOFF_MAX_S, HEALTHY_AFTER_S = 1.0, 60.0, 60.0


@dataclass(frozen=True)
class Slot:
    name: str  # "cpu0", "gpu0", "gpu0+1"
    device: str  # what the worker loads onto: "cpu" or "cuda:0"
    visible_gpu: str | None = None  # CUDA_VISIBLE_DEVICES for the worker
    env: tuple[tuple[str, str], ...] = ()  # the share's limits (see worker.limits, gpu.mps)

    @property
    def is_gpu(self) -> bool:
        return self.visible_gpu is not None


@dataclass(frozen=True)
class Deployment:
    """A model to serve: ``spec`` is ``builtin:NAME``, a model directory or NAME@sha256:..."""

    spec: str
    name: str
    version: str
    lanes: tuple[str, ...] = ("interactive", "batch")


@dataclass
class WorkerHandle:
    worker_id: str
    deployment: Deployment
    slot: Slot
    proc: subprocess.Popen[str] | None = None
    state: str = "starting"  # starting | ready | backoff | failed | stopped
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    backoff_s: float = BACKOFF_MIN_S
    last_exit: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


@dataclass
class StandbyHandle:
    slot: Slot
    proc: subprocess.Popen[str]
    state: str = "starting"  # starting | standby (device ready, waiting for a model)


class Supervisor:
    def __init__(
        self,
        deployments: list[Deployment],
        slots: list[Slot],
        *,
        workers_per_slot: int = 1,
        env: Mapping[str, str] | None = None,
        grace_s: float = 30.0,
        poll_s: float = 0.2,
        standby_per_slot: int = 0,
        placements: list[tuple[Deployment, Slot, str]] | None = None,
        on_exit: Callable[[str, str], object] | None = None,
    ) -> None:
        """``placements``: (deployment, slot, worker name) for each worker, when an allocator
        chose them; otherwise ``workers_per_slot`` workers of every deployment on every slot.
        ``on_exit(worker_id, reason)`` is called when a worker exits by itself."""
        self.env = dict(os.environ if env is None else env)
        self.grace_s = grace_s
        self.poll_s = poll_s
        self.workers: list[WorkerHandle] = []
        if placements is not None:
            slots = [slot for _, slot, _ in placements]
        self.slots = list(dict.fromkeys(slots))
        self.standby_per_slot = standby_per_slot
        self.standbys: list[StandbyHandle] = []
        # A standby that exits by itself (a broken device) is restarted with backoff too.
        self._standby_backoff = {slot: BACKOFF_MIN_S for slot in self.slots}
        self._standby_next = {slot: 0.0 for slot in self.slots}
        host = os.uname().nodename
        if placements is None:
            placements = [
                (dep, slot, f"{dep.name}@{dep.version}/{slot.name}.{k}")
                for dep in deployments
                for slot in slots
                for k in range(workers_per_slot)
            ]
        # The pid and a nonce tell this serve's workers from another's with the same host name
        # (containers in their own PID namespaces): recover_worker must never take a live
        # worker's tasks.
        run = f"{os.getpid()}-{secrets.token_hex(3)}"
        for dep, slot, name in placements:
            wid = f"{host}/{name}/{run}"[:128]
            self.workers.append(WorkerHandle(wid, dep, slot))
        self.on_exit = on_exit
        self._tails: dict[subprocess.Popen[str], tuple[deque[str], threading.Thread]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        for w in self.workers:
            self._spawn(w)
        with self._lock:
            self._fill_standbys(time.monotonic())
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._thread.start()

    def _popen(self, slot: Slot, args: list[str], stdin: int) -> subprocess.Popen[str]:
        env = dict(self.env)
        if slot.visible_gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot.visible_gpu
        env.update(slot.env)
        cmd = [sys.executable, "-m", "gpufleet.worker.process", "--device", slot.device, *args]
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=stdin,
            text=True,
            errors="replace",  # a model printing bytes must not stop us draining its pipe
        )
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        forward = threading.Thread(target=forward_output, args=(proc, tail), daemon=True)
        forward.start()
        self._tails[proc] = (tail, forward)
        return proc

    def _last_output(self, proc: subprocess.Popen[str]) -> list[str]:
        tail, forward = self._tails.pop(proc, (deque(), None))
        if forward is not None:
            forward.join(2)  # the last lines may still be in the pipe
        return list(tail)

    def _spawn(self, w: WorkerHandle) -> None:
        w.state, w.started_at = "starting", time.monotonic()
        standby = self._take_standby(w)
        if standby is not None:
            w.proc = standby.proc
            log.info("worker %s takes standby pid %d", w.worker_id, w.proc.pid)
            return
        w.proc = self._popen(
            w.slot,
            [
                "--model",
                w.deployment.spec,
                "--worker-id",
                w.worker_id,
                "--lanes",
                ",".join(w.deployment.lanes),
                "--grace-s",
                str(self.grace_s),
            ],
            subprocess.DEVNULL,
        )
        log.info("started worker %s (pid %d)", w.worker_id, w.proc.pid)

    def _take_standby(self, w: WorkerHandle) -> StandbyHandle | None:
        """Hand ``w``'s model to a live standby of its slot (one that is still preparing
        will do: it reads the assignment when it is ready)."""
        line = Assignment(w.deployment.spec, w.worker_id, w.deployment.lanes, self.grace_s)
        for standby in [s for s in self.standbys if s.slot == w.slot]:
            self.standbys.remove(standby)
            if standby.proc.poll() is not None or standby.proc.stdin is None:
                continue
            try:
                standby.proc.stdin.write(line.to_line())
                standby.proc.stdin.close()
            except OSError:  # it died a moment ago: try the next one
                continue
            return standby
        return None

    def _fill_standbys(self, now: float) -> None:
        for slot in self.slots:
            if now < self._standby_next[slot]:
                continue
            missing = self.standby_per_slot - sum(1 for s in self.standbys if s.slot == slot)
            for _ in range(missing):
                proc = self._popen(slot, ["--standby"], subprocess.PIPE)
                self.standbys.append(StandbyHandle(slot, proc))
                log.info("started standby on %s (pid %d)", slot.name, proc.pid)

    def _check_standbys(self, now: float) -> None:
        for standby in list(self.standbys):
            code = standby.proc.poll()
            if code is None:
                continue
            self.standbys.remove(standby)
            self._tails.pop(standby.proc, None)
            slot = standby.slot
            log.warning(
                "standby pid %d on %s exited with %s; a new one in %.0fs",
                standby.proc.pid, slot.name, code, self._standby_backoff[slot],
            )  # fmt: skip
            self._standby_next[slot] = now + self._standby_backoff[slot]
            self._standby_backoff[slot] = min(self._standby_backoff[slot] * 2, BACKOFF_MAX_S)
        self._fill_standbys(now)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        """A worker's (or standby's) stdout: ``standby``, then ``ready`` once it serves."""
        assert proc.stdout is not None
        for line in proc.stdout:
            word = line.strip()
            if word not in ("ready", "standby"):
                continue
            with self._lock:
                for w in self.workers:
                    if w.proc is proc and word == "ready":
                        w.state = "ready"
                for s in self.standbys:
                    if s.proc is proc and word == "standby":
                        s.state = "standby"

    def _watch(self) -> None:
        from gpufleet.monitor.metrics import mark_process_dead

        while not self._stopping.wait(self.poll_s):
            exited: list[tuple[WorkerHandle, subprocess.Popen[str]]] = []
            with self._lock:
                for w in self.workers:
                    proc = w.proc
                    try:
                        if self._check(w, time.monotonic(), mark_process_dead) and proc:
                            exited.append((w, proc))
                    except Exception:  # e.g. fork failed: try again on the next round
                        log.exception("supervising worker %s failed", w.worker_id)
                        w.state, w.next_start = "backoff", time.monotonic() + w.backoff_s
                try:
                    self._check_standbys(time.monotonic())
                except Exception:
                    log.exception("supervising standbys failed")
            for w, proc in exited:  # outside the lock: reading pipes, writing the queue
                self._report_exit(w, proc)

    def _report_exit(self, w: WorkerHandle, proc: subprocess.Popen[str]) -> None:
        reason = crash_reason(w.worker_id, proc.returncode, self._last_output(proc))
        log.warning("%s", reason)
        if self.on_exit is not None:
            try:
                self.on_exit(w.worker_id, reason)
            except Exception:  # the database is away: the leases expire instead
                log.exception("handing back the tasks of %s failed", w.worker_id)

    def _check(self, w: WorkerHandle, now: float, mark_process_dead: Any) -> bool:
        """Restart ``w`` if its backoff is over; notice (True) if it exited."""
        if w.state == "failed":
            return False
        if w.state == "backoff":
            if now >= w.next_start:
                w.restarts += 1
                self._spawn(w)
            return False
        if w.proc is None or w.proc.poll() is None:
            if w.state == "ready" and now - w.started_at > HEALTHY_AFTER_S:
                w.backoff_s = BACKOFF_MIN_S
            return False
        w.last_exit = w.proc.returncode
        mark_process_dead(w.proc.pid)
        if w.last_exit == EXIT_REFUSED:
            w.state = "failed"
            log.error(
                "worker %s refused to load %s (see its 'refused:' line above); not restarting",
                w.worker_id,
                w.deployment.spec,
            )
            return True
        w.state, w.next_start = "backoff", now + w.backoff_s
        log.warning(
            "worker %s exited with %s; restarting in %.0fs", w.worker_id, w.last_exit, w.backoff_s
        )
        w.backoff_s = min(w.backoff_s * 2, BACKOFF_MAX_S)
        return True

    def status(self) -> list[dict[str, object]]:
        """Every worker, then every standby (``worker_id`` and ``model`` None)."""
        rows: list[dict[str, object]]
        with self._lock:
            rows = [
                {
                    "worker_id": w.worker_id,
                    "model": w.deployment.name,
                    "version": w.deployment.version,
                    "slot": w.slot.name,
                    "device": w.slot.device,
                    "pid": w.pid,
                    "state": w.state,
                    "restarts": w.restarts,
                }
                for w in self.workers
            ]
            rows += [
                {
                    "worker_id": None,
                    "model": None,
                    "version": None,
                    "slot": s.slot.name,
                    "device": s.slot.device,
                    "pid": s.proc.pid,
                    "state": s.state,
                    "restarts": 0,
                }
                for s in self.standbys
            ]
        return rows

    def ready_count(self, model: str) -> int:
        with self._lock:
            return sum(1 for w in self.workers if w.deployment.name == model and w.state == "ready")

    def refused_count(self, model: str) -> int:
        """Workers of ``model`` that refused to load it (``EXIT_REFUSED``): not restarted."""
        with self._lock:
            return sum(
                1 for w in self.workers if w.deployment.name == model and w.state == "failed"
            )

    def wait_ready(self, timeout: float) -> bool:
        """Until every worker has loaded and warmed up its model (False at once when one
        refused to load)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if all(w.state == "ready" for w in self.workers):
                    return True
                if any(w.state == "failed" for w in self.workers):
                    return False
            time.sleep(0.05)
        return False

    def stopping(self) -> None:
        """The server is shutting down: restart nothing from now on. A Ctrl-C reaches the
        workers with the server (one process group) and they drain and exit at once, before
        ``stop`` is called; without this, each was reported as exited and restarted."""
        self._stopping.set()

    def stop(self, grace_s: float | None = None) -> None:
        """Drain every worker: SIGTERM, wait up to the grace period (plus time to release),
        then SIGKILL the rest."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        grace = self.grace_s if grace_s is None else grace_s
        with self._lock:
            procs = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
            for w in self.workers:
                w.state = "stopped"
            standbys = [s.proc for s in self.standbys]
            self.standbys.clear()
        for proc in standbys:  # nothing held: end of input, or SIGTERM mid-start
            with contextlib.suppress(OSError):
                if proc.stdin is not None:
                    proc.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        procs += standbys
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace + 5.0
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker pid %d did not stop in time; killing it", p.pid)
                p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(10)
