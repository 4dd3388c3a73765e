"""``coopkit export``: bake a saved run (CoOp or zero-shot) into one verified ONNX file."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import click

from ..exporters.config import ExportConfig, QuantizationConfig
from .base import command, config_options, pct, pop_config, print_table

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
@config_options(ExportConfig, exclude=("int8",))
@config_options(QuantizationConfig, exclude=("smooth_alphas",))
@click.option("--triton", "triton_repo", type=click.Path(file_okay=False), default=None,
              help="Also write a Triton Inference Server model repository here.")
@click.option("--triton-name", default=None, help="Model name in the Triton repository (default: the file's stem).")
@click.option("--max-batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Triton's max_batch_size.")
@click.option("--device", default="cpu", show_default=True, help="Where to load the run for tracing: cpu or cuda.")
@click.option("--pretrained", default=None, help="Override the checkpoint path recorded in the run.")
@click.option("--merged-weights", "merged_weights", type=click.Path(), default=None,
              help="Also write the run's merged weights here: the backbone with what the method trained merged "
                   "in, a safetensors file open_clip loads as a checkpoint (methods with merged weights only).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def export(run_dir: str, out: str, triton_repo: Optional[str], triton_name: Optional[str], max_batch_size: int,
           device: str, pretrained: Optional[str], merged_weights: Optional[str], as_json: bool,
           **settings: Any) -> None:
    """Export the run in RUN_DIR (fit or zeroshot --out) as one ONNX file, proven equal to PyTorch."""
    from ..classifier import load
    from ..exporters import export_onnx, write_triton_repository
    from ..exporters.io import check_target

    settings["int8"] = pop_config(QuantizationConfig, settings)
    config = pop_config(ExportConfig, settings)  # checked before the run is loaded and traced
    out = check_target(output_file(out))
    merged_path = check_target(merged_weights) if merged_weights is not None else None
    clf = load(run_dir, device=device, pretrained=pretrained)
    if merged_path is not None:  # first: a run without merged weights is refused before tracing
        merged_path = clf.save_merged_weights(merged_path)
    report = export_onnx(clf, out, config=config)
    triton_dir = None
    if triton_repo:
        triton_dir = write_triton_repository(report.path, triton_repo, triton_name, max_batch_size=max_batch_size)
    image, raw, text = report.image, report.raw, report.text
    summary = {
        "file": str(report.path),
        "precision": report.precision,
        "classes": len(report.metadata.classnames),
        "size_mb": f"{report.size_bytes / 1e6:.2f}",
        "seconds": f"{report.seconds:.2f}",
        "max_abs_logit_diff": image.max_abs_logit_diff,
        "top1_agreement": image.top1_agreement if image.label_agreement is None else None,
        "task": report.metadata.task,
        "label_agreement": image.label_agreement,
        "verified_images": image.n_images,
        "input": report.metadata.input_kind,
        "raw_verified_images": raw.n_images if raw else None,
        "raw_max_pixel_diff": raw.max_pixel_diff if raw else None,
        "raw_max_abs_logit_diff": raw.max_abs_logit_diff if raw else None,
        "raw_top1_agreement": raw.top1_agreement if raw else None,
        "text_encoder": str(report.text_path) if report.text_path else None,
        "text_max_abs_diff": text.max_abs_diff if text else None,
        "accuracy_torch": image.accuracy_torch,
        "accuracy_onnx": image.accuracy_onnx,
        "batch_invariance_max_diff": image.batch_invariance_max_diff,
        "calibration_images": report.int8.calibration_images if report.int8 else None,
        "int8_products": report.int8.nodes if report.int8 else None,
        "int8_products_kept_fp32": len(report.int8.float_nodes) if report.int8 else None,
        "int8_convolutions": report.int8.convolutions if report.int8 else None,
        "calibration_agreement": report.int8.agreement[0] if report.int8 and report.int8.agreement else None,
        "external_data": report.external_data,
        "sidecar": str(report.sidecar) if report.sidecar else None,
        "triton": str(triton_dir) if triton_dir else None,
        "merged_weights": str(merged_path) if merged_path else None,
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
        elif key in ("top1_agreement", "label_agreement", "accuracy_torch", "accuracy_onnx", "raw_top1_agreement",
                     "calibration_agreement"):
            value = pct(value)
        rows.append((key, value))
    print_table(rows)
