"""Every script in examples/ runs (on tiny inputs, offline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
