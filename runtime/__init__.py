"""coopkit.runtime: serve an exported coopkit ONNX file with numpy, Pillow and onnxruntime only.

>>> from coopkit.runtime import Classifier
>>> clf = Classifier("model.onnx")                      # CUDA when it really works, else CPU
>>> [p.label for p in clf.predict(["cat.jpg", "dog.png"])]

Importing this package imports neither torch nor open_clip (onnxruntime itself is imported when
the first :class:`Classifier` is created).
"""

from .classifier import Classifier, Prediction
from .metadata import METADATA_KEY, SCHEMA_VERSION, MetadataError, ModelMetadata
from .preprocess import ImageDecodeError, load_image, preprocess
from .tokenizer import ClipTokenizer

__all__ = [
    "Classifier",
    "Prediction",
    "METADATA_KEY",
    "SCHEMA_VERSION",
    "MetadataError",
    "ModelMetadata",
    "ImageDecodeError",
    "load_image",
    "preprocess",
    "ClipTokenizer",
]
