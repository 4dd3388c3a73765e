"""Few-shot baselines beside CoOp, fitted on cached image features and served as one graph.

Each returns a :class:`coopkit.Classifier` whose head (:mod:`coopkit.heads`) holds its extra
matrices, so it saves, loads, exports and verifies like a CoOp run:

* :func:`linear_probe`: CLIP's linear probe (L2-regularised logistic regression, strength
  chosen on held-out shots; :mod:`coopkit.research.linear_probe`), head ``x W^T + b``;
* :func:`clap`: a linear probe initialised with the zero-shot prototypes and kept near them by
  CLAP's class-adaptive L2 penalty (Silva-Rodriguez et al., CVPR 2024, the ``ZS`` + ``l2``
  setting of its code: each class weighted by its zero-shot accuracy on the training shots);
  head ``exp(logit_scale) * x normalise(W)^T``;
* :func:`tip_adapter`: Tip-Adapter's training-free cache model (Zhang et al., ECCV 2022)
  ``x W^T + alpha * exp(-beta * (1 - x K^T)) V``, with ``finetune=True`` Tip-Adapter-F (the
  keys fine-tuned with AdamW); ``alpha`` and ``beta`` searched on a validation set as its code
  does, when one is given.

Differences from the official code, all for coopkit's cached-feature training: augmented views
are encoded once (:attr:`FewShotFeatures.feats`) and each epoch draws one per image instead of
augmenting afresh; Tip-Adapter's keys average the L2-normalised views (the official code
averages the raw features); Tip-Adapter-F keeps its last epoch (the official code keeps the
epoch with the best *test* accuracy).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import __version__
from ..backbone import Backbone
from ..classifier import DEFAULT_TEMPLATES, Classifier, template_features
from ..config import ClapConfig, RunConfig, TipAdapterConfig, TrainConfig
from ..data import Dataset
from ..features import encode_images
from ..runtime.contract import check_templates
from ..runtime.progress import progress_bar
from ..train import lr_at
from .linear_probe import fit_linear_probe

logger = logging.getLogger(__name__)


@dataclass
class FewShotFeatures:
    """The training shots, encoded once.

    Attributes:
        classnames: The label set.
        feats: L2-normalised features ``(views, n, embed_dim)``.
        labels: ``(n,)`` class indices.
    """

    classnames: list[str]
    feats: torch.Tensor
    labels: torch.Tensor


def encode_fewshot(backbone: Backbone, data: Dataset, *, views: int = 10, augment: bool = True,
                   progress: bool = False) -> FewShotFeatures:
    """Encode an (already sampled) training set: ``views`` augmented views per image (CoOp's random
    resized crop + flip), or one plain view with ``augment=False``. Unreadable images are skipped."""
    transform = backbone.train_preprocess if augment else backbone.preprocess
    feats, kept = encode_images(backbone, data.paths, transform=transform, views=views if augment else 1,
                                progress=progress, desc="encoding training views")
    return FewShotFeatures(list(data.classnames), feats, torch.tensor([data.labels[i] for i in kept]))


def _config(bb: Backbone, method: str, names: Sequence[str], templates: Sequence[str],
            metrics: dict) -> RunConfig:
    return RunConfig(method=method, classnames=list(names), templates=check_templates(list(templates)),
                     metrics=metrics, coopkit_version=__version__, **bb.run_fields())


def _text_weights(bb: Backbone, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``exp(logit_scale) * text features`` ``(C, D)`` on the CPU: the zero-shot classifier."""
    scale = bb.model.logit_scale.exp().float().cpu()
    return scale * template_features(bb, names, templates).cpu()


def linear_probe(bb: Backbone, shots: FewShotFeatures, *, templates: Sequence[str] = DEFAULT_TEMPLATES,
                 seed: int = 1) -> Classifier:
    """CLIP's linear probe on the first view of each shot, as a classifier (head ``x W^T + b``)."""
    probe = fit_linear_probe(shots.feats[0], shots.labels, len(shots.classnames), seed=seed)
    metrics = {"l2_strength": probe.lam, "train_images": int(len(shots.labels))}
    return Classifier(bb, _config(bb, "linear-probe", shots.classnames, templates, metrics),
                      head_tensors={"weight": probe.weight.float(), "bias": probe.bias.float()})


def clap(bb: Backbone, shots: FewShotFeatures, *, templates: Sequence[str] = DEFAULT_TEMPLATES,
         config: Optional[ClapConfig] = None, seed: int = 1, progress: bool = False) -> Classifier:
    """The zero-shot-initialised linear probe with CLAP's class-adaptive constraint.

    Prototypes ``W`` start at the mean unnormalised template embeddings ``T``; the loss is the
    cross-entropy of ``exp(logit_scale) * x normalise(W)^T`` plus ``mean_c lambda_c ||W_c - T_c||^2``,
    where ``lambda_c`` is the zero-shot classifier's mean probability of class ``c`` on its own
    training shots (all views). SGD with momentum 0.9, one warm-up epoch at 1e-5, cosine.
    """
    cfg = config or ClapConfig()
    names = shots.classnames
    scale = bb.model.logit_scale.exp().float().cpu()
    base = template_features(bb, names, templates, raw=True).cpu()  # (C, D), unnormalised
    views, n, dim = shots.feats.shape
    x_all = shots.feats.reshape(views * n, dim)  # (views * n, D)
    y_all = shots.labels.repeat(views)  # (views * n,)
    with torch.no_grad():
        zs = (scale * x_all @ F.normalize(base, dim=-1).T).softmax(-1)  # (views * n, C)
        onehot = F.one_hot(y_all, len(names)).float()  # (views * n, C)
        lam = (zs * onehot).sum(0) / onehot.sum(0).clamp(min=1)  # (C,): zero-shot accuracy per class
    if not cfg.constraint:
        lam = torch.zeros_like(lam)
    weight = torch.nn.Parameter(base.clone())
    optim = torch.optim.SGD([weight], lr=cfg.lr, momentum=0.9, weight_decay=0.0)
    schedule = TrainConfig(epochs=cfg.epochs, lr=cfg.lr)  # CoOp's warm-up + cosine, as CLAP's config
    gen = torch.Generator().manual_seed(seed)
    for epoch in progress_bar(range(cfg.epochs), desc="CLAP", unit="epoch", enabled=progress):
        for group in optim.param_groups:
            group["lr"] = lr_at(epoch, schedule)
        order = torch.randperm(len(y_all), generator=gen)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            logits = scale * x_all[idx] @ F.normalize(weight, dim=-1).T  # (b, C)
            loss = F.cross_entropy(logits, y_all[idx]) + (lam * (weight - base).pow(2).sum(-1)).mean()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
    if not bool(torch.isfinite(weight).all()):
        raise RuntimeError(f"CLAP diverged (non-finite prototypes); lower lr (now {cfg.lr:g})")
    final = (scale * F.normalize(weight.detach(), dim=-1)).contiguous()  # (C, D)
    metrics = {"settings": cfg.to_dict(), "constraint_weights": [round(float(v), 6) for v in lam],
               "train_images": int(n), "views": int(views)}
    return Classifier(bb, _config(bb, "clap", names, templates, metrics),
                      head_tensors={"weight": final, "bias": torch.zeros(len(names))})


def _grid(scale: float, steps: int) -> list[float]:
    """Tip-Adapter's search grid: ``steps`` values from 0.1 up to (not including) ``scale``."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def search_alpha_beta(clip_logits: torch.Tensor, affinity: torch.Tensor, values: torch.Tensor, labels: torch.Tensor,
                      scale: tuple[float, float], steps: tuple[int, int]) -> tuple[float, float, float]:
    """Tip-Adapter's grid search: the first ``(alpha, beta)`` (betas outer, alphas inner) with the best
    accuracy of ``clip_logits + alpha * exp(-beta * (1 - affinity)) values``. Returns ``(alpha, beta, accuracy)``."""
    best = (-1.0, 0.0, 0.0)
    alphas = torch.tensor(_grid(scale[1], steps[1]))  # (A,)
    for beta in _grid(scale[0], steps[0]):
        cache = torch.exp(-beta * (1 - affinity)) @ values  # (m, C)
        logits = clip_logits.unsqueeze(0) + alphas.view(-1, 1, 1) * cache.unsqueeze(0)  # (A, m, C)
        acc = (logits.argmax(-1) == labels.unsqueeze(0)).float().mean(-1)  # (A,)
        i = int(acc.argmax())
        if float(acc[i]) > best[0]:
            best = (float(acc[i]), float(alphas[i]), beta)
    return best[1], best[2], best[0]


def tip_adapter(bb: Backbone, shots: FewShotFeatures, *, templates: Sequence[str] = DEFAULT_TEMPLATES,
                config: Optional[TipAdapterConfig] = None, val: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                finetune: bool = False, seed: int = 1, progress: bool = False) -> Classifier:
    """Tip-Adapter's cache model (``finetune=True``: Tip-Adapter-F) as a classifier.

    Args:
        bb: The backbone.
        shots: The encoded training shots (the keys are the mean of each image's views).
        templates: Hand-written prompts of the zero-shot part ``W``.
        config: ``alpha``/``beta`` (used as given without ``val``, and as the starting point of
            Tip-Adapter-F), the search grid, and the fine-tuning recipe.
        val: Validation features ``(m, D)`` and labels ``(m,)``: ``alpha`` and ``beta`` are then
            searched on them (after fine-tuning, for Tip-Adapter-F), as the official code does.
        finetune: Fine-tune the keys (AdamW, eps 1e-4, cosine over all steps; one random view
            per image each epoch).
        seed: Seeds the fine-tuning order.
        progress: Show a progress bar while fine-tuning.
    """
    cfg = config or TipAdapterConfig()
    names = shots.classnames
    weights = _text_weights(bb, names, templates)  # (C, D)
    keys = F.normalize(shots.feats.mean(0), dim=-1)  # (n, D)
    labels = shots.labels
    values = F.one_hot(labels, len(names)).float()  # (n, C)
    alpha, beta = cfg.alpha, cfg.beta
    history: list[float] = []
    if finetune:
        keys = torch.nn.Parameter(keys.clone())
        optim = torch.optim.AdamW([keys], lr=cfg.lr, eps=1e-4)
        views, n, _ = shots.feats.shape
        steps = cfg.epochs * math.ceil(n / cfg.batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, steps)
        gen = torch.Generator().manual_seed(seed)
        for _ in progress_bar(range(cfg.epochs), desc="Tip-Adapter-F", unit="epoch", enabled=progress):
            order, view = torch.randperm(n, generator=gen), torch.randint(views, (n,), generator=gen)
            total = 0.0
            for start in range(0, n, cfg.batch_size):
                idx = order[start : start + cfg.batch_size]
                x = shots.feats[view[idx], idx]  # (b, D)
                cache = torch.exp(-beta * (1 - x @ keys.T)) @ values  # (b, C)
                loss = F.cross_entropy(x @ weights.T + alpha * cache, labels[idx])
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                sched.step()
                total += loss.item() * len(idx)
            history.append(round(total / n, 6))
        keys = keys.detach()
    metrics: dict = {"settings": cfg.to_dict(), "train_images": int(len(labels))}
    if history:
        metrics["history"] = {"loss": history}
    if val is not None and cfg.search_scale is not None:
        vx, vy = val
        alpha, beta, acc = search_alpha_beta(vx @ weights.T, vx @ keys.T, values, vy, cfg.search_scale, cfg.search_steps)
        metrics["val_accuracy"] = acc
        logger.info("Tip-Adapter%s: alpha %.3f, beta %.3f (validation accuracy %.4f)", "-F" if finetune else "",
                    alpha, beta, acc)
    metrics.update(alpha=alpha, beta=beta)
    method = "tip-adapter-f" if finetune else "tip-adapter"
    head = {"keys": keys.contiguous(), "labels": labels.long(), "alpha": torch.tensor(float(alpha)),
            "beta": torch.tensor(float(beta))}
    return Classifier(bb, _config(bb, method, names, templates, metrics), head_tensors=head)


__all__ = ["FewShotFeatures", "encode_fewshot", "linear_probe", "clap", "tip_adapter", "search_alpha_beta"]
