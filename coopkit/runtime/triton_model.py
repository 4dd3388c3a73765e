"""The Triton Python-backend model of a coopkit ensemble: encoded image bytes in, graph input out.

:func:`coopkit.exporters.write_triton_repository` copies this file as
``<repo>/<name>_preprocess/1/model.py`` beside ``metadata.json`` (the exported file's
:class:`~coopkit.runtime.contract.ModelMetadata`), so a Triton client can send JPEG or PNG
bytes to the ensemble ``<name>_ensemble`` and get the ONNX graph's outputs back. Inside
Triton it needs ``pip install coopkit`` in the Python backend's environment (the torch-free
runtime: numpy, Pillow); ``triton_python_backend_utils`` is Triton's own module, imported only
when Triton runs the model, so this file imports anywhere.

Images are prepared as the file's metadata says (a multi-label DualCoOp file: stretched to its
input size); a multi-label file's ``metadata.json`` also records its task and per-label
thresholds, which a client applies to the ensemble's ``probs`` (each label's own probability).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from coopkit.runtime.contract import ModelMetadata
from coopkit.runtime.classifier import prepare_image

#: The ensemble's input (``TYPE_STRING``, one encoded image per batch row) and this model's output.
INPUT = "IMAGE_BYTES"
OUTPUT = "images"
METADATA_FILE = "metadata.json"


def preprocess_batch(blobs: Any, metadata: ModelMetadata) -> tuple[np.ndarray, list[Optional[str]]]:
    """Encoded images -> uint8 ``(n, H, W, 3)`` crops for the graph and one error per image.

    ``blobs`` is what Triton hands a ``TYPE_STRING`` input with ``dims: [1]``: an object array
    ``(n, 1)`` of ``bytes``. An unreadable image gets a zero crop and its error message
    (``None`` for the readable ones); nothing raises.
    """
    rows = np.asarray(blobs, dtype=object).reshape(-1)  # (n,)
    h, w = metadata.image_size
    images = np.zeros((len(rows), h, w, 3), np.uint8)  # (n, H, W, 3)
    errors: list[Optional[str]] = []
    for i, blob in enumerate(rows):
        try:
            data = blob if isinstance(blob, (bytes, bytearray)) else bytes(blob)
            images[i] = prepare_image(data, metadata)
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - one bad image is its own request's error
            errors.append(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return images, errors


class TritonPythonModel:
    """Triton's Python-backend entry point (``initialize`` / ``execute``)."""

    def initialize(self, args: dict[str, str]) -> None:
        with open(os.path.join(args["model_repository"], METADATA_FILE), encoding="utf-8") as f:
            self.metadata = ModelMetadata.from_json(f.read())
        self.model_config = json.loads(args["model_config"])

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils  # present only inside Triton

        responses = []
        for request in requests:  # each request is a batch of one or more images
            blobs = pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy()
            images, errors = preprocess_batch(blobs, self.metadata)
            bad = [e for e in errors if e is not None]
            if bad:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(bad[0])))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, images)]))
        return responses
