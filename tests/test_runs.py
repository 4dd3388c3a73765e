"""Saved runs under concurrent use, and what a run without its checksum may do: real processes
saving beside a reader, first saves racing each other, leftovers of killed saves, old runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

import coopkit  # noqa: E402
from coopkit.runs import CONFIG_FILE, read_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _fit(bb: Any, folder: Path, **kw: Any) -> coopkit.Classifier:
    args = dict(backbone=bb, shots=2, epochs=2, n_views=1, n_ctx=4, batch_size=8, progress=False)
    args.update(kw)
    return coopkit.fit(folder / "train", **args)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def two_runs(tiny_backbone, image_folder, tmp_path_factory) -> list[Path]:
    """Two CoOp runs of the same classes with different contexts, saved once each."""
    root = tmp_path_factory.mktemp("two_runs")
    out = []
    for seed in (1, 2):
        path = root / f"run{seed}"
        _fit(tiny_backbone, image_folder, seed=seed).save(path)
        out.append(path)
    return out


#: A process that swaps the two runs' files into one folder in turn, as fast as saves go
#: (coopkit._io.atomic_dir: the very swap Classifier.save makes).
_SAVER = """
import sys, time
from pathlib import Path
from coopkit._io import atomic_dir
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
from coopkit._io import atomic_dir
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
from coopkit._io import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "config.json").write_text("{}")
    print("inside", flush=True)
    time.sleep(600)
"""


def test_leftovers_of_killed_saves_go_with_the_next_save_anywhere_beside_them(two_runs, tmp_path) -> None:
    """kill -9 during saves to new folders leaves hidden .<name>.coopkit-new-* folders; the next
    save to any folder of the same parent removes them, and nothing else: not a live process's
    folder, not a user's hidden folders that merely look alike."""
    import signal

    from coopkit._io import atomic_dir

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
    import shutil

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
