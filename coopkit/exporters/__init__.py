"""coopkit.exporters: write a fitted or zero-shot classifier as one verified ONNX graph.

>>> import coopkit
>>> from coopkit.exporters import export_onnx, write_triton_repository
>>> report = export_onnx(coopkit.load("runs/mine"), "model.onnx", precision="fp32")
>>> report.image.max_abs_logit_diff  # the proof of equality, typed (ExportReport)
>>> write_triton_repository(report.path, "triton_repo")

Layers, each importing only those above it in this list:

* :mod:`~coopkit.exporters.io`: output checks, metadata, external data, the checker, moving
  files into place;
* :mod:`~coopkit.exporters.config`: :class:`ExportConfig` and :class:`QuantizationConfig`, what an
  export is asked to do (the CLI's options are generated from them);
* :mod:`~coopkit.exporters.preprocess`: open_clip's resize and crop as an ONNX graph, put in
  front of the image graph of a raw-input file (no torch);
* :mod:`~coopkit.exporters.trace` and :mod:`~coopkit.exporters.graphs`: the torch modules
  that are traced and the tracing itself;
* :mod:`~coopkit.exporters.verify`: public checks of a written file against PyTorch, with typed results;
* :mod:`~coopkit.exporters.nodes`, :mod:`~coopkit.exporters.fp16` and :mod:`~coopkit.exporters.int8`:
  the precision variants (fp16; calibrated int8 with smoothing and its trial);
* :mod:`~coopkit.exporters.text` and :mod:`~coopkit.exporters.image`: the exports;
* :mod:`~coopkit.exporters.triton`: a Triton model repository for an exported file.

Every export is verified against the PyTorch classifier with onnxruntime on the CPU before
the file is moved into place. Importing this package imports neither torch nor onnx.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from coopkit._lazy import lazy_exports

_EXPORTS = {
    "export_onnx": ".image",
    "ExportReport": ".image",
    "ExportResult": ".image",
    "ExportConfig": ".config",
    "QuantizationConfig": ".config",
    "ExportVerificationError": ".io",
    "EXTERNAL_DATA_THRESHOLD": ".io",
    "text_graph_name": ".io",
    "DEFAULT_OPSET": ".config",
    "verify_image_graph": ".verify",
    "verify_text_graph": ".verify",
    "verify_raw_input": ".verify",
    "write_triton_repository": ".triton",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .config import DEFAULT_OPSET, ExportConfig, QuantizationConfig
    from .image import ExportReport, ExportResult, export_onnx
    from .io import EXTERNAL_DATA_THRESHOLD, ExportVerificationError, text_graph_name
    from .triton import write_triton_repository
    from .verify import verify_image_graph, verify_raw_input, verify_text_graph

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
