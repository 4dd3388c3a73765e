"""Interoperability with the official CoOp code (KaiyangZhou/CoOp).

The official trainer saves ``prompt_learner/model.pth.tar-N``: a torch checkpoint whose
``state_dict`` holds ``ctx`` (and the derived ``token_prefix``/``token_suffix``, which are
rebuilt here). It is read with ``weights_only=True``, so no pickled code runs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .. import __version__
from ..backbone import Backbone, load_backbone
from ..classifier import Classifier
from ..config import PromptConfig, RunConfig
from ..prompts import PromptLearner

logger = logging.getLogger(__name__)


def import_official(
    checkpoint: Union[str, os.PathLike],
    classnames: Sequence[str],
    *,
    model: str = "RN50",
    pretrained: Optional[str] = "openai",
    class_token_position: str = "end",
    device: str = "auto",
    backbone: Optional[Backbone] = None,
) -> Classifier:
    """Turn a context learned by the official CoOp into a coopkit classifier (then save/export it).

    Args:
        checkpoint: ``.../prompt_learner/model.pth.tar-N``.
        classnames: The class names the official run was trained with, in its label order
            (e.g. ``coopkit.load_dataset(split_json).classnames``).
        model, pretrained: The CLIP the context was learned on (official CoOp used OpenAI CLIP).
        class_token_position: The ``CLASS_TOKEN_POSITION`` of the official run.
        device: Where to load the backbone.
        backbone: An already loaded backbone.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: not a CoOp prompt-learner checkpoint, or a context that does not fit the model.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for foreign files
        raise ValueError(f"{path} is not a loadable torch checkpoint (weights only): {str(e).splitlines()[0]}") from None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or "ctx" not in state:
        raise ValueError(f"{path} has no 'ctx' in its state_dict; expected an official CoOp prompt_learner checkpoint")
    ctx = state["ctx"].float()
    if ctx.ndim not in (2, 3):
        raise ValueError(f"{path}: ctx has shape {tuple(ctx.shape)}, expected (n_ctx, width) or (n_cls, n_ctx, width)")
    csc = ctx.ndim == 3
    if csc and ctx.shape[0] != len(classnames):
        raise ValueError(f"{path}: class-specific context for {ctx.shape[0]} classes, but {len(classnames)} class names given")
    bb = backbone or load_backbone(model, pretrained, device)
    prompt = PromptConfig(n_ctx=int(ctx.shape[-2]), csc=csc, class_token_position=class_token_position)
    learner = PromptLearner(bb, classnames, prompt).to(bb.device)
    if tuple(learner.ctx.shape) != tuple(ctx.shape):
        raise ValueError(f"{path}: ctx of shape {tuple(ctx.shape)} does not fit {bb.name} (expects {tuple(learner.ctx.shape)})")
    with torch.no_grad():
        learner.ctx.copy_(ctx)
    learner.requires_grad_(False)
    config = RunConfig(
        method="coop", classnames=list(classnames), model=bb.name, pretrained=bb.pretrained,
        model_config=bb.model_config, backbone_sha256=bb.weights_sha256,
        prompt=prompt,
        metrics={"imported_from": str(path), "official_epoch": raw.get("epoch") if isinstance(raw, dict) else None},
        coopkit_version=__version__,
    )
    logger.info("imported official CoOp context %s from %s", tuple(ctx.shape), path)
    return Classifier(bb, config, learner)
