"""The MPS daemon's life cycle: started with private directories, stopped with ``quit``, a
daemon left by a killed serve replaced, failures reported in one error. A stand-in
``nvidia-cuda-mps-control`` (a shell script that keeps the real one's pipe-directory protocol)
runs here; ``tests/integration/test_sharing_gpu.py`` runs the real one on a GPU machine."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gpufleet.errors import MpsUnavailable
from gpufleet.gpu.mps import MpsDaemon, MpsDaemons

STAND_IN = r"""#!/bin/bash
pipe="$CUDA_MPS_PIPE_DIRECTORY"
if [ "$1" = "-f" ]; then
  if [ -n "$FAKE_MPS_FAIL" ]; then
    echo "An instance of this daemon is already running" >&2
    exit 1
  fi
  echo "$CUDA_VISIBLE_DEVICES" > "$pipe/visible"
  echo $$ > "$pipe/nvidia-cuda-mps-control.pid"
  : > "$pipe/control"
  while [ ! -e "$pipe/quit" ]; do sleep 0.02; done
  rm -f "$pipe/quit" "$pipe/control"
  exit 0
fi
read -r cmd
case "$cmd" in
  quit) : > "$pipe/quit" ;;
  get_server_list) echo 4242 ;;
esac
"""


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-cuda-mps-control"
    exe.write_text(STAND_IN)
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return exe


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text()


def test_a_daemon_per_gpu_starts_private_and_stops(stand_in: Path, tmp_path: Path) -> None:
    with MpsDaemons(tmp_path / "run") as daemons:
        daemons.start({"GPU-aaaa": 0, "GPU-bbbb": 1})
        d0 = daemons.daemons["GPU-aaaa"]
        assert d0.running and d0.pipe_dir == tmp_path / "run" / "mps" / "gpu0" / "pipe"
        assert (d0.pipe_dir / "visible").read_text().strip() == "GPU-aaaa"  # sees its GPU only
        assert oct(d0.pipe_dir.stat().st_mode & 0o777) == "0o700"
        assert d0.command("get_server_list") == "4242"
        assert d0.client_env(thread_percent=25, memory_mib=4096) == {
            "CUDA_MPS_PIPE_DIRECTORY": str(d0.pipe_dir),
            "CUDA_MPS_LOG_DIRECTORY": str(d0.log_dir),
            "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",
            "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=4096M",
        }
        procs = [d.proc for d in daemons.daemons.values()]
    assert all(p is not None and p.poll() == 0 for p in procs)  # quit, not killed
    assert not (d0.pipe_dir / "control").exists()


def test_a_daemon_left_by_a_killed_serve_is_replaced(stand_in: Path, tmp_path: Path) -> None:
    old = MpsDaemon("GPU-aaaa", tmp_path / "mps")
    old.start()
    assert old.proc is not None
    stale_pid = old.proc.pid
    old.proc = None  # as if its serve was SIGKILLed: nobody will stop it
    new = MpsDaemon("GPU-aaaa", tmp_path / "mps")
    new.start()
    try:
        deadline = time.monotonic() + 5
        while _alive(stale_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(stale_pid)
        assert new.running
        assert (new.pipe_dir / "nvidia-cuda-mps-control.pid").read_text().strip() == str(
            new.proc.pid if new.proc else ""
        )
    finally:
        new.stop()


def test_a_daemon_that_cannot_start_is_one_error(
    stand_in: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    # A control file left behind must not pass for a running daemon.
    (tmp_path / "mps" / "pipe").mkdir(parents=True)
    (tmp_path / "mps" / "pipe" / "control").touch()
    with pytest.raises(MpsUnavailable) as e:
        MpsDaemon("GPU-aaaa", tmp_path / "mps", name="GPU 0").start()
    assert "the MPS daemon for GPU 0 exited with 1" in e.value.message
    assert "An instance of this daemon is already running" in e.value.message


def test_no_mps_binary_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MpsUnavailable, match="mode mps needs nvidia-cuda-mps-control"):
        MpsDaemon("GPU-aaaa", tmp_path / "mps").start()


def test_stopping_twice_or_before_start_is_harmless(stand_in: Path, tmp_path: Path) -> None:
    d = MpsDaemon("GPU-aaaa", tmp_path / "mps")
    d.stop()
    d.start()
    d.stop()
    d.stop()
    assert not d.running
