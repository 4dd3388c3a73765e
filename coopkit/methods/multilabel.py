"""Multi-label pieces shared by DualCoOp and its baselines: asymmetric losses, the official schedule,
region/global feature caching with DualCoOp's transforms, and the two simple baselines.

* :func:`asymmetric_loss`: the official ``AsymmetricLoss`` (ASL on a (negative, positive) logit pair,
  softmax over the pair), unknown labels (-1) skipped; :func:`asymmetric_loss_sigmoid`: the official
  ``AsymmetricLoss2`` (one logit per label, sigmoid), here also skipping unknown labels (the official
  one has no mask).
* **zero-shot multi-label** (:func:`zeroshot_multilabel`): per label a positive hand prompt
  (``"a photo of a {}."``) against a negative one (``"a photo without a {}."``) on the global image
  feature: ``logit = exp(logit_scale) * <x, t_pos - t_neg>``, probability = sigmoid (the softmax
  over the pair).
* **CoOp with sigmoid and ASL** (:func:`fit_coop_sigmoid`): one CoOp prompt per label on the global
  image feature, ``logit = exp(logit_scale) * <x, t_c> + b`` with a learned scalar ``b`` (started at
  minus the mean initial logit of the training images, so training starts near probability 0.5),
  trained with :func:`asymmetric_loss_sigmoid` and DualCoOp's recipe.

Both baselines are constant-weight heads (:class:`MultiLabelLinearHead`: ``x W^T + b``), so they
work on every open_clip family CoOp handles.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigMixin, PromptConfig
from ..multilabel_data import MultiLabelDataset
from ..multilabel_metrics import choose_thresholds, multilabel_report
from ..prompts import PromptLearner
from .base import template_features
from ..features import encode_images

if TYPE_CHECKING:
    from ..backbone import Backbone

logger = logging.getLogger(__name__)

#: The zero-shot baseline's hand prompts.
POSITIVE_TEMPLATE = "a photo of a {}."
NEGATIVE_TEMPLATE = "a photo without a {}."


def check_config_fields(cfg: Any, *, ints: Sequence[str] = (), positive: Sequence[str] = (),
                        nonneg: Sequence[str] = ()) -> None:
    """One-line ValueErrors for config fields: integers >= 1, finite numbers > 0, finite numbers >= 0."""
    for name in ints:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    for names, ok, what in ((positive, lambda v: v > 0, "> 0"), (nonneg, lambda v: v >= 0, ">= 0")):
        for name in names:
            v = getattr(cfg, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(v):
                raise ValueError(f"{name} must be a finite number {what}, got {v!r}")
            setattr(cfg, name, float(v))


def dassl_lr(epoch: int, epochs: int, lr: float, warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> float:
    """The learning rate of an epoch under the official schedule (Dassl ``build_lr_scheduler``:
    ``ConstantWarmupScheduler`` over ``CosineAnnealingLR(T_max=epochs)``, stepped once per epoch):
    ``warmup_lr`` for the warm-up epochs, then ``lr * (1 + cos(pi * (epoch - warmup_epochs) / epochs)) / 2``
    (the cosine starts at ``lr`` after the warm-up and, with ``T_max = epochs``, never reaches 0)."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def _known(targets: torch.Tensor) -> torch.Tensor:
    return targets.reshape(-1) != -1


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 2.0, gamma_pos: float = 1.0,
                    clip: float = 0.05, eps: float = 1e-6) -> torch.Tensor:
    """ASL on pair logits ``(B, 2, C)`` (negative, positive) and targets ``(B, C)`` in {1, 0, -1}; summed.

    The official ``AsymmetricLoss``: probabilities by softmax over the pair, the negatives' shifted
    by ``clip``, log-likelihoods weighted by ``(1 - p_t) ** gamma`` computed without gradient.
    """
    probs = F.softmax(logits, dim=1)  # (B, 2, C)
    keep = _known(targets)
    y = targets.reshape(-1)[keep].to(probs.dtype)
    xs_pos, xs_neg = probs[:, 1].reshape(-1)[keep], probs[:, 0].reshape(-1)[keep]
    return _asl(xs_pos, xs_neg, y, gamma_neg, gamma_pos, clip, eps)


def asymmetric_loss_sigmoid(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 2.0,
                            gamma_pos: float = 1.0, clip: float = 0.05, eps: float = 1e-6) -> torch.Tensor:
    """ASL on one logit per label ``(B, C)`` (the official ``AsymmetricLoss2``), unknown labels skipped; summed."""
    keep = _known(targets)
    p = torch.sigmoid(logits).reshape(-1)[keep]
    y = targets.reshape(-1)[keep].to(p.dtype)
    return _asl(p, 1 - p, y, gamma_neg, gamma_pos, clip, eps)


def _asl(xs_pos: torch.Tensor, xs_neg: torch.Tensor, y: torch.Tensor, gamma_neg: float, gamma_pos: float,
         clip: float, eps: float) -> torch.Tensor:
    if clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.no_grad():
            pt = xs_pos * y + xs_neg * (1 - y)
            w = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
        loss = loss * w
    return -loss.sum()


# --- images ---------------------------------------------------------------------------------------


class Cutout:
    """The official ``CutoutPIL(cutout_factor=0.5)``: a rectangle of half the image's sides, at a random
    centre, filled with a random colour."""

    def __init__(self, factor: float = 0.5) -> None:
        self.factor = factor

    def __call__(self, img: Any) -> Any:
        from PIL import ImageDraw

        img = img.copy()
        w, h = img.size
        cw, ch = int(self.factor * w + 0.5), int(self.factor * h + 0.5)
        xc, yc = random.randrange(w), random.randrange(h)
        box = [max(0, xc - cw // 2), max(0, yc - ch // 2), min(w, xc + cw // 2), min(h, yc + ch // 2)]
        ImageDraw.Draw(img).rectangle(box, fill=tuple(random.randint(0, 255) for _ in range(3)))
        return img


def squash_transform(backbone: "Backbone", size: int, augment: bool = False) -> Callable[[Any], torch.Tensor]:
    """DualCoOp's transforms: ``Resize((size, size))`` (stretched, no crop), ``ToTensor``, the model's
    normalisation; ``augment`` adds the official cutout (its RandAugment is not applied)."""
    import torchvision.transforms as T

    pp = backbone.preprocess_cfg
    steps = [T.Resize((size, size))] + ([Cutout()] if augment else []) + [T.ToTensor(), T.Normalize(pp["mean"], pp["std"])]
    return T.Compose(steps)


def encode_multilabel(encoder: Callable[[torch.Tensor], torch.Tensor], data: MultiLabelDataset,
                      transform: Callable, views: int, backbone: "Backbone", *, progress: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (last dimension) features of every readable image of ``data``, ``views`` transforms
    each (:func:`coopkit.features.encode_images` with ``encoder``), and their targets:
    ``(views, n, ...)`` float32 on the CPU and ``(n, C)`` int64. Unreadable images are skipped."""
    feats, kept = encode_images(backbone, data.paths, transform=transform, views=views, progress=progress,
                                desc="encoding images", encoder=encoder)
    return feats, torch.as_tensor(data.targets[kept].astype(np.int64))


# --- the baselines ---------------------------------------------------------------------------------


class MultiLabelLinearHead(nn.Module):
    """L2-normalised image features ``(B, D)`` -> per-label logits ``(B, C)``: ``x W^T + b``; sigmoid gives
    each label's probability."""

    output_kind = "multilabel"

    def __init__(self, weight: torch.Tensor, bias: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone(), persistent=False)  # (C, D)
        self.bias = float(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.weight.T + self.bias


def zeroshot_multilabel(backbone: "Backbone", classnames: Sequence[str], positive: str = POSITIVE_TEMPLATE,
                        negative: str = NEGATIVE_TEMPLATE) -> MultiLabelLinearHead:
    """The zero-shot multi-label head: ``W = exp(logit_scale) * (t_pos - t_neg)`` from two hand prompts per label."""
    t_pos = template_features(backbone, classnames, [positive])  # (C, D)
    t_neg = template_features(backbone, classnames, [negative])  # (C, D)
    scale = float(backbone.model.logit_scale.exp())
    return MultiLabelLinearHead(scale * (t_pos - t_neg))


@dataclass
class CoOpSigmoidConfig(ConfigMixin):
    """CoOp with one sigmoid per label and the ASL, trained with DualCoOp's recipe (its defaults)."""

    n_ctx: int = field(default=16, metadata={"help": "context vectors"})
    csc: bool = field(default=False, metadata={"help": "class-specific context"})
    ctx_init: Optional[str] = field(default=None, metadata={"help": "initialise the context from these words"})
    epochs: int = field(default=50, metadata={"help": "epochs"})
    batch_size: int = field(default=32, metadata={"help": "images per step"})
    lr: float = field(default=0.002, metadata={"help": "SGD learning rate"})
    gamma_neg: float = field(default=2.0, metadata={"help": "ASL focusing exponent of negatives"})
    gamma_pos: float = field(default=1.0, metadata={"help": "ASL focusing exponent of positives"})
    asl_clip: float = field(default=0.05, metadata={"help": "ASL probability margin added to negatives"})

    def __post_init__(self) -> None:
        self.ctx_init = self.prompt_config().ctx_init
        check_config_fields(self, ints=("epochs", "batch_size"), positive=("lr",),
                            nonneg=("gamma_neg", "gamma_pos", "asl_clip"))

    def prompt_config(self) -> PromptConfig:
        return PromptConfig(n_ctx=self.n_ctx, csc=self.csc, class_token_position="end", ctx_init=self.ctx_init)


def fit_coop_sigmoid(backbone: "Backbone", train_set: MultiLabelDataset, config: Optional[CoOpSigmoidConfig] = None,
                     *, val_set: Optional[MultiLabelDataset] = None, seed: int = 1,
                     progress: bool = False) -> tuple[PromptLearner, MultiLabelLinearHead, dict[str, Any]]:
    """Train the CoOp-sigmoid baseline; returns the learner, its fixed head and metrics (``val_mAP`` with ``val_set``)."""
    config = config or CoOpSigmoidConfig()
    started = time.perf_counter()
    torch.manual_seed(seed)
    learner = PromptLearner(backbone, train_set.classnames, config.prompt_config()).to(backbone.device)
    transform = backbone.preprocess
    feats, targets = encode_multilabel(backbone.model.encode_image, train_set, transform, 1, backbone,
                                       progress=progress)  # (1, n, D), (n, C)
    x_all = feats[0].to(backbone.device)
    scale = backbone.model.logit_scale.exp().float().detach()
    with torch.no_grad():
        start_bias = -float((scale * x_all @ learner.text_features().T).mean())
    bias = nn.Parameter(torch.tensor(start_bias, device=backbone.device))
    optimizer = torch.optim.SGD([learner.ctx, bias], lr=config.lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    n = x_all.shape[0]
    losses = []
    for epoch in range(config.epochs):
        lr = dassl_lr(epoch, config.epochs, config.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(config.batch_size):
            logits = scale * x_all[idx] @ learner.text_features().T + bias  # (b, C)
            loss = asymmetric_loss_sigmoid(logits, targets[idx].to(backbone.device), config.gamma_neg,
                                           config.gamma_pos, config.asl_clip)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss)
        losses.append(round(total / n, 6))
    learner.requires_grad_(False)
    with torch.no_grad():
        head = MultiLabelLinearHead(scale * learner.text_features(), float(bias))
    metrics: dict[str, Any] = {"train_loss": losses[-1] if losses else None, "epochs": config.epochs,
                               "train_images": n, "history": {"loss": losses}}
    if val_set is not None:
        metrics.update(evaluate_linear(head, backbone, val_set))
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return learner, head, metrics


def linear_scores(head: MultiLabelLinearHead, backbone: "Backbone", data: MultiLabelDataset) -> tuple[np.ndarray, np.ndarray]:
    """Per-label probabilities ``(images, C)`` of a constant-weight multi-label head, and the targets."""
    feats, targets = encode_multilabel(backbone.model.encode_image, data, backbone.preprocess, 1, backbone)
    with torch.no_grad():
        probs = torch.sigmoid(head(feats[0].to(backbone.device)))
    return probs.cpu().numpy(), targets.numpy()


def evaluate_linear(head: MultiLabelLinearHead, backbone: "Backbone", data: MultiLabelDataset) -> dict[str, Any]:
    """``val_mAP``, ``val_CF1``, ``val_OF1`` at per-label thresholds chosen on ``data`` (and the thresholds)."""
    scores, targets = linear_scores(head, backbone, data)
    th = choose_thresholds(scores, targets)
    report = multilabel_report(scores, targets, th)
    return {"val_mAP": report["mAP"], "val_CF1": report["CF1"], "val_OF1": report["OF1"], "thresholds": th.tolist()}
