"""GPU check, raw-input section: CUDA's answers for raw-input files against the CPU's.

    python benchmarks/gpu_check_rawgraph.py                    # a machine with an NVIDIA GPU
    python benchmarks/gpu_check_rawgraph.py --device cpu       # dry run: every CUDA step on the CPU
    python benchmarks/gpu_check_rawgraph.py --model raw.onnx   # also check these raw-input files

One section of the GPU check (``benchmarks/gpu_check.sh`` calls it; it needs the runtime,
``onnx`` and onnxruntime with CUDA; exporting the coopkit-tiny files also needs torch and
open_clip, else that part is skipped with the reason). On a bare GPU machine whose Python has
torch, onnx and Pillow but not onnxruntime-gpu or open_clip, carry their wheels (an
onnxruntime-gpu built for the machine's CUDA major version; open_clip_torch, ftfy, wcwidth),
install them with ``pip install --no-index --no-deps --target /tmp/site WHEELS`` and run this
script from the repository root with ``PYTHONPATH=/tmp/site:.`` (the dry run here took 3 minutes of wall time,
37 s of user CPU time, on 2 heavily loaded cores). It prints one table:

1. **the preprocessing graph alone**, for every resize mode and filter open_clip uses: the crops
   onnxruntime makes on CUDA against those it makes on the CPU and against Pillow's, on images
   of many sizes (down, up, extreme ratios), and where the ``Resize`` nodes really ran
   (onnxruntime's profile: CUDA, or the CPU when CUDA has no kernel for them);
2. **raw-input files** (coopkit-tiny exported raw, bicubic and bilinear, fp32 and fp16, plus
   any ``--model``): ``coopkit.runtime.Classifier`` on CUDA against the same file on the CPU
   (the runtime's default path, with its safeguard), and the file's graph on CUDA fed decoded
   images directly (resizing on CUDA whatever the safeguard says) against the CPU.

Verdict lines follow: for each filter whether CUDA's resize is right (then the runtime's
``CUDA_WRONG_RESIZE`` safeguard could drop it), and whether the runtime's default path agrees
with the CPU everywhere. Exit code 1 when the runtime's default path disagrees (a silently wrong
answer); CUDA's own resize being wrong is the known onnxruntime issue 25264, reported, not fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: Crops may differ from Pillow's by this much (the export's own criterion).
PIXEL_TOLERANCE = 3
#: Logits of CUDA and CPU may differ by this much, as a share of exp(logit_scale) (fp16: 10x).
LOGIT_TOLERANCE = 0.005

MODES = [((224, 224), "shortest", "bicubic"), ((224, 224), "shortest", "bilinear"), ((224, 160), "shortest", "bilinear"),
         ((224, 224), "longest", "bicubic"), ((224, 224), "longest", "bilinear"), ((224, 224), "squash", "bicubic"),
         ((224, 224), "squash", "bilinear")]
SIZES = [(480, 640), (3000, 4000), (99, 640), (640, 99), (7, 5), (100, 150), (223, 225), (1, 300), (1333, 2000)]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    from coopkit.exporters.verify import synthetic_image

    return synthetic_image(h, w, seed, photo=seed % 2 == 1)


def _providers(device: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def _resize_placement(session: Any) -> str:
    """Where onnxruntime ran the Resize nodes, read from a profile of one run (already done)."""
    profile = session.end_profiling()
    try:
        events = json.loads(Path(profile).read_text())
    finally:
        Path(profile).unlink(missing_ok=True)
    where = {e.get("args", {}).get("provider", "?").replace("ExecutionProvider", "")
             for e in events if e.get("args", {}).get("op_name") == "Resize"}
    return "+".join(sorted(where)) or "not run"


def check_subgraph(device: str) -> list[dict[str, Any]]:
    """Part 1: the preprocessing graph on ``device`` against the CPU and against Pillow."""
    import onnxruntime as ort
    from PIL import Image

    from coopkit.exporters.preprocess import preprocess_model
    from coopkit.runtime.contract import INPUT_NAME, ModelMetadata
    from coopkit.runtime.preprocess import resize_and_crop

    rows = []
    for size, mode, interpolation in MODES:
        meta = ModelMetadata(["a"], size, resize_mode=mode, interpolation=interpolation)
        blob = preprocess_model(meta).SerializeToString()
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.log_severity_level = 3
        dev = ort.InferenceSession(blob, opts, providers=_providers(device))
        cpu = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        vs_cpu = vs_pillow = 0
        started = time.perf_counter()
        for i, (h, w) in enumerate(SIZES):
            img = _image(h, w, i)
            got = dev.run(None, {INPUT_NAME: img[None]})[0][0].astype(np.int16)
            ref = cpu.run(None, {INPUT_NAME: img[None]})[0][0].astype(np.int16)
            pil = resize_and_crop(Image.fromarray(img), size, mode, interpolation).astype(np.int16)
            vs_cpu, vs_pillow = max(vs_cpu, int(np.abs(got - ref).max())), max(vs_pillow, int(np.abs(got - pil).max()))
        rows.append({"what": f"graph {mode}/{interpolation} {size[0]}x{size[1]}", "provider": dev.get_providers()[0],
                     "resize_ran_on": _resize_placement(dev), "vs_cpu": f"{vs_cpu} levels",
                     "vs_pillow": f"{vs_pillow} levels", "ok": vs_pillow <= PIXEL_TOLERANCE,
                     "interpolation": interpolation, "seconds": time.perf_counter() - started})
    return rows


def _export_tiny(folder: Path) -> list[Path]:
    """coopkit-tiny (shipped weights), zero-shot, exported raw: bicubic (its own) and bilinear, fp32 and fp16."""
    import open_clip

    import coopkit
    from coopkit.exporters import export_onnx

    bb = coopkit.load_backbone(device="cpu")
    cfg = dict(bb.preprocess_cfg, interpolation="bilinear")
    bilinear = dataclasses.replace(bb, preprocess_cfg=cfg, preprocess=open_clip.image_transform(
        bb.image_size, is_train=False, mean=cfg["mean"], std=cfg["std"], interpolation="bilinear"))
    files = []
    for name, backbone in (("bicubic", bb), ("bilinear", bilinear)):
        clf = coopkit.zero_shot(backbone, ["red circle", "blue square", "green triangle", "yellow star", "grey noise"])
        for precision in ("fp32", "fp16"):
            files.append(export_onnx(clf, folder / f"tiny-{name}-{precision}.onnx", precision, raw_input=True).path)
    return files


def check_file(path: Path, device: str) -> list[dict[str, Any]]:
    """Part 2: one raw-input file through the runtime on ``device`` against the CPU."""
    from coopkit.runtime import Classifier
    from coopkit.runtime.contract import INPUT_NAME

    images = [_image(h, w, i) for i, (h, w) in enumerate(SIZES)]
    cpu = Classifier(path, device="cpu")
    dev = Classifier(path, device=device)
    meta = cpu.metadata
    want = cpu.logits(images)
    scale = max(float(np.abs(want).max()), 1.0)  # |logit| <= exp(logit_scale): the tolerance's unit
    tol = LOGIT_TOLERANCE * (10 if meta.precision == "fp16" else 1) * scale
    rows = []
    got = dev.logits(images)
    path_used = "in graph" if dev.resizes_in_graph else "Pillow crops"
    diff = float(np.abs(got - want).max())
    rows.append({"what": f"{path.name} runtime ({path_used})", "provider": dev.provider, "resize_ran_on": "-",
                 "vs_cpu": f"{diff:.3g} (top-1 {np.mean(got.argmax(1) == want.argmax(1)):.0%})", "vs_pillow": "-",
                 "ok": diff <= tol and bool((got.argmax(1) == want.argmax(1)).all()), "runtime": True,
                 "interpolation": meta.interpolation})
    forced = np.concatenate([dev.session.run(["logits"], {INPUT_NAME: img[None]})[0] for img in images])
    diff = float(np.abs(forced - want).max())
    rows.append({"what": f"{path.name} graph fed decoded images", "provider": dev.provider, "resize_ran_on": "-",
                 "vs_cpu": f"{diff:.3g} (top-1 {np.mean(forced.argmax(1) == want.argmax(1)):.0%})",
                 "vs_pillow": "-", "ok": diff <= tol, "interpolation": meta.interpolation})
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="where the checked runs go (cpu: a dry run of the script itself)")
    parser.add_argument("--model", action="append", default=[], help="a raw-input .onnx file to check as well")
    parser.add_argument("--no-export", action="store_true", help="do not export the coopkit-tiny files")
    args = parser.parse_args(argv)
    import onnxruntime as ort

    if args.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"raw-input GPU check: this onnxruntime has no CUDA provider ({ort.get_available_providers()}); "
              "install onnxruntime-gpu, or run with --device cpu for a dry run")
        return 2
    print(f"raw-input GPU check on {args.device} (onnxruntime {ort.__version__})")
    rows = check_subgraph(args.device)
    files = [Path(m) for m in args.model]
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_export:
            try:
                files += _export_tiny(Path(tmp))
            except ImportError as e:
                print(f"skipped exporting coopkit-tiny raw-input files: {e} (needs coopkit[train]; or pass --model)")
        for f in files:
            rows += check_file(f, args.device)
    print("\n| what | provider | Resize ran on | vs CPU | vs Pillow | ok |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['what']} | {r['provider'].replace('ExecutionProvider', '')} | {r['resize_ran_on']} | "
              f"{r['vs_cpu']} | {r['vs_pillow']} | {'yes' if r['ok'] else 'NO'} |")
    for interpolation in ("bicubic", "bilinear"):
        graph_rows = [r for r in rows if r["interpolation"] == interpolation and "runtime" not in r]
        verdict = "right" if all(r["ok"] for r in graph_rows) else "WRONG (keep it in CUDA_WRONG_RESIZE)"
        print(f"verdict: {args.device} resize with antialias, {interpolation}: {verdict}")
    runtime_rows = [r for r in rows if r.get("runtime")]
    silent = [r["what"] for r in runtime_rows if not r["ok"]]
    print("verdict: the runtime's default path " + (f"DISAGREES with the CPU on {silent}" if silent else
          f"agrees with the CPU on all {len(runtime_rows)} files"))
    return 1 if silent else 0


if __name__ == "__main__":
    sys.exit(main())
