"""Label a whole collection: streaming, bounded memory, decoding overlapped with inference, resumable.

>>> from coopkit.runtime.batch import predict_collection
>>> predict_collection("model.onnx", "photos/", "labels.parquet")   # doctest: +SKIP
Summary(rows=120000, skipped=0, errors=3, seconds=...)

**Inputs** (:func:`iter_inputs`): a folder (recursive, sorted, image extensions only), a glob
(``photos/**/*.jpg``, sorted), a text file of paths (one per line, ``#`` comments), or a
``.csv`` / ``.parquet`` file with a path column (``BatchConfig.column``). Relative paths in a
list file are relative to the list's folder. Inputs are read lazily, never listed whole.

**Outputs** (by the extension of ``out``): ``.parquet``, ``.jsonl`` or ``.csv``, one row per
input in input order: ``path, label, prob, labels, probs[, logits][, embedding], error``.
An unreadable input gets a row with ``error`` set (never fatal); its other fields are empty.

**Memory bound**: at most ``(prefetch + 1) * batch_size`` inputs are in flight (decoded crops
of ``H x W x 3`` bytes each, plus their paths), ``workers`` images are being decoded at full
size (each at most ``max_pixels``), and at most ``flush_rows`` result rows wait to be written
(Parquet; JSONL and CSV are written after every batch). A folder is listed one directory at a
time, so the largest single directory's names are held while it is walked (for a stable order).
Nothing grows with the number of inputs.

**Overlap**: a pool of ``workers`` threads decodes the next ``prefetch`` batches while the
session runs the current one (Pillow and onnxruntime release the GIL).

**Resume**: rows are written in input order, so the rows already in ``out`` are a prefix of the
inputs. Rerunning with the same ``out`` skips that many inputs (after checking that the last
written path is the input at that position) and appends the rest. JSONL and CSV are appended
after every batch (a row cut short by a crash is dropped on resume); Parquet rows go to
complete part files beside ``out`` (``.<name>.parts/``, each written atomically) that are merged
into ``out`` when the run ends or is interrupted, so an interrupted run leaves either a valid
``out`` or valid parts that the next run picks up.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import io
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from .atomic import atomic_path
from .image import Classifier, rank
from .preprocess import is_image_file

logger = logging.getLogger(__name__)

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
LIST_SUFFIXES = (".txt", ".lst", ".list")
TABLE_SUFFIXES = (".csv", ".parquet")
BASE_FIELDS = ("path", "label", "prob", "labels", "probs")
PARQUET_EXTRA = "pip install 'coopkit[parquet]'"
#: How much lower decoding threads run than the session's (``nice`` steps; Linux only).
DECODE_NICENESS = 5

PathLike = Union[str, "os.PathLike[str]"]
Row = dict[str, Any]


def _positive(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True)
class BatchConfig:
    """How a collection is labelled (``coopkit predict MODEL INPUT --out FILE``)."""

    top_k: int = field(default=5, metadata={"help": "Labels (and probabilities) per image."})
    batch_size: int = field(default=32, metadata={"help": "Images per session run."})
    workers: Optional[int] = field(default=None, metadata={
        "help": "Threads decoding images while the session runs (default: one per core, at most 8)."})
    prefetch: int = field(default=2, metadata={"help": "Batches decoded ahead of the one running (memory bound)."})
    embedding: bool = field(default=False, metadata={"help": "Also write each image's L2-normalised embedding."})
    logits: bool = field(default=False, metadata={"help": "Also write all classes' logits (fp32)."})
    column: str = field(default="path", metadata={"help": "Path column of a CSV or Parquet INPUT."})
    overwrite: bool = field(default=False, metadata={
        "help": "Start OUT afresh instead of resuming after the rows it already holds."})
    flush_rows: int = field(default=4096, metadata={"help": "Parquet rows per part file (work lost to a kill -9)."})

    def __post_init__(self) -> None:
        for name in ("top_k", "batch_size", "prefetch", "flush_rows"):
            _positive(name, getattr(self, name))
        _positive("workers", self.workers, optional=True)
        for name in ("embedding", "logits", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.column, str) or not self.column.strip():
            raise ValueError(f"column must be a non-empty column name, got {self.column!r}")

    @property
    def fields(self) -> tuple[str, ...]:
        """The output columns, in order."""
        return BASE_FIELDS + (("logits",) if self.logits else ()) + (("embedding",) if self.embedding else ()) + ("error",)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The graph outputs a run needs."""
        return ("probs",) + (("logits",) if self.logits else ()) + (("image_embeds",) if self.embedding else ())


@dataclass(frozen=True)
class Summary:
    """What a run did: rows written now, rows found already written (skipped), rows with an error."""

    rows: int
    skipped: int
    errors: int
    seconds: float
    out: str = ""

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


# --- inputs --------------------------------------------------------------------------------------


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _walk(root: str) -> Iterator[str]:
    """Image files under ``root``, depth first, names sorted (one directory listed at a time)."""
    try:
        with os.scandir(root) as it:
            entries = sorted(((e.name, e.path, e.is_dir(follow_symlinks=False)) for e in it))
    except OSError as e:
        logger.warning("skipping unreadable folder %s: %s", root, e.strerror or e)
        return
    for name, path, is_dir in entries:
        if name.startswith("."):
            continue
        if is_dir:
            yield from _walk(path)
        elif is_image_file(name):
            yield path


def _match(parts: Sequence[str], pats: Sequence[str]) -> bool:
    """glob semantics per path segment: ``**`` matches any number of folders."""
    if not pats:
        return not parts
    if pats[0] == "**":
        return _match(parts, pats[1:]) or (bool(parts) and _match(parts[1:], pats))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pats[0]) and _match(parts[1:], pats[1:])


def _glob(pattern: str) -> Iterator[str]:
    """Like ``glob.iglob(pattern, recursive=True)`` for files, but in sorted, reproducible order."""
    segments = pattern.split(os.sep)
    fixed = next(i for i, s in enumerate(segments) if _has_magic(s))
    root = os.sep.join(segments[:fixed]) or ("" if not pattern.startswith(os.sep) else os.sep)
    pats = segments[fixed:]
    max_depth = None if "**" in pats else len(pats)

    def walk(folder: str, rel: list[str]) -> Iterator[str]:
        try:
            with os.scandir(folder or ".") as it:
                entries = sorted(((e.name, e.path, e.is_dir()) for e in it))
        except OSError:
            return
        for name, path, is_dir in entries:
            depth_pats = [p for p in pats if p != "**"]
            if name.startswith(".") and not any(p.startswith(".") for p in depth_pats):
                continue
            parts = rel + [name]
            full = os.path.join(folder, name) if folder else name
            if is_dir:
                if max_depth is None or len(parts) < max_depth:
                    yield from walk(full, parts)
            elif _match(parts, pats):
                yield full

    yield from walk(root, [])


def resolve(base: str, value: str) -> str:
    """A path from a list file: absolute paths and URIs as written, others relative to ``base``."""
    value = value.strip()
    return value if "://" in value or os.path.isabs(value) else os.path.join(base, value)


def paths_from_lines(f: Iterable[str], base: str) -> Iterator[str]:
    """Paths from a text file of one path per line (blank lines and ``#`` comments skipped)."""
    for line in f:
        text = line.strip()
        if text and not text.startswith("#"):
            yield resolve(base, text)


def paths_from_csv(f: Iterable[str], base: str, column: str) -> Iterator[str]:
    """Paths from the ``column`` of a CSV file with a header row."""
    for row in csv.DictReader(f):
        yield resolve(base, row.get(column) or "")


def paths_from_parquet(source: Any, base: str, column: str) -> Iterator[str]:
    """Paths from the ``column`` of a Parquet file (a path or an open file), read in row batches."""
    for batch in _pyarrow_parquet().ParquetFile(source).iter_batches(columns=[column], batch_size=4096):
        for value in batch.column(0).to_pylist():
            yield resolve(base, str(value or ""))


def _read_local(path: Path, column: str) -> Iterator[str]:
    base = str(path.parent)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from paths_from_parquet(path, base, column)
        return
    with open(path, newline="", encoding="utf-8") as f:
        yield from (paths_from_csv(f, base, column) if suffix == ".csv" else paths_from_lines(f, base))


def _check_column(path: Path, column: str) -> None:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    else:
        try:
            header = list(_pyarrow_parquet().ParquetFile(path).schema_arrow.names)
        except Exception as e:  # noqa: BLE001 - pyarrow raises its own error types for bad files
            if isinstance(e, ImportError):
                raise
            raise ValueError(f"{path}: not a readable Parquet file ({e})") from None
    if column not in header:
        raise ValueError(f"{path} has no column {column!r}; its columns are {header[:20]} (choose one with --column)")


def iter_inputs(source: PathLike, column: str = "path") -> Iterator[str]:
    """The image paths named by ``source``, lazily, in a reproducible order.

    ``source`` is a folder, a glob pattern, a ``.txt``/``.lst``/``.list`` file of paths, or a
    ``.csv``/``.parquet`` file with a ``column`` of paths. Checked now (a missing source or
    column raises here); the paths themselves are read as the iterator is consumed.

    Raises:
        FileNotFoundError: ``source`` does not exist (and is not a glob).
        ValueError: an unsupported kind of file, or a table without ``column``.
    """
    text = os.fspath(source)
    if _has_magic(text) and not os.path.exists(text):
        return _glob(text)
    path = Path(text)
    if path.is_dir():
        return _walk(text)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {text}")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        _check_column(path, column)
    if suffix in LIST_SUFFIXES + TABLE_SUFFIXES:
        return _read_local(path, column)
    raise ValueError(
        f"{text}: INPUT must be a folder, a glob, a list of paths ({', '.join(LIST_SUFFIXES)}) or a table "
        f"({', '.join(TABLE_SUFFIXES)}) with a path column"
    )


# --- result rows ---------------------------------------------------------------------------------


def make_rows(
    paths: Sequence[str],
    errors: Sequence[Optional[str]],
    classnames: Sequence[str],
    outputs: dict[str, np.ndarray],
    top_k: int,
    fields: Sequence[str],
) -> list[Row]:
    """One output row per input from :meth:`Classifier.run_batch` outputs.

    ``outputs`` hold the rows of the inputs whose ``errors`` entry is ``None``, in order (as for
    :func:`~coopkit.runtime.image.rank`); ``fields`` is :attr:`BatchConfig.fields`.
    """
    ranked = rank(outputs["probs"], classnames, paths, errors, top_k)
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


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"Parquet input or output needs pyarrow ({PARQUET_EXTRA})") from None
    return pq


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

    def write(self, rows: list[Row]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Make ``out`` complete and valid (also after an interruption)."""


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

    def close(self) -> None:
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
        self.pq = _pyarrow_parquet()
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

    def close(self) -> None:
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


# --- the run -------------------------------------------------------------------------------------


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
        _pyarrow_parquet()
    return path, fmt


def open_writer(out: PathLike, fields: Sequence[str], *, overwrite: bool = False, flush_rows: int = 4096) -> Writer:
    """The writer for ``out``'s format (by extension), resuming after the rows it holds unless ``overwrite``.

    Raises:
        ValueError: an unknown extension, a folder, or a file that is not a coopkit predictions
            file with these columns.
    """
    path, fmt = check_out(out)
    if fmt == "parquet":
        return ParquetWriter(path, fields, overwrite, flush_rows)
    return LineWriter(path, fields, fmt, overwrite)


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


def _chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _progress(enabled: bool, initial: int) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(unit="img", desc="predict", initial=initial, dynamic_ncols=True, smoothing=0.05)


def predict_rows(clf: Classifier, paths: Iterable[str], config: Optional[BatchConfig] = None) -> Iterator[list[Row]]:
    """Result rows for ``paths``, one list per batch, in input order.

    ``config.workers`` threads decode the next ``config.prefetch`` batches while the session
    runs the current one; an unreadable input becomes a row with ``error`` set. Closing the
    generator early stops the decoding threads.
    """
    cfg = config or BatchConfig()
    workers = cfg.workers or max(1, min(8, os.cpu_count() or 1))
    h, w = clf.image_size
    with ThreadPoolExecutor(workers, thread_name_prefix="coopkit-decode", initializer=_yield_to_session) as pool:
        try:
            for chunk, futures in _decode_ahead(iter(paths), clf.prepare, pool, cfg.batch_size, cfg.prefetch, workers):
                done = [d for f in futures for d in f.result()]
                errs = [d if isinstance(d, str) else None for d in done]
                crops = [d for d in done if not isinstance(d, str)]
                batch = np.stack(crops) if crops else np.zeros((0, h, w, 3), np.uint8)  # (n_ok, H, W, 3)
                classnames, outputs = clf.run_batch(batch, cfg.outputs)
                yield make_rows(chunk, errs, classnames, outputs, cfg.top_k, cfg.fields)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def predict_collection(
    model: Union[PathLike, Classifier],
    inputs: Union[PathLike, Iterable[str]],
    out: PathLike,
    config: Optional[BatchConfig] = None,
    *,
    progress: bool = True,
    device: str = "auto",
    threads: Optional[int] = None,
    **overrides: Any,
) -> Summary:
    """Label every input of ``inputs`` with ``model`` and write one row per input to ``out``.

    Args:
        model: An exported ``.onnx`` file or an open :class:`Classifier`.
        inputs: What :func:`iter_inputs` reads (folder, glob, list, CSV, Parquet), or any
            iterable of paths (consumed lazily).
        out: ``.parquet``, ``.jsonl`` or ``.csv``; an existing file of this kind is resumed
            (unless ``overwrite``).
        config: A :class:`BatchConfig`; keyword ``overrides`` replace its fields.
        progress: Show a tqdm bar with images/s (when tqdm is installed).
        device, threads: For opening ``model`` when it is a path.

    Returns:
        A :class:`Summary` of this run.

    Raises:
        FileNotFoundError: ``model``, ``inputs`` or ``out``'s folder does not exist.
        ValueError: bad settings, an unsupported input or output, or an ``out`` that holds
            rows of other inputs or columns.
    """
    cfg = dataclasses.replace(config or BatchConfig(), **overrides)
    source = iter_inputs(inputs, cfg.column) if isinstance(inputs, (str, os.PathLike)) else iter(inputs)
    check_out(out)
    clf = model if isinstance(model, Classifier) else Classifier(model, device=device, threads=threads,
                                                                  batch_size=cfg.batch_size)
    writer = open_writer(out, cfg.fields, overwrite=cfg.overwrite, flush_rows=cfg.flush_rows)
    bar = None
    start, rows, errors = time.perf_counter(), 0, 0
    try:
        todo = skip_done(source, writer)
        bar = _progress(progress, writer.done)
        for batch_rows in predict_rows(clf, todo, cfg):
            writer.write(batch_rows)
            rows += len(batch_rows)
            errors += sum(r["error"] is not None for r in batch_rows)
            if bar is not None:
                bar.update(len(batch_rows))
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    logger.info("wrote %d rows (%d errors) to %s in %.1f s", rows, errors, out, seconds)
    return Summary(rows, writer.done, errors, seconds, os.fspath(out))


def _try(prepare: Callable[[str], np.ndarray], path: str) -> Union[np.ndarray, str]:
    """A decoded crop, or the reason the input could not be decoded (never an exception)."""
    try:
        return prepare(path)
    except Exception as e:  # noqa: BLE001 - one bad input becomes its row's error, never the run's
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        known = isinstance(e, (ValueError, OSError))
        return message if known and message else f"{type(e).__name__}: {message or 'no message'} ({path})"


def _yield_to_session() -> None:
    """Run this decoding thread at a lower priority (Linux: per thread), so that on a CPU the
    session's threads get the cores first and decoding fills the time they leave: onnxruntime's
    parallel loops wait for their slowest thread, and a thread pushed aside by decoding stalls
    the whole run."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: decode at the same priority
        pass


def _decode_part(prepare: Callable[[str], np.ndarray], paths: list[str]) -> list[Union[np.ndarray, str]]:
    return [_try(prepare, p) for p in paths]


def _decode_ahead(
    paths: Iterator[str], prepare: Callable[[str], np.ndarray], pool: ThreadPoolExecutor, batch_size: int,
    prefetch: int, workers: int,
) -> Iterator[tuple[list[str], list[Future]]]:
    """Batches of paths with their decoding futures (one per slice of the batch, ``workers`` slices),
    at most ``prefetch`` batches submitted ahead of the one yielded."""
    window: deque[tuple[list[str], list[Future]]] = deque()
    for chunk in _chunked(paths, batch_size):
        step = -(-len(chunk) // workers)  # ceil: one slice per decoding thread
        window.append((chunk, [pool.submit(_decode_part, prepare, chunk[i : i + step])
                               for i in range(0, len(chunk), step)]))
        if len(window) > prefetch:
            yield window.popleft()
    while window:
        yield window.popleft()
