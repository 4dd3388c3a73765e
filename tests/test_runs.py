"""coopkit.runs: save / load round trips, runs saved by coopkit 0.1.0 and 0.2.0 (tests/data), saves
that survive any crash, every stored file checked on load, loads beside concurrent saves, first saves
racing each other, and what a run without its checksum may do (a warning; strict=True refuses).

Each test is a probe a demanding user could run: a real ``kill -9`` or Ctrl-C of a process that is
saving, a real full filesystem (a small tmpfs, mounted here when we are root), real edited files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import error_lines, fit_tiny, one_line_error

import coopkit
from coopkit.cli import main
from coopkit.methods.coop import CTX_FILE
from coopkit.runs import CONFIG_FILE, read_run, run_checksum

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def zs(tiny_backbone) -> coopkit.Classifier:
    return coopkit.zero_shot(tiny_backbone, ["red", "green", "blue"], ["a photo of a {}.", "a {} thing."])


@pytest.fixture(scope="module")
def coop_csc(tiny_backbone, image_folder) -> coopkit.Classifier:
    return fit_tiny(tiny_backbone, image_folder, csc=True, epochs=1)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


# --- round trips ------------------------------------------------------------------------------------


def test_save_load_round_trip(coop_csc, tiny_backbone, image_folder, tmp_path):
    imgs = [str(p) for p in sorted((image_folder / "test").rglob("*.png"))[:5]]
    run = coop_csc.save(tmp_path / "run")
    assert sorted(os.listdir(run)) == ["config.json", "ctx.safetensors"]
    again = coopkit.load(run, device="cpu")  # loads its own backbone from the recorded config file
    np.testing.assert_array_equal(again.logits(imgs), coop_csc.logits(imgs))
    assert again.predict(imgs) == coop_csc.predict(imgs)
    assert again.config.metrics["history"] == coop_csc.config.metrics["history"]
    # Saving over an existing run replaces it.
    coop_csc.save(run)
    assert coopkit.load(run, backbone=tiny_backbone).classnames == coop_csc.classnames


def test_load_refuses_other_backbone_weights(coop_csc, tiny_config, tmp_path):
    run = coop_csc.save(tmp_path / "run")
    other = coopkit.load_backbone(str(tiny_config), pretrained=None, device="cpu")
    with torch.no_grad():
        other.model.ln_final.weight.add_(0.1)
    with pytest.raises(ValueError, match="backbone weights differ"):
        coopkit.load(run, backbone=other)


def test_load_detects_mismatched_or_corrupt_files(coop_csc, tmp_path):
    run = coop_csc.save(tmp_path / "run")
    (run / "ctx.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="does not match config.json"):
        coopkit.load(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        coopkit.load(run)
    with pytest.raises(FileNotFoundError, match="not a coopkit run"):
        coopkit.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        coopkit.load(tmp_path / "nope")


def test_interrupted_save_keeps_the_old_run(coop_csc, tmp_path, monkeypatch):
    import coopkit.atomic_dirs

    run = coop_csc.save(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def crash(*args, **kwargs):  # the disk "fails" when the new folder is flushed, before any rename
        raise OSError("simulated crash")

    monkeypatch.setattr(coopkit.atomic_dirs, "fsync_tree", crash)
    with pytest.raises(OSError):
        coop_csc.save(run)
    with pytest.raises(OSError):
        coop_csc.save(tmp_path / "fresh")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary leftovers, hidden ones included


# --- runs saved by earlier versions load unchanged ----------------------------------------------------


def _v010_folder(root):
    """The 12 images the runs in tests/data were fitted and scored on by coopkit 0.1.0."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "sea_turtle": (40, 190, 60), "blue": (40, 60, 220)}
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            img = (np.array(rgb)[None, None] + rng.normal(0, 25, (40, 48, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_runs_saved_by_coopkit_0_1_0_load_unchanged(tmp_path):
    """config.json + ctx.safetensors written by the 0.1.0 code (before the configs became the
    interface) load with today's code and give the logits 0.1.0 computed (recorded then)."""
    data = __import__("pathlib").Path(__file__).parent / "data"
    expected = json.loads((data / "run-0.1.0-expected.json").read_text())
    folder = _v010_folder(tmp_path / "imgs")
    images = [str(folder / p) for p in expected["images"]]
    coop = coopkit.load(data / "run-0.1.0-coop", device="cpu")
    assert coop.config.coopkit_version == "0.1.0" and coop.learner.config.class_token_position == "middle"
    np.testing.assert_allclose(coop.logits(images), np.array(expected["coop_logits"]), atol=1e-5, rtol=0)
    zs = coopkit.load(data / "run-0.1.0-zeroshot", device="cpu", backbone=coop.backbone)
    assert zs.config.templates == ["a photo of a {}.", "a {} thing."]
    again = coopkit.zero_shot(coop.backbone, zs.classnames, zs.config.templates)
    np.testing.assert_array_equal(zs.logits(images), again.logits(images))


@pytest.mark.parametrize("method", ["coop", "zeroshot", "linear-probe", "clap", "tip-adapter", "tip-adapter-f"])
def test_runs_saved_by_coopkit_0_2_0_load_unchanged(tmp_path, method):
    """Runs of every method written by the 0.2.0 code (before the method registry) load with
    today's code and give the logits 0.2.0 computed (recorded then, on the shipped coopkit-tiny)."""
    data = __import__("pathlib").Path(__file__).parent / "data"
    expected = json.loads((data / "run-0.2.0-expected.json").read_text())
    folder = _v010_folder(tmp_path / "imgs")
    images = [str(folder / p) for p in expected["images"]]
    clf = coopkit.load(data / f"run-0.2.0-{method}", device="cpu")
    assert clf.method == method and clf.config.coopkit_version == "0.2.0"
    np.testing.assert_allclose(clf.logits(images), np.array(expected[f"{method}_logits"]), atol=1e-5, rtol=0)
    pred = clf.predict(images, top_k=1)
    assert [p.label for p in pred] == [clf.classnames[i] for i in np.argmax(expected[f"{method}_logits"], 1)]


# --- saves that survive any crash -------------------------------------------------------------


def _reference(clf: coopkit.Classifier, folder: Path) -> dict[str, bytes]:
    return _files(clf.save(folder))


def _saver(runs: list[coopkit.Classifier], run: Path) -> tuple[int, int]:
    """Fork a child that saves ``runs`` to ``run`` in turn until it is stopped,
    writing one byte to a pipe after each save. Returns ``(pid, read end of the pipe)`` once the
    child runs Python with its SIGINT handler in place (a signal that arrives while CPython is
    still setting up a forked child is dropped)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        assert os.read(r, 1) == b"r"
        return pid, r
    code = 0  # pragma: no cover - the child
    try:
        os.close(r)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.write(w, b"r")
        while True:
            for clf in runs:
                clf.save(run)
                os.write(w, b"s")
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        code = 3
    os._exit(code)


def _stop_mid_save(runs: list[coopkit.Classifier], run: Path, sig: int, rng: random.Random) -> int:
    """Let the child finish 1-4 saves, wait 0-10 ms more (inside the next save, mostly: a save
    takes milliseconds), send ``sig``; returns the child's wait status. Counting saves instead
    of sleeping a fixed time keeps the probe meaningful on a slow, loaded machine."""
    pid, r = _saver(runs, run)
    try:
        for _ in range(rng.randint(1, 4)):
            assert os.read(r, 1) == b"s", "the saver stopped on its own"
        time.sleep(rng.uniform(0, 0.01))
        os.kill(pid, sig)
        return _wait(pid)
    finally:
        os.close(r)


def _wait(pid: int, timeout: float = 30.0) -> int:
    """The child's wait status; a child still running after ``timeout`` s is killed and fails the test."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the saving child did not stop within {timeout} s")


@pytest.fixture(scope="module")
def runs(coop, zs, tiny_backbone, image_folder) -> list[coopkit.Classifier]:
    """Three runs saved in turn: CoOp, CoOp with another context, zero-shot (no context file)."""
    return [coop, fit_tiny(tiny_backbone, image_folder, seed=7), zs]


def test_kill_9_at_random_moments_never_breaks_the_run(runs, tiny_backbone, tmp_path):
    """60 times: a child saves three runs in turn to one folder (two CoOp runs with different
    contexts, one zero-shot run without a context file) and is killed with SIGKILL after 1-4
    saves and 0-10 ms; the folder must then load, hold exactly the bytes of one of the three,
    and show no temporary file. The save of coopkit 0.2.0 (main before issue 11) left a run
    that does not load after 9 of 60 kills in this loop."""
    refs = [_reference(clf, tmp_path / f"ref-{i}") for i, clf in enumerate(runs)]
    box = tmp_path / "box"
    box.mkdir()
    run = box / "run"
    runs[0].save(run)
    rng = random.Random(0)
    seen, mid_save = set(), 0
    for _ in range(60):
        status = _stop_mid_save(runs, run, signal.SIGKILL, rng)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the saver stopped on its own"
        got = _files(run)
        assert got in refs, sorted(got)
        seen.add(refs.index(got))
        clf = coopkit.load(run, backbone=tiny_backbone)
        assert clf.method == runs[refs.index(got)].method and clf.classnames == runs[refs.index(got)].classnames
        assert _visible(box) == ["run"]
        mid_save += any(p.name.startswith(".run.") for p in box.iterdir())
    assert seen == {0, 1, 2}
    assert mid_save >= 10, f"only {mid_save} of 60 kills landed inside a save; the probe did not probe"
    runs[0].save(run)  # the next save removes what killed saves left behind
    assert sorted(p.name for p in box.iterdir()) == ["run"]


def test_kill_between_the_two_renames_where_folders_cannot_be_exchanged(coop, zs, tiny_backbone, tmp_path,
                                                                        monkeypatch, caplog):
    """On a filesystem without RENAME_EXCHANGE the old run is renamed away before the new one is
    renamed in; a crash between the two leaves no run folder, and load() finds the old run."""
    import coopkit.atomic_dirs

    old = _reference(coop, tmp_path / "ref")
    run = tmp_path / "box" / "run"
    coop.save(run)
    monkeypatch.setattr(coopkit.atomic_dirs, "exchange", lambda a, b: False)
    real_rename = os.rename
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child dies exactly between the two renames
        def rename(src, dst):
            if Path(dst) == run:
                os._exit(9)
            real_rename(src, dst)

        os.rename = rename
        zs.save(run)
        os._exit(0)
    assert os.WEXITSTATUS(_wait(pid)) == 9
    assert not run.exists()
    with caplog.at_level("WARNING", logger="coopkit"):
        clf = coopkit.load(run, backbone=tiny_backbone)
    assert clf.method == "coop" and "save to it was killed" in caplog.text
    zs.save(run)  # an ordinary save afterwards, and the backup is gone
    assert _files(run) == _files(zs.save(tmp_path / "ref-b")) and _visible(run.parent) == ["run"]
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]
    assert _files(tmp_path / "ref") == old


def test_ctrl_c_during_saves_leaves_a_whole_run_and_no_leftovers(runs, tiny_backbone, tmp_path):
    """30 SIGINTs at random moments: the save in progress completes, then the child stops with
    KeyboardInterrupt; the folder is one of the runs and nothing else is left, hidden or not."""
    refs = [_reference(clf, tmp_path / f"ref-{i}") for i, clf in enumerate(runs)]
    box = tmp_path / "box"
    box.mkdir()
    run = box / "run"
    rng = random.Random(1)
    for _ in range(30):
        status = _stop_mid_save(runs, run, signal.SIGINT, rng)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 130, status
        assert _files(run) in refs
        assert sorted(p.name for p in box.iterdir()) == ["run"]
    coopkit.load(run, backbone=tiny_backbone)


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill a real disk (needs root): {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(disk: Path) -> None:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_full_disk_keeps_the_old_run_and_fails_in_one_line(coop, zs, tiny_backbone, image_folder,
                                                           tiny_config, tmp_path):
    with _tmpfs(tmp_path / "disk", "1m") as disk:
        run = zs.save(disk / "run")
        before = _files(run)
        _fill(disk)
        with pytest.raises(OSError) as info:
            coop.save(run)
        assert info.value.errno == errno.ENOSPC and info.value.filename == str(run)
        assert _files(run) == before and sorted(p.name for p in disk.iterdir()) == ["filler", "run"]

        res = CliRunner().invoke(main, ["fit", str(image_folder / "train"), "--out", str(run), "--model",
                                        str(tiny_config), "--pretrained", "none", "--device", "cpu", "--shots", "2",
                                        "--epochs", "1", "--n-ctx", "4", "--n-views", "1", "-q"])
        one_line_error(res, 1, "no space left on the device", str(run))
        res = CliRunner().invoke(main, ["export", str(run), "--out", str(disk / "model.onnx"), "--device", "cpu"])
        one_line_error(res, 1, "no space left on the device")
        assert _files(run) == before and sorted(p.name for p in disk.iterdir()) == ["filler", "run"]
        assert coopkit.load(run, backbone=tiny_backbone).classnames == zs.classnames


def test_read_only_disk_and_no_permission_fail_before_training(coop, image_folder, tiny_config, tmp_path):
    args = ["fit", str(image_folder / "train"), "--model", "no-such-model", "--shots", "2"]
    with _tmpfs(tmp_path / "ro", "64k") as ro:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        res = CliRunner().invoke(main, [*args, "--out", str(ro / "run")])
        one_line_error(res, 1, "Read-only file system")  # the bad model name is never reached
    base = Path(tempfile.mkdtemp(prefix="coopkit-locked-"))  # pytest's own tmp folders are 0700
    base.chmod(0o755)
    locked = base / "locked"
    locked.mkdir(mode=0o755)  # root's, readable by all, writable by root only
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - a user who may not write into root's folder
        try:
            os.close(r)
            os.setgid(65534)
            os.setuid(65534)
            res = CliRunner().invoke(main, [*args, "--out", str(locked / "run")])
            got = {"code": res.exit_code, "output": res.output}
        except BaseException as e:
            got = {"code": -1, "output": repr(e)}
        with os.fdopen(w, "w") as out:
            json.dump(got, out)
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as inp:
        got = json.load(inp)
    _wait(pid)
    left = sorted(os.listdir(locked))
    shutil.rmtree(base)
    assert left == []
    if os.geteuid() != 0:
        pytest.skip("the permission half needs root (to become another user)")
    assert got["code"] == 1 and error_lines(got["output"]) == [f"Error: Permission denied: {locked}"], got
    assert "Traceback" not in got["output"]


def test_save_refuses_a_folder_that_is_not_a_run(coop, image_folder, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / CONFIG_FILE).write_text('{"learning_rate": 3}')
    with pytest.raises(ValueError, match="is not a coopkit run \\(it holds a config.json that is not a coopkit run's\\); "
                                         "save to another folder, or pass overwrite=True"):
        coop.save(project)
    (project / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"other files \(notes.txt\)"):
        coop.save(project)
    assert (project / CONFIG_FILE).read_text() == '{"learning_rate": 3}' and (project / "notes.txt").exists()
    res = CliRunner().invoke(main, ["fit", str(image_folder / "train"), "--out", str(project),
                                    "--model", "no-such-model"])
    one_line_error(res, 2, "other files (notes.txt)")  # before the (bad) model is looked at
    res = CliRunner().invoke(main, ["fit", str(image_folder / "train"), "--out", str(project), "--overwrite",
                                    "--model", "no-such-model"])
    one_line_error(res, 2, "unknown model 'no-such-model'")  # --overwrite lets it past the folder check
    assert (project / "notes.txt").exists()  # and nothing is touched until a run is saved
    coop.save(project, overwrite=True)
    assert sorted(os.listdir(project)) == [CONFIG_FILE, CTX_FILE]
    coop.save(project)  # a run is replaced without asking
    empty = tmp_path / "empty"
    empty.mkdir()
    coop.save(empty)
    with pytest.raises(ValueError, match="it is a file"):
        coop.save(project / CONFIG_FILE)


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_saved_runs_follow_the_umask(coop, tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        run = coop.save(tmp_path / "team" / "run")
    finally:
        os.umask(old)
    assert run.stat().st_mode & 0o777 == dir_mode
    assert {p.name: p.stat().st_mode & 0o777 for p in run.iterdir()} == {CONFIG_FILE: file_mode, CTX_FILE: file_mode}


# --- every stored file is checked on load -----------------------------------------------------


def _edit(run: Path, change: Any, *, fix_checksum: bool) -> None:
    cfg = json.loads((run / CONFIG_FILE).read_text())
    change(cfg)
    if fix_checksum:  # as a buggy writer would: the checksum matches, the content does not make sense
        ctx = (run / CTX_FILE).read_bytes() if (run / CTX_FILE).exists() else None
        cfg["run_sha256"] = run_checksum(cfg, {CTX_FILE: ctx})
    (run / CONFIG_FILE).write_text(json.dumps(cfg))


def test_edited_config_is_detected_by_the_checksum(coop, tiny_backbone, tmp_path):
    run = coop.save(tmp_path / "run")
    _edit(run, lambda c: c["classnames"].reverse(), fix_checksum=False)
    with pytest.raises(ValueError, match="config.json changed after the run was saved"):
        coopkit.load(run, backbone=tiny_backbone)
    run = coop.save(tmp_path / "run2")
    (run / CTX_FILE).write_bytes((run / CTX_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="ctx.safetensors does not match config.json"):
        coopkit.load(run, backbone=tiny_backbone)
    res = CliRunner().invoke(main, ["eval", str(run), str(tmp_path), "--device", "cpu"])
    one_line_error(res, 2, "does not match config.json")


def _set(key: str, value: Any) -> Any:
    def change(cfg: dict[str, Any]) -> None:
        node, *path = key.split(".")
        target = cfg
        for part in [node, *path][:-1]:
            target = target[part]
        target[key.split(".")[-1]] = value
    return change


@pytest.mark.parametrize("key,value,match", [
    ("classnames", "abcd", "classnames must be a list of strings"),
    ("classnames", ["red", "red", "blue", "green"], "duplicate class names"),
    ("classnames", ["red", "", "blue", "green"], "blank names"),
    ("classnames", ["red", "blue", "green"], r"context is torch.float32 \(4, 4, 64\), expected float32 \(3, 4, width\)"),
    ("prompt", [1, 2], "PromptConfig must be a JSON object, got list"),
    ("prompt.class_token_position", "left", "unknown class_token_position 'left'"),
    ("prompt.n_ctx", 8, r"expected float32 \(4, 8, width\)"),
    ("method", "no-such-method", "unknown method 'no-such-method'"),
    ("model", 7, "model must be an open_clip model name"),
    ("train.epochs", True, "epochs must be an integer >= 1 or None, got True"),
])
def test_semantic_checks_give_one_line_errors(coop_csc, tiny_backbone, tmp_path, key, value, match):
    run = coop_csc.save(tmp_path / "run")
    _edit(run, _set(key, value), fix_checksum=True)
    with pytest.raises(ValueError, match=match):
        coopkit.load(run, backbone=tiny_backbone)
    res = CliRunner().invoke(main, ["eval", str(run), str(tmp_path), "--device", "cpu"])
    one_line_error(res, 2)


def test_non_finite_context_in_a_file_is_refused(coop, tiny_backbone, tmp_path):
    from safetensors.torch import save as st_save

    run = coop.save(tmp_path / "run")
    ctx = coop.learner.ctx.detach().clone()
    ctx[0, 0] = float("nan")
    (run / CTX_FILE).write_bytes(st_save({"ctx": ctx}))
    _edit(run, lambda c: c.update(ctx_sha256=hashlib.sha256((run / CTX_FILE).read_bytes()).hexdigest()),
          fix_checksum=True)
    with pytest.raises(ValueError, match="the context holds NaN or infinite values"):
        coopkit.load(run, backbone=tiny_backbone)


# --- concurrent use: a reader beside saves, first saves racing, leftovers; runs without a checksum ---


@pytest.fixture(scope="module")
def two_runs(tiny_backbone, image_folder, tmp_path_factory) -> list[Path]:
    """Two CoOp runs of the same classes with different contexts, saved once each."""
    root = tmp_path_factory.mktemp("two_runs")
    out = []
    for seed in (1, 2):
        path = root / f"run{seed}"
        fit_tiny(tiny_backbone, image_folder, seed=seed).save(path)
        out.append(path)
    return out


#: A process that swaps the two runs' files into one folder in turn, as fast as saves go
#: (coopkit.atomic_dirs.atomic_dir: the very swap Classifier.save makes).
_SAVER = """
import sys, time
from pathlib import Path
from coopkit.atomic_dirs import atomic_dir
target, seconds = Path(sys.argv[1]), float(sys.argv[2])
versions = [{p.name: p.read_bytes() for p in Path(a).iterdir()} for a in sys.argv[3:]]
print("ready", flush=True)
saves, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    with atomic_dir(target) as tmp:
        for name, blob in versions[saves % 2].items():
            (tmp / name).write_bytes(blob)
    saves += 1
print(saves, flush=True)
"""


def test_a_load_beside_saves_sees_one_complete_version(two_runs, tiny_backbone, tmp_path) -> None:
    """While another process re-saves a run over and over (two versions in turn), every load in
    this process succeeds and holds one of the two versions whole. Before, about 1 load in 70
    failed with "files of different runs mixed": the folder swap is atomic, but the files were
    read one by one by path."""
    target = tmp_path / "run"
    target.mkdir()
    for name, blob in _files(two_runs[0]).items():
        (target / name).write_bytes(blob)
    sums = [json.loads((p / CONFIG_FILE).read_text())["run_sha256"] for p in two_runs]
    saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(target), "6", *map(str, two_runs)],
                             stdout=subprocess.PIPE, text=True, env=ENV)
    assert saver.stdout.readline().strip() == "ready"
    loads, failures, seen = 0, [], set()
    end = time.monotonic() + 5
    while time.monotonic() < end:
        try:
            config, _ = read_run(target, backbone=tiny_backbone)
        except Exception as e:  # noqa: BLE001 - every failure is the finding
            failures.append(f"{type(e).__name__}: {e}")
            continue
        loads += 1
        seen.add(sums.index(config.run_sha256))
    saves = int(saver.stdout.readline())
    assert saver.wait(60) == 0
    assert failures == [], f"{len(failures)} of {loads + len(failures)} loads failed: {failures[:3]}"
    assert seen == {0, 1} and loads >= 50 and saves >= 50, (loads, saves, seen)


#: Two processes (forked, released by one barrier) save a run to each of N new folders at once.
_RACE = """
import json, multiprocessing as mp, sys
from pathlib import Path
from coopkit.atomic_dirs import atomic_dir
root, n = Path(sys.argv[1]), int(sys.argv[2])
versions = [{p.name: p.read_bytes() for p in Path(a).iterdir()} for a in sys.argv[3:]]

def save(k, barrier, queue):
    outcomes = []
    for i in range(n):
        barrier.wait()
        try:
            with atomic_dir(root / f"run{i}") as tmp:
                for name, blob in versions[k].items():
                    (tmp / name).write_bytes(blob)
            outcomes.append("ok")
        except FileExistsError as e:
            outcomes.append("lost: " + str(e))
        except BaseException as e:
            outcomes.append(f"raw {type(e).__name__}: {e}")
    queue.put((k, outcomes))

ctx = mp.get_context("fork")
barrier, queue = ctx.Barrier(2), ctx.Queue()
procs = [ctx.Process(target=save, args=(k, barrier, queue)) for k in (0, 1)]
for p in procs:
    p.start()
results = dict(queue.get() for _ in procs)
for p in procs:
    p.join()
print(json.dumps(results))
"""


def test_first_saves_at_the_same_instant_give_one_run_and_a_one_line_answer(two_runs, tmp_path) -> None:
    """Two processes save to each of 150 new folders at the same instant: every folder holds one
    complete run; a save that lost the race fails with a FileExistsError naming the folder (the
    CLI's exit code 2 and one line), never a raw "Directory not empty"; nothing is left over."""
    from coopkit.cli.base import EXIT_BAD_INPUT, classify_error

    root = tmp_path / "runs"
    root.mkdir()
    n = 150
    out = subprocess.run([sys.executable, "-c", _RACE, str(root), str(n), *map(str, two_runs)], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert out.returncode == 0, out.stderr
    results = {int(k): v for k, v in json.loads(out.stdout).items()}
    raw = [o for k in (0, 1) for o in results[k] if o.startswith("raw")]
    assert raw == [], raw[:3]
    refs = [_files(p) for p in two_runs]
    for i in range(n):
        assert _files(root / f"run{i}") in refs, i
        assert "ok" in (results[0][i], results[1][i]), i
    assert sorted(p.name for p in root.iterdir()) == sorted(f"run{i}" for i in range(n))
    lost = [o for k in (0, 1) for o in results[k] if o.startswith("lost")]
    if lost:  # the race was hit: the loser's answer is one line naming the folder
        code, message = classify_error(FileExistsError(17, lost[0].split(": ", 1)[1].rsplit(": ", 1)[0],
                                                       str(root / "run0")))
        assert code == EXIT_BAD_INPUT and "written by another process at the same moment" in message
        assert "\n" not in message


#: A save to a new folder that stops inside its write (the hidden folder made and half-filled).
_KILLED_SAVE = """
import sys, time
from pathlib import Path
from coopkit.atomic_dirs import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "config.json").write_text("{}")
    print("inside", flush=True)
    time.sleep(600)
"""


def test_leftovers_of_killed_saves_go_with_the_next_save_anywhere_beside_them(two_runs, tmp_path) -> None:
    """kill -9 during saves to new folders leaves hidden .<name>.coopkit-new-* folders; the next
    save to any folder of the same parent removes them, and nothing else: not a live process's
    folder, not a user's hidden folders that merely look alike."""
    from coopkit.atomic_dirs import atomic_dir

    box = tmp_path / "runs"
    box.mkdir()
    for name in ("a", "b"):  # the second killed save, to another folder, already removes the first's leftover
        proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVE, str(box / name)], stdout=subprocess.PIPE, text=True,
                                env=ENV)
        assert proc.stdout.readline().strip() == "inside"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        left = sorted(p.name for p in box.iterdir())
        assert len(left) == 1 and left[0].startswith(f".{name}.coopkit-new-{proc.pid}-"), left
    live = box / f".c.coopkit-new-{os.getpid()}-0123abcd"  # a save of this very process, under way
    mine = [box / ".a.coopkit-new-notes", box / ".keep", box / ".a.coopkit-new-1-xyz", box / "a.coopkit-new-1-0123abcd"]
    for folder in (live, *mine):
        folder.mkdir()
        (folder / "data.txt").write_text("mine")
    with atomic_dir(box / "other") as tmp:  # a save to another folder of the same parent
        for name, blob in _files(two_runs[0]).items():
            (tmp / name).write_bytes(blob)
    assert sorted(p.name for p in box.iterdir()) == sorted(["other", live.name, *(p.name for p in mine)])
    assert all((p / "data.txt").read_text() == "mine" for p in mine)


def _copy_edited(src: Path, dst: Path, edit: Any) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / CONFIG_FILE).read_text())
    edit(cfg)
    (dst / CONFIG_FILE).write_text(json.dumps(cfg))
    return dst


def test_a_run_without_its_checksum_warns_naming_what_is_unverified_and_strict_refuses(
        two_runs, tiny_backbone, tmp_path, caplog) -> None:
    """run_sha256 deleted, then an edited class_token_position or a removed ctx_sha256: each loads
    with a warning naming what cannot be verified (before: silently), and strict=True refuses it."""
    import logging

    def edits(cfg: dict) -> None:
        del cfg["run_sha256"]

    cases = {
        "checksum line deleted": (edits, ["config.json cannot be verified"]),
        "position edited": (lambda c: (edits(c), c["prompt"].__setitem__("class_token_position", "front")),
                            ["config.json cannot be verified"]),
        "ctx_sha256 removed too": (lambda c: (edits(c), c.pop("ctx_sha256")),
                                   ["config.json, ctx.safetensors cannot be verified", "and the tensors"]),
    }
    for i, (label, (edit, needles)) in enumerate(cases.items()):
        run = _copy_edited(two_runs[0], tmp_path / f"case{i}", edit)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="coopkit.runs"):
            coopkit.load(run, backbone=tiny_backbone)
        text = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        assert "records no run_sha256" in text and all(n in text for n in needles), (label, text)
        assert "class names, method, class-token position" in text
        with pytest.raises(ValueError, match="records no run_sha256.*cannot be verified"):
            coopkit.load(run, backbone=tiny_backbone, strict=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="coopkit.runs"):  # a run with its checksum: strict loads it, quietly
        coopkit.load(two_runs[0], backbone=tiny_backbone, strict=True)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_every_shipped_old_run_warns_or_verifies_as_its_checksums_allow(tiny_backbone, caplog) -> None:
    """The general rule over the runs in tests/data: one without run_sha256 (coopkit 0.1.0) loads
    with the warning and is refused by strict=True; one with it loads under strict=True, silently."""
    import logging

    data = ROOT / "tests" / "data"
    runs = sorted(p for p in data.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())
    assert len(runs) >= 4
    for run in runs:
        has_sum = "run_sha256" in json.loads((run / CONFIG_FILE).read_text())
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="coopkit.runs"):
            read_run(run, device="cpu", strict=has_sum)
        warned = any("records no run_sha256" in r.getMessage() for r in caplog.records)
        assert warned == (not has_sum), run.name
        if not has_sum:
            with pytest.raises(ValueError, match="records no run_sha256"):
                read_run(run, device="cpu", strict=True)
