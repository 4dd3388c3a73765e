"""Helpers the GPU-check sections share: the row format, the model, timing on CUDA or the CPU."""

from __future__ import annotations

import os
import time
from typing import Any, Callable

QUICK = os.environ.get("GPU_CHECK_QUICK") == "1"
MODEL = os.environ.get("GPU_CHECK_MODEL", "coopkit-tiny" if QUICK else "ViT-B-32")
BATCHES = (1, 8) if QUICK else (1, 32, 256)


def row(section: str, what: str, value: Any, note: str = "") -> None:
    """One line of the final table (``|`` in texts replaced, so the table stays a table)."""
    clean = [str(x).replace("|", "/").replace("\n", " ") for x in (section, what, value, note)]
    print("ROW|" + "|".join(clean), flush=True)


def cuda_ok() -> bool:
    import torch

    return torch.cuda.is_available()


def best_seconds(fn: Callable[[], Any], sync: Callable[[], None], repeats: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def pretrained_for(model: str) -> Any:
    return "default" if model == "coopkit-tiny" else None
