"""coopkit.exporters: write a fitted or zero-shot classifier as one ONNX graph.

>>> import coopkit
>>> from coopkit.exporters import export_onnx, write_triton_repository
>>> result = export_onnx(coopkit.load("runs/mine"), "model.onnx", precision="fp32")
>>> write_triton_repository(result.path, "triton_repo")

Every export is verified against the PyTorch classifier with onnxruntime on the CPU before
the file is moved into place. Importing this package imports neither torch nor onnx.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "export_onnx": ".onnx",
    "ExportResult": ".onnx",
    "ExportVerificationError": ".onnx",
    "DEFAULT_OPSET": ".onnx",
    "EXTERNAL_DATA_THRESHOLD": ".onnx",
    "text_graph_name": ".onnx",
    "write_triton_repository": ".triton",
}

__all__ = list(_LAZY)

if TYPE_CHECKING:
    from .onnx import (
        DEFAULT_OPSET,
        EXTERNAL_DATA_THRESHOLD,
        ExportResult,
        ExportVerificationError,
        export_onnx,
        text_graph_name,
    )
    from .triton import write_triton_repository


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'coopkit.exporters' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
