"""Crash output -> the known CUDA failure, in the messages torch, CuPy, Triton, onnxruntime, NVML
and the CUDA runtime print (copied from real failures; the H100 ones captured on the lent GPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpufleet.gpu.compat import DeviceFacts, Severity, check_arch, check_driver_runtime
from gpufleet.gpu.cuda_errors import SIGNATURES, explain, explain_all

TORCH_OOM = (
    "Traceback (most recent call last):\n"
    '  File "/srv/worker.py", line 12, in predict\n'
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
    "capacity of 79.44 GiB of which 17.69 GiB is free. Process 2114 has 61.74 GiB memory in use. "
    "Of the allocated memory 60.00 GiB is allocated by PyTorch, and 1.23 GiB is reserved by "
    "PyTorch but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation "
    "for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
ASYNC_NOTE = (
    "\nCUDA kernel errors might be asynchronously reported at some other API call, so the "
    "stacktrace below might be incorrect.\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1"
    "\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
)
TORCH_TOO_OLD = (
    "/usr/lib/python3/site-packages/torch/cuda/__init__.py:129: UserWarning: CUDA initialization: "
    "The NVIDIA driver on your system is too old (found version 11040). Please update your GPU "
    "driver by downloading and installing a new version from the URL: "
    "http://www.nvidia.com/Download/index.aspx Alternatively, go to: https://pytorch.org to "
    "install a PyTorch version that has been compiled with your version of the CUDA driver. "
    "(Triggered internally at ../c10/cuda/CUDAFunctions.cpp:108.)"
)
TORCH_SM120 = (
    "UserWarning: \nNVIDIA GeForce RTX 5090 with CUDA capability sm_120 is not compatible with "
    "the current PyTorch installation.\nThe current PyTorch install supports CUDA capabilities "
    "sm_50 sm_60 sm_70 sm_75 sm_80 sm_86 sm_90.\n"
    "RuntimeError: CUDA error: no kernel image is available for execution on the device"
    + ASYNC_NOTE
)

# Captured on the lent H100 (torch 2.11.0+cu130, CuPy 14, CUDA 13.0), one process per failure.
H100_CASES = [
    (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 32768.00 GiB. GPU 0 has a "
        "total capacity of 79.18 GiB of which 78.66 GiB is free. Including non-PyTorch memory, "
        "this process has 518.00 MiB memory in use. Of the allocated memory 0 bytes is allocated "
        "by PyTorch, and 0 bytes is reserved by PyTorch but unallocated.",
        "cuda.out_of_memory",
    ),
    (
        "/pytorch/aten/src/ATen/native/cuda/IndexKernel.cu:111: operator(): block: [0,0,0], "
        'thread: [0,0,0] Assertion `-sizes[i] <= index && index < sizes[i] && "index out of '
        'bounds"` failed.\ntorch.AcceleratorError: CUDA error: device-side assert triggered\n'
        "Search for `cudaErrorAssert' in https://docs.nvidia.com/cuda/cuda-runtime-api/"
        "group__CUDART__TYPES.html for more information." + ASYNC_NOTE,
        "cuda.device_assert",
    ),
    (
        "torch.AcceleratorError: CUDA error: operation not supported on global/shared address "
        "space\nSearch for `cudaErrorInvalidAddressSpace' in https://docs.nvidia.com/cuda/"
        "cuda-runtime-api/group__CUDART__TYPES.html for more information." + ASYNC_NOTE,
        "cuda.illegal_address",
    ),
    (
        "cupy_backends.cuda.api.runtime.CUDARuntimeError: cudaErrorIllegalAddress: an illegal "
        "memory access was encountered",
        "cuda.illegal_address",
    ),
    (
        "cupy_backends.cuda.api.driver.CUDADriverError: CUDA_ERROR_UNSUPPORTED_PTX_VERSION: the "
        "provided PTX was compiled with an unsupported toolchain.",
        "cuda.unsupported_ptx",
    ),
    (
        "launch: cudaErrorNoKernelImageForDevice (209) no kernel image is available for execution "
        "on the device",
        "cuda.no_kernel_image",
    ),
    ("RuntimeError: No CUDA GPUs are available", "cuda.no_device"),
    (
        "cupy_backends.cuda.api.runtime.CUDARuntimeError: cudaErrorNoDevice: no CUDA-capable "
        "device is detected",
        "cuda.no_device",
    ),
    (
        "cupy.cuda.memory.OutOfMemoryError: Out of memory allocating 35,184,372,088,832 bytes "
        "(allocated so far: 0 bytes).",
        "cuda.out_of_memory",
    ),
]

CASES = [
    *H100_CASES,
    (TORCH_OOM, "cuda.out_of_memory"),
    (
        "cupy_backends.cuda.api.driver.CUDADriverError: CUDA_ERROR_OUT_OF_MEMORY: out of memory",
        "cuda.out_of_memory",
    ),
    (
        "onnxruntime.capi.onnxruntime_pybind11_state.RuntimeException: [ONNXRuntimeError] : 6 : "
        "RUNTIME_EXCEPTION : CUDA failure 2: out of memory ; GPU=0 ; hostname=w1 ; expr=cudaMalloc",
        "cuda.out_of_memory",
    ),
    (
        "RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuda.out_of_memory",
    ),
    (TORCH_TOO_OLD, "cuda.driver_older_than_runtime"),
    (
        "RuntimeError: CUDA error: CUDA driver version is insufficient for CUDA runtime version",
        "cuda.driver_older_than_runtime",
    ),
    (
        "RuntimeError: Triton Error [CUDA]: the provided PTX was compiled with an unsupported "
        "toolchain.",
        "cuda.unsupported_ptx",
    ),
    (
        "RuntimeError: CUDA error: no kernel image is available for execution on the device"
        + ASYNC_NOTE,
        "cuda.no_kernel_image",
    ),
    ("RuntimeError: CUDA error: invalid device function" + ASYNC_NOTE, "cuda.no_kernel_image"),
    (
        "[ONNXRuntimeError] : 1 : FAIL : CUDA failure 209: no kernel image is available for "
        "execution on the device ; GPU=0 ; expr=cudaGetLastError();",
        "cuda.no_kernel_image",
    ),
    (TORCH_SM120, "cuda.no_kernel_image"),
    (
        "RuntimeError: CUDA error: CUDA-capable device(s) is/are busy or unavailable" + ASYNC_NOTE,
        "cuda.device_busy",
    ),
    (
        "RuntimeError: CUDA error: all CUDA-capable devices are busy or unavailable",
        "cuda.device_busy",
    ),
    (
        "Failed to initialize NVML: Driver/library version mismatch\nNVML library version: 535.183",
        "nvml.driver_library_mismatch",
    ),
    (
        "pynvml.NVMLError_LibRmVersionMismatch: RM has detected an NVML/RM version mismatch.",
        "nvml.driver_library_mismatch",
    ),
    (
        "RuntimeError: CUDA error: MPS client failed to connect to the MPS control daemon or the "
        "MPS server",
        "mps.connection_failed",
    ),
    (
        "CUDADriverError: CUDA_ERROR_MPS_SERVER_NOT_READY: MPS server is not ready to accept new "
        "MPS client requests",
        "mps.server_not_ready",
    ),
    (
        "CUDADriverError: CUDA_ERROR_MPS_MAX_CLIENTS_REACHED: the hardware resources required to "
        "create MPS client have been exhausted",
        "mps.max_clients",
    ),
    (
        "RuntimeError: CUDA error: the MPS client has been terminated by the server. To continue "
        "using CUDA, the process must be terminated and relaunched",
        "mps.client_terminated",
    ),
    (
        "RuntimeError: CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling "
        "`cublasGemmStridedBatchedExFix(handle, opa, opb, m, n, k, (void*)(&falpha), a, "
        "CUDA_R_16BF, lda, stridea, b, CUDA_R_16BF, ldb, strideb, (void*)(&fbeta), c, CUDA_R_16BF, "
        "ldc, stridec, num_batches, CUDA_R_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP)`",
        "cuda.cublas_unsupported",
    ),
    (
        "RuntimeError: CUDA error: CUBLAS_STATUS_ARCH_MISMATCH when calling `cublasGemmEx( "
        "handle, opa, opb, m, n, k, &falpha, a, CUDA_R_16F, lda, b, CUDA_R_16F, ldb, &fbeta, c, "
        "CUDA_R_16F, ldc, CUDA_R_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP)`",
        "cuda.cublas_unsupported",
    ),
    (
        "RuntimeError: CUDA error: an illegal memory access was encountered" + ASYNC_NOTE,
        "cuda.illegal_address",
    ),
    (
        "CUDADriverError: CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered",
        "cuda.illegal_address",
    ),
    ("RuntimeError: CUDA error: unspecified launch failure" + ASYNC_NOTE, "cuda.illegal_address"),
    (
        "../aten/src/ATen/native/cuda/IndexKernel.cu:92: operator(): block: [0,0,0], thread: "
        '[0,0,0] Assertion `-sizes[i] <= index && index < sizes[i] && "index out of bounds"` '
        "failed.\nRuntimeError: CUDA error: device-side assert triggered" + ASYNC_NOTE,
        "cuda.device_assert",
    ),
    (
        "UserWarning: CUDA initialization: CUDA unknown error - this may be due to an incorrectly "
        "set up environment, e.g. changing env variable CUDA_VISIBLE_DEVICES after program start. "
        "Setting the available devices to be zero.",
        "cuda.unknown_error",
    ),
    ("RuntimeError: CUDA error: unknown error", "cuda.unknown_error"),
    (
        "RuntimeError: Unexpected error from cudaGetDeviceCount(). Did you run some cuda "
        "functions before calling NumCudaDevices() that might have already set an error? Error "
        "804: forward compatibility was attempted on non supported HW",
        "cuda.compat_not_supported",
    ),
    (
        "RuntimeError: Unexpected error from cudaGetDeviceCount(). Did you run some cuda "
        "functions before calling NumCudaDevices() that might have already set an error? Error "
        "803: system has unsupported display driver / cuda driver combination",
        "cuda.system_driver_mismatch",
    ),
    (
        "CUDADriverError: CUDA_ERROR_STUB_LIBRARY: CUDA driver is a stub library",
        "cuda.stub_library",
    ),
    ("RuntimeError: CUDA error: uncorrectable ECC error encountered", "cuda.gpu_fault"),
    ("Failed to initialize NVML: Unknown Error", "nvml.unknown_error"),
]


@pytest.mark.parametrize(("text", "check"), CASES, ids=[c for _, c in CASES])
def test_each_known_failure_is_explained(text: str, check: str) -> None:
    finding = explain(text)
    assert finding is not None and finding.check == check
    assert finding.severity is Severity.ERROR
    assert finding.why.endswith(".") and finding.fix and finding.subject == "worker"


def test_every_signature_has_a_case() -> None:
    assert {s.check for s in SIGNATURES} <= {c for _, c in CASES}


def test_found_quotes_the_line_and_labels_the_codes() -> None:
    finding = explain("step 3\n" + TORCH_SM120.split("\n", 3)[-1] + "\nstep 4")
    assert finding is not None
    assert "'RuntimeError: CUDA error: no kernel image is available" in finding.found
    assert "runtime cudaErrorNoKernelImageForDevice = 209" in finding.found
    assert "driver CUDA_ERROR_NO_BINARY_FOR_GPU = 209" in finding.found
    assert "step" not in finding.found


def test_the_gpu_named_in_the_text_or_given_goes_into_the_fix() -> None:
    from_text = explain(TORCH_SM120)
    assert from_text is not None and "sm_120" in from_text.fix and "'12.0'" in from_text.fix
    given = explain("CUDA error: invalid device function", capability=(8, 9))
    assert given is not None and "arch=compute_89,code=sm_89" in given.fix
    unknown = explain("CUDA error: invalid device function")
    assert unknown is not None and "sm_XY" in unknown.fix


def test_the_driver_torch_found_is_named() -> None:
    finding = explain(TORCH_TOO_OLD)
    assert finding is not None and "the driver supports CUDA 11.4" in finding.found


def test_most_specific_first_and_each_once() -> None:
    text = TORCH_TOO_OLD + "\nRuntimeError: CUDA error: unknown error\n" + TORCH_TOO_OLD
    found = explain_all(text)
    assert [f.check for f in found] == ["cuda.driver_older_than_runtime", "cuda.unknown_error"]
    assert explain(text) == found[0]


def test_in_the_same_words_as_the_rules_that_predict_them() -> None:
    old = DeviceFacts("cuda", "A10", (8, 6), "515.65.01", (11, 7), (12, 1))
    [rule] = check_driver_runtime(old)
    crash = explain("CUDA driver version is insufficient for CUDA runtime version")
    assert crash is not None and crash.check == rule.check
    assert "pick a base image / wheel built for" in rule.fix
    assert "pick a base image / wheel built for" in crash.fix
    [arch] = check_arch([(8, 0)], DeviceFacts("cuda", "H100", (9, 0)), subject="m@1")
    crash = explain("CUDA error: no kernel image is available for execution on the device")
    assert crash is not None
    for words in ("TORCH_CUDA_ARCH_LIST", "compatibility.arch", "no kernel image is available"):
        assert words in arch.fix + arch.why and words in crash.fix + crash.why + crash.found


def test_unknown_text_is_not_explained() -> None:
    assert explain("") is None
    assert explain("ValueError: prompt must be a string") is None
    assert explain_all("worker 3 finished 120 tasks") == []


def test_importing_it_loads_no_torch() -> None:
    code = "import sys, gpufleet.gpu.cuda_errors; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
