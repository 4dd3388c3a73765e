"""The inputs of a collection run: which image paths a folder, glob, list or table names.

:func:`iter_inputs` reads a folder (recursive, sorted, image extensions only), a glob
(``photos/**/*.jpg``, sorted), a text file of paths (one per line, ``#`` comments), or a
``.csv`` / ``.parquet`` file with a path column. Relative paths in a list file are relative to
the list's folder. Inputs are read lazily, never listed whole: a folder is listed one directory
at a time, so the largest single directory's names are held while it is walked (for a stable
order). The readers of open files (:func:`paths_from_lines`, :func:`paths_from_csv`,
:func:`paths_from_parquet`) also serve the Ray engine's remote inputs.
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

from .extras import require
from .preprocess import is_image_file

logger = logging.getLogger(__name__)

LIST_SUFFIXES = (".txt", ".lst", ".list")
TABLE_SUFFIXES = (".csv", ".parquet")

PathLike = Union[str, "os.PathLike[str]"]


def pyarrow_parquet() -> Any:
    """``pyarrow.parquet``, or a :class:`~coopkit.runtime.extras.MissingExtraError` naming the ``parquet`` extra."""
    return require("pyarrow.parquet", "parquet", "Parquet input or output")


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
    for batch in pyarrow_parquet().ParquetFile(source).iter_batches(columns=[column], batch_size=4096):
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
            header = list(pyarrow_parquet().ParquetFile(path).schema_arrow.names)
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

