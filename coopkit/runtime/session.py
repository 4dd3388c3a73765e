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
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from .contract import MetadataError
from .integrity import stores_fp16

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
DEVICES = ("auto", "cpu", "cuda")

ProviderSpec = Union[str, tuple[str, dict[str, Any]]]

#: onnxruntime 1.31's CPU layout optimiser crashes the process (segfault) when it opens some fp16
#: transformer graphs; the runtime switches it off for files that store fp16 tensors only (on fp32
#: and int8 files it is worth 1.2-1.7x on convolutional image towers, see :func:`disabled_optimizers`).
CPU_DISABLED_OPTIMIZERS = ("NchwcTransformer",)

#: Most image-decoding threads :func:`default_workers` gives: decoding one photo-sized JPEG and
#: cropping it takes a few ms, so 8 threads keep even a GPU session fed, and more only add memory
#: (each thread holds one full-size decoded image, up to ``max_pixels``).
MAX_DEFAULT_WORKERS = 8

#: Seconds over which :func:`default_threads` measures how busy the CPUs are.
DEFAULT_SAMPLE_SECONDS = 0.05

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



def disabled_optimizers(model: Union[str, "os.PathLike[str]", bytes]) -> list[str]:
    """The onnxruntime graph optimisers a session of ``model`` runs without: the CPU layout
    optimiser for files that store fp16 tensors (and for bytes, which are not inspected), none
    otherwise."""
    if isinstance(model, (bytes, bytearray, memoryview)) or stores_fp16(model):
        return list(CPU_DISABLED_OPTIMIZERS)
    return []


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


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask; all of them where there is none)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_workers() -> int:
    """The image-decoding threads ``workers=None`` means, everywhere in the runtime (the
    :class:`~coopkit.runtime.Classifier`'s pool, batch prediction, ``coopkit serve``'s concurrent
    decodes): one per usable CPU, at most :data:`MAX_DEFAULT_WORKERS`."""
    return max(1, min(MAX_DEFAULT_WORKERS, len(usable_cpus())))


def _cpu_jiffies(cpus: Sequence[int]) -> tuple[int, int]:
    """(busy, total) scheduler ticks of ``cpus`` since boot, from /proc/stat."""
    busy = total = 0
    wanted = {f"cpu{c}" for c in cpus}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name in wanted:
                ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def _own_jiffies() -> int:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def busy_cpus(seconds: float = DEFAULT_SAMPLE_SECONDS) -> float:
    """How many of :func:`usable_cpus` other processes keep busy, measured over ``seconds``
    (Linux /proc/stat; 0.0 where it cannot be read)."""
    cpus = usable_cpus()
    try:
        busy0, total0 = _cpu_jiffies(cpus)
        own0 = _own_jiffies()
        time.sleep(seconds)
        busy1, total1 = _cpu_jiffies(cpus)
        own1 = _own_jiffies()
    except (OSError, ValueError, IndexError):
        return 0.0
    if total1 <= total0:
        return 0.0
    others = max(0, (busy1 - busy0) - (own1 - own0))
    return len(cpus) * others / (total1 - total0)


def default_threads(seconds: float = DEFAULT_SAMPLE_SECONDS) -> int:
    """The thread count ``threads=None`` means: the usable CPUs that other processes leave idle
    (at least 1), measured when the work starts.

    A thread pool larger than the idle CPUs makes every parallel step wait for a thread on a CPU
    another process holds: with one of 2 cores busy, a CoOp training step took 45x longer with
    2 threads than with 1. Later changes of the load are not followed; pass ``threads`` to fix it.
    """
    usable = len(usable_cpus())
    busy = busy_cpus(seconds) if usable > 1 else 0.0
    threads = max(1, min(usable, int(usable - busy + 0.5)))
    logger.debug("threads: %d (%d usable CPUs, %.1f busy with other processes)", threads, usable, busy)
    return threads


def check_threads(threads: Optional[int]) -> Optional[int]:
    """``threads`` if it is ``None`` or a positive integer; else a ValueError naming it."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None (one per idle CPU), got {threads!r}")
    return threads


def session_options(threads: Optional[int] = None, spinning: bool = False) -> Any:
    """Session options: onnxruntime's session log at error level, ``threads`` intra-op threads
    (``None``: :func:`default_threads`), one inter-op thread, and no spinning.

    onnxruntime's threads spin while they wait for work by default: on a busy machine that burns
    the CPU the other threads need (batch-1 latency on a loaded 2-core machine: 430 ms spinning,
    120-250 ms not). ``spinning=True`` brings it back for machines that serve nothing else.
    """
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = check_threads(threads) or default_threads()
    opts.inter_op_num_threads = 1
    allow = "1" if spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", allow)
    opts.add_session_config_entry("session.inter_op.allow_spinning", allow)
    return opts


def _with_cpu(providers: Sequence[ProviderSpec]) -> list[ProviderSpec]:
    names = [p if isinstance(p, str) else p[0] for p in providers]
    return list(providers) if CPU in names else [*providers, CPU]


def create_session(
    model: Union[str, os.PathLike, bytes],
    device: str = "auto",
    threads: Optional[int] = None,
    providers: Optional[Sequence[ProviderSpec]] = None,
    spinning: bool = False,
) -> Any:
    """Create an ``onnxruntime.InferenceSession`` on the requested device.

    Args:
        model: Path of the ONNX file (or its bytes).
        device: ``auto`` (CUDA when it really runs, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
        threads: Intra-op CPU threads (``None``: one per CPU that other processes leave idle,
            see :func:`default_threads`).
        providers: Explicit onnxruntime providers (names or ``(name, options)`` pairs), e.g.
            ``["TensorrtExecutionProvider", "CUDAExecutionProvider"]``; overrides ``device``.
            The CPU provider is always appended as the last fallback.
        spinning: Let idle onnxruntime threads spin (faster on a machine that runs nothing
            else, much slower on a busy one; see :func:`session_options`).

    Raises:
        ValueError: an unknown device.
        RuntimeError: ``device="cuda"`` where CUDA cannot run (the message says why).
    """
    request = DeviceRequest.parse(device)
    ort = _ort()
    opts = session_options(threads, spinning)
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model
    safe = {"disabled_optimizers": disabled_optimizers(source)}

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
        session = ort.InferenceSession(source, opts, providers=_with_cpu(providers), **safe)
        if session.get_providers()[0] != names[0]:
            logger.warning("requested provider %s is not usable; running on %s", names[0], session.get_providers()[0])
        return session

    if request.kind == "cpu":
        return ort.InferenceSession(source, opts, providers=[CPU], **safe)

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
            session = ort.InferenceSession(source, opts, providers=[cuda, CPU], **safe)
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
    return ort.InferenceSession(source, opts, providers=[CPU], **safe)


def cpu_session(model: Union[str, os.PathLike, bytes]) -> Any:
    """An onnxruntime session on the CPU provider alone, with onnxruntime's own thread defaults,
    its session log at error level and the optimisers the runtime opens the file with
    (:func:`disabled_optimizers`): the session the exporter verifies, calibrates and compares
    files with (``model``: a path, or a serialised model's bytes)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    source = os.fspath(model) if isinstance(model, (str, os.PathLike)) else model
    return ort.InferenceSession(source, opts, providers=[CPU], disabled_optimizers=disabled_optimizers(source))


def open_session(
    path: Union[str, os.PathLike],
    device: str = "auto",
    threads: Optional[int] = None,
    providers: Optional[Sequence[ProviderSpec]] = None,
    spinning: bool = False,
) -> Any:
    """:func:`create_session` for a file, with onnxruntime's load errors as one-line MetadataError exceptions.

    The shared opening step of the image classifier and the text encoder.
    """
    try:
        return create_session(path, device=device, threads=threads, providers=providers, spinning=spinning)
    except Exception as e:
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        if "protobuf" in text.lower():
            raise MetadataError(f"{path} is not an ONNX file (onnxruntime: {text})") from None
        raise MetadataError(f"{path}: onnxruntime cannot load this model: {text}") from None
