"""CoCoOp: conditional prompt learning (Zhou et al., CVPR 2022), on any open_clip text tower CoOp handles.

CoOp's context vectors, shifted per image by a small meta-net of the image's features::

    shift = linear2(relu(linear1(normalise(image features))))     # (b, width), linear1: D -> D // 16
    prompt[i, c] = [prefix] + (ctx + shift[i]) + class tokens of c + "." + [end]
    logits[i, c] = exp(logit_scale) * <normalise(image features[i]), normalise(text(prompt[i, c]))> (+ logit bias)

as the official ``trainers/cocoop.py`` (KaiyangZhou/CoOp) computes it, with the same parameter
names (``ctx``, ``meta_net.linear1``, ``meta_net.linear2``), so its checkpoints load as they are.

What differs is how it is computed, never what: the official code encodes every image again at
every step and runs the text tower image by image over full-length (77-token) prompts. Here the
image encoder is frozen and unprompted, so its features are computed once; and the prompts of
all images and classes go through the text tower together, with CoOp's exact shortcuts
(:class:`coopkit.prompts.PromptLearner`): prompts cut after their end token, each image's prefix
and context run once for all its classes (keys and values reused), rows of all prompt lengths
packed into one matrix for the token-wise layers. ``tests/test_cocoop.py`` checks features,
logits and gradients against the official modules.

Because the class weights depend on the image, a CoCoOp classifier has no class weight matrix:
its head (:class:`CoCoOpHead`) maps normalised image features to logits through the meta-net,
the prompts and the text tower, and an exported file holds all three (its cost grows with the
number of classes).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..config import ConfigMixin, PromptConfig, RunConfig, TrainConfig
from ..prompts import PromptLearner, TextTower
from . import Method, register
from .base import MethodModel, Shots, dassl_lr, logit_scale, seed_everything, train_on_features

NAME = "cocoop"
#: The run file holding what CoCoOp trained: ``ctx`` and the meta-net's tensors, under the official names.
TENSORS_FILE = "cocoop.safetensors"

#: Epochs of every official CoCoOp config.
OFFICIAL_EPOCHS = 10
#: The meta-net's bottleneck: hidden width = image feature width // 16 (fixed in the official code).
META_REDUCTION = 16
#: Rows (image x class x prompt position) a head evaluates at once outside tracing: bounds memory
#: when many images meet many classes (training and tracing run one pass).
HEAD_ROWS_PER_PASS = 1 << 16


@dataclass
class CoCoOpConfig(ConfigMixin):
    """CoCoOp's prompt and recipe. Defaults: the paper's ``vit_b16_c4_ep10_batch1_ctxv1`` config.

    The optimiser settings (SGD lr 0.002, momentum 0.9, weight decay 5e-4, one warm-up epoch at
    1e-5, cosine) are the training config's, whose defaults are the same as the official
    CoCoOp's; only the epochs and the batch size differ from CoOp's and live here.
    """

    n_ctx: int = field(default=4, metadata={
        "help": "number of learned context vectors (with ctx_init: the number of its tokens)"})
    ctx_init: Optional[str] = field(default="a photo of a", metadata={
        "help": "initialise the context from these words (None, '' or 'none': random, std 0.02, as the "
                "official CTX_INIT: \"\")"})
    epochs: Optional[int] = field(default=OFFICIAL_EPOCHS, metadata={"help": "epochs (None: the official configs' 10)"})
    batch_size: int = field(default=1, metadata={"help": "images per step (the official configs: 1)"})

    def __post_init__(self) -> None:
        if isinstance(self.ctx_init, str) and self.ctx_init.strip().lower() in ("", "none"):
            self.ctx_init = None  # the official configs' CTX_INIT: "" (and the command line's way to say None)
        self.ctx_init = self.prompt_config().ctx_init  # PromptConfig checks n_ctx and ctx_init, normalises the words
        if self.epochs is None:  # e.g. coopkit bench's "the method's own epochs"
            self.epochs = OFFICIAL_EPOCHS
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")

    def prompt_config(self) -> PromptConfig:
        """The prompt as CoOp's config states it (CoCoOp: one unified context, class name at the end)."""
        return PromptConfig(n_ctx=self.n_ctx, csc=False, class_token_position="end", ctx_init=self.ctx_init)


def meta_net_widths(backbone: Backbone) -> tuple[int, int]:
    """The meta-net's input width (the image features') and hidden width (``// 16``).

    Raises:
        ValueError: image features narrower than :data:`META_REDUCTION` (no hidden unit).
    """
    dim = backbone.embed_dim
    if dim // META_REDUCTION < 1:
        raise ValueError(f"model {backbone.name!r}: image features of width {dim} leave the meta-net no hidden "
                         f"unit (width // {META_REDUCTION}); CoCoOp needs image features of width >= {META_REDUCTION}")
    return dim, dim // META_REDUCTION


class CoCoOpPromptLearner(PromptLearner):
    """CoCoOp's prompt learner: CoOp's unified context plus the meta-net that shifts it per image.

    Args:
        backbone: The frozen backbone (referenced, not owned).
        classnames: Labels, in output order.
        config: :class:`CoCoOpConfig` (default ``CoCoOpConfig()``).
        text_chunk_size: Classes per pass through the text tower (with ``b`` images, a pass
            holds ``b`` times as many prompts).

    Attributes:
        ctx: ``(n_ctx, width)``, as CoOp's.
        meta_net: ``linear1 (D -> D // 16) -> ReLU -> linear2 (D // 16 -> width)``, named as the
            official module's. ``state_dict()`` holds exactly ``ctx`` and the meta-net's four tensors.
    """

    def __init__(self, backbone: Backbone, classnames: Sequence[str], config: Optional[CoCoOpConfig] = None, *,
                 text_chunk_size: int = 256) -> None:
        if config is not None and not isinstance(config, CoCoOpConfig):
            raise ValueError(f"config must be a CoCoOpConfig, got {type(config).__name__}")
        config = config or CoCoOpConfig()
        super().__init__(backbone, classnames, config.prompt_config(), text_chunk_size=text_chunk_size)
        self.cocoop = config
        vis_dim, hidden = meta_net_widths(backbone)
        self.meta_net = nn.Sequential(OrderedDict([
            ("linear1", nn.Linear(vis_dim, hidden)),
            ("relu", nn.ReLU(inplace=True)),
            ("linear2", nn.Linear(hidden, self.tower.width)),
        ])).to(self.tower.device)

    def conditioned_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """L2-normalised class text features of each image's prompts ``(b, n_classes, embed_dim)``
        from L2-normalised image features ``(b, D)``."""
        shift = self.meta_net(image_features.to(self.meta_net.linear1.weight.dtype))  # (b, width)
        return self.text_features(shift)

    def logits(self, image_features: torch.Tensor, logit_scale: torch.Tensor,
               logit_bias: Optional[float] = None) -> torch.Tensor:
        """``(b, n_classes)``: each image's features against its own class features, scaled (+ bias)."""
        text = self.conditioned_features(image_features)  # (b, C, D)
        logits = logit_scale * (text @ image_features.float().unsqueeze(-1)).squeeze(-1)  # (b, C)
        return logits if logit_bias is None else logits + logit_bias


class CoCoOpHead(nn.Module):
    """L2-normalised image features ``(b, D)`` -> logits ``(b, n_classes)`` through the meta-net,
    the image-conditioned prompts and the text tower: what a CoCoOp classifier scores with, and
    what the exporter traces (the learner's parameters and the text tower become the graph's).

    Outside tracing, large batches go in slices of at most :data:`HEAD_ROWS_PER_PASS` prompt
    positions (the answers are the same; memory stays bounded).
    """

    def __init__(self, learner: CoCoOpPromptLearner, logit_scale: float, logit_bias: Optional[float] = None) -> None:
        super().__init__()
        self.learner = learner
        self.tower_parts = nn.ModuleList(learner.tower.parts)  # registered, so the text tower moves with the head
        self.register_buffer("scale", torch.tensor(float(logit_scale), dtype=torch.float32))
        self.logit_bias = None if logit_bias is None else float(logit_bias)
        rows = int(learner.n_cls * (learner.length - learner.n_shared))
        self.images_per_pass = max(1, HEAD_ROWS_PER_PASS // max(1, rows))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.to(torch.float32)
        if torch.jit.is_tracing() or x.shape[0] <= self.images_per_pass:
            return self.learner.logits(x, self.scale, self.logit_bias).float()
        parts = [self.learner.logits(c, self.scale, self.logit_bias).float() for c in x.split(self.images_per_pass)]
        return torch.cat(parts)  # (b, C)


class CoCoOpModel(MethodModel):
    """A fitted CoCoOp classifier: the frozen backbone's encoder and the learner.

    ``class_weights()`` is ``None``: the class weights depend on each image, so :meth:`head` carries
    the meta-net, the prompts and the text tower (see the module docstring).
    """

    def __init__(self, backbone: Backbone, learner: CoCoOpPromptLearner) -> None:
        super().__init__(backbone, learner.classnames)
        self.learner = learner

    @property
    def config(self) -> CoCoOpConfig:
        return self.learner.cocoop

    def compute_class_weights(self) -> Optional[torch.Tensor]:
        return None

    def head(self) -> nn.Module:
        return CoCoOpHead(self.learner, float(logit_scale(self.backbone)), self.backbone.logit_bias).eval()

    def state(self) -> dict[str, torch.Tensor]:
        """What was trained, under the official names: ``ctx`` and ``meta_net.linear{1,2}.{weight,bias}``."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.learner.state_dict().items()}

    def run_fields(self) -> dict[str, Any]:
        return {"method_config": self.config}

    def with_classes(self, classnames: Sequence[str]) -> "CoCoOpModel":
        """The same context and meta-net over other class names (CoCoOp's base-to-new setting)."""
        return _frozen(self.backbone, classnames, self.config, self.state(), self.learner.text_chunk_size)


def _frozen(backbone: Backbone, classnames: Sequence[str], config: CoCoOpConfig,
            tensors: Optional[dict[str, torch.Tensor]], text_chunk_size: int = 256) -> CoCoOpModel:
    learner = CoCoOpPromptLearner(backbone, classnames, config, text_chunk_size=text_chunk_size)
    if tensors is not None:
        load_learner_state(learner, tensors, "the CoCoOp tensors")
    learner.requires_grad_(False)
    return CoCoOpModel(backbone, learner.eval())


def build(backbone: Backbone, config: RunConfig, tensors: Optional[dict[str, torch.Tensor]]) -> CoCoOpModel:
    """A saved CoCoOp run again: its settings, context and meta-net over its class names (tensors that
    do not fit, or are not finite, refused in one line)."""
    if tensors is None:
        raise ValueError(f"a {NAME} run needs its {TENSORS_FILE}")
    if not all(bool(torch.isfinite(t.float()).all()) for t in tensors.values()):
        raise ValueError("the CoCoOp tensors hold NaN or infinite values; fit the run again")
    cfg = CoCoOpConfig.from_dict(config.method_config) if config.method_config is not None else CoCoOpConfig()
    chunk = config.train.text_chunk_size if config.train else 256
    return _frozen(backbone, config.classnames, cfg, tensors, chunk)


def check_backbone(backbone: Backbone, config: Optional[CoCoOpConfig] = None) -> None:
    """Refuse, in one line, a backbone CoCoOp cannot run on: image features narrower than the
    meta-net's reduction (16), or a text tower CoOp's prompt learner does not know."""
    TextTower.of(backbone.model)
    meta_net_widths(backbone)


def load_learner_state(learner: CoCoOpPromptLearner, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy ``ctx`` and the meta-net's tensors into ``learner`` (in its dtype), checking names and shapes."""
    own = learner.state_dict()
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or extra:
        raise ValueError(f"{what} do not fit CoCoOp: missing {missing}, unexpected {extra}; expected {sorted(own)}")
    bad = [f"{k} {tuple(tensors[k].shape)} (expects {tuple(v.shape)})" for k, v in own.items()
           if tuple(tensors[k].shape) != tuple(v.shape)]
    if bad:
        raise ValueError(f"{what} do not fit this model and these classes: {'; '.join(bad)}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(tensors[k].to(v.dtype))


#: Entries of an official prompt-learner state dict that its ``load_model`` drops (fixed token embeddings).
OFFICIAL_IGNORED = ("token_prefix", "token_suffix")


def import_official(state_dict: dict[str, Any], classnames: Sequence[str], backbone: Backbone,
                    config: Optional[CoCoOpConfig] = None) -> CoCoOpModel:
    """A model from the official trainer's ``prompt_learner`` state dict (``model.pth.tar-N``'s
    ``state_dict``, read with coopkit's safe unpickler): ``ctx`` and the meta-net, fp16 or fp32.

    As the official ``load_model``, ``token_prefix`` / ``token_suffix`` are dropped (they are rebuilt
    from ``classnames``). ``config`` defaults to the checkpoint's own shape (``n_ctx`` from ``ctx``;
    the init words do not change a trained model). Refused in one line: other entries, a
    class-specific context, or shapes that do not fit the backbone.
    """
    state = {k[len("prompt_learner."):] if k.startswith("prompt_learner.") else k: v for k, v in state_dict.items()}
    tensors = {k: v for k, v in state.items() if k not in OFFICIAL_IGNORED}
    ctx = tensors.get("ctx")
    if not isinstance(ctx, torch.Tensor) or ctx.ndim != 2:
        shape = tuple(ctx.shape) if isinstance(ctx, torch.Tensor) else None
        raise ValueError(f"not a CoCoOp prompt learner: ctx is {shape}, expected (n_ctx, width) (CoCoOp has no "
                         "class-specific context)")
    if config is None:
        config = CoCoOpConfig(n_ctx=int(ctx.shape[0]), ctx_init=None)
    elif config.n_ctx != ctx.shape[0] and config.ctx_init is None:
        raise ValueError(f"the checkpoint has {ctx.shape[0]} context vectors, the config n_ctx={config.n_ctx}")
    return _frozen(backbone, classnames, config, {k: v.float() for k, v in tensors.items()})


def fit(backbone: Backbone, shots: Shots, config: Optional[CoCoOpConfig] = None, train: Optional[TrainConfig] = None,
        *, progress: bool = False,
        callback: Optional[Callable[[int, dict[str, float]], None]] = None) -> tuple[CoCoOpModel, dict[str, Any]]:
    """Fit CoCoOp on the shots' cached features (``train.n_views`` augmented views per image, one
    drawn per epoch; encoded once and shared with the other methods fitted on the same shots).

    The recipe is the official one: SGD (``train.lr``, ``momentum``, ``weight_decay``) over the
    context and the meta-net, ``train.warmup_epochs`` at ``train.warmup_lr`` then Dassl's cosine
    (:func:`coopkit.methods.base.dassl_lr`) over ``config.epochs``, batches of ``config.batch_size`` images,
    cross-entropy (plus the model's logit bias in the logits, as coopkit scores SigLIP models).

    Returns:
        The fitted model and its metrics (``train_loss``, ``train_accuracy``, ``epochs``,
        ``train_images``, ``seconds``, ``history``).

    Raises:
        ValueError: a class without a readable training image.
        DivergedError: the loss or the parameters became NaN or infinite (a ValueError, exit code 2; the
            message names the epoch).
    """
    config = config or CoCoOpConfig()
    train = train or TrainConfig()
    started = time.perf_counter()
    seed_everything(train.seed)
    encoded = shots.features(backbone, views=train.n_views, augment=train.augment, progress=progress)
    missing = sorted(set(range(len(encoded.classnames))) - set(encoded.labels.tolist()))
    if missing:
        raise ValueError(f"no readable training images for classes {[encoded.classnames[i] for i in missing]}")
    learner = CoCoOpPromptLearner(backbone, encoded.classnames, config, text_chunk_size=train.text_chunk_size)
    history = train_loop(learner, backbone, encoded.feats, encoded.labels, config, train, progress=progress,
                         callback=callback)
    learner.requires_grad_(False)
    metrics: dict[str, Any] = {
        "train_loss": history["loss"][-1],
        "train_accuracy": history["accuracy"][-1],
        "epochs": config.epochs,
        "train_images": int(len(encoded.labels)),
        "seconds": round(time.perf_counter() - started, 2),
        "history": history,
    }
    return CoCoOpModel(backbone, learner.eval()), metrics


def train_loop(
    learner: CoCoOpPromptLearner,
    backbone: Backbone,
    feats: torch.Tensor,
    labels: torch.Tensor,
    config: CoCoOpConfig,
    train: TrainConfig,
    *,
    progress: bool = False,
    callback: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> dict[str, list[float]]:
    """The training loop on cached L2-normalised features ``feats (views, n, D)`` and ``labels (n,)``."""
    scale = backbone.model.logit_scale.exp().float().to(backbone.device)
    bias = backbone.logit_bias
    params = [p for p in learner.parameters() if p.requires_grad]  # ctx and the meta-net (as the official optimiser)

    def batch_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = learner.logits(x, scale, bias)  # (b, n_cls): each image against its own class features
        return F.cross_entropy(logits.float(), y), logits

    def lr_of(epoch: int) -> float:
        return dassl_lr(epoch, lr=train.lr, epochs=config.epochs, warmup_epochs=train.warmup_epochs,
                        warmup_lr=train.warmup_lr)

    learner.train()
    history = train_on_features(params, feats, labels, batch_loss, train, epochs=config.epochs,
                                batch_size=config.batch_size, lr_of=lr_of,
                                device=backbone.device, what="the CoCoOp parameters", desc="training CoCoOp",
                                progress=progress, callback=callback)
    learner.eval()
    return history


register(Method(
    name=NAME,
    summary="CoCoOp: CoOp's context shifted per image by a meta-net of the image features (class weights per image)",
    build=build,
    config=CoCoOpConfig,
    tensors_file=TENSORS_FILE,
    fit=fit,
    importer=import_official,
    protocols=("fewshot", "base2new", "shift"),
    bench_default=(NAME,),
    bench_default_protocols=("base2new", "shift"),  # few-shot: only when named (its per-image text tower is slow)
    prompt_grid=True,  # CoOp's n_ctx x positions grid in bench fewshot, as before the registry flag
    text_graph=False,
    check_backbone=check_backbone,
))
