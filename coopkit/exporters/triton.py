"""A Triton Inference Server model repository for an exported coopkit graph.

Layout written (``<repo>/<name>/`` replaces any previous model of that name as a whole)::

    <repo>/<name>/config.pbtxt     platform onnxruntime_onnx, dynamic batching, the graph's I/O
    <repo>/<name>/labels.txt       class names, one per line (Triton's classification extension)
    <repo>/<name>/1/model.onnx     the graph (and its external data file, if any)

A raw-input file (``export --raw-input``) declares ``images`` as ``[-1, -1, 3]``; Triton's
dynamic batcher groups requests of one shape. One that resizes bicubic is pinned to the CPU
(``instance_group KIND_CPU``, with a warning): onnxruntime's CUDA kernel for that resize is
wrong (onnxruntime issue 25264), and unlike ``coopkit.runtime`` Triton has no Pillow to fall back on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

logger = logging.getLogger(__name__)

_TRITON_TYPES = {
    "UINT8": "TYPE_UINT8",
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "INT64": "TYPE_INT64",
    "INT32": "TYPE_INT32",
}
LABELS_FILE = "labels.txt"


def _sanitise(name: str) -> str:
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    return clean or "coopkit"


def _io(values: Any) -> list[dict[str, Any]]:
    """Name, Triton type and non-batch dims of graph inputs/outputs."""
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        elem = onnx.TensorProto.DataType.Name(t.elem_type)
        if elem not in _TRITON_TYPES:
            raise ValueError(f"graph tensor {v.name!r} has type {elem}, which this writer does not map to Triton")
        out.append({"name": v.name, "data_type": _TRITON_TYPES[elem], "dims": dims[1:]})
    return out


def _config_text(name: str, max_batch_size: int, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                 max_queue_delay_us: int, n_classes: int) -> str:
    def block(entry: dict[str, Any], labels: bool) -> str:
        lines = [
            "  {",
            f"    name: {json.dumps(entry['name'])}",
            f"    data_type: {entry['data_type']}",
            f"    dims: [ {', '.join(str(d) for d in entry['dims'])} ]",
        ]
        if labels:
            lines.append(f"    label_filename: {json.dumps(LABELS_FILE)}")
        lines.append("  }")
        return "\n".join(lines)

    def with_labels(entry: dict[str, Any]) -> bool:
        return entry["name"] in ("logits", "probs") and entry["dims"] == [n_classes]

    parts = [
        f"name: {json.dumps(name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(block(e, False) for e in inputs) + "\n]",
        "output [\n" + ",\n".join(block(e, with_labels(e)) for e in outputs) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
    ]
    return "\n".join(parts) + "\n"


def write_triton_repository(
    model_path: Union[str, os.PathLike],
    repo_dir: Union[str, os.PathLike],
    name: Optional[str] = None,
    *,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 100,
) -> Path:
    """Write (or replace) ``<repo_dir>/<name>/`` for the exported graph at ``model_path``.

    Args:
        model_path: A file written by :func:`coopkit.exporters.export_onnx`.
        repo_dir: The Triton model repository (created if missing; other models are untouched).
        name: Model name in Triton (default: the file's stem, e.g. ``model``).
        max_batch_size: Largest batch Triton forms (the graph's batch axis is dynamic).
        max_queue_delay_us: How long Triton waits to fill a batch.

    Returns:
        The model's folder ``<repo_dir>/<name>``.

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
        ValueError: bad settings, not a coopkit graph, or an unwritable repository.
    """
    import onnx

    from coopkit.runtime.contract import INPUT_RAW, ModelMetadata
    from coopkit.runtime.image import resizes_in_graph
    from coopkit.runtime.session import CUDA

    src = Path(model_path)
    if not src.is_file():
        raise FileNotFoundError(f"model file not found: {src}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    if max_queue_delay_us < 0:
        raise ValueError(f"max_queue_delay_us must be >= 0, got {max_queue_delay_us!r}")
    model = onnx.load(os.fspath(src), load_external_data=False)
    meta = ModelMetadata.from_props({p.key: p.value for p in model.metadata_props})
    data_files = sorted(
        {
            entry.value
            for init in model.graph.initializer
            if init.data_location == onnx.TensorProto.EXTERNAL
            for entry in init.external_data
            if entry.key == "location"
        }
    )
    inputs, outputs = _io(model.graph.input), _io(model.graph.output)
    model_name = _sanitise(name if name is not None else (src.name[:-5] if src.name.endswith(".onnx") else src.stem))
    config = _config_text(model_name, max_batch_size, inputs, outputs, max_queue_delay_us, len(meta.classnames))
    if meta.input_kind == INPUT_RAW and not resizes_in_graph(meta, CUDA):  # the runtime crops with Pillow there
        config += "instance_group [\n  {\n    kind: KIND_CPU\n  }\n]\n"
        logger.warning("%s: onnxruntime's CUDA resize is wrong for this raw-input file (onnxruntime issue 25264): "
                       "the Triton model runs on the CPU (instance_group KIND_CPU); to serve it on a GPU with Triton, "
                       "export without --raw-input", src.name)

    repo = Path(repo_dir).expanduser()
    if repo.exists() and not repo.is_dir():
        raise ValueError(f"Triton repository {repo} exists and is not a folder")
    final = repo / model_name
    try:
        repo.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{model_name}.", dir=repo))
    except PermissionError:
        raise ValueError(f"cannot write the Triton repository {repo}: permission denied") from None
    old: Optional[Path] = None
    try:
        (tmp / "1").mkdir()
        shutil.copyfile(src, tmp / "1" / "model.onnx")
        for data in data_files:
            shutil.copyfile(src.parent / data, tmp / "1" / data)
        (tmp / LABELS_FILE).write_text("".join(c.replace("\n", " ") + "\n" for c in meta.classnames), encoding="utf-8")
        (tmp / "config.pbtxt").write_text(config, encoding="utf-8")
        os.chmod(tmp, 0o755)
        if final.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside
            old = Path(tempfile.mkdtemp(prefix=f".{model_name}.old.", dir=repo))
            os.replace(final, old / model_name)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None and not final.exists():
                os.replace(old / model_name, final)  # put the previous model back
            raise
    except PermissionError:
        raise ValueError(f"cannot write the Triton repository {repo}: permission denied") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote Triton model %s (%d classes, max batch %d)", final, len(meta.classnames), max_batch_size)
    return final
