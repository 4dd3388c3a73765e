"""Build the official deep-prompt models (vendored beside this file) on the weights of an open_clip model.

Not a test module: the IVLP, MaPLe and PromptSRC tests share it.
"""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from reference import ivlp_official, maple_official, mpl_clip_model


def openai_config(vision_width: int = 192, text_width: int = 128, layers: int = 12, quick_gelu: bool = True) -> dict:
    """A small open_clip config in OpenAI's CLIP architecture (the official code derives heads = width // 64)."""
    return {
        "embed_dim": 64,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 32, "layers": layers, "width": vision_width, "patch_size": 8, "head_width": 64},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": text_width // 64,
                     "layers": layers},
    }


def load_tiny(tmp: Path, name: str, cfg: dict):
    """A random-init backbone of ``cfg`` on the CPU, its weights rounded to fp16-representable values."""
    import coopkit

    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    bb = coopkit.load_backbone(str(path), pretrained=None, device="cpu")
    with torch.no_grad():  # the official build_model stores weights in fp16: give both models fp16-exact values
        for p in bb.model.parameters():
            p.copy_(p.half().float())
    return bb


def official_clip(model: nn.Module, design_details: dict, quick_gelu: bool = True, fp16: bool = False) -> nn.Module:
    """The official ``clip.build_model`` on the open_clip model's state dict, in float32 (as their trainer's
    ``clip_model.float()`` for PREC fp32/amp; ``fp16=True``: as built, for PREC fp16). For a GELU family the official QuickGELU is replaced by
    ``nn.GELU`` (the only difference between the two architectures)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    clip = mpl_clip_model.build_model(state, design_details)
    clip = clip if fp16 else clip.float()
    if not quick_gelu:
        for mod in clip.modules():
            if isinstance(getattr(mod, "mlp", None), nn.Sequential):
                mod.mlp.gelu = nn.GELU()
    return clip


def cfg(trainer: str, image_size: int = 32, **fields) -> types.SimpleNamespace:
    """The Dassl config fields the official prompt learners read."""
    return types.SimpleNamespace(
        TRAINER=types.SimpleNamespace(**{trainer: types.SimpleNamespace(**fields)}),
        INPUT=types.SimpleNamespace(SIZE=(image_size, image_size)),
        OPTIM=types.SimpleNamespace(MAX_EPOCH=5),
    )


@contextlib.contextmanager
def half_casts_off() -> Iterator[None]:
    """The official blocks cast their prompt tokens with ``.half()``: under their default precision
    (PREC fp16, the whole model in fp16) a no-op; in float32 it would round the prompts (and their
    gradients) to fp16. Comparing in float32, ``Tensor.half`` returns the tensor unchanged here."""
    original = torch.Tensor.half
    torch.Tensor.half = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.half = original  # type: ignore[method-assign]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of the reference ``b``."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter ``name`` (dotted) of ``module`` by a float32 copy of ``value``."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    setattr(owner, leaf, nn.Parameter(value.detach().float().clone()))


def official_ivlp(bb, config, names, quick: bool = True, fp16: bool = False):
    """The official IVLP CustomCLIP on the backbone's weights (``fp16``: as their default PREC leaves it)."""
    design = {"trainer": "IVLP", "vision_depth": config.prompt_depth_vision, "language_depth": config.prompt_depth_text,
              "vision_ctx": config.n_ctx_vision, "language_ctx": config.n_ctx_text}
    clip = official_clip(bb.model, design, quick, fp16)
    c = cfg("IVLP", N_CTX_TEXT=config.n_ctx_text, N_CTX_VISION=config.n_ctx_vision, CTX_INIT=config.ctx_init or "",
            PROMPT_DEPTH_TEXT=config.prompt_depth_text, PROMPT_DEPTH_VISION=config.prompt_depth_vision)
    model = ivlp_official.CustomCLIP(c, names, clip)
    for name, p in model.named_parameters():  # as the official trainer: only prompt tensors learn
        p.requires_grad_("prompt_learner" in name or "VPT" in name)
    return model


def copy_into_official_ivlp(ours, official) -> None:
    """Our (randomised) tensors into the official module, under its own names."""
    cfg_ = ours.config
    set_param(official, "prompt_learner.ctx", ours.ctx)
    for i in range(1, cfg_.prompt_depth_text):
        set_param(official, f"text_encoder.transformer.resblocks.{i}.VPT_shallow", ours.text_deep[i - 1])
    if cfg_.prompt_depth_vision:
        set_param(official, "image_encoder.VPT", ours.vision_ctx)
        for i in range(1, cfg_.prompt_depth_vision):
            set_param(official, f"image_encoder.transformer.resblocks.{i}.VPT_shallow", ours.vision_deep[i - 1])


def official_maple(bb, config, names, quick: bool = True, fp16: bool = False):
    """The official MaPLe CustomCLIP on the backbone's weights (``fp16``: as their default PREC leaves it)."""
    design = {"trainer": "MaPLe", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0,
              "maple_length": config.n_ctx}
    clip = official_clip(bb.model, design, quick, fp16)
    c = cfg("MAPLE", N_CTX=config.n_ctx, CTX_INIT=config.ctx_init or "", PROMPT_DEPTH=config.prompt_depth)
    model = maple_official.CustomCLIP(c, names, clip)
    for name, p in model.named_parameters():
        p.requires_grad_("prompt_learner" in name)
    return model


def copy_into_official_maple(ours, official) -> None:
    """Our tensors into the official learner under its names. Its projections are built for ViT-B/16's widths
    (512 -> 768, hard-coded); the copies carry this model's widths, and its forward code runs unchanged."""
    pre = "prompt_learner."
    set_param(official, pre + "ctx", ours.ctx)
    set_param(official, pre + "proj.weight", ours.proj.weight)
    set_param(official, pre + "proj.bias", ours.proj.bias)
    for i in range(ours.config.prompt_depth - 1):
        set_param(official, f"{pre}compound_prompts_text.{i}", ours.text_deep[i])
        set_param(official, f"{pre}compound_prompt_projections.{i}.weight", ours.deep_proj_weight[i])
        set_param(official, f"{pre}compound_prompt_projections.{i}.bias", ours.deep_proj_bias[i])
