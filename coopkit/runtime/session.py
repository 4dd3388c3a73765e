"""Choosing where an ONNX graph runs: CUDA when it really works, else the CPU.

onnxruntime-gpu lists ``CUDAExecutionProvider`` in ``get_available_providers()`` on every
machine, GPU or not, and when CUDA cannot start it logs an error and silently runs on the CPU.
So ``device="auto"`` first asks the NVIDIA driver whether a GPU exists (no driver, no GPU: CPU,
without touching CUDA and without onnxruntime's error messages), then creates the session with
CUDA first and reads back what onnxruntime really chose (``session.get_providers()``).
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from .contract import MetadataError

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")

ProviderSpec = Union[str, tuple[str, dict[str, Any]]]

#: onnxruntime 1.31's CPU layout optimiser crashes the process (segfault) when it opens some fp16
#: transformer graphs; it is switched off in every session the runtime creates (about 2% on fp32).
CPU_DISABLED_OPTIMIZERS = ("NchwcTransformer",)

_ORT_DEFAULT_LOG_SEVERITY = 2  # onnxruntime's default (warning); there is no getter to read it back


@dataclass(frozen=True)
class DeviceRequest:
    """A parsed ``device`` argument: ``kind`` is ``auto``, ``cpu`` or ``cuda``."""

    kind: str
    device_id: int = 0

    @classmethod
    def parse(cls, device: str) -> "DeviceRequest":
        text = str(device).strip().lower()
        kind, _, index = text.partition(":")
        if kind not in DEVICES or (index and (kind != "cuda" or not index.isdigit())):
            raise ValueError(f"device {device!r} is not one of {DEVICES} (or 'cuda:N')")
        return cls(kind, int(index) if index else 0)


_SAFE = {"disabled_optimizers": list(CPU_DISABLED_OPTIMIZERS)}


def _ort() -> Any:
    import onnxruntime  # imported here so that `import coopkit.runtime` stays quick

    return onnxruntime


def cuda_device_count() -> tuple[int, str]:
    """Number of CUDA GPUs the NVIDIA driver reports, and a reason when it is 0.

    Uses the driver library directly (``libcuda``), so it costs nothing and prints nothing on
    machines without one.
    """
    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if lib is None:
        return 0, "no NVIDIA driver (libcuda) found"
    try:
        if lib.cuInit(0) != 0:
            return 0, "the NVIDIA driver failed to initialise (cuInit)"
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0, "the NVIDIA driver could not count devices"
    except AttributeError:
        return 0, "libcuda has no cuInit/cuDeviceGetCount"
    if count.value == 0:
        return 0, "the NVIDIA driver reports no GPU"
    return count.value, ""


@contextlib.contextmanager
def _quiet_onnxruntime(ort: Any, quiet: bool):
    """Silence onnxruntime's process-wide logger (provider load failures log there)."""
    if not quiet:
        yield
        return
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_LOG_SEVERITY)


def _preload_cuda_libraries(ort: Any) -> None:
    """Let onnxruntime load CUDA/cuDNN from pip's ``nvidia-*`` wheels when they are installed
    (its ``preload_dlls``); harmless when they are not. Its messages go to the debug log."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or getattr(_preload_cuda_libraries, "done", False):
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            preload()
    except Exception as e:  # noqa: BLE001 - best effort; the session creation below is the real test
        logger.debug("onnxruntime.preload_dlls failed: %s", e)
    if buffer.getvalue().strip():
        logger.debug("onnxruntime.preload_dlls: %s", buffer.getvalue().strip())
    _preload_cuda_libraries.done = True  # type: ignore[attr-defined]


def session_options(threads: Optional[int] = None) -> Any:
    """Session options: onnxruntime's session log at error level, optional intra-op threads."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return opts


def _with_cpu(providers: Sequence[ProviderSpec]) -> list[ProviderSpec]:
    names = [p if isinstance(p, str) else p[0] for p in providers]
    return list(providers) if CPU in names else [*providers, CPU]


def create_session(
    model: Union[str, os.PathLike, bytes],
    device: str = "auto",
    threads: Optional[int] = None,
    providers: Optional[Sequence[ProviderSpec]] = None,
) -> Any:
    """Create an ``onnxruntime.InferenceSession`` on the requested device.

    Args:
        model: Path of the ONNX file (or its bytes).
        device: ``auto`` (CUDA when it really runs, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        threads: Intra-op CPU threads (``None``: onnxruntime's default, one per core).
        providers: Explicit onnxruntime providers (names or ``(name, options)`` pairs), e.g.
            ``["TensorrtExecutionProvider", "CUDAExecutionProvider"]``; overrides ``device``.
            The CPU provider is always appended as the last fallback.

    Raises:
        ValueError: an unknown device.
        RuntimeError: ``device="cuda"`` where CUDA cannot run (the message says why).
    """
    request = DeviceRequest.parse(device)
    ort = _ort()
    opts = session_options(threads)
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model

    if providers is not None:
        if not providers:
            raise ValueError("providers must name at least one onnxruntime execution provider")
        available = ort.get_available_providers()
        names = [p if isinstance(p, str) else p[0] for p in providers]
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"providers {unknown} are not in this onnxruntime build; available: {available}")
        if any(n in (CUDA, TENSORRT) for n in names):
            _preload_cuda_libraries(ort)
        session = ort.InferenceSession(source, opts, providers=_with_cpu(providers), **_SAFE)
        if session.get_providers()[0] != names[0]:
            logger.warning("requested provider %s is not usable; running on %s", names[0], session.get_providers()[0])
        return session

    if request.kind == "cpu":
        return ort.InferenceSession(source, opts, providers=[CPU], **_SAFE)

    reason = ""
    if CUDA not in ort.get_available_providers():
        reason = f"this onnxruntime build has no CUDA provider (install onnxruntime-gpu; it has {ort.get_available_providers()})"
    else:
        count, reason = cuda_device_count()
        if count and request.device_id >= count:
            reason = f"device cuda:{request.device_id} requested but the driver reports {count} GPU(s)"
    if not reason:
        _preload_cuda_libraries(ort)
        cuda = (CUDA, {"device_id": request.device_id})
        with _quiet_onnxruntime(ort, quiet=request.kind == "auto"):
            session = ort.InferenceSession(source, opts, providers=[cuda, CPU], **_SAFE)
        if session.get_providers()[0] == CUDA:
            return session
        reason = (
            "onnxruntime could not start its CUDA provider (usually missing CUDA or cuDNN libraries "
            "of the versions this onnxruntime-gpu was built for; see onnxruntime's message above"
            + (" when run with device='cuda')" if request.kind == "auto" else ")")
        )
        if request.kind == "auto":
            logger.warning("a GPU is present but CUDA is unusable, running on the CPU: %s", reason)
            return session  # onnxruntime already fell back to the CPU provider
    if request.kind == "cuda":
        raise RuntimeError(f"device={device!r} requested but CUDA cannot run here: {reason}; use device='auto' or 'cpu'")
    logger.debug("running on the CPU: %s", reason)
    return ort.InferenceSession(source, opts, providers=[CPU], **_SAFE)


def open_session(
    path: Union[str, os.PathLike],
    device: str = "auto",
    threads: Optional[int] = None,
    providers: Optional[Sequence[ProviderSpec]] = None,
) -> Any:
    """:func:`create_session` for a file, with onnxruntime's load errors as one-line MetadataError exceptions.

    The shared opening step of the image classifier and the text encoder.
    """
    try:
        return create_session(path, device=device, threads=threads, providers=providers)
    except Exception as e:
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if "protobuf" in text.lower():
            raise MetadataError(f"{path} is not an ONNX file (onnxruntime: {text})") from None
        raise MetadataError(f"{path}: onnxruntime cannot load this model: {text}") from None
