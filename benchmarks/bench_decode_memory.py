"""Peak memory of decoding one image, in bytes per pixel: what the servers' decode bound rests on.

    python benchmarks/bench_decode_memory.py                  # 6000x6000, every kind, both paths
    python benchmarks/bench_decode_memory.py --size 4000x3000 --json

For each kind of image (8-bit RGB PNG and JPEG, an EXIF-rotated JPEG, RGBA, greyscale and
palette PNGs, 16-bit greyscale), encoded once, a fresh process reads the encoded bytes, resets
its peak resident memory (``/proc/self/clear_refs``, Linux) and runs one path once:

* ``prepare``: what a cropped-input file's server does per image (``Classifier.prepare``:
  :func:`~coopkit.runtime.preprocess.preprocess`: decode, RGB, EXIF orientation, resize, crop);
* ``decode``: what a raw-input file's server does (:func:`~coopkit.runtime.preprocess.decode`:
  the full-size uint8 RGB array).

It reports the peak resident memory above the level before the call, divided by the image's
pixels (the encoded bytes, already held before, are not counted). The servers' bound is
``max_decodes x max_pixels x`` the largest figure of the kinds they accept. Memory only: the
numbers do not depend on a quiet machine. Linux only (``VmHWM``).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("rgb_png", "rgb_jpeg", "rotated_jpeg", "rgba_png", "grey_png", "palette_png", "grey16_png")
PATHS = ("prepare", "decode")


def encode(kind: str, h: int, w: int) -> bytes:
    """One photo-like image of ``kind``, encoded."""
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from images import photos

    rgb = next(photos(1, (h, w)))
    buf = io.BytesIO()
    if kind == "rgb_png":
        Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
    elif kind == "rgb_jpeg":
        Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    elif kind == "rotated_jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated 90 degrees: the decoder must transpose it
        Image.fromarray(rgb).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    elif kind == "rgba_png":
        alpha = np.full((h, w, 1), 200, np.uint8)
        Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(buf, "PNG", compress_level=1)
    elif kind == "grey_png":
        Image.fromarray(rgb[..., 0]).save(buf, "PNG", compress_level=1)
    elif kind == "palette_png":
        Image.fromarray(rgb).quantize(64).save(buf, "PNG", compress_level=1)
    elif kind == "grey16_png":
        Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(buf, "PNG", compress_level=1)
    else:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    return buf.getvalue()


def measure_once(path: str, data_file: str) -> dict[str, Any]:
    """In this process: peak resident bytes above the level before one ``path`` call."""
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from machine import memory_mb, reset_peak_memory

    from coopkit.runtime.preprocess import decode, preprocess

    data = Path(data_file).read_bytes()
    small = io.BytesIO()
    Image.new("RGB", (64, 64)).save(small, "PNG")
    preprocess(small.getvalue(), (224, 224))  # warm: every module and table loaded
    decode(small.getvalue())
    with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
    before = reset_peak_memory() * 1024  # kB
    if path == "prepare":
        out = preprocess(data, (224, 224))
    else:
        out = decode(data)
    peak = memory_mb("VmHWM") * 1024
    del out
    return {"pixels": w * h, "peak_mb": (peak - before) / 1024, "bytes_per_pixel": (peak - before) * 1024 / (w * h)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="6000x6000", help="WxH of the images")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", nargs=2, metavar=("PATH", "FILE"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_once(*args.one)))
        return
    import tempfile

    w, h = (int(x) for x in args.size.lower().split("x"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            data_file = Path(tmp) / kind
            data_file.write_bytes(encode(kind, h, w))
            for path in PATHS:
                out = subprocess.run([sys.executable, __file__, "--one", path, str(data_file)], capture_output=True,
                                     text=True, check=True)
                rows.append({"kind": kind, "path": path, **json.loads(out.stdout)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'kind':<14}{'path':<9}{'peak MB':>9}{'bytes/px':>10}")
    for r in rows:
        print(f"{r['kind']:<14}{r['path']:<9}{r['peak_mb']:>9.0f}{r['bytes_per_pixel']:>10.2f}")


if __name__ == "__main__":
    main()
