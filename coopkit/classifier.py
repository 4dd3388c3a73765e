"""The fitted classifier: logits, predictions, evaluation, and the save/load pair.

Whether its class text features come from learned context (CoOp) or from hand-written
templates (zero-shot), a classifier reduces to one matrix once fitted:
``W = exp(logit_scale) * normalise(text features)`` of shape ``(n_classes, embed_dim)``, and
``logits = normalise(image features) @ W.T``. That matrix is what the exporter bakes into ONNX.

A saved run is a folder with ``config.json`` (:class:`coopkit.config.RunConfig`) and, for
CoOp, ``ctx.safetensors`` holding only the learned context. Loading uses no pickle.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from ._io import atomic_write
from .backbone import Backbone, load_backbone, register_model_config
from .config import RunConfig
from .data import Dataset, load_dataset
from .features import autocast_for, encode_images
from .prompts import PromptLearner, TextTower
from .runtime.contract import DEFAULT_TEMPLATE, check_classnames, check_templates, fill_templates
from .runtime.image import Prediction, check_predict_args, rank
from .runtime.preprocess import ImageInput, as_image_list, describe

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CTX_FILE = "ctx.safetensors"
DEFAULT_TEMPLATES = (DEFAULT_TEMPLATE,)


class LinearHead(nn.Module):
    """Logits of L2-normalised image features: ``x W^T + b`` with ``W = exp(logit_scale) * text
    features`` and ``b`` the model's logit bias (SigLIP-family models; none for CLIP's).

    The head :meth:`Classifier.head` returns, and the one the exporter bakes into the graph
    (a pure module: the weights and the bias are buffers, nothing else).
    """

    def __init__(self, weights: torch.Tensor, bias: Optional[float] = None) -> None:
        super().__init__()
        self.register_buffer("weights_t", weights.detach().to(torch.float32).t().contiguous())  # (embed_dim, C)
        self.register_buffer("bias", None if bias is None else torch.tensor(float(bias), dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = features.to(torch.float32) @ self.weights_t  # (b, C)
        return logits if self.bias is None else logits + self.bias


class Classifier:
    """A CLIP classifier over a fixed label set (CoOp or zero-shot).

    Build one with :func:`coopkit.fit`, :func:`coopkit.zero_shot` or :func:`coopkit.load`.

    Attributes:
        backbone: The frozen backbone.
        config: What the run is (method, model, prompt and training settings, metrics).
        learner: The CoOp prompt learner, or ``None`` for zero-shot.
    """

    def __init__(self, backbone: Backbone, config: RunConfig, learner: Optional[PromptLearner] = None) -> None:
        if (learner is None) != (config.method == "zeroshot"):
            raise ValueError("a coop classifier needs a PromptLearner; a zero-shot one must not have one")
        self.backbone = backbone
        self.config = config
        self.learner = learner
        self._weights: Optional[torch.Tensor] = None

    @property
    def classnames(self) -> list[str]:
        return list(self.config.classnames)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def text_tower(self) -> TextTower:
        """The backbone's text tower, as the prompt learner and the exporter's text graph see it."""
        return self.learner.tower if self.learner is not None else TextTower.of(self.backbone.model)

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features ``(n_classes, embed_dim)``, float32."""
        if self.learner is not None:
            with autocast_for(self.backbone.device):
                return self.learner.text_features().float()
        return template_features(self.backbone, self.classnames, self.config.templates or DEFAULT_TEMPLATES)

    @torch.no_grad()
    def class_weights(self) -> torch.Tensor:
        """``W = exp(logit_scale) * text features``, ``(n_classes, embed_dim)`` float32 on the CPU (cached)."""
        if self._weights is None:
            scale = self.backbone.model.logit_scale.exp().float().cpu()
            self._weights = (scale * self.text_features().cpu()).contiguous()
        return self._weights

    def head(self) -> nn.Module:
        """L2-normalised image features ``(b, embed_dim)`` -> logits ``(b, n_classes)``, on the CPU.

        Every score this classifier gives goes through it, and :func:`coopkit.exporters.export_onnx`
        bakes it into the graph, so PyTorch and ONNX compute the same function.
        """
        return LinearHead(self.class_weights(), self.backbone.logit_bias).eval()

    def with_classes(self, classnames: Sequence[str]) -> "Classifier":
        """The same prompt over other class names (base-to-new, open vocabulary).

        Unified context is class-agnostic and carries over as it is; class-specific context
        has no vectors for unseen classes, so it is refused.
        """
        names = check_classnames(classnames)
        config = RunConfig(**{**self.config.__dict__, "classnames": names, "metrics": {}})
        if self.learner is None:
            return Classifier(self.backbone, config)
        if self.learner.config.csc:
            raise ValueError("a class-specific-context run has no context for new classes; fit with csc=False")
        learner = PromptLearner(self.backbone, names, self.learner.config,
                                text_chunk_size=self.learner.text_chunk_size).to(self.backbone.device)
        with torch.no_grad():
            learner.ctx.copy_(self.learner.ctx)
        learner.requires_grad_(False)
        return Classifier(self.backbone, config, learner)

    def image_features(self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """L2-normalised image features ``(n, embed_dim)``; every image must decode."""
        images = as_image_list(images)
        if len(images) == 0:
            raise ValueError("no images given")
        feats, _ = encode_images(self.backbone, images, batch_size=batch_size, strict=True, progress=progress)
        return feats[0]

    def logits(self, images: Union[ImageInput, Sequence[ImageInput]], *, batch_size: int = 64) -> np.ndarray:
        """Logits ``(n_images, n_classes)`` (scaled cosine similarities, plus the logit bias of
        SigLIP-family models), float32, for paths, bytes, PIL images or uint8 HWC arrays; the
        same numbers the exported file gives."""
        with torch.no_grad():
            return self.head()(self.image_features(images, batch_size)).numpy()

    def probs(self, images: Union[ImageInput, Sequence[ImageInput]], *, batch_size: int = 64) -> np.ndarray:
        """Class probabilities ``(n_images, n_classes)`` (softmax of the logits over the label
        set, for every model family; a logit bias cancels), float32."""
        return torch.from_numpy(self.logits(images, batch_size=batch_size)).softmax(-1).numpy()

    def scores(self, images: Union[ImageInput, Sequence[ImageInput]], *, batch_size: int = 64) -> np.ndarray:
        """Per-class match probabilities ``sigmoid(logits)`` ``(n_images, n_classes)`` of a model
        trained with a sigmoid loss (SigLIP family: it has a logit bias), as it was trained to
        output them; each class on its own, so rows need not sum to 1.

        Raises:
            ValueError: a softmax-trained model (no logit bias), whose logits are not calibrated
                for a sigmoid; use :meth:`probs`.
        """
        if self.backbone.logit_bias is None:
            raise ValueError(
                f"{self.backbone.name} was trained with a softmax loss (no logit bias), so sigmoid scores mean "
                "nothing for it; use probs() (softmax over the label set)"
            )
        return torch.from_numpy(self.logits(images, batch_size=batch_size)).sigmoid().numpy()

    def embed(self, images: Union[ImageInput, Sequence[ImageInput]], *, batch_size: int = 64) -> np.ndarray:
        """L2-normalised image embeddings ``(n_images, embed_dim)``, float32."""
        return self.image_features(images, batch_size).numpy()

    def predict(
        self,
        images: Union[ImageInput, Sequence[ImageInput]],
        top_k: int = 5,
        *,
        errors: str = "raise",
        batch_size: int = 64,
    ) -> list[Prediction]:
        """Label images: one :class:`~coopkit.runtime.Prediction` per input, best label first.

        The same contract as :meth:`coopkit.runtime.Classifier.predict` (``p.label``,
        ``p.labels``, ``p.probs``, ``p.error``).

        Args:
            images: One image or a list: paths, encoded bytes, PIL images, uint8 HWC arrays.
            top_k: Labels per image (at most the number of classes).
            errors: ``raise`` (the first unreadable image raises, naming it) or ``skip``
                (unreadable images get a result with ``error`` set).
            batch_size: Images per forward pass.
        """
        k = check_predict_args(top_k, errors)
        sources = as_image_list(images)
        if not sources:
            return []
        errs: list[Optional[str]] = [None] * len(sources)
        feats, _ = encode_images(self.backbone, sources, batch_size=batch_size, strict=errors == "raise",
                                 errors_out=errs)
        if feats.shape[1]:
            with torch.no_grad():
                probs = self.head()(feats[0]).softmax(-1).numpy()  # (n_readable, n_classes)
        else:
            probs = np.zeros((0, len(self.classnames)), np.float32)
        return rank(probs, self.classnames, [describe(s) for s in sources], errs, k)

    def evaluate(
        self,
        data: Union[str, os.PathLike, Dataset],
        *,
        split: str = "test",
        image_root: Optional[Union[str, os.PathLike]] = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Accuracy on a labelled set (ImageFolder, CSV or CoOp split, by class name).

        Returns:
            ``accuracy`` (fraction correct), ``macro_accuracy`` (mean over classes),
            ``per_class`` (class -> accuracy) and ``n`` (images evaluated; unreadable ones are skipped).
        """
        dataset = load_dataset(data, split=split, image_root=image_root).relabel(self.classnames)
        feats, kept = encode_images(
            self.backbone, dataset.paths, batch_size=batch_size, progress=progress, desc="evaluating"
        )
        with torch.no_grad():
            pred = self.head()(feats[0]).argmax(dim=1).numpy()
        labels = np.array([dataset.labels[i] for i in kept])
        correct = pred == labels
        per_class = {
            self.classnames[c]: float(correct[labels == c].mean()) for c in sorted(set(labels.tolist()))
        }
        return {
            "accuracy": float(correct.mean()),
            "macro_accuracy": float(np.mean(list(per_class.values()))),
            "per_class": per_class,
            "n": int(len(labels)),
        }

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the run to a folder: ``config.json`` and, for CoOp, ``ctx.safetensors``.

        A new folder appears whole or not at all (written aside, then renamed). Over an
        existing run, each file is replaced atomically and ``config.json`` (written last)
        records the sha256 of the context file, so a mismatched pair is detected on load.
        """
        from safetensors.torch import save as st_save

        target = Path(path).expanduser()
        if target.exists() and not target.is_dir():
            raise ValueError(f"cannot save a run to {target}: it exists and is not a folder")
        blobs: dict[str, bytes] = {}
        if self.learner is not None:
            blobs[CTX_FILE] = st_save({"ctx": self.learner.ctx.detach().float().cpu().contiguous()})
            self.config.ctx_sha256 = hashlib.sha256(blobs[CTX_FILE]).hexdigest()
        self.config.coopkit_version = __version__
        blobs[CONFIG_FILE] = self.config.to_json().encode()
        parent = target.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
                try:
                    for name, blob in blobs.items():
                        (tmp / name).write_bytes(blob)
                    os.replace(tmp, target)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
            else:
                for name, blob in blobs.items():
                    atomic_write(target / name, blob)
        except PermissionError:
            raise ValueError(f"cannot write the run to {target}: permission denied") from None
        logger.info("saved %s run to %s", self.method, target)
        return target


def template_features(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], chunk: int = 256) -> torch.Tensor:
    """Hand-written prompt features: mean of normalised template embeddings, renormalised."""
    model, tok = backbone.model, backbone.tokenizer
    out = []
    with torch.no_grad(), autocast_for(backbone.device):
        for start in range(0, len(classnames), chunk):
            names = list(classnames[start : start + chunk])
            per_template = []
            for t in templates:
                tokens = torch.as_tensor(tok(fill_templates(t, names))).to(backbone.device)
                per_template.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
            out.append(F.normalize(torch.stack(per_template).mean(0), dim=-1))  # (chunk, D)
    return torch.cat(out)


def zero_shot(
    backbone: Backbone,
    classnames: Sequence[str],
    templates: Union[str, Sequence[str]] = DEFAULT_TEMPLATES,
) -> Classifier:
    """The hand-written-prompt baseline: one template, or an ensemble of them.

    Args:
        backbone: From :func:`coopkit.load_backbone`.
        classnames: Labels, in output order.
        templates: Strings with one ``{}`` for the class name; several are averaged (CLIP's ensembling).
    """
    names = check_classnames(classnames)
    config = RunConfig(
        method="zeroshot",
        classnames=names,
        model=backbone.name,
        pretrained=backbone.pretrained,
        model_config=backbone.model_config,
        tokenizer=backbone.tokenizer_path,
        text_model=backbone.text_model,
        backbone_sha256=backbone.weights_sha256,
        templates=check_templates(templates),
        coopkit_version=__version__,
    )
    return Classifier(backbone, config)


def load(
    path: Union[str, os.PathLike],
    *,
    device: str = "auto",
    pretrained: Optional[str] = None,
    backbone: Optional[Backbone] = None,
    tokenizer: Optional[str] = None,
) -> Classifier:
    """Restore a saved run.

    Args:
        path: Folder written by :meth:`Classifier.save`.
        device: Where to load the backbone.
        pretrained: Override the recorded checkpoint path (e.g. the run moved machines).
        backbone: Reuse an already loaded backbone (must be the one the run was trained with).
        tokenizer: Override the recorded local tokenizer path (e.g. the run moved machines).

    Raises:
        FileNotFoundError: the folder or its files are missing.
        ValueError: a corrupt run, or a backbone whose weights differ from the recorded ones.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder not found: {path}")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} is not a coopkit run: no {CONFIG_FILE}")
    try:
        config = RunConfig.from_json(cfg_path.read_text())
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path} is corrupt: {e}") from None
    blob = None
    if config.method == "coop":
        ctx_path = folder / CTX_FILE
        if not ctx_path.is_file():
            raise FileNotFoundError(f"{folder} is a CoOp run without {CTX_FILE}")
        blob = ctx_path.read_bytes()
        if config.ctx_sha256 and hashlib.sha256(blob).hexdigest() != config.ctx_sha256:
            raise ValueError(f"{ctx_path} does not match {CONFIG_FILE} (interrupted save or edited file)")
    if backbone is None:
        if config.model_config is not None:
            register_model_config(config.model, config.model_config)
        backbone = load_backbone(config.model, pretrained if pretrained is not None else config.pretrained, device,
                                 tokenizer if tokenizer is not None else config.tokenizer, config.text_model)
    if config.backbone_sha256 and backbone.weights_sha256 != config.backbone_sha256:
        raise ValueError(
            f"the backbone weights differ from those this run was trained with ({config.model}, "
            f"pretrained={config.pretrained}): sha256 {backbone.weights_sha256[:12]}..., recorded "
            f"{config.backbone_sha256[:12]}...; load the same weights"
        )
    learner = None
    if blob is not None:
        try:
            ctx = st_load(blob)["ctx"]
        except (SafetensorError, KeyError) as e:
            raise ValueError(f"{folder / CTX_FILE} is corrupt: {e}") from None
        assert config.prompt is not None
        learner = PromptLearner(
            backbone, config.classnames, config.prompt,
            text_chunk_size=config.train.text_chunk_size if config.train else 256,
        ).to(backbone.device)
        if tuple(ctx.shape) != tuple(learner.ctx.shape):
            raise ValueError(f"{folder / CTX_FILE}: context of shape {tuple(ctx.shape)}, expected {tuple(learner.ctx.shape)}")
        with torch.no_grad():
            learner.ctx.copy_(ctx)
        learner.requires_grad_(False)
    return Classifier(backbone, config, learner)
