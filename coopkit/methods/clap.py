"""CLAP (Silva-Rodriguez et al., CVPR 2024): a linear probe initialised with the zero-shot prototypes
and kept near them by a class-adaptive L2 penalty (the ``ZS`` + ``l2`` setting of its code: each
class weighted by its zero-shot accuracy on the training shots); head
``exp(logit_scale) * x normalise(W)^T`` (tensors ``weight``, ``bias`` (zero) in ``head.safetensors``).

Differences from the official code, for coopkit's cached-feature training: augmented views are
encoded once and every epoch sees all of them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..backbone import Backbone
from ..config import TrainConfig
from ..runtime.configbase import ConfigMixin, check_bool, check_float, check_int
from . import Method, register
from .base import (HEAD_FILE, DivergedError, FewShotFeatures, HeadModel, Shots, build_head_model, dassl_lr,
                   logit_scale, template_features)

NAME = "clap"


@dataclass
class ClapConfig(ConfigMixin):
    """The zero-shot-initialised linear probe with CLAP's class-adaptive constraint (Silva-Rodriguez et al.,
    2024). Defaults follow the official code (SGD lr 0.1, batch 256, 300 epochs, one warm-up epoch)."""

    epochs: int = field(default=300, metadata={"help": "passes over the cached training views"})
    lr: float = field(default=0.1, metadata={"help": "peak SGD learning rate (momentum 0.9, cosine)"})
    batch_size: int = field(default=256, metadata={"help": "features per step"})
    constraint: bool = field(default=True, metadata={
        "help": "penalise each class's drift from its zero-shot prototype, weighted by its zero-shot accuracy "
                "(off: plain zero-shot-initialised linear probe)"})

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_float("lr", self.lr, positive=True)
        check_bool("constraint", self.constraint)


def clap_model(backbone: Backbone, shots: FewShotFeatures, templates: Sequence[str], config: Optional[ClapConfig] = None,
               *, seed: int = 1, progress: bool = False) -> tuple[HeadModel, dict[str, Any]]:
    """The zero-shot-initialised linear probe with CLAP's class-adaptive constraint, and its metrics.

    Prototypes ``W`` start at the mean unnormalised template embeddings ``T``; the loss is the
    cross-entropy of ``exp(logit_scale) * x normalise(W)^T`` plus ``mean_c lambda_c ||W_c - T_c||^2``,
    where ``lambda_c`` is the zero-shot classifier's mean probability of class ``c`` on its own
    training shots (all views). SGD with momentum 0.9, one warm-up epoch at 1e-5, cosine.
    """
    from ..runtime.progress import progress_bar

    cfg = config or ClapConfig()
    names = shots.classnames
    scale = logit_scale(backbone)
    base = template_features(backbone, names, templates, raw=True).cpu()  # (C, D), unnormalised
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
    gen = torch.Generator().manual_seed(seed)
    for epoch in progress_bar(range(cfg.epochs), desc="CLAP", unit="epoch", enabled=progress):
        for group in optim.param_groups:
            group["lr"] = dassl_lr(epoch, lr=cfg.lr, epochs=cfg.epochs)  # CLAP's config: Dassl, 1 warm-up epoch
        order = torch.randperm(len(y_all), generator=gen)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            logits = scale * x_all[idx] @ F.normalize(weight, dim=-1).T  # (b, C)
            loss = F.cross_entropy(logits, y_all[idx]) + (lam * (weight - base).pow(2).sum(-1)).mean()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
    if not bool(torch.isfinite(weight).all()):
        raise DivergedError(f"CLAP diverged (non-finite prototypes); lower lr (now {cfg.lr:g})")
    final = (scale * F.normalize(weight.detach(), dim=-1)).contiguous()  # (C, D)
    metrics = {"settings": cfg.to_dict(), "constraint_weights": [round(float(v), 6) for v in lam],
               "train_images": int(n), "views": int(views)}
    tensors = {"weight": final, "bias": torch.zeros(len(names))}
    return HeadModel(backbone, names, NAME, "linear", tensors, templates), metrics


def fit(backbone: Backbone, shots: Shots, config: ClapConfig, train: TrainConfig, *, progress: bool = False,
        callback: Any = None) -> tuple[HeadModel, dict[str, Any]]:
    """The registry's fit: CLAP on ``train.n_views`` views of each shot (augmented unless ``train.augment`` is off)."""
    views = shots.features(backbone, views=train.n_views, augment=train.augment, progress=progress)
    return clap_model(backbone, views, shots.templates, config, seed=train.seed, progress=progress)


register(Method(
    name=NAME,
    summary="CLAP: a zero-shot-initialised linear probe held near the prototypes by a class-adaptive penalty",
    build=functools.partial(build_head_model, kind="linear"),
    config=ClapConfig,
    tensors_file=HEAD_FILE,
    fit=fit,
    protocols=("fewshot",),
    bench_default=(NAME,),
    bench_setting="zero-shot init, class-adaptive L2",
))
