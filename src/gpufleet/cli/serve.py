"""``gpufleet serve``: the API and one worker per slot per model, in one command.

With no arguments: SQLite and blobs under the data dir, the built-in demo model, every local
GPU (or one CPU slot), the API on 127.0.0.1:8080.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Literal

import typer

from gpufleet.cli.context import console, fail, reported_errors, state
from gpufleet.gpu.allocation import Placement
from gpufleet.gpu.ledger import write_allocations

if TYPE_CHECKING:
    from gpufleet.api.app import DeployedModel

DEFAULT_MODEL = "builtin:digits"


def serve(
    ctx: typer.Context,
    model: list[str] = typer.Option(
        [],
        "--model",
        help="NAME[@VERSION|@TAG] from the registry, a model directory with a model.yaml, "
        "or builtin:NAME (repeatable).",
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", envvar="GPUFLEET_HOST", help="Address to listen on."
    ),
    port: int = typer.Option(
        8080, "--port", min=0, max=65535, envvar="GPUFLEET_PORT", help="Port to listen on."
    ),
    cpu_slots: int = typer.Option(
        1, "--cpu-slots", min=1, max=256, help="Worker slots on a host without GPUs."
    ),
    workers_per_gpu: int = typer.Option(
        1, "--workers-per-gpu", min=1, max=64, help="Workers per slot (GPU or CPU slot)."
    ),
    standby: int = typer.Option(
        0,
        "--standby",
        min=0,
        max=8,
        envvar="GPUFLEET_STANDBY",
        help="Standby processes per slot (torch imported, device ready, no model) that a "
        "restarting worker takes over: restarts are then bound by reading the weights. Each "
        "costs an idle CUDA context on its GPU.",
    ),
    placement: str = typer.Option(
        "binpack",
        "--placement",
        envvar="GPUFLEET_PLACEMENT",
        help="How workers that share GPUs (mode fraction or mps) are placed with --replicas: "
        "binpack (fill a GPU first) or spread (the emptiest GPU first).",
    ),
    replicas: int | None = typer.Option(
        None,
        "--replicas",
        min=1,
        max=1024,
        help="Workers per model (default: --workers-per-gpu on every GPU or GPU group it gets).",
    ),
    grace_s: float = typer.Option(
        30.0, "--grace", min=0, help="Seconds a stopping worker may finish its batch."
    ),
    insecure_no_auth: bool = typer.Option(
        False, "--insecure-no-auth", help="Serve without API keys (every caller is admin)."
    ),
    api_workers: int | None = typer.Option(
        None,
        "--api-workers",
        min=1,
        max=64,
        envvar="GPUFLEET_API_WORKERS",
        help="HTTP API processes, all on one port and one queue (default: one per four "
        "cores, up to 8; one below 8 cores).",
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error."),
) -> None:
    """Serve models: HTTP API, durable queue and GPU workers."""
    settings = state(ctx).settings
    if placement not in ("binpack", "spread"):
        fail(f"invalid_input: --placement must be binpack or spread, got {placement!r}")
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    run_dir = settings.data_dir / "run"
    # Before anything imports gpufleet.monitor.metrics (see there): workers inherit it.
    from gpufleet.monitor.metrics_setup import use_multiprocess_dir

    use_multiprocess_dir(run_dir / "metrics")
    with reported_errors():
        import uvicorn

        from gpufleet.api.app import ApiContext, DeployedModel, create_app
        from gpufleet.api.keys import KeyStore
        from gpufleet.api.process import default_api_workers
        from gpufleet.api.webhooks import WebhookDispatcher
        from gpufleet.gpu.allocation import GpuRequest
        from gpufleet.gpu.discovery import discover
        from gpufleet.models.loader import open_model
        from gpufleet.models.manifest import GpuSpec
        from gpufleet.models.registry import Registry, looks_like_ref
        from gpufleet.queue import LeaseReaper, TaskQueue
        from gpufleet.store import upgrade
        from gpufleet.worker.placement import plan_workers, visible
        from gpufleet.worker.supervisor import Deployment, Supervisor

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        queue = TaskQueue.from_settings(settings)
        upgrade(queue.engine)
        specs = model or [DEFAULT_MODEL]
        deployed: list[DeployedModel] = []
        models: list[tuple[Deployment, GpuRequest]] = []
        registry = Registry(settings.resolved_registry_dir())
        for spec in specs:
            if looks_like_ref(spec):
                # Pinned to the digest: every worker loads the same bytes even if a tag moves.
                artifact = registry.resolve(spec)
                spec = f"{artifact.name}@{artifact.digest}"
            elif not spec.startswith("builtin:"):
                spec = str(Path(spec).expanduser().resolve())
            runner = open_model(spec, registry=registry)  # reads model.yaml; loads no weights
            if any(d.info.name == runner.info.name for d in deployed):
                fail(f"invalid_input: model {runner.info.name} is given twice")
            deployed.append(DeployedModel(runner.info, runner.batching))
            gpu = runner.manifest.model.resources.gpu if runner.manifest else GpuSpec()
            request = GpuRequest(
                runner.info.name,
                runner.info.version,
                gpu.mode,
                gpu.count or 1,
                gpu.memory_gb,
                gpu.compute_percent,
                replicas,
            )
            models.append((Deployment(spec, runner.info.name, runner.info.version), request))
        keys = KeyStore(queue.engine)
        new_admin_key = None
        if not insecure_no_auth and keys.count_active() == 0:
            _, new_admin_key = keys.create("default", admin=True, name="first admin key")

        gpu_host = visible(discover(), os.environ)
        plan_policy: Literal["binpack", "spread"] = "spread" if placement == "spread" else "binpack"
        plan = plan_workers(
            gpu_host,
            models,
            run_dir=run_dir,
            workers_per_gpu=workers_per_gpu,
            cpu_slots=cpu_slots,
            policy=plan_policy,
            standby_per_worker=standby,
        )
        env = dict(os.environ)
        env["GPUFLEET_DATA_DIR"] = str(settings.data_dir)
        env["GPUFLEET_DATABASE_URL"] = settings.resolved_database_url()
        env["GPUFLEET_BLOB_DIR"] = str(settings.resolved_blob_dir())
        env["GPUFLEET_REGISTRY_DIR"] = str(settings.resolved_registry_dir())
        supervisor = Supervisor(
            [],
            [],
            placements=plan.workers,
            # A worker that died: its tasks go back now, with why (not when leases expire).
            on_exit=lambda worker_id, reason: queue.recover_worker(worker_id, reason),
            env=env,
            grace_s=grace_s,
            standby_per_slot=standby,
        )

        def workers(name: str) -> tuple[int, int]:
            total = sum(1 for w in supervisor.workers if w.deployment.name == name)
            return supervisor.ready_count(name), total

        reaper = LeaseReaper(queue)
        webhooks = WebhookDispatcher(queue)
        n_api = api_workers or default_api_workers()
        app = create_app(
            ApiContext(
                queue=queue,
                models=deployed,
                keys=None if insecure_no_auth else keys,
                insecure_no_auth=insecure_no_auth,
                max_body_bytes=settings.max_input_bytes + 1024 * 1024,
                workers=workers,
                refused=supervisor.refused_count,
                background=[webhooks.run],
            )
        )
        # Open event streams last as long as their task: without a bound on the graceful
        # shutdown, one open stream would keep the workers from draining on SIGTERM.
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level.lower(),
            access_log=False,
            timeout_graceful_shutdown=5,
        )
        server = _server_class(supervisor.stopping)(config)

    base = f"http://{host}:{port}"
    lines = [
        f"[bold]gpufleet[/bold] serving {', '.join(d.info.name for d in deployed)}",
        f"API        {base}/v1   (docs: {base}/docs)"
        + (f"; {n_api} API processes" if n_api > 1 else ""),
        f"health     {base}/healthz   metrics: {base}/metrics",
        f"database   {_safe_url(settings.resolved_database_url())}",
        f"workers    {len(supervisor.workers)}: "
        + _placements_line(plan.placements)
        + (f"; {standby} standby per slot" if standby else ""),
    ]
    if not gpu_host.gpus:
        lines.append(f"GPUs       none ({gpu_host.error}): workers run on CPU slots")
    if insecure_no_auth:
        lines.append("[bold red]auth       OFF (--insecure-no-auth): anyone can call this API")
    elif new_admin_key:
        lines.append(f"admin key  [bold]{new_admin_key}[/bold]  (shown once; store it now)")
    else:
        lines.append("auth       API keys (gpufleet keys create --tenant NAME)")
    example = json.dumps({"input": deployed[0].info.example_input})
    lines.append(
        f"try        curl -H 'Authorization: Bearer KEY' -H 'Content-Type: application/json' "
        f"-d '{example}' '{base}/v1/models/{deployed[0].info.name}/infer?wait=10'"
    )
    console.rule("gpufleet")
    for line in lines:
        console.print(line, soft_wrap=True, highlight=False)
    console.rule()
    # The banner holds the admin key, shown once: out now, also when stdout is a file or a
    # pipe (block-buffered), before serving starts.
    console.file.flush()
    allocations = run_dir / "allocations.json"
    with reported_errors():
        plan.start_mps()
    try:
        write_allocations(allocations, gpu_host, plan.placements, policy=plan_policy)
        supervisor.start()
        reaper.start()
        if n_api == 1:
            server.run()  # until SIGINT / SIGTERM
        else:
            with reported_errors():
                _serve_processes(
                    n_api, host, port, run_dir, env, deployed, webhooks.run,
                    counts=lambda: {
                        d.info.name: (*workers(d.info.name), supervisor.refused_count(d.info.name))
                        for d in deployed
                    },
                    insecure_no_auth=insecure_no_auth,
                    max_body_bytes=settings.max_input_bytes + 1024 * 1024,
                    log_level=log_level,
                    on_signal=supervisor.stopping,
                )  # fmt: skip
    finally:
        console.print("stopping: draining workers")
        supervisor.stop()
        plan.mps.stop()
        reaper.stop()
        queue.close()
        allocations.unlink(missing_ok=True)


def _serve_processes(
    n: int,
    host: str,
    port: int,
    run_dir: Path,
    env: dict[str, str],
    deployed: list[DeployedModel],
    background: Callable[[threading.Event], None],
    *,
    counts: Callable[[], dict[str, tuple[int, int, int]]],
    insecure_no_auth: bool,
    max_body_bytes: int,
    log_level: str,
    on_signal: Callable[[], None],
) -> None:
    """The API in ``n`` processes on one listening socket (``api.process``), until SIGINT or
    SIGTERM; this process publishes its workers' readiness for them and runs the webhook
    dispatcher. An API process that dies is started again, after a backoff."""
    import socket

    from gpufleet.api.process import (
        WORKERS_FILE,
        ApiProcesses,
        spawn,
        write_config,
        write_status,
    )
    from gpufleet.errors import InvalidInput

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        raise InvalidInput(f"cannot listen on {host}:{port}: {e.strerror}", field="port") from e
    sock.listen(4096)
    sock.set_inheritable(True)
    status_file = run_dir / WORKERS_FILE
    config = run_dir / "api.json"
    write_status(status_file, counts())
    write_config(
        config, models=deployed, insecure_no_auth=insecure_no_auth,
        max_body_bytes=max_body_bytes, status_file=status_file, log_level=log_level,
    )  # fmt: skip
    stop = threading.Event()

    def stopping(*_: object) -> None:
        stop.set()
        on_signal()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopping)
    side = threading.Thread(target=background, args=(stop,), daemon=True)
    side.start()
    procs = ApiProcesses(n, lambda: spawn(1, sock, config, env)[0], time.monotonic())
    try:
        while not stop.wait(0.25):
            write_status(status_file, counts())
            procs.check(time.monotonic())
    finally:
        procs.stop()
        sock.close()
        side.join(5)
        status_file.unlink(missing_ok=True)


def _placements_line(placements: list[Placement]) -> str:
    """``digits x2 on gpu0 (fraction 4.0 GB, 50%)``-style summary, one entry per model and
    slot."""
    groups: dict[tuple[str, str], list[Placement]] = {}
    for p in placements:
        groups.setdefault((p.model, p.slot), []).append(p)
    parts = []
    for (model, slot), ps in groups.items():
        p = ps[0]
        share = ""
        if p.mode in ("fraction", "mps"):
            share = f" ({p.mode} {p.memory_mib / 1024 if p.memory_mib else 0:.1f} GB, "
            share += f"{p.compute_percent}%)"
        device = "cpu" if not p.gpus else "cuda"
        parts.append(f"{model} x{len(ps)} on {slot} ({device}){share}")
    return ", ".join(parts)


def _server_class(on_signal: Callable[[], None]) -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM / SIGINT once it has stopped serving, which would kill
        this process before it drains its workers; here the signal only stops serving (and
        calls ``on_signal``)."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            on_signal()

    return Server


def _safe_url(url: str) -> str:
    """The database URL without its password, for the banner and logs."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
