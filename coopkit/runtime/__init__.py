"""coopkit.runtime: serve an exported coopkit ONNX file with numpy, Pillow and onnxruntime only.

>>> from coopkit.runtime import Classifier
>>> clf = Classifier("model.onnx")                      # CUDA when it really works, else CPU
>>> [p.label for p in clf.predict(["cat.jpg", "dog.png"])]

* :class:`Classifier` (``classifier``): images in, labels and probabilities out (:class:`Prediction`, ``results``);
* :class:`TextEncoder` (``text``): class names in, class weights out (open vocabulary);
* :mod:`~coopkit.runtime.contract`: what training and serving share (metadata schema,
  class-name rules, templates, token layout).

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
