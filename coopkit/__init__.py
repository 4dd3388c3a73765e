"""coopkit: CoOp prompt learning for any open_clip model, exported as one ONNX file.

Public names are loaded lazily, so ``import coopkit`` imports neither torch nor open_clip::

    import coopkit
    clf = coopkit.fit("my_images/", shots=16)          # CoOp on the shipped coopkit-tiny model
    clf.evaluate("my_test_images/")["accuracy"]
    clf.save("runs/mine")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load_backbone": "coopkit.backbone",
    "Backbone": "coopkit.backbone",
    "PromptLearner": "coopkit.prompts",
    "fit": "coopkit.train",
    "zero_shot": "coopkit.classifier",
    "load": "coopkit.classifier",
    "Classifier": "coopkit.classifier",
    "load_dataset": "coopkit.data",
    "few_shot": "coopkit.data",
    "Dataset": "coopkit.data",
    "PromptConfig": "coopkit.config",
    "TrainConfig": "coopkit.config",
    "RunConfig": "coopkit.config",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from .backbone import Backbone, load_backbone
    from .classifier import Classifier, load, zero_shot
    from .config import PromptConfig, RunConfig, TrainConfig
    from .data import Dataset, few_shot, load_dataset
    from .prompts import PromptLearner
    from .train import fit


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'coopkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
