"""coopkit.runtime: serve an exported coopkit ONNX file with numpy, Pillow and onnxruntime only.

>>> from coopkit.runtime import Classifier
>>> clf = Classifier("model.onnx")                      # CUDA when it really works, else CPU
>>> [p.label for p in clf.predict(["cat.jpg", "dog.png"])]

* :class:`Classifier` (:mod:`~coopkit.runtime.classifier`): images in, labels and probabilities
  out, as :class:`Prediction` (:mod:`~coopkit.runtime.results`, shared with the torch classifier),
  from a file checked against its metadata (:mod:`~coopkit.runtime.modelfile`);
* :class:`TextEncoder` (:mod:`~coopkit.runtime.text`): class names in, class weights out (open
  vocabulary), with the tokenizers of :mod:`~coopkit.runtime.tokenizers`;
* :mod:`~coopkit.runtime.contract`: what training and serving share (metadata schema,
  class-name rules, templates, token layout);
* :mod:`~coopkit.runtime.session`: every onnxruntime session (device, providers, threads) and the
  decoding-worker default;
* :mod:`~coopkit.runtime.engines`: onnxruntime and OpenVINO (the ``openvino`` extra) behind one
  session surface; :mod:`~coopkit.runtime.engine_choice`: ``engine="auto"``, the fastest engine
  whose answers equal onnxruntime's, measured once per file and machine;
* collections: :mod:`~coopkit.runtime.inputs` -> :mod:`~coopkit.runtime.batch` ->
  :mod:`~coopkit.runtime.writers` (or :mod:`~coopkit.runtime.ray_engine`); HTTP:
  :mod:`~coopkit.runtime.serve`;
* shared low in the import order: :mod:`~coopkit.runtime.configbase` (every config's validating
  base), :mod:`~coopkit.runtime.extras` (optional dependencies), :mod:`~coopkit.runtime.progress`.

Importing this package imports neither torch nor open_clip (onnxruntime itself is imported
when the first session is created). It is installable on its own: ``pip install coopkit``
brings only numpy, Pillow and onnxruntime-gpu.
"""

from .contract import METADATA_KEY, SCHEMA_VERSION, MetadataError, ModelMetadata, TextEncoderSpec
from .classifier import Classifier
from .preprocess import ImageDecodeError, load_image, preprocess
from .results import Prediction
from .text import TextEncoder
from .tokenizers import ClipTokenizer

__all__ = [
    "Classifier",
    "Prediction",
    "TextEncoder",
    "METADATA_KEY",
    "SCHEMA_VERSION",
    "MetadataError",
    "ModelMetadata",
    "TextEncoderSpec",
    "ImageDecodeError",
    "load_image",
    "preprocess",
    "ClipTokenizer",
]
