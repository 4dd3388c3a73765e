"""Throughput of coopkit.runtime (onnxruntime) against PyTorch eager, OpenVINO and the hardware limit.

For each model (the embedded ``coopkit-tiny`` and a ViT-B-32-sized model, random init), the
script builds a zero-shot classifier with coopkit, exports it with
``coopkit.exporters.export_onnx`` as fp32 and int8 (static, calibrated on generated photo-like
crops; a zero-shot run has no training images) and, for comparison, as onnxruntime's dynamic
int8 of the same fp32 file (what coopkit shipped before). Then it times, interleaved round by
round, on the same uint8 batches (batch 1 and 32 by default):

* **PyTorch eager**: ``model.encode_image`` on the normalised float batch, L2, ``@ W.T``;
* **runtime**: ``Classifier.session`` with the runtime's default options (threads: one per
  idle CPU; no spinning), the way ``Classifier.logits`` runs it;
* **OpenVINO** (``pip install 'coopkit[bench]'``): the same .onnx file read by OpenVINO's CPU
  plugin, reshaped to the static batch size (its best case), fp32 and int8.

Each throughput is also given as GFLOP/s (FLOPs of the PyTorch model counted by
``torch.utils.flop_counter``) and as a fraction of the measured peak of one large matrix product
on the same machine and threads (fp32 ``MatMul`` for fp32 rows, uint8 x int8 ``MatMulInteger``
for int8 rows; onnxruntime, 2048^3). ``--contention`` adds rows with a second process spinning
on one CPU, for the runtime's defaults and for the settings before this release (all CPUs,
spinning threads). Each file's batch invariance is reported: the largest change of an image's
logits between running alone and beside other (extreme) images.

A benchmark, not a test: it prints tables and never fails on a ratio.

    python benchmarks/bench_runtime.py                                  # CPU, both models
    python benchmarks/bench_runtime.py --models ViT-B-32 --contention --json out.json
    python benchmarks/bench_runtime.py --models coopkit-tiny --batch-sizes 1 32 --seconds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from images import photo_batch  # noqa: E402
from machine import busy_core, describe, interleaved_speeds, load  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {"coopkit-tiny": "default", "ViT-B-32": None}  # name -> pretrained (None: random init)
CLASSNAMES = [f"class {i}" for i in range(20)]


def matmul_peaks(threads: int, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s (int8: GOP/s) of one n^3 matrix product through onnxruntime: fp32 MatMul and
    uint8 x int8 MatMulInteger (the kernels the fp32 and int8 files spend their time in)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from coopkit.runtime.session import session_options

    rng = np.random.default_rng(0)
    peaks = {}
    for name, a_type, b, op, out_type in (
        ("fp32", TensorProto.FLOAT, rng.standard_normal((n, n)).astype(np.float32), "MatMul", TensorProto.FLOAT),
        ("int8", TensorProto.UINT8, rng.integers(-64, 65, (n, n)).astype(np.int8), "MatMulInteger", TensorProto.INT32),
    ):
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["y"])], "peak",
            [helper.make_tensor_value_info("a", a_type, [n, n])], [helper.make_tensor_value_info("y", out_type, [n, n])],
            [numpy_helper.from_array(b, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        sess = ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"])
        a = rng.standard_normal((n, n)).astype(np.float32) if name == "fp32" else rng.integers(0, 256, (n, n)).astype(np.uint8)
        sess.run(None, {"a": a})
        best = min(_timed(lambda: sess.run(None, {"a": a})) for _ in range(repeats))
        peaks[name] = 2 * n**3 / best / 1e9
    return peaks


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def flops_per_image(model: Any, size: tuple[int, int]) -> float:
    """FLOPs of ``encode_image`` on one image, counted by torch's FlopCounterMode (2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.encode_image(torch.zeros(1, 3, *size))
    return float(counter.get_total_flops())


def openvino_runner(path: Path, batch: int, threads: int, precision: Optional[str] = "f32"
                    ) -> tuple[Callable[[np.ndarray], Any], str]:
    """The .onnx file compiled by OpenVINO's CPU plugin for a static batch of ``batch``, and the
    precision its float ops run in. ``precision="f32"`` pins fp32 compute (a like-for-like
    comparison); ``None`` keeps the plugin's default, which is bf16 on CPUs with AVX-512 BF16 or AMX."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(os.fspath(path))
    shape = list(model.input(0).get_partial_shape())
    model.reshape({model.input(0): [batch, *[d.get_length() for d in shape[1:]]]})
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    return (lambda x: request.infer({0: x})), str(compiled.get_property("INFERENCE_PRECISION_HINT"))


def _fresh_interpreter_times(model_path: Path, image_path: Path) -> dict[str, float]:
    code = f"""
import time
t0 = time.perf_counter()
import coopkit.runtime
t1 = time.perf_counter()
clf = coopkit.runtime.Classifier({str(model_path)!r}, device="cpu")
clf.predict([{str(image_path)!r}])
t2 = time.perf_counter()
import sys, json
print(json.dumps({{"import_s": t1 - t0, "first_prediction_s": t2 - t0,
                  "torch_imported": "torch" in sys.modules}}))
"""
    runs = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: min(r[k] for r in runs) if k != "torch_imported" else any(r[k] for r in runs) for k in runs[0]}


def bench_model(name: str, pretrained: Any, args: argparse.Namespace, workdir: Path, threads: int,
                peaks: dict[str, float]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Path]:
    import onnx
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import coopkit
    from coopkit.exporters import export_onnx
    from coopkit.exporters.int8 import int8_targets
    from coopkit.exporters.verify import batch_invariance
    from coopkit.runtime import Classifier

    backbone = coopkit.load_backbone(name, pretrained=pretrained, device="cpu")
    clf = coopkit.zero_shot(backbone, CLASSNAMES, threads=threads)
    weights = clf.class_weights()  # (n_classes, embed_dim)
    size = backbone.image_size
    crops = photo_batch(args.n_images, size)  # (n, H, W, 3) uint8
    mean = torch.tensor(backbone.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(backbone.preprocess_cfg["std"]).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 - mean) / std
    model = backbone.model
    flops = flops_per_image(model, size)

    def torch_logits(x: "torch.Tensor") -> "torch.Tensor":
        with torch.inference_mode():
            return torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1) @ weights.T

    reference = torch.cat([torch_logits(pixels[i : i + 32]) for i in range(0, len(pixels), 32)]).numpy()
    files = {"fp32": workdir / f"{name}-fp32.onnx", "int8": workdir / f"{name}-int8.onnx"}
    export_onnx(clf, files["fp32"], "fp32")
    export_onnx(clf, files["int8"], "int8", calibration=photo_batch(64, size, seed=123))
    if args.int8_dynamic:
        files["int8 dynamic (before)"] = workdir / f"{name}-int8dyn.onnx"
        quantize_dynamic(files["fp32"], files["int8 dynamic (before)"], per_channel=True, weight_type=QuantType.QInt8,
                         nodes_to_quantize=int8_targets(onnx.load(os.fspath(files["fp32"]), load_external_data=False)),
                         extra_options={"MatMulConstBOnly": True})
    # The dynamic int8 file is onnxruntime's rewrite of the fp32 export: its tensors are not the ones
    # whose sha256 the copied metadata records, so it is opened without the every-tensor check.
    runtimes = {p: Classifier(f, device="cpu", threads=threads, check_tensors=not p.startswith("int8 dynamic"))
                for p, f in files.items()}
    quality = {}
    for p, rt in runtimes.items():
        got = rt.logits(list(crops))
        quality[p] = {"top1": float((got.argmax(1) == reference.argmax(1)).mean()),
                      "max_diff": float(np.abs(got - reference).max()),
                      "batch_invariance": batch_invariance(rt.session, crops[:32], got[:32])}
    rows = []
    for bs in args.batch_sizes:
        batch_np, batch_t = crops[:bs], pixels[:bs]
        fns: dict[tuple[str, str], Callable[[], Any]] = {("PyTorch eager", "fp32"): lambda: torch_logits(batch_t)}
        for p, rt in runtimes.items():
            fns[("runtime", p)] = (lambda r: lambda: r.session.run(["logits"], {"images": batch_np}))(rt)
        if args.openvino:
            for p, hint in (("fp32", "f32"), ("fp32", None), ("int8", "f32")):
                try:
                    run, used = openvino_runner(files[p], bs, threads, hint)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(f"# OpenVINO {p}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", file=sys.stderr)
                    continue
                engine = "OpenVINO" if hint else f"OpenVINO, its default ({used} compute)"
                if hint or used != "f32":
                    fns[(engine, p)] = (lambda run: lambda: run(batch_np))(run)
        named = {f"{k[0]}|{k[1]}": fn for k, fn in fns.items()}
        speeds = interleaved_speeds(named, bs, args.seconds)
        for key, ips in speeds.items():
            engine, precision = key.split("|")
            peak = peaks["int8" if precision.startswith("int8") else "fp32"]
            q = quality.get(precision, {"top1": 1.0, "max_diff": 0.0, "batch_invariance": float("nan")})
            rows.append({"model": name, "batch": bs, "engine": engine, "precision": precision, "img_s": ips,
                         "ms_per_batch": 1000 * bs / ips, "gflop_s": ips * flops / 1e9,
                         "fraction_of_peak": ips * flops / 1e9 / peak,
                         "top1_vs_torch_fp32": q["top1"] if engine != "PyTorch eager" else 1.0,
                         "batch_invariance": q["batch_invariance"] if engine == "runtime" else float("nan")})
        print(f"# {name} batch {bs}: " + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items()) + f" img/s; {load()}",
              file=sys.stderr)
    contention = []
    if args.contention:
        contention = bench_contention(name, files, crops, threads, args)
    return rows, contention, files["fp32"]


def bench_contention(name: str, files: dict[str, Path], crops: np.ndarray, threads: int,
                     args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runtime idle and with a second process spinning on one CPU: its defaults (threads
    measured when the file is opened, no spinning) against the settings before (every CPU, spinning)."""
    from coopkit.runtime import Classifier
    from coopkit.runtime.session import usable_cpus

    out = []
    for precision in ("fp32", "int8"):
        for bs in args.batch_sizes:
            batch = crops[:bs]
            results: dict[str, dict[str, float]] = {}
            for state in ("idle", "one CPU busy"):  # "idle": no process of ours besides this one
                with (busy_core() if state != "idle" else _nothing()):
                    sessions = {
                        "before: all CPUs, spinning": Classifier(files[precision], device="cpu", threads=len(usable_cpus()),
                                                                 spinning=True).session,
                        "now: default (idle CPUs, no spinning)": Classifier(files[precision], device="cpu").session,
                    }
                    threads_now = sessions["now: default (idle CPUs, no spinning)"].get_session_options().intra_op_num_threads
                    speeds = interleaved_speeds({k: (lambda s: lambda: s.run(["logits"], {"images": batch}))(s) for k, s in sessions.items()},
                                   bs, args.seconds)
                for k, v in speeds.items():
                    results.setdefault(k, {})[state] = v
                results.setdefault("threads now", {})[state] = threads_now
            for k, v in results.items():
                if k == "threads now":
                    continue
                out.append({"model": name, "precision": precision, "batch": bs, "setting": k, "idle_img_s": v["idle"],
                            "busy_img_s": v["one CPU busy"], "busy_over_idle": v["one CPU busy"] / v["idle"],
                            "threads_idle_busy": (results["threads now"]["idle"], results["threads now"]["one CPU busy"])
                            if k.startswith("now") else (len(usable_cpus()),) * 2})
            print(f"# contention {name} {precision} b{bs}: {results}", file=sys.stderr)
    return out


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="open_clip model names (default: %(default)s)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--n-images", type=int, default=128, help="images for the top-1 agreement")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: the runtime's default)")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per measurement")
    parser.add_argument("--contention", action="store_true", help="add the rows with one CPU kept busy")
    parser.add_argument("--no-openvino", dest="openvino", action="store_false")
    parser.add_argument("--no-int8-dynamic", dest="int8_dynamic", action="store_false")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    openvino = None
    if args.openvino:
        try:
            import openvino
        except ImportError:
            print("# OpenVINO not installed (pip install 'coopkit[bench]'): no OpenVINO column", file=sys.stderr)
            args.openvino = False

    import onnxruntime
    import torch

    from coopkit.runtime.session import default_threads

    threads = args.threads or default_threads(0.5)
    torch.set_num_threads(threads)
    machine = describe(threads)
    machine.update(torch=torch.__version__, onnxruntime=onnxruntime.__version__)
    if openvino is not None and args.openvino:
        machine["openvino"] = openvino.__version__
    peaks = matmul_peaks(threads)
    machine["matmul_peak_gflop_s"] = peaks
    rows: list[dict[str, Any]] = []
    contention: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32_file = None
        for name in args.models:
            r, c, fp32_file = bench_model(name, MODELS.get(name), args, Path(tmp), threads, peaks)
            rows += r
            contention += c
        startup = {}
        if fp32_file is not None:
            from PIL import Image

            jpeg = Path(tmp) / "one.jpg"
            Image.fromarray(photo_batch(1, (256, 256))[0]).save(jpeg, quality=90)
            startup = _fresh_interpreter_times(fp32_file, jpeg)
    machine["load_after"] = load()
    again = matmul_peaks(threads)  # the best of two measurements, before and after the rest
    peaks.update({k: max(v, again[k]) for k, v in peaks.items()})
    for r in rows:
        r["fraction_of_peak"] = r["gflop_s"] / peaks["int8" if r["precision"].startswith("int8") else "fp32"]

    print(f"\nmachine: {machine}\n")
    print("| model | batch | engine | precision | img/s | ms per batch | GFLOP/s | of matmul peak | top-1 = PyTorch fp32 | batch invariance |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        inv = "" if np.isnan(r["batch_invariance"]) else f"{r['batch_invariance']:.2g}"
        print(f"| {r['model']} | {r['batch']} | {r['engine']} | {r['precision']} | {r['img_s']:.1f} | {r['ms_per_batch']:.1f} "
              f"| {r['gflop_s']:.0f} | {100 * r['fraction_of_peak']:.0f}% | {100 * r['top1_vs_torch_fp32']:.1f}% | {inv} |")
    if contention:
        print("\n| model | precision | batch | runtime setting | threads idle / busy | idle img/s | one CPU busy img/s | busy / idle |")
        print("|---|---|---|---|---|---|---|---|")
        for r in contention:
            t = r["threads_idle_busy"]
            print(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['setting']} | {t[0]} / {t[1]} | {r['idle_img_s']:.1f} "
                  f"| {r['busy_img_s']:.1f} | {100 * r['busy_over_idle']:.0f}% |")
    if startup:
        print(f"\nimport coopkit.runtime: {1000 * startup['import_s']:.0f} ms; first prediction (import, load "
              f"{args.models[-1]} fp32, one JPEG): {1000 * startup['first_prediction_s']:.0f} ms; "
              f"torch imported: {startup['torch_imported']}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": rows, "contention": contention,
                                         "startup": startup}, indent=2, default=str))


if __name__ == "__main__":
    main()
