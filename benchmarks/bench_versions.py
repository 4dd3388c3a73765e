"""This checkout against another one (e.g. the last release) on the paths every user takes: opening
an exported ViT-B-32 with all its checks, and predicting a collection with ``coopkit predict``.

    git worktree add /tmp/coopkit-old <rev>
    python benchmarks/bench_versions.py --other /tmp/coopkit-old

Each version exports its own file (a random-init ViT-B-32, zero-shot over 1000 classes, and a
coopkit-tiny file for the collection) with its own code, then the two versions are timed in
alternating subprocesses (``PYTHONPATH`` set to each checkout), so that drifts of the machine's
load fall on both alike. Reports medians and this checkout's time over the other's (a ratio
above 1: slower now). The machine line names the CPU, its instruction sets, threads and load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from images import photos  # noqa: E402
from machine import describe, load  # noqa: E402

HERE = Path(__file__).resolve().parents[1]

EXPORT = """
import sys, torch, coopkit
from coopkit.exporters import export_onnx
torch.manual_seed(0); torch.set_num_threads({threads})
bb = coopkit.load_backbone({model!r}, {pretrained!r}, device="cpu")
clf = coopkit.zero_shot(bb, [f"class {{i}}" for i in range({classes})])
r = export_onnx(clf, sys.argv[1], "fp32")
"""

OPEN = """
import sys, time, json
from coopkit.runtime import Classifier
times = []
for _ in range({repeats}):
    t = time.perf_counter(); c = Classifier(sys.argv[1], device="cpu", threads={threads}); times.append(time.perf_counter() - t); c.close()
print(json.dumps(times))
"""


def _run(root: Path, code: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, cwd=root)
    if res.returncode != 0:
        raise RuntimeError(f"{root}: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
    return res.stdout


def _predict(root: Path, model: Path, photos_dir: Path, out: Path, threads: int) -> float:
    """Seconds of one ``coopkit predict`` over the folder (process start and import included)."""
    import time

    env = dict(os.environ, PYTHONPATH=str(root), HF_HUB_OFFLINE="1")
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "coopkit", "predict", str(model), str(photos_dir), "--out", str(out),
                          "--threads", str(threads), "--no-progress"], env=env, capture_output=True, text=True, cwd=root)
    took = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{root}: coopkit predict failed: {res.stderr.strip()[-300:]}")
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, required=True, help="the other checkout (a git worktree)")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two versions")
    parser.add_argument("--repeats", type=int, default=3, help="opens per subprocess")
    parser.add_argument("--images", type=int, default=256, help="images of the collection")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    versions = {"this": HERE, "other": args.other.resolve()}
    print(json.dumps(describe(args.threads)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files: dict[str, dict[str, Path]] = {}
        for name, path in versions.items():
            vit, tiny = root / f"{name}-vit.onnx", root / f"{name}-tiny.onnx"
            _run(path, EXPORT.format(threads=args.threads, model="ViT-B-32", pretrained=None, classes=1000), str(vit))
            _run(path, EXPORT.format(threads=args.threads, model="coopkit-tiny", pretrained="default", classes=10),
                 str(tiny))
            files[name] = {"vit": vit, "tiny": tiny}
        from PIL import Image

        folder = root / "photos"
        folder.mkdir()
        for i, img in enumerate(photos(args.images, (480, 640))):
            Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)
        opens: dict[str, list[float]] = {n: [] for n in versions}
        runs: dict[str, list[float]] = {n: [] for n in versions}
        for r in range(args.rounds):
            order = list(versions) if r % 2 == 0 else list(reversed(versions))
            for name in order:
                opens[name] += json.loads(_run(versions[name], OPEN.format(repeats=args.repeats, threads=args.threads),
                                               str(files[name]["vit"])))
                runs[name].append(_predict(versions[name], files[name]["tiny"], folder, root / f"{name}.jsonl",
                                           args.threads))
    rows = {}
    for what, table in (("open ViT-B-32 (s)", opens), (f"coopkit predict {args.images} images (s)", runs)):
        this, other = statistics.median(table["this"]), statistics.median(table["other"])
        rows[what] = {"this": round(this, 4), "other": round(other, 4), "this/other": round(this / other, 3)}
    print(json.dumps({"rows": rows, "load_after": load(), "other": str(args.other)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
