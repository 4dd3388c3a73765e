"""IVLP: independent vision-language prompting (the deep baseline of MaPLe, Khattak et al., CVPR 2023).

Learned tokens enter the first ``prompt_depth_text`` layers of the text transformer (the first
layer's tokens are the context words of the prompt, initialised from ``ctx_init``) and the first
``prompt_depth_vision`` layers of the image transformer (appended after the patch tokens),
independently on each side. Equal to the official ``trainers/independentVL.py`` with the
``ResidualAttentionBlock_IVLP`` blocks of its ``clip/model.py`` (muzairkhattak/multimodal-prompt-learning);
``tests/test_ivlp.py`` compares features, logits and gradients with that code.
"""

from __future__ import annotations

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


NAME = "ivlp"


@dataclass
class IVLPConfig(DeepPromptRecipe):
    """IVLP's prompts and recipe. Defaults: the official ``IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml``."""

    n_ctx_text: int = field(default=2, metadata={"help": "prompt tokens per text layer (N_CTX_TEXT)"})
    n_ctx_vision: int = field(default=2, metadata={
        "help": "prompt tokens per image layer (N_CTX_VISION; 0 with prompt_depth_vision=0)"})
    prompt_depth_text: int = field(default=12, metadata={
        "help": "text layers that get prompt tokens, from the first (PROMPT_DEPTH_TEXT, >= 1)"})
    prompt_depth_vision: int = field(default=12, metadata={
        "help": "image layers that get prompt tokens, from the first (PROMPT_DEPTH_VISION; 0: text prompts only)"})

    def __post_init__(self) -> None:
        check_int("n_ctx_text", self.n_ctx_text, 1)
        check_int("prompt_depth_text", self.prompt_depth_text, 1)
        check_int("prompt_depth_vision", self.prompt_depth_vision, 0)
        check_int("n_ctx_vision", self.n_ctx_vision, 1 if self.prompt_depth_vision > 0 else 0)
        if self.prompt_depth_vision == 0 and self.n_ctx_vision != 0:
            raise ValueError(f"n_ctx_vision={self.n_ctx_vision} with prompt_depth_vision=0: no image layer takes "
                             "prompt tokens; set n_ctx_vision=0 or a depth >= 1")
        super().__post_init__()


def check_backbone(backbone: "Backbone", config: IVLPConfig, method: str = NAME) -> None:
    """Refuse, in one line, a family or a depth IVLP cannot prompt."""
    check_towers(backbone.model, method, config.prompt_depth_text, config.prompt_depth_vision)


def _normal(*shape: int) -> torch.Tensor:
    return torch.empty(*shape).normal_(std=0.02)


class IVLPModel(DeepPromptModel):
    """IVLP's learned tensors over a frozen backbone.

    Attributes:
        ctx: ``(n_ctx_text, text_width)``: the text context at the input (``prompt_learner.ctx``).
        text_deep: ``(prompt_depth_text - 1, n_ctx_text, text_width)``: text layers 1.. (the
            official ``transformer.resblocks.{i}.VPT_shallow``).
        vision_ctx: ``(n_ctx_vision, vision_width)`` appended after the patches (``visual.VPT``), or None.
        vision_deep: ``(prompt_depth_vision - 1, n_ctx_vision, vision_width)``: image layers 1.., or None.
    """

    method = NAME

    def __init__(self, backbone: "Backbone", classnames: Sequence[str], config: IVLPConfig) -> None:
        check_backbone(backbone, config, self.method)
        prefix_text, ctx = initial_context(backbone, config.n_ctx_text, config.ctx_init)
        super().__init__(backbone, classnames, prefix_text, config.n_ctx_text, config)
        device = ctx.device
        text_width = ctx.shape[1]
        self.ctx = nn.Parameter(ctx)
        self.text_deep = nn.Parameter(_normal(config.prompt_depth_text - 1, config.n_ctx_text, text_width).to(device))
        if config.prompt_depth_vision > 0:
            width = backbone.model.visual.transformer.width
            self.vision_ctx = nn.Parameter(_normal(config.n_ctx_vision, width).to(device))
            self.vision_deep = nn.Parameter(
                _normal(config.prompt_depth_vision - 1, config.n_ctx_vision, width).to(device))
        else:
            self.vision_ctx = self.vision_deep = None

    def prompts(self) -> Prompts:
        return Prompts(self.ctx, list(self.text_deep.unbind(0)), self.vision_ctx,
                       list(self.vision_deep.unbind(0)) if self.vision_deep is not None else [])


def from_official(state_dict: dict[str, torch.Tensor], config: IVLPConfig) -> dict[str, torch.Tensor]:
    """Our tensors from the official trainer's ``state_dict`` (the whole ``CustomCLIP``'s)."""
    get = functools.partial(official_tensor, state_dict, f"an IVLP checkpoint with prompt depths "
                            f"{config.prompt_depth_text}/{config.prompt_depth_vision}")

    out = {"ctx": get("prompt_learner.ctx"),
           "text_deep": _stack([get(f"text_encoder.transformer.resblocks.{i}.VPT_shallow")
                                for i in range(1, config.prompt_depth_text)], get("prompt_learner.ctx"))}
    if config.prompt_depth_vision > 0:
        first = get("image_encoder.VPT")
        out["vision_ctx"] = first
        out["vision_deep"] = _stack([get(f"image_encoder.transformer.resblocks.{i}.VPT_shallow")
                                     for i in range(1, config.prompt_depth_vision)], first)
    return out


def _stack(tensors: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(tensors) if tensors else like.new_zeros((0, *like.shape))  # (J - 1, n, width)


def official_config(state_dict: dict[str, torch.Tensor], config: IVLPConfig) -> IVLPConfig:
    """``config`` with the token counts and depths an official IVLP / PromptSRC state dict holds
    (``ctx_init`` and the recipe stay ``config``'s: the checkpoint does not record them)."""
    if "prompt_learner.ctx" not in state_dict:
        raise ValueError("no 'prompt_learner.ctx' in the checkpoint; not an IVLP / PromptSRC checkpoint")
    n_text = int(state_dict["prompt_learner.ctx"].shape[0])

    def depth(prefix: str) -> int:
        layers = [k for k in state_dict if k.startswith(prefix) and k.endswith(".VPT_shallow")]
        return len(layers) + 1

    vision = "image_encoder.VPT" in state_dict
    return dataclasses.replace(
        config, n_ctx_text=n_text, prompt_depth_text=depth("text_encoder.transformer.resblocks."),
        n_ctx_vision=int(state_dict["image_encoder.VPT"].shape[0]) if vision else 0,
        prompt_depth_vision=depth("image_encoder.transformer.resblocks.") if vision else 0)



register_method(NAME, "IVLP: independent deep prompts in the first layers of the image and text encoders",
                IVLPModel, IVLPConfig, official_config, from_official, check_backbone,
                bench_setting="independent deep prompts")
