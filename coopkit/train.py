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
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__
from .backbone import EMBEDDED_MODEL, EMBEDDED_PRETRAINED, Backbone, load_backbone
from .classifier import DEFAULT_TEMPLATES, Classifier, template_features
from .config import PromptConfig, RunConfig, TrainConfig
from .data import Dataset, few_shot, load_dataset
from .features import autocast_for, encode_images
from .prompts import PromptLearner

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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def fit(
    train: DataSource,
    *,
    model: str = EMBEDDED_MODEL,
    pretrained: Optional[str] = EMBEDDED_PRETRAINED,
    shots: int = 16,
    seed: int = 1,
    n_ctx: int = 16,
    csc: bool = False,
    class_token_position: str = "end",
    ctx_init: Optional[str] = None,
    epochs: Optional[int] = None,
    batch_size: int = 32,
    lr: float = 0.002,
    device: str = "auto",
    val: Optional[DataSource] = None,
    n_views: int = 10,
    image_root: Optional[Union[str, os.PathLike]] = None,
    classnames: Optional[Sequence[str]] = None,
    strict: bool = False,
    precision: str = "auto",
    text_chunk_size: int = 256,
    kg_weight: float = 0.0,
    augment: bool = True,
    backbone: Optional[Backbone] = None,
    progress: bool = True,
    callback: Optional[Callable[[int, dict[str, float]], None]] = None,
) -> Classifier:
    """Fit CoOp context vectors on a few labelled images per class.

    Args:
        train: ImageFolder directory, CSV of ``path,label``, CoOp split JSON, or a Dataset.
        model: open_clip model name, model-config JSON path, or ``coopkit-tiny`` (shipped).
        pretrained: open_clip tag, checkpoint path, ``synthetic`` (shipped weights) or ``None``.
        shots: Training images per class, sampled with ``seed``.
        seed: Seeds sampling, initialisation, augmentation and batching.
        n_ctx: Context vectors M (ignored with ``ctx_init``).
        csc: Class-specific context.
        class_token_position: ``end``, ``middle`` or ``front``.
        ctx_init: Initialisation words (e.g. ``"a photo of a"``) or ``None`` for random.
        epochs: ``None`` for the paper's schedule by shots.
        batch_size: Images per step.
        lr: Peak learning rate.
        device: ``auto``, ``cpu`` or ``cuda``.
        val: Optional labelled set evaluated after training (``metrics["val_accuracy"]``).
        n_views: Augmented views cached per training image (see :class:`TrainConfig`).
        image_root: Folder for relative paths in CSV / split files.
        classnames: Train on these classes only, in this order (default: all, sorted).
        strict: Fail on unreadable images instead of skipping them.
        precision: ``auto`` (fp32 on CPU, bf16/fp16 autocast on CUDA), ``fp32``, ``bf16``, ``fp16``.
        text_chunk_size: Classes per text-tower pass (bounds memory for large label sets).
        kg_weight: KgCoOp weight: adds ``kg_weight * (1 - cos)`` between each class's learned
            text feature and its hand-written-prompt feature (0 = plain CoOp).
        augment: Encode training views with CoOp's augmentation (random resized crop, scale
            0.08-1, and flip); ``False`` uses the evaluation transform (whole images).
        backbone: An already loaded backbone (then ``model``/``pretrained``/``device`` are unused).
        progress: Show progress bars.
        callback: Called after each epoch with ``(epoch, {"loss", "accuracy", "lr"})``.

    Returns:
        A fitted :class:`Classifier` whose ``config.metrics`` holds the training history.

    Raises:
        ValueError / FileNotFoundError: bad settings or data, before any model is loaded.
        RuntimeError: the loss became NaN or infinite (the message names the epoch).
    """
    prompt_cfg = PromptConfig(n_ctx=n_ctx, csc=csc, class_token_position=class_token_position, ctx_init=ctx_init)
    train_cfg = TrainConfig(
        shots=shots, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, n_views=n_views,
        text_chunk_size=text_chunk_size, precision=precision, strict=strict, kg_weight=kg_weight,
        augment=augment,
    )
    data = load_dataset(train, split="train", image_root=image_root)
    if classnames is not None:
        data = data.subset(classnames)
    val_data = load_dataset(val, split="val", image_root=image_root) if val is not None else None
    bb = backbone or load_backbone(model, pretrained, device)
    started = time.perf_counter()

    seed_everything(seed)
    sample = few_shot(data, shots, seed)
    feats, kept = encode_images(
        bb, sample.paths, transform=bb.train_preprocess if augment else bb.preprocess, views=n_views, strict=strict,
        progress=progress, desc="encoding training views", precision=precision,
    )  # (views, n, D)
    labels = torch.tensor([sample.labels[i] for i in kept])
    missing = sorted(set(range(len(sample.classnames))) - set(labels.tolist()))
    if missing:
        raise ValueError(f"no readable training images for classes {[sample.classnames[i] for i in missing]}")

    learner = PromptLearner(
        bb, sample.classnames, prompt_cfg.n_ctx, prompt_cfg.csc, prompt_cfg.class_token_position,
        prompt_cfg.ctx_init, text_chunk_size=text_chunk_size,
    ).to(bb.device)
    hand = template_features(bb, sample.classnames, DEFAULT_TEMPLATES).to(bb.device) if kg_weight > 0 else None
    history = _train_loop(learner, bb, feats, labels, train_cfg, hand, progress, callback)

    learner.requires_grad_(False)
    config = RunConfig(
        method="coop",
        classnames=sample.classnames,
        model=bb.name,
        pretrained=bb.pretrained,
        model_config=bb.model_config,
        backbone_sha256=bb.weights_sha256,
        prompt=PromptConfig(learner.n_ctx, prompt_cfg.csc, prompt_cfg.class_token_position, prompt_cfg.ctx_init),
        train=train_cfg,
        coopkit_version=__version__,
    )
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
    from tqdm.auto import tqdm

    device = bb.device
    views, n, _ = feats.shape
    scale = bb.model.logit_scale.exp().float().to(device)
    optimizer = torch.optim.SGD([learner.ctx], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: dict[str, list[float]] = {"loss": [], "accuracy": [], "lr": []}
    epochs = cfg.resolved_epochs
    bar = tqdm(range(epochs), desc="training", unit="epoch", disable=not progress)
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
                loss = F.cross_entropy(logits.float(), y)
                if hand is not None:
                    loss = loss + cfg.kg_weight * kg_penalty(text.float(), hand)
            if not torch.isfinite(loss):
                raise RuntimeError(
                    f"training loss became {loss.item()} at epoch {epoch + 1}/{epochs}; lower lr (now {lr:g}) "
                    "or use precision='fp32'"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        stats = {"loss": total / n, "accuracy": correct / n, "lr": lr}
        for k, v in stats.items():
            history[k].append(round(float(v), 6))
        bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['accuracy']:.2f}")
        if callback is not None:
            callback(epoch, stats)
    bar.close()
    return history
