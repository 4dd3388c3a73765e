"""Thread counts that survive a busy machine: the default counts the CPUs other processes leave
idle (measured with a real busy process), torch's count is restored, onnxruntime does not spin."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import coopkit
from coopkit.config import BackboneConfig
from coopkit.features import torch_threads
from coopkit.runtime.session import busy_cpus, default_threads, session_options, usable_cpus

LINUX = sys.platform.startswith("linux") and os.path.exists("/proc/stat")


@pytest.mark.skipif(not LINUX or not hasattr(os, "sched_setaffinity"), reason="needs /proc/stat and affinity")
def test_a_process_spinning_on_our_cpu_counts_as_busy():
    """Pinned to one CPU with a spinning child on the same CPU: that CPU is busy, 1 thread."""
    cpu = usable_cpus()[0]
    saved = os.sched_getaffinity(0)
    child = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        os.sched_setaffinity(0, {cpu})
        time.sleep(0.3)  # the child is spinning
        busy = busy_cpus(0.3)
        assert busy >= 0.5, busy  # the scheduler shares the CPU: at least half of it is the child's
        assert default_threads(0.1) == 1
    finally:
        child.kill()
        child.wait()
        os.sched_setaffinity(0, saved)
    assert 1 <= default_threads(0.1) <= len(usable_cpus())


def test_torch_threads_sets_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None) as n:
        assert 1 <= n <= len(usable_cpus()) and torch.get_num_threads() == n
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_thread_counts(bad, tiny_backbone, image_folder):
    match = "threads must be a positive integer or None"
    with pytest.raises(ValueError, match=match):
        BackboneConfig(threads=bad)
    with pytest.raises(ValueError, match=match):
        session_options(bad)
    with pytest.raises(ValueError, match=match):
        coopkit.fit(image_folder / "train", backbone=tiny_backbone, threads=bad, progress=False)
    with pytest.raises(ValueError, match=match):
        coopkit.zero_shot(tiny_backbone, ["a", "b"], threads=bad)


def test_session_options_do_not_spin_unless_asked():
    opts = session_options(2)
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(1, spinning=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert 1 <= session_options().intra_op_num_threads <= len(usable_cpus())


def test_fit_and_zero_shot_run_with_their_threads(tiny_backbone, image_folder):
    before = torch.get_num_threads()
    seen = []
    coopkit.fit(image_folder / "train", backbone=tiny_backbone, threads=1, shots=1, epochs=1, n_views=1,
                progress=False, callback=lambda epoch, stats: seen.append(torch.get_num_threads()))
    assert seen == [1] and torch.get_num_threads() == before
    zs = coopkit.zero_shot(tiny_backbone, ["red", "green"], threads=1)
    assert zs.class_weights().shape[0] == 2 and torch.get_num_threads() == before


def test_cli_threads_option_comes_from_the_config():
    from click.testing import CliRunner

    from coopkit.cli import main

    for cmd in ("fit", "zeroshot", "eval"):
        out = CliRunner().invoke(main, [cmd, "--help"]).output
        assert "--threads" in out and "idle" in out, (cmd, out)
    res = CliRunner().invoke(main, ["zeroshot", "x", "--threads", "0"])
    assert res.exit_code == 2 and "threads must be a positive integer" in res.output, res.output
