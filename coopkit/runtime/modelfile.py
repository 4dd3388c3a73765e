"""Opening an exported image file: its metadata, and the checks that the graph is what the
metadata says (the coopkit contract's input and outputs, output widths, class weights, stored
tensors, and the web sidecar beside it). What :class:`~coopkit.runtime.Classifier` runs before
it labels anything; every failure is one :class:`~coopkit.runtime.contract.MetadataError`
naming the file."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from .contract import (
    INPUT_NAME,
    INPUT_RAW,
    OUTPUT_NAMES,
    UNSEALED_FIELDS,
    MetadataError,
    ModelMetadata,
    is_sidecar,
    sidecar_mismatches,
    sidecar_name,
)
from .integrity import FileFormatError, class_weights_sha256, verify_tensors

logger = logging.getLogger(__name__)


def read_metadata(session: Any, path: Path) -> ModelMetadata:
    """The coopkit metadata of an open session of ``path``."""
    props = session.get_modelmeta().custom_metadata_map
    try:
        return ModelMetadata.from_props(props)
    except MetadataError as e:
        raise MetadataError(f"{path}: {e}") from None


def check_output_width(path: Path, metadata: ModelMetadata, output: str, width: Any) -> None:
    """An output's last dimension against the metadata: one logit per class name, ``embed_dim``
    embeddings (a symbolic width passes; the runtime checks the real one after a run)."""
    want = metadata.embed_dim if output == "image_embeds" else len(metadata.classnames)
    if isinstance(width, (int, np.integer)) and want and int(width) != want:
        what = "embed_dim" if output == "image_embeds" else "class names"
        raise MetadataError(f"{path}: the graph's {output!r} output is {width} wide but the metadata has "
                            f"{want} {what}; the file was edited or assembled from different exports")


def check_graph(session: Any, metadata: ModelMetadata, path: Path) -> None:
    """The graph's input and outputs follow the coopkit contract and agree with ``metadata``."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name for o in session.get_outputs()}
    missing = [n for n in OUTPUT_NAMES if n not in outputs]
    if INPUT_NAME not in inputs or missing or len(inputs) != 1:
        raise MetadataError(
            f"{path}: graph does not follow the coopkit contract: inputs {sorted(inputs)} "
            f"(expected [{INPUT_NAME!r}]), outputs {sorted(outputs)} (expected {list(OUTPUT_NAMES)})"
        )
    node = inputs[INPUT_NAME]
    if node.type != "tensor(uint8)" or len(node.shape) != 4:
        raise MetadataError(f"{path}: input {INPUT_NAME!r} must be uint8 (batch, H, W, 3), got {node.type} {node.shape}")
    h, w = metadata.image_size
    if metadata.input_kind == INPUT_RAW:
        h, w = node.shape[1], node.shape[2]  # any size; the channels are checked below
    for got, want in zip(node.shape[1:], (h, w, 3)):
        if isinstance(got, int) and got != want:
            raise MetadataError(f"{path}: graph input is {node.shape} but metadata says image_size {metadata.image_size}")
    shapes = {o.name: o.shape for o in session.get_outputs()}
    for name in OUTPUT_NAMES:
        check_output_width(path, metadata, name, shapes[name][-1] if shapes[name] else None)


def check_class_weights(session: Any, metadata: ModelMetadata, path: Path) -> None:
    """The class weight matrix stored in the graph against the metadata's ``weights_sha256``."""
    m = metadata
    if not m.weights_sha256:
        return
    embed_dim = m.embed_dim or {o.name: o.shape for o in session.get_outputs()}["image_embeds"][-1]
    try:
        found = class_weights_sha256(path, len(m.classnames), embed_dim)
    except FileFormatError as e:
        raise MetadataError(f"{path}: {e}") from None
    if m.weights_sha256 not in found:
        raise MetadataError(f"{path}: the class weights do not match the weights_sha256 recorded at export "
                            "(the file is corrupted or was edited); export it again")


def cross_check_sidecar(path: Path, metadata: ModelMetadata) -> None:
    """Warn when the sidecar beside the file (``model.json``, what web clients read instead of
    the ONNX metadata) describes another export. The runtime itself never uses it."""
    side = path.with_name(sidecar_name(path.name))
    try:
        raw = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else None
    except (OSError, ValueError):
        raw = None
    if not is_sidecar(raw):
        return  # no sidecar (or an unrelated JSON file): nothing to check
    problems = sidecar_mismatches(raw, metadata, path.stat().st_size)
    if problems:
        logger.warning("%s does not describe %s (%s); web clients will refuse this pair: re-export, or copy "
                       "the sidecar written with this file", side.name, path.name, "; ".join(problems[:3]))


def check_sealed(metadata: ModelMetadata, path: Path, strict: bool = False) -> None:
    """A file whose metadata has no ``metadata_sha256`` (exported by coopkit 0.2.0 or older) is
    opened with a warning naming what cannot be verified, or refused when ``strict``. (A file
    that has one was checked against it when its metadata was read.)"""
    if metadata.metadata_sha256:
        return
    what = f"its {UNSEALED_FIELDS} cannot be verified"
    if strict:
        raise MetadataError(f"{path}: the metadata records no metadata_sha256 (exported by coopkit 0.2.0 or older): "
                            f"{what}; open it without strict=True, or export it again")
    logger.warning("%s: the metadata records no metadata_sha256 (exported by coopkit 0.2.0 or older): %s; "
                   "export it again to seal them (strict=True refuses such files)", path, what)


def open_checked(session: Any, path: Path, check_tensors: bool = True, strict: bool = False) -> ModelMetadata:
    """The metadata of ``path`` (open in ``session``) after every check, in order: the metadata's
    own checksum (:func:`check_sealed`), the graph's contract and widths, the class weights, the
    stored tensors (unless ``check_tensors`` is false: reading and hashing a 353 MB file takes a
    few tenths of a second), the sidecar."""
    metadata = read_metadata(session, path)
    check_sealed(metadata, path, strict)
    check_graph(session, metadata, path)
    check_class_weights(session, metadata, path)
    if check_tensors:
        verify_tensors(path, metadata.tensors_sha256)
    cross_check_sidecar(path, metadata)
    return metadata
