"""Every script in examples/ runs (on tiny inputs, offline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(args: list[str], cwd: Path) -> str:
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd)})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_quickstart(image_folder, tiny_config, tmp_path):
    out = _run([str(EXAMPLES / "quickstart.py"), str(image_folder / "train"), str(image_folder / "test"),
                "--model", str(tiny_config), "--pretrained", "none", "--shots", "4", "--epochs", "2",
                "--out", str(tmp_path / "run")], tmp_path)
    assert "zero-shot" in out and "CoOp, 4 shots" in out
    assert (tmp_path / "run" / "config.json").is_file()


def test_every_example_is_tested():
    tested = {"quickstart.py", "serve_onnx.py", "export_and_serve.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} <= tested, "add a test for the new example"


def test_serve_onnx(tiny_backbone, tmp_path):
    """The HTTP example serves predictions identical to the runtime's, and rejects bad uploads."""
    import io
    import json
    import socket
    import time
    import urllib.error
    import urllib.request

    import numpy as np
    from PIL import Image

    import coopkit
    from coopkit.exporters import export_onnx
    from coopkit.runtime import Classifier

    model = tmp_path / "model.onnx"
    export_onnx(coopkit.zero_shot(tiny_backbone, ["red", "green", "blue"]), model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "serve_onnx.py"), str(model), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                info = json.load(urllib.request.urlopen(url, timeout=5))
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        else:
            raise AssertionError("server did not start")
        assert info == {"classes": ["red", "green", "blue"], "provider": "CPUExecutionProvider"}
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(buf, "PNG")
        req = urllib.request.Request(f"{url}/predict?top_k=2", data=buf.getvalue(), method="POST")
        got = json.load(urllib.request.urlopen(req, timeout=30))
        (want,) = Classifier(model, device="cpu").predict(buf.getvalue(), top_k=2)
        assert got["labels"] == list(want.labels)
        np.testing.assert_allclose(got["probs"], want.probs, atol=1e-6)
        bad = urllib.request.Request(f"{url}/predict", data=b"not an image", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=30)
        assert err.value.code == 400 and "cannot decode" in json.load(err.value)["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
