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

from reference import mpl_clip_model


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


def official_clip(model: nn.Module, design_details: dict, quick_gelu: bool = True) -> nn.Module:
    """The official ``clip.build_model`` on the open_clip model's state dict, in float32 (as their trainer's
    ``clip_model.float()`` for PREC fp32/amp). For a GELU family the official QuickGELU is replaced by
    ``nn.GELU`` (the only difference between the two architectures)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    clip = mpl_clip_model.build_model(state, design_details).float()
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
