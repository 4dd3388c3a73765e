"""Typed configuration: what a prompt is, how it is trained, and what a saved run records.

Every config is a dataclass validated in ``__post_init__``, so a bad value fails at the
call that introduced it, with a message naming the value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Optional

logger = logging.getLogger(__name__)

CONFIG_VERSION = 1


class ClassTokenPosition(str, Enum):
    """Where the class-name tokens sit relative to the learned context."""

    END = "end"
    MIDDLE = "middle"
    FRONT = "front"


def _choice(enum: type[Enum], value: Any, what: str) -> str:
    try:
        return enum(value).value
    except ValueError:
        valid = ", ".join(repr(e.value) for e in enum)
        raise ValueError(f"unknown {what} {value!r}; valid: {valid}") from None


def epochs_for_shots(shots: int) -> int:
    """The official CoOp schedule: 50 epochs at 1 shot, 100 at 2-4, 200 at 8 and more."""
    if shots <= 1:
        return 50
    if shots <= 4:
        return 100
    return 200


@dataclass
class PromptConfig:
    """The learnable prompt: ``[SOS] + context + class tokens + "." + [EOT]``.

    Attributes:
        n_ctx: Number of learned context vectors M (ignored when ``ctx_init`` is given:
            then M is the number of tokens of ``ctx_init``).
        csc: Class-specific context (one set of M vectors per class) instead of unified.
        class_token_position: ``end``, ``middle`` (after M/2 vectors) or ``front``.
        ctx_init: Words whose token embeddings initialise the context, e.g. ``"a photo of a"``;
            ``None`` for random initialisation (normal, std 0.02).
    """

    n_ctx: int = field(default=16, metadata={"help": "number of context vectors"})
    csc: bool = field(default=False, metadata={"help": "class-specific context"})
    class_token_position: str = field(default="end", metadata={"help": "end, middle or front"})
    ctx_init: Optional[str] = field(default=None, metadata={"help": "initialisation words"})

    def __post_init__(self) -> None:
        if isinstance(self.n_ctx, bool) or not isinstance(self.n_ctx, int) or self.n_ctx < 1:
            raise ValueError(f"n_ctx must be an integer >= 1, got {self.n_ctx!r}")
        self.class_token_position = _choice(ClassTokenPosition, self.class_token_position, "class_token_position")
        if self.ctx_init is not None:
            self.ctx_init = " ".join(str(self.ctx_init).replace("_", " ").split())
            if not self.ctx_init:
                raise ValueError("ctx_init has no words; give initialisation words like 'a photo of a' or None")
        self.csc = bool(self.csc)


@dataclass
class TrainConfig:
    """How the context is fitted. Defaults follow the official CoOp recipe.

    Attributes:
        shots: Training images per class (a class with fewer uses all it has).
        seed: Seeds few-shot sampling, context initialisation, augmentation and batching.
        epochs: ``None`` picks the paper's schedule from ``shots`` (see :func:`epochs_for_shots`).
        batch_size: Images per step.
        lr: Peak learning rate of SGD.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        warmup_epochs: Epochs at constant ``warmup_lr`` before the cosine schedule.
        warmup_lr: Learning rate during warm-up.
        n_views: Augmented views encoded per training image. The image encoder is frozen, so
            each image is encoded ``n_views`` times under the training augmentation (random
            resized crop, scale 0.08-1, and horizontal flip) once, before training; every
            epoch then draws one of those views per image at random. ``n_views=1`` trains on a
            single fixed view; larger values approach the paper's fresh augmentation per epoch.
        text_chunk_size: Classes passed through the text tower at once; larger label sets
            are split into chunks with activation checkpointing to bound memory.
        precision: ``auto`` (fp32 on CPU, bf16/fp16 autocast on CUDA), ``fp32``, ``bf16`` or ``fp16``.
        strict: Raise on unreadable images instead of skipping them with a warning.
        kg_weight: KgCoOp regularisation weight (0 = plain CoOp).
        augment: Encode training views with CoOp's augmentation; ``False`` uses the
            evaluation transform (whole images), better for small single-object images.
    """

    shots: int = 16
    seed: int = 1
    epochs: Optional[int] = None
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    n_views: int = 10
    text_chunk_size: int = 256
    precision: str = "auto"
    strict: bool = False
    kg_weight: float = 0.0
    augment: bool = True

    def __post_init__(self) -> None:
        for name in ("shots", "batch_size", "n_views", "text_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.epochs is not None and (not isinstance(self.epochs, int) or self.epochs < 1):
            raise ValueError(f"epochs must be an integer >= 1 or None, got {self.epochs!r}")
        if not isinstance(self.warmup_epochs, int) or self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {self.warmup_epochs!r}")
        for name in ("lr", "warmup_lr", "weight_decay", "kg_weight"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"unknown precision {self.precision!r}; valid: 'auto', 'fp32', 'bf16', 'fp16'")

    @property
    def resolved_epochs(self) -> int:
        """Epochs actually run."""
        return self.epochs if self.epochs is not None else epochs_for_shots(self.shots)


@dataclass
class RunConfig:
    """Everything a saved run records next to its learned context (``config.json``).

    Attributes:
        method: ``coop`` or ``zeroshot``.
        classnames: The label set, in output order.
        model: open_clip model name.
        pretrained: open_clip pretrained tag or checkpoint path; ``None`` for random init.
        model_config: The open_clip model config for custom architectures (``None`` for
            registered names), so the run loads without the original JSON file.
        backbone_sha256: Fingerprint of the backbone weights the context was trained with.
        prompt: Prompt settings (CoOp runs).
        train: Training settings (CoOp runs).
        templates: Hand-written templates (zero-shot runs).
        metrics: Final metrics (training loss and accuracy, validation accuracy if any).
        ctx_sha256: sha256 of ``ctx.safetensors``, checked on load.
        coopkit_version: Version that wrote the run.
    """

    method: str
    classnames: list[str]
    model: str
    pretrained: Optional[str] = None
    model_config: Optional[dict[str, Any]] = None
    backbone_sha256: str = ""
    prompt: Optional[PromptConfig] = None
    train: Optional[TrainConfig] = None
    templates: Optional[list[str]] = None
    metrics: dict[str, Any] = field(default_factory=dict)
    ctx_sha256: str = ""
    coopkit_version: str = ""
    config_version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.method not in ("coop", "zeroshot"):
            raise ValueError(f"unknown method {self.method!r}; valid: 'coop', 'zeroshot'")
        if isinstance(self.prompt, dict):
            self.prompt = _from_dict(PromptConfig, self.prompt)
        if isinstance(self.train, dict):
            self.train = _from_dict(TrainConfig, self.train)
        if self.method == "coop" and self.prompt is None:
            raise ValueError("a coop run needs prompt settings")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("run config is not a JSON object")
        if raw.get("config_version", 0) > CONFIG_VERSION:
            raise ValueError(
                f"run was written by a newer coopkit (config version {raw['config_version']}, "
                f"this one reads {CONFIG_VERSION}); upgrade coopkit"
            )
        return _from_dict(cls, raw)


def _from_dict(cls: type, raw: dict[str, Any]) -> Any:
    """Build a dataclass from a dict, warning about (and dropping) keys it does not know."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        logger.warning("ignoring unknown %s keys %s (written by a newer coopkit?)", cls.__name__, unknown)
    return cls(**{k: v for k, v in raw.items() if k in known})
