"""The linear-probe baseline (CLIP, Radford et al. 2021): L2-regularised logistic regression on frozen
image features, served as a head ``x W^T + b`` (tensors ``weight``, ``bias`` in ``head.safetensors``).

As in the CLIP paper, the regularisation strength is chosen on a validation split: the
given one, or else a per-class half of the few-shot training images (with 1 shot per class
there is nothing to hold out, and the middle of the grid is used). The model is then refitted
on all training images. Fitted with full-batch L-BFGS in torch; no new dependency.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..backbone import Backbone
from ..config import TrainConfig
from . import Method, register
from .base import HEAD_FILE, FewShotFeatures, HeadModel, Shots, build_head_model

logger = logging.getLogger(__name__)

NAME = "linear-probe"

#: Weight-decay grid searched on the validation split (multiplies the mean squared weight).
LAMBDAS = tuple(10.0 ** e for e in range(-6, 3))


@dataclass
class LinearProbe:
    """Logits ``features @ weight.T + bias`` over L2-normalised image features."""

    weight: torch.Tensor  # (n_classes, embed_dim)
    bias: torch.Tensor  # (n_classes,)
    lam: float

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return feats @ self.weight.T + self.bias

    def accuracy(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.logits(feats).argmax(1) == labels).float().mean())


def _fit(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, lam: float, max_iter: int) -> LinearProbe:
    d = feats.shape[1]
    w = torch.zeros(n_classes, d, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    x = feats * 10.0  # features are unit-norm: scale so that small weights reach confident logits

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, labels) + lam * (w**2).sum() / n_classes
        loss.backward()
        return loss

    opt.step(closure)
    return LinearProbe((w.detach() * 10.0), b.detach(), lam)


def fit_linear_probe(
    feats: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    *,
    val_feats: Optional[torch.Tensor] = None,
    val_labels: Optional[torch.Tensor] = None,
    lambdas: Sequence[float] = LAMBDAS,
    seed: int = 1,
    max_iter: int = 200,
) -> LinearProbe:
    """Fit the probe, choosing the L2 strength on validation data.

    Args:
        feats: L2-normalised training features ``(n, embed_dim)``.
        labels: ``(n,)`` class indices.
        n_classes: Number of classes.
        val_feats, val_labels: Validation split; if absent, half of each class's training
            images (classes with a single image stay in training).
        lambdas: Candidate L2 strengths.
        seed: Seeds the held-out split.
        max_iter: L-BFGS iterations.
    """
    if val_feats is None:
        gen = torch.Generator().manual_seed(seed)
        hold = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(n_classes):
            idx = torch.nonzero(labels == c).flatten()
            if len(idx) >= 2:
                hold[idx[torch.randperm(len(idx), generator=gen)[: len(idx) // 2]]] = True
        if hold.any():
            val_feats, val_labels = feats[hold], labels[hold]
            tr_feats, tr_labels = feats[~hold], labels[~hold]
        else:
            tr_feats = tr_labels = None
    else:
        tr_feats, tr_labels = feats, labels
    if val_feats is None or tr_feats is None:
        lam = lambdas[len(lambdas) // 2]
    else:
        scores = [(_fit(tr_feats, tr_labels, n_classes, lam, max_iter).accuracy(val_feats, val_labels), -lam)
                  for lam in lambdas]
        lam = -max(scores)[1]  # best accuracy; ties go to the stronger regularisation
    logger.info("linear probe: L2 strength %g", lam)
    return _fit(feats, labels, n_classes, lam, max_iter)


def probe_model(backbone: Backbone, shots: FewShotFeatures, templates: Sequence[str], *,
                seed: int = 1) -> tuple[HeadModel, dict[str, Any]]:
    """CLIP's linear probe on the first view of each shot, as a fitted head, and its metrics."""
    probe = fit_linear_probe(shots.feats[0], shots.labels, len(shots.classnames), seed=seed)
    metrics = {"l2_strength": probe.lam, "train_images": int(len(shots.labels))}
    tensors = {"weight": probe.weight.float(), "bias": probe.bias.float()}
    return HeadModel(backbone, shots.classnames, NAME, "linear", tensors, templates), metrics


def fit(backbone: Backbone, shots: Shots, config: None, train: TrainConfig, *, progress: bool = False,
        callback: Any = None) -> tuple[HeadModel, dict[str, Any]]:
    """The registry's fit: the probe on one plain (unaugmented) view of each shot."""
    return probe_model(backbone, shots.features(backbone, augment=False), shots.templates, seed=train.seed)


register(Method(
    name=NAME,
    summary="CLIP's linear probe: L2-regularised logistic regression on frozen image features",
    build=functools.partial(build_head_model, kind="linear"),
    tensors_file=HEAD_FILE,
    fit=fit,
    protocols=("fewshot",),
    bench_default=(NAME,),
    bench_setting="L2 chosen on held-out shots",
))
