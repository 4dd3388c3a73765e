"""Photo-like test images the benchmarks share: smooth colour fields, a disc of one colour, noise.

Deterministic for a seed; :func:`photos` yields them one at a time (a few hundred 640x480 images
would not fit comfortably in memory at once), :func:`photo_batch` stacks them.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


def photos(n: int, size: tuple[int, int], seed: int = 0) -> Iterator[np.ndarray]:
    """``n`` uint8 images ``(H, W, 3)`` of ``size`` = (H, W)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        f = rng.uniform(1, 6, size=3)
        img = np.stack([128 + 110 * np.sin(xx / w * f[0] + i), 128 + 110 * np.cos(yy / h * f[1]),
                        128 + 110 * np.sin((xx + yy) / (w + h) * f[2])], -1)
        cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0.1, 0.35) * min(h, w)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, size=3)
        yield np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def photo_batch(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """:func:`photos` as one uint8 array ``(n, H, W, 3)``."""
    out = np.empty((n, *size, 3), np.uint8)
    for i, img in enumerate(photos(n, size, seed)):
        out[i] = img
    return out
