"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023).

Learned text tokens enter the first ``prompt_depth`` layers of the text transformer; the image
transformer's tokens at the same layers are linear projections of them (one projection per
layer, text width -> image width), so the two branches are coupled. Equal to the official
``trainers/maple.py`` with the ``ResidualAttentionBlock_MaPLe`` blocks of its ``clip/model.py``
(muzairkhattak/multimodal-prompt-learning), whose projection sizes (512 -> 768) are ViT-B/16's
widths: here they are the model's own. ``tests/test_maple.py`` compares features, logits and
gradients with that code.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from ..runtime.configbase import check_int
from .deep_prompts import (DeepPromptModel, DeepPromptRecipe, Prompts, check_towers, initial_context,
                           official_tensor, register_method)

if TYPE_CHECKING:
    from ..backbone import Backbone


NAME = "maple"


@dataclass
class MaPLeConfig(DeepPromptRecipe):
    """MaPLe's prompts and recipe. Defaults: the official ``MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml``
    (``prompt_depth=3, lr=0.0026, epochs=2`` is its cross-dataset config)."""

    n_ctx: int = field(default=2, metadata={"help": "prompt tokens per layer, text and image (N_CTX)"})
    prompt_depth: int = field(default=9, metadata={
        "help": "layers of both transformers that get prompt tokens, from the first (PROMPT_DEPTH, >= 1)"})

    def __post_init__(self) -> None:
        check_int("n_ctx", self.n_ctx, 1)
        check_int("prompt_depth", self.prompt_depth, 1)
        super().__post_init__()


def check_backbone(backbone: "Backbone", config: MaPLeConfig) -> None:
    """Refuse, in one line, a family or a depth MaPLe cannot prompt."""
    check_towers(backbone.model, NAME, config.prompt_depth, config.prompt_depth)


class MaPLeModel(DeepPromptModel):
    """MaPLe's learned tensors over a frozen backbone.

    Attributes:
        ctx: ``(n_ctx, text_width)``: the text context at the input (``prompt_learner.ctx``).
        text_deep: ``(prompt_depth - 1, n_ctx, text_width)`` (``compound_prompts_text``).
        proj: text width -> image width, maps ``ctx`` to the image input's tokens (``prompt_learner.proj``).
        deep_proj_weight: ``(prompt_depth - 1, vision_width, text_width)`` and ``deep_proj_bias``
            ``(prompt_depth - 1, vision_width)``: one projection per deeper layer
            (``compound_prompt_projections``; all start as copies of one initialisation, as there).
    """

    method = NAME

    def __init__(self, backbone: "Backbone", classnames: Sequence[str], config: MaPLeConfig) -> None:
        check_backbone(backbone, config)
        prefix_text, ctx = initial_context(backbone, config.n_ctx, config.ctx_init)
        super().__init__(backbone, classnames, prefix_text, config.n_ctx, config)
        device = ctx.device
        text_width = ctx.shape[1]
        vision_width = backbone.model.visual.transformer.width
        deeper = config.prompt_depth - 1
        self.ctx = nn.Parameter(ctx)
        self.text_deep = nn.Parameter(torch.empty(deeper, config.n_ctx, text_width).normal_(std=0.02).to(device))
        self.proj = nn.Linear(text_width, vision_width).to(device)
        one = nn.Linear(text_width, vision_width)
        layers = [copy.deepcopy(one) for _ in range(deeper)]
        self.deep_proj_weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]).to(device)
                                             if deeper else torch.zeros(0, vision_width, text_width, device=device))
        self.deep_proj_bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers]).to(device)
                                           if deeper else torch.zeros(0, vision_width, device=device))

    def prompts(self) -> Prompts:
        # one projection per deeper layer: (J - 1, n, text_width) @ (J - 1, text_width, vision_width) + bias
        vision_deep = torch.baddbmm(self.deep_proj_bias.unsqueeze(1), self.text_deep,
                                    self.deep_proj_weight.transpose(1, 2))  # (J - 1, n, vision_width)
        return Prompts(self.ctx, list(self.text_deep.unbind(0)), self.proj(self.ctx), list(vision_deep.unbind(0)))


def from_official(state_dict: dict[str, torch.Tensor], config: MaPLeConfig) -> dict[str, torch.Tensor]:
    """Our tensors from the official trainer's ``state_dict`` (the whole ``CustomCLIP``'s)."""
    get = functools.partial(official_tensor, state_dict, f"a MaPLe checkpoint with prompt depth {config.prompt_depth}")

    pre = "prompt_learner."
    ctx = get(pre + "ctx")
    deeper = range(config.prompt_depth - 1)

    def stack(keys: list[str], empty: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([get(k) for k in keys]) if keys else torch.zeros(empty)

    weight = get(pre + "proj.weight")
    return {
        "ctx": ctx,
        "text_deep": stack([f"{pre}compound_prompts_text.{i}" for i in deeper], (0, *ctx.shape)),
        "proj.weight": weight,
        "proj.bias": get(pre + "proj.bias"),
        "deep_proj_weight": stack([f"{pre}compound_prompt_projections.{i}.weight" for i in deeper], (0, *weight.shape)),
        "deep_proj_bias": stack([f"{pre}compound_prompt_projections.{i}.bias" for i in deeper], (0, weight.shape[0])),
    }


def official_config(state_dict: dict[str, torch.Tensor], config: MaPLeConfig) -> MaPLeConfig:
    """``config`` with the token count and depth an official MaPLe state dict holds (``ctx_init`` and the
    recipe stay ``config``'s: the checkpoint does not record them)."""
    if "prompt_learner.ctx" not in state_dict:
        raise ValueError("no 'prompt_learner.ctx' in the checkpoint; not a MaPLe checkpoint")
    depth = 1 + len([k for k in state_dict if k.startswith("prompt_learner.compound_prompts_text.")])
    return dataclasses.replace(config, n_ctx=int(state_dict["prompt_learner.ctx"].shape[0]), prompt_depth=depth)


register_method(NAME, "MaPLe: deep text prompts and, projected from them, deep image prompts (coupled branches)",
                MaPLeModel, MaPLeConfig, official_config, from_official, check_backbone,
                bench_setting="coupled deep prompts")
