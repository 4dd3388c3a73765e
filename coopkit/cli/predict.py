"""``coopkit predict``: label images or whole collections with an exported ONNX file (torch-free).

Two forms:

* ``coopkit predict MODEL a.jpg b.jpg photos/`` prints one line per image (``--json``: one
  JSON object per line); folders and globs among the arguments are expanded.
* ``coopkit predict MODEL INPUT --out labels.parquet`` streams a folder, glob, list of paths,
  or CSV/Parquet table into a Parquet, JSONL or CSV file (resumable), locally or with
  ``--engine ray`` on a Ray cluster.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional

import click

from ..runtime.batch import BatchConfig
from ..runtime.engines import EngineConfig
from ..runtime.ray_engine import RayConfig
from .base import EXIT_BAD_INPUT, command, config_options, pop_config


def _expand(args: tuple[str, ...], column: str) -> Iterator[str]:
    """Arguments as image paths: folders and globs expanded, anything else taken as one image."""
    from ..runtime.inputs import iter_inputs

    for arg in args:
        if os.path.isdir(arg) or (any(c in arg for c in "*?[") and not os.path.exists(arg)):
            yield from iter_inputs(arg, column)
        else:
            yield arg


@command("predict")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.argument("inputs", nargs=-1, required=True, type=str)
@click.option("--out", default=None, type=str,
              help="Write one row per input to this .parquet, .jsonl or .csv file (streamed, resumable); "
                   "INPUT is then one folder, glob, list of paths (.txt) or CSV/Parquet table.")
@click.option("--engine", "executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: threads in this process; ray: Ray Data with a pool of classifier actors (needs --out).")
@config_options(RayConfig)
@config_options(BatchConfig)
@config_options(EngineConfig)
@click.option("--json", "as_json", is_flag=True, help="Without --out: one JSON object per line instead of text.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "gpu"]), default="auto", show_default=True,
              help="auto: CUDA when it really works, else CPU (with --runtime-engine auto: every device is measured); "
                   "gpu: OpenVINO's GPU.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads for onnxruntime (default: one per CPU that other processes leave idle).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="With --out: a progress bar with images/s.")
def predict(model: str, inputs: tuple[str, ...], out: Optional[str], executor: str, as_json: bool, device: str,
            threads: Optional[int], progress: bool, **kwargs: Any) -> None:
    """Label INPUTS with the exported MODEL (.onnx), best label first.

    Without --out: one line per image on stdout; unreadable images are reported on stderr (the
    others are still labelled) and make the exit code 2. With --out: one row per input in the
    file (unreadable ones with an error column; the exit code stays 0), and rerunning with the
    same --out resumes after the rows it holds. --runtime-engine picks what runs the graph (auto:
    measured once per file and machine); the engine used is named on stderr. Needs no torch.
    """
    cfg = pop_config(BatchConfig, kwargs)
    eng = pop_config(EngineConfig, kwargs)
    if out is None:
        if executor != "local":
            raise ValueError("--engine ray writes a file: give --out FILE.parquet")
        _to_stdout(model, inputs, cfg, eng, as_json, device, threads)
        return
    if len(inputs) != 1:
        raise ValueError(f"with --out, give one INPUT (a folder, glob, list of paths or table), got {len(inputs)}")
    if executor == "ray":
        from ..runtime.ray_engine import predict_ray

        summary = predict_ray(model, inputs[0], out, cfg, pop_config(RayConfig, kwargs), progress=progress,
                              engine=eng.engine, compute=eng.compute)
    else:
        from ..runtime.batch import predict_collection

        summary = predict_collection(model, inputs[0], out, cfg, progress=progress, device=device, threads=threads,
                                     engine=eng.engine, compute=eng.compute)
    resumed = f", {summary.skipped} already there" if summary.skipped else ""
    click.echo(f"wrote {summary.rows} rows ({summary.errors} unreadable{resumed}) to {out} in {summary.seconds:.1f} s "
               f"({summary.images_per_second:.1f} images/s)", err=True)
    if summary.engine is not None:
        click.echo(f"engine: {summary.engine.describe()}", err=True)


def _to_stdout(model: str, inputs: tuple[str, ...], cfg: Any, eng: EngineConfig, as_json: bool, device: str,
               threads: Optional[int]) -> None:
    from ..runtime import Classifier
    from ..runtime.batch import predict_rows

    clf = Classifier(model, device=device, threads=threads, batch_size=cfg.batch_size, engine=eng.engine,
                     compute=eng.compute)
    if eng.engine == "auto":  # what auto chose, once, before the answers
        click.echo(f"engine: {clf.engine.describe()}", err=True)
    failed = 0
    with clf:
        for rows in predict_rows(clf, _expand(inputs, cfg.column), cfg):
            for row in rows:
                if row["error"] is not None:
                    failed += 1
                    click.echo(f"Error: {row['error']}", err=True)
                elif as_json:  # the form `coopkit predict --json` always printed, plus any extra columns asked for
                    extra = {k: row[k] for k in ("logits", "embedding") if k in row}
                    click.echo(json.dumps({"source": row["path"], "labels": row["labels"], "probs": row["probs"], **extra},
                                          ensure_ascii=False))
                else:
                    labels = ", ".join(f"{label} ({prob:.3f})" for label, prob in zip(row["labels"], row["probs"]))
                    click.echo(f"{row['path']}\t{labels}")
    if failed:
        raise click.exceptions.Exit(EXIT_BAD_INPUT)
