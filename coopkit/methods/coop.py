"""CoOp (Zhou et al., IJCV 2022): learned context vectors before the class name, everything else frozen;
with ``TrainConfig.kg_weight > 0``, KgCoOp (Yao et al., CVPR 2023) keeps the learned prompt near a
hand-written one.

Recipe (the official CoOp defaults): SGD with momentum 0.9 and weight decay 5e-4, lr 0.002,
one warm-up epoch at a constant 1e-5, then a cosine schedule over the epochs; batch 32;
epochs by shots (50 / 100 / 200). Only the context vectors receive gradients, on cached frozen
image features. A run records the prompt settings (``config.json``'s ``prompt``) and the context
in ``ctx.safetensors`` (one tensor ``ctx``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..backbone import Backbone
from ..config import PromptConfig, RunConfig, TrainConfig
from ..features import autocast_for, encode_images
from ..prompts import PromptLearner, TextTower
from . import Method, register
from .base import (MethodModel, Shots, TextContext, logit_scale, lr_at, seed_everything, template_features,
                   train_on_features)

NAME = "coop"
#: The run file holding the learned context.
CTX_FILE = "ctx.safetensors"


class CoOpModel(MethodModel):
    """A fitted CoOp prompt: its class weights come from the learned context through the text tower.

    Args:
        backbone: The frozen backbone.
        learner: The prompt learner holding the context (frozen here).
    """

    def __init__(self, backbone: Backbone, learner: PromptLearner) -> None:
        super().__init__(backbone, learner.classnames)
        self.learner = learner

    @property
    def config(self) -> PromptConfig:
        return self.learner.config

    @property
    def text_tower(self) -> TextTower:
        """The backbone's text tower, as the prompt learner and the exporter's text graph see it."""
        return self.learner.tower

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features ``(n_classes, embed_dim)``, float32."""
        with autocast_for(self.backbone.device):
            return self.learner.text_features().float()

    def compute_class_weights(self) -> Optional[torch.Tensor]:
        return (logit_scale(self.backbone) * self.text_features().cpu()).contiguous()

    def state(self) -> dict[str, torch.Tensor]:
        return {"ctx": self.learner.ctx.detach().float().cpu().contiguous()}

    def run_fields(self) -> dict[str, Any]:
        return {"prompt": self.learner.config}

    def text_context(self) -> Optional[TextContext]:
        """The learned context over CoOp's placeholder prompt (``"X X ... X {}."``)."""
        return TextContext.of_learner(self.learner)

    def with_classes(self, classnames: Sequence[str]) -> "CoOpModel":
        """Unified context is class-agnostic and carries over as it is; class-specific context has
        no vectors for unseen classes, so it is refused."""
        if self.learner.config.csc:
            raise ValueError("a class-specific-context run has no context for new classes; fit with csc=False")
        return CoOpModel(self.backbone, frozen_learner(self.backbone, classnames, self.learner.config,
                                                       self.learner.ctx, self.learner.text_chunk_size))


def frozen_learner(backbone: Backbone, classnames: Sequence[str], config: PromptConfig, ctx: torch.Tensor,
                   text_chunk_size: int = 256) -> PromptLearner:
    """A prompt learner over ``classnames`` holding ``ctx``, frozen, on the backbone's device.

    Raises:
        ValueError: a context whose shape does not fit the backbone, the settings and the class count.
    """
    learner = PromptLearner(backbone, classnames, config, text_chunk_size=text_chunk_size).to(backbone.device)
    if tuple(ctx.shape) != tuple(learner.ctx.shape):
        raise ValueError(f"context of shape {tuple(ctx.shape)} does not fit {backbone.name} (expects "
                         f"{tuple(learner.ctx.shape)})")
    with torch.no_grad():
        learner.ctx.copy_(ctx)
    learner.requires_grad_(False)
    return learner


def kg_penalty(text: torch.Tensor, hand: torch.Tensor) -> torch.Tensor:
    """KgCoOp's term: mean over classes of ``1 - cos(learned feature, hand-written-prompt feature)``.

    Both inputs are L2-normalised ``(n_classes, embed_dim)``.
    """
    return (1 - (text * hand).sum(-1)).mean()


def fit(backbone: Backbone, shots: Shots, config: PromptConfig, train: TrainConfig, *, progress: bool = False,
        callback: Optional[Callable[[int, dict[str, float]], None]] = None) -> tuple[CoOpModel, dict[str, Any]]:
    """Fit the context on the shots' cached features (``train.n_views`` views each). Returns the model
    and its metrics (``train_loss``, ``train_accuracy``, ``epochs``, ``train_images``, ``seconds``,
    ``history``).

    Raises:
        ValueError: a class without a readable training image.
        DivergedError: the loss or the context became NaN or infinite (a ValueError; the message names
            the epoch, the learning rate and the precision the run trains in).
    """
    started = time.perf_counter()
    seed_everything(train.seed)
    sample = shots.dataset
    feats, kept = encode_images(
        backbone, sample.paths, transform=backbone.train_preprocess if train.augment else backbone.preprocess,
        views=train.n_views, strict=train.strict, progress=progress, desc="encoding training views",
        precision=train.precision,
    )  # (views, n, D)
    labels = torch.tensor([sample.labels[i] for i in kept])
    missing = sorted(set(range(len(sample.classnames))) - set(labels.tolist()))
    if missing:
        raise ValueError(f"no readable training images for classes {[sample.classnames[i] for i in missing]}")

    learner = PromptLearner(backbone, sample.classnames, config, text_chunk_size=train.text_chunk_size)
    learner = learner.to(backbone.device)
    hand = None
    if train.kg_weight > 0:
        hand = template_features(backbone, sample.classnames, [train.kg_template]).to(backbone.device)
    history = _train_loop(learner, backbone, feats, labels, train, hand, progress, callback)
    learner.requires_grad_(False)
    metrics: dict[str, Any] = {
        "train_loss": history["loss"][-1],
        "train_accuracy": history["accuracy"][-1],
        "epochs": train.resolved_epochs,
        "train_images": int(len(labels)),
        "seconds": round(time.perf_counter() - started, 2),
        "history": history,
    }
    return CoOpModel(backbone, learner), metrics


def _train_loop(
    learner: PromptLearner,
    bb: Backbone,
    feats: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    hand: Optional[torch.Tensor],
    progress: bool,
    callback: Optional[Callable[[int, dict[str, float]], None]],
) -> dict[str, list[float]]:
    scale = bb.model.logit_scale.exp().float().to(bb.device)
    bias = bb.logit_bias  # scored as the head scores: + the logit bias where the model has one

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text = learner.text_features()  # (n_cls, D)
        logits = scale * x @ text.float().T  # (b, n_cls)
        if bias is not None:
            logits = logits + bias
        loss = F.cross_entropy(logits.float(), y)
        if hand is not None:
            loss = loss + cfg.kg_weight * kg_penalty(text.float(), hand)
        return loss, logits

    return train_on_features([learner.ctx], feats, labels, batch_loss, cfg, epochs=cfg.resolved_epochs,
                             batch_size=cfg.batch_size, lr_of=lambda epoch: lr_at(epoch, cfg), device=bb.device,
                             what="the context vectors", progress=progress, callback=callback)


def check_context(ctx: torch.Tensor, config: PromptConfig, n_classes: int) -> None:
    """Refuse a saved context that is not one finite float32 tensor of the shape the prompt settings
    give (the width is checked against the backbone when the learner is built)."""
    lead = (n_classes, config.n_ctx) if config.csc else (config.n_ctx,)
    if ctx.dtype != torch.float32 or ctx.ndim != len(lead) + 1 or tuple(ctx.shape[:-1]) != lead:
        shape = f"({', '.join(map(str, lead))}, width)"
        raise ValueError(f"context is {ctx.dtype} {tuple(ctx.shape)}, expected float32 {shape} for "
                         f"{n_classes} classes, n_ctx={config.n_ctx}, csc={config.csc}")
    if not bool(torch.isfinite(ctx).all()):
        raise ValueError("the context holds NaN or infinite values; retrain the run")


def check_tensors(tensors: Optional[dict[str, torch.Tensor]], config: RunConfig) -> torch.Tensor:
    """The context of a saved run's ``ctx.safetensors``, checked (:func:`check_context`)."""
    if config.prompt is None:
        raise ValueError("a coop run needs prompt settings")
    if tensors is None or set(tensors) != {"ctx"}:
        raise ValueError(f"must hold exactly one tensor 'ctx', holds {sorted(tensors or {})}")
    check_context(tensors["ctx"], config.prompt, len(config.classnames))
    return tensors["ctx"]


def build(backbone: Backbone, config: RunConfig, tensors: Optional[dict[str, torch.Tensor]]) -> CoOpModel:
    """A saved CoOp run again: its prompt settings and context over its class names."""
    ctx = check_tensors(tensors, config)
    assert config.prompt is not None
    chunk = config.train.text_chunk_size if config.train else 256
    return CoOpModel(backbone, frozen_learner(backbone, config.classnames, config.prompt, ctx, chunk))


def import_official(state_dict: dict[str, torch.Tensor], classnames: Sequence[str], backbone: Backbone,
                    config: PromptConfig) -> CoOpModel:
    """The official CoOp trainer's prompt learner (its ``ctx``; KgCoOp's too) as a fitted model.

    ``config.n_ctx`` and ``config.csc`` are read from the context's shape; ``class_token_position``
    is the official run's.

    Raises:
        ValueError: no ``ctx``, or a context that does not fit the model or the class count.
    """
    if "ctx" not in state_dict:
        raise ValueError(f"no 'ctx' tensor among {sorted(state_dict)[:8]}")
    ctx = state_dict["ctx"].float()
    csc = ctx.ndim == 3
    if csc and ctx.shape[0] != len(classnames):
        raise ValueError(f"class-specific context for {ctx.shape[0]} classes, but {len(classnames)} class names given")
    prompt = PromptConfig(n_ctx=int(ctx.shape[-2]), csc=csc, class_token_position=config.class_token_position)
    return CoOpModel(backbone, frozen_learner(backbone, classnames, prompt, ctx))


register(Method(
    name=NAME,
    summary="CoOp: learned context vectors before the class name (KgCoOp with kg_weight > 0)",
    build=build,
    config=PromptConfig,
    config_field="prompt",
    tensors_file=CTX_FILE,
    fit=fit,
    importer=import_official,
    protocols=("fewshot", "base2new", "shift"),
    text_graph=True,
    variants={"coop-csc": {"csc": True}},
    prompt_grid=True,
    bench_default=(NAME, "coop-csc"),
))
