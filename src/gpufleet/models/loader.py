"""Turn a ``--model`` argument into a runner that is safe to load: the one entry point for
``serve`` and worker processes.

``builtin:NAME``, a model directory, or ``NAME[@VERSION|@TAG|@sha256:...]`` from the registry.
The runner returned checks, in ``load(device)`` and before any weights move:

1. the device against the model's ``compatibility`` and ``precision`` (``gpufleet.gpu.compat``:
   refused with ``IncompatibleGpu`` naming what was found and the fix);
2. for a registry version, every file against its recorded digest. Code and small files are
   checked before anything is imported from them. ``*.safetensors`` weights (data, no code)
   are checked by background threads while the model loads and warms up on them: ``warmup``
   (and ``predict``, if called without it) waits for the verdict, so nothing the model
   computes from them is returned before it. A mismatch is ``IntegrityError``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from gpufleet.errors import IncompatibleGpu, InvalidInput
from gpufleet.models import integrity
from gpufleet.models.integrity import FileDigest
from gpufleet.models.manifest import ModelManifest
from gpufleet.models.registry import Registry, looks_like_ref
from gpufleet.models.runtime import Batching, ModelInfo, ModelRunner, unload

log = logging.getLogger(__name__)
_DEFERRED_SUFFIXES = (".safetensors",)


class CheckedRunner:
    """A ``ModelRunner`` that refuses to load on an incompatible device or from tampered files."""

    def __init__(
        self,
        runner: ModelRunner,
        manifest: ModelManifest | None = None,
        *,
        deferred: dict[Path, FileDigest] | None = None,
        source: str = "",
        labels: dict[Path, str] | None = None,
    ) -> None:
        self.runner = runner
        self.manifest = manifest
        self.deferred = deferred or {}
        self.source = source
        self.labels = labels or {}
        self._expected = False
        self._pending = False  # weights loaded while their check still runs
        self._checks: list[Future[None]] = []  # those checks
        self._refused: BaseException | None = None  # a failed check: never predict again

    @property
    def info(self) -> ModelInfo:
        return self.runner.info

    @info.setter
    def info(self, value: ModelInfo) -> None:
        self.runner.info = value

    @property
    def batching(self) -> Batching:
        return self.runner.batching

    @batching.setter
    def batching(self, value: Batching) -> None:
        self.runner.batching = value

    def check_device(self, device: str) -> None:
        """Raise ``IncompatibleGpu`` when a rule forbids this device; log the warnings."""
        if self.manifest is None:
            return
        from gpufleet.gpu.compat import Severity, check_model
        from gpufleet.gpu.device import facts_for_device

        spec = self.manifest.model
        findings = check_model(
            subject=f"{spec.name}@{spec.version}",
            precision=spec.precision.value,
            cuda=spec.compatibility.cuda,
            archs=spec.compatibility.capabilities(),
            facts=facts_for_device(device),
        )
        for f in findings:
            if f.severity is Severity.WARNING:
                log.warning("%s: %s", spec.name, f.message())
        problems = [f for f in findings if f.severity is Severity.ERROR]
        if problems:
            raise IncompatibleGpu(
                f"{spec.name}@{spec.version} cannot load on {device}: "
                + " | ".join(f.message() for f in problems),
                checks=[f.check for f in problems],
            )

    def prefetch(self) -> None:
        """Start reading (and checking) the weights in the background, before the process
        imports torch and initialises CUDA, so those seconds overlap the disk."""
        from gpufleet.models.weights import prefetch

        integrity.expect(self.deferred, self.labels)
        self._expected = True
        for path in self._weights():
            prefetch(path)

    def _weights(self) -> list[Path]:
        return [p for p in self.deferred if p.name.endswith(_DEFERRED_SUFFIXES)]

    def load(self, device: str) -> None:
        """Load; weights no ``prefetch`` is reading are read at full speed and checked
        afterwards in the background, while the model warms up: ``warmup`` and ``predict``
        wait for the verdict."""
        from gpufleet.models.weights import check_after_load

        self.check_device(device)
        self._refused = None
        after = [] if self._expected else self._weights()
        if not self._expected:  # (again after a prefetch would forget what it verified)
            integrity.expect(self.deferred, self.labels)
            self._expected = True
        try:
            with check_after_load(after):
                self.runner.load(device)
        except Exception:
            # A corrupted file often breaks the load itself: say so rather than the symptom.
            self._verify_deferred()
            raise
        self._checks = [  # from the page cache the load just filled
            integrity.check_in_background(p, self.deferred[p], name=self.labels.get(p))
            for p in after
        ]
        self._pending = True
        if not after:
            self._verify_deferred()

    def _verify_deferred(self) -> None:
        """Wait for the weights' check (``IntegrityError`` on a mismatch, after unloading),
        and check whatever no loader or prefetch did."""
        from gpufleet.models.weights import await_prefetch

        try:
            checks, self._checks = self._checks, []
            for check in checks:
                check.result()
            for path in self.deferred:
                await_prefetch(path.resolve())
            for path in integrity.unverified(list(self.deferred)):
                integrity.verify_file(path, self.deferred[path], name=self.labels.get(path))
                integrity.claim_verified(path)
        except BaseException as exc:
            self._pending, self._refused = False, exc
            unload(self.runner)
            raise
        self._pending = False

    def warmup(self) -> None:
        try:
            self.runner.warmup()  # on weights whose check may still run: the verdict next
        except Exception:
            # Tampered weights can break the warm-up itself: say so rather than the symptom.
            if self._pending:
                self._verify_deferred()
            raise
        if self._pending:
            self._verify_deferred()

    def predict(self, inputs: list[Any]) -> list[Any]:
        if self._refused is not None:  # the runner may have no unload(): weights still in
            raise self._refused
        if self._pending:
            self._verify_deferred()
        return self.runner.predict(inputs)

    def unload(self) -> None:
        unload(self.runner)


def open_model(spec: str, *, registry: Registry | None = None) -> CheckedRunner:
    """The runner ``spec`` names; reads manifests and imports code, loads no weights."""
    from gpufleet.models.directory import load_model_dir

    if spec.startswith("builtin:"):
        return CheckedRunner(builtin_factory(spec)(), source=spec)
    if registry is not None and looks_like_ref(spec):
        checkout = registry.checkout(spec)
        ref = checkout.artifact.ref
        labels = {p: f"{ref}:{p.relative_to(checkout.path).as_posix()}" for p in checkout.files}
        upfront = {
            p: d for p, d in checkout.files.items() if not p.name.endswith(_DEFERRED_SUFFIXES)
        }
        for path, digest in upfront.items():  # before importing any code from the checkout
            integrity.verify_file(path, digest, name=labels[path])
        manifest = checkout.artifact.manifest
        assert manifest is not None
        runner = load_model_dir(checkout.path, manifest)
        deferred = {p: d for p, d in checkout.files.items() if p not in upfront}
        return CheckedRunner(runner, manifest, deferred=deferred, source=ref, labels=labels)
    model_dir = model_directory(spec, registry)
    manifest = ModelManifest.from_yaml(model_dir)
    return CheckedRunner(load_model_dir(model_dir, manifest), manifest, source=str(model_dir))


def builtin_factory(spec: str) -> Callable[[], ModelRunner]:
    """The class of the built-in model ``builtin:NAME``, or ``InvalidInput`` listing them."""
    from gpufleet.models.directory import builtin_models

    name = spec.removeprefix("builtin:")
    builtins = builtin_models()
    if name not in builtins:
        raise InvalidInput(
            f"unknown built-in model {name!r}; known: {', '.join(sorted(builtins))}", model=spec
        )
    return builtins[name]


def model_directory(spec: str, registry: Registry | None) -> Path:
    """``spec`` as a model directory, or ``InvalidInput`` saying what ``spec`` may be."""
    model_dir = Path(spec).expanduser()
    if not model_dir.is_dir():
        hint = (
            " (no registry was given to look it up in)"
            if registry is None
            else f"; nor is it a model in the registry at {registry.root}"
        )
        raise InvalidInput(
            f"{spec!r} is not a model directory{hint}: give a directory with a model.yaml, "
            "builtin:NAME, or NAME@VERSION of a packaged model",
            model=spec,
        )
    return model_dir
