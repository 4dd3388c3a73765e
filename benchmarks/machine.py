"""What every benchmark reports about the machine, and a second process that keeps one CPU busy.

Figures depend on the CPU's instruction set (AVX2, AVX-512, VNNI), the thread count and the
load from other processes: :func:`describe` names all three, :func:`load` reads the load
average before and after, and :func:`busy_core` starts the contention the rows "one CPU busy"
are measured under.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable, Iterator, Optional


def isa() -> str:
    """The x86 vector extensions that matter for these kernels, e.g. ``AVX2 + AVX-512 + AVX-512 VNNI``."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return platform.machine()
    names = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"), ("avx512_bf16", "AVX-512 BF16"), ("avx_vnni", "AVX-VNNI"),
             ("amx_int8", "AMX-INT8")]
    found = [label for flag, label in names if flag in flags]
    return " + ".join(found) or "no AVX2"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor() or platform.machine()


def load() -> str:
    """The 1-minute load average and the number of CPUs, e.g. ``load 3.2 on 2 CPUs``."""
    one = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"load {one:.1f} on {os.cpu_count()} CPUs"


def describe(threads: Optional[int] = None) -> dict[str, Any]:
    return {"cpu": cpu_model(), "isa": isa(), "cpus": os.cpu_count(), "threads": threads,
            "python": platform.python_version(), "load_before": load()}


@contextlib.contextmanager
def busy_core(cpu: Optional[int] = None) -> Iterator[int]:
    """A second process spinning on one CPU (the last one this process may use) meanwhile."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cpu = cpus[-1] if cpu is None else cpu
    code = f"import os\nif hasattr(os, 'sched_setaffinity'): os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
    child = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)
    try:
        yield cpu
    finally:
        child.kill()
        child.wait()


def interleaved_speeds(fns: dict[str, Callable[[], Any]], n_images: int, min_seconds: float, warmup: int = 2) -> dict[str, float]:
    """Images per second of each ``fn`` (each handles ``n_images``): best single run, with the
    candidates interleaved round by round so that load from other processes hits all alike. Each
    round starts one candidate later, so none always runs right after the same one (an engine whose
    threads spin on after it returns, as OpenVINO's do, slows whatever follows it)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    spent = 0.0
    rounds = 0
    order = list(fns.items())
    while spent < min_seconds * len(fns) or rounds < 3:
        for name, fn in order[rounds % len(order):] + order[: rounds % len(order)]:
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            best[name], spent = min(best[name], dt), spent + dt
        rounds += 1
    return {name: n_images / b for name, b in best.items()}


def random_backbone(model: str, device: str, tiny_name: str, tiny_config: dict[str, Any]) -> Any:
    """A random-init backbone of an open_clip ``model``, or, when ``model`` is ``tiny_name``, of the
    small architecture ``tiny_config`` (written to a temporary config file): the smoke runs' model."""
    import json
    import tempfile
    from pathlib import Path

    import coopkit

    if model == tiny_name:
        path = Path(tempfile.mkdtemp()) / f"coopkit-bench-{tiny_name}.json"
        path.write_text(json.dumps(tiny_config))
        model = str(path)
    return coopkit.load_backbone(model, pretrained=None, device=device)


def memory_mb(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, in MB, from
    ``/proc/self/status`` (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def reset_peak_memory() -> float:
    """Reset this process's peak resident memory (``VmHWM``) to its current size and return that size
    in MB: the baseline of ``memory_mb("VmHWM")`` for what runs next. ``ru_maxrss`` cannot be reset, so
    a peak reached earlier in the process (the parent's, a reference computation) would hide the
    next one (Linux: ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return memory_mb("VmRSS")
