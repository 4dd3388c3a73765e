"""coopkit.runtime on CUDA (fp32, fp16; numpy in/out and IO binding on device memory) against
PyTorch CUDA eager fp16, as a fraction of the GPU's fp16 matmul peak; TensorRT when the build has it;
the fp32 file exported with ``fused_attention=True`` (ViT attention as onnxruntime's Attention node)
against the plain one."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from common import BATCHES, MODEL, best_seconds, cuda_ok, pretrained_for, row

S = "runtime"


def main() -> None:
    import onnxruntime as ort
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import coopkit
    from coopkit.exporters import export_onnx
    from coopkit.runtime import Classifier
    from coopkit.runtime.session import CUDA, TENSORRT

    gpu = cuda_ok()
    bb = coopkit.load_backbone(MODEL, pretrained=pretrained_for(MODEL), device="cpu")
    clf = coopkit.zero_shot(bb, [f"class {i}" for i in range(20)])
    size = bb.image_size
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        bb.model.encode_image(torch.zeros(1, 3, *size))
    flops = counter.get_total_flops()
    row(S, "model", f"{MODEL}, {flops / 1e9:.2f} GFLOP per image", "random init" if pretrained_for(MODEL) is None else "")
    peak = None
    if gpu:
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
        peak = 2 * 4096**3 / best_seconds(lambda: a @ a, torch.cuda.synchronize) / 1e12
    images = np.random.default_rng(0).integers(0, 256, (max(BATCHES), *size, 3), dtype=np.uint8)
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def rate(ips: float) -> str:
        return f"{ips:.0f} img/s" + (f", {100 * ips * flops / 1e12 / peak:.1f}% of fp16 peak" if peak else "")

    model = bb.model.to("cuda" if gpu else "cpu").eval()
    mean = torch.tensor(bb.preprocess_cfg["mean"], device=model.logit_scale.device).view(1, 3, 1, 1)
    std = torch.tensor(bb.preprocess_cfg["std"], device=model.logit_scale.device).view(1, 3, 1, 1)
    weights = clf.class_weights().to(model.logit_scale.device)
    for b in BATCHES:
        x = torch.from_numpy(images[:b]).to(model.logit_scale.device)

        def eager() -> None:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=gpu):
                f = model.encode_image(((x.permute(0, 3, 1, 2).float() / 255) - mean) / std)
                torch.nn.functional.normalize(f.float(), dim=-1) @ weights.T

        row(S, f"PyTorch eager {'fp16 autocast, CUDA' if gpu else 'fp32, CPU'}, batch {b}", rate(b / best_seconds(eager, sync)))

    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "fp16"):
            path = Path(tmp) / f"m-{precision}.onnx"
            export_onnx(clf, path, precision)
            rt = Classifier(path, device="auto")
            row(S, f"{precision} provider (device=auto)", rt.provider.replace("ExecutionProvider", ""))
            dev = "cuda" if rt.provider == CUDA else "cpu"
            for b in BATCHES:
                batch = np.ascontiguousarray(images[:b])
                s_numpy = best_seconds(lambda: rt.session.run(["logits"], {"images": batch}), sync)
                on_device = ort.OrtValue.ortvalue_from_numpy(batch, dev, 0)
                binding = rt.session.io_binding()
                binding.bind_ortvalue_input("images", on_device)
                binding.bind_output("logits", dev)
                s_bound = best_seconds(lambda: rt.session.run_with_iobinding(binding), binding.synchronize_outputs)
                got = binding.copy_outputs_to_cpu()[0]
                ref = rt.session.run(["logits"], {"images": batch})[0]
                row(S, f"runtime {precision} {dev}, batch {b}: numpy / IO binding ({dev} memory)",
                    f"{rate(b / s_numpy)} / {rate(b / s_bound)}", f"largest difference bound vs numpy {np.abs(got - ref).max():.2g}")
            if precision == "fp32":
                fused_path = Path(tmp) / "m-fp32-fused-attention.onnx"
                export_onnx(clf, fused_path, "fp32", fused_attention=True)
                fused = Classifier(fused_path, device="auto")
                for b in BATCHES:
                    batch = np.ascontiguousarray(images[:b])
                    s_plain = best_seconds(lambda: rt.session.run(["logits"], {"images": batch}), sync)
                    s_fused = best_seconds(lambda: fused.session.run(["logits"], {"images": batch}), sync)
                    diff = np.abs(fused.session.run(["logits"], {"images": batch})[0]
                                  - rt.session.run(["logits"], {"images": batch})[0]).max()
                    row(S, f"fp32 fused attention on {fused.provider.replace('ExecutionProvider', '')}, batch {b}: "
                           "plain / fused", f"{rate(b / s_plain)} / {rate(b / s_fused)}",
                        f"fused {s_plain / s_fused:.2f}x the plain file; largest logit difference {diff:.2g}")
            if precision != "fp16":
                continue
            if TENSORRT not in ort.get_available_providers():
                row(S, "TensorRT EP", "not in this onnxruntime build")
                continue
            try:
                trt = Classifier(path, providers=[TENSORRT, CUDA])
            except Exception as e:  # noqa: BLE001 - report what the build does
                row(S, "TensorRT EP", "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:150]}")
                continue
            if trt.provider != TENSORRT:
                row(S, "TensorRT EP", "not usable here", f"onnxruntime fell back to {trt.provider} (TensorRT libraries missing?)")
                continue
            batch = np.ascontiguousarray(images[: BATCHES[1]])
            s = best_seconds(lambda: trt.session.run(["logits"], {"images": batch}), sync, repeats=5)
            row(S, f"TensorRT EP fp16, batch {BATCHES[1]}", rate(BATCHES[1] / s))


if __name__ == "__main__":
    main()
