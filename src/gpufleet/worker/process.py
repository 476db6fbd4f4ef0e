"""One worker process: ``python -m gpufleet.worker.process --model SPEC --worker-id ID ...``.

The supervisor starts these. Settings come from the environment (``GPUFLEET_*``, as the
supervisor passes them down). Protocol with the supervisor: after load and warmup the process
writes ``ready`` on stdout; logs go to stderr. With ``--standby`` the process first prepares
the device and waits for its model on stdin (``worker.standby``).

SIGTERM (or SIGINT) drains: stop claiming, finish the batch in hand, write its results, exit 0.
If that takes longer than ``--grace-s``, the tasks still held are released to the queue and the
process exits at once (code 3): another worker takes them, and none waits for a lease to expire.
A model that cannot load on this device or from these files exits with code 4 (``refused:``
and the reason on stderr). A CUDA failure that loses the context (an illegal address, a
device-side assert) sends the batch back to the queue and exits with code 5; the supervisor
restarts the process.

With a queue agent (``GPUFLEET_QUEUE_AGENT``, ``worker.agent``), the claims and result commits
that overlap predict run in a child process, started before the model loads. If it exits, the
worker releases its tasks and exits with code 6; the supervisor restarts it.
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

# The model can never load here (incompatible GPU, corrupted files, bad manifest): the
# supervisor does not restart a worker that exits with this code.
EXIT_REFUSED = 4
# A CUDA failure left the context unusable (gpu.cuda_errors.context_lost): restart the process.
EXIT_CONTEXT_LOST = 5
# The worker's queue agent exited (worker.agent): restart the process.
EXIT_AGENT_LOST = 6


def load_runner(spec: str) -> ModelRunner:
    """``builtin:NAME``, a model directory, or ``NAME@VERSION`` from the registry the settings
    name; compatibility and digests are checked when the runner loads."""
    from gpufleet.models.loader import open_model
    from gpufleet.models.registry import Registry
    from gpufleet.settings import Settings

    return open_model(spec, registry=Registry(Settings().resolved_registry_dir()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpufleet-worker")
    parser.add_argument("--model", help="builtin:NAME, a model directory or NAME@VERSION")
    parser.add_argument("--worker-id")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lanes", default="interactive,batch")
    parser.add_argument("--grace-s", type=float, default=30.0)
    parser.add_argument(
        "--standby",
        action="store_true",
        help="prepare the device, then read the model and worker id from stdin (one JSON line)",
    )
    args = parser.parse_args(argv)
    from gpufleet.worker.limits import WorkerLimits

    # The GPU share and CPUs the supervisor gave this slot, before anything touches the device.
    limits = WorkerLimits.from_env()
    applied = limits.apply(args.device)
    if args.standby:
        from gpufleet.worker.standby import (
            EXIT_BAD_ASSIGNMENT,
            BadAssignment,
            prepare_device,
            wait_for_assignment,
        )

        # Ctrl-C reaches the whole process group: a standby holds nothing, and the supervisor
        # ends it by closing its stdin (no KeyboardInterrupt traceback in the terminal).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        prepare_device(args.device)
        try:
            assignment = wait_for_assignment(sys.stdin, sys.stdout)
        except BadAssignment as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return EXIT_BAD_ASSIGNMENT
        if assignment is None:  # the supervisor closed our stdin: not needed after all
            return 0
        args.model, args.worker_id = assignment.model, assignment.worker_id
        args.lanes, args.grace_s = ",".join(assignment.lanes), assignment.grace_s
    elif not args.model or not args.worker_id:
        parser.error("--model and --worker-id are required (or --standby)")
    logging.basicConfig(
        level=os.environ.get("GPUFLEET_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {args.worker_id} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for note in applied:
        logging.getLogger(__name__).info("%s", note)
    from gpufleet.errors import GpufleetError, IncompatibleGpu, IntegrityError
    from gpufleet.queue import TaskQueue
    from gpufleet.settings import Settings
    from gpufleet.worker import agent as queue_agent
    from gpufleet.worker.loop import Worker, WorkerConfig

    settings = Settings()
    agent: queue_agent.QueueAgent | None = None
    if queue_agent.wanted(settings.queue_agent):
        # Started first: its interpreter starts and opens the queue while the model loads.
        agent = queue_agent.QueueAgent(queue_agent.settings_queue, lease_s=settings.lease_s)
    try:
        runner = load_runner(args.model)
    except GpufleetError as exc:  # a bad model.yaml, an unknown model: restarting cannot help
        if agent is not None:
            agent.close()
        print(f"refused: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    from gpufleet.models.loader import CheckedRunner

    if isinstance(runner, CheckedRunner) and not args.standby:
        # A fresh process reads its weights while it imports torch. A standby has torch: its
        # load reads them at full speed and checks them while the model warms up.
        runner.prefetch()
    queue = TaskQueue.from_settings(settings)
    config = WorkerConfig(
        model=runner.info.name,
        version=runner.info.version,
        worker_id=args.worker_id,
        device=args.device,
        lanes=tuple(x for x in args.lanes.split(",") if x),
        limits=limits,
    )

    def ready() -> None:
        print("ready", flush=True)

    worker = Worker(queue, runner, config, on_ready=ready, ops=agent)
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
    try:
        worker.run(stop)
    except (IncompatibleGpu, IntegrityError) as exc:  # from load or warmup: before any claim
        print(f"refused: {exc}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    finally:
        if agent is not None:
            agent.close()
        queue.close()
    if worker.context_lost is not None:
        lost = worker.context_lost
        print(f"CUDA context lost: {lost.found}. Fix: {lost.fix}", file=sys.stderr, flush=True)
        return EXIT_CONTEXT_LOST
    if worker.agent_lost is not None:
        print(f"{worker.agent_lost}", file=sys.stderr, flush=True)
        return EXIT_AGENT_LOST
    return 0


if __name__ == "__main__":
    sys.exit(main())
