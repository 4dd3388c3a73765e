"""The CoOp paper's experiments on any data: few-shot curves, domain shift, base-to-new.

Each returns result rows (dicts) and can write ``results.csv``, ``summary.md`` and a plot.
Test images are encoded once per experiment; every classifier is then scored on the cached
features, so a grid of methods x shots x seeds costs one training run per cell.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch

from .._io import atomic_path, atomic_write
from ..backbone import Backbone, load_backbone
from ..classifier import DEFAULT_TEMPLATES, Classifier, zero_shot
from ..config import BackboneConfig, default_of
from ..data import Dataset, few_shot, load_dataset
from ..features import encode_images
from ..train import fit
from .linear_probe import fit_linear_probe

logger = logging.getLogger(__name__)

METHODS = ("zeroshot", "zeroshot-ensemble", "linear-probe", "coop", "coop-csc")
Source = Union[str, os.PathLike, Dataset]


def ensemble_templates() -> list[str]:
    """CLIP's 80 ImageNet prompt templates (from open_clip), as ``{}`` strings."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return [t("{}") if callable(t) else str(t) for t in OPENAI_IMAGENET_TEMPLATES]


class _Scorer:
    """A labelled set encoded once, scored against any class-weight matrix."""

    def __init__(self, backbone: Backbone, data: Dataset, progress: bool, desc: str) -> None:
        feats, kept = encode_images(backbone, data.paths, progress=progress, desc=desc)
        self.feats = feats[0]
        self.labels = torch.tensor([data.labels[i] for i in kept])
        self.classnames = data.classnames

    def accuracy(self, clf: Classifier) -> float:
        index = {c: i for i, c in enumerate(clf.classnames)}
        target = torch.tensor([index[self.classnames[y]] for y in self.labels.tolist()])
        with torch.no_grad():
            return float((clf.head()(self.feats).argmax(1) == target).float().mean())


def _check_methods(methods: Sequence[str]) -> list[str]:
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; valid: {', '.join(METHODS)}")
    return list(methods)


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
    methods: Sequence[str] = ("zeroshot", "linear-probe", "coop", "coop-csc"),
    n_ctx: Sequence[int] = (16,),
    positions: Sequence[str] = ("end",),
    epochs: Optional[int] = None,
    n_views: int = 10,
    device: str = "auto",
    backbone: Optional[Backbone] = None,
    progress: bool = True,
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """Accuracy against shots for each method and prompt setting, over seeds (the paper's Figure 3).

    Returns rows with ``method, setting, shots, seed, accuracy`` (zero-shot rows have shots 0).
    """
    methods = _check_methods(methods)
    seeds = check_seeds(seeds)
    if not shots or min(shots) < 1:
        raise ValueError(f"shots must be integers >= 1, got {list(shots)}")
    bb = backbone or load_backbone(model, pretrained, device)
    train_data = load_dataset(train)
    scorer = _Scorer(bb, load_dataset(test).relabel(train_data.classnames), progress, "encoding test set")
    names = train_data.classnames
    rows: list[dict[str, Any]] = []

    def add(method: str, setting: str, k: int, seed: int, acc: float) -> None:
        rows.append({"method": method, "setting": setting, "shots": k, "seed": seed, "accuracy": round(acc, 6)})
        logger.info("%s %s shots=%d seed=%d: %.4f", method, setting, k, seed, acc)

    if "zeroshot" in methods:
        add("zeroshot", DEFAULT_TEMPLATES[0], 0, 0, scorer.accuracy(zero_shot(bb, names)))
    if "zeroshot-ensemble" in methods:
        add("zeroshot-ensemble", "80 templates", 0, 0, scorer.accuracy(zero_shot(bb, names, ensemble_templates())))
    for k in shots:
        for seed in seeds:
            if "linear-probe" in methods:
                sample = few_shot(train_data, k, seed)
                feats, kept = encode_images(bb, sample.paths)
                labels = torch.tensor([sample.labels[i] for i in kept])
                probe = fit_linear_probe(feats[0], labels, len(names), seed=seed)
                add("linear-probe", "L2 chosen on held-out shots", k, seed, probe.accuracy(scorer.feats, scorer.labels))
            for method in ("coop", "coop-csc"):
                if method not in methods:
                    continue
                for m in n_ctx:
                    for pos in positions:
                        clf = fit(train_data, backbone=bb, shots=k, seed=seed, n_ctx=m, csc=method == "coop-csc",
                                  class_token_position=pos, epochs=epochs, n_views=n_views, progress=progress,
                                  **fit_kwargs)
                        add(method, f"n_ctx={m},{pos}", k, seed, scorer.accuracy(clf))
    return rows


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
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """Fit on a source task; zero-shot vs CoOp on each (shifted) test set (the paper's Table 1).

    Returns rows with ``method, test, seed, accuracy`` (zero-shot rows have seed 0).
    """
    if not tests:
        raise ValueError("give at least one test set")
    seeds = check_seeds(seeds)
    bb = backbone or load_backbone(model, pretrained, device)
    train_data = load_dataset(train)
    scorers = {name: _Scorer(bb, load_dataset(src).relabel(train_data.classnames), progress, f"encoding {name}")
               for name, src in tests.items()}
    zs = zero_shot(bb, train_data.classnames)
    rows = [{"method": "zeroshot", "test": n, "seed": 0, "accuracy": round(s.accuracy(zs), 6)} for n, s in scorers.items()]
    for seed in seeds:
        clf = fit(train_data, backbone=bb, shots=shots, seed=seed, progress=progress, **fit_kwargs)
        rows += [{"method": "coop", "test": n, "seed": seed, "accuracy": round(s.accuracy(clf), 6)}
                 for n, s in scorers.items()]
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
    **fit_kwargs: Any,
) -> list[dict[str, Any]]:
    """The CoCoOp protocol: fit on base classes, test on base and on unseen new classes.

    Each base/new test set is scored among its own classes. ``kg_weights`` > 0 adds the
    KgCoOp regulariser. Returns rows with ``method, kg_weight, seed, base, new, hm``.
    """
    overlap = sorted(set(base) & set(new))
    if overlap:
        raise ValueError(f"classes {overlap} are both base and new")
    seeds = check_seeds(seeds)
    bb = backbone or load_backbone(model, pretrained, device)
    train_data = load_dataset(train).subset(base)
    test_data = load_dataset(test)
    base_scorer = _Scorer(bb, test_data.subset(base), progress, "encoding base test")
    new_scorer = _Scorer(bb, test_data.subset(new), progress, "encoding new test")

    def row(method: str, kg: float, seed: int, clf: Classifier) -> dict[str, Any]:
        b, n = base_scorer.accuracy(clf), new_scorer.accuracy(clf.with_classes(new))
        return {"method": method, "kg_weight": kg, "seed": seed, "base": round(b, 6), "new": round(n, 6),
                "hm": round(harmonic_mean(b, n), 6)}

    rows = [row("zeroshot", 0.0, 0, zero_shot(bb, list(base)))]
    for kg in kg_weights:
        for seed in seeds:
            clf = fit(train_data, backbone=bb, shots=shots, seed=seed, kg_weight=kg, progress=progress, **fit_kwargs)
            rows.append(row("coop" if kg == 0 else "kgcoop", kg, seed, clf))
    return rows


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


def plot_fewshot(rows: Sequence[dict[str, Any]], path: Union[str, os.PathLike], title: str = "") -> bool:
    """Accuracy against shots in the style of the paper's figure; ``False`` without matplotlib.

    Zero-shot is a star at 0 shots, the linear probe dashed, CoOp variants solid, with
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
        label = method if setting in ("", DEFAULT_TEMPLATES[0]) else f"{method} ({setting})"
        if method.startswith("zeroshot"):
            ax.plot(x, y, marker="*", markersize=14, linestyle="none", label=label)
        else:
            style = "--" if method == "linear-probe" else "-"
            line, = ax.plot(x, y, style, marker="o", label=label)
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                            color=line.get_color(), alpha=0.15)
    ax.set_xticks(list(xpos.values()), [str(k) for k in xpos])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "few-shot accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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


def write_fewshot_report(rows: Sequence[dict[str, Any]], out: Union[str, os.PathLike], title: str = "") -> dict[str, Any]:
    """``results.csv``, ``summary.md`` and ``fewshot.png`` (when matplotlib is installed) under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    summary = summarize(rows, ["method", "setting", "shots"], ["accuracy"])
    text = f"# {title or 'Few-shot accuracy'}\n\nMean ± standard deviation over seeds (%).\n\n"
    text += markdown_table(summary, ["method", "setting", "shots"], ["accuracy"])
    atomic_write(out / "summary.md", text.encode())
    plotted = plot_fewshot(rows, out / "fewshot.png", title)
    return {"csv": out / "results.csv", "summary": out / "summary.md", "plot": out / "fewshot.png" if plotted else None}


__all__ = [
    "METHODS", "fewshot_curves", "domain_shift", "base_to_new", "summarize", "markdown_table",
    "write_csv", "plot_fewshot", "write_fewshot_report", "harmonic_mean", "ensemble_templates",
]
