"""The CoOp paper's experiments on any data, and on the official datasets with the papers' protocols.

Few-shot curves (CoOp's Figure 3, with the few-shot baselines beside CoOp), domain shift (its
Table 1) and base-to-new generalisation (CoCoOp's Table 1, with KgCoOp). Each returns result
rows (dicts: top-1 ``accuracy``, ``top5`` and ``macro`` = mean per-class accuracy) and can write
``results.csv``, ``summary.md`` and a plot. Test images are encoded once per experiment; every
classifier is then scored on the cached features, so a grid of methods x shots x seeds costs
one training run per cell. A test set is scored among its own classes (ImageNet-A and -R on
their 200; a base or new half on its half), as the official code builds its classifier from
the test set's class names.

The ``official_*`` functions run the protocols on a dataset read by :mod:`coopkit.official_datasets`
(:mod:`coopkit.research.protocols` holds the settings and the published numbers).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from ..runtime.atomic import atomic_path, atomic_write
from ..backbone import Backbone, load_backbone
from ..classifier import Classifier
from ..config import BackboneConfig, TrainConfig, default_of
from ..methods.clap import ClapConfig
from ..methods.tip_adapter import TipAdapterConfig
from ..userdata import Dataset, few_shot, load_dataset, subsample_classes
from ..features import encode_images
from ..methods import Method, bench_row, coop, for_protocol, get, method_names
from ..methods.base import DEFAULT_TEMPLATES, Shots
from ..train import fit, fit_on_shots, zero_shot
from .protocols import DEFAULT_METHODS, KGCOOP, METHODS

logger = logging.getLogger(__name__)

#: What every row reports: top-1 accuracy, top-5 accuracy and the mean of the per-class accuracies.
SCORES = ("accuracy", "top5", "macro")
Source = Union[str, os.PathLike, Dataset]
#: ``(shots, seed) -> (few-shot training set, few-shot validation set or None)``.
Sampler = Callable[[int, int], "tuple[Dataset, Optional[Dataset]]"]


def ensemble_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates (from open_clip), as ``{}`` strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") if callable(t) else str(t) for t in OPENAI_IMAGENET_TEMPLATES]


class _Scorer:
    """A labelled set encoded once by the frozen image encoder, scored against any classifier among the
    set's own classes (encoded again for a classifier whose method changes the image encoder)."""

    def __init__(self, backbone: Backbone, data: Dataset, progress: bool, desc: str) -> None:
        feats, kept = encode_images(backbone, data.paths, progress=progress, desc=desc)
        self.backbone = backbone
        self.paths = [data.paths[i] for i in kept]
        self.feats = feats[0]
        self.labels = torch.tensor([data.labels[i] for i in kept])
        self.classnames = list(data.classnames)

    def features(self, clf: Classifier) -> torch.Tensor:
        """The set's L2-normalised features as ``clf`` sees them ``(n, D)``."""
        if clf.model.frozen_encoder:
            return self.feats
        return encode_images(self.backbone, self.paths, strict=True, encoder=clf.image_encoder())[0][0]

    def scores(self, clf: Classifier) -> dict[str, float]:
        """``accuracy`` (top-1), ``top5`` and ``macro`` (mean per-class accuracy), the classifier's
        logits restricted to this set's classes."""
        index = {c: i for i, c in enumerate(clf.classnames)}
        missing = [c for c in self.classnames if c not in index]
        if missing:
            raise ValueError(f"classes {missing[:5]} of the test set are not among the classifier's classes")
        with torch.no_grad():
            logits = clf.head()(self.features(clf))[:, [index[c] for c in self.classnames]]  # (n, test classes)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (n, k)
        hit1 = top[:, 0] == self.labels
        hit5 = (top == self.labels.unsqueeze(1)).any(1)
        per_class = [float(hit1[self.labels == c].float().mean()) for c in sorted(set(self.labels.tolist()))]
        return {"accuracy": round(float(hit1.float().mean()), 6), "top5": round(float(hit5.float().mean()), 6),
                "macro": round(statistics.mean(per_class), 6)}

    def accuracy(self, clf: Classifier) -> float:
        return self.scores(clf)["accuracy"]


def check_methods(methods: Sequence[str]) -> list[str]:
    """The few-shot methods, each a row of the registry's ``fewshot`` protocol (:data:`METHODS` when
    only the built-in methods are registered)."""
    valid = for_protocol("fewshot")
    bad = [m for m in methods if m not in valid]
    if bad:
        raise ValueError(f"unknown methods {bad}; valid: {', '.join(valid)}")
    return list(methods)


def check_settings(settings: Optional[dict[str, dict[str, Any]]], rows: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per-row settings of ``coopkit bench`` (a row's name -> fields of its method's config), checked: each
    row among ``rows``, each field one of its method's config, the config valid with them (one-line
    ValueErrors naming the row, the field and the valid choices)."""
    out: dict[str, dict[str, Any]] = {}
    for row, fields in (settings or {}).items():
        if row not in rows:
            raise ValueError(f"settings for {row!r}, which is not among the rows run: {', '.join(rows)}")
        spec, over = bench_row(row)
        valid = _fields(spec.config)
        bad = sorted(set(fields) - valid)
        if bad:
            raise ValueError(f"{row}: unknown settings {bad}; {spec.name}'s settings: {', '.join(sorted(valid)) or 'none'}")
        try:
            dataclasses.replace(spec.make_config(), **{**over, **fields})  # its own checks, now
        except (TypeError, ValueError) as e:
            raise ValueError(f"{row}: {e}") from None
        out[row] = dict(fields)
    return out


def _fields(config: Any) -> set[str]:
    return {f.name for f in dataclasses.fields(config)} if dataclasses.is_dataclass(config) else set()


def protocol_methods(protocol: str, methods: Optional[Sequence[str]] = None) -> list[Method]:
    """The registered methods a protocol runs: ``methods`` (each must take part in ``protocol``), or by
    default those the registry runs by default there (each method's ``bench_default``), in registration order."""
    valid = method_names(protocol)
    if methods is None:
        return [get(m) for m in method_names(protocol, default=True)]
    bad = [m for m in methods if m not in valid]
    if bad or not methods:
        raise ValueError(f"methods {list(bad) or list(methods)} do not run in the {protocol} protocol; those that do: "
                         f"{', '.join(valid)}")
    return [get(m) for m in valid if m in methods]


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """A non-empty list of integer seeds (an empty one would leave only the zero-shot rows)."""
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds}")
    return seeds


def fewshot_curves(
    train: Source,
    test: Source,
    *,
    model: str = default_of(BackboneConfig, "model"),
    pretrained: Optional[str] = default_of(BackboneConfig, "pretrained"),
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (1, 2, 3),
    methods: Sequence[str] = DEFAULT_METHODS,
    n_ctx: Sequence[int] = (16,),
    positions: Sequence[str] = ("end",),
    epochs: Union[None, int, Callable[[int], int]] = None,
    n_views: int = 10,
    device: str = "auto",
    backbone: Optional[Backbone] = None,
    progress: bool = True,
    val: Optional[Source] = None,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    sampler: Optional[Sampler] = None,
    tip: Optional[TipAdapterConfig] = None,
    clap_config: Optional[ClapConfig] = None,
    configs: Sequence[Any] = (),
    settings: Optional[dict[str, dict[str, Any]]] = None,
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """Accuracy against shots for each method and prompt setting, over seeds (the paper's Figure 3).

    Args:
        train, test: The training images (sampled per shots and seed) and the test set.
        methods: Any of :data:`METHODS` (the methods registered for the ``fewshot`` protocol and their
            variants: zero-shot (``templates``) and its 80-template ensemble, CLIP's linear probe, CLAP,
            Tip-Adapter, Tip-Adapter-F, CoOp with unified and class-specific context, ...). Rows
            run in the registry's order.
        epochs: The prompt learners' epochs: a number, a function of the shots, or ``None`` (50/100/200).
        n_views: Augmented views encoded per training image (CoOp, CLAP, Tip-Adapter).
        val: A validation set on which Tip-Adapter searches alpha and beta (its own protocol
            uses the full validation split); without one they stay at ``tip``'s values.
        templates: The hand-written prompt(s) of zero-shot and of the baselines' text side.
        sampler: Draws the training (and validation) shots: ``(shots, seed) -> (train, val)``;
            default :func:`coopkit.userdata.few_shot` of ``train``.
        tip, clap_config: Tip-Adapter's and CLAP's settings.
        configs: Settings of other methods: each config object applies to the methods whose config
            dataclass it is an instance of.
        settings: A row's name -> fields of its method's config to replace in that row alone (e.g.
            ``{"ivlp": {"prompt_depth_vision": 0, "n_ctx_vision": 0}}``: IVLP's text prompts only);
            they win over ``configs``, ``fit_kwargs`` and the row's variant.
        **fit_kwargs: Passed to :func:`coopkit.fit` for the prompt learners (methods registered with
            ``prompt_grid``, CoOp and CoCoOp, fitted over the ``n_ctx`` x ``positions`` grid); the others
            (MaPLe and the deep-prompt methods included) fit once with their own settings and take only
            ``augment`` from it.

    Returns rows with ``method, setting, shots, seed`` and :data:`SCORES` (zero-shot rows have shots 0).
    """
    methods = check_methods(methods)
    seeds = check_seeds(seeds)
    settings = check_settings(settings, methods)
    if not shots or min(shots) < 1:
        raise ValueError(f"shots must be integers >= 1, got {list(shots)}")
    bb = backbone or load_backbone(model, pretrained, device)
    train_data = load_dataset(train)
    scorer = _Scorer(bb, load_dataset(test), progress, "encoding test set")
    names = train_data.classnames
    draw: Sampler = sampler or (lambda k, seed: (few_shot(train_data, k, seed), None))
    chosen = [bench_row(r) + (r,) for r in for_protocol("fewshot") if r in methods]  # (spec, overrides, row), registry order
    tip_val = None  # the validation set the baselines search their settings on
    if val is not None and any(spec.fit is not None for spec, _, _ in chosen):
        vs = _Scorer(bb, load_dataset(val).relabel(names), progress, "encoding validation set")
        tip_val = (vs.feats, vs.labels)
    rows: list[dict[str, Any]] = []
    given = [c for c in (tip, clap_config, *configs) if c is not None]

    def add(method: str, setting: str, k: int, seed: int, clf: Classifier) -> None:
        res = scorer.scores(clf)
        rows.append({"method": method, "setting": setting, "shots": k, "seed": seed, **res})
        logger.info("%s %s shots=%d seed=%d: %.4f", method, setting, k, seed, res["accuracy"])

    for spec, over, row in chosen:
        if spec.fit is None:  # nothing to train: one row at 0 shots
            ensemble = over.get("templates") == "ensemble"
            tpl = ensemble_templates() if ensemble else list(over.get("templates", templates))
            add(row, f"{len(tpl)} templates" if ensemble else " | ".join(tpl), 0, 0, zero_shot(bb, names, tpl))
    aug = fit_kwargs.get("augment", True)
    for k in shots:
        for seed in seeds:
            sample, _ = draw(k, seed)
            shared = Shots(sample, templates=templates, val_features=tip_val)  # encoded once for the baselines
            n_epochs = epochs(k) if callable(epochs) else epochs
            for spec, over, row in chosen:
                if spec.fit is None:
                    continue
                defaults = spec.make_config()
                if spec.prompt_grid:  # CoOp's prompt learners: the n_ctx x positions grid, through fit()
                    grid = [(m, pos) for m in n_ctx for pos in
                            (positions if "class_token_position" in _fields(defaults) else (None,))]
                    done: set[Optional[str]] = set()  # positions fitted with init words: the grid's n_ctx is moot
                    for m, pos in grid:
                        if pos in done:
                            continue
                        where = {"class_token_position": pos} if pos is not None else {}
                        # fit() draws the same shots from train_data itself (a drawn set it would reorder)
                        clf = fit(sample if sampler else train_data, backbone=bb, method=spec.name, shots=k,
                                  seed=seed, n_ctx=m, **where, epochs=n_epochs, n_views=n_views, progress=progress,
                                  **{**fit_kwargs, **over, **settings.get(row, {})})
                        add(row, _prompt_setting(clf, pos), k, seed, clf)
                        if clf.learner is not None and clf.learner.config.ctx_init is not None:
                            done.add(pos)
                    continue
                cfg = next((c for c in given if spec.config is not None and isinstance(c, spec.config)), defaults)
                if over or row in settings:
                    cfg = dataclasses.replace(cfg, **{**over, **settings.get(row, {})})
                clf = fit_on_shots(bb, shared, method=spec.name, method_config=cfg,
                                   train=TrainConfig(seed=seed, n_views=n_views, augment=aug))
                setting = "searched on val" if "val_accuracy" in clf.config.metrics else spec.bench_setting
                given = ", ".join(f"{f}={v}" for f, v in settings.get(row, {}).items())  # the row's own settings
                add(row, f"{setting} ({given})" if given and setting else given or setting, k, seed, clf)
    return rows


def _prompt_setting(clf: Classifier, position: Optional[str]) -> str:
    """The ``setting`` of a prompt learner's row, from what it really learned: ``n_ctx=<context vectors>``,
    the class name's position, and the init words (with ``ctx_init`` the context has as many vectors as the
    words have tokens, whatever the grid's ``n_ctx``: CoCoOp's default "a photo of a" gives 4)."""
    learner = clf.learner
    assert learner is not None, "a prompt_grid method's classifier has a prompt learner"
    setting = f"n_ctx={learner.n_ctx}" + (f",{position}" if position is not None else "")
    init = learner.config.ctx_init
    return setting + (f",init={init}" if init is not None else "")


def domain_shift(
    train: Source,
    tests: dict[str, Source],
    *,
    model: str = default_of(BackboneConfig, "model"),
    pretrained: Optional[str] = default_of(BackboneConfig, "pretrained"),
    shots: int = 16,
    seeds: Sequence[int] = (1, 2, 3),
    device: str = "auto",
    backbone: Optional[Backbone] = None,
    progress: bool = True,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    sampler: Optional[Sampler] = None,
    methods: Optional[Sequence[str]] = None,
    settings: Optional[dict[str, dict[str, Any]]] = None,
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """Fit on a source task; each method on each (shifted) test set (the paper's Table 1: zero-shot
    and CoOp, the methods registered for the ``shift`` protocol unless ``methods`` names others).

    Each test set is scored among its own classes (which must be among the training classes).
    ``fit_kwargs`` go to :func:`coopkit.fit` of every method that trains; ``settings`` maps a method to
    fields of its config for its rows alone (as :func:`fewshot_curves`'). Returns rows with
    ``method, test, seed`` and :data:`SCORES` (zero-shot rows have seed 0).
    """
    if not tests:
        raise ValueError("give at least one test set")
    seeds = check_seeds(seeds)
    chosen = protocol_methods("shift", methods)
    settings = check_settings(settings, [m.name for m in chosen])
    bb = backbone or load_backbone(model, pretrained, device)
    train_data = load_dataset(train)
    scorers = {}
    for name, src in tests.items():
        data = load_dataset(src)
        unknown = sorted(set(data.classnames) - set(train_data.classnames))
        if unknown:
            raise ValueError(f"test set {name}: classes {unknown[:5]} are not among the training classes")
        scorers[name] = _Scorer(bb, data, progress, f"encoding {name}")
    draw: Sampler = sampler or (lambda k, seed: (train_data, None))
    rows = []
    for spec in chosen:
        if spec.fit is None:
            zs = zero_shot(bb, train_data.classnames, templates)
            rows += [{"method": spec.name, "test": n, "seed": 0, **s.scores(zs)} for n, s in scorers.items()]
    for seed in seeds:
        for spec in chosen:
            if spec.fit is not None:
                clf = fit(draw(shots, seed)[0], backbone=bb, method=spec.name, shots=shots, seed=seed,
                          progress=progress, **{**fit_kwargs, **settings.get(spec.name, {})})
                rows += [{"method": spec.name, "test": n, "seed": seed, **s.scores(clf)} for n, s in scorers.items()]
    return rows


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def base_to_new(
    train: Source,
    test: Source,
    base: Sequence[str],
    new: Sequence[str],
    *,
    model: str = default_of(BackboneConfig, "model"),
    pretrained: Optional[str] = default_of(BackboneConfig, "pretrained"),
    shots: int = 16,
    seeds: Sequence[int] = (1, 2, 3),
    kg_weights: Sequence[float] = (0.0,),
    device: str = "auto",
    backbone: Optional[Backbone] = None,
    progress: bool = True,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    sampler: Optional[Sampler] = None,
    settings: Optional[dict[str, dict[str, Any]]] = None,
    methods: Optional[Sequence[str]] = None,
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """The CoCoOp protocol: fit on base classes, test on base and on unseen new classes; the methods
    registered for the ``base2new`` protocol unless ``methods`` names others.

    Each base/new test set is scored among its own classes. ``kg_weights`` > 0 adds the
    KgCoOp regulariser. ``sampler`` draws the few-shot training set of a seed over *all*
    classes before the base half is kept, as the official code does; ``settings`` maps
    a row's method (``kgcoop``, :data:`KGCOOP`, for CoOp with a KgCoOp weight) to fit() settings of that
    method (e.g. from :func:`coopkit.research.protocols.base2new_settings`). Returns rows with ``method,
    kg_weight, seed, base, new, hm`` and ``base_top5, base_macro, new_top5, new_macro``.
    """
    overlap = sorted(set(base) & set(new))
    if overlap:
        raise ValueError(f"classes {overlap} are both base and new")
    seeds = check_seeds(seeds)
    chosen = protocol_methods("base2new", methods)
    bb = backbone or load_backbone(model, pretrained, device)
    full = load_dataset(train)
    test_data = load_dataset(test)
    base_scorer = _Scorer(bb, test_data.subset(base), progress, "encoding base test")
    new_scorer = _Scorer(bb, test_data.subset(new), progress, "encoding new test")
    draw: Sampler = sampler or (lambda k, seed: (full, None))

    def row(method: str, kg: float, seed: int, clf: Classifier) -> dict[str, Any]:
        b, n = base_scorer.scores(clf), new_scorer.scores(clf.with_classes(new))
        return {"method": method, "kg_weight": kg, "seed": seed, "base": b["accuracy"], "new": n["accuracy"],
                "hm": round(harmonic_mean(b["accuracy"], n["accuracy"]), 6), "base_top5": b["top5"],
                "base_macro": b["macro"], "new_top5": n["top5"], "new_macro": n["macro"]}

    rows = [row(spec.name, 0.0, 0, zero_shot(bb, list(base), templates)) for spec in chosen if spec.fit is None]
    for spec in chosen:
        if spec.fit is None:
            continue
        for kg in kg_weights if spec.name == coop.NAME else (0.0,):  # KgCoOp: CoOp with a weight
            label = spec.name if kg == 0 else KGCOOP
            extra = {**(settings or {}).get(label, {}), **fit_kwargs}  # given settings win
            if spec.name == coop.NAME:
                extra["kg_weight"] = kg
            for seed in seeds:
                data = draw(shots, seed)[0].subset(base)
                clf = fit(data, backbone=bb, method=spec.name, shots=shots, seed=seed, progress=progress, **extra)
                rows.append(row(label, kg, seed, clf))
    return rows


# --- the protocols on the official datasets ------------------------------------------------------


def _official(dataset: Any, root: Optional[Union[str, os.PathLike]]) -> Any:
    """``dataset`` read from ``root``, or as given when it is already an OfficialDataset."""
    from ..official_datasets import OfficialDataset, load_official

    if isinstance(dataset, OfficialDataset):
        return dataset
    if root is None:
        raise ValueError(f"give the root folder that holds {dataset}")
    return load_official(dataset, root)


def _official_sampler(data: Any) -> Sampler:
    from ..official_datasets import few_shot_official

    return lambda k, seed: few_shot_official(data, k, seed)


def official_fewshot(
    dataset: Any,
    root: Optional[Union[str, os.PathLike]] = None,
    *,
    backbone: Backbone,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: Sequence[int] = (1, 2, 3),
    methods: Sequence[str] = DEFAULT_METHODS,
    epochs: Optional[int] = None,
    n_views: int = 10,
    progress: bool = True,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """CoOp's few-shot protocol on an official dataset, with the baselines beside it.

    The official few-shot draws (:func:`coopkit.official_datasets.few_shot_official`), the dataset's
    hand-written prompt for zero-shot and the baselines' text side (7-template ensemble on
    ImageNet, as CoOp's and Tip-Adapter's code), CoOp's epochs per dataset and shots
    (:func:`~coopkit.research.protocols.coop_epochs`; ``epochs`` overrides), Tip-Adapter's
    per-dataset settings with alpha and beta searched on the full validation split (the test
    split on ImageNet, as its code does).
    """
    from ..official_datasets import IMAGENET_TEMPLATES_SELECT
    from .protocols import coop_epochs, tip_settings

    data = _official(dataset, root)
    name = data.spec.name
    if data.train is None:
        raise ValueError(f"{name} is a test set only; few-shot curves need a training split (one of the 11 datasets)")
    templates = list(IMAGENET_TEMPLATES_SELECT) if name == "imagenet" else [data.spec.template]
    val = data.val if data.val is not None else data.test
    return fewshot_curves(
        data.train, data.test, backbone=backbone, shots=shots, seeds=seeds, methods=methods,
        epochs=epochs if epochs is not None else (lambda k: coop_epochs(name, k)), n_views=n_views,
        progress=progress, val=val, templates=templates, sampler=_official_sampler(data), tip=tip_settings(name),
        **kwargs,
    )


def official_base2new(
    dataset: Any,
    root: Optional[Union[str, os.PathLike]] = None,
    *,
    backbone: Backbone,
    seeds: Sequence[int] = (1, 2, 3),
    kg_weights: Sequence[float] = (0.0, 8.0),
    shots: int = 16,
    progress: bool = True,
    settings: Optional[dict[str, dict[str, Any]]] = None,
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """CoCoOp's base-to-new protocol on an official dataset: 16 shots drawn over all classes,
    the first half (in label order) trained on, CoOp and KgCoOp with their papers' settings (a row's
    ``settings`` replace them field by field; ``fit_kwargs`` win over both)."""
    from .protocols import base2new_settings

    data = _official(dataset, root)
    if data.train is None:
        raise ValueError(f"{data.spec.name} is a test set only; base-to-new needs a training split")
    names = data.classnames
    base = subsample_classes(Dataset([], names), "base").classnames
    new = subsample_classes(Dataset([], names), "new").classnames
    return base_to_new(data.train, data.test, base, new, backbone=backbone, shots=shots, seeds=seeds,
                       kg_weights=kg_weights, progress=progress, templates=[data.spec.template],
                       sampler=_official_sampler(data), settings=_merged(base2new_settings(data.spec.name), settings),
                       **fit_kwargs)


def _merged(paper: dict[str, dict[str, Any]], given: Optional[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per-row settings: the paper's, each row's given ones winning."""
    out = {row: dict(v) for row, v in paper.items()}
    for row, v in (given or {}).items():
        out[row] = {**out.get(row, {}), **v}
    return out


def official_shift(
    root: Optional[Union[str, os.PathLike]],
    *,
    backbone: Backbone,
    targets: Sequence[Any] = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"),
    source: Any = "imagenet",
    seeds: Sequence[int] = (1, 2, 3),
    shots: int = 16,
    progress: bool = True,
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """CoOp's Table 1: trained on 16-shot ImageNet (50 epochs), tested on ImageNet and its variants,
    ImageNet-A and -R among their 200 classes."""
    source = _official(source, root)
    tests: dict[str, Source] = {"imagenet": source.test}
    for t in targets:
        variant = _official(t, root)
        tests[variant.spec.name] = variant.test
    fit_kwargs.setdefault("epochs", 50)
    return domain_shift(source.train, tests, backbone=backbone, shots=shots, seeds=seeds, progress=progress,
                        templates=[source.spec.template], sampler=_official_sampler(source), **fit_kwargs)


def summarize(rows: Sequence[dict[str, Any]], keys: Sequence[str], values: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of ``values``, grouped by ``keys``."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    out = []
    for key, rs in groups.items():
        entry = dict(zip(keys, key))
        entry["seeds"] = len(rs)
        for v in values:
            xs = [float(r[v]) for r in rs]
            entry[v] = statistics.mean(xs)
            entry[f"{v}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        out.append(entry)
    return out


def markdown_table(summary: Sequence[dict[str, Any]], keys: Sequence[str], values: Sequence[str]) -> str:
    """A markdown table with values as percentages ``mean ± std``."""
    head = "| " + " | ".join([*keys, *values, "seeds"]) + " |"
    sep = "|" + "---|" * (len(keys) + len(values) + 1)
    lines = [head, sep]
    for s in summary:
        cells = [str(s[k]) for k in keys]
        cells += [f"{100 * s[v]:.1f} ± {100 * s[f'{v}_std']:.1f}" for v in values]
        lines.append("| " + " | ".join([*cells, str(s["seeds"])]) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Union[str, os.PathLike]) -> None:
    """Rows to CSV, atomically."""
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue().encode())


def read_csv(path: Union[str, os.PathLike]) -> list[dict[str, Any]]:
    """Rows written by :func:`write_csv`, numbers read back as numbers (an empty cell stays ``""``)."""

    def value(text: str) -> Any:
        for cast in (int, float):
            try:
                return cast(text)
            except ValueError:
                pass
        return text

    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def merge_rows(existing: Sequence[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``existing`` rows of the methods ``new`` does not have, then ``new``: a method run again
    replaces its rows, the others' stay (``bench ... --append``)."""
    rerun = {r["method"] for r in new}
    return [r for r in existing if r.get("method") not in rerun] + list(new)


def appended(rows: Sequence[dict[str, Any]], out: Optional[Union[str, os.PathLike]], append: bool) -> list[dict[str, Any]]:
    """``rows`` merged into ``out/results.csv`` when ``append`` and that file exists (:func:`merge_rows`)."""
    csv_path = Path(out) / "results.csv" if out else None
    if not append or csv_path is None or not csv_path.is_file():
        return list(rows)
    return merge_rows(read_csv(csv_path), rows)


def plot_fewshot(rows: Sequence[dict[str, Any]], path: Union[str, os.PathLike], title: str = "") -> bool:
    """Accuracy against shots in the style of the paper's figure; ``False`` without matplotlib.

    Zero-shot is a star at 0 shots, the baselines dashed, prompt learners (CoOp) solid, with
    the standard deviation over seeds as a band.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    summary = summarize(rows, ["method", "setting", "shots"], ["accuracy"])
    shots = sorted({s["shots"] for s in summary if s["shots"] > 0})
    xpos = {0: 0, **{k: i + 1 for i, k in enumerate(shots)}}
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
    for (method, setting), group in _by(summary, ("method", "setting")).items():
        group = sorted(group, key=lambda s: s["shots"])
        x = [xpos[s["shots"]] for s in group]
        y = [100 * s["accuracy"] for s in group]
        sd = [100 * s["accuracy_std"] for s in group]
        prompts = str(setting).startswith("n_ctx=")  # a prompt learner's row
        label = f"{method} ({setting})" if prompts else method
        if all(s["shots"] == 0 for s in group):  # zero-shot
            ax.plot(x, y, marker="*", markersize=14, linestyle="none", label=label)
        else:
            style = "-" if prompts else "--"  # the baselines dashed
            line, = ax.plot(x, y, style, marker="o", label=label)
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                            color=line.get_color(), alpha=0.15)
    ax.set_xticks(list(xpos.values()), [str(k) for k in xpos])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "few-shot accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def save_figure(fig: Any, path: Union[str, os.PathLike]) -> bool:
    """Lay out a matplotlib ``fig``, write it to ``path`` as a PNG atomically, close it; True."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return True


def _by(items: Iterable[dict[str, Any]], keys: Sequence[str]) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for it in items:
        out[tuple(it[k] for k in keys)].append(it)
    return out


def write_fewshot_report(rows: Sequence[dict[str, Any]], out: Union[str, os.PathLike], title: str = "",
                         extra: str = "") -> dict[str, Any]:
    """``results.csv``, ``summary.md`` (top-1, top-5 and mean per-class accuracy; ``extra`` appended)
    and ``fewshot.png`` (when matplotlib is installed) under ``out``."""
    summary = summarize(rows, ["method", "setting", "shots"], SCORES)
    text = f"# {title or 'Few-shot accuracy'}\n\nMean ± standard deviation over seeds (%): top-1 accuracy, top-5 " \
           "accuracy and the mean of the per-class accuracies.\n\n"
    text += markdown_table(summary, ["method", "setting", "shots"], SCORES)
    if extra:
        text += "\n" + extra
    files: dict[str, Any] = dict(write_summary(rows, out, text))
    plotted = plot_fewshot(rows, Path(out) / "fewshot.png", title)
    return {**files, "plot": Path(out) / "fewshot.png" if plotted else None}


def shift_report(rows: Sequence[dict[str, Any]], note: str = "") -> tuple[str, str]:
    """``(table, summary.md text)`` of :func:`domain_shift` rows (``note`` appended to both)."""
    table = markdown_table(summarize(rows, ["method", "test"], SCORES), ["method", "test"], SCORES) + note
    return table, "# Domain shift\n\nMean ± std over seeds (%): top-1, top-5, mean per-class accuracy.\n\n" + table


def base2new_report(rows: Sequence[dict[str, Any]], published: Sequence[Any] = ()) -> tuple[str, str]:
    """``(tables, summary.md text)`` of :func:`base_to_new` rows: base, new and H beside ``published``,
    then top-5 and mean per-class accuracy."""
    keys, extra = ["method", "kg_weight"], ["base_top5", "base_macro", "new_top5", "new_macro"]
    tables = base2new_paper_table(rows, published) + "\n" + markdown_table(summarize(rows, keys, extra), keys, extra)
    return tables, ("# Base-to-new generalisation\n\nMean ± std over seeds (%): top-1 accuracy on the base and the "
                    "new classes and their harmonic mean H, then top-5 and mean per-class accuracy.\n\n" + tables)


def write_summary(rows: Sequence[dict[str, Any]], out: Union[str, os.PathLike], summary: str) -> dict[str, Path]:
    """``results.csv`` and ``summary.md`` under ``out``, atomically."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(rows, folder / "results.csv")
    atomic_write(folder / "summary.md", summary.encode())
    return {"csv": folder / "results.csv", "summary": folder / "summary.md"}


def _cell(mean: float, std: float, seeds: int) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if seeds > 1 else f"{100 * mean:.1f}"


def fewshot_paper_table(rows: Sequence[dict[str, Any]], published: Sequence[Any] = ()) -> str:
    """Top-1 accuracy per method (rows) and shots (columns), as the papers' tables, with the published
    numbers (:class:`coopkit.research.protocols.Published`) below, each with its source."""
    summary = summarize(rows, ["method", "setting", "shots"], ["accuracy"])
    shots = sorted({s["shots"] for s in summary if s["shots"] > 0})
    cols = [0, *shots] if any(s["shots"] == 0 for s in summary) else shots
    head = "| method | " + " | ".join("0 (zero-shot)" if k == 0 else str(k) for k in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for (method, setting), group in _by(summary, ("method", "setting")).items():
        by_shots = {g["shots"]: g for g in group}
        cells = [_cell(by_shots[k]["accuracy"], by_shots[k]["accuracy_std"], by_shots[k]["seeds"])
                 if k in by_shots else "" for k in cols]
        lines.append(f"| {method} ({setting}) | " + " | ".join(cells) + " |")
    sources = []
    for p in published:
        cells = [f"{p.values[k]:.2f}" if k in p.values else "" for k in cols]
        if not any(cells):
            continue
        if p.source not in sources:
            sources.append(p.source)
        mark = "*" * (sources.index(p.source) + 1)
        lines.append(f"| published: {p.method}, {p.backbone}{mark} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    for i, src in enumerate(sources):
        notes = "; ".join(sorted({p.note for p in published if p.source == src and p.note}))
        text += f"\n{'*' * (i + 1)} {src}" + (f" ({notes})" if notes else "") + "\n"
    return text


def base2new_paper_table(rows: Sequence[dict[str, Any]], published: Sequence[Any] = ()) -> str:
    """Base, new and harmonic mean per method, as CoCoOp's Table 1, with the published numbers below."""
    summary = summarize(rows, ["method", "kg_weight"], ["base", "new", "hm"])
    lines = ["| method | base | new | H |", "|---|---|---|---|"]
    for s in summary:
        label = s["method"] + (f" (weight {s['kg_weight']:g})" if s["method"] == KGCOOP else "")
        lines.append(f"| {label} | " + " | ".join(_cell(s[v], s[f"{v}_std"], s["seeds"]) for v in ("base", "new", "hm"))
                     + " |")
    sources: list[str] = []
    for p in published:
        if p.source not in sources:
            sources.append(p.source)
        mark = "*" * (sources.index(p.source) + 1)
        lines.append(f"| published: {p.method}, {p.backbone}{mark} | "
                     + " | ".join(f"{p.values[v]:.2f}" for v in ("base", "new", "hm")) + " |")
    text = "\n".join(lines) + "\n"
    for i, src in enumerate(sources):
        notes = "; ".join(sorted({p.note for p in published if p.source == src and p.note}))
        text += f"\n{'*' * (i + 1)} {src}" + (f" ({notes})" if notes else "") + "\n"
    return text


__all__ = [
    "METHODS", "SCORES", "protocol_methods", "fewshot_curves", "domain_shift", "base_to_new", "official_fewshot", "official_base2new",
    "official_shift", "summarize", "markdown_table", "write_csv", "read_csv", "merge_rows", "appended", "plot_fewshot",
    "write_fewshot_report", "shift_report", "base2new_report", "write_summary",
    "fewshot_paper_table", "base2new_paper_table", "harmonic_mean", "ensemble_templates",
]
