"""What a CUDA failure in a worker's output means: known signatures -> a ``Finding``.

A table of the messages torch, cuBLAS, onnxruntime, Triton, CuPy, NVML and the CUDA runtime and
driver print, each with why it happens and what fixes it, in the words of ``compat`` (whose rules
predict most of them before a load). Codes are labelled by API: the driver's ``CUresult``
(``CUDA_ERROR_*``) and the runtime's ``cudaError_t`` (``cudaError*``) share most numbers since
CUDA 10.1 but not names. Pure text matching: no torch, no GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gpufleet.gpu.compat import Capability, Finding, Severity


@dataclass(frozen=True)
class Signature:
    """One failure: the texts that identify it, and what to tell whoever reads the crash."""

    check: str
    title: str
    codes: str  # the API's names and numbers, labelled driver / runtime
    patterns: tuple[str, ...]  # regular expressions, matched case-insensitively
    why: str
    fix: str

    def search(self, text: str) -> re.Match[str] | None:
        for pattern in self.patterns:
            match = re.search(pattern, text, re.IGNORECASE)
            if match:
                return match
        return None


_RESTART = "The CUDA context is lost: every later CUDA call in the process fails the same way."

# Most specific first: ``explain`` answers with the first that matches.
SIGNATURES: tuple[Signature, ...] = (
    Signature(
        "nvml.driver_library_mismatch",
        "NVIDIA driver library and kernel module differ",
        "NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18",
        (
            r"Driver/library version mismatch",
            r"NVML/RM version mismatch",
            r"LIB_RM_VERSION_MISMATCH",
            r"NVRM: API mismatch",
            r"libnvidia-ml differ in version",  # how gpufleet.gpu.nvml words it
        ),
        "The driver's user-space libraries were upgraded but the old kernel module is still "
        "loaded (a driver upgrade without a reboot): NVML and CUDA both refuse to start.",
        "reboot the host, or stop every GPU process and reload the module "
        "(rmmod nvidia_uvm nvidia_drm nvidia_modeset nvidia; modprobe nvidia)",
    ),
    Signature(
        "nvml.unknown_error",
        "NVML lost the GPU inside a container",
        "NVML_ERROR_UNKNOWN = 999",
        (r"Failed to initialize NVML: Unknown Error",),
        "Inside a container the GPU device files became unreadable: a systemd daemon-reload on "
        "the host can revoke a running container's device access (a known NVIDIA container "
        "toolkit issue).",
        "restart the container; to stop it recurring, follow the NVIDIA container toolkit's "
        "guidance for the cgroup driver (e.g. --device /dev/nvidia* alongside --gpus)",
    ),
    Signature(
        "cuda.stub_library",
        "the CUDA driver stub was loaded",
        "driver CUDA_ERROR_STUB_LIBRARY = 34, runtime cudaErrorStubLibrary = 34",
        (r"CUDA_ERROR_STUB_LIBRARY", r"cudaErrorStubLibrary", r"driver is a stub library"),
        "The process loaded libcuda.so from the CUDA toolkit's stubs directory, which exists "
        "only for linking, instead of the driver's.",
        "remove .../cuda/lib64/stubs from LD_LIBRARY_PATH (and from ld.so.conf in the image)",
    ),
    Signature(
        "cuda.compat_not_supported",
        "CUDA forward compatibility refused on this GPU",
        "driver CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE = 804, "
        "runtime cudaErrorCompatNotSupportedOnDevice = 804",
        (
            r"forward compatibility was attempted on non supported HW",
            r"COMPAT_NOT_SUPPORTED_ON_DEVICE",
            r"cudaErrorCompatNotSupportedOnDevice",
        ),
        "The image carries the CUDA forward-compatibility package (a newer libcuda, cuda-compat), "
        "which works only on data-center GPUs; on this one the newer libcuda is refused.",
        "remove the cuda-compat libraries from the image / LD_LIBRARY_PATH and use a runtime the "
        "host driver supports, or upgrade the host driver",
    ),
    Signature(
        "cuda.system_driver_mismatch",
        "libcuda and the kernel module are from different drivers",
        "driver CUDA_ERROR_SYSTEM_DRIVER_MISMATCH = 803, runtime cudaErrorSystemDriverMismatch "
        "= 803",
        (
            r"unsupported display driver / cuda driver combination",
            r"SYSTEM_DRIVER_MISMATCH",
            r"cudaErrorSystemDriverMismatch",
        ),
        "The user-space CUDA driver (libcuda.so) does not match the loaded kernel module: often "
        "an image that installs its own driver libraries, or an upgrade without a reboot.",
        "do not install driver libraries in the image (the NVIDIA container toolkit mounts the "
        "host's), or reboot after a driver upgrade",
    ),
    Signature(
        "cuda.unsupported_ptx",
        "PTX newer than the driver",
        "driver CUDA_ERROR_UNSUPPORTED_PTX_VERSION = 222, runtime cudaErrorUnsupportedPtxVersion "
        "= 222",
        (
            r"the provided PTX was compiled with an unsupported toolchain",
            r"UNSUPPORTED_PTX_VERSION",
            r"cudaErrorUnsupportedPtxVersion",
        ),
        "The kernel exists only as PTX made by a newer CUDA toolkit than the driver supports, and "
        "the driver cannot JIT-compile it: minor-version compatibility runs cubins, not newer "
        "PTX.",
        "build a cubin for this GPU (TORCH_CUDA_ARCH_LIST / nvcc -gencode "
        "arch=compute_{cc},code=sm_{cc}) with the driver's CUDA; for Triton, point "
        "TRITON_PTXAS_PATH at the ptxas of the driver's CUDA; or upgrade the driver to one for "
        "the toolkit that built it",
    ),
    Signature(
        "cuda.driver_older_than_runtime",
        "driver older than the CUDA runtime",
        "runtime cudaErrorInsufficientDriver = 35",
        (
            r"driver version is insufficient for CUDA runtime version",
            r"cudaErrorInsufficientDriver",
            r"NVIDIA driver on your system is too old",
        ),
        "The driver is older than the CUDA runtime the program was built with; it fails at the "
        "first CUDA call.",
        "pick a base image / wheel built for the driver's CUDA (nvidia-smi's header shows it; "
        "e.g. torch cu121 for a driver of CUDA 12.2), or upgrade the driver to one for the "
        "runtime's CUDA; gpufleet doctor shows both versions",
    ),
    Signature(
        "mps.connection_failed",
        "MPS client could not connect",
        "driver CUDA_ERROR_MPS_CONNECTION_FAILED = 805, runtime cudaErrorMpsConnectionFailed = 805",
        (
            r"MPS client failed to connect",
            r"MPS_CONNECTION_FAILED",
            r"cudaErrorMpsConnectionFailed",
        ),
        "The worker was pointed at an MPS daemon (CUDA_MPS_PIPE_DIRECTORY) that does not answer: "
        "it was not started, has exited, or runs as another user.",
        "check that nvidia-cuda-mps-control is on PATH and read its control.log (in "
        "CUDA_MPS_LOG_DIRECTORY); the worker must run as the daemon's user",
    ),
    Signature(
        "mps.server_not_ready",
        "MPS server not ready",
        "driver CUDA_ERROR_MPS_SERVER_NOT_READY = 807, runtime cudaErrorMpsServerNotReady = 807",
        (
            r"MPS server is not ready",
            r"MPS_SERVER_NOT_READY",
            r"cudaErrorMpsServerNotReady",
        ),
        "The MPS server is recovering from a fatal fault of one of its clients (with Volta MPS a "
        "fault ends every client of that server).",
        "retry once the server has restarted; find the client that faulted in the MPS server.log",
    ),
    Signature(
        "mps.max_clients",
        "MPS client limit reached",
        "driver CUDA_ERROR_MPS_MAX_CLIENTS_REACHED = 808 / MPS_MAX_CONNECTIONS_REACHED = 809, "
        "runtime cudaErrorMpsMaxClientsReached = 808 / cudaErrorMpsMaxConnectionsReached = 809",
        (
            r"MPS_MAX_CLIENTS_REACHED",
            r"MPS_MAX_CONNECTIONS_REACHED",
            r"cudaErrorMpsMax(Clients|Connections)Reached",
            r"resources required to (create MPS client|support device connections) have been "
            r"exhausted",
        ),
        "An MPS server has a fixed number of client slots per GPU, and they are all taken.",
        "run fewer workers per GPU (serve --workers-per-gpu, --standby), give each a larger "
        "compute_percent, or spread the model over more GPUs",
    ),
    Signature(
        "mps.client_terminated",
        "MPS server ended the client",
        "driver CUDA_ERROR_MPS_RPC_FAILURE = 806 / MPS_CLIENT_TERMINATED = 810, runtime "
        "cudaErrorMpsRpcFailure = 806 / cudaErrorMpsClientTerminated = 810",
        (
            r"MPS_RPC_FAILURE",
            r"MPS_CLIENT_TERMINATED",
            r"cudaErrorMps(RpcFailure|ClientTerminated)",
            r"MPS client has been terminated by the server",
            r"remote procedural call between the MPS server and the MPS client failed",
        ),
        "The MPS server dropped this client, after a fault in it or in another client of the "
        f"server, or because the daemon quit. {_RESTART}",
        "the worker restarts (the supervisor does it); if it repeats, read the MPS server.log "
        "for the client that faulted",
    ),
    Signature(
        "cuda.device_busy",
        "GPU busy or unavailable",
        "runtime cudaErrorDevicesUnavailable = 46, driver CUDA_ERROR_DEVICE_UNAVAILABLE = 46",
        (
            r"CUDA-capable device\(s\) is/are busy or unavailable",
            r"all CUDA-capable devices are busy or unavailable",
            r"cudaErrorDevicesUnavailable",
            r"CUDA_ERROR_DEVICE_UNAVAILABLE",
        ),
        "The GPU is in compute mode EXCLUSIVE_PROCESS (or PROHIBITED) and another process holds "
        "its CUDA context: another worker, a standby process, or a program outside gpufleet.",
        "nvidia-smi shows the compute mode and who holds the GPU: give it one process "
        "(--workers-per-gpu 1, --standby 0), use mode mps, or set compute mode DEFAULT "
        "(nvidia-smi -i N -c DEFAULT, as root)",
    ),
    Signature(
        "cuda.no_kernel_image",
        "no kernel for this GPU's architecture",
        "runtime cudaErrorNoKernelImageForDevice = 209 / cudaErrorInvalidDeviceFunction = 98, "
        "driver CUDA_ERROR_NO_BINARY_FOR_GPU = 209",
        (
            r"no kernel image is available for execution on the device",
            r"cudaErrorNoKernelImageForDevice",
            r"NO_BINARY_FOR_GPU",
            r"invalid device function",
            r"cudaErrorInvalidDeviceFunction",
            r"is not compatible with the current PyTorch installation",
        ),
        "Its kernels have no binary for this GPU: a library or model built for other compute "
        "capabilities, or a torch / onnxruntime wheel older than the GPU.",
        "rebuild with TORCH_CUDA_ARCH_LIST including {cc_dot} (nvcc -gencode "
        "arch=compute_{cc},code=sm_{cc}) and add '{cc_dot}' to compatibility.arch, or install a "
        "torch / onnxruntime build whose arch list has sm_{cc} (torch.cuda.get_arch_list())",
    ),
    Signature(
        "cuda.cublas_unsupported",
        "cuBLAS has no kernel for this GPU",
        "CUBLAS_STATUS_NOT_SUPPORTED = 15, CUBLAS_STATUS_ARCH_MISMATCH = 8",
        (r"CUBLAS_STATUS_NOT_SUPPORTED", r"CUBLAS_STATUS_ARCH_MISMATCH"),
        "cuBLAS cannot run this matrix product on this GPU: most often a precision it lacks "
        "(bf16 needs compute capability >= 8.0, fp8 >= 8.9), or a cuBLAS older than the GPU.",
        "check the model against the GPU (gpufleet doctor MODEL): below 8.0 set precision: fp16; "
        "or install a CUDA / cuBLAS that supports this GPU",
    ),
    Signature(
        "cuda.out_of_memory",
        "GPU out of memory",
        "runtime cudaErrorMemoryAllocation = 2, driver CUDA_ERROR_OUT_OF_MEMORY = 2",
        (
            r"CUDA out of memory",
            r"OutOfMemoryError",
            r"CUDA_ERROR_OUT_OF_MEMORY",
            r"cudaErrorMemoryAllocation",
            r"CUBLAS_STATUS_ALLOC_FAILED",
            r"CUDA (error|failure)( 2)?: out of memory",
        ),
        "The worker asked for more GPU memory than it has left: the model plus its batch "
        "outgrew its share (memory_gb, or the MPS memory limit), or another process holds the "
        "rest.",
        "lower max_batch_size (or input sizes), raise resources.gpu.memory_gb or use mode whole, "
        "or free the GPU of other processes (nvidia-smi); when much is reserved but unallocated, "
        "set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
    ),
    Signature(
        "cuda.device_assert",
        "device-side assertion failed",
        "driver CUDA_ERROR_ASSERT = 710, runtime cudaErrorAssert = 710",
        (r"device-side assert triggered", r"CUDA_ERROR_ASSERT", r"cudaErrorAssert"),
        "A kernel's assertion failed, most often an index out of range (a token id >= the "
        f"vocabulary, a class label too large). {_RESTART}",
        "the worker restarts (the supervisor does it); run the failing input with "
        "CUDA_LAUNCH_BLOCKING=1 to find the kernel, and check inputs against the model's limits",
    ),
    Signature(
        "cuda.illegal_address",
        "a kernel faulted",
        "runtime cudaErrorIllegalAddress = 700 / cudaErrorInvalidAddressSpace = 717 / "
        "cudaErrorLaunchFailure = 719, driver CUDA_ERROR_ILLEGAL_ADDRESS = 700 / "
        "CUDA_ERROR_INVALID_ADDRESS_SPACE = 717 / CUDA_ERROR_LAUNCH_FAILED = 719",
        (
            r"an illegal memory access was encountered",
            r"CUDA_ERROR_ILLEGAL_ADDRESS",
            r"cudaErrorIllegalAddress",
            r"unspecified launch failure",
            r"CUDA_ERROR_LAUNCH_FAILED",
            r"cudaErrorLaunchFailure",
            r"misaligned address",
            r"an illegal instruction was encountered",
            r"operation not supported on global/shared address space",
            r"INVALID_ADDRESS_SPACE",
            r"cudaErrorInvalidAddressSpace",
        ),
        f"A kernel read or wrote outside its memory: a bug in a kernel or its inputs. {_RESTART}",
        "the worker restarts (the supervisor does it); find the kernel with "
        "CUDA_LAUNCH_BLOCKING=1 or compute-sanitizer, and check input sizes against the model's "
        "limits",
    ),
    Signature(
        "cuda.gpu_fault",
        "GPU hardware fault",
        "driver CUDA_ERROR_ECC_UNCORRECTABLE = 214, runtime cudaErrorECCUncorrectable = 214",
        (
            r"uncorrectable ECC error",
            r"ECC_UNCORRECTABLE",
            r"cudaErrorECCUncorrectable",
            r"fallen off the bus",
            r"GPU is lost",
        ),
        f"The GPU reported a hardware fault (ECC, or it left the PCIe bus). {_RESTART}",
        "drain the GPU, read nvidia-smi -q -d ECC and the kernel log (Xid), reset the GPU or "
        "reboot; repeated faults mean a replacement",
    ),
    Signature(
        "cuda.no_device",
        "no GPU visible",
        "runtime cudaErrorNoDevice = 100, driver CUDA_ERROR_NO_DEVICE = 100",
        (
            r"no CUDA-capable device is detected",
            r"No CUDA GPUs are available",
            r"CUDA_ERROR_NO_DEVICE",
            r"cudaErrorNoDevice",
        ),
        "The process sees no GPU: CUDA_VISIBLE_DEVICES is empty or names a GPU that is not "
        "there, the container was started without GPUs, or the driver is not loaded.",
        "check CUDA_VISIBLE_DEVICES and the container's GPU request (--gpus, nvidia.com/gpu); "
        "nvidia-smi inside the container must list the GPU",
    ),
    Signature(
        "cuda.unknown_error",
        "CUDA failed to start",
        "driver CUDA_ERROR_UNKNOWN = 999, runtime cudaErrorUnknown = 999",
        (
            r"CUDA_ERROR_UNKNOWN",
            r"cudaErrorUnknown",
            r"CUDA unknown error",
            r"CUDA (driver )?error: unknown error",
            r"\bError 999\b",
        ),
        "CUDA's catch-all at start-up: most often a driver older than the runtime, the "
        "nvidia_uvm module not loaded, or a GPU lost after a suspend or a failed reset.",
        "run gpufleet doctor: when it says the driver is older than the runtime, pick a base "
        "image / wheel for the driver; otherwise load nvidia_uvm (nvidia-modprobe -u -c=0) or "
        "reboot",
    ),
)

_TORCH_DRIVER = re.compile(r"too old \(found version (\d+)\)")
# torch names the GPU so: "... with CUDA capability sm_120 is not compatible with ..."
_ARCH_IN_TEXT = re.compile(r"capability sm_(\d+)(\d)\b")
_LINE_MAX = 200


def explain_all(text: str, *, capability: Capability | None = None) -> list[Finding]:
    """Every known failure in ``text``, most specific first, once each. ``capability``: the
    GPU's, when known, to name it in the fix."""
    found = []
    for sig in SIGNATURES:
        match = sig.search(text)
        if match is not None:
            found.append(_finding(sig, text, match, capability))
    return found


# Failures of the host, not of the task's input: another worker (or this one restarted) can
# run the task.
_HOST_CHECKS = frozenset({
    "nvml.driver_library_mismatch", "nvml.unknown_error", "cuda.stub_library",
    "cuda.compat_not_supported", "cuda.system_driver_mismatch", "cuda.driver_older_than_runtime",
    "mps.connection_failed", "mps.server_not_ready", "mps.max_clients", "mps.client_terminated",
    "cuda.device_busy", "cuda.gpu_fault", "cuda.no_device", "cuda.unknown_error",
})  # fmt: skip
_NO_MORE_CUDA = _HOST_CHECKS | {s.check for s in SIGNATURES if _RESTART in s.why}


def context_lost(finding: Finding | None) -> bool:
    """After this failure the process cannot run CUDA work (the context is lost, or the host
    refused it): the worker must exit and be restarted, not go on claiming work."""
    return finding is not None and finding.check in _NO_MORE_CUDA


def explain(text: str, *, capability: Capability | None = None) -> Finding | None:
    """The most specific known failure in ``text``, or None."""
    findings = explain_all(text, capability=capability)
    return findings[0] if findings else None


def _finding(
    sig: Signature, text: str, match: re.Match[str], capability: Capability | None
) -> Finding:
    start = text.rfind("\n", 0, match.start()) + 1
    end = text.find("\n", match.end())
    line = text[start : end if end >= 0 else len(text)].strip()
    if len(line) > _LINE_MAX:
        line = line[: _LINE_MAX - 3] + "..."
    found = f"{sig.title} ({sig.codes}): {line!r}"
    driver = _TORCH_DRIVER.search(text)
    if sig.check == "cuda.driver_older_than_runtime" and driver:
        number = int(driver[1])  # torch prints the driver's CUDA as 1000 * major + 10 * minor
        found += f"; the driver supports CUDA {number // 1000}.{number % 1000 // 10}"
    cc = capability
    if cc is None and (arch := _ARCH_IN_TEXT.search(text)):
        cc = (int(arch[1]), int(arch[2]))
    fix = sig.fix.format(
        cc=f"{cc[0]}{cc[1]}" if cc else "XY",
        cc_dot=f"{cc[0]}.{cc[1]}" if cc else "X.Y",
    )
    return Finding(Severity.ERROR, sig.check, found, sig.why, fix, "worker")
