"""Fit CoOp on a small image folder, export one ONNX file, and serve it without torch.

    python examples/export_and_serve.py [IMAGE_FOLDER]

IMAGE_FOLDER is an ImageFolder (one sub-folder per class). Without it, a small task of
coopkit's synthetic world is written to a temporary folder. The model is the shipped
``coopkit-tiny`` when its weights are installed, else a random-init copy of it (to show the
mechanics only).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import coopkit  # noqa: E402
from coopkit.embedded import ASSETS  # noqa: E402
from coopkit.exporters import export_onnx  # noqa: E402


def main(folder: str | None = None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="coopkit-example-"))
    if folder is None:
        from coopkit.embedded import world

        folder = str(world.write_task("colors", tmp / "task", shots_per_class=4, test_per_class=5) / "train")
    pretrained = "synthetic" if (ASSETS / "coopkit-tiny.safetensors").is_file() else None

    # 1. fit (a few epochs: this is a demo)
    clf = coopkit.fit(folder, model="coopkit-tiny", pretrained=pretrained, shots=4, epochs=10, n_views=2,
                      device="cpu", progress=False)

    # 2. export: verified against PyTorch before the file is written; --with-text-encoder adds
    #    the text graph so that new class names can be added at run time
    result = export_onnx(clf, tmp / "model.onnx", precision="fp32", with_text_encoder=True)
    print(f"wrote {result.path} ({result.size_bytes / 1e6:.1f} MB), "
          f"max |logit - PyTorch| = {result.image.max_abs_logit_diff:.1e}")

    # 3. serve: coopkit.runtime needs only numpy, Pillow and onnxruntime
    images = sorted(str(p) for p in Path(folder).rglob("*.png"))[:4]
    from coopkit.runtime import Classifier

    with Classifier(result.path, device="cpu") as served:
        for p in served.predict(images, top_k=2):
            print(f"{Path(p.source).parent.name}/{Path(p.source).name}: {p.labels} {[round(x, 3) for x in p.probs]}")
        served.set_classes(["crimson", "navy blue", "lime green"])  # never trained on: through the text graph
        print("new classes:", [p.label for p in served.predict(images)])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
