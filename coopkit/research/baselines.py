"""Few-shot baselines beside CoOp, fitted on already encoded shots and returned as classifiers.

The methods themselves live in :mod:`coopkit.methods` (:mod:`~coopkit.methods.linear_probe`,
:mod:`~coopkit.methods.clap`, :mod:`~coopkit.methods.tip_adapter`), where :func:`coopkit.fit`
finds them; these helpers fit them on :class:`~coopkit.methods.base.FewShotFeatures` encoded once
(:func:`encode_fewshot`), as the experiments share one encoding between several baselines, and
wrap the result in a :class:`coopkit.Classifier` that saves, loads, exports and verifies like a
CoOp run:

* :func:`linear_probe`: CLIP's linear probe, head ``x W^T + b``;
* :func:`clap`: CLAP's zero-shot-initialised, class-adaptively constrained linear probe;
* :func:`tip_adapter`: Tip-Adapter's cache model, with ``finetune=True`` Tip-Adapter-F.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .. import __version__
from ..backbone import Backbone
from ..classifier import Classifier
from ..config import ClapConfig, RunConfig, TipAdapterConfig
from ..methods.base import DEFAULT_TEMPLATES, FewShotFeatures, MethodModel, encode_fewshot
from ..methods.clap import clap_model
from ..methods.linear_probe import probe_model
from ..methods.tip_adapter import search_alpha_beta, tip_model
from ..runtime.contract import check_templates


def _classifier(bb: Backbone, model: MethodModel, method: str, templates: Sequence[str],
                metrics: dict[str, Any]) -> Classifier:
    config = RunConfig(method=method, classnames=list(model.classnames), templates=check_templates(list(templates)),
                       metrics=metrics, coopkit_version=__version__, **bb.run_fields())
    return Classifier(bb, config, model)


def linear_probe(bb: Backbone, shots: FewShotFeatures, *, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 seed: int = 1) -> Classifier:
    """CLIP's linear probe on the first view of each shot, as a classifier (head ``x W^T + b``)."""
    model, metrics = probe_model(bb, shots, templates, seed=seed)
    return _classifier(bb, model, model.method, templates, metrics)


def clap(bb: Backbone, shots: FewShotFeatures, *, templates: Sequence[str] = DEFAULT_TEMPLATES,
         config: Optional[ClapConfig] = None, seed: int = 1, progress: bool = False) -> Classifier:
    """The zero-shot-initialised linear probe with CLAP's class-adaptive constraint
    (:func:`coopkit.methods.clap.clap_model`), as a classifier."""
    model, metrics = clap_model(bb, shots, templates, config, seed=seed, progress=progress)
    return _classifier(bb, model, model.method, templates, metrics)


def tip_adapter(bb: Backbone, shots: FewShotFeatures, *, templates: Sequence[str] = DEFAULT_TEMPLATES,
                config: Optional[TipAdapterConfig] = None, val: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                finetune: bool = False, seed: int = 1, progress: bool = False) -> Classifier:
    """Tip-Adapter's cache model (``finetune=True``: Tip-Adapter-F) as a classifier; see
    :func:`coopkit.methods.tip_adapter.tip_model` for the arguments."""
    model, metrics = tip_model(bb, shots, templates, config, val=val, finetune=finetune, seed=seed, progress=progress)
    return _classifier(bb, model, model.method, templates, metrics)


__all__ = ["FewShotFeatures", "encode_fewshot", "linear_probe", "clap", "tip_adapter", "search_alpha_beta"]
