"""NVML through nvidia-ml-py, and a recorded stand-in for machines without a GPU.

``open_nvml()`` returns the object discovery calls ``nvml…`` functions on: the real
``pynvml`` module, or a ``ReplayNvml`` when ``GPUFLEET_NVML_RECORDING`` names a recording.
A recording is made on a real host by ``RecordingNvml`` (``gpufleet gpus --record FILE``): every
call discovery made, its arguments and its answer or NVML error code. Replaying it runs the same
discovery code on a CPU machine and gets the same answers, errors included.

Device handles are recorded as ``"dev<index>"``; structures as dicts of their fields, which the
replay hands back as attribute objects; bytes as text.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

RECORDING_ENV = "GPUFLEET_NVML_RECORDING"
FORMAT = "gpufleet-nvml-recording/1"


class NvmlUnavailable(Exception):
    """No NVML here (no driver, no library, no bindings): the reason, in one line."""


def open_nvml() -> Any:
    """The NVML to ask: a replay when ``GPUFLEET_NVML_RECORDING`` is set, else ``pynvml``,
    initialised. Raises ``NvmlUnavailable`` with the reason when there is none."""
    recording = os.environ.get(RECORDING_ENV)
    if recording:
        return ReplayNvml.load(Path(recording))
    try:
        import pynvml
    except ImportError as exc:
        raise NvmlUnavailable("nvidia-ml-py is not installed (pip install nvidia-ml-py)") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise NvmlUnavailable(init_error_text(exc)) from exc
    return pynvml


def init_error_text(exc: Exception) -> str:
    import pynvml

    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return "no NVIDIA driver: the NVML library (libnvidia-ml.so.1) is not installed"
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return "the NVIDIA kernel driver is not loaded (no GPU, or the nvidia module failed)"
    if isinstance(exc, pynvml.NVMLError_LibRmVersionMismatch):
        return (
            "the NVIDIA kernel module and libnvidia-ml differ in version (a driver upgrade "
            "without a reboot): reload the nvidia module or reboot"
        )
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return "no permission to open the NVIDIA devices (/dev/nvidia*)"
    return f"NVML failed to start: {exc}"


def shutdown(nvml: Any) -> None:
    with contextlib.suppress(Exception):  # nothing to release
        nvml.nvmlShutdown()


# --- recording -------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A JSON form of an NVML answer."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, ctypes.Structure):
        return {name: _plain(getattr(value, name)) for name, *_ in value._fields_}
    if isinstance(value, ctypes.Array):
        return [_plain(v) for v in value]
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, ctypes._SimpleCData):
        return _plain(value.value)
    if hasattr(value, "__dict__"):  # pynvml's nvmlFriendlyObject
        return {k: _plain(v) for k, v in vars(value).items() if not k.startswith("_")}
    return value


def _attr(value: Any) -> Any:
    """The replayed form: dicts read as attributes, like the ctypes structures they were."""
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _attr(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_attr(v) for v in value]
    return value


class _Calls:
    """Key of one call: ``name(arg, arg)`` with device handles as ``dev<index>``."""

    def __init__(self) -> None:
        self.handles: dict[int, str] = {}

    def token(self, arg: Any) -> str:
        address = ctypes.cast(arg, ctypes.c_void_p).value if _is_handle(arg) else None
        if address is not None and address in self.handles:
            return self.handles[address]
        return repr(arg)

    def key(self, name: str, args: tuple[Any, ...]) -> str:
        return f"{name}({', '.join(self.token(a) for a in args)})"


def _is_handle(arg: Any) -> bool:
    return isinstance(arg, ctypes._Pointer)


class RecordingNvml:
    """Wraps ``pynvml``: answers as it does and writes down every ``nvml…`` call."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self._calls = _Calls()
        self.calls: dict[str, dict[str, Any]] = {}

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._real, name)
        if not name.startswith("nvml") or not callable(target):
            return target

        def call(*args: Any) -> Any:
            key = self._calls.key(name, args)
            try:
                result = target(*args)
            except self._real.NVMLError as exc:
                self.calls[key] = {"error": int(exc.value)}
                raise
            if name in ("nvmlDeviceGetHandleByIndex", "nvmlDeviceGetHandleByIndex_v2"):
                address = ctypes.cast(result, ctypes.c_void_p).value
                assert address is not None
                self._calls.handles[address] = f"dev{args[0]}"
                self.calls[key] = {"handle": f"dev{args[0]}"}
            else:
                self.calls[key] = {"result": _plain(result)}
            return result

        return call

    def save(self, path: Path, *, note: str = "") -> None:
        data = {"format": FORMAT, "note": note, "calls": self.calls}
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


class ReplayNvml:
    """Answers ``nvml…`` calls from a recording. A call the recording lacks raises
    NVML_ERROR_NOT_SUPPORTED, as a driver that lacks a feature does."""

    def __init__(self, calls: dict[str, dict[str, Any]], *, source: str = "recording") -> None:
        import pynvml

        self._pynvml = pynvml
        self._calls = calls
        self.source = source

    @classmethod
    def load(cls, path: Path) -> ReplayNvml:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise NvmlUnavailable(f"cannot read the NVML recording {path}: {exc}") from exc
        calls = data.get("calls") if isinstance(data, dict) else None
        if (
            not isinstance(calls, dict)
            or data.get("format") != FORMAT
            or not all(isinstance(v, dict) for v in calls.values())
        ):
            raise NvmlUnavailable(f"{path} is not a gpufleet NVML recording ({FORMAT})")
        replay = cls(data["calls"], source=str(path))
        init = data["calls"].get("nvmlInit()")
        if init is not None and "error" in init:
            raise NvmlUnavailable(init_error_text(replay._pynvml.NVMLError(init["error"])))
        return replay

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("nvml"):
            return getattr(self._pynvml, name)

        def call(*args: Any) -> Any:
            key = f"{name}({', '.join(a if _is_token(a) else repr(a) for a in args)})"
            answer = self._calls.get(key)
            if answer is None:
                if name in ("nvmlInit", "nvmlShutdown"):
                    return None
                raise self._pynvml.NVMLError(self._pynvml.NVML_ERROR_NOT_SUPPORTED)
            if "error" in answer:
                raise self._pynvml.NVMLError(answer["error"])
            if "handle" in answer:
                return answer["handle"]
            return _attr(answer["result"])

        return call


def _is_token(arg: Any) -> bool:
    return isinstance(arg, str) and arg.startswith("dev") and arg[3:].isdigit()


def record(path: Path, *, note: str = "") -> Any:
    """Run discovery against the real NVML and save every call to ``path``; returns the
    discovered host."""
    import pynvml

    from gpufleet.gpu.discovery import discover_with

    recorder = RecordingNvml(pynvml)
    try:
        recorder.nvmlInit()
    except pynvml.NVMLError as exc:
        recorder.save(path, note=note)
        raise NvmlUnavailable(init_error_text(exc)) from exc
    try:
        host = discover_with(recorder, source="nvml")
    finally:
        shutdown(recorder)
    recorder.save(path, note=note)
    return host
