"""DualCoOp: positive and negative learned prompts with class-specific region aggregation (Sun et al., NeurIPS 2022).

For each class ``c`` two CoOp prompts, a positive ``[SOS] ctx_pos  name_c . [EOS]`` and a negative
``[SOS] ctx_neg name_c . [EOS]``, go through the frozen text tower; the frozen image tower gives a
feature at every spatial position (the attention pool's value path, as the official
``AttentionConv``); per image and class::

    s[k, p] = 20 * <normalise(region feature p), normalise(text feature k)>     # k: 2C prompts, p: HW + 1 positions
    w[c, p] = softmax_p(s[pos c, p])                                             # where class c is, by its positive prompt
    logit[neg or pos, c] = 5 * sum_p w[c, p] * s[neg or pos c, p]                # (B, 2, C)
    probability(c applies) = softmax over (neg, pos) = sigmoid(logit[pos, c] - logit[neg, c])

trained with the asymmetric loss (ASL) on the pair, unknown labels skipped. This is the official
``models/dualcoop.py`` (sunxm2357/DualCoOp, commit 49e71d7) computed on open_clip models, with the
same parameter names (``prompt_learner.ctx_pos``, ``prompt_learner.ctx_neg``);
``tests/test_dualcoop.py`` checks region features, logits, loss and gradients against the official
modules. What differs is how, never what: the image tower is frozen and unprompted, so its region
features are computed once per image and view; the text tower runs CoOp's exact shortcuts
(:class:`coopkit.prompts.PromptLearner`: prompts cut after their end token, shared prefix once, packed
rows); the official code's unused attention weights (a 32-head attention run under ``no_grad`` whose
result DualCoOp discards) are not computed.

Families: the region aggregation reads the value path of CLIP's ModifiedResNet attention pool, so
DualCoOp runs on open_clip's ResNet models (RN50, RN101, RN50x4, RN50x16, RN50x64, with QuickGELU
or GELU text towers, any text tower CoOp handles); other image towers (ViT, ConvNeXt, timm, ...)
are refused in one line, as the official code cannot run them either.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import PromptConfig
from ..multilabel_data import MultiLabelDataset
from ..multilabel_metrics import DEFAULT_THRESHOLD, choose_thresholds, multilabel_report
from ..prompts import PromptLearner
from . import Method, register
from .base import DivergedError, MethodModel, dassl_lr, divergence_hint, seed_everything
from .multilabel import (
    AslRecipe,
    asymmetric_loss,
    check_config_fields,
    encode_multilabel,
    squash_transform,
)

if TYPE_CHECKING:
    from ..backbone import Backbone

logger = logging.getLogger(__name__)

NAME = "dualcoop"
#: The run file holding ``ctx_pos``, ``ctx_neg`` and the per-label ``thresholds``.
TENSORS_FILE = "dualcoop.safetensors"
#: The task of a DualCoOp run: several labels per image.
TASK = "multilabel"
#: The official forward's fixed scales: region similarities x 20, aggregated logits x 5.
REGION_SCALE = 20.0
LOGIT_SCALE = 5.0


@dataclass
class DualCoOpConfig(AslRecipe):
    """DualCoOp's prompts and recipe. Defaults: the official ``utils/build_cfg.py`` + ``opts.py`` +
    ``configs/models/rn*_ep50.yaml`` (SGD lr 0.002, 50 epochs, batch 32, 16 + 16 context vectors,
    ASL gamma_neg 2 / gamma_pos 1 / clip 0.05, loss weight 1)."""

    n_ctx_pos: int = field(default=16, metadata={"help": "positive context vectors (with pos_init: its tokens)"})
    n_ctx_neg: int = field(default=16, metadata={"help": "negative context vectors (with neg_init: its tokens)"})
    csc: bool = field(default=False, metadata={"help": "class-specific contexts (the official --csc)"})
    pos_init: Optional[str] = field(default=None, metadata={
        "help": "initialise the positive context from these words (given with neg_init; None: random, std 0.02)"})
    neg_init: Optional[str] = field(default=None, metadata={
        "help": "initialise the negative context from these words (given with pos_init)"})
    input_size: Optional[int] = field(default=None, metadata={
        "help": "square input side in pixels, a multiple of 32 (the official --input_size: 224, or 448 for "
                "partial-label training); None: the model's own size"})
    loss_weight: float = field(default=1.0, metadata={"help": "multiplies the summed ASL loss (the official --loss_w)"})
    n_views: int = field(default=1, metadata={
        "help": "views cached per training image (1: the evaluation transform; more: the official cutout)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.pos_init is None) != (self.neg_init is None):
            raise ValueError("pos_init and neg_init go together (the official code initialises both from words "
                             f"or neither), got pos_init={self.pos_init!r}, neg_init={self.neg_init!r}")
        self.pos_init = self.prompt_config("pos").ctx_init
        self.neg_init = self.prompt_config("neg").ctx_init
        check_config_fields(self, ints=("n_views",), positive=("loss_weight",))
        if self.input_size is not None and (isinstance(self.input_size, bool) or not isinstance(self.input_size, int)
                                            or self.input_size < 32 or self.input_size % 32):
            raise ValueError(f"input_size must be a multiple of 32 (>= 32) or None, got {self.input_size!r}")

    def prompt_config(self, which: str) -> PromptConfig:
        """The positive (``"pos"``) or negative (``"neg"``) prompt as CoOp's config states it (class name at the end)."""
        n_ctx, init = (self.n_ctx_pos, self.pos_init) if which == "pos" else (self.n_ctx_neg, self.neg_init)
        return PromptConfig(n_ctx=n_ctx, csc=self.csc, class_token_position="end", ctx_init=init or None)


def check_backbone(backbone: "Backbone", config: Optional[DualCoOpConfig] = None) -> None:
    """Refuse, in one line, a backbone whose image tower has no ModifiedResNet attention pool."""
    visual = getattr(backbone.model, "visual", None)
    pool = getattr(visual, "attnpool", None)
    if pool is None or not all(hasattr(pool, n) for n in ("v_proj", "c_proj", "positional_embedding")) \
            or not all(hasattr(visual, n) for n in ("stem", "layer4")):
        raise ValueError(
            f"DualCoOp needs a CLIP ModifiedResNet image tower (open_clip RN50, RN101, RN50x4, RN50x16, RN50x64): its "
            f"region aggregation reads the attention pool's value path; {backbone.name!r} has "
            f"{type(visual).__name__}")


class RegionEncoder(nn.Module):
    """A ModifiedResNet up to its attention pool's value path, at every position (the official ``AttentionConv``).

    ``(B, 3, S, S) -> (B, D, HW + 1)`` unnormalised region features: position 0 is the mean token,
    1.. the ``H x W`` grid. The positional embedding is resized (bicubic) to ``input_size / 32`` once,
    as the official ``build_model_conv_proj`` does, and again at run time for other input sizes, as
    its ``AttentionConv`` does. Holds references to the frozen tower; saves nothing.
    """

    def __init__(self, visual: nn.Module, input_size: Optional[int] = None) -> None:
        super().__init__()
        self.visual = visual
        pos = visual.attnpool.positional_embedding.detach()  # (g0 * g0 + 1, C)
        g0 = math.isqrt(pos.shape[0] - 1)
        grid = g0 if input_size is None else input_size // 32
        if grid != g0:
            pos = torch.cat([pos[:1], _resize_grid(pos[1:], g0, (grid, grid))])  # (grid * grid + 1, C)
        self.grid = grid
        self.register_buffer("positional_embedding", pos.clone(), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = pixels.type(v.conv1.weight.dtype)
        x = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))  # (B, C, h, w)
        _, _, h, w = x.shape
        pos = self.positional_embedding
        if h * w + 1 != pos.shape[0]:
            pos = torch.cat([pos[:1], _resize_grid(pos[1:], self.grid, (h, w))])  # (h * w + 1, C)
        x = x.reshape(x.shape[0], x.shape[1], h * w).permute(2, 0, 1)  # (hw, B, C)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)  # (hw + 1, B, C)
        x = x + pos[:, None, :].to(x.dtype)
        x = F.linear(F.linear(x, v.attnpool.v_proj.weight, v.attnpool.v_proj.bias),
                     v.attnpool.c_proj.weight, v.attnpool.c_proj.bias)  # (hw + 1, B, D)
        return x.permute(1, 2, 0)  # (B, D, hw + 1)


def _resize_grid(pos: torch.Tensor, grid: int, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of grid positional embeddings ``(grid * grid, C) -> (h * w, C)`` (the official steps)."""
    x = pos.permute(1, 0).reshape(1, -1, grid, grid)  # (1, C, grid, grid)
    x = F.interpolate(x, size=size, mode="bicubic")  # (1, C, h, w)
    return x.reshape(-1, size[0] * size[1]).permute(1, 0)  # (h * w, C)


class DualPromptLearner(nn.Module):
    """The positive and negative CoOp prompts of every class (the official ``MLCPromptLearner``).

    Two CoOp learners over the same frozen tower, ``pos`` and ``neg``, whose contexts are ``ctx_pos``
    ``(n_ctx_pos, width)`` (``(n_cls, n_ctx_pos, width)`` with ``csc``) and ``ctx_neg``, the only
    parameters; the prompts run through :class:`~coopkit.prompts.PromptLearner`'s exact text-tower paths.
    """

    def __init__(self, backbone: "Backbone", classnames: Sequence[str], config: DualCoOpConfig, *,
                 text_chunk_size: int = 256) -> None:
        super().__init__()
        self.pos = PromptLearner(backbone, classnames, config.prompt_config("pos"), text_chunk_size=text_chunk_size)
        self.neg = PromptLearner(backbone, classnames, config.prompt_config("neg"), text_chunk_size=text_chunk_size)
        self.classnames = self.pos.classnames
        self.n_cls = self.pos.n_cls

    @property
    def ctx_pos(self) -> nn.Parameter:
        return self.pos.ctx

    @property
    def ctx_neg(self) -> nn.Parameter:
        return self.neg.ctx

    def text_features(self) -> torch.Tensor:
        """L2-normalised features ``(2 * n_cls, D)``: negatives first, then positives (the official order)."""
        return torch.cat([self.neg.text_features(), self.pos.text_features()])

    forward = text_features


def aggregate(regions: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Class-specific region aggregation: normalised regions ``(B, P, D)`` and normalised text ``(2C, D)``
    (negatives, then positives) -> logits ``(B, 2, C)`` (``[:, 0]`` negative, ``[:, 1]`` positive)."""
    sim = REGION_SCALE * torch.einsum("bpd,kd->bkp", regions, text.to(regions.dtype))  # (B, 2C, P)
    b, c2, _ = sim.shape
    w = F.softmax(sim[:, c2 // 2 :], dim=-1)  # (B, C, P): where each class is, by its positive prompt
    logits = LOGIT_SCALE * (sim * torch.cat([w, w], dim=1)).sum(-1)  # (B, 2C)
    return logits.view(b, 2, c2 // 2)  # (B, 2, C)


class RegionTokens(nn.Module):
    """Pixels -> unnormalised region features ``(B, HW + 1, D)`` (the layout the classifier and the
    exporter L2-normalise on the last dimension)."""

    def __init__(self, regions: RegionEncoder) -> None:
        super().__init__()
        self.regions = regions

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.regions(pixels).transpose(1, 2)  # (B, D, P) -> (B, P, D)


class DualCoOpHead(nn.Module):
    """Normalised region features ``(B, P, D)`` -> per-label logits ``(B, C)``: ``logit_pos - logit_neg``,
    so ``sigmoid`` gives the official positive probability (``softmax`` over the pair). The text features
    are fixed after training: a constant ``(2C, D)`` buffer."""

    def __init__(self, text: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("text", text.detach().float().clone(), persistent=False)  # (2C, D)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        pair = aggregate(regions, self.text)  # (B, 2, C)
        return pair[:, 1] - pair[:, 0]


class DualCoOp(MethodModel):
    """The fitted (or trainable) DualCoOp model on a frozen open_clip ResNet.

    ``forward(pixels)`` gives the official logits ``(B, 2, C)``; :meth:`head` maps normalised region
    features to per-label logits ``(B, C)`` whose sigmoid is each label's probability; ``thresholds``
    ``(C,)`` are the per-label decision thresholds on that probability (0.5 until chosen on validation data).
    """

    #: The kind of answer: several labels per image, each with its own probability (sigmoid of a logit).
    task = TASK

    def __init__(self, backbone: "Backbone", classnames: Sequence[str], config: Optional[DualCoOpConfig] = None, *,
                 text_chunk_size: int = 256) -> None:
        config = config or DualCoOpConfig()
        if not isinstance(config, DualCoOpConfig):
            raise ValueError(f"config must be a DualCoOpConfig, got {type(config).__name__}")
        check_backbone(backbone, config)
        prompt_learner = DualPromptLearner(backbone, classnames, config, text_chunk_size=text_chunk_size)
        super().__init__(backbone, prompt_learner.classnames)
        self.config = config
        self.prompt_learner = prompt_learner
        self.image_regions = RegionEncoder(backbone.model.visual, config.input_size)
        self.input_size = self.image_regions.grid * 32
        self.register_buffer("thresholds", torch.full((len(self.classnames),), DEFAULT_THRESHOLD), persistent=False)

    @property
    def preprocess(self) -> Callable[[Any], torch.Tensor]:
        """DualCoOp's evaluation transform: stretch to ``input_size`` squared (no crop), normalise."""
        return squash_transform(self.backbone, self.input_size)

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """:attr:`preprocess` under open_clip's names (what an exported file records): the backbone's
        mean and std, a bilinear stretch (torchvision's ``Resize`` default) to ``input_size`` squared."""
        return {**self.backbone.preprocess_cfg, "size": (self.input_size, self.input_size), "resize_mode": "squash",
                "interpolation": "bilinear"}

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> L2-normalised region features ``(B, HW + 1, D)``."""
        return F.normalize(self.image_encoder()(pixels).float(), dim=-1)

    def pair_logits(self, regions: torch.Tensor) -> torch.Tensor:
        """Normalised region features ``(B, P, D)`` -> the official logits ``(B, 2, C)``."""
        return aggregate(regions, self.prompt_learner.text_features())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pair_logits(self.encode_image(pixels))

    # --- what the classifier, the exporter and a saved run read ---

    def image_encoder(self) -> nn.Module:
        """Pixels -> unnormalised region features ``(B, HW + 1, D)`` (normalised on the last dimension next)."""
        return RegionTokens(self.image_regions)

    def head(self) -> nn.Module:
        """Normalised region features ``(B, P, D)`` -> per-label logits ``(B, C)``."""
        with torch.no_grad():
            return DualCoOpHead(self.prompt_learner.text_features().cpu()).eval()

    def compute_class_weights(self) -> Optional[torch.Tensor]:
        """None: the logits are no single matrix product (a softmax over regions sits between)."""
        return None

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        """The ``(2C, D)`` prompt features: negatives, then positives."""
        return self.prompt_learner.text_features().float().cpu()

    def state(self) -> dict[str, torch.Tensor]:
        """What was trained: ``ctx_pos``, ``ctx_neg`` (the official names without the module path) and the
        per-label ``thresholds``."""
        return {"ctx_pos": self.prompt_learner.ctx_pos.detach().cpu().contiguous(),
                "ctx_neg": self.prompt_learner.ctx_neg.detach().cpu().contiguous(),
                "thresholds": self.thresholds.detach().cpu().float().contiguous()}

    def run_fields(self) -> dict[str, Any]:
        return {"method_config": self.config}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Put saved tensors in place (``thresholds`` optional); refuses other keys or shapes in one line."""
        own = self.state()
        if not {"ctx_pos", "ctx_neg"} <= set(tensors) <= set(own):
            raise ValueError(f"DualCoOp tensors must be {sorted(own)}, got {sorted(tensors)}")
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"DualCoOp tensor {k} has shape {tuple(v.shape)}; this model and config need "
                                 f"{tuple(own[k].shape)} (n_ctx, csc and the class count must match)")
            if not bool(torch.isfinite(v.float()).all()):
                raise ValueError(f"DualCoOp tensor {k} holds NaN or infinite values; fit the run again")
        with torch.no_grad():
            self.prompt_learner.ctx_pos.copy_(tensors["ctx_pos"])
            self.prompt_learner.ctx_neg.copy_(tensors["ctx_neg"])
            if "thresholds" in tensors:
                self.thresholds.copy_(tensors["thresholds"])

    def with_classes(self, classnames: Sequence[str]) -> "DualCoOp":
        """The same contexts over other labels (DualCoOp's zero-shot setting: unseen labels), thresholds 0.5.
        Class-specific contexts (``csc``) have no prompt for other labels and are refused."""
        if self.config.csc:
            raise ValueError("this DualCoOp model has class-specific contexts (csc=True): it holds prompts for its "
                             "training labels only, none for other label names")
        state = self.state()
        model = make(self.backbone, classnames, self.config, {"ctx_pos": state["ctx_pos"], "ctx_neg": state["ctx_neg"]})
        return model

    def evaluate_multilabel(self, data: MultiLabelDataset) -> dict[str, Any]:
        """mAP, per-label AP and F1 at the model's per-label thresholds on ``data`` (unknown labels skipped)."""
        scores, targets = predict_scores(self, data)
        out = multilabel_report(scores, targets, self.thresholds.cpu().numpy())
        out["n"] = int(len(targets))
        return out


def make(backbone: "Backbone", classnames: Sequence[str], config: DualCoOpConfig,
         tensors: Optional[dict[str, torch.Tensor]] = None) -> DualCoOp:
    """A fitted DualCoOp from its tensors (``ctx_pos``, ``ctx_neg``, optional ``thresholds``)."""
    model = DualCoOp(backbone, classnames, config).to(backbone.device)
    if tensors is not None:
        model.load_state({k: v.to(backbone.device) for k, v in tensors.items()})
    model.requires_grad_(False)
    return model


def build(backbone: "Backbone", run: Any, tensors: Optional[dict[str, torch.Tensor]]) -> DualCoOp:
    """The registry's ``build``: a saved run's DualCoOp again (its config from ``method_config``)."""
    if not tensors:
        raise ValueError("a DualCoOp run needs its tensors file (ctx_pos, ctx_neg, thresholds)")
    return make(backbone, run.classnames, DualCoOpConfig.from_dict(run.method_config or {}), tensors)


def _official_contexts(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ctx_pos`` / ``ctx_neg`` of an official state dict (``module.``-prefixed under DataParallel), float32."""
    keys = {"ctx_pos": "prompt_learner.ctx_pos", "ctx_neg": "prompt_learner.ctx_neg"}
    for prefix in ("", "module."):  # the official code wraps the model in DataParallel on several GPUs
        if all(isinstance(state_dict.get(prefix + k), torch.Tensor) for k in keys.values()):
            return {k: state_dict[prefix + v].detach().float() for k, v in keys.items()}
    raise ValueError(f"not a DualCoOp checkpoint: no {sorted(keys.values())} in its state_dict")


def official_config(state_dict: dict[str, torch.Tensor], **overrides: Any) -> DualCoOpConfig:
    """The config an official checkpoint's contexts were trained with (their lengths, class-specific or
    not), with ``overrides`` (e.g. ``input_size``)."""
    ctx = _official_contexts(state_dict)
    return DualCoOpConfig(**{"n_ctx_pos": int(ctx["ctx_pos"].shape[-2]), "n_ctx_neg": int(ctx["ctx_neg"].shape[-2]),
                             "csc": ctx["ctx_pos"].ndim == 3, **overrides})


def importer(state_dict: dict[str, torch.Tensor], classnames: Sequence[str], backbone: "Backbone",
             config: Optional[DualCoOpConfig] = None) -> DualCoOp:
    """The official ``train.py`` checkpoint's ``state_dict`` (``prompt_learner.ctx_pos`` / ``ctx_neg``;
    the backbone's own weights in it are ignored: coopkit's backbone is used) -> a DualCoOp model
    (``config``: default :func:`official_config`)."""
    return make(backbone, classnames, config or official_config(state_dict), _official_contexts(state_dict))


def train(backbone: "Backbone", train_set: MultiLabelDataset, config: Optional[DualCoOpConfig] = None, *,
          val_set: Optional[MultiLabelDataset] = None, seed: int = 1, progress: bool = False,
          callback: Optional[Callable[[int, dict[str, float]], None]] = None,
          text_chunk_size: int = 256) -> tuple[DualCoOp, dict[str, Any]]:
    """Train DualCoOp's two contexts with the official recipe on cached region features.

    SGD (momentum 0.9, weight decay 5e-4) over ``ctx_pos`` and ``ctx_neg``, Dassl's schedule (one
    epoch at 1e-5, then cosine with ``T_max = epochs``), the ASL on the (negative, positive) pair
    summed over the batch and multiplied by ``loss_weight``; unknown labels (-1) skipped.
    With ``val_set``, per-label thresholds with the best F1 on it are chosen and its mAP reported.

    Returns ``(model, metrics)``.
    """
    config = config or DualCoOpConfig()
    check_backbone(backbone, config)
    started = time.perf_counter()
    seed_everything(seed)  # the contexts' random init, the cutout's draws
    model = DualCoOp(backbone, train_set.classnames, config, text_chunk_size=text_chunk_size).to(backbone.device)
    augment = config.n_views > 1
    transform = squash_transform(backbone, model.input_size, augment=augment)
    feats, targets = encode_multilabel(model.image_encoder(), train_set, transform, config.n_views, backbone,
                                       progress=progress)  # (views, n, P, D), (n, C)
    params = [model.prompt_learner.ctx_pos, model.prompt_learner.ctx_neg]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    views, n = feats.shape[:2]
    history: dict[str, list[float]] = {"loss": [], "lr": []}
    for epoch in range(config.epochs):
        lr = dassl_lr(epoch, lr=config.lr, epochs=config.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order, view = torch.randperm(n, generator=gen), torch.randint(views, (n,), generator=gen)
        total = 0.0
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            x = feats[view[idx], idx].to(backbone.device)  # (b, P, D)
            logits = model.pair_logits(x)  # (b, 2, C)
            loss = config.loss_weight * asymmetric_loss(logits, targets[idx].to(backbone.device), config.gamma_neg,
                                                        config.gamma_pos, config.asl_clip)
            if not torch.isfinite(loss):
                raise DivergedError(f"DualCoOp loss became {loss.item()} at epoch {epoch + 1}/{config.epochs}; "
                                    + divergence_hint(lr, "fp32", backbone.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        history["loss"].append(round(total / n, 6))
        history["lr"].append(lr)
        if callback is not None:
            callback(epoch, {"loss": total / n, "lr": lr})
    model.requires_grad_(False)
    metrics: dict[str, Any] = {"train_loss": history["loss"][-1] if history["loss"] else None,
                               "epochs": config.epochs, "train_images": n, "history": history}
    if val_set is not None:
        scores, vt = predict_scores(model, val_set)
        model.thresholds.copy_(torch.as_tensor(choose_thresholds(scores, vt), dtype=torch.float32))
        report = multilabel_report(scores, vt, model.thresholds.cpu().numpy())
        metrics.update({"val_mAP": report["mAP"], "val_CF1": report["CF1"], "val_OF1": report["OF1"]})
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    logger.info("fitted DualCoOp on %d images, %d labels in %.1fs", n, len(train_set.classnames), metrics["seconds"])
    return model, metrics


def fit(backbone: "Backbone", shots: Any, config: Optional[DualCoOpConfig], train_config: Any, *,
        progress: bool = False, callback: Optional[Callable[[int, dict[str, float]], None]] = None
        ) -> tuple[DualCoOp, dict[str, Any]]:
    """The registry's ``fit``: :func:`train` on ``shots.dataset`` (a :class:`MultiLabelDataset`),
    thresholds on ``shots.val``, seeded by ``train_config.seed``."""
    return train(backbone, shots.dataset, config, val_set=shots.val, seed=train_config.seed, progress=progress,
                 callback=callback, text_chunk_size=train_config.text_chunk_size)


def predict_scores(model: DualCoOp, data: MultiLabelDataset) -> tuple[np.ndarray, np.ndarray]:
    """Per-label probabilities ``(images, C)`` of the readable images of ``data``, and their targets."""
    feats, targets = encode_multilabel(model.image_encoder(), data, model.preprocess, 1, model.backbone)
    with torch.no_grad():
        logits = model.head()(feats[0])  # (n, C)
    return torch.sigmoid(logits).numpy(), targets.numpy()


register(Method(
    name=NAME,
    summary="DualCoOp: learned positive and negative prompts per label with region aggregation (multi-label)",
    build=build,
    config=DualCoOpConfig,
    tensors_file=TENSORS_FILE,
    fit=fit,
    importer=importer,
    check_backbone=check_backbone,
    task=TASK,
))
