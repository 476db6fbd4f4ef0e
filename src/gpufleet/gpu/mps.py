"""NVIDIA MPS control daemons that gpufleet starts, owns and stops: one per GPU in mode ``mps``.

Each daemon gets private pipe and log directories under the data dir, so it never meets a
system-wide daemon (``/tmp/nvidia-mps``) or another gpufleet's. It runs in the foreground as
our child (``nvidia-cuda-mps-control -f``) so it is reaped, and sees only its GPU (by UUID:
indices move under ``CUDA_VISIBLE_DEVICES``). Workers reach it through
``CUDA_MPS_PIPE_DIRECTORY`` and run under the limits the driver enforces:
``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (share of SMs) and ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``.
The GPU's compute mode, clocks and MIG layout are never changed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from gpufleet.errors import MpsUnavailable

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"


class MpsDaemon:
    def __init__(self, gpu_uuid: str, base_dir: Path, *, name: str = "") -> None:
        self.gpu_uuid = gpu_uuid
        self.name = name or gpu_uuid
        self.pipe_dir = base_dir / "pipe"
        self.log_dir = base_dir / "log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "CUDA_VISIBLE_DEVICES": self.gpu_uuid,
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }

    def start(self, timeout_s: float = 15.0) -> None:
        exe = control_binary()
        for d in (self.pipe_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)  # private: only our workers (same user) may connect
        self._stop_stale()
        for f in self.pipe_dir.iterdir():  # a dead daemon's pipes would look like a live one
            if not f.is_dir():
                f.unlink(missing_ok=True)
        out = (self.log_dir / "gpufleet-daemon.out").open("ab")
        try:
            self.proc = subprocess.Popen(
                [exe, "-f"], env=self._env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        finally:
            out.close()
        deadline = time.monotonic() + timeout_s
        while not (self.pipe_dir / "control").exists():
            if self.proc.poll() is not None:
                raise MpsUnavailable(
                    f"the MPS daemon for {self.name} exited with {self.proc.returncode}: "
                    f"{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise MpsUnavailable(
                    f"the MPS daemon for {self.name} did not start in {timeout_s:.0f}s"
                )
            time.sleep(0.02)
        time.sleep(0.05)
        if self.proc.poll() is not None:
            raise MpsUnavailable(
                f"the MPS daemon for {self.name} exited with {self.proc.returncode}: "
                f"{self.log_tail()}"
            )
        log.info("MPS daemon for %s started (pid %d, %s)", self.name, self.proc.pid, self.pipe_dir)

    def _stop_stale(self) -> None:
        """A daemon left on our pipe directory by a serve that was killed (SIGKILL gives no
        chance to stop it): ask it to quit, then make sure it is gone."""
        try:
            pid = int((self.pipe_dir / "nvidia-cuda-mps-control.pid").read_text().strip())
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except (OSError, ValueError):
            return
        if not comm.startswith("nvidia-cuda-mps"):
            return  # the pid was reused by something else
        log.warning("stopping an MPS daemon left by an earlier serve (pid %d)", pid)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.command("quit")
        deadline = time.monotonic() + 10
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if _running(pid):
                os.kill(pid, signal.SIGKILL)

    def client_env(self, *, thread_percent: int | None, memory_mib: int | None) -> dict[str, str]:
        """What a worker needs to run under this daemon with these limits. The worker sees its
        GPU as device 0, so the memory limit names device 0."""
        env = {
            "CUDA_MPS_PIPE_DIRECTORY": str(self.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(self.log_dir),
        }
        if thread_percent is not None:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(thread_percent)
        if memory_mib is not None:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={memory_mib}M"
        return env

    def command(self, text: str, timeout_s: float = 10.0) -> str:
        """One ``nvidia-cuda-mps-control`` command (``get_server_list``, ``quit``...)."""
        exe = shutil.which(CONTROL) or CONTROL
        done = subprocess.run(
            [exe],
            input=text + "\n",
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        return done.stdout.strip()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        """``quit`` (the daemon ends its servers), then SIGTERM / SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self.command("quit", timeout_s)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        log.info("MPS daemon for %s stopped", self.name)
        self.proc = None

    def log_tail(self, n: int = 400) -> str:
        texts = []
        for f in ("gpufleet-daemon.out", "control.log"):
            with contextlib.suppress(OSError):
                texts.append((self.log_dir / f).read_text(errors="replace")[-n:].strip())
        return " | ".join(t for t in texts if t) or "(no log)"


def control_binary() -> str:
    """The path of ``nvidia-cuda-mps-control``, or ``MpsUnavailable`` saying what to do."""
    exe = shutil.which(CONTROL)
    if exe is None:
        raise MpsUnavailable(
            f"mode mps needs {CONTROL} (part of the NVIDIA driver's utilities) on PATH; "
            "install it or use mode fraction"
        )
    return exe


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class MpsDaemons:
    """One daemon per GPU uuid, under ``run_dir/mps/gpu<index>``; stopped together."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.daemons: dict[str, MpsDaemon] = {}

    def start(self, gpus: dict[str, int]) -> None:
        """``gpus``: uuid -> NVML index."""
        try:
            for uuid, index in sorted(gpus.items(), key=lambda kv: kv[1]):
                daemon = self.daemon_for(uuid, index)
                daemon.start()
                self.daemons[uuid] = daemon
        except Exception:
            self.stop()
            raise

    def daemon_for(self, uuid: str, index: int) -> MpsDaemon:
        """The daemon of GPU ``index`` (started or not): its directories are fixed by the GPU."""
        return MpsDaemon(uuid, self.run_dir / "mps" / f"gpu{index}", name=f"GPU {index}")

    def stop(self) -> None:
        for daemon in self.daemons.values():
            daemon.stop()
        self.daemons.clear()

    def __enter__(self) -> MpsDaemons:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
