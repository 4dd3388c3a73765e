"""The outputs of a collection run: result rows and the files they are written to, resumable.

**Formats** (by the extension of ``out``): ``.parquet``, ``.jsonl`` or ``.csv``, one row per
input in input order: ``path, label, prob, labels, probs[, logits][, embedding], error``.
For a multi-label file ``labels`` and ``probs`` hold every label at or above its threshold (most
probable first; empty when none applies) and ``label``, ``prob`` the most probable of them.
An unreadable input gets a row with ``error`` set (never fatal); its other fields are empty.

**Resume**: rows are written in input order, so the rows already in ``out`` are a prefix of the
inputs. Reopening the same ``out`` (:func:`open_writer`) counts them, and :func:`skip_done`
skips that many inputs (after checking that the last written path is the input at that
position). JSONL and CSV are appended after every batch (a row cut short by a crash is dropped
on resume); Parquet rows go to complete part files beside ``out`` (``.<name>.parts/``, each
written atomically) that are merged into ``out`` when the run ends or is interrupted, so an
interrupted run leaves either a valid ``out`` or valid parts that the next run picks up.

**One writer**: :func:`open_writer` takes an exclusive lock on ``out`` (a hidden
``.<name>.lock`` beside it, :class:`~coopkit.runtime.atomic.ExclusiveLock`) before it reads the
rows already there, and the writer holds it until :meth:`Writer.close`; a second run on the same
``out`` is refused at once (:class:`~coopkit.runtime.atomic.LockedError`, a ``ValueError``: exit
code 2 on the command line) instead of mixing its rows in. A killed run's lock dies with it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .atomic import ExclusiveLock, atomic_path
from .inputs import PathLike, pyarrow_parquet
from .results import rank

logger = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
#: The columns every output has, before the optional ``logits`` and ``embedding`` and the last, ``error``.
BASE_FIELDS = ("path", "label", "prob", "labels", "probs")

Row = dict[str, Any]


# --- result rows ---------------------------------------------------------------------------------


def make_rows(
    paths: Sequence[str],
    errors: Sequence[Optional[str]],
    classnames: Sequence[str],
    outputs: dict[str, np.ndarray],
    top_k: int,
    fields: Sequence[str],
    thresholds: Optional[np.ndarray] = None,
) -> list[Row]:
    """One output row per input from :meth:`~coopkit.runtime.classifier.Classifier.run_batch` outputs.

    ``outputs`` hold the rows of the inputs whose ``errors`` entry is ``None``, in order (as for
    :func:`~coopkit.runtime.results.rank`); ``fields`` is :attr:`~coopkit.runtime.batch.BatchConfig.fields`;
    ``thresholds`` those of a multi-label file (:attr:`~coopkit.runtime.classifier.Classifier.thresholds`).
    """
    ranked = rank(outputs["probs"], classnames, paths, errors, top_k, thresholds=thresholds)
    extra = {"logits": outputs.get("logits"), "embedding": outputs.get("image_embeds")}
    rows: list[Row] = []
    ok = 0
    for path, pred in zip(paths, ranked):
        row: Row = {"path": path, "label": pred.label, "prob": pred.prob, "labels": list(pred.labels),
                    "probs": list(pred.probs)}
        for name in ("logits", "embedding"):
            if name in fields:
                values = extra[name]
                row[name] = values[ok].tolist() if pred.ok and values is not None else None
        row["error"] = pred.error
        ok += pred.ok
        rows.append(row)
    return rows


def error_row(path: str, error: str, fields: Sequence[str]) -> Row:
    """The row of an input that could not be labelled."""
    row: Row = {"path": path, "label": None, "prob": None, "labels": [], "probs": []}
    row.update({name: None for name in ("logits", "embedding") if name in fields})
    row["error"] = error
    return row


# --- writers -------------------------------------------------------------------------------------


def arrow_schema(fields: Sequence[str]) -> Any:
    """The Arrow schema of output rows with these columns (Parquet output, Ray blocks)."""
    import pyarrow as pa

    types = {
        "path": pa.string(), "label": pa.string(), "prob": pa.float32(), "labels": pa.list_(pa.string()),
        "probs": pa.list_(pa.float32()), "logits": pa.list_(pa.float32()), "embedding": pa.list_(pa.float32()),
        "error": pa.string(),
    }
    return pa.schema([(name, types[name]) for name in fields])


class Writer:
    """Appends rows to ``out``; :attr:`done` rows (and :attr:`last_path`) were there already."""

    def __init__(self, out: Path, fields: Sequence[str]) -> None:
        self.out, self.fields = out, tuple(fields)
        self.done = 0
        self.last_path: Optional[str] = None
        self.lock: Optional[ExclusiveLock] = None  # set by open_writer, released by close

    def write(self, rows: list[Row]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Make ``out`` complete and valid (also after an interruption), then let go of its lock."""
        try:
            self._finish()
        finally:
            if self.lock is not None:
                self.lock.release()

    def _finish(self) -> None:
        """What :meth:`close` does to ``out`` before the lock is released."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class LineWriter(Writer):
    """JSONL or CSV, appended after every batch with one ``write`` call; resumable by counting rows."""

    def __init__(self, out: Path, fields: Sequence[str], fmt: str, overwrite: bool) -> None:
        super().__init__(out, fields)
        self.fmt = fmt
        if out.exists() and not overwrite and out.stat().st_size > 0:
            self._resume()
            self.fd = os.open(out, os.O_WRONLY | os.O_APPEND)
        else:
            self.fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            if fmt == "csv":
                _write_all(self.fd, self._csv_text([list(self.fields)]))

    def _resume(self) -> None:
        size = self.out.stat().st_size
        with open(self.out, "rb") as f:  # drop a row cut short by a crash (no final newline)
            f.seek(max(0, size - 1))
            if f.read(1) != b"\n":
                keep = self._last_newline(f, size)
                logger.warning("%s: dropping an incomplete last row (interrupted write)", self.out)
                os.truncate(self.out, keep)
        with open(self.out, newline="", encoding="utf-8") as f:
            if self.fmt == "jsonl":
                first, last, count = None, None, 0
                for line in f:
                    last = line
                    first = first if first is not None else line
                    count += 1
                header = self._json_keys(first) if first else []
                last_path = json.loads(last)["path"] if last else None
            else:
                reader = csv.reader(f)
                header = next(reader, [])
                count, last_row = 0, None
                for last_row in reader:
                    count += 1
                last_path = last_row[0] if last_row else None
        if count and list(header) != list(self.fields):
            raise ValueError(
                f"{self.out} holds rows with columns {list(header)}, not {list(self.fields)}; "
                "choose another output file, or pass --overwrite to replace it"
            )
        if not count and self.fmt == "csv" and list(header) != list(self.fields):
            raise ValueError(f"{self.out} is not a coopkit predictions file; choose another output file or pass --overwrite")
        self.done, self.last_path = count, last_path

    def _json_keys(self, line: str) -> list[str]:
        try:
            return list(json.loads(line))
        except (json.JSONDecodeError, TypeError):
            raise ValueError(f"{self.out} is not a coopkit predictions file (JSONL); choose another output file "
                             "or pass --overwrite") from None

    @staticmethod
    def _last_newline(f: Any, size: int) -> int:
        pos, step = size, 1 << 16
        while pos > 0:
            start = max(0, pos - step)
            f.seek(start)
            chunk = f.read(pos - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                return start + i + 1
            pos = start
        return 0

    def _csv_text(self, records: list[list[Any]]) -> bytes:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(records)
        return buf.getvalue().encode("utf-8")

    def write(self, rows: list[Row]) -> None:
        if not rows:
            return
        if self.fmt == "jsonl":
            data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        else:
            records = []
            for r in rows:
                rec = []
                for name in self.fields:
                    value = r[name]
                    if isinstance(value, list):
                        value = json.dumps(value, ensure_ascii=False)
                    elif value is None:
                        value = ""
                    elif name == "error":
                        value = " ".join(str(value).splitlines())
                    rec.append(value)
                records.append(rec)
            data = self._csv_text(records)
        _write_all(self.fd, data)

    def _finish(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ParquetWriter(Writer):
    """Complete part files of ``flush_rows`` rows beside ``out``, merged into ``out`` on close.

    A part is named after the index of its first row in the whole output
    (``part-000000004096.parquet``), so parts already merged into ``out`` (a crash after the
    merge, before the parts were removed) are recognised and dropped on the next open.
    """

    def __init__(self, out: Path, fields: Sequence[str], overwrite: bool, flush_rows: int) -> None:
        super().__init__(out, fields)
        self.pq = pyarrow_parquet()
        self.schema = arrow_schema(fields)
        self.parts = out.parent / f".{out.name}.parts"
        self.flush_rows = flush_rows
        self.buffer: list[Row] = []
        if overwrite:
            shutil.rmtree(self.parts, ignore_errors=True)
            out.unlink(missing_ok=True)
        if out.exists():
            self._count(out)
        self.files: list[Path] = []
        if self.parts.is_dir():
            for part in sorted(self.parts.glob("part-*.parquet")):
                first = int(part.stem.split("-")[1])
                if first < self.done:  # merged into out already
                    part.unlink()
                    continue
                if first != self.done:
                    raise ValueError(f"{self.parts} is missing rows before {part.name}; pass --overwrite to start afresh")
                self._count(part)
                self.files.append(part)
        self.next_row = self.done  # index of the next row written

    def _count(self, path: Path) -> None:
        try:
            pf = self.pq.ParquetFile(path)
            names = list(pf.schema_arrow.names)
        except Exception as e:  # noqa: BLE001 - pyarrow's own error types
            raise ValueError(f"{path} is not a readable Parquet file ({e}); choose another output file or pass "
                             "--overwrite") from None
        if names != list(self.fields):
            raise ValueError(f"{path} holds columns {names}, not {list(self.fields)}; choose another output file "
                             "or pass --overwrite to replace it")
        rows = pf.metadata.num_rows
        if rows:
            last = pf.read_row_group(pf.num_row_groups - 1, columns=["path"]).column(0)
            self.last_path = last[len(last) - 1].as_py()
            self.done += rows

    @staticmethod
    def _replace(target: Path, write: Callable[[Path], None]) -> None:
        with atomic_path(target) as tmp:  # a hidden sibling, renamed over the target once complete
            write(tmp)

    def write(self, rows: list[Row]) -> None:
        self.buffer += rows
        if len(self.buffer) >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        import pyarrow as pa

        table = pa.Table.from_pylist(self.buffer, schema=self.schema)
        self.parts.mkdir(exist_ok=True)
        part = self.parts / f"part-{self.next_row:012d}.parquet"
        self._replace(part, lambda tmp: self.pq.write_table(table, tmp))
        self.files.append(part)
        self.next_row += len(self.buffer)
        self.buffer = []

    def _finish(self) -> None:
        self._flush()
        if self.files or not self.out.exists():
            sources = ([self.out] if self.out.exists() else []) + self.files

            def merge(tmp: Path) -> None:
                with self.pq.ParquetWriter(tmp, self.schema) as w:
                    for src in sources:
                        pf = self.pq.ParquetFile(src)
                        for i in range(pf.num_row_groups):
                            w.write_table(pf.read_row_group(i))

            self._replace(self.out, merge)
            self.files = []
        shutil.rmtree(self.parts, ignore_errors=True)


# --- opening and resuming ------------------------------------------------------------------------


def check_out(out: PathLike) -> tuple[Path, str]:
    """``out`` as a path and its format, or a ValueError/FileNotFoundError before any work starts."""
    path = Path(out)
    fmt = FORMATS.get(path.suffix.lower())
    if path.is_dir() or os.fspath(out).endswith(os.sep):
        raise ValueError(f"--out {out} is a folder; give a file name ending in {', '.join(FORMATS)}")
    if fmt is None:
        raise ValueError(f"--out {out}: the extension must be one of {', '.join(FORMATS)} (it chooses the format)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {path.parent}")
    if fmt == "parquet":
        pyarrow_parquet()
    return path, fmt


def open_writer(out: PathLike, fields: Sequence[str], *, overwrite: bool = False, flush_rows: int = 4096) -> Writer:
    """The writer for ``out``'s format (by extension), resuming after the rows it holds unless ``overwrite``.

    The writer holds ``out``'s lock until it is closed.

    Raises:
        ValueError: an unknown extension, a folder, or a file that is not a coopkit predictions
            file with these columns.
        LockedError: another run is writing ``out`` now (a ``ValueError``).
    """
    path, fmt = check_out(out)
    lock = ExclusiveLock(path, what="output file").acquire()
    try:
        if fmt == "parquet":
            writer: Writer = ParquetWriter(path, fields, overwrite, flush_rows)
        else:
            writer = LineWriter(path, fields, fmt, overwrite)
    except BaseException:
        lock.release()
        raise
    writer.lock = lock
    return writer


def skip_done(paths: Iterator[str], writer: Writer) -> Iterator[str]:
    """``paths`` after the ``writer.done`` inputs already written, checking that they are the same inputs."""
    if not writer.done:
        return paths
    last = None
    for i in range(writer.done):
        last = next(paths, None)
        if last is None:
            raise ValueError(f"{writer.out} already holds {writer.done} rows but the input has only {i}; "
                             "it was written for other inputs: choose another output file or pass --overwrite")
    if last != writer.last_path:
        raise ValueError(
            f"{writer.out} holds {writer.done} rows ending with {writer.last_path!r}, but input {writer.done} is "
            f"{last!r}: the inputs changed since; choose another output file or pass --overwrite"
        )
    logger.info("resuming %s after %d rows already written", writer.out, writer.done)
    return paths

