"""Zero-shot CLIP: hand-written prompts, nothing trained (CLIP's prompt ensembling over templates).

Its class weights are ``exp(logit_scale)`` times the mean of the normalised embeddings of the
filled-in templates, renormalised (:func:`~coopkit.methods.base.template_features`, which the baselines' text side and
KgCoOp's anchor reuse). A run records its templates (``config.json``'s ``templates``) and no tensors.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..backbone import Backbone
from ..config import RunConfig
from ..runtime.contract import check_classnames
from . import Method, register
from .base import MethodModel, check_templates_fit, logit_scale, run_templates, template_features

NAME = "zeroshot"


class ZeroShotModel(MethodModel):
    """Class weights from hand-written templates; nothing trained.

    Args:
        backbone: The frozen backbone.
        classnames: Labels, in output order.
        templates: Strings with one ``{}`` for the class name; several are averaged.
    """

    def __init__(self, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> None:
        super().__init__(backbone, check_classnames(classnames))
        self.templates = list(templates)

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features ``(n_classes, embed_dim)``, float32."""
        return template_features(self.backbone, self.classnames, self.templates)

    def compute_class_weights(self) -> Optional[torch.Tensor]:
        return (logit_scale(self.backbone) * self.text_features().cpu()).contiguous()

    def run_fields(self) -> dict:
        return {"templates": list(self.templates)}

    def with_classes(self, classnames: Sequence[str]) -> "ZeroShotModel":
        check_templates_fit(self.backbone, classnames, self.templates)
        return ZeroShotModel(self.backbone, classnames, self.templates)


def build(backbone: Backbone, config: RunConfig, tensors: Optional[dict] = None) -> ZeroShotModel:
    """A zero-shot run again: its templates over its class names."""
    return ZeroShotModel(backbone, config.classnames, run_templates(config))


register(Method(
    name=NAME,
    summary="zero-shot CLIP: hand-written prompts (one template, or an ensemble), nothing trained",
    build=build,
    protocols=("fewshot", "base2new", "shift"),
    text_graph=True,
    variants={"zeroshot-ensemble": {"templates": "ensemble"}},
    bench_default=(NAME,),
))
