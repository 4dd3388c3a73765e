"""Engines x file kinds x batch sizes: images/s and answers against onnxruntime on the CPU, ``auto`` included.

For each model (the embedded ``coopkit-tiny`` and a ViT-B-32-sized model, random init) the
script exports a zero-shot classifier with ``coopkit.exporters.export_onnx`` in each file kind
(fp32, fp16, int8 calibrated on generated photo-like crops, raw input) and times, interleaved
round by round on the same uint8 batches (``benchmarks/machine.py``'s ``interleaved_speeds``):

* every engine and device ``auto`` can measure here (``coopkit.runtime.engines.installed_engines``:
  onnxruntime on the CPU, CUDA and TensorRT; OpenVINO on the CPU and its GPUs), in fp32 compute
  and, for OpenVINO, in bf16 compute;
* **OpenVINO's own**: the file compiled by OpenVINO directly for a static batch (its best case;
  ``bench_runtime.openvino_runner``), pinned to f32 and with its default precision (bf16 on CPUs
  with AVX-512 BF16 or AMX), the speeds the issue asks ``auto`` to reach;
* **auto**: ``Classifier(engine="auto")`` (and ``compute="bf16"``), measured afresh (a temporary
  cache unless ``--keep-cache``), with what it picked and why.

Every row gives the largest probability difference and the top-1 agreement against onnxruntime
on the CPU (the reference engine) on ``--n-images`` generated photo-like crops, and its speed as
a ratio to OpenVINO's own in the same compute precision. ``--contention`` adds ``auto``'s rows with
a second process keeping one CPU busy, and their ratio to the idle speed. A benchmark, not a test: it prints
tables and never fails on a ratio.

    python benchmarks/bench_engines.py                                     # both models, batch 1 and 32
    python benchmarks/bench_engines.py --models coopkit-tiny --kinds fp32 int8 --seconds 0.2 --json out.json
    python benchmarks/bench_engines.py --runtime-variants --kinds fp32 int8   # IO binding, block base, fused attention
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import MODELS, openvino_runner  # noqa: E402
from images import photo_batch  # noqa: E402
from machine import busy_core, describe, interleaved_speeds, load  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KINDS = ("fp32", "fp16", "int8", "raw")
CLASSNAMES = [f"class {i}" for i in range(20)]


def export_files(name: str, pretrained: Any, kinds: list[str], workdir: Path, threads: int,
                 fused_attention: bool = False) -> dict[str, Path]:
    """One export of a zero-shot classifier of ``name`` per file kind (and, with ``fused_attention``,
    the fp32 file again with ``fused_attention=True``, as ``"fp32 fused attention"``)."""
    import coopkit
    from coopkit.exporters import export_onnx

    backbone = coopkit.load_backbone(name, pretrained=pretrained, device="cpu")
    clf = coopkit.zero_shot(backbone, CLASSNAMES, threads=threads)
    files = {}
    for kind in kinds:
        path = workdir / f"{name}-{kind}.onnx"
        precision = "fp32" if kind == "raw" else kind
        calibration = photo_batch(64, backbone.image_size, seed=123) if kind == "int8" else None
        export_onnx(clf, path, precision, raw_input=kind == "raw", calibration=calibration)
        files[kind] = path
    if fused_attention and "fp32" in kinds:
        files["fp32 fused attention"] = workdir / f"{name}-fp32-fused-attention.onnx"
        export_onnx(clf, files["fp32 fused attention"], "fp32", fused_attention=True)
    return files


def _answers(run: Callable[[np.ndarray], np.ndarray], crops: np.ndarray, batch: int) -> np.ndarray:
    """``run`` over ``crops`` in chunks of ``batch`` (the last one padded for static-batch runners)."""
    parts = []
    for start in range(0, len(crops), batch):
        chunk = crops[start : start + batch]
        pad = batch - len(chunk)
        padded = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), np.uint8)]) if pad else chunk
        parts.append(np.asarray(run(padded))[: len(chunk)])
    return np.concatenate(parts)


def _compare(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    return {"max_prob_diff": float(np.abs(got - want).max()), "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean())}


def bench_file(model: str, kind: str, path: Path, args: argparse.Namespace, threads: int,
               cache: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The table rows of one file, and what ``auto`` chose for it."""
    from coopkit.runtime import Classifier
    from coopkit.runtime.engines import OPENVINO, installed_engines

    reference = Classifier(path, device="cpu", threads=threads)
    crops = photo_batch(args.n_images, reference.image_size, seed=7)  # (n, H, W, 3) uint8
    want = reference.run_batch(crops)[1]["probs"]
    sessions: dict[str, tuple[Any, str]] = {}  # label -> (session, compute)
    for engine in installed_engines():
        for target in engine.targets("auto"):
            for compute in ("fp32", "bf16") if engine.name == OPENVINO else ("fp32",):
                label = f"{target.label} {compute}"
                try:
                    session = engine.open(path, target, compute, threads, batch_sizes=(1, max(args.batch_sizes)))
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"# {model} {kind} {label}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                    continue
                sessions[label] = (session, getattr(session, "compute", "fp32"))
    choices = []
    os.environ["COOPKIT_CACHE_DIR"] = str(cache)
    for compute in ("fp32", "bf16"):
        auto = Classifier(path, device="auto", threads=threads, engine="auto", compute=compute,
                          batch_size=max(args.batch_sizes))
        sessions[f"auto {compute}"] = (auto.session, auto.engine.compute)
        choice = auto.engine.choice
        choices.append({"model": model, "file": kind, "compute": compute, "chosen": choice.chosen,
                        "probe_seconds": choice.probe_seconds, "from_cache": choice.from_cache,
                        "summary": choice.summary()})
    quality = {label: _compare(_answers(lambda x, s=s: s.run(["probs"], {"images": x})[0], crops, max(args.batch_sizes)), want)
               for label, (s, _) in sessions.items()}
    rows = []
    for bs in args.batch_sizes:
        batch = crops[:bs]
        fns = {label: (lambda s: lambda: s.run(["logits"], {"images": batch}))(s) for label, (s, _) in sessions.items()}
        own: dict[str, str] = {}
        if args.openvino and kind != "raw":  # a raw-input file on OpenVINO's own resize gives other answers
            for hint in ("f32", None):
                try:
                    run, used = openvino_runner(path, bs, threads, hint)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"# OpenVINO's own {kind}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
                    continue
                compute = "bf16" if "bf16" in used.lower() or "bfloat16" in used.lower() else "fp32"
                label = f"OpenVINO's own {'f32' if hint else 'default'} ({compute})"
                own[compute] = label
                fns[label] = (lambda run: lambda: run(batch))(run)
                if label not in quality:
                    quality[label] = _compare(_answers(lambda x, run=run: run(x)["probs"], crops, bs), want)
                sessions.setdefault(label, (None, compute))
        speeds = interleaved_speeds(fns, bs, args.seconds)
        for label, ips in speeds.items():
            compute = sessions[label][1]
            baseline = speeds.get(own.get(compute, ""), float("nan"))
            rows.append({"model": model, "file": kind, "batch": bs, "engine": label, "compute": compute,
                         "img_s": ips, "vs_openvino_own": ips / baseline, **quality[label]})
        print(f"# {model} {kind} batch {bs}: " + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items())
              + f" img/s; {load()}", file=sys.stderr)
        if args.contention:  # auto's choice, made idle, with one CPU kept busy by another process
            chosen = {label: fns[label] for label in fns if label.startswith("auto")}
            with busy_core():
                busy = interleaved_speeds(chosen, bs, args.seconds)
            for label, ips in busy.items():
                rows.append({"model": model, "file": kind, "batch": bs, "engine": f"{label}, one CPU busy",
                             "compute": sessions[label][1], "img_s": ips, "vs_openvino_own": float("nan"),
                             "busy_over_idle": ips / speeds[label], **quality[label]})
    return rows, choices


def bench_variants(model: str, kind: str, path: Path, args: argparse.Namespace, threads: int,
                   fused: Optional[Path] = None) -> list[dict[str, Any]]:
    """onnxruntime on the CPU closer to its limit (``--runtime-variants``): ``session.run`` against IO
    binding (``coopkit.runtime.session.run_bound``: outputs written into numpy arrays) and
    onnxruntime's ``session.dynamic_block_base`` (4, its tuning guide's value), alone and together,
    and, for the fp32 file, the same classifier exported with ``fused_attention=True`` (``fused``:
    each ViT block's attention one com.microsoft ``Attention`` node) on onnxruntime, idle and with
    one CPU busy; each row's ratio to ``session.run`` and its largest difference from it (0
    expected for the switches: they move memory and work, not arithmetic). Both files on OpenVINO
    are timed as a group of their own (its threads spin on after a run and would slow onnxruntime's
    rows), their ratio to OpenVINO on the plain file. A switch is worth turning on
    (``CPU_IO_BINDING``, ``DYNAMIC_BLOCK_BASE`` in ``coopkit/runtime/session.py``; the exporter's
    ``fused_attention``) only where its ratio is above 1 in both conditions."""
    import onnxruntime as ort

    from coopkit.runtime.session import CPU, run_bound, session_options

    names = ["probs", "logits", "image_embeds"]
    sessions = {block: ort.InferenceSession(os.fspath(path), session_options(threads, dynamic_block_base=block),
                                            providers=[CPU]) for block in (0, 4)}
    if fused is not None:
        sessions["fused"] = ort.InferenceSession(os.fspath(fused), session_options(threads), providers=[CPU])
    widths = {o.name: o.shape[-1] for o in sessions[0].get_outputs()}
    if not all(isinstance(w, int) for w in widths.values()) or any(o.type != "tensor(float)" for o in sessions[0].get_outputs()):
        print(f"# {model} {kind}: outputs of symbolic width or not float32: no IO binding rows", file=sys.stderr)
        return []
    rows = []
    for bs in args.batch_sizes:
        batch = np.ascontiguousarray(photo_batch(bs, _image_size(sessions[0]), seed=11))  # (bs, H, W, 3) uint8
        outputs = [(n, (bs, widths[n])) for n in names]
        fns = {
            "session.run": lambda: sessions[0].run(names, {"images": batch}),
            "IO binding": lambda: run_bound(sessions[0], {"images": batch}, outputs),
            "dynamic block base 4": lambda: sessions[4].run(names, {"images": batch}),
            "IO binding + dynamic block base 4": lambda: run_bound(sessions[4], {"images": batch}, outputs),
        }
        groups = [fns]  # each group interleaved on its own: OpenVINO's spinning threads would slow onnxruntime's rows
        if fused is not None:
            fns["fused attention file (fused_attention=True)"] = lambda: sessions["fused"].run(names, {"images": batch})
            if args.openvino:
                plain_ov, fused_ov = (openvino_runner(p, bs, threads)[0] for p in (path, fused))
                groups.append({OV_PLAIN: lambda: _ov_outputs(plain_ov(batch), names),
                               "OpenVINO f32, fused attention file": lambda: _ov_outputs(fused_ov(batch), names)})
        want = fns["session.run"]()
        for group in groups:
            diffs = {label: max(float(np.abs(np.asarray(a) - b).max()) for a, b in zip(fn(), want)) for label, fn in group.items()}
            base = next(iter(group))  # the ratios are to the group's first row
            for condition in ("idle", "one CPU busy"):
                with busy_core() if condition != "idle" else _nothing():
                    speeds = interleaved_speeds(group, bs, args.seconds)
                for label, ips in speeds.items():
                    rows.append({"model": model, "file": kind, "batch": bs, "variant": label, "condition": condition,
                                 "img_s": ips, "vs_session_run": ips / speeds[base], "max_diff": diffs[label]})
                print(f"# {model} {kind} batch {bs} {condition}: " + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items())
                      + f" img/s; {load()}", file=sys.stderr)
    return rows


OV_PLAIN = "OpenVINO f32, plain file (the base of the rows below it)"


def _ov_outputs(result: Any, names: list[str]) -> list[np.ndarray]:
    """An OpenVINO infer request's results in the order of ``names`` (its result reads by tensor name)."""
    return [result[n] for n in names]


def _image_size(session: Any) -> tuple[int, int]:
    from coopkit.runtime.contract import ModelMetadata

    return ModelMetadata.from_props(session.get_modelmeta().custom_metadata_map).image_size


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def print_variants(rows: list[dict[str, Any]]) -> None:
    print("\n| model | file | batch | variant | condition | images/s | x session.run (OpenVINO: x its plain file) | max diff |")
    print("|---|---|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['file']} | {r['batch']} | {r['variant']} | {r['condition']} | {r['img_s']:.1f} | "
              f"{r['vs_session_run']:.3f} | {r['max_diff']:.2g} |")


def print_tables(rows: list[dict[str, Any]], choices: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    print(f"\nMachine: {machine['cpu']} ({machine['isa']}), {machine['threads']} threads; "
          f"onnxruntime {machine.get('onnxruntime')}, OpenVINO {machine.get('openvino', 'not installed')}\n")
    print("| model | file | batch | engine | compute | images/s | x OpenVINO's own | busy / idle | max prob diff | top-1 agreement |")
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|")
    def ratio(value: Any) -> str:  # "-" where there is nothing to compare with (no OpenVINO's own row, not a busy row)
        return "-" if value is None or value != value else f"{value:.2f}"

    for r in rows:
        print(f"| {r['model']} | {r['file']} | {r['batch']} | {r['engine']} | {r['compute']} | {r['img_s']:.1f} | "
              f"{ratio(r['vs_openvino_own'])} | {ratio(r.get('busy_over_idle'))} | {r['max_prob_diff']:.2g} | "
              f"{r['top1_agreement']:.1%} |")
    print()
    for c in choices:
        print(f"- auto, {c['model']} {c['file']}, compute {c['compute']}: {c['summary']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="open_clip model names (default: %(default)s)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--n-images", type=int, default=64, help="images for the answers' difference")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: the runtime's default)")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per measurement")
    parser.add_argument("--no-openvino", dest="openvino", action="store_false", help="no OpenVINO's own rows")
    parser.add_argument("--contention", action="store_true",
                        help="add auto's rows with a second process keeping one CPU busy (and their ratio to idle)")
    parser.add_argument("--keep-cache", action="store_true", help="let auto use the user cache (default: measure afresh)")
    parser.add_argument("--runtime-variants", action="store_true",
                        help="only onnxruntime CPU variants (IO binding, dynamic block base) against session.run, idle and "
                             "with one CPU busy (bench_variants)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import onnxruntime
    import torch

    from coopkit.runtime.engine_choice import cache_root
    from coopkit.runtime.session import default_threads

    threads = args.threads or default_threads(0.5)
    torch.set_num_threads(threads)
    machine = describe(threads)
    machine["onnxruntime"] = onnxruntime.__version__
    try:
        import openvino

        machine["openvino"] = openvino.get_version()
    except ImportError:
        args.openvino = False
        print("# OpenVINO not installed (pip install 'coopkit[openvino]'): onnxruntime rows only", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    choices: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = cache_root() if args.keep_cache else Path(tmp) / "cache"
        for name in args.models:
            files = export_files(name, MODELS.get(name), args.kinds, Path(tmp), threads, args.runtime_variants)
            fused = files.pop("fp32 fused attention", None)
            for kind, path in files.items():
                if args.runtime_variants:
                    rows += bench_variants(name, kind, path, args, threads, fused if kind == "fp32" else None)
                    continue
                r, c = bench_file(name, kind, path, args, threads, cache)
                rows += r
                choices += c
    machine["load_after"] = load()
    if args.runtime_variants:
        print(f"\nMachine: {machine['cpu']} ({machine['isa']}), {machine['threads']} threads")
        print_variants(rows)
    else:
        print_tables(rows, choices, machine)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows, "auto": choices}, indent=1, default=str))


if __name__ == "__main__":
    main()
