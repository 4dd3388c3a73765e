"""Typed configuration, the interface of coopkit: which backbone, what prompt, how it is trained,
and what a saved run records.

Every config is a dataclass validated in ``__post_init__``, so a bad value fails at the call
that introduced it, with a message naming the value and what would be valid. Each default
lives here once: :func:`coopkit.fit`, :class:`coopkit.PromptLearner` and the command line
(whose options are generated from these fields and their ``help``) all read it from here.
Configs are passed as objects; keyword overrides go through :func:`apply_overrides`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .embedded import EMBEDDED_MODEL, EMBEDDED_PRETRAINED
from .runtime.configbase import ConfigMixin, default_of, help_of  # noqa: F401 - help_of, default_of: used by importers
from .runtime.configbase import check_bool, check_choice, check_float, check_int
from .runtime.contract import (
    CLASS_TOKEN_POSITIONS,
    DEFAULT_TEMPLATE,
    TASKS,
    check_classnames,
    check_position,
    check_templates,
)
from .runtime.session import check_threads

logger = logging.getLogger(__name__)

CONFIG_VERSION = 1
#: ``pretrained`` default: the shipped weights for ``coopkit-tiny``; other models must name theirs.
DEFAULT_PRETRAINED = "default"
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
#: Compute precisions of training and encoding (autocast); the precisions of exported files are
#: :data:`coopkit.runtime.contract.FILE_PRECISIONS`.
COMPUTE_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# What a run answers, TASKS (``classify``: one label per image, softmax over the label set; ``multilabel``:
# every label that applies, each with its own probability, the sigmoid of its logit, and a threshold), is the
# contract's (coopkit.runtime.contract.TASKS, imported above): an exported file records it as its ``task``.

# The validators (check_int, check_float, check_bool, check_choice) and ConfigMixin live in
# coopkit.runtime.configbase, the one validating base of every config (the runtime's too).


def apply_overrides(configs: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Replace fields of several configs by keyword (``shots=4`` goes to the config with a
    ``shots`` field). Every override must name a field of exactly one of them.

    Returns a new ``{name: config}`` mapping; the inputs are not modified.
    """
    owners: dict[str, str] = {}
    for key, cfg in configs.items():
        for f in dataclasses.fields(cfg):
            owners.setdefault(f.name, key)
    unknown = sorted(set(overrides) - set(owners))
    if unknown:
        raise ValueError(f"unknown settings {unknown}; valid: {', '.join(sorted(owners))}")
    out = dict(configs)
    for key in configs:
        mine = {k: v for k, v in overrides.items() if owners[k] == key}
        if mine:
            out[key] = dataclasses.replace(configs[key], **mine)
    return out


# --- the configs ---------------------------------------------------------------------------------


@dataclass
class BackboneConfig(ConfigMixin):
    """Which frozen CLIP to load (see :func:`coopkit.load_backbone`)."""

    model: str = field(default=EMBEDDED_MODEL, metadata={
        "help": f"open_clip model name, path of an open_clip model-config JSON, or {EMBEDDED_MODEL} (shipped)"})
    pretrained: Optional[str] = field(default=DEFAULT_PRETRAINED, metadata={
        "help": f"open_clip pretrained tag, checkpoint path, none for random init, or '{DEFAULT_PRETRAINED}' "
                f"('{EMBEDDED_PRETRAINED}', the shipped weights, for {EMBEDDED_MODEL}; other models must name theirs)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    threads: Optional[int] = field(default=None, metadata={
        "help": "CPU threads (default: one per CPU that other processes leave idle, measured at the start)"})
    tokenizer: Optional[str] = field(default=None, metadata={
        "help": "local tokenizer, for working offline: a folder with the model's Hugging Face tokenizer.json "
                "(SigLIP, CLIPA, MetaCLIP 2, Hugging Face text towers), a tokenizer.json file, or a CLIP BPE "
                "vocabulary .txt.gz (default: open_clip's, from the hub where it lives there)"})
    text_model: Optional[str] = field(default=None, metadata={
        "help": "Hugging Face text towers (roberta, xlm-roberta, mt5, nllb): a local folder with the text "
                "model's config.json, for working offline (default: the tokenizer folder when it has one)"})

    def __post_init__(self) -> None:
        for name in ("tokenizer", "text_model"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                setattr(self, name, os.fspath(value))
            elif value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a local path or None, got {value!r}")
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be an open_clip model name or a config JSON path, got {self.model!r}")
        if self.pretrained is not None and not isinstance(self.pretrained, str):
            raise ValueError(f"pretrained must be a tag, a checkpoint path or None, got {self.pretrained!r}")
        if isinstance(self.pretrained, str) and self.pretrained.lower() in ("none", "random", ""):
            self.pretrained = None
        if type(self.device).__name__ != "device" and not (
                isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device)):
            raise ValueError(f"unknown device {self.device!r}; valid: {', '.join(DEVICES)}")
        check_threads(self.threads)


@dataclass
class PromptConfig(ConfigMixin):
    """The learnable prompt: ``[SOS] + context + class tokens + "." + [EOT]``."""

    n_ctx: int = field(default=16, metadata={
        "help": "number of learned context vectors M (with ctx_init: the number of its tokens)"})
    csc: bool = field(default=False, metadata={"help": "class-specific context (one set of M vectors per class)"})
    class_token_position: str = field(default="end", metadata={
        "help": "where the class name goes: end, middle (after M/2 vectors) or front",
        "choices": CLASS_TOKEN_POSITIONS, "flag": "position"})
    ctx_init: Optional[str] = field(default=None, metadata={
        "help": "initialise the context from these words, e.g. 'a photo of a' (default: random, std 0.02)"})

    def __post_init__(self) -> None:
        check_int("n_ctx", self.n_ctx, 1)
        check_bool("csc", self.csc)
        check_position(self.class_token_position)
        if self.ctx_init is not None:
            if not isinstance(self.ctx_init, str):
                raise ValueError(f"ctx_init must be a string of words or None, got {self.ctx_init!r}")
            self.ctx_init = " ".join(self.ctx_init.replace("_", " ").split())
            if not self.ctx_init:
                raise ValueError("ctx_init has no words; give initialisation words like 'a photo of a' or None")


def epochs_for_shots(shots: int) -> int:
    """The official CoOp schedule: 50 epochs at 1 shot, 100 at 2-4, 200 at 8 and more."""
    if shots <= 1:
        return 50
    if shots <= 4:
        return 100
    return 200


@dataclass
class TrainConfig(ConfigMixin):
    """How the context is fitted. Defaults follow the official CoOp recipe."""

    shots: int = field(default=16, metadata={"help": "training images per class (a class with fewer uses all)"})
    seed: int = field(default=1, metadata={"help": "seeds sampling, initialisation, augmentation and batching"})
    epochs: Optional[int] = field(default=None, metadata={
        "help": "epochs (default: the paper's 50/100/200 for 1/2-4/8+ shots)"})
    batch_size: int = field(default=32, metadata={"help": "images per step"})
    lr: float = field(default=0.002, metadata={"help": "peak learning rate of SGD"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "SGD weight decay"})
    warmup_epochs: int = field(default=1, metadata={"help": "epochs at the constant warm-up rate before the cosine"})
    warmup_lr: float = field(default=1e-5, metadata={"help": "learning rate during warm-up"})
    n_views: int = field(default=10, metadata={
        "help": "augmented views encoded once per training image (each epoch draws one at random)"})
    augment: bool = field(default=True, metadata={
        "help": "training views with CoOp's random resized crop (scale 0.08-1) + flip; off: whole images "
                "(resize + centre crop), better when each image shows one small object"})
    text_chunk_size: int = field(default=256, metadata={
        "help": "classes per text-tower pass (larger label sets go in checkpointed chunks)"})
    precision: str = field(default="auto", metadata={
        "help": "auto (fp32 on CPU, bf16/fp16 autocast on CUDA), fp32, bf16 or fp16", "choices": COMPUTE_PRECISIONS})
    strict: bool = field(default=False, metadata={"help": "fail on unreadable images instead of skipping them"})
    kg_weight: float = field(default=0.0, metadata={"help": "KgCoOp regularisation weight (0: plain CoOp)"})
    kg_template: str = field(default=DEFAULT_TEMPLATE, metadata={
        "help": "the hand-written prompt KgCoOp keeps the learned prompt near ({} = class name)"})

    def __post_init__(self) -> None:
        for name in ("shots", "batch_size", "n_views", "text_chunk_size"):
            check_int(name, getattr(self, name), 1)
        check_int("seed", self.seed, 0)
        check_int("epochs", self.epochs, 1, optional=True)
        check_int("warmup_epochs", self.warmup_epochs, 0)
        check_float("lr", self.lr, positive=True)
        check_float("warmup_lr", self.warmup_lr, positive=True)
        check_float("weight_decay", self.weight_decay)
        check_float("kg_weight", self.kg_weight)
        check_templates([self.kg_template])
        check_float("momentum", self.momentum, below=1.0)
        for name in ("augment", "strict"):
            check_bool(name, getattr(self, name))
        check_choice("precision", self.precision, COMPUTE_PRECISIONS)

    @property
    def resolved_epochs(self) -> int:
        """Epochs actually run."""
        return self.epochs if self.epochs is not None else epochs_for_shots(self.shots)


@dataclass
class TrainingData(ConfigMixin):
    """Where a run's training images came from, so that an export can find them again (int8
    calibrates on them). With the run's class names and ``train.shots`` / ``train.seed``,
    :func:`coopkit.userdata.few_shot` draws the same sample again."""

    source: str = field(metadata={"help": "absolute path of the ImageFolder, CSV or CoOp split file"})
    image_root: Optional[str] = field(default=None, metadata={"help": "folder of relative paths in a CSV / split"})

    def __post_init__(self) -> None:
        for name in ("source", "image_root"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"training data {name} must be a path string, got {value!r}")


@dataclass
class RunConfig(ConfigMixin):
    """Everything a saved run records next to its learned context (``config.json``).

    Attributes:
        method: The method that fitted it (a name of :mod:`coopkit.methods`, checked when the run
            is loaded).
        classnames: The label set, in output order.
        model: open_clip model name.
        pretrained: open_clip pretrained tag or checkpoint path; ``None`` for random init.
        model_config: The open_clip model config for custom architectures (``None`` for
            registered names), so the run loads without the original JSON file.
        tokenizer: The local tokenizer the backbone was loaded with (``None``: open_clip's).
        text_model: The local Hugging Face text-model config folder, if one was given.
        backbone_sha256: Fingerprint of the backbone weights the context was trained with.
        prompt: Prompt settings (CoOp runs).
        train: Training settings (runs fitted by :func:`coopkit.fit`).
        templates: Hand-written templates (zero-shot runs, and the few-shot baselines' text side).
        method_config: The method's own settings (its config dataclass as a JSON object, parsed by
            the method; ``None`` for methods that record theirs elsewhere or have none).
        metrics: Final metrics (training loss and accuracy, validation accuracy if any).
        ctx_sha256: sha256 of ``ctx.safetensors``, checked on load.
        head_sha256: sha256 of ``head.safetensors`` (few-shot baselines), checked on load.
        tensors_sha256: sha256 of the tensors file of any other method, checked on load.
        coopkit_version: Version that wrote the run.
        run_sha256: sha256 of the whole run (this config without this field, and
            its tensors file), checked on load (:func:`coopkit.runs.run_checksum`).
        data: Where the training images came from (CoOp runs fitted on a path; ``None`` for a
            Dataset object or a zero-shot run).
        task: ``classify`` or ``multilabel`` (:data:`TASKS`; runs written before multi-label
            methods existed are ``classify``).
    """

    method: str
    classnames: list[str]
    model: str
    pretrained: Optional[str] = None
    model_config: Optional[dict[str, Any]] = None
    tokenizer: Optional[str] = None
    text_model: Optional[str] = None
    backbone_sha256: str = ""
    prompt: Optional[PromptConfig] = None
    train: Optional[TrainConfig] = None
    templates: Optional[list[str]] = None
    method_config: Optional[dict[str, Any]] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    ctx_sha256: str = ""
    head_sha256: str = ""
    tensors_sha256: str = ""
    coopkit_version: str = ""
    config_version: int = CONFIG_VERSION
    run_sha256: str = ""
    data: Optional[TrainingData] = None
    task: str = "classify"

    def __post_init__(self) -> None:
        check_choice("task", self.task, TASKS)
        if not isinstance(self.method, str) or not self.method.strip():
            raise ValueError(f"method must be a method name, got {self.method!r}")
        self.classnames = check_classnames(self.classnames)
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be an open_clip model name, got {self.model!r}")
        for name in ("pretrained", "tokenizer", "text_model"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string or null, got {getattr(self, name)!r}")
        for name in ("backbone_sha256", "ctx_sha256", "head_sha256", "tensors_sha256", "coopkit_version",
                     "run_sha256"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        check_int("config_version", self.config_version, 0)
        if self.templates is not None and not isinstance(self.templates, (list, tuple)):
            raise ValueError(f"templates must be a list of strings or null, got {self.templates!r:.80}")
        if self.prompt is not None:
            self.prompt = PromptConfig.from_dict(self.prompt)
        if self.train is not None:
            self.train = TrainConfig.from_dict(self.train)
        if self.data is not None:
            self.data = TrainingData.from_dict(self.data)
        if self.templates is not None:
            self.templates = check_templates(self.templates)
        if isinstance(self.method_config, ConfigMixin):
            self.method_config = self.method_config.to_dict()
        if self.method_config is not None and not isinstance(self.method_config, dict):
            raise ValueError(f"method_config must be a JSON object or null, got {type(self.method_config).__name__}")
        if self.model_config is not None and not isinstance(self.model_config, dict):
            raise ValueError(f"model_config must be a JSON object or null, got {type(self.model_config).__name__}")
        if not isinstance(self.metrics, dict):
            raise ValueError(f"metrics must be a JSON object, got {type(self.metrics).__name__}")

    @classmethod
    def from_dict(cls, raw: Any) -> "RunConfig":
        if isinstance(raw, dict) and isinstance(raw.get("config_version", 0), int) \
                and raw.get("config_version", 0) > CONFIG_VERSION:
            raise ValueError(
                f"run was written by a newer coopkit (config version {raw['config_version']}, "
                f"this one reads {CONFIG_VERSION}); upgrade coopkit"
            )
        return super().from_dict(raw)  # type: ignore[return-value]
