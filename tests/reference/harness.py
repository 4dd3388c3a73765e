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
    c = cfg("IVLP", image_size=bb.image_size[0],
            N_CTX_TEXT=config.n_ctx_text, N_CTX_VISION=config.n_ctx_vision, CTX_INIT=config.ctx_init or "",
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
    c = cfg("MAPLE", image_size=bb.image_size[0],
            N_CTX=config.n_ctx, CTX_INIT=config.ctx_init or "", PROMPT_DEPTH=config.prompt_depth)
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


@contextlib.contextmanager
def promptsrc_shims(bb, config) -> Iterator[None]:
    """What the official PromptSRC learner needs to run here: it loads CLIP from OpenAI's URL (both copies are
    built from ``bb``'s weights instead) and moves the frozen model to CUDA (``.cuda()`` is a no-op on a
    machine without one; on a GPU the models are moved by the caller)."""
    from reference import promptsrc_official

    def load(c, zero_shot_model=False):
        if zero_shot_model:
            design = {"trainer": "IVLP", "vision_depth": 0, "language_depth": 0, "vision_ctx": 0, "language_ctx": 0}
        else:
            design = {"trainer": "IVLP", "vision_depth": config.prompt_depth_vision,
                      "language_depth": config.prompt_depth_text, "vision_ctx": config.n_ctx_vision,
                      "language_ctx": config.n_ctx_text}
        return official_clip(bb.model, design)

    saved = (promptsrc_official.load_clip_to_cpu, torch.Tensor.cuda, nn.Module.cuda)
    promptsrc_official.load_clip_to_cpu = load
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
        nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        promptsrc_official.load_clip_to_cpu, torch.Tensor.cuda, nn.Module.cuda = saved  # type: ignore[method-assign]


def official_promptsrc(bb, config, names, epochs: int, lr: float = 0.0025):
    """The official PromptSRC CustomCLIP and its trainer (run inside :func:`promptsrc_shims`), fp32, one batch
    per epoch (every ``forward_backward`` ends an epoch: GPA), the learning rate held at ``lr``."""
    import numpy as np

    from reference import promptsrc_official

    c = cfg("PROMPTSRC", image_size=bb.image_size[0],
            N_CTX_TEXT=config.n_ctx_text, N_CTX_VISION=config.n_ctx_vision, CTX_INIT=config.ctx_init,
            PROMPT_DEPTH_TEXT=config.prompt_depth_text, PROMPT_DEPTH_VISION=config.prompt_depth_vision,
            TEXT_LOSS_WEIGHT=config.text_loss_weight, IMAGE_LOSS_WEIGHT=config.image_loss_weight,
            GPA_MEAN=config.gpa_mean, GPA_STD=config.gpa_std, PREC="fp32")
    c.OPTIM.MAX_EPOCH = epochs
    model = promptsrc_official.CustomCLIP(c, names, promptsrc_official.load_clip_to_cpu(c))
    for name, p in model.named_parameters():  # as their build_model
        p.requires_grad_(("prompt_learner" in name and "ZS_image_encoder" not in name) or "VPT" in name)
    trainer = promptsrc_official.PromptSRC()
    trainer.cfg, trainer.model, trainer.scaler, trainer.device = c, model, None, "cpu"
    trainer.optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9,
                                    weight_decay=5e-4)
    trainer.update_lr = lambda: None
    trainer.batch_idx, trainer.num_batches = 0, 1
    # their build_model's GPA set-up
    trainer.step_counter = 1
    gauss = trainer.get_gauss(c.TRAINER.PROMPTSRC.GPA_MEAN, c.TRAINER.PROMPTSRC.GPA_STD)
    trainer.gauss = np.array([gauss(a) for a in range(1, epochs + 1)])
    trainer.gauss = trainer.gauss / sum(trainer.gauss)
    trainer.previous_model_gpa = None
    return trainer
