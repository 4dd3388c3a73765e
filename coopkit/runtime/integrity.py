"""Is an exported file still what the exporter wrote? Checks on its stored tensors, torch- and onnx-free.

onnxruntime does not expose a graph's initializers and the runtime must not need the ``onnx``
package, so the few fields these checks need are read straight from the protobuf wire format
(https://protobuf.dev/programming-guides/encoding/) of the ``.onnx`` file, through ``mmap``:
only the pages of the fields that are read are touched, the rest is skipped by length.

Two checks, both described in :class:`~coopkit.runtime.contract.ModelMetadata`:

* :func:`class_weights_sha256`: the sha256 of the class weight matrix, found as the float32
  initializer of shape ``(n_classes, embed_dim)`` or its transpose, compared with
  ``weights_sha256`` (cheap: only that matrix is hashed);
* :func:`tensors_sha256`: one sha256 over every initializer (each one's serialized bytes as
  stored in the file, and the bytes it names in an external data file), compared with
  ``tensors_sha256``: every stored weight of the graph.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from .atomic import sha256_hex
from .contract import MetadataError

# ModelProto.graph, GraphProto.initializer and the TensorProto fields read here (onnx.proto3)
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_T_DIMS, _T_DATA_TYPE, _T_FLOAT_DATA, _T_NAME, _T_RAW_DATA, _T_EXTERNAL, _T_LOCATION = 1, 2, 4, 8, 9, 13, 14
_FLOAT = 1  # TensorProto.FLOAT
_EXTERNAL = 1  # TensorProto.EXTERNAL
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class FileFormatError(ValueError):
    """The file is not a well-formed protobuf (truncated or damaged)."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise FileFormatError("truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, wire type, value or start, end)`` of each field of the message in
    ``buf[start:end]``; for length-delimited fields the value is the start of the payload."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value, pos
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise FileFormatError(f"field {number} runs past the end of its message")
            yield number, wire, pos, pos + length
            pos += length
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if pos + size > end:
                raise FileFormatError(f"field {number} runs past the end of its message")
            yield number, wire, pos, pos + size
            pos += size
        else:
            raise FileFormatError(f"unsupported wire type {wire} (field {number})")


@dataclass
class StoredTensor:
    """One initializer as stored: where its message and its data lie in the file."""

    name: str = ""
    dims: tuple[int, ...] = ()
    data_type: int = 0
    message: tuple[int, int] = (0, 0)  # (start, end) of the serialized TensorProto
    data: Optional[tuple[int, int]] = None  # raw_data or packed float_data, (start, end)
    external: dict[str, str] = field(default_factory=dict)  # location, offset, length


def _tensor(buf: memoryview, start: int, end: int) -> StoredTensor:
    t = StoredTensor(message=(start, end))
    dims: list[int] = []
    for number, wire, a, b in _fields(buf, start, end):
        if number == _T_DIMS:
            if wire == _VARINT:
                dims.append(a)
            elif wire == _LEN:  # packed
                pos = a
                while pos < b:
                    d, pos = _varint(buf, pos, b)
                    dims.append(d)
        elif number == _T_DATA_TYPE and wire == _VARINT:
            t.data_type = a
        elif number == _T_NAME and wire == _LEN:
            t.name = bytes(buf[a:b]).decode("utf-8", errors="replace")
        elif number in (_T_RAW_DATA, _T_FLOAT_DATA) and wire == _LEN:
            t.data = (a, b)
        elif number == _T_EXTERNAL and wire == _LEN:
            entry = {n: bytes(buf[x:y]).decode("utf-8", errors="replace")
                     for n, w, x, y in _fields(buf, a, b) if w == _LEN}
            t.external[entry.get(1, "")] = entry.get(2, "")  # StringStringEntryProto: key 1, value 2
        elif number == _T_LOCATION and wire == _VARINT and a != _EXTERNAL:
            t.external.clear()
    t.dims = tuple(dims)
    return t


class OnnxFile:
    """Read-only view of an ``.onnx`` file's initializers (use as a context manager)."""

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")
        size = os.fstat(self._file.fileno()).st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.buf = memoryview(self._map) if self._map is not None else memoryview(b"")

    def close(self) -> None:
        self.buf.release()
        if self._map is not None:
            self._map.close()
        self._file.close()

    def __enter__(self) -> "OnnxFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def initializers(self) -> Iterator[StoredTensor]:
        """The graph's initializers, in file order."""
        buf = self.buf
        for number, wire, a, b in _fields(buf, 0, len(buf)):
            if number == _MODEL_GRAPH and wire == _LEN:
                for n, w, x, y in _fields(buf, a, b):
                    if n == _GRAPH_INITIALIZER and w == _LEN:
                        yield _tensor(buf, x, y)

    def external_bytes(self, t: StoredTensor) -> bytes:
        """The bytes an external-data initializer names (``location``, ``offset``, ``length``)."""
        location = t.external.get("location", "")
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise FileFormatError(f"initializer {t.name!r} names external data {location!r} outside the model's folder")
        offset = int(t.external.get("offset", "0") or 0)
        length = t.external.get("length")
        with open(self.path.parent / location, "rb") as f:
            f.seek(offset)
            data = f.read(int(length)) if length else f.read()
        if length and len(data) != int(length):
            raise FileFormatError(f"external data {location} is shorter than initializer {t.name!r} needs")
        return data

    def data(self, t: StoredTensor) -> bytes:
        """The little-endian bytes of an initializer's values (inline or external)."""
        if t.external:
            return self.external_bytes(t)
        return bytes(self.buf[t.data[0]:t.data[1]]) if t.data else b""


#: onnx.TensorProto.FLOAT16
_FLOAT16 = 10


def stores_fp16(path: Union[str, os.PathLike]) -> bool:
    """Whether any initializer of the file is stored as float16 (read from the tensors' headers,
    without loading the file); ``True`` when the file cannot be parsed (the cautious answer)."""
    try:
        with OnnxFile(path) as f:
            return any(t.data_type == _FLOAT16 for t in f.initializers())
    except (OSError, ValueError, IndexError):
        return True


def weights_sha256(matrix: np.ndarray) -> str:
    """sha256 of a class weight matrix ``(n_classes, embed_dim)`` as float32 in C order: the
    ``weights_sha256`` the exporter records and :func:`class_weights_sha256` finds in a file."""
    return sha256_hex(np.ascontiguousarray(matrix, dtype=np.float32))


def class_weights_sha256(path: Union[str, os.PathLike], n_classes: int, embed_dim: int) -> list[str]:
    """sha256 of every float32 initializer shaped like the class weight matrix, each read as
    ``(n_classes, embed_dim)`` in C order (an ``(embed_dim, n_classes)`` one is transposed first)."""
    digests = []
    with OnnxFile(path) as f:
        for t in f.initializers():
            if t.data_type != _FLOAT or t.dims not in ((n_classes, embed_dim), (embed_dim, n_classes)):
                continue
            values = np.frombuffer(f.data(t), dtype="<f4")
            if values.size != n_classes * embed_dim:
                continue
            matrix = values.reshape(t.dims)
            readings = ([matrix] if t.dims == (n_classes, embed_dim) else []) + \
                ([matrix.T] if t.dims == (embed_dim, n_classes) else [])  # both when square
            digests += [weights_sha256(m) for m in readings]
    return digests


def tensors_sha256(path: Union[str, os.PathLike]) -> str:
    """One sha256 over every initializer of the graph, in file order: its serialized message
    as stored, then the bytes it names in an external data file (if any)."""
    with OnnxFile(path) as f:
        def parts() -> Iterator[Any]:
            for t in f.initializers():
                yield f.buf[t.message[0]:t.message[1]]
                if t.external:
                    yield f.external_bytes(t)

        return sha256_hex(b"coopkit tensors v1\n", parts())


def verify_tensors(path: Union[str, os.PathLike], expected: str) -> None:
    """Raise :class:`~coopkit.runtime.contract.MetadataError` unless the tensors stored in
    ``path`` hash to ``expected`` (:func:`tensors_sha256`); nothing is checked when it is empty."""
    if not expected:
        return
    try:
        found = tensors_sha256(path)
    except (FileFormatError, OSError) as e:
        raise MetadataError(f"{path}: cannot read the stored tensors: {e}") from None
    if found != expected:
        raise MetadataError(f"{path}: the stored tensors do not match the tensors_sha256 recorded at export (the "
                            "file is corrupted or was edited); export it again")
