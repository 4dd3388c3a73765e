"""Streaming collection prediction (coopkit.runtime.batch and ``coopkit predict ... --out``).

Expected labels come from ``Classifier.predict`` on each image alone; the fixture graph's
outputs are checked against numpy in test_runtime.py.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pq = pytest.importorskip("pyarrow.parquet")

from helpers import GraphModel, photo  # noqa: E402

from coopkit.runtime import Classifier  # noqa: E402
from coopkit.runtime.batch import BatchConfig, predict_collection  # noqa: E402
from coopkit.runtime.engine_choice import CACHE_ENV  # noqa: E402
from coopkit.runtime.inputs import iter_inputs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: The engines besides the default one (onnxruntime): auto always, OpenVINO where its extra is installed.
OTHER_ENGINES = ["auto"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


@pytest.fixture(scope="module")
def graph_clf(graph_model: GraphModel) -> Classifier:
    """The runtime classifier of ``graph_model`` with its default batch size (one CPU thread)."""
    return Classifier(graph_model.path, device="cpu", threads=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """b/ and a/sub/ with PNGs and JPEGs, plus a broken image, a hidden file and a non-image."""
    root = tmp_path_factory.mktemp("collection")
    for i in range(23):
        sub = root / ("b" if i % 3 == 0 else "a/sub")
        sub.mkdir(parents=True, exist_ok=True)
        ext = "jpg" if i % 2 else "png"
        Image.fromarray(photo(36 + i, 30 + i % 5, seed=i)).save(sub / f"img{i:02d}.{ext}")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "a" / ".hidden.png").write_bytes(b"x")
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append({k: (json.loads(v) if k in ("labels", "probs", "logits", "embedding") and v else
                             float(v) if k == "prob" and v else v or None) for k, v in r.items()})
    return rows


def test_every_input_kind_lists_the_same_sorted_images(folder: Path, tmp_path: Path) -> None:
    walked = list(iter_inputs(folder))
    names = [os.path.relpath(p, folder) for p in walked]
    assert names == sorted(names, key=lambda n: n.split(os.sep)) and "a/broken.png" in names
    assert not any(".hidden" in n or n.endswith(".txt") for n in names) and len(names) == 24
    assert list(iter_inputs(f"{folder}/**/*.png")) == [p for p in walked if p.endswith(".png")]
    assert list(iter_inputs(f"{folder}/b/*")) == [p for p in walked if "/b/" in p]
    lst = folder / "list.txt"
    lst.write_text("# images\n" + "\n".join(os.path.relpath(p, folder) for p in walked) + "\n\n")
    assert list(iter_inputs(lst)) == [os.path.join(folder, os.path.relpath(p, folder)) for p in walked]
    table = tmp_path / "t.csv"
    table.write_text("id,file\n" + "".join(f"{i},{p}\n" for i, p in enumerate(walked)))
    assert list(iter_inputs(table, column="file")) == walked
    import pyarrow as pa

    pq.write_table(pa.table({"file": walked}), tmp_path / "t.parquet")
    assert list(iter_inputs(tmp_path / "t.parquet", column="file")) == walked
    with pytest.raises(ValueError, match="no column 'path'"):
        iter_inputs(table)
    with pytest.raises(FileNotFoundError):
        iter_inputs(tmp_path / "missing")
    with pytest.raises(ValueError, match="INPUT must be"):
        iter_inputs(_touch(tmp_path / "x.json"))


def _touch(path: Path) -> Path:
    path.write_text("{}")
    return path


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_rows_equal_predict_alone_in_every_format(graph_clf: Classifier, folder: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"labels.{fmt}"
    summary = predict_collection(graph_clf, folder, out, BatchConfig(top_k=3, batch_size=5, embedding=True, logits=True),
                                 progress=False)
    assert (summary.rows, summary.errors, summary.skipped) == (24, 1, 0)
    rows = read_rows(out)
    assert [r["path"] for r in rows] == list(iter_inputs(folder))
    assert list(rows[0]) == ["path", "label", "prob", "labels", "probs", "logits", "embedding", "error"]
    for row in rows:
        if row["path"].endswith("broken.png"):
            assert row["label"] is None and row["labels"] == [] and "cannot decode" in row["error"]
            continue
        (want,) = graph_clf.predict(row["path"], top_k=3)
        assert row["labels"] == list(want.labels) and row["label"] == want.label and row["error"] is None
        np.testing.assert_allclose(row["probs"], want.probs, atol=1e-6)
        np.testing.assert_allclose(row["logits"], graph_clf.logits(row["path"])[0], atol=1e-5)
        np.testing.assert_allclose(row["embedding"], graph_clf.embed(row["path"])[0], atol=1e-6)


def test_every_rejected_input_is_a_row_error(graph_model: GraphModel, tmp_path: Path) -> None:
    d = tmp_path / "bad"
    d.mkdir()
    good = d / "good.png"
    Image.fromarray(photo(40, 40)).save(good)
    (d / "empty.png").write_bytes(b"")
    (d / "text.png").write_text("hello")
    data = good.read_bytes()
    (d / "cut.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(photo(200, 200)).save(d / "huge.png")
    (d / "folder.png").mkdir()
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(p) for p in [good, d / "empty.png", d / "text.png", d / "cut.png", d / "huge.png",
                                              d / "folder.png", d / "missing.png", good]))
    small = Classifier(graph_model.path, device="cpu", max_pixels=100 * 100)
    out = tmp_path / "out.jsonl"
    summary = predict_collection(small, lst, out, progress=False, batch_size=3)
    rows = read_rows(out)
    assert summary.errors == 6 and len(rows) == 8
    assert [r["error"] is None for r in rows] == [True] + [False] * 6 + [True]
    assert "more than 10000 pixels" in rows[4]["error"] and "not found" in rows[6]["error"]


#: A process that predicts a collection slowly (``pause`` s per input, a line "row" after each), in
#: batches of 2 flushed every 2 rows: something to kill, or to run beside, in the middle of its writes.
_SLOW_RUN = """
import sys, time
from coopkit.runtime.batch import predict_collection
from coopkit.runtime.inputs import iter_inputs
def slow():
    for p in iter_inputs({folder!r}):
        time.sleep({pause})
        yield p
        print("row", flush=True)
predict_collection({model!r}, slow(), {out!r}, progress=False, batch_size=2, flush_rows=2, device="cpu")
"""


def test_resume_after_interruption_and_kill(graph_clf: Classifier, graph_model: GraphModel, folder: Path, tmp_path: Path) -> None:
    want = read_rows(_full(graph_clf, folder, tmp_path / "full.jsonl"))

    class Interrupt:  # the inputs, with Ctrl-C while the 20th is listed (3 batches are decoded ahead)
        def __iter__(self) -> Any:
            for i, p in enumerate(iter_inputs(folder)):
                if i == 19:
                    raise KeyboardInterrupt
                yield p

    for fmt in ("jsonl", "csv", "parquet"):
        out = tmp_path / f"resume.{fmt}"
        with pytest.raises(KeyboardInterrupt):
            predict_collection(graph_clf, Interrupt(), out, progress=False, batch_size=4, flush_rows=4)
        partial = read_rows(out)  # a valid file: the whole batches done before Ctrl-C
        assert 0 < len(partial) < 24 and len(partial) % 4 == 0, (fmt, len(partial))
        if fmt == "jsonl":  # a crash in the middle of a write leaves a cut row: dropped on resume
            with open(out, "a") as f:
                f.write('{"path": "cut sho')
        summary = predict_collection(graph_clf, folder, out, progress=False, batch_size=4)
        assert summary.skipped == len(partial) and summary.rows == 24 - len(partial)
        got = read_rows(out)
        assert [r["path"] for r in got] == [r["path"] for r in want]
        assert [r["labels"] for r in got] == [r["labels"] for r in want], fmt

    # kill -9 in the middle of a Parquet run: complete parts survive, the rerun finishes the file
    out = tmp_path / "killed.parquet"
    code = _SLOW_RUN.format(folder=str(folder), model=str(graph_model.path), out=str(out), pause=0.15)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    for _ in range(12):
        assert proc.stdout.readline().startswith("row")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    parts = out.parent / f".{out.name}.parts"
    assert not out.exists() and len(list(parts.glob("part-*.parquet"))) >= 3
    summary = predict_collection(graph_clf, folder, out, progress=False, batch_size=4)
    assert summary.skipped >= 6 and summary.skipped + summary.rows == 24
    assert [r["labels"] for r in read_rows(out)] == [r["labels"] for r in want] and not parts.exists()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_a_second_run_on_the_same_output_is_refused_while_the_first_writes(
        graph_clf: Classifier, graph_model: GraphModel, folder: Path, tmp_path: Path, fmt: str) -> None:
    """Two real processes on one --out: the second exits 2 with one line naming the first; the
    first's file is exactly the full run, and a later run resumes it with nothing left to do."""
    want = read_rows(_full(graph_clf, folder, tmp_path / "full.jsonl"))
    out = tmp_path / f"shared.{fmt}"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = _SLOW_RUN.format(folder=str(folder), model=str(graph_model.path), out=str(out), pause=0.1)
    first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    for _ in range(4):
        assert first.stdout.readline().startswith("row")
    second = subprocess.run([sys.executable, "-m", "coopkit", "predict", str(graph_model.path), str(folder), "--out",
                             str(out), "--device", "cpu", "--no-progress"], capture_output=True, text=True, env=env,
                            timeout=120)
    assert first.poll() is None, "the first run ended before the second started: the test proves nothing"
    assert second.returncode == 2, second.stderr
    assert second.stderr.count("\n") == 1 and f"being written by another run (process {first.pid})" in second.stderr
    first.stdout.read()
    assert first.wait(120) == 0
    got = read_rows(out)
    assert [r["path"] for r in got] == [r["path"] for r in want]
    assert [r["labels"] for r in got] == [r["labels"] for r in want]
    assert not (tmp_path / f".{out.name}.lock").exists()
    summary = predict_collection(graph_clf, folder, out, progress=False)
    assert (summary.skipped, summary.rows) == (24, 0)


def test_every_output_has_one_writer_and_a_killed_writer_frees_it(graph_clf: Classifier, folder: Path, tmp_path: Path) -> None:
    """The general rule, for every format and both engines' writer: while one writer holds an
    output, opening it again is refused (a ValueError) and the file is untouched; closing frees
    it; a writer killed with kill -9 leaves no stale lock."""
    from coopkit.runtime.atomic import LockedError
    from coopkit.runtime.writers import open_writer

    fields = BatchConfig().fields
    for fmt in ("jsonl", "csv", "parquet"):
        out = _full(graph_clf, folder, tmp_path / f"x.{fmt}")
        before = out.read_bytes()
        writer = open_writer(out, fields)
        for overwrite in (False, True):
            with pytest.raises(LockedError, match=f"{out.name} is being written by another run \\(process {os.getpid()}\\)"):
                open_writer(out, fields, overwrite=overwrite)
        with pytest.raises(ValueError, match="being written"):
            predict_collection(graph_clf, folder, out, progress=False, overwrite=True)
        writer.close()
        assert out.read_bytes() == before and not (tmp_path / f".{out.name}.lock").exists()
        open_writer(out, fields).close()
    out = tmp_path / "killed.jsonl"
    code = ("import sys; from coopkit.runtime.writers import open_writer; "
            f"w = open_writer({str(out)!r}, {list(fields)!r}); print('locked', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().startswith("locked")
    with pytest.raises(LockedError, match=f"process {holder.pid}"):
        open_writer(out, fields)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(30)
    assert predict_collection(graph_clf, folder, out, progress=False).rows == 24


def _full(graph_clf: Classifier, folder: Path, out: Path) -> Path:
    predict_collection(graph_clf, folder, out, progress=False)
    return out


def test_resume_refuses_other_inputs_or_columns(graph_clf: Classifier, folder: Path, tmp_path: Path) -> None:
    out = _full(graph_clf, folder, tmp_path / "x.csv")
    with pytest.raises(ValueError, match="input has only 8"):
        predict_collection(graph_clf, f"{folder}/b/*", out, progress=False)
    reordered = tmp_path / "reordered.txt"
    reordered.write_text("\n".join(reversed(list(iter_inputs(folder)))))
    with pytest.raises(ValueError, match="inputs changed"):
        predict_collection(graph_clf, reordered, out, progress=False)
    with pytest.raises(ValueError, match="columns"):
        predict_collection(graph_clf, folder, out, progress=False, embedding=True)
    before = out.read_bytes()
    with pytest.raises(ValueError, match="holds rows with columns \\[.a., .b.\\]"):
        predict_collection(graph_clf, folder, _touch_csv(tmp_path / "mine.csv"), progress=False)
    assert out.read_bytes() == before and (tmp_path / "mine.csv").read_text() == "a,b\n1,2\n"
    assert predict_collection(graph_clf, folder, out, progress=False, overwrite=True, embedding=True).rows == 24
    for bad, err in ((tmp_path / "x.txt", "extension"), (tmp_path, "folder"), (tmp_path / "no" / "x.csv", "does not exist")):
        with pytest.raises((ValueError, FileNotFoundError), match=err):
            predict_collection(graph_clf, folder, bad, progress=False)


def _touch_csv(path: Path) -> Path:
    path.write_text("a,b\n1,2\n")
    return path


def test_a_hundred_thousand_inputs_stream_in_bounded_memory(graph_clf: Classifier, folder: Path, tmp_path: Path) -> None:
    """10^5 listed paths (one in 1000 a real image, the rest missing): every row written, and the
    peak of Python allocations stays far below what holding the list would take (~11 MB)."""
    real = next(p for p in iter_inputs(folder) if "broken" not in p)
    lst = tmp_path / "many.txt"
    with open(lst, "w") as f:
        for i in range(100_000):
            f.write(f"{real}\n" if i % 1000 == 0 else f"{tmp_path}/missing/some/longer/folder/name/img{i:07d}.jpg\n")
    out = tmp_path / "many.jsonl"
    tracemalloc.start()
    try:
        summary = predict_collection(graph_clf, lst, out, progress=False, batch_size=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (summary.rows, summary.errors) == (100_000, 99_900)
    with open(out) as f:
        assert sum(1 for _ in f) == 100_000
    assert peak < 2**20, f"peak {peak / 2**20:.1f} MB of Python allocations"


# --- the command line ---------------------------------------------------------------------------------


def _cli(*args: Any) -> Any:
    from click.testing import CliRunner

    from coopkit.cli.predict import predict

    return CliRunner().invoke(predict, [str(a) for a in args], catch_exceptions=False)


def test_cli_streams_to_a_file_and_expands_folders(graph_clf: Classifier, graph_model: GraphModel, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.parquet"
    r = _cli(graph_model.path, folder, "--out", out, "--top-k", "2", "--device", "cpu", "--no-progress")
    assert r.exit_code == 0, r.output
    assert "wrote 24 rows (1 unreadable)" in r.stderr and "images/s" in r.stderr
    assert len(read_rows(out)) == 24
    r = _cli(graph_model.path, folder, "--out", out, "--top-k", "2", "--device", "cpu", "--no-progress")
    assert r.exit_code == 0 and "wrote 0 rows (0 unreadable, 24 already there)" in r.stderr
    r = _cli(graph_model.path, folder / "b", "--json", "--device", "cpu", "--top-k", "2")
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.exit_code == 0 and [d["source"] for d in lines] == list(iter_inputs(folder / "b"))
    assert lines[0]["labels"] == list(graph_clf.predict(lines[0]["source"], top_k=2)[0].labels)
    for args, needle in (((folder, folder, "--out", tmp_path / "x.csv"), "one INPUT"),
                         ((folder, "--out", tmp_path / "x.txt"), "extension"),
                         ((folder, "--engine", "ray"), "--out"),
                         ((folder, "--out", tmp_path / "y.csv", "--top-k", "0"), "top_k")):
        r = _cli(graph_model.path, *args)
        assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1, (args, r.output)


# --- the engine that runs the graph (--runtime-engine / engine=) ----------------------------------------


def _same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """The same paths, labels and errors; fp32 logits within 1e-5 (the engines' tolerance on fp32 files)."""
    assert [r["path"] for r in got] == [r["path"] for r in want]
    assert [r["labels"] for r in got] == [r["labels"] for r in want]
    assert [r["error"] for r in got] == [r["error"] for r in want]
    assert max(np.abs(np.subtract(a["logits"], b["logits"])).max() for a, b in zip(got, want) if a["logits"]) <= 1e-5


@pytest.mark.openvino  # auto measures OpenVINO in this process: run in a process of its own
@pytest.mark.parametrize("engine", OTHER_ENGINES)
def test_every_engine_writes_the_rows_of_onnxruntime(graph_clf: Classifier, graph_model: GraphModel, folder: Path,
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    cfg = BatchConfig(top_k=3, batch_size=5, logits=True)
    want = predict_collection(graph_clf, folder, tmp_path / "want.jsonl", cfg, progress=False)
    got = predict_collection(graph_model.path, folder, tmp_path / "got.jsonl", cfg, progress=False, device="cpu",
                             threads=1, engine=engine)
    assert want.engine is graph_clf.engine and want.engine.label == "onnxruntime:cpu" and want.engine.choice is None
    assert (got.rows, got.errors) == (24, 1) and got.engine is not None and got.engine.device == "cpu"
    if engine == "auto":  # auto's choice and figures come back with the summary, measured at the batch size
        choice = got.engine.choice
        assert choice is not None and got.engine.label == choice.chosen and choice.batch_sizes == [1, 5]
        assert choice.measurement(choice.chosen).eligible
    else:
        assert got.engine.engine == engine and got.engine.choice is None
    _same_rows(read_rows(tmp_path / "got.jsonl"), read_rows(tmp_path / "want.jsonl"))
    with pytest.raises(ValueError, match="compute 'fp8' is not one of"):  # refused before anything is opened
        predict_collection(graph_model.path, folder, tmp_path / "x.jsonl", cfg, engine=engine, compute="fp8")
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_runtime_engine_beside_the_executor(graph_model: GraphModel, folder: Path, tmp_path: Path) -> None:
    """A real ``coopkit predict`` process: --engine (where the job runs) and --runtime-engine (what runs
    the graph) together; auto's choice is named on stderr, measured once, then read from the cache."""
    env = {**os.environ, CACHE_ENV: str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}

    def run(*args: Any) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "coopkit", "predict", str(graph_model.path), *map(str, args), "--device",
               "cpu", "--threads", "1"]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)

    want = tmp_path / "want.jsonl"
    predict_collection(graph_model.path, folder, want, progress=False, device="cpu", logits=True)
    out = tmp_path / "auto.jsonl"
    r = run(folder, "--out", out, "--engine", "local", "--runtime-engine", "auto", "--logits", "--no-progress")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stderr.splitlines() if x.startswith("engine: "))
    chosen = line.split()[1]
    assert f"auto: {chosen} chosen (measured in" in line and "onnxruntime:cpu" in line.split("auto: ")[1]
    _same_rows(read_rows(out), read_rows(want))
    r = run(folder / "b", "--json", "--runtime-engine", "auto", "--top-k", "2")  # the stdout form: from the cache
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith(f"engine: {chosen} (") and f"auto: {chosen} chosen (cache;" in r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [d["labels"] for d in lines] == [w["labels"][:2] for w in read_rows(want) if "/b/" in w["path"]]
    assert len(list((tmp_path / "cache" / "engines").iterdir())) == 1  # measured once
    r = _cli(graph_model.path, folder, "--runtime-engine", "tensorflow")
    assert r.exit_code == 2 and "'tensorflow' is not one of 'auto', 'onnxruntime', 'openvino'" in r.stderr
    r = _cli(graph_model.path, folder, "--compute", "bf16")  # onnxruntime (the default) has no bf16: refused, one line
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "compute='bf16' needs engine='openvino'" in r.stderr
