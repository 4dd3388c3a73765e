"""The CPU fallback: with CUDA made unusable (no visible device), device='auto' runs on the CPU
and device='cuda' fails with a one-line reason."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import row

S = "fallback"
CHILD = """
import sys
from coopkit.runtime import Classifier
auto = Classifier(sys.argv[1], device="auto")
print("auto:", auto.provider)
try:
    Classifier(sys.argv[1], device="cuda")
    print("cuda: opened")
except RuntimeError as e:
    print("cuda: RuntimeError:", str(e).splitlines()[0])
"""


def main() -> None:
    import coopkit
    from coopkit.exporters import export_onnx
    from coopkit.runtime import Classifier

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tiny.onnx"
        export_onnx(coopkit.zero_shot(coopkit.load_backbone(device="cpu"), ["red", "green"]), path)
        row(S, "device=auto, CUDA as found", Classifier(path, device="auto").provider.replace("ExecutionProvider", ""))
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env, timeout=120)
        lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
        row(S, "device=auto, CUDA_VISIBLE_DEVICES=''", lines.get("auto", f"failed: {out.stderr.strip()[-200:]}"))
        row(S, "device=cuda, CUDA_VISIBLE_DEVICES=''", (lines.get("cuda") or "no answer")[:200])


if __name__ == "__main__":
    main()
