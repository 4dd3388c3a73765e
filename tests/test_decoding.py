"""Decoding: the bytes per pixel the servers' decode bound states, measured; the memory-saving
steps of the decoder proven pixel-identical to the plain ones; no file left open.

The figures come from ``benchmarks/bench_decode_memory.py`` (peak resident memory of one decode
in a fresh process, Linux), the same measurement docs/runtime.md quotes.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageOps

from coopkit.runtime.preprocess import apply_orientation, rgb_array

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
        got = apply_orientation(img)
        assert got.size == want.size and np.array_equal(np.asarray(got), np.asarray(want)), orientation


def test_strip_copy_equals_numpy_asarray() -> None:
    """The strip-by-strip copy of the raw-input path equals ``np.asarray`` on every shape,
    one strip or many, with a last strip cut short."""
    rng = np.random.default_rng(0)
    for h, w in ((1, 1), (5, 3), (1000, 400), (701, 523), (3, 40000)):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got = rgb_array(Image.fromarray(arr))
        assert got.dtype == np.uint8 and got.shape == (h, w, 3) and np.array_equal(got, arr), (h, w)


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def _resource_warnings(fn: Any) -> list[str]:
    """The ResourceWarnings (unclosed files) that calling ``fn`` leaves for the collector."""
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        try:
            fn()
        except Exception:  # noqa: BLE001 - refusals are expected; only the handles matter here
            pass
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.mark.filterwarnings("error::ResourceWarning")
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_fit_skipping_a_truncated_jpeg_leaves_no_file_open(tiny_backbone, image_folder, tmp_path) -> None:
    """fit() skips a truncated JPEG of the training folder (strict=False) without leaking its file."""
    pytest.importorskip("torch")
    import shutil

    import coopkit

    train = tmp_path / "train"
    shutil.copytree(image_folder / "train", train)
    for cls in sorted(p for p in train.iterdir() if p.is_dir()):
        _truncated_jpeg(cls / "zz_truncated.jpg")

    def fit() -> None:
        coopkit.fit(train, backbone=tiny_backbone, shots=8, epochs=1, n_views=1, n_ctx=2, batch_size=8, progress=False)

    assert _resource_warnings(fit) == []


def test_no_image_input_leaves_a_file_open(tmp_path) -> None:
    """The general rule, for every way the decoder can end on a path: decoded, truncated, too
    large, not an image, a multi-frame GIF or TIFF (whose other frames Pillow keeps the file for)."""
    from coopkit.runtime.preprocess import load_image

    frames = [Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "one.png")
    Image.new("L", (200, 200)).save(tmp_path / "big.png")
    _truncated_jpeg(tmp_path / "cut.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    for name, max_pixels in (("anim.gif", 10**6), ("pages.tif", 10**6), ("one.png", 10**6), ("big.png", 100),
                             ("cut.jpg", 10**6), ("text.jpg", 10**6)):
        assert _resource_warnings(lambda: load_image(tmp_path / name, max_pixels=max_pixels)) == [], name
    first = load_image(tmp_path / "anim.gif")
    assert np.array_equal(np.asarray(first), np.asarray(frames[0].convert("P").convert("RGB")))
