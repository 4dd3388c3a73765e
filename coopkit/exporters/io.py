"""Writing exported graphs: output checks, metadata, external data, the checker, and moving
files into place (the lowest layer of :mod:`coopkit.exporters`; no torch).

A file is assembled in a temporary folder beside its target and moved into place only after
it was verified; companions (external data, the text graph) go first, the graph that names
them last, so a reader never sees a graph whose companions are missing. The sidecar
(``model.json``: the metadata and every file's sha256, for clients that cannot read ONNX
metadata) is written last.
"""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

from coopkit.runtime.atomic import atomic_write, file_sha256
from coopkit.runtime.contract import INPUT_RAW, METADATA_KEY, ModelMetadata, build_sidecar, sidecar_name
from coopkit.runtime.integrity import tensors_sha256

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

#: Above this many bytes of tensors, a file keeps them in ``<file>.data`` (protobuf's limit is 2 GiB).
EXTERNAL_DATA_THRESHOLD = 2_000_000_000


class ExportVerificationError(RuntimeError):
    """The exported graph does not reproduce the PyTorch classifier (nothing was written)."""


def check_target(path: Union[str, os.PathLike]) -> Path:
    """The output file: its folder is created; a folder (or a path ending in ``/``) is refused
    (ValueError), and so is a place that cannot be written (PermissionError, or OSError for a
    read-only filesystem)."""
    target = Path(path).expanduser()
    if not target.name or target.is_dir() or os.fspath(path).endswith(("/", os.sep)):
        raise ValueError(f"output {os.fspath(path)!r} is a folder; give a file name such as model.onnx")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise
    except (FileExistsError, NotADirectoryError, FileNotFoundError) as e:
        raise ValueError(f"cannot create the output folder {target.parent}: {e.strerror or e}") from None
    if hasattr(os, "statvfs") and os.statvfs(target.parent).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(target.parent))
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(target.parent))
    return target



def text_graph_name(image_file: str) -> str:
    """``model.onnx`` -> ``model.text.onnx`` (the companion text graph's file name)."""
    stem = image_file[: -len(".onnx")] if image_file.endswith(".onnx") else image_file
    return f"{stem}.text.onnx"


def tokenizer_file_name(text_file: str) -> str:
    """``model.text.onnx`` -> ``model.tokenizer.json`` (the text graph's Hugging Face tokenizer)."""
    stem = text_file[: -len(".onnx")] if text_file.endswith(".onnx") else text_file
    stem = stem[: -len(".text")] if stem.endswith(".text") else stem
    return f"{stem}.tokenizer.json"


def tensor_bytes(model: "onnx.ModelProto") -> int:
    """Bytes of initializer data of the model, whether held in it or in external files
    (what decides on external data)."""
    import onnx

    total = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            total += int(np.prod(init.dims, dtype=np.int64)) * itemsize
        elif init.raw_data:
            total += len(init.raw_data)
        else:
            total += init.ByteSize()
    return total


def save_model(model: "onnx.ModelProto", path: Path, size_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """Write ``model``; tensors go to ``<path>.data`` when they exceed ``size_threshold`` bytes.

    Returns the files written (the model, then its data file if any).
    """
    import onnx

    if tensor_bytes(model) <= size_threshold:
        onnx.save_model(model, os.fspath(path))
        return [path]
    data_name = f"{path.name}.data"
    onnx.save_model(
        model,
        os.fspath(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_name,
        size_threshold=1024,
    )
    logger.info("%s: tensors written to external data %s", path.name, data_name)
    return [path, path.parent / data_name]


def set_metadata(model: "onnx.ModelProto", meta: ModelMetadata) -> None:
    """Store ``meta`` in the model's ``metadata_props`` (the one entry :data:`METADATA_KEY`)."""
    from coopkit import __version__

    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, meta.to_json()
    model.producer_name = "coopkit"
    model.producer_version = __version__
    h, w = meta.image_size
    images = ("decoded uint8 RGB images (batch, height, width, 3) of any size, resized and cropped in the graph"
              if meta.input_kind == INPUT_RAW else f"uint8 images (batch, {h}, {w}, 3)")
    model.doc_string = (
        f"coopkit {meta.method} classifier over {meta.model} ({len(meta.classnames)} classes, {meta.precision}): "
        f"{images} -> logits, probs, image_embeds"
    )


def record_tensors_sha256(model: "onnx.ModelProto", meta: ModelMetadata, path: Path) -> None:
    """Put the sha256 of every tensor of the saved graph at ``path`` into ``meta`` and rewrite
    the graph file with it (its tensors, inline or external, are written unchanged)."""
    import onnx

    meta.tensors_sha256 = tensors_sha256(path)
    set_metadata(model, meta)
    onnx.save_model(model, os.fspath(path))


def check_model(path: Path) -> None:
    """``onnx.checker`` with the full check; a rejection is an :class:`ExportVerificationError`."""
    import onnx

    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportVerificationError(f"onnx.checker rejected the exported graph {path.name}: {e}") from None



def file_size(files: Sequence[Path]) -> int:
    """Total bytes of ``files`` (missing ones count 0)."""
    return sum(f.stat().st_size for f in files if f.exists())


def move_into_place(files: Sequence[Path], folder: Path) -> list[Path]:
    """Rename ``files`` (in order) into ``folder``; returns their new paths."""
    written = []
    for f in files:
        dest = folder / f.name
        os.replace(f, dest)
        written.append(dest)
    return written


def remove_stale_companions(target: Path, written: Sequence[Path]) -> None:
    """Delete the data file, text graph and tokenizer an earlier export to ``target`` left, if this one wrote none.

    The new image graph is already in place and names only what it uses; an old ``<file>.data``
    or text graph next to it would be dead weight that a later copy might ship by mistake.
    """
    text = target.parent / text_graph_name(target.name)
    tokenizer = text.parent / tokenizer_file_name(text.name)
    for stale in (target.parent / f"{target.name}.data", text, text.parent / f"{text.name}.data", tokenizer):
        if stale not in written and stale.is_file():
            stale.unlink()
            logger.info("removed %s, left by an earlier export to %s", stale.name, target.name)


def sidecar_role(name: str, model_file: str) -> str:
    """The sidecar role of a file written by an export to ``model_file`` (see ``SIDECAR_ROLES``)."""
    text = text_graph_name(model_file)
    roles = {model_file: "model", f"{model_file}.data": "external_data", text: "text_model",
             f"{text}.data": "text_external_data", tokenizer_file_name(text): "tokenizer"}
    if name not in roles:
        raise ValueError(f"{name} is not a file of the export {model_file}; expected one of {sorted(roles)}")
    return roles[name]


def write_sidecar(model: Path, meta: ModelMetadata, files: Sequence[Path]) -> Path:
    """Write ``model.json`` beside the image graph ``model``: its metadata and, for each of
    ``files`` (the graph and its companions, in place), name, role, size and sha256."""
    entries = [{"name": f.name, "role": sidecar_role(f.name, model.name), "bytes": f.stat().st_size,
                "sha256": file_sha256(f)} for f in files]
    entries.sort(key=lambda e: e["role"] != "model")  # the image graph first
    path = model.parent / sidecar_name(model.name)
    atomic_write(path, json.dumps(build_sidecar(meta, entries), indent=2, sort_keys=True) + "\n")
    return path
