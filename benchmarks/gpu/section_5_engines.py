"""Engines: every engine and device ``engine="auto"`` can pick on this machine, measured on each
file kind, with the choice and each one's figures (images/s at batch 1 and the serving batch,
largest probability difference against onnxruntime on the CPU, or why it was skipped).

The combinations auto knows: onnxruntime on the CPU, on CUDA (TF32 off) and on TensorRT (where
the build has it), OpenVINO on the CPU (fp32; bf16 compute where asked) and on its GPUs. Each one
expected on an NVIDIA machine but not measured here gets a row saying why. Rows are printed as
they come, so a section cut by its timeout keeps what it measured (fp32 first).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from common import BATCHES, MODEL, pretrained_for, row

S = "engines"
KINDS = os.environ.get("GPU_CHECK_ENGINE_KINDS", "fp32 int8 fp16 raw").split()


def expected_targets() -> list[tuple[str, str]]:
    """``(target, why it is absent)`` for every combination auto could pick on a GPU machine; the
    reason is ``""`` where this machine offers it."""
    import onnxruntime as ort

    from coopkit.runtime.session import CUDA, TENSORRT, cuda_device_count

    count, why = cuda_device_count()
    providers = ort.get_available_providers()
    out = [("onnxruntime:cpu", "")]
    cuda_why = why if not count else ("" if CUDA in providers else f"this onnxruntime build has no CUDA provider ({providers})")
    out.append(("onnxruntime:cuda:0", cuda_why))
    out.append(("onnxruntime:tensorrt:0", cuda_why or ("" if TENSORRT in providers else "this onnxruntime build has no TensorRT provider")))
    try:
        import openvino

        gpus = [d for d in openvino.Core().available_devices if d.startswith("GPU")]
        out.append(("openvino:cpu", ""))
        out.append(("openvino:gpu", "" if gpus else "OpenVINO sees no GPU (its GPU plugin runs Intel GPUs)"))
    except ImportError:
        out += [("openvino:cpu", "openvino not installed (carry its wheel)"), ("openvino:gpu", "openvino not installed")]
    return out


def main() -> None:
    import coopkit
    from coopkit.exporters import export_onnx
    from coopkit.runtime import Classifier
    from coopkit.runtime.engine_choice import choose_engine

    expected = expected_targets()
    for target, why in expected:
        row(S, f"auto may pick {target}", "yes" if not why else "no", why)
    bb = coopkit.load_backbone(MODEL, pretrained=pretrained_for(MODEL), device="cpu")
    clf = coopkit.zero_shot(bb, [f"class {i}" for i in range(20)])
    serving = BATCHES[1]
    measured: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["COOPKIT_CACHE_DIR"] = str(Path(tmp) / "cache")  # measured afresh, nothing left behind
        for kind in KINDS:
            path = Path(tmp) / f"{kind}.onnx"
            calibration = np.random.default_rng(3).integers(0, 256, (16, *bb.image_size, 3), dtype=np.uint8)
            export_onnx(clf, path, "fp32" if kind == "raw" else kind, raw_input=kind == "raw",
                        calibration=calibration if kind == "int8" else None)
            for compute in ("fp32", "bf16"):
                choice = choose_engine(path, compute=compute, batch_size=serving, cache=False)
                for m in choice.measurements:
                    measured.add(m.target)
                    speeds = " / ".join(f"{v:.0f}" for v in m.images_per_s.values())
                    figures = f"{speeds} img/s at batch {'/'.join(map(str, choice.batch_sizes))}" if speeds else "-"
                    note = f"{m.compute}, prob diff {m.max_prob_diff:.2g}" if m.max_prob_diff is not None else ""
                    row(S, f"{MODEL} {kind}, compute {compute}: {m.target}", figures,
                        f"{note}; {'eligible' if m.eligible else m.reason}")
                row(S, f"{MODEL} {kind}, compute {compute}: auto chose", choice.chosen,
                    f"measured in {choice.probe_seconds:.1f} s")
            # the whole path: the classifier on the engine auto picks, against onnxruntime on the CPU
            images = np.random.default_rng(4).integers(0, 256, (serving, *bb.image_size, 3), dtype=np.uint8)
            auto = Classifier(path, engine="auto", batch_size=serving)
            cpu = Classifier(path, device="cpu")
            diff = np.abs(auto.run_batch(images)[1]["probs"] - cpu.run_batch(images)[1]["probs"]).max()
            row(S, f"{MODEL} {kind}: Classifier(engine='auto')", f"{auto.engine.label} on {auto.device}",
                f"provider {auto.provider}, cached choice {auto.engine.choice.from_cache}, prob diff vs CPU {diff:.2g}")
    for target, why in expected:
        if not why and target not in measured:
            row(S, f"{target} expected but not measured", "MISSING", "auto did not list it on this machine")


if __name__ == "__main__":
    main()
