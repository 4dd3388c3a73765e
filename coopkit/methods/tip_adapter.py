"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): a training-free cache model over the
zero-shot weights, ``x W^T + b + alpha * exp(-beta * (1 - x K^T)) V`` (tensors ``keys``, ``labels``,
``alpha``, ``beta`` in ``head.safetensors``); Tip-Adapter-F fine-tunes the keys with AdamW.
``alpha`` and ``beta`` are searched on a validation set as the official code does, when one is given.

Differences from the official code, for coopkit's cached-feature training: augmented views are
encoded once and each epoch draws one per image instead of augmenting afresh; the keys average
the L2-normalised views (the official code averages the raw features); Tip-Adapter-F keeps its
last epoch (the official code keeps the epoch with the best *test* accuracy).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from ..backbone import Backbone
from ..config import TipAdapterConfig, TrainConfig
from . import Method, register
from .base import HEAD_FILE, FewShotFeatures, HeadModel, Shots, build_head_model, logit_scale, template_features

logger = logging.getLogger(__name__)

NAME = "tip-adapter"
NAME_F = "tip-adapter-f"


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


def tip_model(backbone: Backbone, shots: FewShotFeatures, templates: Sequence[str],
              config: Optional[TipAdapterConfig] = None, *, val: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
              finetune: bool = False, seed: int = 1, progress: bool = False) -> tuple[HeadModel, dict[str, Any]]:
    """Tip-Adapter's cache model (``finetune=True``: Tip-Adapter-F) as a fitted head, and its metrics.

    Args:
        backbone: The backbone.
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
    from ..runtime.progress import progress_bar

    cfg = config or TipAdapterConfig()
    names = shots.classnames
    weights = logit_scale(backbone) * template_features(backbone, names, templates).cpu()  # (C, D)
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
    tensors = {"keys": keys.contiguous(), "labels": labels.long(), "alpha": torch.tensor(float(alpha)),
               "beta": torch.tensor(float(beta))}
    return HeadModel(backbone, names, NAME_F if finetune else NAME, "cache", tensors, templates), metrics


def fit(backbone: Backbone, shots: Shots, config: TipAdapterConfig, train: TrainConfig, *, progress: bool = False,
        callback: Any = None, finetune: bool = False) -> tuple[HeadModel, dict[str, Any]]:
    """The registry's fit: the cache of ``train.n_views`` views of each shot; ``alpha`` and ``beta``
    searched on the shots' validation set when there is one."""
    views = shots.features(backbone, views=train.n_views, augment=train.augment, progress=progress)
    return tip_model(backbone, views, shots.templates, config, val=shots.val_features(backbone), finetune=finetune,
                     seed=train.seed, progress=progress)


#: What Tip-Adapter and Tip-Adapter-F share in the registry.
_SHARED = dict(build=functools.partial(build_head_model, kind="cache"), config=TipAdapterConfig, tensors_file=HEAD_FILE,
               protocols=("fewshot",), bench_setting="alpha, beta fixed")
register(Method(name=NAME, summary="Tip-Adapter: a training-free cache of the training features over the zero-shot "
                "weights", fit=fit, bench_default=(NAME,), **_SHARED))
register(Method(name=NAME_F, summary="Tip-Adapter-F: Tip-Adapter with its cache keys fine-tuned (AdamW)",
                fit=functools.partial(fit, finetune=True), bench_default=(NAME_F,), **_SHARED))
