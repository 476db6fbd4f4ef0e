"""One worker process: ``python -m gpufleet.worker.process --model SPEC --worker-id ID ...``.

The supervisor starts these. Settings come from the environment (``GPUFLEET_*``, as the
supervisor passes them down). Protocol with the supervisor: after load and warmup the process
writes ``ready`` on stdout; logs go to stderr.

SIGTERM (or SIGINT) drains: stop claiming, finish the batch in hand, write its results, exit 0.
If that takes longer than ``--grace-s``, the tasks still held are released to the queue and the
process exits at once (code 3): another worker takes them, and none waits for a lease to expire.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

from gpufleet.models.runtime import ModelRunner


def load_runner(spec: str) -> ModelRunner:
    """``builtin:NAME`` (a built-in model) or the path of a model directory (``model.yaml``)."""
    from gpufleet.models.directory import builtin_models, load_model_dir

    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        builtins = builtin_models()
        if name not in builtins:
            raise SystemExit(f"unknown built-in model {name!r}; known: {', '.join(builtins)}")
        return builtins[name]()
    return load_model_dir(spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpufleet-worker")
    parser.add_argument("--model", required=True, help="builtin:NAME or a model directory")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lanes", default="interactive,batch")
    parser.add_argument("--grace-s", type=float, default=30.0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("GPUFLEET_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {args.worker_id} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from gpufleet.queue import TaskQueue
    from gpufleet.settings import Settings
    from gpufleet.worker.loop import Worker, WorkerConfig

    runner = load_runner(args.model)
    queue = TaskQueue.from_settings(Settings())
    config = WorkerConfig(
        model=runner.info.name,
        version=runner.info.version,
        worker_id=args.worker_id,
        device=args.device,
        lanes=tuple(x for x in args.lanes.split(",") if x),
    )

    def ready() -> None:
        print("ready", flush=True)

    worker = Worker(queue, runner, config, on_ready=ready)
    stop = threading.Event()

    def hard_stop() -> None:
        released = worker.release_held()
        logging.getLogger(__name__).warning(
            "grace period of %.0fs over; released %d tasks and exiting", args.grace_s,
            len(released),
        )  # fmt: skip
        os._exit(3)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            stop.set()
            timer = threading.Timer(args.grace_s, hard_stop)
            timer.daemon = True
            timer.start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()

    def orphaned() -> None:
        """The supervisor died without stopping us (SIGKILL): drain as if told to."""
        while not stop.wait(1.0):
            if os.getppid() != parent:
                logging.getLogger(__name__).warning("supervisor is gone; draining")
                on_signal(signal.SIGTERM, None)
                return

    threading.Thread(target=orphaned, name="orphan-watch", daemon=True).start()
    worker.run(stop)
    queue.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
