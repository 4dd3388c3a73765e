"""The batch job of :mod:`coopkit.runtime.batch` on a Ray cluster (``coopkit predict ... --engine ray``).

Data flow: the driver lists the inputs (the same kinds, plus ``s3://`` / ``gs://`` / any
pyarrow filesystem URI) and puts them into Ray's object store, one block of paths per batch
-> Ray Data decodes and crops them in parallel **tasks** (:func:`decode_batch`, the runtime's
preprocessing) -> ``map_batches`` on a pool of :class:`ClassifierActor` (one GPU each when the
cluster has GPUs, CPU actors otherwise) -> rows stream back to the driver in input order and
are written by the same writer as the local engine (Parquet, JSONL or CSV; resumable).

Failures: an unreadable input is a row error, as locally. An actor that dies is replaced
(``max_restarts=-1``) and its batch retried once (``max_task_retries=1``); a batch that fails
again is dropped by Ray Data (``max_errored_blocks=-1``) and its inputs are written as failed
rows (the driver matches the results against the input order).

Ray is an optional extra (``pip install 'coopkit[ray]'``), imported when a job starts; this
module imports no torch.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from .batch import BatchConfig, Summary
from .classifier import Classifier, prepare_image
from .configbase import ConfigMixin, check_float, check_int
from .contract import ModelMetadata
from .engines import ONNXRUNTIME, EngineInfo, check_engine
from .extras import require
from .inputs import iter_inputs, paths_from_csv, paths_from_lines, paths_from_parquet
from .preprocess import MAX_PIXELS, is_image_file
from .session import ProviderSpec
from .writers import arrow_schema, check_out, error_row, make_rows, open_writer, skip_done

logger = logging.getLogger(__name__)

#: The error of rows whose batch made the actor die twice.
FAILED_BATCH = "failed: the classifier actor died on this batch twice (it was replaced and the batch retried once)"


@dataclass(frozen=True)
class RayConfig(ConfigMixin):
    """Where and how wide a Ray job runs (``coopkit predict ... --engine ray``)."""

    address: Optional[str] = field(default=None, metadata={
        "help": "Ray cluster to join (e.g. ray://head:10001 or auto); default: a local Ray instance on this machine."})
    actors: int = field(default=1, metadata={"help": "Classifier actors in the pool (one GPU each where there are GPUs)."})
    cpus_per_actor: float = field(default=1.0, metadata={
        "help": "CPUs reserved by each actor (fractions allowed; its onnxruntime threads on CPU, at least 1)."})
    decode_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved by each decoding task."})
    gpus_per_actor: Optional[float] = field(default=None, metadata={
        "help": "GPUs per actor (default: 1 when the cluster has GPUs, else 0)."})

    def __post_init__(self) -> None:
        check_int("actors", self.actors)
        for name in ("cpus_per_actor", "decode_cpus"):
            check_float(name, getattr(self, name), positive=True, maximum=1024)
        check_float("gpus_per_actor", self.gpus_per_actor, maximum=8, optional=True)


def _ray() -> Any:
    """``ray``, with its Data library (a separate extra of ray), or an error naming the ``ray`` extra."""
    require("ray.data", "ray", "--engine ray (Ray Data)")
    return require("ray", "ray", "--engine ray (Ray Data)")


# --- inputs at URIs ------------------------------------------------------------------------------


def _uri_inputs(uri: str, column: str) -> Iterator[str]:
    """:func:`~coopkit.runtime.inputs.iter_inputs` for a pyarrow filesystem URI (``s3://``, ``gs://``, ``file://``)."""
    from pyarrow import fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri)
    scheme = uri.split("://", 1)[0]
    base = uri.rsplit("/", 1)[0]
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {uri}")
    if info.type == pafs.FileType.Directory:
        found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        names = sorted(f.path for f in found if f.type == pafs.FileType.File and is_image_file(f.path))
        return (f"{scheme}://{name}" for name in names)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".parquet":
        return paths_from_parquet(filesystem.open_input_file(path), base, column)
    text = io.TextIOWrapper(filesystem.open_input_stream(path), encoding="utf-8", newline="")
    return paths_from_csv(text, base, column) if suffix == ".csv" else paths_from_lines(text, base)


def _read_bytes(path: str) -> Union[str, bytes]:
    if "://" not in path:
        return path
    from pyarrow import fs as pafs

    filesystem, inner = pafs.FileSystem.from_uri(path)
    with filesystem.open_input_file(inner) as f:
        return f.read()


# --- the two stages ------------------------------------------------------------------------------


def decode_batch(batch: dict[str, np.ndarray], metadata: str, max_pixels: int = MAX_PIXELS) -> dict[str, np.ndarray]:
    """Ray Data task: paths -> ``image`` crops uint8 ``(n, H, W, 3)`` and ``error`` (``""`` when readable).

    ``metadata`` is the model's :class:`ModelMetadata` as JSON (the decoding needs no session).
    An unreadable input gets a zero image and its error; nothing raises.
    """
    meta = ModelMetadata.from_json(metadata)
    h, w = meta.image_size
    paths = [str(p) for p in batch["path"]]
    images = np.zeros((len(paths), h, w, 3), np.uint8)  # (n, H, W, 3)
    errors = []
    for i, path in enumerate(paths):
        try:
            images[i] = prepare_image(_read_bytes(path), meta, max_pixels)
            errors.append("")
        except Exception as e:  # noqa: BLE001 - one bad input is its row's error, never the task's
            errors.append(str(e).strip().splitlines()[0] if str(e).strip() else f"{type(e).__name__} ({path})")
    return {"path": np.array(paths, dtype=object), "image": images, "error": np.array(errors, dtype=object)}


class ClassifierActor:
    """Ray Data actor: one :class:`Classifier` per actor, decoded batches in, output rows (Arrow) out.

    ``engine``, ``device``, ``compute`` and ``providers`` name a concrete engine (never ``auto``:
    :func:`predict_ray` chooses once, before the pool starts, and hands every actor the choice).
    """

    def __init__(self, model: str, config: BatchConfig, device: str = "cpu", threads: Optional[int] = None,
                 engine: str = ONNXRUNTIME, compute: str = "fp32",
                 providers: Optional[Sequence[ProviderSpec]] = None) -> None:
        if engine == "auto":
            raise ValueError("a ClassifierActor runs a concrete engine; predict_ray resolves engine='auto' once")
        self.clf = Classifier(model, device=device, threads=threads, batch_size=config.batch_size, workers=1,
                              engine=engine, compute=compute, providers=providers)
        self.config = config
        self.schema = arrow_schema(config.fields)

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        import pyarrow as pa

        paths = [str(p) for p in batch["path"]]
        errors = [str(e) or None for e in batch["error"]]
        ok = np.array([e is None for e in errors], dtype=bool)
        classnames, outputs = self.clf.run_batch(np.asarray(batch["image"])[ok], self.config.outputs)
        rows = make_rows(paths, errors, classnames, outputs, self.config.top_k, self.config.fields, self.clf.thresholds)
        return pa.Table.from_pylist(rows, schema=self.schema)


# --- the job -------------------------------------------------------------------------------------


def _stage(ray: Any, paths: Iterator[str], rows: int) -> list[Any]:
    """The inputs as object-store blocks of ``rows`` paths (the driver keeps only the references).

    One block per batch: a batch that kills its actor twice is dropped by Ray Data with its
    whole block, so the block is no larger than the batch.
    """
    import pyarrow as pa

    refs, chunk = [], []
    for path in paths:
        chunk.append(path)
        if len(chunk) == rows:
            refs.append(ray.put(pa.table({"path": chunk})))
            chunk = []
    if chunk:
        refs.append(ray.put(pa.table({"path": chunk})))
    return refs


def _staged_paths(ray: Any, refs: Sequence[Any]) -> Iterator[str]:
    for ref in refs:
        yield from ray.get(ref).column("path").to_pylist()


def _with_dropped(expected: Iterator[str], results: Iterator[dict[str, Any]], fields: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Rows in input order; inputs whose batch Ray Data dropped get a failed row (both streams are ordered)."""
    for row in results:
        for path in expected:
            if path == row["path"]:
                yield row
                break
            yield error_row(path, FAILED_BATCH, fields)
    for path in expected:
        yield error_row(path, FAILED_BATCH, fields)


def predict_ray(
    model: Union[str, "os.PathLike[str]"],
    inputs: Union[str, "os.PathLike[str]"],
    out: Union[str, "os.PathLike[str]"],
    config: Optional[BatchConfig] = None,
    ray_config: Optional[RayConfig] = None,
    *,
    progress: bool = True,
    actor: type = ClassifierActor,
    engine: str = ONNXRUNTIME,
    compute: str = "fp32",
    **overrides: Any,
) -> Summary:
    """:func:`~coopkit.runtime.batch.predict_collection` on Ray: same inputs, same rows, same resume.

    Args:
        model: The exported ``.onnx`` file; every actor opens it, so on a multi-node cluster it
            must be at this path on every node (shared storage).
        inputs: A folder, glob, list of paths or CSV/Parquet table, or a URI of a folder or
            table on a filesystem pyarrow reads (``s3://``, ``gs://``, ``file://``).
        out: ``.parquet``, ``.jsonl`` or ``.csv`` on the driver (resumed like the local engine's).
        config: The :class:`BatchConfig` (``overrides`` replace its fields).
        ray_config: The :class:`RayConfig` (cluster address, pool size, GPUs).
        progress: Ray Data's progress bars.
        actor: The actor class of the pool: :class:`ClassifierActor` or a subclass of it.
        engine, compute: What runs the graph in the actors (see :class:`Classifier`). The file is
            opened once with them in a Ray task holding one actor's resources, before the pool
            starts: ``auto`` measures there, on the hardware the actors get and with nothing
            else running, and every actor opens the engine it chose without measuring (a pool
            measuring at once would measure its own contention). The summary's ``engine`` says
            what the actors run.

    Raises:
        ImportError: Ray Data is not installed.
    """
    cfg = dataclasses.replace(config or BatchConfig(), **overrides)
    rcfg = ray_config or RayConfig()
    check_engine(engine, compute)
    ray = _ray()
    text = os.fspath(inputs)
    source = _uri_inputs(text, cfg.column) if "://" in text else iter_inputs(text, cfg.column)
    check_out(out)
    model = os.path.abspath(os.fspath(model))
    with Classifier(model, device="cpu", threads=1) as probe:  # fails here, with the runtime's message, for a bad file
        metadata = probe.metadata.to_json()
        max_pixels = probe.max_pixels
    writer = open_writer(out, cfg.fields, overwrite=cfg.overwrite, flush_rows=cfg.flush_rows)
    started = not ray.is_initialized()
    start, rows, errors = time.perf_counter(), 0, 0
    info: Optional[EngineInfo] = None
    try:
        todo = skip_done(source, writer)
        if started:
            ray.init(address=rcfg.address, num_cpus=None if rcfg.address else os.cpu_count(), include_dashboard=False,
                     log_to_driver=False, configure_logging=False)
        refs = _stage(ray, todo, cfg.batch_size)
        if refs:
            gpus = _actor_gpus(ray, rcfg)
            info = _open_once(ray, model, cfg, rcfg, gpus, engine, compute)
            logger.info("ray: the actors run %s", info.describe())
            results = _run(ray, refs, model, metadata, max_pixels, cfg, rcfg, progress, actor, gpus, info)
            pending: list[dict[str, Any]] = []
            for row in _with_dropped(_staged_paths(ray, refs), results, cfg.fields):
                pending.append(row)
                errors += row["error"] is not None
                if len(pending) == cfg.batch_size:
                    writer.write(pending)
                    rows, pending = rows + len(pending), []
            writer.write(pending)
            rows += len(pending)
    finally:
        writer.close()
        if started and ray.is_initialized():
            ray.shutdown()
    seconds = time.perf_counter() - start
    logger.info("ray: wrote %d rows (%d errors) to %s in %.1f s", rows, errors, out, seconds)
    return Summary(rows, writer.done, errors, seconds, os.fspath(out), info)


def _actor_gpus(ray: Any, rcfg: RayConfig) -> float:
    """GPUs per actor (1 where the cluster has GPUs unless set); a ValueError when the pool cannot fit."""
    resources = ray.cluster_resources()
    gpus = rcfg.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    cpus = resources.get("CPU", 0)
    if rcfg.actors * rcfg.cpus_per_actor + rcfg.decode_cpus > cpus:  # the job would wait forever
        raise ValueError(
            f"{rcfg.actors} actors x {rcfg.cpus_per_actor:g} CPU plus {rcfg.decode_cpus:g} CPU for decoding need more "
            f"than the cluster's {cpus:g} CPUs; use fewer --actors or a smaller --cpus-per-actor (fractions work)"
        )
    return gpus


def actor_device(engine: str, gpus: float) -> str:
    """The ``device`` the actors open the file on: the CPU without GPUs; with GPUs, CUDA for
    onnxruntime, every device for ``auto``, the CPU for OpenVINO (whose GPU plugin drives Intel
    GPUs, which Ray does not count as GPUs)."""
    if gpus <= 0:
        return "cpu"
    return {ONNXRUNTIME: "cuda", "auto": "auto"}.get(engine, "cpu")


def open_engine_once(model: str, config: BatchConfig, device: str, threads: int, engine: str,
                     compute: str) -> EngineInfo:
    """Ray task: open ``model`` as an actor would (``auto`` measures here) and return its engine."""
    with Classifier(model, device=device, threads=threads, batch_size=config.batch_size, workers=1,
                    engine=engine, compute=compute) as clf:
        return clf.engine


def _open_once(ray: Any, model: str, cfg: BatchConfig, rcfg: RayConfig, gpus: float, engine: str,
               compute: str) -> EngineInfo:
    """:func:`open_engine_once` with one actor's resources; its exception, not Ray's wrapper, on failure."""
    task = ray.remote(num_cpus=rcfg.cpus_per_actor, num_gpus=gpus, max_retries=0)(open_engine_once)
    try:
        return ray.get(task.remote(model, cfg, actor_device(engine, gpus), _actor_threads(rcfg), engine, compute))
    except ray.exceptions.RayTaskError as e:
        raise e.cause from None


def _actor_threads(rcfg: RayConfig) -> int:
    return max(1, round(rcfg.cpus_per_actor))


def _run(ray: Any, refs: list[Any], model: str, metadata: str, max_pixels: int, cfg: BatchConfig, rcfg: RayConfig,
         progress: bool, actor: type, gpus: float, info: EngineInfo) -> Iterator[dict[str, Any]]:
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in input order (resume relies on it)
    ctx.max_errored_blocks = -1  # a batch that killed its actor twice is dropped, and written as failed rows
    ctx.enable_progress_bars = progress
    ds = ray.data.from_arrow_refs(refs)
    ds = ds.map_batches(decode_batch, batch_size=cfg.batch_size, batch_format="numpy", num_cpus=rcfg.decode_cpus,
                        fn_kwargs={"metadata": metadata, "max_pixels": max_pixels})
    ds = ds.map_batches(
        actor,  # every actor opens the engine chosen once (info.reopen: engine, device, compute/providers)
        fn_constructor_kwargs={"model": model, "config": cfg, "threads": _actor_threads(rcfg), **info.reopen},
        batch_size=cfg.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(
            size=rcfg.actors, max_tasks_in_flight_per_actor=1),  # a dying actor takes only its own batch down
        num_cpus=rcfg.cpus_per_actor, num_gpus=gpus,
        # a dead actor is replaced and its batch retried once (Ray Data's default retries forever)
        max_restarts=-1, max_task_retries=1,
    )
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from batch.to_pylist()
