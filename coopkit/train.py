"""fit() and zero_shot(): a :class:`~coopkit.Classifier` from data, by any registered method.

:func:`fit` reads the method from the registry (:mod:`coopkit.methods`): its config dataclass
(whose fields are also keyword overrides), how it fits (:attr:`~coopkit.methods.Method.fit`) and
what a run records. It draws the few-shot sample (``train.shots`` per class, ``train.seed``),
hands it to the method, and wraps what comes back. :func:`zero_shot` builds the hand-written-prompt
classifier, which trains nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from . import __version__
from .backbone import Backbone, load_backbone
from .classifier import Classifier
from .config import BackboneConfig, PromptConfig, RunConfig, TrainConfig, TrainingData, apply_overrides, default_of
from .multilabel_data import MultiLabelDataset, load_multilabel
from .userdata import Dataset, few_shot, load_dataset
from .features import torch_threads
from .methods import DEFAULT_METHOD, Method, get
from .methods import zeroshot
from .methods.base import DEFAULT_TEMPLATES, Shots, check_templates_fit, lr_at, seed_everything
from .runtime.contract import check_classnames, check_templates
from .runtime.session import check_threads

logger = logging.getLogger(__name__)

DataSource = Union[str, os.PathLike, Dataset, MultiLabelDataset]

__all__ = ["fit", "fit_on_shots", "zero_shot", "training_data", "lr_at", "seed_everything", "DataSource"]


def training_data(data: DataSource, image_root: Optional[Union[str, os.PathLike]]) -> Optional[TrainingData]:
    """What a run records about its training images: absolute paths of a file or folder source
    (``None`` for a Dataset object, which may not be readable again)."""
    if isinstance(data, Dataset):
        return None
    root = str(Path(image_root).expanduser().resolve()) if image_root is not None else None
    return TrainingData(str(Path(data).expanduser().resolve()), root)


def fit(
    data: DataSource,
    *,
    method: str = DEFAULT_METHOD,
    method_config: Any = None,
    prompt: Optional[PromptConfig] = None,
    train: Optional[TrainConfig] = None,
    model: str = default_of(BackboneConfig, "model"),
    pretrained: Optional[str] = default_of(BackboneConfig, "pretrained"),
    device: str = default_of(BackboneConfig, "device"),
    threads: Optional[int] = default_of(BackboneConfig, "threads"),
    tokenizer: Optional[str] = default_of(BackboneConfig, "tokenizer"),
    text_model: Optional[str] = default_of(BackboneConfig, "text_model"),
    backbone: Optional[Backbone] = None,
    val: Optional[DataSource] = None,
    image_root: Optional[Union[str, os.PathLike]] = None,
    classnames: Optional[Sequence[str]] = None,
    progress: bool = True,
    callback: Optional[Callable[[int, dict[str, float]], None]] = None,
    **overrides: Any,
) -> Classifier:
    """Fit a method (CoOp unless told otherwise) on a few labelled images per class.

    Settings come as config objects; any of their fields can also be given as a keyword, which
    overrides the object's value (``fit(data, shots=4)`` is ``fit(data, train=TrainConfig(shots=4))``)::

        fit("data/train", prompt=PromptConfig(n_ctx=4, csc=True), train=TrainConfig(shots=8, lr=0.01))
        fit("data/train", model="ViT-B-32", pretrained="openai", shots=16, class_token_position="middle")

    A field both the method's config and :class:`~coopkit.config.TrainConfig` have (e.g. a
    baseline's ``epochs``) goes to the method's config.

    Args:
        data: ImageFolder directory, CSV of ``path,label``, CoOp split JSON, or a Dataset. For a
            multi-label method (``method="dualcoop"``): a multi-label CSV or JSON, or a
            :class:`~coopkit.multilabel_data.MultiLabelDataset` (:func:`~coopkit.multilabel_data.load_multilabel`
            reads the COCO and VOC layouts and other separators); every image is used (no few-shot draw).
        method: A registered method that trains (:func:`coopkit.methods.names`).
        method_config: The method's settings (an instance of its config dataclass,
            :attr:`coopkit.methods.Method.config`).
        prompt: CoOp's settings (:class:`~coopkit.config.PromptConfig`: ``n_ctx``, ``csc``,
            ``class_token_position``, ``ctx_init``): ``method_config`` under its usual name.
        train: The recipe (:class:`~coopkit.config.TrainConfig`: ``shots``, ``seed``,
            ``epochs``, ``batch_size``, ``lr``, ``momentum``, ``weight_decay``, ``warmup_epochs``,
            ``warmup_lr``, ``n_views``, ``augment``, ``text_chunk_size``, ``precision``,
            ``strict``, ``kg_weight``).
        model: open_clip model name, model-config JSON path, or ``coopkit-tiny`` (shipped).
        pretrained: open_clip tag, checkpoint path, ``None`` for random init, or ``"default"``
            (the shipped weights of ``coopkit-tiny``; other models must name theirs).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        threads: CPU threads for torch while fitting (``None``: one per CPU that other
            processes leave idle when training starts; torch's own count is restored after).
        tokenizer: A local tokenizer (folder with ``tokenizer.json``, the file, or a CLIP BPE
            ``.txt.gz``): no hub access for it (see :func:`coopkit.load_backbone`).
        text_model: Hugging Face text towers: a local folder with the text model's ``config.json``.
        backbone: An already loaded backbone (then ``model``/``pretrained``/``device``/``tokenizer``/
            ``text_model`` are unused).
        val: Optional labelled set evaluated after training (``metrics["val_accuracy"]``; the
            methods that search settings on a validation set search on it).
        image_root: Folder for relative paths in CSV / split files.
        classnames: Train on these classes only, in this order (default: all, sorted).
        progress: Show progress bars.
        callback: Called after each epoch with ``(epoch, {"loss", "accuracy", "lr"})`` (CoOp).
        **overrides: Fields of the method's config or of ``train`` to replace.

    Returns:
        A fitted :class:`Classifier` whose ``config.metrics`` holds the training history.

    Raises:
        ValueError / FileNotFoundError: bad settings or data (an unknown method, fewer than two
            classes, duplicate or blank ``classnames``), before any model is loaded.
        DivergedError: the loss or the context became NaN or infinite (a ValueError, exit code 2; the
            message names the epoch, the learning rate and the precision the run trains in).
    """
    spec = get(method)
    if spec.fit is None:
        raise ValueError(f"method {method!r} trains nothing; use coopkit.zero_shot (methods that train: "
                         f"{', '.join(m for m in _trainable())})")
    method_cfg = _method_config(spec, method_config, prompt)
    configs = apply_overrides({**({"method": method_cfg} if method_cfg is not None else {}),
                               "train": train or TrainConfig()}, overrides)
    method_cfg, train_cfg = configs.get("method"), configs["train"]
    if backbone is None:
        BackboneConfig(model=model, pretrained=pretrained, device=device, threads=threads, tokenizer=tokenizer,
                       text_model=text_model)  # checked before any data is read
    else:
        check_threads(threads)
    if classnames is not None:
        classnames = check_classnames(classnames, "classnames=")
    if spec.task == "multilabel":  # several labels per image: every image, no few-shot draw
        ml_data = load_multilabel(data, image_root=image_root, classnames=classnames)
        ml_val = load_multilabel(val, image_root=image_root, classnames=ml_data.classnames) if val is not None else None
        bb = backbone or load_backbone(model, pretrained, device, tokenizer, text_model)
        with torch_threads(threads):
            return fit_on_shots(bb, Shots(ml_data, val=ml_val), method=spec.name, method_config=method_cfg,
                                train=train_cfg, progress=progress, callback=callback,
                                data=None if isinstance(data, MultiLabelDataset) else training_data(data, image_root))
    dataset = load_dataset(data, split="train", image_root=image_root)
    if classnames is not None:
        dataset = dataset.subset(classnames)
    if len(dataset.classnames) < 2:
        raise ValueError(
            f"{dataset.source}: {len(dataset.classnames)} class {dataset.classnames}; CoOp learns to tell classes "
            "apart and needs at least two (with one, the loss is 0 and nothing is learned)"
        )
    val_data = load_dataset(val, split="val", image_root=image_root) if val is not None else None
    bb = backbone or load_backbone(model, pretrained, device, tokenizer, text_model)
    with torch_threads(threads):
        return _fit(spec, bb, dataset, val_data, method_cfg, train_cfg, data, image_root, progress, callback)



def _trainable() -> list[str]:
    from .methods import names

    return [m for m in names() if get(m).fit is not None]


def _method_config(spec: Method, method_config: Any, prompt: Optional[PromptConfig]) -> Any:
    """The method's config object from ``method_config`` or (CoOp's name for it) ``prompt``."""
    if prompt is not None and method_config is not None:
        raise ValueError("give the method's settings once: method_config or prompt, not both")
    name, cfg = ("prompt", prompt) if prompt is not None else ("method_config", method_config)
    if spec.config is None:
        if cfg is not None:
            raise ValueError(f"method {spec.name!r} has no settings of its own; got {name}={cfg!r:.80}")
        return None
    if cfg is not None and not isinstance(cfg, spec.config):
        raise ValueError(f"{name} must be a {spec.config.__name__}, got {type(cfg).__name__}")
    return cfg if cfg is not None else spec.make_config()


def _fit(
    spec: Method,
    bb: Backbone,
    dataset: Dataset,
    val_data: Optional[Dataset],
    method_cfg: Any,
    train_cfg: TrainConfig,
    data: DataSource,
    image_root: Optional[Union[str, os.PathLike]],
    progress: bool,
    callback: Optional[Callable[[int, dict[str, float]], None]],
) -> Classifier:
    sample = few_shot(dataset, train_cfg.shots, train_cfg.seed)
    clf = fit_on_shots(bb, Shots(sample, val=val_data), method=spec.name, method_config=method_cfg, train=train_cfg,
                       progress=progress, callback=callback, data=training_data(data, image_root))
    logger.info("fitted %s on %d classes: %s", spec.name, len(sample.classnames),
                {k: clf.config.metrics[k] for k in ("train_accuracy", "val_accuracy", "seconds")
                 if k in clf.config.metrics})
    return clf


def fit_on_shots(
    backbone: Backbone,
    shots: Shots,
    *,
    method: str = DEFAULT_METHOD,
    method_config: Any = None,
    train: Optional[TrainConfig] = None,
    progress: bool = False,
    callback: Optional[Callable[[int, dict[str, float]], None]] = None,
    data: Optional[TrainingData] = None,
) -> Classifier:
    """Fit a registered method on shots already drawn (and, shared between methods, already encoded):
    what :func:`fit` does once it has read the data and loaded the backbone.

    Args:
        backbone: The frozen backbone.
        shots: The sampled training images, the validation set and templates (:class:`~coopkit.methods.base.Shots`).
        method: A registered method that trains.
        method_config: Its settings (default: its config's defaults).
        train: The training settings recorded with the run (and used by the method).
        progress: Show progress bars.
        callback: Called after each epoch (CoOp).
        data: Where the training images came from (recorded in the run).
    """
    spec = get(method)
    if spec.fit is None:
        raise ValueError(f"method {method!r} trains nothing; use coopkit.zero_shot")
    method_cfg = _method_config(spec, method_config, None)
    train_cfg = train or TrainConfig()
    if spec.check_backbone is not None:
        spec.check_backbone(backbone, method_cfg)
    model, metrics = spec.fit(backbone, shots, method_cfg, train_cfg, progress=progress, callback=callback)
    fields = dict(model.run_fields())
    if method_cfg is not None:
        fields.setdefault(spec.config_field, method_cfg)
    config = RunConfig(method=spec.name, classnames=shots.classnames, train=train_cfg, coopkit_version=__version__,
                       data=data, task=spec.task, **fields, **backbone.run_fields())
    clf = Classifier(backbone, config, model)
    if shots.val is not None and spec.task == "classify" and "val_accuracy" not in metrics:
        metrics["val_accuracy"] = clf.evaluate(shots.val, progress=progress)["accuracy"]
    config.metrics = metrics
    return clf


def zero_shot(
    backbone: Backbone,
    classnames: Sequence[str],
    templates: Union[str, Sequence[str]] = DEFAULT_TEMPLATES,
    *,
    threads: Optional[int] = None,
) -> Classifier:
    """The hand-written-prompt baseline: one template, or an ensemble of them.

    The class weights are computed here (the text tower over every class and template).

    Args:
        backbone: From :func:`coopkit.load_backbone`.
        classnames: Labels, in output order.
        templates: Strings with one ``{}`` for the class name; several are averaged (CLIP's ensembling).
        threads: CPU threads for torch meanwhile (``None``: one per CPU that other processes
            leave idle; torch's own count is restored after).
    """
    names = check_classnames(classnames)
    templates = check_templates(templates)
    check_templates_fit(backbone, names, templates)
    if len(names) == 1:
        logger.warning("zero-shot classifier over one class %r: its probability is always 1; use its logit "
                       "(a scaled cosine similarity) as a score", names[0])
    model = zeroshot.ZeroShotModel(backbone, names, templates)
    config = RunConfig(method=zeroshot.NAME, classnames=names, coopkit_version=__version__, **model.run_fields(),
                       **backbone.run_fields())
    clf = Classifier(backbone, config, model)
    with torch_threads(threads):
        clf.class_weights()
    return clf
