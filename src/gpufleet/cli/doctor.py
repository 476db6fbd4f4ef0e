"""``gpufleet doctor``: can these models run on this host (or on the host a facts file describes),
and if not, why and what to do. Gathers the host's facts; the rules are ``gpufleet.gpu.doctor``.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from glob import glob
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table
from rich.text import Text

from gpufleet.cli.context import console, err_console, print_json, state
from gpufleet.errors import GpufleetError, InvalidInput
from gpufleet.gpu.compat import Finding, Severity, parse_version

if TYPE_CHECKING:
    from gpufleet.gpu.facts import HostFacts, HostTools, ModelCheck, Runtime
    from gpufleet.models.registry import Registry

BAD_INPUT = 2  # as click's usage errors: a wrong argument, not a finding
_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "dim"}


def doctor(
    ctx: typer.Context,
    models: list[str] = typer.Argument(
        None,
        metavar="MODEL",
        help="What `serve --model` takes: a model directory, builtin:NAME, or NAME@VERSION "
        "(or NAME@TAG) from the registry.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
    facts: Path | None = typer.Option(
        None, "--facts", help="Diagnose the host this file describes (from --save-facts)."
    ),
    save_facts: Path | None = typer.Option(
        None, "--save-facts", help="Also write this host's facts to FILE, for --facts elsewhere."
    ),
    explain: Path | None = typer.Option(
        None,
        "--explain",
        help="Explain a worker's crash output instead: a log file, or - for stdin.",
    ),
) -> None:
    """Check the driver, CUDA runtimes, GPUs and models against each other.

    Prints each finding with why it matters and how to fix it. Exit code 0: no errors;
    1: errors found (with --explain: a known CUDA failure recognised); 2: bad input (a model,
    facts file or log that cannot be read).
    """
    from gpufleet.gpu.doctor import counts, diagnose
    from gpufleet.gpu.facts import HostFacts

    try:
        if explain is not None:
            findings = _explain(explain)
        else:
            registry = _registry(ctx)  # models first: a typo fails before torch is imported
            checks = [model_check(spec, registry) for spec in models or []]
            host_facts = HostFacts.load(facts) if facts is not None else gather()
            if save_facts is not None:
                _save(host_facts, save_facts)
            findings = diagnose(
                host_facts.host, list(host_facts.runtimes), checks, tools=host_facts.tools
            )
    except GpufleetError as e:
        err_console.print(str(e), markup=False, highlight=False)
        raise typer.Exit(BAD_INPUT) from None
    errors, warnings = counts(findings)
    if json_out:
        print_json(
            {"findings": [f.to_dict() for f in findings], "errors": errors, "warnings": warnings}
        )
    else:
        _print(findings, errors, warnings)
    raise typer.Exit(1 if errors else 0)


def model_check(spec: str, registry: Registry | None) -> ModelCheck:
    """What the rules need of the model ``spec`` names, read as ``serve --model`` reads it;
    imports no model code and loads no weights."""
    from gpufleet.gpu.facts import ModelCheck
    from gpufleet.models.loader import builtin_factory, model_directory
    from gpufleet.models.manifest import ModelManifest
    from gpufleet.models.registry import looks_like_ref

    if spec.startswith("builtin:"):
        info = builtin_factory(spec)().info  # built-ins: fp32, one whole GPU, torch
        return ModelCheck(subject=f"{info.name}@{info.version}")
    if registry is not None and looks_like_ref(spec):
        manifest = registry.resolve(spec).manifest
        assert manifest is not None
        return ModelCheck.from_spec(manifest.model)
    model_dir = model_directory(spec, registry)
    return ModelCheck.from_spec(ModelManifest.from_yaml(model_dir).model)


def gather() -> HostFacts:
    """This host's facts; never raises for a missing or broken GPU stack."""
    from gpufleet.gpu.discovery import discover
    from gpufleet.gpu.facts import HostFacts

    return HostFacts(discover(), tuple(gather_runtimes()), gather_tools())


def gather_tools() -> HostTools:
    from gpufleet.gpu.facts import MPS_CONTROL, HostTools

    devices = tuple(sorted(d for d in glob("/dev/nvidia*") if d[11:].isdigit()))
    return HostTools(shutil.which("nvidia-smi"), shutil.which(MPS_CONTROL), devices)


def gather_runtimes() -> list[Runtime]:
    """torch (imported here, not before) and onnxruntime where its CUDA provider is built in."""
    from gpufleet.gpu.facts import Runtime

    out = []
    if importlib.util.find_spec("torch") is not None:
        try:
            import torch

            cuda = parse_version(str(torch.version.cuda)) if torch.version.cuda else None
            archs = tuple(torch.cuda.get_arch_list()) if cuda else ()
            out.append(Runtime(f"torch {torch.__version__}", cuda, archs))
        except Exception as exc:  # a broken install is a finding, not a crash
            out.append(Runtime(f"torch (import failed: {type(exc).__name__}: {exc})"))
    if importlib.util.find_spec("onnxruntime") is not None:
        try:
            import onnxruntime  # type: ignore[import-untyped, unused-ignore]
            from onnxruntime.capi import (  # type: ignore[import-untyped, unused-ignore]
                build_and_package_info,
            )

            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                version = getattr(build_and_package_info, "cuda_version", None)
                cuda = parse_version(version) if version else None
                out.append(Runtime(f"onnxruntime {onnxruntime.__version__}", cuda))
        except Exception:  # noqa: S110 - a CPU or broken onnxruntime: nothing to check on a GPU
            pass
    return out


def _registry(ctx: typer.Context) -> Registry | None:
    from gpufleet.models.registry import Registry

    root = state(ctx).settings.resolved_registry_dir()
    return Registry(root) if root.is_dir() else None


def _save(host_facts: HostFacts, path: Path) -> None:
    try:
        host_facts.save(path)
    except OSError as exc:
        raise InvalidInput(f"cannot write facts file {path}: {exc.strerror}") from exc
    err_console.print(f"facts written to {path}", markup=False, highlight=False)


def _explain(source: Path) -> list[Finding]:
    from gpufleet.gpu.cuda_errors import explain_all

    try:
        text = sys.stdin.read() if str(source) == "-" else source.read_text(errors="replace")
    except OSError as exc:
        raise InvalidInput(f"cannot read {source}: {exc.strerror}") from exc
    return explain_all(text)


def _print(findings: list[Finding], errors: int, warnings: int) -> None:
    table = Table("severity", "subject", "found")
    for f in findings:
        table.add_row(Text(f.severity, _STYLE[f.severity]), Text(f.subject), Text(f.found))
    if findings:
        console.print(table)
    for f in findings:
        if f.severity is Severity.INFO:
            continue
        console.print(Text.assemble((f.severity, _STYLE[f.severity]), f" {f.check}: {f.found}"))
        console.print(f"  why: {f.why}", markup=False, highlight=False)
        console.print(f"  fix: {f.fix}", markup=False, highlight=False)
    console.print(f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}")
