"""The fitted classifier: logits, predictions, evaluation; what it was fitted with is its MethodModel.

Whatever the method (:mod:`coopkit.methods`), a classifier scores L2-normalised image features
with one pure module, its head (``logits = head(normalise(image features))``); for methods with
constant class weights that is ``x W^T`` with ``W = exp(logit_scale) * normalise(text features)``
of shape ``(n_classes, embed_dim)``. That head is what the exporter bakes into ONNX.

Saving and loading live in :mod:`coopkit.runs` (:meth:`Classifier.save` and :func:`load` are
their public face here).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .backbone import Backbone
from .config import RunConfig
from .userdata import Dataset, load_dataset
from .features import encode_images
from .multilabel_data import MultiLabelDataset, load_multilabel
from .methods import get, names
from .methods.base import MethodModel, TextContext
from .prompts import PromptLearner, TextTower
from .runs import read_run, save_run
from .runtime.contract import check_classnames
from .runtime.results import Prediction, check_predict_args, rank
from .runtime.preprocess import ImageInput, as_image_list, describe

logger = logging.getLogger(__name__)


class Classifier:
    """A CLIP classifier over a fixed label set, fitted by one of the registered methods.

    Build one with :func:`coopkit.fit`, :func:`coopkit.zero_shot`, :func:`coopkit.load` or the
    baselines of :mod:`coopkit.research.baselines`.

    Attributes:
        backbone: The frozen backbone.
        config: What the run is (method, model, method and training settings, metrics).
        model: The fitted method (:class:`~coopkit.methods.base.MethodModel`) it delegates to.
    """

    def __init__(self, backbone: Backbone, config: RunConfig, model: MethodModel) -> None:
        if not isinstance(model, MethodModel):
            raise ValueError(f"a Classifier delegates to a MethodModel, got {type(model).__name__}")
        if list(model.classnames) != list(config.classnames):
            raise ValueError("the model's class names differ from the run config's")
        get(config.method)  # a registered method
        self.backbone = backbone
        self.config = config
        self.model = model

    @property
    def classnames(self) -> list[str]:
        return list(self.config.classnames)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def trained(self) -> bool:
        """Whether its method learns from training images (zero-shot does not)."""
        return get(self.method).fit is not None

    @property
    def text_graph(self) -> bool:
        """Whether the exporter can export this classifier's text side (``--with-text-encoder``)."""
        return get(self.method).text_graph

    @property
    def merged_weights(self) -> bool:
        """Whether :meth:`save_merged_weights` can write this run's merged weights (its method merges
        what it trained into the backbone's weights: CLIP-LoRA)."""
        return get(self.method).merged_weights

    def save_merged_weights(self, path: Union[str, os.PathLike]) -> Path:
        """Write the backbone's weights with what the method trained merged in, as a safetensors file
        open_clip loads as the model's checkpoint (``open_clip.create_model(name, pretrained=path)``).

        Raises:
            ValueError: the run's method has no merged weights (the message names those that do).
        """
        if not self.merged_weights:
            having = [n for n in names() if get(n).merged_weights]
            raise ValueError(f"a {self.method} run has no merged weights; methods that have them: "
                             f"{', '.join(having) or 'none'}")
        return Path(self.model.save_merged_weights(path))

    @property
    def learner(self) -> Optional[PromptLearner]:
        """The prompt learner of a CoOp-style model, else ``None``."""
        learner = getattr(self.model, "learner", None)
        return learner if isinstance(learner, PromptLearner) else None

    def text_context(self) -> Optional[TextContext]:
        """The learned text prompt its ``--with-text-encoder`` graph bakes in (CoOp's context; the deep
        prompts of IVLP, MaPLe and PromptSRC), or ``None``: the plain tower over the run's templates.

        A model that says nothing (``None``) but holds a CoOp prompt learner (:attr:`learner`) gets its
        context over CoOp's placeholder prompt, as every text graph was built before the method said it."""
        context = self.model.text_context()
        learner = self.learner
        if context is None and learner is not None:
            return TextContext.of_learner(learner)
        return context

    @property
    def text_tower(self) -> TextTower:
        """The backbone's text tower, as the prompt learner and the exporter's text graph see it."""
        tower = getattr(self.model, "text_tower", None)  # CoOp: its learner's; CLIP-LoRA: the merged tower
        return tower if isinstance(tower, TextTower) else TextTower.of(self.backbone.model)

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features ``(n_classes, embed_dim)``, float32 (methods with text features)."""
        features = getattr(self.model, "text_features", None)
        if features is None:
            raise ValueError(f"a {self.method} classifier has no text features of its own")
        return features()

    def class_weights(self) -> Optional[torch.Tensor]:
        """``W = exp(logit_scale) * text features``, ``(n_classes, embed_dim)`` float32 on the CPU (cached);
        for a linear-probe head, its learned weight matrix; ``None`` when they depend on the image."""
        return self.model.class_weights()

    def head(self) -> nn.Module:
        """L2-normalised image features ``(b, embed_dim)`` -> logits ``(b, n_classes)``, on the CPU.

        Every score this classifier gives goes through it, and :func:`coopkit.exporters.export_onnx`
        bakes it into the graph, so PyTorch and ONNX compute the same function.
        """
        return self.model.head()

    def image_encoder(self) -> nn.Module:
        """Normalised pixels ``(b, 3, H, W)`` -> unnormalised image features: the module the exporter traces."""
        return self.model.image_encoder()

    def with_classes(self, classnames: Sequence[str]) -> "Classifier":
        """The same model over other class names (base-to-new, open vocabulary), where the method
        allows it (CoOp's unified context and zero-shot do; class-specific context and the
        baselines' heads hold weights for their training classes only)."""
        names = check_classnames(classnames)
        model = self.model.with_classes(names)
        config = RunConfig(**{**self.config.__dict__, "classnames": names, "metrics": {}, "run_sha256": ""})
        return Classifier(self.backbone, config, model)

    def image_features(self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """L2-normalised image features ``(n, embed_dim)``; every image must decode."""
        images = as_image_list(images)
        if len(images) == 0:
            raise ValueError("no images given")
        feats, _ = encode_images(self.backbone, images, batch_size=batch_size, strict=True, progress=progress,
                                 encoder=self.image_encoder(), transform=self._transform())
        return feats[0]

    def logits(self, images: Union[ImageInput, Sequence[ImageInput]], *, batch_size: int = 64) -> np.ndarray:
        """Logits ``(n_images, n_classes)`` (scaled cosine similarities, plus the logit bias of
        SigLIP-family models), float32, for paths, bytes, PIL images or uint8 HWC arrays; the
        same numbers the exported file gives."""
        with torch.no_grad():
            return self.head()(self.image_features(images, batch_size)).numpy()

    def probs(self, images: Union[ImageInput, Sequence[ImageInput]], *, batch_size: int = 64) -> np.ndarray:
        """Class probabilities ``(n_images, n_classes)`` (softmax of the logits over the label
        set, for every model family; a logit bias cancels), float32. A multi-label run: each
        label's own probability (sigmoid of its logit), so rows need not sum to 1."""
        logits = torch.from_numpy(self.logits(images, batch_size=batch_size))
        return (logits.sigmoid() if self.multilabel else logits.softmax(-1)).numpy()

    @property
    def multilabel(self) -> bool:
        """Whether the run answers several labels per image (``config.task == "multilabel"``)."""
        return self.config.task == "multilabel"

    def _transform(self) -> Any:
        """The image transform of the method when it has its own (DualCoOp's stretch to its input size), else ``None``."""
        return getattr(self.model, "preprocess", None) if self.multilabel else None

    @property
    def preprocess(self) -> Any:
        """The torchvision transform its images go through: the method's own where it has one
        (DualCoOp stretches to its input size), else the backbone's."""
        return self._transform() or self.backbone.preprocess

    @property
    def preprocess_cfg(self) -> dict[str, Any]:
        """The settings of :attr:`preprocess`, under open_clip's names (``size``, ``mean``, ``std``,
        ``interpolation``, ``resize_mode``, ``fill_color``): what an exported file records."""
        own = getattr(self.model, "preprocess_cfg", None) if self._transform() is not None else None
        return dict(own or self.backbone.preprocess_cfg)

    @property
    def thresholds(self) -> Optional[np.ndarray]:
        """A multi-label run's per-label decision thresholds on the probabilities ``(n_classes,)``
        float32 (a label applies where its probability reaches its threshold); ``None`` otherwise."""
        t = getattr(self.model, "thresholds", None) if self.multilabel else None
        return None if t is None else t.detach().cpu().float().numpy().copy()

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
        ``p.labels``, ``p.probs``, ``p.error``; a multi-label run: every label at or above its
        threshold, and every label's probability in ``p.label_probs``).

        Args:
            images: One image or a list: paths, encoded bytes, PIL images, uint8 HWC arrays.
            top_k: Labels per image (at most the number of classes; a multi-label run returns
                every label at or above its threshold instead).
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
                                 errors_out=errs, encoder=self.image_encoder(), transform=self._transform())
        if feats.shape[1]:
            with torch.no_grad():
                logits = self.head()(feats[0])  # (n_readable, n_classes)
                probs = (logits.sigmoid() if self.multilabel else logits.softmax(-1)).numpy()
        else:
            probs = np.zeros((0, len(self.classnames)), np.float32)
        return rank(probs, self.classnames, [describe(s) for s in sources], errs, k, thresholds=self.thresholds)

    def evaluate(
        self,
        data: Union[str, os.PathLike, Dataset, MultiLabelDataset],
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
            A multi-label run (a multi-label CSV / JSON / COCO or VOC root with ``split``, or a
            :class:`~coopkit.multilabel_data.MultiLabelDataset`): ``mAP``, per-label ``AP``, and
            precision / recall / F1 at the run's per-label thresholds (``CP``, ``CR``, ``CF1``,
            ``OP``, ``OR``, ``OF1``, ``per_class``), unknown labels skipped
            (:func:`coopkit.multilabel_metrics.multilabel_report`).
        """
        if self.multilabel:
            root = not isinstance(data, MultiLabelDataset) and Path(data).is_dir()  # COCO / VOC: by split
            ml = load_multilabel(data, split=split if root else None, image_root=image_root, classnames=self.classnames)
            return {"classes": self.classnames, **self.model.evaluate_multilabel(ml)}
        dataset = load_dataset(data, split=split, image_root=image_root).relabel(self.classnames)
        feats, kept = encode_images(
            self.backbone, dataset.paths, batch_size=batch_size, progress=progress, desc="evaluating",
            encoder=self.image_encoder(),
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

    def save(self, path: Union[str, os.PathLike], *, overwrite: bool = False) -> Path:
        """Write the run to a folder: ``config.json`` and the method's tensors file (if it trained any).

        The folder is written beside ``path`` and swapped in with one rename: a crash or a full
        disk at any moment leaves the previous run (or no folder) exactly as it was, and Ctrl-C
        takes effect once the save (a few milliseconds) is complete. ``config.json`` records
        ``run_sha256``, a checksum of the whole run that :func:`load` verifies.

        Args:
            path: The run folder (created with its parents; an existing run is replaced).
            overwrite: Also replace a folder that holds something other than a coopkit run
                (everything in it is deleted). Without it, such a folder is refused.

        Raises:
            ValueError: ``path`` is a file, or a folder that is not a run (without ``overwrite``).
            OSError: the environment: permission denied, disk full (the old run is kept).
        """
        return save_run(path, self.config, self.model, overwrite=overwrite)


def load(
    path: Union[str, os.PathLike],
    *,
    device: str = "auto",
    pretrained: Optional[str] = None,
    backbone: Optional[Backbone] = None,
    tokenizer: Optional[str] = None,
    strict: bool = False,
) -> Classifier:
    """Restore a saved run, checking every file first (:func:`coopkit.runs.read_run`).

    ``config.json`` and the tensors file must match the checksum recorded at save time (runs
    saved by coopkit 0.1 record only the context file's: they load with a warning, or are refused
    with ``strict=True``), and every field must make sense:
    class names a list of distinct non-blank strings, a registered method, tensors of the shapes
    the method's settings and the class count give, finite.

    Args:
        path: Folder written by :meth:`Classifier.save`.
        device: Where to load the backbone.
        pretrained: Override the recorded checkpoint path (e.g. the run moved machines).
        backbone: Reuse an already loaded backbone (must be the one the run was trained with).
        tokenizer: Override the recorded local tokenizer path (e.g. the run moved machines).
        strict: Refuse a run without the whole-run checksum (``run_sha256``: runs saved by coopkit
            0.1, or edited), which otherwise loads with a warning naming what cannot be verified.

    Raises:
        FileNotFoundError: the folder or its files are missing.
        ValueError: a corrupt or edited run (one line naming the file and the problem), or a
            backbone whose weights differ from the recorded ones.
    """
    config, model = read_run(path, device=device, pretrained=pretrained, backbone=backbone, tokenizer=tokenizer,
                             strict=strict)
    return Classifier(model.backbone, config, model)
