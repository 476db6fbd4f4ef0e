"""Why a worker process ended, from its last output: its stderr passes through the supervisor
to ours line by line, the last lines kept; a known CUDA failure among them is explained
(``gpu.cuda_errors``), the most recent one first, and a death by signal is named as such.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import traceback
from collections import deque

from gpufleet.gpu.cuda_errors import explain

TAIL_LINES = 40  # of a worker's stderr, kept to explain its exit
RECENT_LINES = 12  # an explanation is looked for only this close to the end


def forward_output(proc: subprocess.Popen[str], tail: deque[str]) -> None:
    """A worker's stderr, passed through to ours line by line, its last lines kept."""
    assert proc.stderr is not None
    for line in proc.stderr:
        tail.append(line.rstrip("\n"))
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(line)
            sys.stderr.flush()


def crash_reason(worker_id: str, code: int | None, tail: list[str]) -> str:
    """Why a worker exited, for its log line and its tasks' error. A worker that saw its CUDA
    context lost says so in its last line; otherwise the latest known CUDA failure in its last
    lines is explained. An older, handled failure (an out-of-memory that was retried) further
    up does not count, and a death by signal is not blamed on one."""
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        how = f"was killed by {name}"
        if -code == signal.SIGKILL:
            how += " (the kernel's out-of-memory killer, or a kill -9)"
        elif -code == signal.SIGBUS:
            how += (
                " (a memory-mapped file, such as model weights being checked, was cut short "
                "or could not be read from its disk)"
            )
    else:
        how = f"exited with {code}"
    recent = [line for line in tail[-RECENT_LINES:] if line.strip()]
    if code is None or code >= 0:
        for line in reversed(recent):
            finding = explain(line)
            if finding is not None:
                return (
                    f"worker {worker_id} {how}: {finding.found}. {finding.why} Fix: {finding.fix}"
                )
    last = recent[-1].strip() if recent else ""
    return f"worker {worker_id} {how}" + (f"; its last output: {last[:300]}" if last else "")


def explained_error(error: BaseException) -> str:
    """The error, and when it is a known CUDA failure, why it happens and the fix."""
    short = short_error(error)
    finding = explain(str(error))
    if finding is None:
        return short
    return f"{short} [{finding.check}] {finding.why} Fix: {finding.fix}"[:1500]


def model_traceback(error: BaseException, limit: int = 20) -> str:
    """Where ``error`` came from, for the worker's log: the traceback from the first frame
    outside gpufleet's worker (the model's own code and what it called), its last ``limit``
    frames, then the error. The task itself gets ``short_error``."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return short_error(error)
    ours = f"{os.sep}gpufleet{os.sep}worker{os.sep}"
    start = next((i for i, f in enumerate(frames) if ours not in f.filename), len(frames))
    kept = frames[start:][-limit:] or frames[-limit:]
    lines = "".join(traceback.format_list(kept)).rstrip("\n")
    return f"Traceback (most recent call last):\n{lines}\n{short_error(error)}"


def short_error(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 500 else text[:497] + "..."
