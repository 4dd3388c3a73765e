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
* **CoCoOp**: ``ctx`` ``(n_ctx, width)`` and the meta-net (``meta_net.linear1`` / ``linear2``),
  fp16 or fp32; imported as a CoCoOp run (:mod:`coopkit.methods.cocoop`), whose class weights
  are computed per image.
* **IVLP, MaPLe, PromptSRC** (muzairkhattak's trainers): the whole ``CustomCLIP`` is saved
  (``<run>/VLPromptLearner/`` or ``<run>/MultiModalPromptLearner/model.pth.tar-N``, frozen CLIP
  included, fp16): the prompt tensors are imported (``prompt_learner.ctx``, the ``VPT`` /
  ``VPT_shallow`` tokens of both encoders, MaPLe's compound prompts and projections), token
  counts and depths read from their shapes; the frozen CLIP weights in the file are compared with
  the backbone's (a checkpoint trained on other weights is refused). ``CTX_INIT`` is not in the
  file: the prompt words default to the official configs' "a photo of a" (``ctx_init=``).
* **DualCoOp** (sunxm2357/DualCoOp ``train.py``: ``{"epoch", "arch", "state_dict", "best_mAP",
  "optimizer", "scheduler"}``, the whole model's state dict): ``prompt_learner.ctx_pos`` and
  ``ctx_neg`` imported by :func:`import_official_dualcoop` (a multi-label classifier); the backbone
  weights in the file are not used (coopkit's backbone is).
* **CLIP-LoRA** (not a Dassl trainer): ``save_lora``'s ``{"weights": {"layer_<i>": ...},
  "metadata": {"r", "alpha", "encoder", "params", "position"}}``; imported as a ``clip-lora`` run
  (:func:`coopkit.methods.clip_lora.import_official`).
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
from ..methods import clip_lora, cocoop, coop, get, ivlp, maple, promptsrc

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
        trainer: ``CoOp``, ``KgCoOp``, ``CoCoOp``, ``IVLP``, ``MaPLe`` or ``PromptSRC`` (the layout its state
            dict has).
        ctx: The learned context, float32: ``(n_ctx, width)`` or ``(n_cls, n_ctx, width)``.
        method: The coopkit method that imports it.
        state: Every tensor of the state dict as read (the CoCoOp and deep-prompt importers read theirs from it).
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
    method: str = coop.NAME
    state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


#: The deep-prompt trainers, by a key only their state dicts hold: (trainer, coopkit method).
_DEEP_TRAINERS = (
    ("prompt_learner.compound_prompts_text.", "MaPLe", maple.NAME),
    ("prompt_learner.proj.weight", "MaPLe", maple.NAME),
    ("prompt_learner.ZS_image_encoder.", "PromptSRC", promptsrc.NAME),
    ("prompt_learner.ctx", "IVLP", ivlp.NAME),
)


def _deep_trainer(keys: Sequence[str]) -> Optional[tuple[str, str]]:
    for marker, trainer, method in _DEEP_TRAINERS:
        if any(k == marker or (marker.endswith(".") and k.startswith(marker)) for k in keys):
            return trainer, method
    return None


def read_official_checkpoint(path: Union[str, os.PathLike]) -> OfficialCheckpoint:
    """Read a CoOp / KgCoOp / CoCoOp / IVLP / MaPLe / PromptSRC checkpoint, running no code.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint, an unsafe one, or no learned context in it.
    """
    file = Path(path)
    raw = load_checkpoint(file)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds no state_dict; expected an official prompt_learner checkpoint (model.pth.tar-N)")
    keys = [str(k) for k in state]
    if any(k.endswith("prompt_learner.ctx_pos") for k in keys):
        raise ValueError(f"{file} is a DualCoOp checkpoint (positive and negative contexts, several labels per image); "
                         "import it with coopkit.research.compat.import_official_dualcoop")
    epoch = raw.get("epoch") if isinstance(raw, dict) else None
    val = raw.get("val_result") if isinstance(raw, dict) else None
    recorded = dict(epoch=int(epoch) if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
                    val_result=float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) else None)
    deep = _deep_trainer(keys)
    if deep is not None:
        tensors = {str(k): v.detach() for k, v in state.items() if isinstance(v, torch.Tensor)}
        if "prompt_learner.ctx" not in tensors:
            raise ValueError(f"{file} ({deep[0]}) has no 'prompt_learner.ctx' tensor; the checkpoint is incomplete")
        return OfficialCheckpoint(path=file, trainer=deep[0], ctx=tensors["prompt_learner.ctx"].float(),
                                  method=deep[1], state=tensors, **recorded)
    ctx = state.get("ctx")
    if not isinstance(ctx, torch.Tensor):
        raise ValueError(f"{file} has no 'ctx' tensor in its state_dict (keys: {keys[:8]}); expected an official "
                         "CoOp or KgCoOp prompt_learner checkpoint")
    ctx = ctx.detach().float()
    if ctx.ndim not in (2, 3):
        raise ValueError(f"{file}: ctx has shape {tuple(ctx.shape)}, expected (n_ctx, width) or (n_cls, n_ctx, width)")
    # KgCoOp carries bias_vectors and an unused meta-net; CoCoOp a whole meta-net and no bias_vectors
    if "meta_net.linear2.weight" in keys and "bias_vectors" not in keys:
        trainer, method = "CoCoOp", cocoop.NAME
    else:
        trainer = "KgCoOp" if "bias_vectors" in keys or "meta_net.linear1.weight" in keys else "CoOp"
        method = coop.NAME
    used = ("ctx", "token_prefix", "token_suffix") if method == coop.NAME else tuple(keys)
    ignored = [k for k in keys if k not in used]
    return OfficialCheckpoint(path=file, trainer=trainer, ctx=ctx, ignored=ignored, method=method,
                              state={k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, **recorded)


#: Frozen CLIP tensors a deep-prompt checkpoint holds (its name -> the open_clip model's), compared with the backbone.
_FROZEN_PAIRS = (("image_encoder.conv1.weight", "visual.conv1.weight"),
                 ("text_encoder.text_projection", "text_projection"),
                 ("text_encoder.positional_embedding", "positional_embedding"))


def check_frozen_weights(state: dict[str, torch.Tensor], backbone: Backbone) -> None:
    """Refuse a deep-prompt checkpoint whose frozen CLIP tensors are not the backbone's (fp16 rounding allowed)."""
    own = backbone.model.state_dict()
    for theirs, ours in _FROZEN_PAIRS:
        if theirs not in state or ours not in own:
            continue
        a, b = state[theirs].float().cpu(), own[ours].float().cpu()
        if a.shape != b.shape:
            raise ValueError(f"its frozen CLIP is another architecture ({theirs} {tuple(a.shape)}, the backbone's "
                             f"{tuple(b.shape)}); load the CLIP it was trained on (the official code uses OpenAI's)")
        if float((a - b).abs().max()) > 2e-3 * float(b.abs().max()):
            raise ValueError(f"its frozen CLIP weights ({theirs}) differ from the backbone's; load the CLIP it was "
                             "trained on (the official code uses OpenAI's weights: pretrained='openai')")


def import_official(
    checkpoint: Union[str, os.PathLike],
    classnames: Sequence[str],
    *,
    model: str = "RN50",
    pretrained: Optional[str] = "openai",
    class_token_position: str = "end",
    device: str = "auto",
    backbone: Optional[Backbone] = None,
    ctx_init: Optional[str] = None,
) -> Classifier:
    """Turn a context learned by the official CoOp (or KgCoOp), or a CoCoOp prompt learner (context and
    meta-net), into a coopkit classifier (then save/export it).

    Args:
        checkpoint: ``.../prompt_learner/model.pth.tar-N``, exactly as the official trainer wrote it.
        classnames: The class names the official run was trained with, in its label order
            (``coopkit.official_datasets.load_official(name, root).classnames``, or for base-to-new runs
            the base half, ``coopkit.userdata.subsample_classes``).
        model, pretrained: The CLIP the context was learned on (the official code uses OpenAI CLIP).
        class_token_position: The ``CLASS_TOKEN_POSITION`` of the official run (CoOp; CoCoOp: always ``end``).
        ctx_init: IVLP / MaPLe / PromptSRC: the run's ``CTX_INIT`` (``None``: the official configs'
            "a photo of a"; ``""`` for a run without one).
        device: Where to load the backbone.
        backbone: An already loaded backbone.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: see :func:`read_official_checkpoint`; or a context that does not fit the
            model or the number of class names.
    """
    raw = load_checkpoint(checkpoint)
    if clip_lora.is_official_file(raw):
        return _import_clip_lora(Path(checkpoint), raw, classnames, backbone or load_backbone(model, pretrained, device))
    ck = read_official_checkpoint(checkpoint)
    path = ck.path
    if ck.method not in (coop.NAME, cocoop.NAME):
        return _import_deep(ck, classnames, backbone or load_backbone(model, pretrained, device), ctx_init)
    if ck.ignored:
        logger.info("%s (%s): ignoring %s (not used by its forward pass)", path, ck.trainer, ck.ignored)
    cocoop_file = ck.trainer == "CoCoOp"
    if cocoop_file and class_token_position != "end":
        raise ValueError(f"{path}: a CoCoOp checkpoint puts the class name at the end (the official CoCoOp has no "
                         f"CLASS_TOKEN_POSITION), got class_token_position={class_token_position!r}")
    spec = get(cocoop.NAME if cocoop_file else coop.NAME)
    assert spec.importer is not None
    bb = backbone or load_backbone(model, pretrained, device)
    try:
        if cocoop_file:
            fitted = spec.importer(ck.state, classnames, bb, None)
        else:
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


def _import_deep(ck: OfficialCheckpoint, classnames: Sequence[str], bb: Backbone, ctx_init: Optional[str]) -> Classifier:
    """An IVLP / MaPLe / PromptSRC checkpoint as a classifier (its method's importer on the prompt tensors)."""
    spec = get(ck.method)
    assert spec.importer is not None
    try:
        check_frozen_weights(ck.state, bb)
        config = spec.make_config({"ctx_init": ctx_init or None} if ctx_init is not None else None)
        fitted = spec.importer(ck.state, classnames, bb, config)
    except ValueError as e:
        raise ValueError(f"{ck.path} ({ck.trainer}): {e}") from None
    config_ = RunConfig(
        method=spec.name, classnames=list(classnames), **bb.run_fields(), **fitted.run_fields(),
        metrics={"imported_from": str(ck.path), "official_trainer": ck.trainer, "official_epoch": ck.epoch,
                 "official_val_result": ck.val_result},
        coopkit_version=__version__,
    )
    logger.info("imported official %s prompts %s from %s", ck.trainer, sorted(fitted.state()), ck.path)
    return Classifier(bb, config_, fitted)


def import_official_dualcoop(
    checkpoint: Union[str, os.PathLike],
    classnames: Sequence[str],
    *,
    model: str = "RN101",
    pretrained: Optional[str] = "openai",
    input_size: Optional[int] = None,
    device: str = "auto",
    backbone: Optional[Backbone] = None,
) -> Classifier:
    """A DualCoOp checkpoint written by the official ``train.py`` as a multi-label coopkit classifier.

    Args:
        checkpoint: ``checkpoint.pth.tar`` or ``model_best.pth.tar``, exactly as the official code wrote it.
        classnames: The labels of the official run, in its order (COCO's 80, VOC's 20:
            ``coopkit.multilabel_data.load_multilabel(root, split=...).classnames``).
        model, pretrained: The CLIP it was trained on (the official code: OpenAI's RN50 / RN101).
        input_size: The official ``--input_size`` (``None``: the model's own).
        device: Where to load the backbone.
        backbone: An already loaded backbone.

    Raises:
        FileNotFoundError: no such checkpoint.
        ValueError: an unsafe file, not a DualCoOp checkpoint, contexts that do not fit the model or the labels.
    """
    from ..methods import dualcoop

    file = Path(checkpoint)
    raw = load_checkpoint(file)
    state = raw.get("state_dict") if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{file} holds no state_dict; expected the official DualCoOp train.py checkpoint")
    bb = backbone or load_backbone(model, pretrained, device)
    spec = get(dualcoop.NAME)
    assert spec.importer is not None
    try:
        fitted = spec.importer(state, classnames, bb, dualcoop.official_config(state, input_size=input_size))
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    epoch, best = raw.get("epoch"), raw.get("best_mAP")
    run = RunConfig(
        method=spec.name, classnames=list(classnames), task=spec.task, **bb.run_fields(), **fitted.run_fields(),
        metrics={"imported_from": str(file), "official_epoch": epoch if isinstance(epoch, int) else None,
                 "official_best_mAP": float(best) if isinstance(best, (int, float)) else None},
        coopkit_version=__version__,
    )
    logger.info("imported official DualCoOp contexts (%s) from %s", fitted.config, file)
    return Classifier(bb, run, fitted)


def _import_clip_lora(path: Path, raw: dict[str, Any], classnames: Sequence[str], bb: Backbone) -> Classifier:
    """A CLIP-LoRA ``save_lora`` file as a ``clip-lora`` run (its settings from the file's metadata)."""
    spec = get(clip_lora.NAME)
    assert spec.importer is not None
    try:
        fitted = spec.importer(raw, classnames, bb, None)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    config = RunConfig(method=spec.name, classnames=list(classnames), **bb.run_fields(), **fitted.run_fields(),
                       metrics={"imported_from": str(path), "official_trainer": "CLIP-LoRA"},
                       coopkit_version=__version__)
    logger.info("imported official CLIP-LoRA adapters (%d layers) from %s", len(fitted.adapter_names), path)
    return Classifier(bb, config, fitted)
