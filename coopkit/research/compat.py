"""Interoperability with the official CoOp code and its descendants: their checkpoints, read safely.

The official trainers (Dassl) save ``<run>/prompt_learner/model.pth.tar-N``: a torch checkpoint
``{"state_dict", "epoch", "optimizer", "scheduler", "val_result"}``. Its scheduler entry is not
plain data: Dassl's warm-up scheduler keeps its successor, a pickled ``CosineAnnealingLR``, which
keeps the ``SGD`` optimizer and its ``defaultdict`` state. torch's weights-only loader refuses
such a file, and a plain ``torch.load`` would run whatever code a file names.
:func:`load_checkpoint` reads it with :class:`CheckpointUnpickler` instead: tensors and plain
containers are materialised, the optimizer, scheduler and Dassl objects become inert
placeholders, and any other global (a ``__reduce__`` calling ``os.system``) is refused by name
before anything is called.

What each trainer's prompt learner holds, and what can be served from it:

* **CoOp** (and ProGrad, same layout): ``ctx``, ``(n_ctx, width)`` unified or
  ``(n_cls, n_ctx, width)`` class-specific, fp16 or fp32; imported. The official code uses one
  shared context whenever ``CTX_INIT`` is set, even with ``CSC=True``: its file then holds a 2-D
  context, imported as unified.
* **KgCoOp**: ``ctx`` plus ``bias_vectors`` and ``meta_net`` weights that its forward pass never
  uses; the context is imported, the rest ignored (named in the log).
* **CoCoOp**: refused: a meta-net shifts the context by each image's features, so its class
  text features depend on the image and cannot be baked into one matrix.
* **MaPLe**: refused: its prompts enter the first layers of both encoders (the image encoder's
  are projections of the text ones), so no frozen image encoder reproduces its features, and
  coopkit exports a frozen image encoder with prompts at the text input only.
"""

from __future__ import annotations

import logging
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .. import __version__
from .._unpickle import SafeUnpickler, UnsafeGlobalError
from ..backbone import Backbone, load_backbone
from ..classifier import Classifier
from ..config import PromptConfig, RunConfig
from ..methods import coop, get

logger = logging.getLogger(__name__)

#: Module prefixes whose objects an official checkpoint may hold: inert placeholders.
CHECKPOINT_INERT_MODULES = ("torch.optim", "torch.cuda.amp", "torch.amp", "dassl", "collections", "numpy",
                            "yacs", "copyreg")
#: Single globals that may appear as plain-data helpers: inert placeholders too.
CHECKPOINT_INERT_GLOBALS = frozenset({("_codecs", "encode"), ("argparse", "Namespace")} | {
    ("builtins", n) for n in ("dict", "list", "set", "frozenset", "tuple", "object", "int", "float", "complex",
                              "bytes", "bytearray", "str", "bool", "slice", "range")})


def _torch_globals() -> dict[tuple[str, str], Any]:
    """The torch functions that rebuild tensors, parameters and sizes (those torch's own weights-only
    loader allows), materialised."""
    import torch._utils as tu  # noqa: PLC0415 - their pickled names live here

    out: dict[tuple[str, str], Any] = {
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch._tensor", "_rebuild_from_type_v2"): getattr(torch._tensor, "_rebuild_from_type_v2"),
        ("torch._tensor", "Tensor"): torch.Tensor,
        ("torch", "Tensor"): torch.Tensor,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy", "_rebuild_meta_tensor_no_storage"):
        if hasattr(tu, name):
            out[("torch._utils", name)] = getattr(tu, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            out[("torch", name)] = getattr(torch, name)
    return out


class CheckpointUnpickler(SafeUnpickler):
    """Unpickles official checkpoints: tensors and plain containers built, optimizer / scheduler /
    Dassl objects inert, everything else refused (:class:`coopkit._unpickle.SafeUnpickler`)."""

    inert_modules = CHECKPOINT_INERT_MODULES
    inert_pairs = CHECKPOINT_INERT_GLOBALS

    def __init__(self, file: Any, **kwargs: Any) -> None:
        super().__init__(file, allowed=_torch_globals(), **kwargs)


def _pickle_module() -> types.ModuleType:
    """What ``torch.load(pickle_module=...)`` needs: ``Unpickler`` and ``load`` (legacy format headers)."""
    module = types.ModuleType("coopkit_checkpoint_pickle")
    module.Unpickler = CheckpointUnpickler  # type: ignore[attr-defined]
    module.load = lambda f, **kw: CheckpointUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    return module


def load_checkpoint(path: Union[str, os.PathLike]) -> Any:
    """A torch checkpoint's contents, read without running code from it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a torch checkpoint, or a file naming a global that no official
            checkpoint contains (the message names it; nothing from the file ran).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(file, map_location="cpu", pickle_module=_pickle_module(), weights_only=False)
    except UnsafeGlobalError as e:
        raise ValueError(
            f"refusing {file}: it names the global {e.name}, which no official checkpoint holds (tensors, plain "
            "containers, torch optimizer and scheduler state, Dassl objects); nothing from the file was run"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch and pickle raise many types for foreign files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{file} is not a torch checkpoint ({type(e).__name__}: {reason[:200]})") from None


@dataclass
class OfficialCheckpoint:
    """The servable part of an official prompt-learner checkpoint.

    Attributes:
        path: The file.
        trainer: ``CoOp`` or ``KgCoOp`` (the layout its state dict has).
        ctx: The learned context, float32: ``(n_ctx, width)`` or ``(n_cls, n_ctx, width)``.
        epoch: The ``epoch`` it records, if any.
        val_result: The ``val_result`` it records, if a number.
        ignored: State-dict entries read but not used.
    """

    path: Path
    trainer: str
    ctx: torch.Tensor
    epoch: Optional[int] = None
    val_result: Optional[float] = None
    ignored: list[str] = field(default_factory=list)


def read_official_checkpoint(path: Union[str, os.PathLike]) -> OfficialCheckpoint:
    """Read a CoOp / KgCoOp checkpoint (refusing CoCoOp and MaPLe with the reason), running no code.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint, an unsafe one, a trainer whose prompts cannot be served
            (CoCoOp, MaPLe), or no learned context in it.
    """
    file = Path(path)
    raw = load_checkpoint(file)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds no state_dict; expected an official prompt_learner checkpoint (model.pth.tar-N)")
    keys = [str(k) for k in state]
    if any("compound_prompts_text" in k or k.endswith("prompt_learner.proj.weight") for k in keys):
        raise ValueError(
            f"{file} is a MaPLe checkpoint: its prompts enter the first layers of both the text and the image "
            "encoder (the image prompts are projections of the text ones), so no frozen image encoder gives its image "
            "features; coopkit serves prompts at the text input of a frozen CLIP only, so it cannot import it"
        )
    if "meta_net.linear2.weight" in keys or any(k.startswith("prompt_learner.meta_net") for k in keys):
        raise ValueError(
            f"{file} is a CoCoOp checkpoint: its meta-net shifts the context by each image's features, so the class "
            "text features depend on the image and cannot be baked into one class-weight matrix; coopkit cannot "
            "import it (CoOp and KgCoOp checkpoints can be)"
        )
    if any("VPT" in k for k in keys) or "prompt_learner.ctx" in keys:
        raise ValueError(
            f"{file} holds a whole prompted CLIP (IVLP / PromptSRC style: prompts inside the image encoder's layers), "
            "so no frozen image encoder gives its image features; coopkit cannot import it"
        )
    ctx = state.get("ctx")
    if not isinstance(ctx, torch.Tensor):
        raise ValueError(f"{file} has no 'ctx' tensor in its state_dict (keys: {keys[:8]}); expected an official "
                         "CoOp or KgCoOp prompt_learner checkpoint")
    ctx = ctx.detach().float()
    if ctx.ndim not in (2, 3):
        raise ValueError(f"{file}: ctx has shape {tuple(ctx.shape)}, expected (n_ctx, width) or (n_cls, n_ctx, width)")
    kg = "bias_vectors" in keys or "meta_net.linear1.weight" in keys
    ignored = [k for k in keys if k not in ("ctx", "token_prefix", "token_suffix")]
    epoch = raw.get("epoch") if isinstance(raw, dict) else None
    val = raw.get("val_result") if isinstance(raw, dict) else None
    return OfficialCheckpoint(
        path=file, trainer="KgCoOp" if kg else "CoOp", ctx=ctx,
        epoch=int(epoch) if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
        val_result=float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) else None,
        ignored=ignored,
    )


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
    """Turn a context learned by the official CoOp (or KgCoOp) into a coopkit classifier (then save/export it).

    Args:
        checkpoint: ``.../prompt_learner/model.pth.tar-N``, exactly as the official trainer wrote it.
        classnames: The class names the official run was trained with, in its label order
            (``coopkit.official_datasets.load_official(name, root).classnames``, or for base-to-new runs
            the base half, ``coopkit.userdata.subsample_classes``).
        model, pretrained: The CLIP the context was learned on (the official code uses OpenAI CLIP).
        class_token_position: The ``CLASS_TOKEN_POSITION`` of the official run.
        device: Where to load the backbone.
        backbone: An already loaded backbone.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: see :func:`read_official_checkpoint`; or a context that does not fit the
            model or the number of class names.
    """
    ck = read_official_checkpoint(checkpoint)
    path = ck.path
    if ck.ignored:
        logger.info("%s (%s): ignoring %s (not used by its forward pass)", path, ck.trainer, ck.ignored)
    spec = get(coop.NAME)
    assert spec.importer is not None
    bb = backbone or load_backbone(model, pretrained, device)
    try:
        fitted = spec.importer({"ctx": ck.ctx}, classnames, bb, PromptConfig(class_token_position=class_token_position))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    config = RunConfig(
        method=spec.name, classnames=list(classnames), **bb.run_fields(), **fitted.run_fields(),
        metrics={"imported_from": str(path), "official_trainer": ck.trainer, "official_epoch": ck.epoch,
                 "official_val_result": ck.val_result},
        coopkit_version=__version__,
    )
    logger.info("imported official %s context %s from %s", ck.trainer, tuple(ck.ctx.shape), path)
    return Classifier(bb, config, fitted)
