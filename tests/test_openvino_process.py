"""The tests that load OpenVINO in the test process (marked ``openvino``), run in a fresh interpreter.

OpenVINO's CPU plugin and torch both bring oneDNN; in one process where torch has trained (the suite
runs the CLIP-LoRA tests before them) OpenVINO crashed the whole pytest process with SIGSEGV, while
the same tests pass in a process of their own (docs/engines.md says so to users). So the main run
skips them (tests/conftest.py) and this test runs exactly them, with every result required.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_openvino_tests_pass_in_a_process_of_their_own() -> None:
    pytest.importorskip("openvino")
    env = dict(os.environ, COOPKIT_OPENVINO_PROCESS="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "openvino",
                          str(ROOT / "tests")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    last = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in last and "failed" not in last and "error" not in last, last
