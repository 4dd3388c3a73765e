"""PromptSRC: self-regulating prompts (Khattak et al., ICCV 2023).

IVLP's architecture (independent deep prompts in both encoders, :mod:`coopkit.methods.ivlp`)
trained with three self-regulating terms that keep the prompted model near frozen CLIP, and with
Gaussian-weighted prompt aggregation (GPA) over the epochs:

* ``L1(text features, frozen CLIP's features of 60 hand-written templates) * text_loss_weight``
  (the frozen features: the mean of the templates' unnormalised text features, normalised);
* ``L1(image features, frozen CLIP's image features of the same augmented batch) * image_loss_weight``;
* ``KL(zero-shot logits || prompted logits)`` summed and divided by the number of logits;
* GPA: after epoch ``e`` (1-based) the prompts are added with weight ``N(e; gpa_mean, gpa_std)``
  (normalised over the epochs); the aggregate is the final model.

Equal to the official ``trainers/promptsrc.py`` (muzairkhattak/PromptSRC); ``tests/test_promptsrc.py``
compares the loss, its gradients and the aggregation with that code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F

from .base import Shots, template_features
from ..runtime.configbase import check_float
from .deep_prompts import build_seeded, fit_deep_prompts
from .deep_prompts import register_method
from .ivlp import IVLPConfig, IVLPModel, from_official, official_config
from .ivlp import check_backbone as ivlp_check_backbone

if TYPE_CHECKING:
    from ..backbone import Backbone
    from ..config import TrainConfig


NAME = "promptsrc"


def promptsrc_templates() -> list[str]:
    """The official ``IMAGENET_TEMPLATES`` (60): open_clip's first 60 OpenAI ImageNet templates, the
    40th moved to the front ("a photo of a {}."), in the official order."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    texts = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    return [texts[39]] + texts[:39] + texts[40:60]


@dataclass
class PromptSRCConfig(IVLPConfig):
    """PromptSRC's prompts, losses and recipe. Defaults: the official base-to-new config
    ``PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml`` (few-shot: ``epochs=50, gpa_mean=30, gpa_std=30``;
    cross-dataset: depths 3, ``gpa_mean=6, gpa_std=10``)."""

    n_ctx_text: int = field(default=4, metadata={"help": "prompt tokens per text layer (N_CTX_TEXT)"})
    n_ctx_vision: int = field(default=4, metadata={"help": "prompt tokens per image layer (N_CTX_VISION)"})
    prompt_depth_text: int = field(default=9, metadata={
        "help": "text layers that get prompt tokens, from the first (PROMPT_DEPTH_TEXT, >= 1)"})
    prompt_depth_vision: int = field(default=9, metadata={
        "help": "image layers that get prompt tokens, from the first (PROMPT_DEPTH_VISION)"})
    lr: float = field(default=0.0025, metadata={"help": "peak SGD learning rate (OPTIM.LR)"})
    epochs: int = field(default=20, metadata={"help": "epochs (OPTIM.MAX_EPOCH)"})
    text_loss_weight: float = field(default=25.0, metadata={
        "help": "weight of the L1 pull of the text features to frozen CLIP's (TEXT_LOSS_WEIGHT)"})
    image_loss_weight: float = field(default=10.0, metadata={
        "help": "weight of the L1 pull of the image features to frozen CLIP's (IMAGE_LOSS_WEIGHT)"})
    gpa_mean: float = field(default=15.0, metadata={"help": "epoch (1-based) GPA weighs most (GPA_MEAN)"})
    gpa_std: float = field(default=1.0, metadata={"help": "spread of GPA's Gaussian over the epochs (GPA_STD)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("text_loss_weight", self.text_loss_weight)
        check_float("image_loss_weight", self.image_loss_weight)
        check_float("gpa_std", self.gpa_std, positive=True)
        if isinstance(self.gpa_mean, bool) or not isinstance(self.gpa_mean, (int, float)) or not math.isfinite(self.gpa_mean):
            raise ValueError(f"gpa_mean must be a finite number, got {self.gpa_mean!r}")
        if sum(gpa_weights(self.epochs, self.gpa_mean, self.gpa_std)) == 0:
            raise ValueError(f"gpa_mean={self.gpa_mean} with gpa_std={self.gpa_std} gives every one of the {self.epochs} "
                             "epochs a Gaussian weight of 0; put the mean within reach of the epochs")


def gpa_weights(epochs: int, mean: float, std: float) -> list[float]:
    """GPA's weight of each epoch ``1..epochs``: ``N(epoch; mean, std)``, normalised to sum 1
    (all zeros when every density underflows; the config refuses that)."""
    dens = [math.exp(-0.5 * ((e - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)) for e in range(1, epochs + 1)]
    total = sum(dens)
    return [d / total for d in dens] if total > 0 else dens


def check_backbone(backbone: "Backbone", config: PromptSRCConfig) -> None:
    """Refuse, in one line, a family or a depth PromptSRC cannot prompt."""
    ivlp_check_backbone(backbone, config, NAME)
    if config.prompt_depth_vision == 0:
        raise ValueError(f"{NAME} regularises the prompted image features: prompt_depth_vision must be >= 1")


class PromptSRCModel(IVLPModel):
    """PromptSRC's learned tensors: IVLP's (``ctx``, ``text_deep``, ``vision_ctx``, ``vision_deep``)."""

    method = NAME


class SelfRegulation:
    """PromptSRC's three loss terms, against frozen CLIP (its template text features computed once)."""

    def __init__(self, model: PromptSRCModel, config: PromptSRCConfig) -> None:
        bb = model.backbone
        self.config = config
        self.model = bb.model
        raw = template_features(bb, model.classnames, promptsrc_templates(), raw=True)  # (n_cls, D): mean of raw
        self.fixed = F.normalize(raw.float(), dim=-1).to(bb.device)  # (n_cls, D)

    def __call__(self, model: PromptSRCModel, pixels: torch.Tensor, logits: torch.Tensor, image: torch.Tensor,
                 text: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        with torch.no_grad():
            zs_image = F.normalize(self.model.encode_image(pixels).float(), dim=-1)  # (b, D)
            zs_logits = self.model.logit_scale.exp().float() * zs_image @ self.fixed.T  # (b, n_cls)
        loss_text = F.l1_loss(text.float(), self.fixed, reduction="mean") * cfg.text_loss_weight
        loss_image = F.l1_loss(image.float(), zs_image, reduction="mean") * cfg.image_loss_weight
        loss_logits = F.kl_div(F.log_softmax(logits.float(), dim=1), F.log_softmax(zs_logits, dim=1),
                               reduction="sum", log_target=True) / logits.numel()
        return loss_logits + loss_text + loss_image


class GaussianAggregate:
    """GPA: ``sum_e w_e * prompts after epoch e``; :meth:`finish` puts the aggregate into the model."""

    def __init__(self, model: PromptSRCModel, config: PromptSRCConfig) -> None:
        self.model = model
        self.weights = gpa_weights(config.epochs, config.gpa_mean, config.gpa_std)
        self.total: Optional[dict[str, torch.Tensor]] = None

    def __call__(self, epoch: int) -> None:
        """Add the prompts after ``epoch`` (0-based) with their weight."""
        w = self.weights[epoch]
        current = {k: v.detach() * w for k, v in self.model.state_dict().items()}
        if self.total is None:
            self.total = current
        else:
            for k, v in current.items():
                self.total[k] = self.total[k] + v

    def finish(self) -> None:
        if self.total is not None:
            self.model.load_state_dict(self.total)



def fit(backbone: "Backbone", shots: Shots, config: PromptSRCConfig, train: "TrainConfig", *,
        progress: bool = False, callback: Optional[Callable[[int, dict[str, float]], None]] = None,
        **_: Any) -> tuple[PromptSRCModel, dict[str, Any]]:
    """Train PromptSRC (cross-entropy + self-regulation, GPA over the epochs) on the few-shot sample
    ``shots``; the returned model holds the aggregated prompts."""
    check_backbone(backbone, config)
    model = build_seeded(PromptSRCModel, backbone, shots.classnames, config, train.seed)
    regulation = SelfRegulation(model, config)
    gpa = GaussianAggregate(model, config)
    metrics = fit_deep_prompts(model, shots, train, config, extra_loss=regulation, on_epoch_end=gpa,
                               progress=progress, callback=callback)
    gpa.finish()
    return model, metrics



register_method(NAME, "PromptSRC: IVLP's deep prompts, regularised towards frozen CLIP, averaged over epochs (GPA)",
                PromptSRCModel, PromptSRCConfig, official_config, from_official, check_backbone, fit,
                bench_setting="deep prompts, self-regulation, GPA")
