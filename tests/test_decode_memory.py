"""Decoding memory: the bytes per pixel the servers' decode bound states, measured, and the
memory-saving steps of the decoder proven pixel-identical to the plain ones.

The figures come from ``benchmarks/bench_decode_memory.py`` (peak resident memory of one decode
in a fresh process, Linux), the same measurement docs/runtime.md quotes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from coopkit.runtime.preprocess import _apply_orientation, _rgb_array

ROOT = Path(__file__).resolve().parents[1]

#: What docs/runtime.md states, per kind of image: RGB photos through a cropped-input file's
#: path, any 8-bit image through either path, 16-bit greyscale (a little slack for the allocator).
STATED = {"rgb": 4.4, "8-bit": 8.1, "16-bit": 12.1}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures VmHWM (Linux)")
def test_decoding_peaks_within_the_stated_bytes_per_pixel() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_decode_memory.py"), "--size", "3000x3000",
                          "--json"], capture_output=True, text=True, timeout=600, check=True)
    rows = json.loads(out.stdout)
    assert len(rows) == 14
    over = []
    for r in rows:
        limit = (STATED["16-bit"] if r["kind"] == "grey16_png" else
                 STATED["rgb"] if r["kind"] in ("rgb_png", "rgb_jpeg") and r["path"] == "prepare" else STATED["8-bit"])
        if r["bytes_per_pixel"] > limit:
            over.append((r["kind"], r["path"], round(r["bytes_per_pixel"], 2), limit))
    assert not over, over


def _exif_jpeg(orientation: int | None, size: tuple[int, int] = (37, 23)) -> Image.Image:
    rgb = np.random.default_rng(orientation or 0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(rgb).save(buf, "JPEG", exif=exif.tobytes())
    return Image.open(io.BytesIO(buf.getvalue()))


def test_orientation_without_a_copy_equals_exif_transpose() -> None:
    """Every EXIF orientation (and none) turns an image exactly as ImageOps.exif_transpose does."""
    for orientation in (None, 1, 2, 3, 4, 5, 6, 7, 8):
        img = _exif_jpeg(orientation)
        img.load()
        want = ImageOps.exif_transpose(img)
        got = _apply_orientation(img)
        assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want)), orientation


def test_strip_copy_equals_numpy_asarray() -> None:
    """The strip-by-strip copy of the raw-input path equals ``np.asarray`` on every shape,
    one strip or many, with a last strip cut short."""
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (5, 3), (1000, 400), (701, 523), (3, 40000)):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = _rgb_array(Image.fromarray(arr))
        assert got.dtype == np.uint8 and got.shape == (h, w, 3) and np.array_equal(got, arr), (h, w)
