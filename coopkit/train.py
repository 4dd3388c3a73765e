"""fit(): the one CoOp training loop, on cached frozen image features.

Recipe (the official CoOp defaults): SGD with momentum 0.9 and weight decay 5e-4, lr 0.002,
one warm-up epoch at a constant 1e-5, then a cosine schedule over the epochs; batch 32;
epochs by shots (50 / 100 / 200). Only the context vectors receive gradients.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .backbone import Backbone, load_backbone
from .classifier import Classifier, template_features
from .config import BackboneConfig, PromptConfig, RunConfig, TrainConfig, TrainingData, apply_overrides, default_of
from .data import Dataset, few_shot, load_dataset
from .features import autocast_for, effective_precision, encode_images, torch_threads
from .prompts import PromptLearner
from .runtime.contract import check_classnames
from .runtime.progress import progress_bar
from .runtime.session import check_threads

logger = logging.getLogger(__name__)

DataSource = Union[str, os.PathLike, Dataset]


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """Learning rate of an epoch: constant warm-up, then cosine from ``lr`` towards 0."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr
    span = max(1, cfg.resolved_epochs - cfg.warmup_epochs)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))


def kg_penalty(text: torch.Tensor, hand: torch.Tensor) -> torch.Tensor:
    """KgCoOp's term: mean over classes of ``1 - cos(learned feature, hand-written-prompt feature)``.

    Both inputs are L2-normalised ``(n_classes, embed_dim)``.
    """
    return (1 - (text * hand).sum(-1)).mean()


def training_data(data: DataSource, image_root: Optional[Union[str, os.PathLike]]) -> Optional[TrainingData]:
    """What a run records about its training images: absolute paths of a file or folder source
    (``None`` for a Dataset object, which may not be readable again)."""
    if isinstance(data, Dataset):
        return None
    root = str(Path(image_root).expanduser().resolve()) if image_root is not None else None
    return TrainingData(str(Path(data).expanduser().resolve()), root)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fit(
    data: DataSource,
    *,
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
    """Fit CoOp context vectors on a few labelled images per class.

    Settings come as config objects; any of their fields can also be given as a keyword, which
    overrides the object's value (``fit(data, shots=4)`` is ``fit(data, train=TrainConfig(shots=4))``)::

        fit("data/train", prompt=PromptConfig(n_ctx=4, csc=True), train=TrainConfig(shots=8, lr=0.01))
        fit("data/train", model="ViT-B-32", pretrained="openai", shots=16, class_token_position="middle")

    Args:
        data: ImageFolder directory, CSV of ``path,label``, CoOp split JSON, or a Dataset.
        prompt: The prompt (:class:`~coopkit.config.PromptConfig`: ``n_ctx``, ``csc``,
            ``class_token_position``, ``ctx_init``).
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
        val: Optional labelled set evaluated after training (``metrics["val_accuracy"]``).
        image_root: Folder for relative paths in CSV / split files.
        classnames: Train on these classes only, in this order (default: all, sorted).
        progress: Show progress bars.
        callback: Called after each epoch with ``(epoch, {"loss", "accuracy", "lr"})``.
        **overrides: Fields of ``prompt`` or ``train`` to replace.

    Returns:
        A fitted :class:`Classifier` whose ``config.metrics`` holds the training history.

    Raises:
        ValueError / FileNotFoundError: bad settings or data (fewer than two classes, duplicate or
            blank ``classnames``), before any model is loaded.
        DivergedError: the loss or the context became NaN or infinite (a ValueError; the message names the
            epoch, the learning rate and the precision the run trains in).
    """
    for name, cfg, cls in (("prompt", prompt, PromptConfig), ("train", train, TrainConfig)):
        if cfg is not None and not isinstance(cfg, cls):
            raise ValueError(f"{name} must be a {cls.__name__}, got {type(cfg).__name__}")
    configs = apply_overrides({"prompt": prompt or PromptConfig(), "train": train or TrainConfig()}, overrides)
    prompt_cfg: PromptConfig = configs["prompt"]
    train_cfg: TrainConfig = configs["train"]
    if backbone is None:
        BackboneConfig(model=model, pretrained=pretrained, device=device, threads=threads, tokenizer=tokenizer,
                       text_model=text_model)  # checked before any data is read
    else:
        check_threads(threads)
    if classnames is not None:
        classnames = check_classnames(classnames, "classnames=")
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
        return _fit(bb, dataset, val_data, prompt_cfg, train_cfg, data, image_root, progress, callback)


def _fit(
    bb: Backbone,
    dataset: Dataset,
    val_data: Optional[Dataset],
    prompt_cfg: PromptConfig,
    train_cfg: TrainConfig,
    data: DataSource,
    image_root: Optional[Union[str, os.PathLike]],
    progress: bool,
    callback: Optional[Callable[[int, dict[str, float]], None]],
) -> Classifier:
    started = time.perf_counter()

    seed_everything(train_cfg.seed)
    sample = few_shot(dataset, train_cfg.shots, train_cfg.seed)
    feats, kept = encode_images(
        bb, sample.paths, transform=bb.train_preprocess if train_cfg.augment else bb.preprocess,
        views=train_cfg.n_views, strict=train_cfg.strict, progress=progress, desc="encoding training views",
        precision=train_cfg.precision,
    )  # (views, n, D)
    labels = torch.tensor([sample.labels[i] for i in kept])
    missing = sorted(set(range(len(sample.classnames))) - set(labels.tolist()))
    if missing:
        raise ValueError(f"no readable training images for classes {[sample.classnames[i] for i in missing]}")

    learner = PromptLearner(bb, sample.classnames, prompt_cfg, text_chunk_size=train_cfg.text_chunk_size)
    learner = learner.to(bb.device)
    hand = None
    if train_cfg.kg_weight > 0:
        hand = template_features(bb, sample.classnames, [train_cfg.kg_template]).to(bb.device)
    history = _train_loop(learner, bb, feats, labels, train_cfg, hand, progress, callback)

    learner.requires_grad_(False)
    config = RunConfig(method="coop", classnames=sample.classnames, prompt=learner.config, train=train_cfg,
                       coopkit_version=__version__, data=training_data(data, image_root), **bb.run_fields())
    clf = Classifier(bb, config, learner)
    metrics: dict[str, Any] = {
        "train_loss": history["loss"][-1],
        "train_accuracy": history["accuracy"][-1],
        "epochs": train_cfg.resolved_epochs,
        "train_images": int(len(labels)),
        "seconds": round(time.perf_counter() - started, 2),
        "history": history,
    }
    if val_data is not None:
        metrics["val_accuracy"] = clf.evaluate(val_data, progress=progress)["accuracy"]
    config.metrics = metrics
    logger.info("fitted %d classes in %.1fs: train accuracy %.3f", len(sample.classnames), metrics["seconds"],
                metrics["train_accuracy"])
    return clf


class DivergedError(ValueError):
    """Training diverged (a non-finite loss or context) with the settings given: bad input, exit code 2."""


def _divergence_hint(lr: float, precision: str, device: torch.device) -> str:
    """What to change, naming what is true of this run: its learning rate and the precision it trains in."""
    used = effective_precision(device, precision)
    if used == "fp32":
        return f"lower lr (now {lr:g}; this run already trains in fp32)"
    return f"lower lr (now {lr:g}) or use precision='fp32' (this run trains in {used})"


def _train_loop(
    learner: PromptLearner,
    bb: Backbone,
    feats: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    hand: Optional[torch.Tensor],
    progress: bool,
    callback: Optional[Callable[[int, dict[str, float]], None]],
) -> dict[str, list[float]]:
    device = bb.device
    views, n, _ = feats.shape
    scale = bb.model.logit_scale.exp().float().to(device)
    bias = bb.logit_bias  # scored as Classifier.head() scores: + the logit bias where the model has one
    optimizer = torch.optim.SGD([learner.ctx], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "lr": []}
    epochs = cfg.resolved_epochs
    bar = progress_bar(range(epochs), desc="training", unit="epoch", enabled=progress)
    for epoch in bar:
        lr = lr_at(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        order = torch.randperm(n, generator=gen)
        view = torch.randint(views, (n,), generator=gen)
        total, correct = 0.0, 0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x = feats[view[idx], idx].to(device)  # (b, D)
            y = labels[idx].to(device)
            with autocast_for(device, cfg.precision):
                text = learner.text_features()  # (n_cls, D)
                logits = scale * x @ text.float().T  # (b, n_cls)
                if bias is not None:
                    logits = logits + bias
                loss = F.cross_entropy(logits.float(), y)
                if hand is not None:
                    loss = loss + cfg.kg_weight * kg_penalty(text.float(), hand)
            if not torch.isfinite(loss):
                raise DivergedError(f"training loss became {loss.item()} at epoch {epoch + 1}/{epochs}; "
                                    + _divergence_hint(lr, cfg.precision, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        if not bool(torch.isfinite(learner.ctx).all()):
            raise DivergedError(f"the context vectors became NaN or infinite at epoch {epoch + 1}/{epochs}; "
                                + _divergence_hint(lr, cfg.precision, device))
        stats = {"loss": total / n, "accuracy": correct / n, "lr": lr}
        for k, v in stats.items():
            history[k].append(round(float(v), 6))
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}")
        if callback is not None:
            callback(epoch, stats)
    bar.close()
    return history
