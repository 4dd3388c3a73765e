"""``coopkit export``: bake a saved run (CoOp or zero-shot) into one verified ONNX file."""

from __future__ import annotations

import json
import os
from typing import Optional

import click

from ..exporters.preprocess import RAW_INPUT_OPSET
from ..exporters.trace import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET
from ..runtime.contract import PRECISIONS
from .base import command, pct, print_table

DEFAULT_FILE = "model.onnx"


def output_file(out: str) -> str:
    """``--out``: a file, or a folder (existing, or written with a trailing ``/``) that gets :data:`DEFAULT_FILE`."""
    if out.endswith(("/", os.sep)) or os.path.isdir(out):
        return os.path.join(out, DEFAULT_FILE)
    return out


@command("export")
@click.argument("run_dir", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(),
              help=f"The .onnx file to write; a folder (an existing one, or a path ending in /) gets {DEFAULT_FILE}.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="fp32; fp16 (GPU: fp32 inputs, outputs and sensitive ops); int8 (CPU: static quantisation, "
                   "calibrated; an image's answer does not depend on its batch).")
@click.option("--opset", type=click.IntRange(MIN_OPSET, MAX_OPSET), default=None,
              help=f"ONNX opset [default: {DEFAULT_OPSET}; {RAW_INPUT_OPSET} with --raw-input, which needs it].")
@click.option("--raw-input", is_flag=True,
              help="The file takes decoded RGB images of any size and resizes and crops them itself, as open_clip "
                   "does (clients only decode); verified against the Pillow path on images of many sizes.")
@click.option("--triton", "triton_repo", type=click.Path(file_okay=False), default=None,
              help="Also write a Triton Inference Server model repository here.")
@click.option("--triton-name", default=None, help="Model name in the Triton repository (default: the file's stem).")
@click.option("--max-batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Triton's max_batch_size.")
@click.option("--with-text-encoder", is_flag=True,
              help="Also export the text tower with the learned context (new class names at run time; "
                   "unified-context and zero-shot runs only).")
@click.option("--verify-data", type=click.Path(), default=None,
              help="Labelled images (ImageFolder, CSV or CoOp split) to verify on as well; int8 must agree "
                   "on 99% of the clear calls and, from 100 images on, stay within 1 accuracy point.")
@click.option("--calibration", type=click.Path(), default=None,
              help="int8: images to calibrate activation ranges on (a folder of images, an ImageFolder, CSV or "
                   "CoOp split); default: the run's own training images, found where the run recorded them.")
@click.option("--device", default="cpu", show_default=True, help="Where to load the run for tracing: cpu or cuda.")
@click.option("--pretrained", default=None, help="Override the checkpoint path recorded in the run.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export(run_dir: str, out: str, precision: str, opset: Optional[int], raw_input: bool, triton_repo: Optional[str],
           triton_name: Optional[str], max_batch_size: int, with_text_encoder: bool, verify_data: Optional[str],
           calibration: Optional[str], device: str, pretrained: Optional[str], as_json: bool) -> None:
    """Export the run in RUN_DIR (fit or zeroshot --out) as one ONNX file, proven equal to PyTorch."""
    from ..classifier import load
    from ..exporters import export_onnx, write_triton_repository
    from ..exporters.io import check_target

    out = check_target(output_file(out))  # before the run is loaded and traced
    clf = load(run_dir, device=device, pretrained=pretrained)
    result = export_onnx(clf, out, precision, opset=opset, raw_input=raw_input, with_text_encoder=with_text_encoder,
                         verify_data=verify_data, calibration=calibration)
    triton_dir = None
    if triton_repo:
        triton_dir = write_triton_repository(result.path, triton_repo, triton_name, max_batch_size=max_batch_size)
    c = result.checks
    summary = {
        "file": str(result.path),
        "precision": precision,
        "classes": len(result.metadata.classnames),
        "size_mb": f"{result.size_bytes / 1e6:.2f}",
        "seconds": f"{result.seconds:.2f}",
        "max_abs_logit_diff": c["max_abs_logit_diff"],
        "top1_agreement": c["top1_agreement"],
        "verified_images": c["n_images"],
        "input": result.metadata.input_kind,
        "raw_verified_images": c.get("raw_n_images"),
        "raw_max_pixel_diff": c.get("raw_max_pixel_diff"),
        "raw_max_abs_logit_diff": c.get("raw_max_abs_logit_diff"),
        "raw_top1_agreement": c.get("raw_top1_agreement"),
        "text_encoder": str(result.text_path) if result.text_path else None,
        "text_max_abs_diff": c.get("text_max_abs_diff"),
        "accuracy_torch": c.get("accuracy_torch"),
        "accuracy_onnx": c.get("accuracy_onnx"),
        "batch_invariance_max_diff": c.get("batch_invariance_max_diff"),
        "calibration_images": c.get("calibration_images"),
        "external_data": result.external_data,
        "sidecar": str(result.sidecar) if result.sidecar else None,
        "triton": str(triton_dir) if triton_dir else None,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    rows = []
    for key, value in summary.items():
        if value is None:
            continue
        if key in ("max_abs_logit_diff", "text_max_abs_diff", "raw_max_abs_logit_diff", "batch_invariance_max_diff"):
            value = f"{value:.3g}"
        elif key in ("top1_agreement", "accuracy_torch", "accuracy_onnx", "raw_top1_agreement"):
            value = pct(value)
        rows.append((key, value))
    print_table(rows)
