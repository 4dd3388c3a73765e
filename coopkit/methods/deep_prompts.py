"""Deep prompts inside open_clip's own transformers: the shared core of IVLP, MaPLe and PromptSRC.

The three methods (Khattak et al.: MaPLe and its independent vision-language baseline IVLP,
CVPR 2023; PromptSRC, ICCV 2023) learn prompt tokens that enter the first ``J`` layers of the
image and the text transformers. They differ only in where the tokens come from (IVLP and
PromptSRC: free parameters on each side; MaPLe: the image tokens are linear projections of the
text tokens) and in the training loss (PromptSRC's self-regulation). This module holds what they
share, written once, on open_clip's modules (nothing of OpenAI's CLIP is copied):

* :func:`encode_image`: the image tower with prompt tokens appended after the patch tokens
  (after the positional embedding, before ``ln_pre``, as the official ``VisionTransformer``
  does), replaced between blocks ``1 .. J-1`` by each layer's own tokens (the official
  ``ResidualAttentionBlock_IVLP`` / ``_MaPLe`` drop the previous layer's prompt outputs and put
  the new tokens in their place), and dropped before pooling;
* :class:`ClassPrompts`: the text side, ``[SOS] + context + class name + "." + [EOT]`` with the
  context tokens at the input and replaced the same way between text blocks; prompts are cut
  after the longest end token (exact for a causal tower pooled at its end token: later
  positions cannot reach it);
* :class:`DeepPromptModel`: the fitted model every method returns (logits, the export
  interface, saved tensors), and :class:`PromptedImageEncoder`, the pure module the exporter
  traces (the prompts are constant buffers);
* :func:`train_deep_prompts`: the training loop (Dassl's SGD, constant warm-up and cosine
  schedule, random resized crop + flip per step, the prompted image encoder run each step).

Families: open_clip's own ``VisionTransformer`` (OpenAI CLIP, LAION / DataComp / MetaCLIP ViTs,
CLIPA, MetaCLIP 2, ...) with open_clip's text transformer. Other image towers (``ModifiedResNet``;
timm's: ConvNeXt, SigLIP, EVA, PE-Core, ViTamin, MobileCLIP) take no image prompts (IVLP's text
prompts alone still run on them), and Hugging Face or CoCa text towers none at all: refused in
one line by :func:`check_towers`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime.configbase import ConfigMixin, check_float, check_int
from ..features import autocast_for
from ..prompts import ClipTower, TextTower, run_block
from ..runtime.contract import PLACEHOLDER, PROMPT_SUFFIX, check_classnames, prompt_name
from ..runtime.tokenizers.layout import token_layout
from . import Method, register
from .base import (DivergedError, MethodModel, Shots, TextContext, dassl_lr, divergence_hint, logit_scale,
                   seed_everything)

if TYPE_CHECKING:
    from ..backbone import Backbone
    from ..config import RunConfig, TrainConfig

logger = logging.getLogger(__name__)

#: The run file holding the learned prompts (every method of this family).
PROMPTS_FILE = "prompts.safetensors"



def _vision_blocks(model: nn.Module, method: str) -> nn.Module:
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__ if visual is not None else "none"
        raise ValueError(
            f"{method} puts prompt tokens into the image transformer; this model's image tower ({kind}) is not "
            "open_clip's VisionTransformer (the tokens go between open_clip's own transformer blocks; ResNet and "
            "timm towers are refused)"
        )
    if not getattr(visual.transformer, "batch_first", True):
        raise ValueError(f"{method} needs a batch-first image transformer (open_clip >= 2.20)")
    if visual.attn_pool is not None:
        raise ValueError(f"{method}: image towers with attention pooling (CoCa) are not supported")
    return visual.transformer.resblocks


def text_tower(model: nn.Module, method: str) -> ClipTower:
    """The model's text tower, if ``method`` can prompt it (open_clip's text transformer)."""
    try:
        tower = TextTower.of(model)
    except ValueError as e:
        raise ValueError(f"{method}: {e}") from None
    if not isinstance(tower, ClipTower):
        raise ValueError(
            f"{method} puts prompt tokens into the text transformer; this model's text tower is a Hugging Face "
            f"model ({type(tower.source.transformer).__name__}), not open_clip's text transformer"
        )
    if tower.cls_emb is not None or tower.pad_mask:
        raise ValueError(f"{method}: text towers with an appended CLS token or a padding mask (CoCa) are not supported")
    if not hasattr(tower.transformer, "resblocks") or not getattr(tower.transformer, "batch_first", True):
        raise ValueError(f"{method} needs open_clip's batch-first text transformer")
    return tower


def check_towers(model: nn.Module, method: str, depth_text: int, depth_vision: int) -> tuple[int, int]:
    """Refuse, in one line, a model ``method`` cannot prompt to these depths; ``(text, vision)`` layers."""
    text_layers = len(text_tower(model, method).transformer.resblocks)
    vision_layers = len(_vision_blocks(model, method)) if depth_vision > 0 else len(
        getattr(getattr(getattr(model, "visual", None), "transformer", None), "resblocks", ()) or ())
    if depth_text > text_layers:
        raise ValueError(f"{method}: text prompt depth {depth_text} exceeds the text transformer's {text_layers} layers")
    if depth_vision > 0 and depth_vision > vision_layers:
        raise ValueError(
            f"{method}: vision prompt depth {depth_vision} exceeds the image transformer's {vision_layers} layers")
    return text_layers, vision_layers


# --- the image side -------------------------------------------------------------------------------


def encode_image(visual: nn.Module, pixels: torch.Tensor, ctx: Optional[torch.Tensor],
                 deep: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """Unnormalised image features ``(B, embed_dim)`` of an open_clip ``VisionTransformer`` with prompts.

    ``ctx (n, width)`` is appended after the patch tokens of the input (``None``: no prompts);
    ``deep[i] (n, width)`` replaces them before block ``i + 1``. The prompt tokens are dropped
    before pooling (with CLIP's class-token pooling this changes nothing).
    """
    x = visual._embeds(pixels)  # (B, 1 + grid ** 2, width), after ln_pre
    if ctx is None:
        n = 0
    else:
        n = ctx.shape[0]
        b = x.shape[0]
        # ln_pre acts per token: applied to the prompts alone, it equals the official ln_pre(cat(x, prompts))
        x = torch.cat([x, visual.ln_pre(ctx.to(x.dtype)).unsqueeze(0).expand(b, -1, -1)], dim=1)  # (B, T + n, width)
    for i, blk in enumerate(visual.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, :-n], deep[i - 1].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        x = run_block(blk, x)
    if n:
        x = x[:, :-n]  # (B, T, width): the prompt outputs are not image tokens
    pooled, _ = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled


class PromptedImageEncoder(nn.Module):
    """A pure module ``pixels (B, 3, H, W) -> unnormalised features (B, embed_dim)``: the image tower
    with constant deep prompts (buffers), what the exporter traces."""

    def __init__(self, visual: nn.Module, ctx: Optional[torch.Tensor], deep: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("ctx", None if ctx is None else ctx.detach().float().clone())  # (n, width)
        deep_t = torch.stack([d.detach().float() for d in deep]) if len(deep) else None  # (J - 1, n, width)
        self.register_buffer("deep", deep_t)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.ctx is None:  # an unprompted image tower (IVLP with vision depth 0): the model's own
            return self.visual(pixels)
        deep = list(self.deep.unbind(0)) if self.deep is not None else []
        return encode_image(self.visual, pixels, self.ctx, deep)


# --- the text side --------------------------------------------------------------------------------


def initial_context(backbone: "Backbone", n_ctx: int, ctx_init: Optional[str]) -> tuple[str, torch.Tensor]:
    """The official initialisation: ``(prompt prefix text, context (n_ctx, width) float32)``.

    With ``ctx_init`` and ``n_ctx <= 4`` (the official rule), the context starts as the embeddings
    of the first ``n_ctx`` tokens of ``ctx_init`` and the prompt text is ``ctx_init`` itself (so with
    ``n_ctx=2`` and ``"a photo of a"``, "a photo" is learned and "of a" stays as words); otherwise
    random normal (std 0.02) with ``n_ctx`` placeholder words.
    """
    tower = text_tower(backbone.model, "deep prompts")
    n_prefix, _, _ = token_layout(backbone.tokenizer)
    if ctx_init and n_ctx <= 4:
        text = ctx_init.replace("_", " ")
        ids = backbone.tokenizer.encode(text)
        if len(ids) < n_ctx:
            raise ValueError(f"ctx_init {ctx_init!r} gives {len(ids)} tokens; n_ctx={n_ctx} needs at least as many")
        tokens = torch.as_tensor(backbone.tokenizer([text])).to(tower.device)  # (1, L)
        with torch.no_grad():
            ctx = tower.embed(tokens)[0, n_prefix : n_prefix + n_ctx].float().clone()  # (n_ctx, width)
        return text, ctx
    ctx = torch.empty(n_ctx, tower.width).normal_(std=0.02)
    return " ".join([PLACEHOLDER] * n_ctx), ctx.to(tower.device)


class ClassPrompts(nn.Module):
    """The text side for a label set: token rows and their fixed embeddings (non-persistent buffers).

    The prompt of class ``c`` is ``prefix_text + " " + name + "."``; positions ``p .. p + n_ctx``
    (``p``: the tokenizer's prefix, 1 for CLIP) hold the learned context.
    """

    def __init__(self, backbone: "Backbone", classnames: Sequence[str], prefix_text: str, n_ctx: int) -> None:
        super().__init__()
        self.classnames = check_classnames(classnames)
        tower = text_tower(backbone.model, "deep prompts")
        self.tower = tower
        tok = backbone.tokenizer
        n_prefix, n_suffix, _ = token_layout(tok)
        texts = [f"{prefix_text} {prompt_name(n)}{PROMPT_SUFFIX}" for n in self.classnames]
        tokens = torch.as_tensor(tok(texts)).to(tower.device)  # (n_cls, context_length)
        context_length = tokens.shape[1]
        too_long = [c for c, t in zip(self.classnames, texts) if n_prefix + len(tok.encode(t)) + n_suffix > context_length]
        if too_long:
            raise ValueError(f"class names {too_long[:3]} do not fit the text context of {context_length} tokens "
                             f"after the prompt {prefix_text!r}; shorten them")
        head = tok.encode(prefix_text)[:n_ctx]
        moved = [c for c, r in zip(self.classnames, tokens.tolist()) if r[n_prefix : n_prefix + n_ctx] != head]
        if moved:
            raise ValueError(f"the tokenizer merges the prompt words {prefix_text!r} with the class names {moved[:3]}")
        if tower.exact_cut:
            length = int(tower.pool_index(tokens).max()) + 1  # causal, pooled at the end token: cut after it
        else:
            length = context_length
        with torch.no_grad():
            emb = tower.embed(tokens[:, :length])  # (n_cls, length, width)
        self.n_prefix, self.n_ctx, self.length = n_prefix, n_ctx, length
        self.register_buffer("tokens", tokens[:, :length], persistent=False)  # (n_cls, length)
        self.register_buffer("token_prefix", emb[:, :n_prefix].clone(), persistent=False)  # (n_cls, p, width)
        self.register_buffer("token_suffix", emb[:, n_prefix + n_ctx :].clone(), persistent=False)  # (n_cls, rest, width)

    def forward(self, ctx: torch.Tensor, deep: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        """Unnormalised class features ``(n_cls, embed_dim)`` with context ``ctx (n_ctx, width)`` at the
        input and ``deep[i] (n_ctx, width)`` in place of the context positions before block ``i + 1``."""
        t = self.tower
        n_cls, p, n = self.tokens.shape[0], self.n_prefix, self.n_ctx
        dtype = self.token_prefix.dtype
        x = torch.cat([self.token_prefix, ctx.to(dtype).unsqueeze(0).expand(n_cls, -1, -1), self.token_suffix],
                      dim=1)  # (n_cls, length, width)
        x = x + t.positional_embedding[: self.length].to(dtype)
        mask = t.attn_mask[: self.length, : self.length] if t.attn_mask is not None else None
        x = t.run_blocks(x, mask, deep, p)  # (n_cls, length, width)
        from open_clip.transformer import text_global_pool

        # ln_final acts per token: pooling first and normalising after equals open_clip's order
        pooled = text_global_pool(x, self.tokens, t.pool_type, eos_token_id=t.eos_id)  # (n_cls, width)
        return t.project(pooled)  # (n_cls, embed_dim)


# --- the fitted model -----------------------------------------------------------------------------


@dataclass
class Prompts:
    """Every prompt token of one forward pass (tensors keep their autograd history)."""

    text_ctx: torch.Tensor  # (n_text, text_width): at the text input
    text_deep: Sequence[torch.Tensor]  # per text layer 1 .. J_t - 1: (n_text, text_width)
    vision_ctx: Optional[torch.Tensor]  # (n_vision, vision_width), or None: an unprompted image tower
    vision_deep: Sequence[torch.Tensor]  # per image layer 1 .. J_v - 1: (n_vision, vision_width)


class DeepPromptModel(MethodModel):
    """A fitted (or fitting) deep-prompt model over a frozen backbone: subclasses own the learned
    tensors (their parameters) and say how they become :class:`Prompts`.

    The backbone is referenced, never owned: :meth:`state_dict` and :meth:`state` hold only the
    learned tensors (the class prompts' token embeddings are non-persistent buffers).
    """

    method = ""

    def __init__(self, backbone: "Backbone", classnames: Sequence[str], prefix_text: str, n_ctx: int,
                 config: Any) -> None:
        super().__init__(backbone, check_classnames(classnames))
        self.config = config
        self.prefix_text = prefix_text
        self.classes = ClassPrompts(backbone, self.classnames, prefix_text, n_ctx)

    def prompts(self) -> Prompts:
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """Exactly what was trained (float32, CPU, contiguous), as saved in the run."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}

    def run_fields(self) -> dict[str, Any]:
        return {"method_config": self.config.to_dict()}

    def text_features(self, prompts: Optional[Prompts] = None) -> torch.Tensor:
        """L2-normalised class text features ``(n_classes, embed_dim)``, float32."""
        p = prompts or self.prompts()
        return F.normalize(self.classes(p.text_ctx, p.text_deep).float(), dim=-1)

    def image_features(self, pixels: torch.Tensor, prompts: Optional[Prompts] = None) -> torch.Tensor:
        """L2-normalised image features ``(B, embed_dim)`` of normalised pixels ``(B, 3, H, W)``, float32."""
        p = prompts or self.prompts()
        visual = self.backbone.model.visual
        if p.vision_ctx is None:  # an unprompted image tower (IVLP with vision depth 0)
            return F.normalize(visual(pixels).float(), dim=-1)
        return F.normalize(encode_image(visual, pixels, p.vision_ctx, p.vision_deep).float(), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_features(pixels)

    @property
    def frozen_encoder(self) -> bool:
        """True only without image prompts (IVLP with ``prompt_depth_vision=0``): then the image features are
        the frozen backbone's and features encoded once can be shared."""
        return self.prompts().vision_ctx is None

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """``exp(logit_scale) * image . text`` (+ the model's logit bias) ``(B, n_classes)``."""
        p = self.prompts()
        scale = self.backbone.model.logit_scale.exp().float()
        out = scale * self.image_features(pixels, p) @ self.text_features(p).T  # (B, n_cls)
        bias = self.backbone.logit_bias
        return out if bias is None else out + bias

    forward = logits

    # --- what the exporter reads ---

    @torch.no_grad()
    def image_encoder(self) -> nn.Module:
        """The pure image encoder with its constant deep prompts (buffers)."""
        p = self.prompts()
        return PromptedImageEncoder(self.backbone.model.visual, p.vision_ctx, p.vision_deep).eval()

    @torch.no_grad()
    def compute_class_weights(self) -> Optional[torch.Tensor]:
        """``W = exp(logit_scale) * text features`` ``(n_classes, embed_dim)``, float32 on the CPU (constant)."""
        with autocast_for(self.backbone.device):
            text = self.text_features()
        return (logit_scale(self.backbone) * text.cpu()).contiguous()

    @torch.no_grad()
    def text_context(self) -> Optional[TextContext]:
        """The learned text context over the prompt words (``"a photo of a {}."``, its first ``n_ctx`` tokens
        replaced) and the deep text prompts: a text graph with them weighs new class names as
        :meth:`text_features` does."""
        p = self.prompts()
        return TextContext(p.text_ctx.detach(), f"{self.prefix_text} {{}}{PROMPT_SUFFIX}", "end",
                           [d.detach() for d in p.text_deep])

    def with_classes(self, classnames: Sequence[str]) -> "DeepPromptModel":
        """The same learned prompts over other class names (base-to-new): every prompt is class-agnostic."""
        return load_tensors(build_seeded(type(self), self.backbone, classnames, self.config, 0), self.state())

    def train(self, mode: bool = True) -> "DeepPromptModel":
        self._weights = None  # the class weights are constant only once training is over
        return super().train(mode)


def load_tensors(model: DeepPromptModel, tensors: Optional[dict[str, torch.Tensor]]) -> DeepPromptModel:
    """``model`` holding the saved ``tensors``, frozen; a one-line ValueError for missing, extra, misshapen
    or non-finite tensors (the settings in the run's config give the shapes)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in (tensors or {}).items()}
    if set(got) != set(expected):
        raise ValueError(f"{model.method} run must hold the tensors {sorted(expected)}, holds {sorted(got)}")
    bad = {k: got[k] for k in expected if got[k] != expected[k]}
    if bad:
        raise ValueError(f"{model.method} tensors of shapes {bad} do not fit the backbone and settings "
                         f"(expected {({k: expected[k] for k in bad})})")
    assert tensors is not None
    if not all(bool(torch.isfinite(t.float()).all()) for t in tensors.values()):
        raise ValueError(f"the {model.method} prompts hold NaN or infinite values; fit the run again")
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(tensors[k].to(v.dtype))
    return model.eval().requires_grad_(False)


def learned_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The method's trainable tensors (its own parameters; the backbone is not a submodule)."""
    return [p for p in model.parameters() if p.requires_grad]


# --- training -------------------------------------------------------------------------------------


@dataclass
class DeepPromptRecipe(ConfigMixin):
    """What every deep-prompt method's config holds besides its tokens: the prompt words and the recipe
    the official configs set per method (``CTX_INIT``, ``OPTIM.LR``, ``OPTIM.MAX_EPOCH``, the batch size).
    Defaults: IVLP's and MaPLe's base-to-new configs."""

    ctx_init: Optional[str] = field(default="a photo of a", metadata={
        "help": "words whose embeddings start the text context when it has <= 4 tokens (CTX_INIT; empty: random)"})
    lr: float = field(default=0.0035, metadata={"help": "peak SGD learning rate (OPTIM.LR)"})
    epochs: int = field(default=5, metadata={"help": "epochs (OPTIM.MAX_EPOCH)"})
    batch_size: int = field(default=4, metadata={"help": "images per step (DATALOADER.TRAIN_X.BATCH_SIZE)"})

    def __post_init__(self) -> None:
        if self.ctx_init is not None and not isinstance(self.ctx_init, str):
            raise ValueError(f"ctx_init must be words or None, got {self.ctx_init!r}")
        check_float("lr", self.lr, positive=True)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)


#: ``extra_loss(model, prompts, pixels, labels, logits, image_features, text_features) -> loss term``
ExtraLoss = Callable[..., torch.Tensor]


def training_step(model: DeepPromptModel, pixels: torch.Tensor, labels: torch.Tensor,
                  optimizer: torch.optim.Optimizer, *, extra_loss: Optional[ExtraLoss] = None,
                  precision: str = "auto", where: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """One step: the prompted logits of ``pixels (b, 3, H, W)``, cross-entropy (+ ``extra_loss``), backward,
    the optimizer's step. Returns the loss and the logits ``(b, n_cls)`` (detached).

    Raises:
        DivergedError: the loss is NaN or infinite (a ValueError, exit code 2; ``where`` says when;
            nothing is stepped).
    """
    bb = model.backbone
    with autocast_for(bb.device, precision):
        p = model.prompts()
        img = model.image_features(pixels, p)  # (b, D)
        text = model.text_features(p)  # (n_cls, D)
        logits = bb.model.logit_scale.exp().float() * img @ text.T  # (b, n_cls)
        if bb.logit_bias is not None:
            logits = logits + bb.logit_bias
        loss = F.cross_entropy(logits, labels)
        if extra_loss is not None:
            loss = loss + extra_loss(model, pixels, logits, img, text)
    if not torch.isfinite(loss):
        raise DivergedError(f"training loss became {loss.item()} at {where or 'a step'}; "
                            + divergence_hint(optimizer.param_groups[0]["lr"], precision, bb.device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


def train_deep_prompts(
    model: DeepPromptModel,
    images: Sequence[Any],
    labels: torch.Tensor,
    recipe: DeepPromptRecipe,
    train: "TrainConfig",
    *,
    extra_loss: Optional[ExtraLoss] = None,
    on_epoch_end: Optional[Callable[[int], None]] = None,
    progress: bool = False,
    callback: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> dict[str, list[float]]:
    """The official training loop (Dassl ``TrainerX`` with these methods' ``forward_backward``).

    Each epoch visits the images in a random order in batches of ``recipe.batch_size`` (the last
    incomplete batch dropped, as Dassl's loader does when there are enough images), each image
    freshly augmented (``backbone.train_preprocess``: random resized crop 0.08-1 and flip, or the
    evaluation transform with ``train.augment=False``); loss: cross-entropy of the prompted logits
    (+ ``extra_loss``); SGD with ``train.momentum`` / ``train.weight_decay`` over the learned tensors;
    learning rate :func:`dassl_lr` per epoch. ``images`` are decoded PIL images.
    """
    from ..runtime.progress import progress_bar

    bb = model.backbone
    device = bb.device
    transform = bb.train_preprocess if train.augment else bb.preprocess
    params = learned_parameters(model)
    optimizer = torch.optim.SGD(params, lr=recipe.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    gen = torch.Generator().manual_seed(train.seed)
    n = len(images)
    bs = recipe.batch_size
    drop_last = n >= bs
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "lr": []}
    model.train()
    bar = progress_bar(range(recipe.epochs), desc=f"training {model.method}", unit="epoch", enabled=progress)
    for epoch in bar:
        lr = dassl_lr(epoch, lr=recipe.lr, epochs=recipe.epochs, warmup_epochs=train.warmup_epochs,
                      warmup_lr=train.warmup_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(n, generator=gen)
        total, correct, seen = 0.0, 0, 0
        stop = n - n % bs if drop_last else n
        for start in range(0, stop, bs):
            idx = order[start : start + bs]
            pixels = torch.stack([transform(images[i]) for i in idx.tolist()]).to(device)  # (b, 3, H, W)
            y = labels[idx].to(device)
            loss, logits = training_step(model, pixels, y, optimizer, extra_loss=extra_loss,
                                         precision=train.precision,
                                         where=f"epoch {epoch + 1}/{recipe.epochs} (lr {lr:g})")
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        stats = {"loss": total / max(seen, 1), "accuracy": correct / max(seen, 1), "lr": lr}
        for k, v in stats.items():
            history[k].append(round(float(v), 6))
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}")
        if callback is not None:
            callback(epoch, stats)
    bar.close()
    model.eval()
    model.requires_grad_(False)
    return history


def build_seeded(model_cls: type, backbone: "Backbone", classnames: Sequence[str], config: Any, seed: int) -> Any:
    """``model_cls(backbone, classnames, config)`` with its random prompts drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(backbone, classnames, config)


def fit_deep_prompts(
    model: DeepPromptModel,
    shots: Shots,
    train: "TrainConfig",
    recipe: DeepPromptRecipe,
    *,
    extra_loss: Optional[ExtraLoss] = None,
    on_epoch_end: Optional[Callable[[int], None]] = None,
    progress: bool = False,
    callback: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> dict[str, Any]:
    """Train ``model`` (built on the shots' class names) on the few-shot sample; the metrics dict."""
    started = time.perf_counter()
    if train.epochs is not None and train.epochs != recipe.epochs:
        logger.warning("%s trains for its own epochs (%d, the method setting 'epochs'); TrainConfig.epochs=%d is "
                       "CoOp's and is not used", model.method, recipe.epochs, train.epochs)
    seed_everything(train.seed)  # the augmentation draws from the global generators
    sample = shots.dataset
    if list(sample.classnames) != model.classnames:
        raise ValueError("the model's class names differ from the training set's")
    images, kept = decode_images(sample.paths, train.strict)
    labels = torch.tensor([sample.labels[i] for i in kept])
    missing = sorted(set(range(len(sample.classnames))) - set(labels.tolist()))
    if missing:
        raise ValueError(f"no readable training images for classes {[sample.classnames[i] for i in missing]}")
    history = train_deep_prompts(model, images, labels, recipe, train, extra_loss=extra_loss,
                                 on_epoch_end=on_epoch_end, progress=progress, callback=callback)
    metrics: dict[str, Any] = {
        "train_loss": history["loss"][-1],
        "train_accuracy": history["accuracy"][-1],
        "epochs": recipe.epochs,
        "train_images": int(len(labels)),
        "seconds": round(time.perf_counter() - started, 2),
        "history": history,
    }
    logger.info("%s: fitted %d classes in %.1fs: train accuracy %.3f", model.method, len(model.classnames),
                metrics["seconds"], metrics["train_accuracy"])
    return metrics


def official_tensor(state_dict: dict[str, torch.Tensor], what: str, key: str) -> torch.Tensor:
    """``state_dict[key]`` as float32, or a one-line ValueError saying that ``what`` holds it."""
    if key not in state_dict:
        raise ValueError(f"the checkpoint has no {key!r}; {what} holds it")
    return state_dict[key].float()


def register_method(name: str, summary: str, model_cls: type, config_cls: type,
                    official_config: Callable[[dict[str, torch.Tensor], Any], Any],
                    from_official: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]],
                    check_backbone: Callable[..., None], fit: Optional[Callable[..., Any]] = None,
                    bench_setting: str = "") -> Method:
    """Register a deep-prompt method: ``model_cls(backbone, classnames, config)`` holds its tensors,
    ``official_config(state_dict, config)`` reads token counts and depths from an official checkpoint and
    ``from_official(state_dict, config)`` maps its tensors to ours; ``fit`` defaults to the cross-entropy
    recipe (:func:`fit_deep_prompts`)."""

    def default_fit(backbone: "Backbone", shots: Shots, config: Any, train: "TrainConfig", *, progress: bool = False,
                    callback: Optional[Callable[[int, dict[str, float]], None]] = None,
                    **_: Any) -> tuple[DeepPromptModel, dict[str, Any]]:
        model = build_seeded(model_cls, backbone, shots.classnames, config, train.seed)
        return model, fit_deep_prompts(model, shots, train, config, progress=progress, callback=callback)

    def build(backbone: "Backbone", run: "RunConfig", tensors: Optional[dict[str, torch.Tensor]]) -> DeepPromptModel:
        config = config_cls.from_dict(run.method_config or {})
        return load_tensors(build_seeded(model_cls, backbone, run.classnames, config, 0), tensors)

    def import_official(state_dict: dict[str, torch.Tensor], classnames: Sequence[str], backbone: "Backbone",
                        config: Any) -> DeepPromptModel:
        config = official_config(state_dict, config)
        return load_tensors(build_seeded(model_cls, backbone, classnames, config, 0), from_official(state_dict, config))

    return register(Method(name=name, summary=summary, build=build, config=config_cls, tensors_file=PROMPTS_FILE,
                           fit=fit or default_fit, importer=import_official, protocols=("fewshot", "base2new", "shift"),
                           check_backbone=check_backbone, bench_setting=bench_setting, text_graph=True))


def decode_images(paths: Sequence[Any], strict: bool) -> tuple[list[Any], list[int]]:
    """Decoded RGB images and the indices kept (unreadable ones skipped unless ``strict``)."""
    from ..runtime.preprocess import ImageDecodeError, load_image

    out, kept = [], []
    for i, p in enumerate(paths):
        try:
            out.append(load_image(p))
            kept.append(i)
        except (ImageDecodeError, FileNotFoundError):
            if strict:
                raise
            logger.warning("skipping unreadable training image %s", p)
    return out, kept

