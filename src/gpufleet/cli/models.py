"""``gpufleet models``: validate model directories, package them into the local registry,
list, show, tag, remove, verify and garbage-collect versions, push and pull them to OCI
registries. Thin: the work is in ``gpufleet.models.registry`` and ``.remote``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from gpufleet.cli.context import console, err_console, print_json, reported_errors, state
from gpufleet.cli.model_trial import manifest_or_exit, print_trial, trial_summary
from gpufleet.cli.models_init import init_cmd
from gpufleet.cli.tables import Col, print_table
from gpufleet.errors import InvalidInput

if TYPE_CHECKING:
    from gpufleet.models.registry import Artifact, Registry

app = typer.Typer(
    help="Model artifacts: model.yaml, the local registry, push and pull.", no_args_is_help=True
)
app.command("init")(init_cmd)
JSON = typer.Option(False, "--json", help="Print the result as JSON.")
TIMEOUT = typer.Option(
    300.0, "--timeout", min=1, help="Seconds to build, load and try the model in."
)
LIST_COLUMNS = (
    Col("name", min_width=8, fit_width=24), Col("version", min_width=7, fit_width=16),
    Col("digest", keep=3), Col("size", keep=1, justify="right"), Col("created", keep=4),
    Col("tags", keep=2, min_width=4, fit_width=16),
)  # fmt: skip
INSECURE = typer.Option(
    None, "--insecure/--secure", help="Plain HTTP (default: only for loopback)."
)


def open_registry(ctx: typer.Context) -> Registry:
    from gpufleet.models.registry import Registry

    return Registry(state(ctx).settings.resolved_registry_dir())


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


@contextmanager
def _progress(enabled: bool, what: str) -> Iterator[Callable[[int, int], None] | None]:
    """A Rich transfer bar on stderr (not with --json, and only on a terminal)."""
    if not enabled or not err_console.is_terminal:
        yield None
        return
    bar = Progress(
        TextColumn(what),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    )
    task = bar.add_task(what, total=None)
    with bar:
        yield lambda done, total: bar.update(task, completed=done, total=total or None)


@app.command("validate")
def validate_cmd(
    model_dir: Path = typer.Argument(..., help="A model directory (or its model.yaml)."),
    timeout: float = TIMEOUT,
    json_out: bool = JSON,
) -> None:
    """Check a model.yaml, then build and try the model; exit code 1 on problems.

    The model is built in a child process, loaded (on CPU where it can), warmed up, and its
    example_input run through predict. Every problem comes with its place and fix.
    """
    from gpufleet.models.validation import try_model_dir

    model_dir = model_dir.parent if model_dir.name == "model.yaml" else model_dir
    manifest = manifest_or_exit(model_dir, json_out)
    trial = try_model_dir(model_dir, timeout=timeout)
    spec = manifest.model
    if json_out:
        print_json(
            {"valid": trial.ok, "path": str(model_dir), "manifest": manifest.to_data()}
            | trial.to_dict()
        )
    else:
        print_trial(model_dir, manifest, trial)
        if trial.ok:
            console.print(
                f"ok: {spec.name}@{spec.version} ({spec.format}, {spec.precision.value}, "
                f"gpu {spec.resources.gpu.mode}); " + trial_summary(trial),
                markup=False,
                highlight=False,
            )
    if not trial.ok:
        raise typer.Exit(1)


@app.command("package")
def package_cmd(
    ctx: typer.Context,
    model_dir: Path = typer.Argument(..., help="A model directory with a model.yaml."),
    tag: list[str] = typer.Option([], "--tag", "-t", help="Also point this tag at it."),
    check: bool = typer.Option(
        True,
        "--check/--no-check",
        help="Try the model first, as validate does (--no-check: model.yaml only).",
    ),
    timeout: float = TIMEOUT,
    json_out: bool = JSON,
) -> None:
    """Store a model directory as an immutable version in the local registry.

    The model is tried first, as `validate` does: a model that fails is not stored.
    """
    settings = state(ctx).settings
    if check and model_dir.is_dir():
        from gpufleet.models.validation import try_model_dir

        manifest = manifest_or_exit(model_dir, json_out)
        trial = try_model_dir(model_dir, timeout=timeout)
        if not trial.ok:
            if json_out:
                print_json({"valid": False, "path": str(model_dir)} | trial.to_dict())
            else:
                print_trial(model_dir, manifest, trial)
                err_console.print(
                    "not packaged: fix the problems above (gpufleet models validate "
                    f"{model_dir} checks again)",
                    markup=False,
                    highlight=False,
                )
            raise typer.Exit(1)
    with reported_errors():
        if not model_dir.is_dir():
            raise InvalidInput(f"{model_dir} is not a directory")
        registry = open_registry(ctx)
        with _progress(not json_out, "hashing") as bar:
            artifact = registry.package(
                model_dir,
                tags=tuple(tag),
                keep=settings.keep_versions,
                progress=(lambda _path, done, total: bar(done, total)) if bar else None,
            )
    if json_out:
        print_json(artifact.to_dict())
        return
    console.print(
        f"{artifact.ref} {artifact.digest} ({_size(artifact.size)}, {len(artifact.files)} files)"
        + (f" tags: {', '.join(artifact.tags)}" if artifact.tags else ""),
        markup=False,
        highlight=False,
    )


@app.command("list")
def list_cmd(
    ctx: typer.Context,
    name: str | None = typer.Argument(None, help="Only this model's versions."),
    json_out: bool = JSON,
) -> None:
    """Versions in the local registry, oldest first."""
    with reported_errors():
        versions = open_registry(ctx).versions(name)
    if json_out:
        print_json([a.to_dict() for a in versions])
        return
    if not versions:
        console.print("no models in the registry (gpufleet models package DIR adds one)")
        return
    rows = [[a.name, a.version, a.digest[:19], _size(a.size), a.created[:19], ", ".join(a.tags)]
            for a in versions]  # fmt: skip
    print_table(console, LIST_COLUMNS, rows)


@app.command("show")
def show_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="NAME, NAME@VERSION, NAME@TAG or NAME@sha256:..."),
    json_out: bool = JSON,
) -> None:
    """One version: its digest, tags, files and model.yaml."""
    with reported_errors():
        a = open_registry(ctx).resolve(ref)
    assert a.manifest is not None
    files = [{"path": f.path, "digest": f.blob, "size": f.digest.size} for f in a.files]
    if json_out:
        print_json(a.to_dict() | {"files": files, "manifest": a.manifest.to_data()})
        return
    spec = a.manifest.model
    console.print(f"[bold]{a.ref}[/bold]  {a.digest}")
    console.print(
        f"format {spec.format}, precision {spec.precision.value}, gpu {spec.resources.gpu.mode}"
        f", {_size(a.size)}, created {a.created[:19]}"
        + (f", tags {', '.join(a.tags)}" if a.tags else ""),
        markup=False,
        highlight=False,
    )
    table = Table("file", "size", "digest")
    for f in files:
        table.add_row(str(f["path"]), _size(int(str(f["size"]))), str(f["digest"])[:19])
    console.print(table)


@app.command("tag")
def tag_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="The version to tag."),
    tag: str = typer.Argument(..., help="The tag, e.g. stable or canary (moved if it exists)."),
    json_out: bool = JSON,
) -> None:
    """Point a tag at a version."""
    with reported_errors():
        a = open_registry(ctx).tag(ref, tag)
    _print_done(a, f"{a.name}:{tag} -> {a.version} ({a.digest[:19]})", json_out)


@app.command("untag")
def untag_cmd(
    ctx: typer.Context, name: str = typer.Argument(...), tag: str = typer.Argument(...)
) -> None:
    """Remove a tag (the version stays)."""
    with reported_errors():
        open_registry(ctx).untag(name, tag)
    console.print(f"removed tag {name}:{tag}", markup=False, highlight=False)


@app.command("rm")
def rm_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="The version to remove."),
    force: bool = typer.Option(False, "--force", help="Remove it even if tags point at it."),
    json_out: bool = JSON,
) -> None:
    """Remove a version; its files go at the next `gc` unless another version shares them."""
    with reported_errors():
        a = open_registry(ctx).remove(ref, force=force)
    _print_done(a, f"removed {a.ref} ({a.digest[:19]})", json_out)


@app.command("prune")
def prune_cmd(
    ctx: typer.Context,
    name: str = typer.Argument(...),
    keep: int = typer.Option(..., "--keep", help="Versions to keep (tagged ones always stay)."),
    json_out: bool = JSON,
) -> None:
    """Keep only the newest versions of a model, for rollback."""
    with reported_errors():
        removed = open_registry(ctx).prune(name, keep=keep)
    if json_out:
        print_json([a.to_dict() for a in removed])
        return
    console.print(f"removed {len(removed)} versions: {', '.join(a.version for a in removed)}")


@app.command("gc")
def gc_cmd(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="Only say what would be deleted."),
    json_out: bool = JSON,
) -> None:
    """Delete files no version references."""
    with reported_errors():
        digests, freed = open_registry(ctx).gc(dry_run=dry_run)
    if json_out:
        print_json({"blobs": digests, "bytes": freed, "dry_run": dry_run})
        return
    verb = "would free" if dry_run else "freed"
    console.print(f"{len(digests)} unreferenced blobs, {verb} {_size(freed)}")


@app.command("verify")
def verify_cmd(ctx: typer.Context, ref: str = typer.Argument(...), json_out: bool = JSON) -> None:
    """Check every file of a version against its digests."""
    with reported_errors():
        a = open_registry(ctx).verify(ref)
    _print_done(a, f"ok: {a.ref} {a.digest} ({len(a.files)} files)", json_out)


@app.command("push")
def push_cmd(
    ctx: typer.Context,
    ref: str = typer.Argument(..., help="The local version, e.g. digits@1.0.0."),
    target: str = typer.Argument(
        ..., help="REGISTRY/REPOSITORY[:TAG]; the tag defaults to the version."
    ),
    insecure: bool | None = INSECURE,
    json_out: bool = JSON,
) -> None:
    """Upload a version to an OCI registry (files it already has are skipped)."""
    from gpufleet.models.remote import push

    with reported_errors():
        registry = open_registry(ctx)
        a = registry.verify(ref)  # never publish bytes that are not what was packaged
        if ":" not in target.rsplit("/", 1)[-1] and "@" not in target:
            target = f"{target}:{a.version}"
        with _progress(not json_out, "pushing") as bar:
            desc = push(registry.root, a.digest, target, insecure=insecure, progress=bar)
    _print_done(a, f"pushed {a.ref} to {target} ({desc.digest})", json_out, target=target)


@app.command("pull")
def pull_cmd(
    ctx: typer.Context,
    target: str = typer.Argument(..., help="REGISTRY/REPOSITORY:TAG or ...@sha256:DIGEST."),
    insecure: bool | None = INSECURE,
    json_out: bool = JSON,
) -> None:
    """Download a version from an OCI registry into the local registry (digests checked)."""
    from gpufleet.models.registry import A_NAME, A_VERSION
    from gpufleet.models.remote import pull

    with reported_errors():
        registry = open_registry(ctx)
        with _progress(not json_out, "pulling") as bar:
            desc = pull(target, registry.root, insecure=insecure, progress=bar)
        manifest = json.loads(registry.manifest_bytes(desc.digest))
        ann = manifest.get("annotations", {})
        if A_NAME not in ann or A_VERSION not in ann:
            raise InvalidInput(
                f"{target} is not a gpufleet model (its manifest has no {A_NAME} annotation)"
            )
        size = desc.size + manifest["config"]["size"] + sum(x["size"] for x in manifest["layers"])
        registry.verify_manifest(desc.digest, f"{ann[A_NAME]}@{ann[A_VERSION]}")
        registry.add(ann[A_NAME], ann[A_VERSION], desc.digest, desc.size, size=size)
        a = registry.resolve(f"{ann[A_NAME]}@{desc.digest}")
    _print_done(a, f"pulled {a.ref} ({a.digest})", json_out)


def _print_done(a: Artifact, line: str, json_out: bool, **extra: str) -> None:
    if json_out:
        print_json(a.to_dict() | extra)
    else:
        console.print(line, markup=False, highlight=False)
