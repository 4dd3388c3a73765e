"""A Triton Inference Server model repository for an exported coopkit graph.

Layout written (each model folder replaces any previous one of that name as a whole)::

    <repo>/<name>/config.pbtxt                 platform onnxruntime_onnx, dynamic batching, the graph's I/O
    <repo>/<name>/labels.txt                   class names, one per line (Triton's classification extension)
    <repo>/<name>/thresholds.txt               multi-label files: each label's threshold, one per line
    <repo>/<name>/1/model.onnx                 the graph (and its external data file, if any)
    <repo>/<name>_preprocess/config.pbtxt      backend python, dynamic batching: IMAGE_BYTES -> images
    <repo>/<name>_preprocess/metadata.json     the file's metadata (resize, crop, image size)
    <repo>/<name>_preprocess/1/model.py        coopkit.runtime.triton_model (the runtime's preprocessing)
    <repo>/<name>_ensemble/config.pbtxt        platform ensemble: encoded bytes -> preprocess -> graph
    <repo>/<name>_ensemble/1/                  (empty: Triton wants a version folder)

A client sends JPEG or PNG bytes (``TYPE_STRING``, ``dims [1]``) to ``<name>_ensemble`` and
gets ``logits``, ``probs`` and ``image_embeds``; or uint8 crops straight to ``<name>``. The
Python backend needs ``pip install coopkit`` (torch-free) in Triton's Python environment.

A raw-input file (``export --raw-input``) declares ``images`` as ``[-1, -1, 3]``; Triton's
dynamic batcher groups requests of one shape. One that resizes bicubic is pinned to the CPU
(``instance_group KIND_CPU``, with a warning): onnxruntime's CUDA kernel for that resize is
wrong (onnxruntime issue 25264), and unlike ``coopkit.runtime`` Triton has no Pillow to fall back on.
The ensemble's preprocessing step always sends Pillow's crops (``[H, W, 3]``), so every request
batches with every other, and a raw-input graph's own resize then meets images already at its size.

A multi-label file (DualCoOp and the multi-label baselines) is served the same way: its ``probs``
are each label's own probability (sigmoid). The graph's and the ensemble's configs say so in their
``parameters`` (``coopkit_task``: ``multilabel``; ``coopkit_thresholds``: the per-label thresholds
as a JSON list), and ``thresholds.txt`` lists them beside ``labels.txt``, line for line: a client
takes the labels whose probability reaches their threshold (as
:func:`coopkit.runtime.results.rank` does with ``thresholds``). Triton's classification extension
still ranks ``probs`` by value; its top-k is not that decision.
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
THRESHOLDS_FILE = "thresholds.txt"


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


def _block(entry: dict[str, Any], labels: bool) -> str:
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


def _with_labels(entry: dict[str, Any], n_classes: int) -> bool:
    return entry["name"] in ("logits", "probs") and entry["dims"] == [n_classes]


def _parameters(meta: Any) -> list[str]:
    """A multi-label file's task and thresholds as Triton model parameters (none for a single-label file)."""
    if not meta.multilabel:
        return []
    values = {"coopkit_task": meta.task, "coopkit_thresholds": json.dumps(meta.thresholds)}
    return [f"parameters {{\n  key: {json.dumps(k)}\n  value {{\n    string_value: {json.dumps(v)}\n  }}\n}}"
            for k, v in values.items()]


def _config_text(name: str, max_batch_size: int, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                 max_queue_delay_us: int, n_classes: int) -> str:
    parts = [
        f"name: {json.dumps(name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + ",\n".join(_block(e, False) for e in inputs) + "\n]",
        "output [\n" + ",\n".join(_block(e, _with_labels(e, n_classes)) for e in outputs) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
    ]
    return "\n".join(parts) + "\n"


def _preprocess_config(name: str, max_batch_size: int, image_size: tuple[int, int], max_queue_delay_us: int,
                       instances: int) -> str:
    from coopkit.runtime.triton_model import INPUT, OUTPUT

    h, w = image_size
    parts = [
        f"name: {json.dumps(name)}",
        'backend: "python"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + _block({"name": INPUT, "data_type": "TYPE_STRING", "dims": [1]}, False) + "\n]",
        "output [\n" + _block({"name": OUTPUT, "data_type": "TYPE_UINT8", "dims": [h, w, 3]}, False) + "\n]",
        f"dynamic_batching {{\n  max_queue_delay_microseconds: {max_queue_delay_us}\n}}",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]",
    ]
    return "\n".join(parts) + "\n"


def _ensemble_config(name: str, graph: str, preprocess: str, max_batch_size: int, graph_input: str,
                     outputs: list[dict[str, Any]], n_classes: int) -> str:
    from coopkit.runtime.triton_model import INPUT, OUTPUT

    def step(model: str, inputs: dict[str, str], outs: dict[str, str]) -> str:
        maps = [f"      input_map {{\n        key: {json.dumps(k)}\n        value: {json.dumps(v)}\n      }}"
                for k, v in inputs.items()]
        maps += [f"      output_map {{\n        key: {json.dumps(k)}\n        value: {json.dumps(v)}\n      }}"
                 for k, v in outs.items()]
        return "    {\n" + f"      model_name: {json.dumps(model)}\n      model_version: -1\n" + "\n".join(maps) + "\n    }"

    crops = "preprocessed_images"
    steps = [step(preprocess, {INPUT: INPUT}, {OUTPUT: crops}),
             step(graph, {graph_input: crops}, {o["name"]: o["name"] for o in outputs})]
    parts = [
        f"name: {json.dumps(name)}",
        'platform: "ensemble"',
        f"max_batch_size: {max_batch_size}",
        "input [\n" + _block({"name": INPUT, "data_type": "TYPE_STRING", "dims": [1]}, False) + "\n]",
        "output [\n" + ",\n".join(_block(e, _with_labels(e, n_classes)) for e in outputs) + "\n]",
        "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}",
    ]
    return "\n".join(parts) + "\n"


def _install(repo: Path, folder: str, fill: Any) -> Path:
    """Build ``repo/folder`` in a hidden sibling with ``fill(tmp)`` and swap it in as a whole."""
    final = repo / folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=repo))
    old: Optional[Path] = None
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)
        if final.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside
            old = Path(tempfile.mkdtemp(prefix=f".{folder}.old.", dir=repo))
            os.replace(final, old / folder)
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None and not final.exists():
                os.replace(old / folder, final)  # put the previous model back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_triton_repository(
    model_path: Union[str, os.PathLike],
    repo_dir: Union[str, os.PathLike],
    name: Optional[str] = None,
    *,
    max_batch_size: int = 64,
    max_queue_delay_us: int = 100,
    ensemble: bool = True,
    preprocess_instances: int = 2,
) -> Path:
    """Write (or replace) ``<repo_dir>/<name>/`` for the exported graph at ``model_path``.

    Args:
        model_path: A file written by :func:`coopkit.exporters.export_onnx`.
        repo_dir: The Triton model repository (created if missing; other models are untouched).
        name: Model name in Triton (default: the file's stem, e.g. ``model``).
        max_batch_size: Largest batch Triton forms (the graph's batch axis is dynamic).
        max_queue_delay_us: How long Triton waits to fill a batch.
        ensemble: Also write ``<name>_preprocess`` (Python backend: encoded bytes -> crops) and
            ``<name>_ensemble`` (bytes in, the graph's outputs out).
        preprocess_instances: CPU instances of the preprocessing model (parallel decoding).

    Returns:
        The model's folder ``<repo_dir>/<name>``.

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
        ValueError: bad settings, not a coopkit graph, or an unwritable repository.
    """
    import onnx

    from coopkit.runtime.contract import INPUT_RAW, ModelMetadata
    from coopkit.runtime.classifier import resizes_in_graph
    from coopkit.runtime.session import CUDA

    src = Path(model_path)
    if not src.is_file():
        raise FileNotFoundError(f"model file not found: {src}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    if isinstance(preprocess_instances, bool) or not isinstance(preprocess_instances, int) or preprocess_instances < 1:
        raise ValueError(f"preprocess_instances must be an integer >= 1, got {preprocess_instances!r}")
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
    config += "".join(p + "\n" for p in _parameters(meta))
    if meta.input_kind == INPUT_RAW and not resizes_in_graph(meta, CUDA):  # the runtime crops with Pillow there
        config += "instance_group [\n  {\n    kind: KIND_CPU\n  }\n]\n"
        logger.warning("%s: onnxruntime's CUDA resize is wrong for this raw-input file (onnxruntime issue 25264): "
                       "the Triton model runs on the CPU (instance_group KIND_CPU); to serve it on a GPU with Triton, "
                       "export without --raw-input", src.name)

    repo = Path(repo_dir).expanduser()
    if repo.exists() and not repo.is_dir():
        raise ValueError(f"Triton repository {repo} exists and is not a folder")
    pre_name, ens_name = f"{model_name}_preprocess", f"{model_name}_ensemble"
    labels = "".join(c.replace("\n", " ") + "\n" for c in meta.classnames)
    thresholds = "".join(f"{t!r}\n" for t in meta.thresholds) if meta.thresholds is not None else None
    n_classes = len(meta.classnames)

    def write_labels(tmp: Path) -> None:
        (tmp / LABELS_FILE).write_text(labels, encoding="utf-8")
        if thresholds is not None:
            (tmp / THRESHOLDS_FILE).write_text(thresholds, encoding="utf-8")

    def fill_graph(tmp: Path) -> None:
        (tmp / "1").mkdir()
        shutil.copyfile(src, tmp / "1" / "model.onnx")
        for data in data_files:
            shutil.copyfile(src.parent / data, tmp / "1" / data)
        write_labels(tmp)
        (tmp / "config.pbtxt").write_text(config, encoding="utf-8")

    def fill_preprocess(tmp: Path) -> None:
        from coopkit.runtime import triton_model
        from coopkit.runtime.triton_model import METADATA_FILE

        (tmp / "1").mkdir()
        shutil.copyfile(triton_model.__file__, tmp / "1" / "model.py")
        (tmp / METADATA_FILE).write_text(meta.to_json(), encoding="utf-8")
        (tmp / "config.pbtxt").write_text(
            _preprocess_config(pre_name, max_batch_size, meta.image_size, max_queue_delay_us, preprocess_instances),
            encoding="utf-8")

    def fill_ensemble(tmp: Path) -> None:
        (tmp / "1").mkdir()
        write_labels(tmp)
        (tmp / "config.pbtxt").write_text(
            _ensemble_config(ens_name, model_name, pre_name, max_batch_size, inputs[0]["name"], outputs, n_classes)
            + "".join(p + "\n" for p in _parameters(meta)), encoding="utf-8")

    try:
        repo.mkdir(parents=True, exist_ok=True)
        final = _install(repo, model_name, fill_graph)
        if ensemble:
            _install(repo, pre_name, fill_preprocess)
            _install(repo, ens_name, fill_ensemble)
    except PermissionError:
        raise ValueError(f"cannot write the Triton repository {repo}: permission denied") from None
    logger.info("wrote Triton model %s (%d %s, max batch %d)%s", final, n_classes,
                "labels, multi-label" if meta.multilabel else "classes", max_batch_size,
                f" with ensemble {ens_name}" if ensemble else "")
    return final
