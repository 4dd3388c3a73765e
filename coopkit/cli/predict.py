"""``coopkit predict``: label images with an exported ONNX file (torch-free, via coopkit.runtime)."""

from __future__ import annotations

import json
from typing import Optional

import click

from .base import EXIT_BAD_INPUT, command


@command("predict")
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.argument("images", nargs=-1, required=True, type=str)
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1), help="Labels per image.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead of text.")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="auto: CUDA when it really works, else CPU.",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1), help="Images per graph run.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads (default: one per CPU that other processes leave idle).")
def predict(model: str, images: tuple[str, ...], top_k: int, as_json: bool, device: str, batch_size: int, threads: Optional[int]) -> None:
    """Label IMAGES with the exported MODEL (.onnx): one line per image, best label first.

    Unreadable images are reported on stderr (the others are still labelled) and make the
    exit code 2. Needs no torch: only the runtime (numpy, Pillow, onnxruntime) and click.
    """
    from ..runtime import Classifier

    clf = Classifier(model, device=device, threads=threads, batch_size=batch_size)
    failed = 0
    with clf:
        for result in clf.predict(list(images), top_k=top_k, errors="skip"):
            if not result.ok:
                failed += 1
                click.echo(f"Error: {result.error}", err=True)
                continue
            if as_json:
                click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
            else:
                labels = ", ".join(f"{label} ({prob:.3f})" for label, prob in zip(result.labels, result.probs))
                click.echo(f"{result.source}\t{labels}")
    if failed:
        raise click.exceptions.Exit(EXIT_BAD_INPUT)
