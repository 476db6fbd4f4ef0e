"""A minimal queue worker process for the crash tests: claim, heartbeat, "work", complete.

Usage: python -m tests.integration.claimer DB_URL BLOB_DIR NAME [--work-s S] [--hang]
Prints ``claimed ID...`` after each claim and ``done ID`` for each accepted completion.
With --hang it claims once and then works forever (to be killed mid-task).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from gpufleet.queue import TaskQueue
from gpufleet.store import LocalBlobStore, create_engine

LEASE_S = 2.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("blobs")
    ap.add_argument("name")
    ap.add_argument("--work-s", type=float, default=0.05)
    ap.add_argument("--hang", action="store_true")
    ap.add_argument("--idle-exit-s", type=float, default=6.0)
    args = ap.parse_args()
    q = TaskQueue(create_engine(args.url), LocalBlobStore(args.blobs), lease_s=LEASE_S)
    held: set[str] = set()
    lock = threading.Lock()

    def heartbeat() -> None:
        while True:
            time.sleep(LEASE_S / 4)
            with lock:
                ids = sorted(held)
            if ids:
                q.heartbeat(args.name, ids)

    threading.Thread(target=heartbeat, daemon=True).start()
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < args.idle_exit_s:
        batch = q.claim("m", "1", args.name, max_n=2)
        if not batch:
            q.wait_for_work("m", "1", 0.5)
            continue
        idle_since = time.monotonic()
        with lock:
            held.update(t.id for t in batch)
        print("claimed", *[t.id for t in batch], flush=True)
        if args.hang:
            time.sleep(3600)
        time.sleep(args.work_s * len(batch))
        report = q.complete_many(args.name, [(t.id, {"by": args.name}) for t in batch])
        with lock:
            held.difference_update(t.id for t in batch)
        for tid in report.accepted:
            print("done", tid, flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
