"""CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024): low-rank updates of the attention weights of CLIP.

Each adapted attention projection ``W`` (query, key, value and/or output, in chosen layers of
the text and/or image encoder) gains a trainable low-rank term: ``W x + s * B (A drop(x))``
with ``A (r, d)``, ``B (d, r)``, ``s = alpha / sqrt(r)`` (the official code's scaling, not
``alpha / r``) and dropout on the LoRA branch's input only. ``B`` starts at zero, so training
starts from CLIP. After training the term merges into the weight (``W + s B A``): the encoders
have CLIP's shape again, the class weights are constant, and the image encoder exports as
CLIP's does.

Nothing here copies or changes the backbone: :func:`lora_view` builds a shallow view of the
open_clip model whose adapted blocks hold a :class:`LoRAAttention` around the backbone's own
(shared, frozen) ``nn.MultiheadAttention``; every other module and weight is the backbone's.
open_clip's own forward code runs the view, for every tower variant it has.

The official implementation is ``loralib`` in MaxZanella/CLIP-LoRA (``PlainMultiheadAttentionLoRA``,
``LinearLoRA``, ``apply_lora``; ``lora.py`` ``run_lora``). ``tests/test_clip_lora.py`` checks
features, logits and gradients against those modules on the same weights. Differences (see
``docs/methods/clip_lora.md``): the LoRA branch runs as ``B (A x)`` (the official code forms
``B A`` and multiplies, or merges it into the weight per call); with dropout 0 the official
backward uses the un-adapted weight for the gradient flowing to earlier layers (a stale in-place
edit), this module the true gradient; layer positions are fractions of the depth (identical to
the official index lists wherever those exist).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import Backbone
from ..config import ConfigMixin, RunConfig, TrainConfig
from ..features import autocast_for, encode_images
from ..prompts import TextTower
from ..runtime.contract import check_classnames, check_templates, fill_templates
from ..runtime.preprocess import ImageDecodeError, load_image
from . import Method, register
from .base import (DivergedError, ImageEncoder, MethodModel, Shots, check_templates_fit, divergence_hint, end_epoch,
                   logit_scale, seed_everything)

logger = logging.getLogger(__name__)

#: Which encoders get adapters (the official ``--encoder``).
ENCODERS = ("text", "vision", "both")
#: Which layers (the official ``--position``): fractions of the tower's depth (see :func:`layer_indices`).
POSITIONS = ("bottom", "mid", "up", "half-up", "half-bottom", "all", "top3")
#: The attention projections that can be adapted: query, key, value, output (the official ``--params``).
PROJECTIONS = ("q", "k", "v", "o")
#: The official prompt (every dataset's template is overridden by it in the official code).
TEMPLATE = "a photo of a {}."
TOWERS = ("text", "vision")
NAME = "clip-lora"
#: The run file holding the adapters (:meth:`CLIPLoRA.state`).
ADAPTERS_FILE = "lora.safetensors"


def _number(name: str, value: Any, *, positive: bool = False, below: Optional[float] = None) -> float:
    """A finite float ``>= 0`` (``> 0`` with ``positive``; ``< below`` when given), else one ValueError."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > 0 if positive else value >= 0) and (below is None or value < below):
        return float(value)
    limit = ("> 0" if positive else ">= 0") + (f" and < {below:g}" if below is not None else "")
    raise ValueError(f"{name} must be a finite number {limit}, got {value!r}")


def _params(value: Any) -> str:
    """``"q,k,v"``, ``"qkv"``, ``["q", "k"]`` -> canonical ``"q,k,v"`` (order q, k, v, o)."""
    if isinstance(value, str):
        items = [c for c in value.replace(",", " ").split()]
        if len(items) == 1 and len(items[0]) > 1:
            items = list(items[0])
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueError(f"params must name attention projections like 'q,k,v', got {value!r}")
    bad = [p for p in items if p not in PROJECTIONS]
    if bad or not items:
        raise ValueError(f"unknown params {bad or items!r}; valid: a non-empty subset of {', '.join(PROJECTIONS)}")
    return ",".join(p for p in PROJECTIONS if p in items)


@dataclass
class LoRAConfig(ConfigMixin):
    """CLIP-LoRA's adapters and recipe. Defaults are the official ``main.py``'s (the paper's)."""

    encoder: str = field(default="both", metadata={
        "help": "encoders that get adapters: text, vision or both", "choices": ENCODERS})
    position: str = field(default="all", metadata={
        "help": "layers adapted: bottom / mid / up (thirds), half-bottom / half-up, top3 or all",
        "choices": POSITIONS})
    params: str = field(default="q,k,v", metadata={
        "help": "attention projections adapted, comma-separated subset of q,k,v,o"})
    r: int = field(default=2, metadata={"help": "rank of the low-rank matrices (>= 1)"})
    alpha: float = field(default=1.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / sqrt(r)"})
    dropout_rate: float = field(default=0.25, metadata={"help": "dropout on the input of the LoRA branch"})
    lr: float = field(default=2e-4, metadata={"help": "AdamW learning rate (cosine to eta_min over the run)"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    eta_min: float = field(default=1e-6, metadata={"help": "learning rate at the end of the cosine schedule"})
    iters_per_shot: int = field(default=500, metadata={
        "help": "training steps per shot (the official n_iters: 500 x shots steps in all)"})
    template: str = field(default=TEMPLATE, metadata={"help": "the prompt, one {} for the class name"})
    workers: Optional[int] = field(default=None, metadata={
        "help": "processes decoding and augmenting training images when the image encoder is adapted "
                "(default: 8 on CUDA, as the official loaders; 0 on the CPU); seeded runs repeat for a given count"})

    def __post_init__(self) -> None:
        for name, valid in (("encoder", ENCODERS), ("position", POSITIONS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; valid: {', '.join(valid)}")
        self.params = _params(self.params)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r (the LoRA rank) must be an integer >= 1, got {self.r!r}; rank 0 adapts nothing")
        if isinstance(self.iters_per_shot, bool) or not isinstance(self.iters_per_shot, int) or self.iters_per_shot < 1:
            raise ValueError(f"iters_per_shot must be an integer >= 1, got {self.iters_per_shot!r}")
        self.alpha = _number("alpha", self.alpha, positive=True)
        self.dropout_rate = _number("dropout_rate", self.dropout_rate, below=1.0)
        self.lr = _number("lr", self.lr, positive=True)
        self.weight_decay = _number("weight_decay", self.weight_decay)
        self.beta1 = _number("beta1", self.beta1, below=1.0)
        self.beta2 = _number("beta2", self.beta2, below=1.0)
        self.eta_min = _number("eta_min", self.eta_min)
        if not isinstance(self.template, str):
            raise ValueError(f"template must be a string with one {{}} for the class name, got {self.template!r}")
        self.template = check_templates(self.template)[0]
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise ValueError(f"workers must be an integer >= 0 or None, got {self.workers!r}")

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(self.params.split(","))

    @property
    def towers(self) -> tuple[str, ...]:
        """The adapted towers, text first (the official order of its adapted layers)."""
        return TOWERS if self.encoder == "both" else (self.encoder,)

    @property
    def scaling(self) -> float:
        """``alpha / sqrt(r)``, as the official ``LoRALayer`` (``loralib/layers.py``) scales."""
        return self.alpha / math.sqrt(self.r)


def layer_indices(position: str, depth: int) -> list[int]:
    """The blocks ``position`` adapts in a tower of ``depth`` blocks.

    Thirds (bottom, mid, up), halves (half-bottom, half-up), the last three (top3) or all. For
    the 12 blocks of every official setting these are the official index lists
    (``INDEX_POSITIONS_TEXT``, ``INDEX_POSITIONS_VISION['ViT-B/16']``); for ViT-L/14's 24 image
    blocks the official halves and all. Raises ValueError when it selects no block.
    """
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r}; valid: {', '.join(POSITIONS)}")
    third, half = depth // 3, depth // 2
    spans = {"bottom": (0, third), "mid": (third, 2 * third), "up": (2 * third, depth), "half-bottom": (0, half),
             "half-up": (half, depth), "all": (0, depth), "top3": (depth - 3, depth)}
    lo, hi = spans[position]
    if position == "up":
        lo = depth - third  # the last third (equal to 2 * third when depth divides by 3)
    if third == 0 and position in ("bottom", "mid", "up") or depth < 3 and position == "top3" or hi <= max(lo, 0):
        raise ValueError(f"position {position!r} selects no block of a {depth}-block tower; use all, half-up or "
                         "half-bottom")
    return list(range(max(lo, 0), hi))


# --- the adapted attention -----------------------------------------------------------------------


class LoRAAttention(nn.Module):
    """An open_clip ``nn.MultiheadAttention`` (self-attention) with LoRA on q, k, v and/or o.

    ``attn`` stays the backbone's module (shared, frozen, not registered here); the adapters are
    this module's only parameters ``<p>_A (r, d)`` and ``<p>_B (d, r)`` for each adapted projection ``p``. In
    training mode with dropout, each adapted projection draws its own dropout mask on its input,
    in the order q, k, v, o and in the official code's ``(seq, batch, d)`` layout, so a seeded
    CPU run draws the very masks the official module draws. Without gradients and dropout the
    updates are merged into the weights for the call (one fused q/k/v product).
    """

    def __init__(self, attn: nn.MultiheadAttention, config: LoRAConfig) -> None:
        super().__init__()
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
            raise ValueError(f"CLIP-LoRA adapts nn.MultiheadAttention self-attention with one in_proj_weight, got "
                             f"{type(attn).__name__}")
        self.__dict__["attn"] = attn  # the backbone's (shared, frozen): not a submodule, so not moved or saved
        self.projections = config.projections
        self.scaling = config.scaling
        self.dropout_rate = config.dropout_rate
        d = attn.embed_dim
        ref = attn.in_proj_weight
        for p in self.projections:
            a = torch.empty(config.r, d, device=ref.device, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as the official LoRALayer.init_lora_param
            self.register_parameter(f"{p}_A", nn.Parameter(a))
            self.register_parameter(f"{p}_B", nn.Parameter(torch.zeros(d, config.r, device=ref.device)))

    def lora_pair(self, p: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{p}_A"), getattr(self, f"{p}_B")

    def delta(self, p: str) -> torch.Tensor:
        """``s * B A`` ``(d, d)``: what merging adds to projection ``p``'s weight."""
        a, b = self.lora_pair(p)
        return self.scaling * (b @ a)

    def merged_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(in_proj_weight (3d, d), out_proj.weight (d, d))`` with the updates merged in."""
        attn = self.attn
        d = attn.embed_dim
        w_in, w_out = attn.in_proj_weight, attn.out_proj.weight
        parts = [self.delta(p).to(w_in.dtype) if p in self.projections else None for p in "qkv"]
        if any(x is not None for x in parts):
            w_in = w_in + torch.cat([x if x is not None else w_in.new_zeros(d, d) for x in parts])  # (3d, d)
        if "o" in self.projections:
            w_out = w_out + self.delta("o").to(w_out.dtype)
        return w_in, w_out

    def merged(self) -> nn.MultiheadAttention:
        """A plain ``nn.MultiheadAttention`` (a copy) holding the merged weights: CLIP's shape."""
        out = copy.deepcopy(self.attn)
        with torch.no_grad():
            w_in, w_out = self.merged_weights()
            out.in_proj_weight.copy_(w_in)
            out.out_proj.weight.copy_(w_out)
        return out.requires_grad_(False)

    def _dropped(self, x: torch.Tensor, seq_first: bool) -> torch.Tensor:
        """``x`` with dropout, the mask drawn as ``(seq, batch, ...)``: the official layout."""
        p = self.dropout_rate
        shape = x.shape if seq_first else (x.shape[1], x.shape[0], *x.shape[2:])
        noise = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p).div_(1 - p)
        return x * (noise if seq_first else noise.transpose(0, 1))

    def _lora(self, p: str, x: torch.Tensor, drop: bool, seq_first: bool) -> torch.Tensor:
        a, b = self.lora_pair(p)
        if drop:
            x = self._dropped(x, seq_first)
        return self.scaling * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))  # (..., d)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query or key_padding_mask is not None or need_weights or is_causal:
            raise ValueError("CLIP-LoRA's attention covers open_clip's self-attention (no key padding mask, no "
                             "attention weights)")
        attn = self.attn
        x = query if attn.batch_first else query.transpose(0, 1)  # (N, L, d)
        n, length, d = x.shape
        heads = attn.num_heads
        drop = self.training and self.dropout_rate > 0
        fused = not drop and not torch.is_grad_enabled()
        if fused:
            w_in, w_out = self.merged_weights()
            q, k, v = F.linear(x, w_in.to(x.dtype), attn.in_proj_bias).chunk(3, dim=-1)  # each (N, L, d)
        else:
            q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # each (N, L, d)
            extra = {p: self._lora(p, x, drop, seq_first=False) for p in self.projections if p != "o"}
            q, k, v = (t + extra[p] if p in extra else t for p, t in zip("qkv", (q, k, v)))
        q, k, v = (t.reshape(n, length, heads, d // heads).transpose(1, 2) for t in (q, k, v))  # (N, h, L, hd)
        if attn_mask is not None and attn_mask.dim() == 3:  # per sequence and head: (N * h, L, L)
            attn_mask = attn_mask.view(n, heads, length, length)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, h, L, hd)
        o = o.permute(2, 0, 1, 3).reshape(length * n, d)  # (L * N, d): the official row order
        if fused:
            out = F.linear(o, w_out.to(o.dtype), attn.out_proj.bias)
        else:
            out = F.linear(o, attn.out_proj.weight, attn.out_proj.bias)
            if "o" in self.projections:
                out = out + self._lora("o", o, drop, seq_first=True)
        out = out.view(length, n, d)  # (L, N, d)
        return (out.transpose(0, 1) if attn.batch_first else out), None


# --- views of an open_clip model with adapted blocks ---------------------------------------------


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing every child, parameter and buffer of ``module``."""
    out = copy.copy(module)
    out._modules = dict(module._modules)
    out._parameters = dict(module._parameters)
    out._buffers = dict(module._buffers)
    return out


def _replaced(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """A shallow copy of ``root`` in which the submodule at dotted ``path`` is ``new`` (the modules
    on the path are copied, everything else is shared)."""
    head, _, rest = path.partition(".")
    out = _shallow(root)
    out._modules[head] = _replaced(root._modules[head], rest, new) if rest else new
    return out


def _blocks_path(model: nn.Module, tower: str) -> str:
    """Dotted path of a tower's ``resblocks`` in an open_clip model."""
    if tower == "vision":
        return "visual.transformer.resblocks"
    return "text.transformer.resblocks" if hasattr(model, "text") else "transformer.resblocks"


def _get(root: nn.Module, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def _is_plain_block(blk: nn.Module) -> bool:
    attn = getattr(blk, "attn", None)
    return (type(blk).__name__ == "ResidualAttentionBlock" and isinstance(attn, nn.MultiheadAttention)
            and attn._qkv_same_embed_dim and not hasattr(blk, "ln_1_kv"))


def tower_blocks(model: nn.Module, tower: str) -> tuple[str, int]:
    """``(path of resblocks, depth)`` of a tower CLIP-LoRA can adapt; ValueError naming the limit."""
    path = _blocks_path(model, tower)
    blocks = _get(model, path)
    if tower == "vision":
        visual = getattr(model, "visual", None)
        if blocks is None or type(visual).__name__ != "VisionTransformer":
            raise ValueError(
                f"CLIP-LoRA adapts open_clip's ViT image towers; this model's image tower is {type(visual).__name__} "
                "(timm, ResNet or ConvNeXt towers have no open_clip attention): use encoder='text'")
    elif blocks is None:
        text = getattr(model, "text", None)
        raise ValueError(f"CLIP-LoRA adapts open_clip's own text transformer; this model's text tower is "
                         f"{type(text).__name__} (a Hugging Face encoder): use encoder='vision'")
    odd = sorted({type(b).__name__ for b in blocks if not _is_plain_block(b)})
    if odd:
        raise ValueError(f"CLIP-LoRA adapts open_clip's ResidualAttentionBlock (nn.MultiheadAttention); the {tower} "
                         f"tower has {', '.join(odd)} blocks (qk-norm / scaled-cosine attention): use "
                         f"encoder='{'vision' if tower == 'text' else 'text'}' or another model")
    return path, len(blocks)


def check_backbone(backbone: "Backbone", config: LoRAConfig) -> None:
    """Refuse, in one line, a model or a position CLIP-LoRA cannot apply to."""
    for tower in config.towers:
        _, depth = tower_blocks(backbone.model, tower)
        try:
            layer_indices(config.position, depth)
        except ValueError as e:
            raise ValueError(f"{tower} tower: {e}") from None


def adapted_layers(model: nn.Module, config: LoRAConfig) -> list[tuple[str, int, str]]:
    """``(tower, block index, attention path)`` of every adapted block, text first then vision,
    in block order: the official ``apply_lora`` order (its saved ``layer_<i>`` numbering)."""
    out = []
    for tower in config.towers:
        path, depth = tower_blocks(model, tower)
        out += [(tower, i, f"{path}.{i}.attn") for i in layer_indices(config.position, depth)]
    return out


def lora_view(model: nn.Module, config: LoRAConfig) -> tuple[nn.Module, dict[str, LoRAAttention]]:
    """A view of ``model`` with a :class:`LoRAAttention` in every adapted block (no weight copied).

    Returns the view and its adapters by state name ``"<tower>.<block>"``.
    """
    view, adapters = model, {}
    for tower, i, path in adapted_layers(model, config):
        lora = LoRAAttention(_get(model, path), config)
        adapters[f"{tower}.{i}"] = lora
        view = _replaced(view, path, lora)
    return view, adapters


def merged_view(model: nn.Module, adapters: dict[str, LoRAAttention], paths: dict[str, str]) -> nn.Module:
    """A view of ``model`` with plain ``nn.MultiheadAttention`` copies holding the merged weights."""
    view = model
    for name, lora in adapters.items():
        view = _replaced(view, paths[name], lora.merged())
    return view


# --- the fitted model ----------------------------------------------------------------------------


class CLIPLoRA(MethodModel):
    """CLIP with LoRA adapters over a label set: CLIP-LoRA's fitted model.

    Args:
        backbone: The frozen backbone (its model is shared by the view, never modified).
        classnames: Labels, in output order.
        config: The adapters (:class:`LoRAConfig`).
        text_chunk_size: Classes per text-tower pass when no gradient is taken.

    The prompts are ``config.template`` filled with each class name. With text adapters the
    class features are recomputed from the adapted text tower at each call (cut after the
    end token where the tower is causal: exact); without, they are the frozen tower's, computed
    once. :meth:`state` holds the adapters only. After training (eval mode) the image encoder,
    the class weights and the text tower are the merged ones, computed once.
    """

    def __init__(self, backbone: Backbone, classnames: Sequence[str], config: Optional[LoRAConfig] = None,
                 *, text_chunk_size: int = 256) -> None:
        super().__init__(backbone, check_classnames(classnames))
        config = config or LoRAConfig()
        if not isinstance(config, LoRAConfig):
            raise ValueError(f"config must be a LoRAConfig, got {type(config).__name__}")
        check_backbone(backbone, config)
        if isinstance(text_chunk_size, bool) or not isinstance(text_chunk_size, int) or text_chunk_size < 1:
            raise ValueError(f"text_chunk_size must be an integer >= 1, got {text_chunk_size!r}")
        self.config = config
        self.text_chunk_size = text_chunk_size
        model = backbone.model
        self.logit_scale = float(logit_scale(backbone))
        self.logit_bias = backbone.logit_bias
        view, adapters = lora_view(model, config)
        self._paths = {f"{t}.{i}": p for t, i, p in adapted_layers(model, config)}
        self.__dict__["view"] = view  # the backbone's modules (not submodules here) around the adapters
        self.adapters = nn.ModuleDict({k.replace(".", "_"): v for k, v in adapters.items()})
        tokens = torch.as_tensor(backbone.tokenizer(fill_templates(config.template, self.classnames)))
        self.register_buffer("tokens", tokens.to(backbone.device), persistent=False)  # (C, context_length)
        self.tower = TextTower.of(view)
        self.cut = int(self.tower.pool_index(self.tokens).max()) + 1 if self.tower.exact_cut else int(tokens.shape[1])
        frozen = None
        if "text" not in config.towers:
            with torch.no_grad(), autocast_for(backbone.device):
                frozen = self._text_pass(cut=True)  # (C, D): the frozen tower's, computed once
        self.register_buffer("frozen_text", frozen, persistent=False)
        self._merged: Optional[nn.Module] = None
        self.train(False)

    def train(self, mode: bool = True) -> "CLIPLoRA":
        """Train / eval mode of the adapters only (the shared backbone modules are left as they are);
        leaving eval mode forgets the merged encoders and class weights."""
        self.training = mode
        for m in self.adapters.values():
            m.training = mode
        if mode:
            self._merged, self._weights = None, None
        return self

    def adapter(self, tower: str, index: int) -> LoRAAttention:
        """The adapter of block ``index`` of ``tower`` (``text`` or ``vision``)."""
        return self.adapters[f"{tower}_{index}"]

    @property
    def adapter_names(self) -> list[str]:
        """``"<tower>.<block>"`` of each adapter, in the official ``layer_<i>`` order."""
        return list(self._paths)

    def lora_parameters(self) -> list[nn.Parameter]:
        """The trainable tensors (as the official ``get_lora_parameters``: layer by layer, q k v o, A then B)."""
        return [p for name in self._paths for p in self.adapters[name.replace(".", "_")].parameters(recurse=False)]

    # -- text --

    def _text_pass(self, cut: bool = True) -> torch.Tensor:
        """Normalised class features ``(C, D)`` from the view's text tower (adapted or not)."""
        length = self.cut if cut else self.tokens.shape[1]
        chunk = self.tokens.shape[0] if torch.is_grad_enabled() else self.text_chunk_size
        out = []
        for tokens in torch.split(self.tokens[:, :length], chunk):  # (k, length)
            out.append(self.tower.encode(self.tower.embed(tokens), tokens).float())  # (k, D)
        return F.normalize(torch.cat(out), dim=-1)

    def text_features(self, cut: bool = True) -> torch.Tensor:
        """L2-normalised class features ``(C, D)``; differentiable w.r.t. the text adapters.

        ``cut=False`` runs every prompt at its full context length (the official computation;
        the same result, more work, and in training mode other dropout draws).
        """
        if self.frozen_text is not None:
            return self.frozen_text
        return self._text_pass(cut)

    @property
    def text_tower(self) -> TextTower:
        """The merged text tower (the exporter's ``--with-text-encoder`` graph runs it on
        ``config.template`` filled with any class name)."""
        return TextTower.of(self.merged_model())

    # -- MethodModel --

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised pixels -> ``(B, D)`` L2-normalised features: the adapted encoder
        while training, the merged one after."""
        if not self.training and not torch.is_grad_enabled():
            return F.normalize(self.image_encoder()(pixels).float(), dim=-1)
        return F.normalize(self.view.encode_image(pixels).float(), dim=-1)

    def image_encoder(self) -> nn.Module:
        """pixels -> unnormalised features: the model's ``encode_image`` with the adapters merged into
        its weights (CLIP's shape, plain ``nn.MultiheadAttention``); the frozen encoder when the image
        tower has no adapters."""
        if "vision" not in self.config.towers:
            return ImageEncoder(self.backbone.model)
        return ImageEncoder(self.merged_model())

    @property
    def frozen_encoder(self) -> bool:
        """Without image adapters the image features are the frozen backbone's."""
        return "vision" not in self.config.towers

    def text_encoder(self) -> nn.Module:
        """The open_clip model with the text adapters merged (``encode_text`` of any prompt)."""
        return self.merged_model()

    def merged_model(self) -> nn.Module:
        """A view of the open_clip model with every adapter merged into its weights (cached in eval mode)."""
        if self._merged is not None:
            return self._merged
        adapters = {name: self.adapters[name.replace(".", "_")] for name in self._paths}
        merged = merged_view(self.backbone.model, adapters, self._paths)
        if not self.training:
            self._merged = merged
        return merged

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The open_clip model's state dict with the adapters merged: the backbone's keys and shapes
        (``open_clip.create_model(name, pretrained=<file>)`` loads it)."""
        return {k: v.detach().clone() for k, v in self.merged_model().state_dict().items()}

    def save_merged_weights(self, path: Any) -> Any:
        """Write :meth:`merged_state_dict` as a safetensors file (atomically): open_clip loads it as the
        model's checkpoint (``open_clip.create_model(name, pretrained=path)``). Returns the path."""
        from pathlib import Path

        from safetensors.torch import save

        from ..runtime.atomic import atomic_write

        blob = save({k: v.contiguous() for k, v in self.merged_state_dict().items()},
                    metadata={"format": "pt", "clip_lora": self.config.to_json()})
        return atomic_write(Path(path), blob)

    @torch.no_grad()
    def compute_class_weights(self) -> torch.Tensor:
        """``exp(logit_scale) * text features`` ``(C, D)`` float32 on the CPU (constant after training)."""
        training = self.training
        self.train(False)
        try:
            with autocast_for(self.backbone.device):
                return (logit_scale(self.backbone) * self.text_features().float().cpu()).contiguous()
        finally:
            self.train(training)

    def logits(self, pixels: torch.Tensor, cut: bool = True) -> torch.Tensor:
        """Training-time logits ``(B, C)``: text features first, then the image (the official order)."""
        text = self.text_features(cut)
        image = self.encode_image(pixels)
        logits = self.logit_scale * image @ text.float().T  # (B, C)
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def state(self) -> dict[str, torch.Tensor]:
        """The adapters: ``"<tower>.<block>.<q|k|v|o>.lora_A"`` ``(r, d)`` and ``lora_B`` ``(d, r)``, float32."""
        out = {}
        for name in self._paths:
            m = self.adapters[name.replace(".", "_")]
            for p in m.projections:
                a, b = m.lora_pair(p)
                out[f"{name}.{p}.lora_A"] = a.detach().float().cpu().contiguous()
                out[f"{name}.{p}.lora_B"] = b.detach().float().cpu().contiguous()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor], source: str = "tensors") -> None:
        """Set the adapters from :meth:`state`'s layout; refuses missing, extra, misshapen or
        non-finite tensors in one line."""
        expected = {k: v.shape for k, v in self.state().items()}
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ValueError(f"{source}: the adapters do not fit {self.config.encoder}/{self.config.position}/"
                             f"{self.config.params}/r={self.config.r}: missing {missing[:4]}, unexpected {extra[:4]}")
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(expected[k]):
                raise ValueError(f"{source}: {k} has shape {tuple(t.shape)}, expected {tuple(expected[k])}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{source}: {k} holds NaN or infinite values")
        with torch.no_grad():
            for k, t in tensors.items():
                name, p, which = k.rsplit(".", 2)
                a, b = self.adapters[name.replace(".", "_")].lora_pair(p)
                (a if which == "lora_A" else b).copy_(t)
        self._merged, self._weights = None, None

    def run_fields(self) -> dict[str, Any]:
        return {"method_config": self.config, "templates": [self.config.template]}

    def with_classes(self, classnames: Sequence[str]) -> "CLIPLoRA":
        """The same adapters over other class names: the adapted text tower reads any class name in
        the template (base-to-new, open vocabulary)."""
        out = CLIPLoRA(self.backbone, classnames, self.config, text_chunk_size=self.text_chunk_size)
        out.load_state(self.state())
        return out.requires_grad_(False)


# --- the recipe ----------------------------------------------------------------------------------


def _readable(sample: Any, strict: bool) -> tuple[list[str], torch.Tensor]:
    """The training images that decode (each is decoded once here, and again at every step that
    uses it) with their labels; unreadable ones skipped with a warning (raised with ``strict``)."""
    paths, labels, skipped = [], [], []
    for path, y in zip(sample.paths, sample.labels):
        try:
            load_image(path)
        except (ImageDecodeError, FileNotFoundError) as e:
            if strict:
                raise
            skipped.append(str(e))
            continue
        paths.append(path)
        labels.append(y)
    if skipped:
        logger.warning("skipped %d unreadable image(s): %s", len(skipped), "; ".join(skipped[:10]))
    return paths, torch.tensor(labels, dtype=torch.long)


class _Augmented(torch.utils.data.Dataset):
    """Training images, decoded and augmented when a batch asks for them (in loader workers or not)."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Any], torch.Tensor]) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.paths[i]))  # (3, H, W)


def _schedule(n: int, batch_size: int, total: int, gen: torch.Generator) -> list[tuple[int, torch.Tensor]]:
    """``(epoch, indices)`` of every step: each epoch a fresh permutation cut into batches (the last
    one kept, as the official loader's ``drop_last=False``), until ``total`` steps."""
    out: list[tuple[int, torch.Tensor]] = []
    epoch = 0
    while len(out) < total:
        order = torch.randperm(n, generator=gen)
        out += [(epoch, idx) for idx in torch.split(order, batch_size)][: total - len(out)]
        epoch += 1
    return out


def train_step(model: CLIPLoRA, batch: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scheduler: Any, scaler: Any, precision: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One official training iteration (``run_lora``'s loop body): text features (adapted text tower
    or the frozen ones), then the image features of ``batch`` (pixels ``(b, 3, H, W)`` through the
    adapted image encoder, or cached L2-normalised features ``(b, D)``), cross-entropy on
    ``exp(logit_scale) * cos`` (+ the logit bias), backward through ``scaler``, optimizer and
    scheduler step. Returns the loss and the logits ``(b, C)``.

    Raises:
        DivergedError: a NaN or infinite loss (a ValueError, exit code 2; nothing is stepped).
    """
    with autocast_for(labels.device, precision):
        text = model.text_features()  # (C, D)
        x = model.encode_image(batch) if batch.dim() == 4 else batch  # (b, D)
        logits = model.logit_scale * x.float() @ text.float().T  # (b, C)
        if model.logit_bias is not None:
            logits = logits + model.logit_bias
        loss = F.cross_entropy(logits, labels)
    if not torch.isfinite(loss):
        raise DivergedError(f"training loss became {loss.item()}; "
                            + divergence_hint(scheduler.get_last_lr()[0], precision, labels.device))
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach(), logits.detach()


def fit(backbone: Backbone, shots: Shots, config: LoRAConfig, train: TrainConfig, *, progress: bool = False,
        callback: Optional[Callable[[int, dict[str, float]], None]] = None) -> tuple[CLIPLoRA, dict[str, Any]]:
    """Train the adapters with the official recipe (``lora.py`` ``run_lora``).

    AdamW (``lr`` 2e-4, weight decay 1e-2, betas 0.9 / 0.999) on the adapters only, a cosine
    schedule over ``iters_per_shot x shots`` steps (shots: the images per class of the sample, as the
    official ``--shots``; or ``train.epochs`` whole epochs when given; stepped every step, down to ``eta_min``),
    batches of ``train.batch_size`` drawn epoch by epoch, cross-entropy on
    ``exp(logit_scale) * cos``. With image adapters each step augments and encodes its images
    (CoOp's random resized crop + flip, as the official loader); without, the image features are
    encoded once (``train.n_views`` augmented views per image, as CoOp's cache). Text features
    are recomputed each step when the text encoder has adapters. fp16 autocast gets a GradScaler.

    Returns the model (eval mode: merged) and its metrics (``train_loss``, ``train_accuracy``,
    ``steps``, ``epochs``, ``train_images``, ``seconds``, ``history`` per epoch).

    Raises:
        ValueError: a class without a readable training image.
        DivergedError: the loss or an adapter became NaN or infinite (a ValueError, exit code 2).
    """
    from ..runtime.progress import progress_bar

    started = time.perf_counter()
    seed_everything(train.seed)
    sample = shots.dataset
    check_templates_fit(backbone, sample.classnames, [config.template])
    device = backbone.device
    vision = "vision" in config.towers
    transform = backbone.train_preprocess if train.augment else backbone.preprocess
    if vision:
        paths, labels = _readable(sample, train.strict)
        feats = None
    else:
        feats, kept = encode_images(backbone, sample.paths, transform=transform, views=train.n_views,
                                    strict=train.strict, progress=progress, desc="encoding training views",
                                    precision=train.precision)  # (views, n, D)
        labels = torch.tensor([sample.labels[i] for i in kept], dtype=torch.long)
    missing = sorted(set(range(len(sample.classnames))) - set(labels.tolist()))
    if missing:
        raise ValueError(f"no readable training images for classes {[sample.classnames[i] for i in missing]}")

    model = CLIPLoRA(backbone, sample.classnames, config, text_chunk_size=train.text_chunk_size)
    params = model.lora_parameters()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(config.beta1, config.beta2))
    k = max(Counter(sample.labels).values())  # the shots drawn (train.shots unless every class has fewer)
    n = len(labels)
    total = config.iters_per_shot * k if train.epochs is None else train.epochs * math.ceil(n / train.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=config.eta_min)
    amp = autocast_for(device, train.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=getattr(amp, "fast_dtype", None) == torch.float16)
    gen = torch.Generator().manual_seed(train.seed)
    steps = _schedule(n, train.batch_size, total, gen)
    if vision:  # decoded and augmented per step, in loader workers where there are any
        workers = config.workers if config.workers is not None else (8 if device.type == "cuda" else 0)
        loader = torch.utils.data.DataLoader(_Augmented(paths, transform), batch_sampler=[i.tolist() for _, i in steps],
                                             num_workers=workers, pin_memory=device.type == "cuda")
        batches: Any = iter(loader)  # (b, 3, H, W) per step
    else:  # one cached view of each image per epoch
        views = {e: torch.randint(feats.shape[0], (n,), generator=gen) for e in range(steps[-1][0] + 1)}
        batches = (feats[views[e][idx], idx] for e, idx in steps)  # (b, D) per step
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "lr": []}
    model.train()
    bar = progress_bar(total=total, desc="training", unit="step", enabled=progress)
    seen, loss_sum, correct, lr = 0, 0.0, 0, scheduler.get_last_lr()[0]
    for step, ((epoch, idx), batch) in enumerate(zip(steps, batches)):
        y = labels[idx].to(device)
        loss, logits = train_step(model, batch.to(device, non_blocking=True), y, optimizer, scheduler, scaler,
                                  train.precision)
        seen += len(idx)
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(1) == y).sum())
        bar.update(1)
        if step + 1 == total or steps[step + 1][0] != epoch:  # the epoch ends
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise DivergedError(f"an adapter became NaN or infinite at step {step + 1}/{total}; "
                                    + divergence_hint(lr, train.precision, device))
            end_epoch(history, {"loss": loss_sum / seen, "accuracy": correct / seen, "lr": lr}, epoch, bar, callback)
            seen, loss_sum, correct, lr = 0, 0.0, 0, scheduler.get_last_lr()[0]
    bar.close()
    model.train(False)
    model.requires_grad_(False)
    metrics: dict[str, Any] = {
        "train_loss": history["loss"][-1],
        "train_accuracy": history["accuracy"][-1],
        "steps": total,
        "epochs": steps[-1][0] + 1,
        "train_images": n,
        "seconds": round(time.perf_counter() - started, 2),
        "history": history,
    }
    return model, metrics


def build(backbone: Backbone, config: RunConfig, tensors: Optional[dict[str, torch.Tensor]]) -> CLIPLoRA:
    """A saved run again: its adapters (``lora.safetensors``) over its class names, merged."""
    cfg = LoRAConfig.from_dict(config.method_config) if config.method_config is not None else LoRAConfig()
    chunk = config.train.text_chunk_size if config.train else 256
    model = CLIPLoRA(backbone, config.classnames, cfg, text_chunk_size=chunk)
    model.load_state(tensors or {}, ADAPTERS_FILE)
    return model.requires_grad_(False)


#: The official module names of the projections (``PlainMultiheadAttentionLoRA``'s linears).
OFFICIAL_LINEARS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "proj"}


def official_state(model: CLIPLoRA) -> dict[str, Any]:
    """The adapters in the official ``save_lora`` layout (``torch.save`` it, and the official
    ``load_lora`` / ``--eval_only`` reads it): the inverse of :func:`import_official`."""
    cfg = model.config
    state = model.state()
    weights = {f"layer_{i}": {OFFICIAL_LINEARS[p]: {"w_lora_A": state[f"{name}.{p}.lora_A"],
                                                     "w_lora_B": state[f"{name}.{p}.lora_B"]}
                              for p in cfg.projections}
               for i, name in enumerate(model.adapter_names)}
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha  # the official --alpha is an int
    return {"weights": weights, "metadata": {"r": cfg.r, "alpha": alpha, "encoder": cfg.encoder,
                                             "params": list(cfg.projections), "position": cfg.position}}


def is_official_file(raw: Any) -> bool:
    """Whether an unpickled file is the official ``save_lora``'s ``{"weights", "metadata"}``."""
    return isinstance(raw, dict) and set(raw) == {"weights", "metadata"} and isinstance(raw["metadata"], dict) \
        and "r" in raw["metadata"]


def import_official(state: dict[str, Any], classnames: Sequence[str], backbone: Backbone,
                    config: Optional[LoRAConfig] = None) -> CLIPLoRA:
    """The official trainer's saved adapters (``loralib/utils.py`` ``save_lora``: ``{"weights":
    {"layer_<i>": {"q_proj" | "k_proj" | "v_proj" | "proj": {"w_lora_A", "w_lora_B"}}}, "metadata":
    {"r", "alpha", "encoder", "params", "position"}}``) as a fitted model.

    The adapter settings come from the file's metadata; ``config`` gives the rest (the template,
    default the official one). ``layer_<i>`` is the i-th adapted block, text blocks first, as the
    official ``apply_lora`` numbers them.

    Raises:
        ValueError: not such a file, settings this model cannot take, or adapters that do not fit it.
    """
    if not isinstance(state, dict) or not isinstance(state.get("weights"), dict) or not isinstance(
            state.get("metadata"), dict):
        raise ValueError("not a CLIP-LoRA file: expected save_lora's {'weights', 'metadata'}")
    meta = state["metadata"]
    try:
        cfg = LoRAConfig(**{**(config or LoRAConfig()).to_dict(), "r": meta["r"], "alpha": meta["alpha"],
                            "encoder": meta["encoder"], "position": meta["position"], "params": meta["params"]})
    except KeyError as e:
        raise ValueError(f"CLIP-LoRA metadata lacks {e}; it holds {sorted(meta)}") from None
    model = CLIPLoRA(backbone, classnames, cfg)
    names = OFFICIAL_LINEARS
    layers = state["weights"]
    if sorted(layers) != sorted(f"layer_{i}" for i in range(len(model.adapter_names))):
        raise ValueError(f"the file holds {len(layers)} adapted layers, but {cfg.encoder}/{cfg.position} on "
                         f"{backbone.name} adapts {len(model.adapter_names)}")
    tensors = {}
    for i, name in enumerate(model.adapter_names):
        for p in cfg.projections:
            entry = layers[f"layer_{i}"].get(names[p])
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), torch.Tensor)
                                                      for k in ("w_lora_A", "w_lora_B")):
                raise ValueError(f"layer_{i} has no {names[p]} w_lora_A / w_lora_B")
            tensors[f"{name}.{p}.lora_A"] = entry["w_lora_A"].detach().float()
            tensors[f"{name}.{p}.lora_B"] = entry["w_lora_B"].detach().float()
    model.load_state(tensors, "the official file")
    return model.requires_grad_(False)


register(Method(
    name=NAME,
    summary="CLIP-LoRA: low-rank updates of the attention weights of both encoders, merged after training",
    build=build,
    config=LoRAConfig,
    tensors_file=ADAPTERS_FILE,
    fit=fit,
    importer=import_official,
    protocols=("fewshot", "base2new", "shift"),  # no bench_default: its recipe (500 x shots steps) runs when named
    text_graph=True,
    merged_weights=True,  # CLIPLoRA.save_merged_weights
    check_backbone=check_backbone,
))
