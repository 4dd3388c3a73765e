"""coopkit: CoOp prompt learning for any open_clip model, exported as one ONNX file.

Public names are loaded lazily, so ``import coopkit`` imports neither torch nor open_clip::

    import coopkit
    clf = coopkit.fit("my_images/", shots=16)          # CoOp on the shipped coopkit-tiny model
    clf.evaluate("my_test_images/")["accuracy"]
    clf.save("runs/mine")

Training needs the ``train`` extra (``pip install 'coopkit[train]'``); the torch-free
runtime (:mod:`coopkit.runtime`) needs nothing beyond the base install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.2.0"

_EXPORTS = {
    "load_backbone": "coopkit.backbone",
    "Backbone": "coopkit.backbone",
    "PromptLearner": "coopkit.prompts",
    "fit": "coopkit.train",
    "zero_shot": "coopkit.train",
    "load": "coopkit.classifier",
    "Classifier": "coopkit.classifier",
    "load_dataset": "coopkit.userdata",
    "few_shot": "coopkit.userdata",
    "Dataset": "coopkit.userdata",
    "BackboneConfig": "coopkit.config",
    "PromptConfig": "coopkit.config",
    "TrainConfig": "coopkit.config",
    "RunConfig": "coopkit.config",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .backbone import Backbone, load_backbone
    from .classifier import Classifier, load
    from .config import BackboneConfig, PromptConfig, RunConfig, TrainConfig
    from .userdata import Dataset, few_shot, load_dataset
    from .prompts import PromptLearner
    from .train import fit, zero_shot

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
