"""The machine: GPU, driver, versions, onnxruntime's providers, and the matmul FLOP limit measured."""

from __future__ import annotations

import platform

from common import QUICK, best_seconds, cuda_ok, row

S = "env"


def main() -> None:
    import onnxruntime as ort
    import torch

    row(S, "python / torch / onnxruntime", f"{platform.python_version()} / {torch.__version__} / {ort.__version__}")
    row(S, "onnxruntime providers", ", ".join(p.replace("ExecutionProvider", "") for p in ort.get_available_providers()))
    if not cuda_ok():
        row(S, "GPU", "none", "CUDA not usable by torch: the GPU rows below are skipped or run on the CPU")
        return
    p = torch.cuda.get_device_properties(0)
    row(S, "GPU", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs", f"CUDA {torch.version.cuda}")
    n = 2048 if QUICK else 8192
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        s = best_seconds(lambda: a @ b, torch.cuda.synchronize)
        row(S, f"matmul peak {str(dtype).split('.')[-1]}", f"{2 * n**3 / s / 1e12:.0f} TFLOP/s", f"{n}^3, best of 10")


if __name__ == "__main__":
    main()
