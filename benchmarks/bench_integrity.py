"""What the runtime's file checks cost when it opens an exported file, against opening it unchecked.

    python benchmarks/bench_integrity.py                      # exports a ViT-B-32 (random init) first
    python benchmarks/bench_integrity.py --onnx model.onnx    # an existing export

``coopkit.runtime.Classifier`` checks, when it opens a file: the graph's output widths against
the metadata (free), the class weight matrix against ``weights_sha256`` (it finds the matrix in
the file with a protobuf reader and hashes it) and, unless ``check_tensors=False``, every stored
tensor against ``tensors_sha256`` (reads and hashes the whole file). This script opens the same
file alternately with and without the checks (``check_tensors=False`` plus the class-weight
check timed on its own) and reports the medians, with the onnxruntime session alone as the
baseline, the file in the page cache (it is read once before timing). CPU threads: 2 unless
``--threads``. It prints ``uptime`` before and after: these numbers move with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _export_vit(folder: Path, n_classes: int) -> Path:
    import torch

    import coopkit
    from coopkit.exporters import export_onnx

    torch.set_num_threads(2)
    bb = coopkit.load_backbone("ViT-B-32", None, device="cpu")
    clf = coopkit.zero_shot(bb, [f"class {i}" for i in range(n_classes)])
    t = time.perf_counter()
    path = export_onnx(clf, folder / "vit-b-32.onnx", "fp32", n_verify=4).path
    print(f"exported ViT-B-32 fp32 ({n_classes} classes) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return path


def _cpu() -> str:
    """The CPU model and the vector / hash instruction sets that decide these timings."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    sets = [name for flag, name in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"),
                                    ("sha_ni", "SHA-NI")) if flag in flags]
    return f"{model} ({', '.join(sets)})"


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, default=None, help="an exported file (default: export a ViT-B-32)")
    parser.add_argument("--classes", type=int, default=1000, help="classes of the ViT-B-32 export")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from coopkit.runtime import Classifier
    from coopkit.runtime.integrity import class_weights_sha256, tensors_sha256

    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx or _export_vit(Path(tmp), args.classes)
        print(f"before: {_uptime()}")
        path.read_bytes()  # into the page cache
        plain, checked, weights, tensors = [], [], [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            clf = Classifier(path, device="cpu", threads=args.threads, check_tensors=False)
            plain.append(time.perf_counter() - t)
            t = time.perf_counter()
            Classifier(path, device="cpu", threads=args.threads)
            checked.append(time.perf_counter() - t)
            m = clf.metadata
            t = time.perf_counter()
            class_weights_sha256(path, len(m.classnames), m.embed_dim)
            weights.append(time.perf_counter() - t)
            t = time.perf_counter()
            tensors_sha256(path)
            tensors.append(time.perf_counter() - t)
        print(f"after: {_uptime()}")
        size = path.stat().st_size
        med = statistics.median
        base = med(plain) - med(weights)  # the open without any check
        print(f"\nfile: {path.name}, {size / 1e6:.1f} MB, {len(clf.classnames)} classes; cpu: "
              f"{_cpu()}, {os.cpu_count()} cores, {args.threads} onnxruntime "
              f"threads; medians of {args.rounds} interleaved rounds\n")
        print("| step | time | share of opening without checks |")
        print("|---|---|---|")
        print(f"| open without checks (onnxruntime session, metadata, widths) | {1000 * base:.0f} ms | 100% |")
        print(f"| class-weight check (weights_sha256) | {1000 * med(weights):.1f} ms | {100 * med(weights) / base:.1f}% |")
        print(f"| every-tensor check (tensors_sha256) | {1000 * med(tensors):.0f} ms | {100 * med(tensors) / base:.0f}% |")
        print(f"| open with all checks (the default) | {1000 * med(checked):.0f} ms | {100 * med(checked) / base:.0f}% |")
        print(f"\nhashing rate of the every-tensor check: {size / med(tensors) / 1e9:.2f} GB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
