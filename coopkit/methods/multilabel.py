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

Both baselines are constant-weight heads (:class:`coopkit.heads.LinearHead`: ``x W^T + b``, the head
every constant-weight method exports), so they work on every open_clip family CoOp handles.
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
from ..features import encode_images
from ..heads import LinearHead
from ..multilabel_data import MultiLabelDataset
from ..multilabel_metrics import DEFAULT_THRESHOLD, choose_thresholds, multilabel_report
from ..prompts import PromptLearner
from . import Method, register
from .base import MethodModel, dassl_lr, logit_scale, seed_everything, template_features

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


@dataclass
class AslRecipe(ConfigMixin):
    """The multi-label recipe's fields, shared by DualCoOp and CoOp-sigmoid: the official DualCoOp defaults
    (``configs/models/rn*_ep50.yaml``, ``opts.py``): 50 epochs of batch 32, SGD lr 0.002, ASL gamma_neg 2,
    gamma_pos 1, clip 0.05."""

    epochs: int = field(default=50, metadata={"help": "epochs (official: 50)"})
    batch_size: int = field(default=32, metadata={"help": "images per step (official: 32)"})
    lr: float = field(default=0.002, metadata={"help": "SGD learning rate (official: 0.002 COCO, 0.001 VOC)"})
    gamma_neg: float = field(default=2.0, metadata={"help": "ASL focusing exponent of negatives"})
    gamma_pos: float = field(default=1.0, metadata={"help": "ASL focusing exponent of positives"})
    asl_clip: float = field(default=0.05, metadata={"help": "ASL probability margin added to negatives (< 1)"})

    def __post_init__(self) -> None:
        check_config_fields(self, ints=("epochs", "batch_size"), positive=("lr",),
                            nonneg=("gamma_neg", "gamma_pos", "asl_clip"))
        if self.asl_clip >= 1:
            raise ValueError(f"asl_clip must be < 1, got {self.asl_clip!r}")


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


def encode_multilabel(encoder: Optional[Callable[[torch.Tensor], torch.Tensor]], data: MultiLabelDataset,
                      transform: Callable, views: int, backbone: "Backbone", *, progress: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (last dimension) features of every readable image of ``data``, ``views`` transforms
    each (:func:`coopkit.features.encode_images` with ``encoder``, default the backbone's), and their targets:
    ``(views, n, ...)`` float32 on the CPU and ``(n, C)`` int64. Unreadable images are skipped."""
    feats, kept = encode_images(backbone, data.paths, transform=transform, views=views, progress=progress,
                                desc="encoding images", encoder=encoder)
    return feats, torch.as_tensor(data.targets[kept].astype(np.int64))


# --- the baselines ---------------------------------------------------------------------------------

#: The method names of the two baselines, and their run file (``weight``, ``bias``, ``thresholds``; CoOp-sigmoid
#: also its ``ctx``).
ZEROSHOT_NAME = "zeroshot-multilabel"
COOP_SIGMOID_NAME = "coop-sigmoid"
HEAD_TENSORS_FILE = "multilabel_head.safetensors"
TASK = "multilabel"


class MultiLabelHeadModel(MethodModel):
    """A baseline's fitted multi-label model: the frozen image encoder, ``x W^T + b`` and per-label thresholds.

    Args:
        backbone: The frozen backbone.
        classnames: Labels, in output order.
        tensors: ``weight`` ``(C, D)``, ``bias`` ``(1,)``, ``thresholds`` ``(C,)`` (and CoOp-sigmoid's ``ctx``).
        config: The method's config (recorded in the run).
    """

    task = TASK

    def __init__(self, backbone: "Backbone", classnames: Sequence[str], tensors: dict[str, torch.Tensor],
                 config: Any = None) -> None:
        super().__init__(backbone, classnames)
        n = len(self.classnames)
        for key, shape in (("weight", (n, None)), ("bias", (1,)), ("thresholds", (n,))):
            t = tensors.get(key)
            if t is None or t.ndim != len(shape) or any(want is not None and got != want
                                                        for got, want in zip(t.shape, shape)):
                raise ValueError(f"multi-label head tensor {key!r} must have shape {shape} (None: any), got "
                                 f"{None if t is None else tuple(t.shape)}")
            if not bool(torch.isfinite(t.float()).all()):
                raise ValueError(f"multi-label head tensor {key!r} holds NaN or infinite values; fit the run again")
        self.tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        self.config = config
        self.register_buffer("thresholds", self.tensors["thresholds"].clone(), persistent=False)

    def compute_class_weights(self) -> Optional[torch.Tensor]:
        return self.tensors["weight"]

    def head(self) -> nn.Module:
        # (B, D) -> per-label logits (B, C), x W^T + b; its sigmoid is each label's probability. The weight is
        # stored as one constant the exporter writes as an initializer (the runtime checks its weights_sha256)
        return LinearHead(self.tensors["weight"], float(self.tensors["bias"][0])).eval()

    def state(self) -> dict[str, torch.Tensor]:
        return {**self.tensors, "thresholds": self.thresholds.detach().cpu().contiguous()}

    def run_fields(self) -> dict[str, Any]:
        return {"method_config": self.config} if self.config is not None else {}

    def evaluate_multilabel(self, data: MultiLabelDataset) -> dict[str, Any]:
        """mAP, per-label AP and F1 at the per-label thresholds on ``data`` (unknown labels skipped)."""
        scores, targets = linear_scores(self, data)
        out = multilabel_report(scores, targets, self.thresholds.numpy())
        out["n"] = int(len(targets))
        return out


def linear_scores(model: MultiLabelHeadModel, data: MultiLabelDataset) -> tuple[np.ndarray, np.ndarray]:
    """Per-label probabilities ``(images, C)`` of the readable images of ``data``, and their targets."""
    feats, targets = encode_multilabel(model.image_encoder(), data, model.backbone.preprocess, 1, model.backbone)
    with torch.no_grad():
        return torch.sigmoid(model.head()(feats[0])).numpy(), targets.numpy()


def _with_thresholds(model: MultiLabelHeadModel, val: Optional[MultiLabelDataset], metrics: dict[str, Any]) -> None:
    """Per-label thresholds with the best F1 on ``val`` (kept at 0.5 without one), and its mAP / F1 in ``metrics``."""
    if val is None:
        return
    scores, targets = linear_scores(model, val)
    model.thresholds.copy_(torch.as_tensor(choose_thresholds(scores, targets), dtype=torch.float32))
    report = multilabel_report(scores, targets, model.thresholds.numpy())
    metrics.update({"val_mAP": report["mAP"], "val_CF1": report["CF1"], "val_OF1": report["OF1"]})


@dataclass
class ZeroShotMultiLabelConfig(ConfigMixin):
    """The zero-shot multi-label baseline's two hand prompts."""

    positive: str = field(default=POSITIVE_TEMPLATE, metadata={"help": "the prompt saying the label applies ({} = name)"})
    negative: str = field(default=NEGATIVE_TEMPLATE, metadata={"help": "the prompt saying it does not ({} = name)"})

    def __post_init__(self) -> None:
        for name in ("positive", "negative"):
            value = getattr(self, name)
            if not isinstance(value, str) or value.count("{}") != 1:
                raise ValueError(f"{name} must be a prompt with one {{}} for the label, got {value!r}")


def zeroshot_multilabel(backbone: "Backbone", classnames: Sequence[str],
                        config: Optional[ZeroShotMultiLabelConfig] = None) -> MultiLabelHeadModel:
    """The zero-shot multi-label model: ``W = exp(logit_scale) * (t_pos - t_neg)`` from two hand prompts per label
    (the softmax over the pair of prompts is the sigmoid of ``x W^T``), thresholds 0.5."""
    config = config or ZeroShotMultiLabelConfig()
    t_pos = template_features(backbone, classnames, [config.positive]).cpu()  # (C, D)
    t_neg = template_features(backbone, classnames, [config.negative]).cpu()  # (C, D)
    weight = logit_scale(backbone) * (t_pos - t_neg)
    n = len(classnames)
    return MultiLabelHeadModel(backbone, classnames, {"weight": weight, "bias": torch.zeros(1),
                                                      "thresholds": torch.full((n,), DEFAULT_THRESHOLD)}, config)


def _fit_zeroshot(backbone: "Backbone", shots: Any, config: Optional[ZeroShotMultiLabelConfig], train: Any, *,
                  progress: bool = False, callback: Any = None) -> tuple[MultiLabelHeadModel, dict[str, Any]]:
    model = zeroshot_multilabel(backbone, shots.dataset.classnames, config)
    metrics: dict[str, Any] = {"epochs": 0, "train_images": 0}
    _with_thresholds(model, shots.val, metrics)
    return model, metrics


@dataclass
class CoOpSigmoidConfig(AslRecipe):
    """CoOp with one sigmoid per label and the ASL, trained with DualCoOp's recipe (its defaults)."""

    n_ctx: int = field(default=16, metadata={"help": "context vectors"})
    csc: bool = field(default=False, metadata={"help": "class-specific context"})
    ctx_init: Optional[str] = field(default=None, metadata={"help": "initialise the context from these words"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ctx_init = self.prompt_config().ctx_init

    def prompt_config(self) -> PromptConfig:
        return PromptConfig(n_ctx=self.n_ctx, csc=self.csc, class_token_position="end", ctx_init=self.ctx_init)


def fit_coop_sigmoid(backbone: "Backbone", train_set: MultiLabelDataset, config: Optional[CoOpSigmoidConfig] = None,
                     *, val_set: Optional[MultiLabelDataset] = None, seed: int = 1,
                     progress: bool = False) -> tuple[MultiLabelHeadModel, dict[str, Any]]:
    """Train the CoOp-sigmoid baseline: one CoOp prompt per label, ``logit = exp(logit_scale) * cos + b`` with a
    learned scalar ``b`` (started at minus the mean initial logit), ASL (sigmoid) with DualCoOp's recipe, on
    cached global image features (the evaluation transform). Returns the model and metrics."""
    config = config or CoOpSigmoidConfig()
    started = time.perf_counter()
    seed_everything(seed)
    learner = PromptLearner(backbone, train_set.classnames, config.prompt_config()).to(backbone.device)
    feats, targets = encode_multilabel(None, train_set, backbone.preprocess, 1, backbone,
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
        lr = dassl_lr(epoch, lr=config.lr, epochs=config.epochs)
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
            total += float(loss.detach())
        losses.append(round(total / n, 6))
    with torch.no_grad():
        tensors = {"weight": (scale * learner.text_features()).cpu(), "bias": bias.detach().reshape(1).cpu(),
                   "thresholds": torch.full((len(train_set.classnames),), DEFAULT_THRESHOLD),
                   "ctx": learner.ctx.detach().cpu()}
    model = MultiLabelHeadModel(backbone, train_set.classnames, tensors, config)
    metrics: dict[str, Any] = {"train_loss": losses[-1] if losses else None, "epochs": config.epochs,
                               "train_images": n, "history": {"loss": losses}}
    _with_thresholds(model, val_set, metrics)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    return model, metrics


def _fit_coop_sigmoid(backbone: "Backbone", shots: Any, config: Optional[CoOpSigmoidConfig], train: Any, *,
                      progress: bool = False, callback: Any = None) -> tuple[MultiLabelHeadModel, dict[str, Any]]:
    return fit_coop_sigmoid(backbone, shots.dataset, config, val_set=shots.val, seed=train.seed, progress=progress)


def _builder(config_cls: type) -> Callable[..., MultiLabelHeadModel]:
    def build(backbone: "Backbone", run: Any, tensors: Optional[dict[str, torch.Tensor]]) -> MultiLabelHeadModel:
        if not tensors:
            raise ValueError(f"a {run.method} run needs its {HEAD_TENSORS_FILE}")
        return MultiLabelHeadModel(backbone, run.classnames, tensors, config_cls.from_dict(run.method_config or {}))
    return build


register(Method(
    name=ZEROSHOT_NAME,
    summary="zero-shot multi-label: a positive against a negative hand prompt per label (sigmoid)",
    build=_builder(ZeroShotMultiLabelConfig),
    config=ZeroShotMultiLabelConfig,
    tensors_file=HEAD_TENSORS_FILE,
    fit=_fit_zeroshot,
    task=TASK,
))
register(Method(
    name=COOP_SIGMOID_NAME,
    summary="CoOp with a sigmoid per label and the asymmetric loss (multi-label baseline)",
    build=_builder(CoOpSigmoidConfig),
    config=CoOpSigmoidConfig,
    tensors_file=HEAD_TENSORS_FILE,
    fit=_fit_coop_sigmoid,
    task=TASK,
))
