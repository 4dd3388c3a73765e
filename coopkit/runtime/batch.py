"""Label a whole collection: streaming, bounded memory, decoding overlapped with inference, resumable.

>>> from coopkit.runtime.batch import predict_collection
>>> predict_collection("model.onnx", "photos/", "labels.parquet")   # doctest: +SKIP
Summary(rows=120000, skipped=0, errors=3, seconds=...)

The run: inputs (:mod:`~coopkit.runtime.inputs`: a folder, glob, list or table, read lazily)
-> a pool of ``workers`` threads decodes and crops the next ``prefetch`` batches while the
session runs the current one (Pillow and onnxruntime release the GIL) -> result rows, written
in input order by a resumable writer (:mod:`~coopkit.runtime.writers`: Parquet, JSONL or CSV;
rerunning with the same ``out`` skips the rows it holds and appends the rest).

**Memory bound**: at most ``(prefetch + 1) * batch_size`` inputs are in flight (decoded crops
of ``H x W x 3`` bytes each, plus their paths), ``workers`` images are being decoded at full
size (each at most ``max_pixels``), and at most ``flush_rows`` result rows wait to be written
(Parquet; JSONL and CSV are written after every batch). A folder is listed one directory at a
time, so the largest single directory's names are held while it is walked (for a stable order).
Nothing grows with the number of inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np

from .classifier import Classifier
from .configbase import ConfigMixin, check_bool, check_int, check_text
from .engines import EngineInfo, check_engine
from .inputs import PathLike, iter_inputs
from .progress import progress_bar
from .session import default_workers
from .writers import BASE_FIELDS, Row, check_out, make_rows, open_writer, skip_done

logger = logging.getLogger(__name__)

#: How much lower decoding threads run than the session's (``nice`` steps; Linux only).
DECODE_NICENESS = 5


@dataclass(frozen=True)
class BatchConfig(ConfigMixin):
    """How a collection is labelled (``coopkit predict MODEL INPUT --out FILE``)."""

    top_k: int = field(default=5, metadata={
        "help": "Labels (and probabilities) per image (a multi-label file: every label at or above its threshold)."})
    batch_size: int = field(default=32, metadata={"help": "Images per session run."})
    workers: Optional[int] = field(default=None, metadata={
        "help": "Threads decoding images while the session runs (default: one per usable CPU, at most 8)."})
    prefetch: int = field(default=2, metadata={"help": "Batches decoded ahead of the one running (memory bound)."})
    embedding: bool = field(default=False, metadata={"help": "Also write each image's L2-normalised embedding."})
    logits: bool = field(default=False, metadata={"help": "Also write all classes' logits (fp32)."})
    column: str = field(default="path", metadata={"help": "Path column of a CSV or Parquet INPUT."})
    overwrite: bool = field(default=False, metadata={
        "help": "Start OUT afresh instead of resuming after the rows it already holds."})
    flush_rows: int = field(default=4096, metadata={"help": "Parquet rows per part file (work lost to a kill -9)."})

    def __post_init__(self) -> None:
        for name in ("top_k", "batch_size", "prefetch", "flush_rows"):
            check_int(name, getattr(self, name))
        check_int("workers", self.workers, optional=True, hint="one per usable CPU, at most 8")
        for name in ("embedding", "logits", "overwrite"):
            check_bool(name, getattr(self, name))
        check_text("column", self.column, "a non-empty column name")

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
    """What a run did: rows written now, rows found already written (skipped), rows with an error,
    and the engine that ran the graph (``engine.choice``: ``auto``'s figures, when it chose)."""

    rows: int
    skipped: int
    errors: int
    seconds: float
    out: str = ""
    engine: Optional[EngineInfo] = None

    @property
    def images_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


# --- the run -------------------------------------------------------------------------------------


def _chunked(items: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def predict_rows(clf: Classifier, paths: Iterable[str], config: Optional[BatchConfig] = None) -> Iterator[list[Row]]:
    """Result rows for ``paths``, one list per batch, in input order.

    ``config.workers`` threads decode the next ``config.prefetch`` batches while the session
    runs the current one; an unreadable input becomes a row with ``error`` set. Closing the
    generator early stops the decoding threads.
    """
    cfg = config or BatchConfig()
    workers = cfg.workers or default_workers()
    h, w = clf.image_size
    with ThreadPoolExecutor(workers, thread_name_prefix="coopkit-decode", initializer=_yield_to_session) as pool:
        try:
            for chunk, futures in _decode_ahead(iter(paths), clf.prepare, pool, cfg.batch_size, cfg.prefetch, workers):
                done = [d for f in futures for d in f.result()]
                errs = [d if isinstance(d, str) else None for d in done]
                crops = [d for d in done if not isinstance(d, str)]
                batch = np.stack(crops) if crops else np.zeros((0, h, w, 3), np.uint8)  # (n_ok, H, W, 3)
                classnames, outputs = clf.run_batch(batch, cfg.outputs)
                yield make_rows(chunk, errs, classnames, outputs, cfg.top_k, cfg.fields, clf.thresholds)
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
    engine: str = "onnxruntime",
    compute: str = "fp32",
    **overrides: Any,
) -> Summary:
    """Label every input of ``inputs`` with ``model`` and write one row per input to ``out``.

    Args:
        model: An exported ``.onnx`` file or an open :class:`Classifier`.
        inputs: What :func:`~coopkit.runtime.inputs.iter_inputs` reads (folder, glob, list, CSV, Parquet), or any
            iterable of paths (consumed lazily).
        out: ``.parquet``, ``.jsonl`` or ``.csv``; an existing file of this kind is resumed
            (unless ``overwrite``).
        config: A :class:`BatchConfig`; keyword ``overrides`` replace its fields.
        progress: Show a progress bar with images/s (:func:`~coopkit.runtime.progress.progress_bar`:
            redrawn in a terminal, a line every few seconds in a log).
        device, threads, engine, compute: For opening ``model`` when it is a path (see
            :class:`Classifier`; ``engine="auto"`` measures at ``batch_size``).

    Returns:
        A :class:`Summary` of this run.

    Raises:
        FileNotFoundError: ``model``, ``inputs`` or ``out``'s folder does not exist.
        ValueError: bad settings, an unsupported input or output, or an ``out`` that holds
            rows of other inputs or columns.
    """
    cfg = dataclasses.replace(config or BatchConfig(), **overrides)
    check_engine(engine, compute)
    source = iter_inputs(inputs, cfg.column) if isinstance(inputs, (str, os.PathLike)) else iter(inputs)
    check_out(out)
    clf = model if isinstance(model, Classifier) else Classifier(model, device=device, threads=threads,
                                                                  batch_size=cfg.batch_size, engine=engine,
                                                                  compute=compute)
    writer = open_writer(out, cfg.fields, overwrite=cfg.overwrite, flush_rows=cfg.flush_rows)
    bar = None
    start, rows, errors = time.perf_counter(), 0, 0
    try:
        todo = skip_done(source, writer)
        bar = progress_bar(desc="predict", unit="img", initial=writer.done, enabled=progress)
        for batch_rows in predict_rows(clf, todo, cfg):
            writer.write(batch_rows)
            rows += len(batch_rows)
            errors += sum(r["error"] is not None for r in batch_rows)
            bar.update(len(batch_rows))
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    logger.info("wrote %d rows (%d errors) to %s in %.1f s", rows, errors, out, seconds)
    return Summary(rows, writer.done, errors, seconds, os.fspath(out), clf.engine)


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
