"""What every method shares: the fitted model's interface (:class:`MethodModel`), the training
shots a fit receives (:class:`Shots`), and the schedule and seeding helpers of the recipes."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..config import RunConfig, TrainConfig
from ..userdata import Dataset
from ..features import autocast_for, effective_precision, encode_images
from ..heads import HEAD_TENSORS, LinearHead, build_head, check_head_tensors
from ..runtime.contract import (DEFAULT_TEMPLATE, check_prompts_fit, check_templates, coop_prompt_template,
                                fill_templates)
from ..runtime.tokenizers.layout import token_layout

#: The hand-written prompt of zero-shot and of the baselines' text side, unless others are given.
DEFAULT_TEMPLATES = (DEFAULT_TEMPLATE,)
#: The run file of the few-shot baselines' head tensors (:class:`HeadModel`).
HEAD_FILE = "head.safetensors"


class ImageEncoder(nn.Module):
    """The frozen backbone's image encoder as a pure module: normalised pixels ``(b, 3, H, W)`` ->
    unnormalised features ``(b, D)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)  # (b, D)


@dataclass
class TextContext:
    """The learned, class-agnostic text prompt a ``--with-text-encoder`` graph bakes into the text
    tower, so that it weighs any class name as the method's own forward does.

    Attributes:
        ctx: The learned context at the text input ``(n_ctx, width)``: it replaces the first
            ``n_ctx`` tokens of ``template`` after the tokenizer's prefix.
        template: The prompt the runtime tokenises (``{}``: the class name): CoOp's placeholders
            (``"X X X X {}."``), or the deep-prompt methods' own words (``"a photo of a {}."``).
        class_token_position: Where the class name goes (``end``, ``middle``, ``front``; CoOp only).
        deep: The deep text prompts, per text layer ``1 .. J - 1``: ``(n_ctx, width)`` each, in place
            of the context positions before that layer (IVLP, MaPLe, PromptSRC); empty for CoOp.
    """

    ctx: torch.Tensor
    template: str
    class_token_position: str = "end"
    deep: Sequence[torch.Tensor] = ()

    @classmethod
    def of_learner(cls, learner: Any) -> "TextContext":
        """A CoOp prompt learner's unified context over CoOp's placeholder prompt (``"X X ... X {}."``)."""
        return cls(learner.ctx, coop_prompt_template(learner.n_ctx), learner.config.class_token_position)


class MethodModel(nn.Module):
    """A fitted method: what a :class:`coopkit.Classifier` delegates to.

    Subclasses implement :meth:`compute_class_weights` (or override :meth:`head` when the class
    weights depend on the image), :meth:`state` when they trained tensors, and
    :meth:`run_fields`. The frozen backbone is kept as a plain attribute (not a submodule): a
    method's modules are what it adds to it.
    """

    def __init__(self, backbone: Backbone, classnames: Sequence[str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.classnames = list(classnames)
        self._weights: Optional[torch.Tensor] = None

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised pixels -> ``(B, D)`` L2-normalised image features."""
        return F.normalize(self.image_encoder()(pixels).float(), dim=-1)

    def image_encoder(self) -> nn.Module:
        """A pure module pixels -> unnormalised features, the one the exporter traces (default:
        the frozen backbone's encoder)."""
        return ImageEncoder(self.backbone.model)

    @property
    def frozen_encoder(self) -> bool:
        """Whether its image features are the frozen backbone's (it keeps the default
        :meth:`image_encoder`), so features encoded once can be shared with other such models."""
        return type(self).image_encoder is MethodModel.image_encoder

    def compute_class_weights(self) -> Optional[torch.Tensor]:
        """``W = exp(logit_scale) * text features`` ``(C, D)`` float32 on the CPU, or ``None`` when
        the class weights depend on the image."""
        raise NotImplementedError

    @torch.no_grad()
    def class_weights(self) -> Optional[torch.Tensor]:
        """:meth:`compute_class_weights`, computed once (a fitted model does not change)."""
        if self._weights is None:
            self._weights = self.compute_class_weights()
        return self._weights

    def head(self) -> nn.Module:
        """A pure module: L2-normalised image features ``(B, D)`` -> logits ``(B, C)`` (default:
        ``x W^T`` plus the model's logit bias)."""
        weights = self.class_weights()
        assert weights is not None, "a method whose class weights depend on the image overrides head()"
        return LinearHead(weights, self.backbone.logit_bias).eval()

    def state(self) -> dict[str, torch.Tensor]:
        """Exactly what was trained, as saved in the method's ``tensors_file`` (default: nothing)."""
        return {}

    def run_fields(self) -> dict[str, Any]:
        """The fields of :class:`~coopkit.config.RunConfig` this model records besides the method,
        the class names, the backbone and the training settings (e.g. ``method_config``)."""
        return {}

    def text_context(self) -> Optional[TextContext]:
        """The learned text prompt a ``--with-text-encoder`` graph bakes in, or ``None``: the plain text
        tower over the run's templates (zero-shot, CLIP-LoRA's merged tower)."""
        return None

    def with_classes(self, classnames: Sequence[str]) -> "MethodModel":
        """The same model over other class names (base-to-new, open vocabulary)."""
        raise ValueError(f"a {type(self).__name__} holds weights for its training classes only; it has none "
                         "for other class names")


class HeadModel(MethodModel):
    """A few-shot baseline's fitted head (:mod:`coopkit.heads`): a linear probe (``kind="linear"``,
    tensors ``weight``, ``bias``) or Tip-Adapter's cache (``kind="cache"``: ``keys``, ``labels``,
    ``alpha``, ``beta``) over the zero-shot weights of ``templates``.

    Args:
        backbone: The frozen backbone.
        classnames: Labels, in output order.
        method: The method's name (named in errors).
        kind: The kind of head, a key of :data:`coopkit.heads.HEAD_TENSORS`.
        tensors: The head's tensors, saved in ``head.safetensors``.
        templates: Hand-written prompts of the zero-shot part.
    """

    def __init__(self, backbone: Backbone, classnames: Sequence[str], method: str, kind: str,
                 tensors: dict[str, torch.Tensor], templates: Sequence[str]) -> None:
        super().__init__(backbone, classnames)
        self.method, self.kind = method, kind
        self.tensors = dict(tensors)
        self.templates = list(templates)

    def compute_class_weights(self) -> Optional[torch.Tensor]:
        if self.kind == "linear":
            return self.tensors["weight"].detach().float().cpu().contiguous()
        return (logit_scale(self.backbone) * template_features(self.backbone, self.classnames,
                                                               self.templates).cpu()).contiguous()

    def head(self) -> nn.Module:
        return build_head(self.kind, self.tensors, self.class_weights(), self.backbone.logit_bias)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}

    def run_fields(self) -> dict[str, Any]:
        return {"templates": list(self.templates)}

    def with_classes(self, classnames: Sequence[str]) -> "MethodModel":
        raise ValueError(f"a {self.method} head holds weights for its training classes only; it has none for "
                         "other class names")


def build_head_model(backbone: Backbone, config: RunConfig, tensors: Optional[dict[str, torch.Tensor]],
                     kind: str) -> HeadModel:
    """A saved baseline's head again, its tensors checked: those of its kind, of shapes that fit the
    class count, finite."""
    assert kind in HEAD_TENSORS
    tensors = tensors or {}
    width = next((int(tensors[k].shape[-1]) for k in ("weight", "keys") if k in tensors and tensors[k].ndim == 2), 0)
    check_head_tensors(kind, tensors, len(config.classnames), width, config.method)
    if not all(bool(torch.isfinite(t.float()).all()) for t in tensors.values()):
        raise ValueError("the head holds NaN or infinite values; fit the run again")
    return HeadModel(backbone, config.classnames, config.method, kind, tensors, run_templates(config))


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


class Shots:
    """What a method's ``fit`` receives: the few-shot training sample (already drawn), the
    optional validation set, the hand-written templates of the zero-shot side, and encodings made
    once and shared by every method fitted on the same shots.

    Args:
        dataset: The sampled training images.
        val: A labelled validation set, or ``None``.
        templates: Hand-written prompts (zero-shot side of the baselines).
        val_features: Already encoded validation features ``(m, D)`` and labels ``(m,)``, if any.
    """

    def __init__(self, dataset: Dataset, *, val: Optional[Dataset] = None,
                 templates: Sequence[str] = DEFAULT_TEMPLATES,
                 val_features: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        self.dataset = dataset
        self.val = val
        self.templates = check_templates(list(templates))
        self._val_features = val_features
        self._cache: dict[tuple[int, bool], FewShotFeatures] = {}

    @property
    def classnames(self) -> list[str]:
        return list(self.dataset.classnames)

    def features(self, backbone: Backbone, *, views: int = 10, augment: bool = True,
                 progress: bool = False) -> FewShotFeatures:
        """:func:`encode_fewshot` of the shots, encoded on the first call for these settings."""
        key = (views if augment else 1, augment)
        if key not in self._cache:
            self._cache[key] = encode_fewshot(backbone, self.dataset, views=views, augment=augment, progress=progress)
        return self._cache[key]

    def val_features(self, backbone: Backbone) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The validation set's plain features ``(m, D)`` and labels ``(m,)`` (``None`` without one)."""
        if self._val_features is None and self.val is not None:
            val = self.val.relabel(self.classnames)
            feats, kept = encode_images(backbone, val.paths)
            self._val_features = (feats[0], torch.tensor([val.labels[i] for i in kept]))
        return self._val_features


class DivergedError(ValueError):
    """Training diverged (a non-finite loss, context or prototype) with the settings given: bad
    input (exit code 2), its message naming what to change."""


def divergence_hint(lr: float, precision: str, device: torch.device) -> str:
    """What to change after a divergence, naming what is true of this run: its learning rate, and
    the precision it really trains in (fp32 is suggested only to a run that is not in fp32)."""
    used = effective_precision(device, precision)
    if used == "fp32":
        return f"lower lr (now {lr:g}; this run already trains in fp32)"
    return f"lower lr (now {lr:g}) or use precision='fp32' (this run trains in {used})"


def dassl_lr(epoch: int, *, lr: float, epochs: int, warmup_epochs: int = 1, warmup_lr: float = 1e-5) -> float:
    """The learning rate of ``epoch`` (0-based) under Dassl's ``build_lr_scheduler``, the schedule of every
    official trainer coopkit follows (CoOp, CoCoOp, IVLP, MaPLe, PromptSRC, DualCoOp, CLAP):
    ``ConstantWarmupScheduler`` (``WARMUP_RECOUNT=True``) over ``CosineAnnealingLR(T_max=epochs)``, stepped
    once per epoch. ``warmup_lr`` for the ``warmup_epochs`` first epochs, then
    ``lr * (1 + cos(pi * (epoch - warmup_epochs) / epochs)) / 2``: the cosine starts at ``lr`` when the
    warm-up ends and, spread over all ``epochs``, never reaches 0."""
    if epoch < warmup_epochs:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - warmup_epochs) / epochs))


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """:func:`dassl_lr` with a :class:`TrainConfig`'s settings (``lr``, ``resolved_epochs``, warm-up)."""
    return dassl_lr(epoch, lr=cfg.lr, epochs=cfg.resolved_epochs, warmup_epochs=cfg.warmup_epochs,
                    warmup_lr=cfg.warmup_lr)


def end_epoch(history: dict[str, list[float]], stats: dict[str, float], epoch: int, bar: Any,
              callback: Optional[Callable[[int, dict[str, float]], None]]) -> None:
    """Record an epoch's ``stats`` (``loss``, ``accuracy``, ``lr``) in ``history``, show them on the
    progress bar and hand them to ``callback``: the end of every fit loop's epoch."""
    for k, v in stats.items():
        history[k].append(round(float(v), 6))
    bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}")
    if callback is not None:
        callback(epoch, stats)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run_templates(config: RunConfig) -> list[str]:
    """The hand-written templates a run records (zero-shot's, the baselines' text side), or the default."""
    return list(config.templates or DEFAULT_TEMPLATES)


def logit_scale(backbone: Backbone) -> torch.Tensor:
    """``exp(logit_scale)`` of the backbone, float32 on the CPU."""
    return backbone.model.logit_scale.exp().float().cpu()


def template_features(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], chunk: int = 256,
                      *, raw: bool = False) -> torch.Tensor:
    """Hand-written prompt features: mean of normalised template embeddings, renormalised.

    ``raw=True``: the plain mean of the unnormalised embeddings instead (CLAP's prototypes).
    """
    model, tok = backbone.model, backbone.tokenizer
    norm = (lambda x: x) if raw else (lambda x: F.normalize(x, dim=-1))
    out = []
    with torch.no_grad(), autocast_for(backbone.device):
        for start in range(0, len(classnames), chunk):
            names = list(classnames[start : start + chunk])
            per_template = []
            for t in templates:
                tokens = torch.as_tensor(tok(fill_templates(t, names))).to(backbone.device)
                per_template.append(norm(model.encode_text(tokens).float()))
            out.append(norm(torch.stack(per_template).mean(0)))  # (chunk, D)
    return torch.cat(out)


def check_templates_fit(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> None:
    """Refuse filled-in templates too long for the text context (they would be cut silently).

    Checked for the tokenizers coopkit can lay out (CLIP's BPE, Hugging Face); others are trusted.
    """
    tok = backbone.tokenizer
    try:
        n_prefix, n_suffix, _ = token_layout(tok)
    except ValueError:
        return
    for t in templates:
        prompts = fill_templates(t, classnames)
        length = int(tok(prompts[:1]).shape[-1])  # the context length, as the tokenizer pads to it
        check_prompts_fit(prompts, [len(tok.encode(p)) for p in prompts], length, n_prefix + n_suffix)


def train_on_features(
    params: Sequence[torch.Tensor],
    feats: torch.Tensor,
    labels: torch.Tensor,
    batch_loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    *,
    epochs: int,
    batch_size: int,
    lr_of: Callable[[int], float],
    device: torch.device,
    what: str = "the parameters",
    desc: str = "training",
    progress: bool = False,
    callback: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> dict[str, list[float]]:
    """The prompt learners' training loop on cached image features (CoOp's, CoCoOp's).

    Each epoch draws one of the ``views`` of every image (``feats (views, n, D)``) and a new order
    (one generator seeded with ``cfg.seed``), sets the learning rate ``lr_of(epoch)``, and steps SGD
    (``cfg.momentum``, ``cfg.weight_decay``) over ``params`` on ``batch_loss(x (b, D), y (b,)) ->
    (loss, logits (b, C))`` in batches of ``batch_size``, under ``cfg.precision``'s autocast.

    Returns:
        The history: per epoch ``loss`` and ``accuracy`` (over the epoch's batches) and ``lr``.

    Raises:
        DivergedError: the loss, or ``what`` (``params``), became NaN or infinite (a ValueError, exit
            code 2; the message names the epoch, the learning rate and the precision the run trains in).
    """
    from ..runtime.progress import progress_bar

    views, n, _ = feats.shape
    optimizer = torch.optim.SGD(list(params), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "lr": []}
    bar = progress_bar(range(epochs), desc=desc, unit="epoch", enabled=progress)
    for epoch in bar:
        lr = lr_of(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(n, generator=gen)
        view = torch.randint(views, (n,), generator=gen)
        total, correct = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            x = feats[view[idx], idx].to(device)  # (b, D)
            y = labels[idx].to(device)
            with autocast_for(device, cfg.precision):
                loss, logits = batch_loss(x, y)
            if not torch.isfinite(loss):
                raise DivergedError(f"training loss became {loss.item()} at epoch {epoch + 1}/{epochs}; "
                                    + divergence_hint(lr, cfg.precision, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise DivergedError(f"{what} became NaN or infinite at epoch {epoch + 1}/{epochs}; "
                                + divergence_hint(lr, cfg.precision, device))
        end_epoch(history, {"loss": total / n, "accuracy": correct / n, "lr": lr}, epoch, bar, callback)
    bar.close()
    return history


__all__ = ["DEFAULT_TEMPLATES", "HEAD_FILE", "DivergedError", "divergence_hint", "ImageEncoder", "MethodModel", "TextContext",
           "FewShotFeatures", "encode_fewshot", "Shots", "lr_at", "dassl_lr", "end_epoch", "seed_everything",
           "train_on_features", "run_templates", "logit_scale", "HeadModel",
           "build_head_model", "template_features", "check_templates_fit"]
