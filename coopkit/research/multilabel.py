"""Multi-label benchmarks (``coopkit bench multilabel``): mAP and F1 of the multi-label methods against
the number of training images per label (few-shot) and against the fraction of labels known (partial labels).

Every registered method whose :attr:`~coopkit.methods.Method.task` is ``multilabel`` takes part
(zero-shot with a positive and a negative hand prompt, CoOp with a sigmoid, DualCoOp, ...), unless
``methods`` names some. Two settings, each over seeds:

* **few-shot** (``shots``): images drawn from the training pool until each label has ``shots``
  known positives (:func:`coopkit.multilabel_data.few_shot_multilabel`), every label of a drawn
  image known;
* **partial labels** (``known``): every training image, each (image, label) pair kept with
  probability ``known`` and the rest unknown (:func:`coopkit.multilabel_data.partial_labels`,
  DualCoOp's ``-pp`` setting; ``1.0`` is the fully labelled pool).

Each fit chooses per-label thresholds on the validation set (the best F1 per label; 0.5 without a
validation set), and each row reports the test set's ``mAP`` and the F1 at those thresholds (class
mean ``CF1`` and overall ``OF1``, with their precisions and recalls).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..backbone import Backbone, load_backbone
from ..config import BackboneConfig, TrainConfig, default_of
from ..methods import Method, get, names
from ..methods.base import Shots
from ..methods.multilabel import TASK
from ..multilabel_data import MultiLabelDataset, few_shot_multilabel, load_multilabel, partial_labels
from ..runtime.atomic import atomic_write
from ..train import fit_on_shots
from .experiments import check_seeds, markdown_table, save_figure, summarize, write_summary

logger = logging.getLogger(__name__)

#: What every row reports: mAP, then the class-mean and overall F1, precision and recall at the thresholds.
SCORES = ("mAP", "CF1", "OF1", "CP", "CR", "OP", "OR")
#: The two settings of the rows: a few images per label, and every image with a fraction of its labels known.
FEWSHOT, PARTIAL = "fewshot", "partial"
Source = Union[str, os.PathLike, MultiLabelDataset]


def multilabel_methods(methods: Optional[Sequence[str]] = None, backbone: Optional[Backbone] = None) -> list[Method]:
    """The registered multi-label methods that train (registration order): those named in ``methods``,
    or by default every one that can run on ``backbone`` (those whose ``check_backbone`` refuses it are
    left out with a warning; a named one that cannot run raises its one-line ValueError)."""
    valid = [get(n) for n in names() if get(n).task == TASK and get(n).fit is not None]
    if methods is not None:
        bad = [m for m in methods if m not in {v.name for v in valid}]
        if bad or not methods:
            raise ValueError(f"methods {bad or list(methods)} are not multi-label methods; valid: "
                             f"{', '.join(v.name for v in valid)}")
        chosen = [v for v in valid if v.name in methods]
        for spec in chosen:
            if backbone is not None and spec.check_backbone is not None:
                spec.check_backbone(backbone, spec.make_config())
        return chosen
    runnable = []
    for spec in valid:
        if backbone is not None and spec.check_backbone is not None:
            try:
                spec.check_backbone(backbone, spec.make_config())
            except ValueError as e:
                logger.warning("%s left out: %s", spec.name, e)
                continue
        runnable.append(spec)
    return runnable


def _fractions(known: Sequence[float]) -> list[float]:
    out = [float(k) for k in known]
    if any(isinstance(k, bool) or not 0 < k <= 1 for k in out):
        raise ValueError(f"known fractions must be in (0, 1], got {list(known)}")
    return out


def multilabel_bench(
    train: Source,
    test: Source,
    *,
    val: Optional[Source] = None,
    image_root: Optional[Union[str, os.PathLike]] = None,
    shots: Sequence[int] = (1, 2, 4, 8),
    known: Sequence[float] = (0.1, 0.5, 1.0),
    seeds: Sequence[int] = (1, 2, 3),
    methods: Optional[Sequence[str]] = None,
    epochs: Optional[int] = None,
    configs: Sequence[Any] = (),
    model: str = default_of(BackboneConfig, "model"),
    pretrained: Optional[str] = default_of(BackboneConfig, "pretrained"),
    device: str = "auto",
    backbone: Optional[Backbone] = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """mAP and F1 of each multi-label method, per setting and seed (see the module docstring).

    Args:
        train: The training pool (a multi-label CSV or JSON, or a dataset); its labels are the classes.
        test: The test set (every one of its labels must be among the training pool's).
        val: The set the per-label thresholds are chosen on (without one they stay at 0.5).
        image_root: Folder of relative paths in the CSV / JSON files.
        shots: The few-shot rows: known positives per label (empty: no few-shot rows).
        known: The partial-label rows: fractions of the training labels kept (empty: none).
        seeds: Each draw (of the shots, of the hidden labels) and each fit's seed.
        methods: Multi-label methods (default: every registered one the backbone can run).
        epochs: Overrides the epochs of every method whose config has ``epochs``.
        configs: Settings of methods: each config object applies to the methods whose config dataclass
            it is an instance of.
        backbone: An already loaded backbone (else ``model``, ``pretrained``, ``device``).
        progress: Progress bars while fitting.

    Returns rows with ``method, setting, shots, known, seed, train_images`` and :data:`SCORES`
    (``shots`` is empty in the partial-label rows, which train on every image).
    """
    seeds = check_seeds(seeds)
    shots = list(shots)
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in shots):
        raise ValueError(f"shots must be integers >= 1, got {shots}")
    fractions = _fractions(known)
    if not shots and not fractions:
        raise ValueError("give shots or known fractions (or both): there is nothing to run")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    multilabel_methods(methods)  # unknown names fail before anything is read or loaded
    pool = load_multilabel(train, image_root=image_root)
    test_set = load_multilabel(test, image_root=image_root, classnames=pool.classnames)
    val_set = load_multilabel(val, image_root=image_root, classnames=pool.classnames) if val is not None else None
    bb = backbone or load_backbone(model, pretrained, device)
    chosen = multilabel_methods(methods, bb)
    settings = {spec.name: _config(spec, configs, epochs) for spec in chosen}
    draws = [(FEWSHOT, k, 1.0) for k in shots] + [(PARTIAL, None, p) for p in fractions]
    rows: list[dict[str, Any]] = []
    for setting, k, p in draws:
        for seed in seeds:
            sample = few_shot_multilabel(pool, k, seed) if k is not None else partial_labels(pool, p, seed)
            shared = Shots(sample, val=val_set)  # type: ignore[arg-type]  # a multi-label fit takes a MultiLabelDataset
            for spec in chosen:
                clf = fit_on_shots(bb, shared, method=spec.name, method_config=settings[spec.name],
                                   train=TrainConfig(seed=seed), progress=progress)
                res = clf.evaluate(test_set)
                rows.append({"method": spec.name, "setting": setting, "shots": k, "known": p, "seed": seed,
                             "train_images": len(sample), **{s: round(float(res[s]), 6) for s in SCORES}})
                logger.info("%s %s shots=%s known=%g seed=%d: mAP %.4f", spec.name, setting, k, p, seed, res["mAP"])
    return rows


def _config(spec: Method, configs: Sequence[Any], epochs: Optional[int]) -> Any:
    cfg = next((c for c in configs if spec.config is not None and isinstance(c, spec.config)), spec.make_config())
    if epochs is not None and dataclasses.is_dataclass(cfg) and "epochs" in {f.name for f in dataclasses.fields(cfg)}:
        cfg = dataclasses.replace(cfg, epochs=epochs)
    return cfg


def random_ranking_map(data: MultiLabelDataset) -> float:
    """The mAP a random ranking of ``data``'s images reaches on average (the chance level of mAP).

    For a label with ``R`` positives among its ``N`` known images, a positive at rank ``k`` has on
    average ``(k - 1)(R - 1)/(N - 1)`` other positives above it, so the expected AP is
    ``(R - 1)/(N - 1) + H_N (N - R) / (N (N - 1))`` (``H_N`` the N-th harmonic number; ``1`` when
    ``N = 1``): a little above the share of positives on small sets. Averaged over the labels with a
    known positive, as mAP is.
    """
    known = (data.targets != -1).sum(0)  # (classes,)
    pos = (data.targets == 1).sum(0)
    expected = []
    for r, n in zip(pos.tolist(), known.tolist()):
        if not r:
            continue
        harmonic = sum(1 / k for k in range(1, n + 1))
        expected.append(1.0 if n == 1 else (r - 1) / (n - 1) + harmonic * (n - r) / (n * (n - 1)))
    if not expected:
        raise ValueError(f"{data.source}: no label has a known positive image")
    return sum(expected) / len(expected)


def multilabel_tables(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per setting, mAP per method (rows) and shots or known fraction (columns), mean ± std over
    seeds in %, then every score in a long table."""
    text = ""
    for setting, column, what in ((FEWSHOT, "shots", "known positives per label"),
                                  (PARTIAL, "known", "fraction of training labels known")):
        part = [r for r in rows if r["setting"] == setting]
        if not part:
            continue
        summary = summarize(part, ["method", column], SCORES)
        levels = sorted({s[column] for s in summary})
        cells = {(s["method"], s[column]): s for s in summary}
        title = "Few-shot" if setting == FEWSHOT else "Partial labels"
        text += f"## {title}: mAP (%) against the {what}\n\n"
        text += "| method | " + " | ".join(f"{v:g}" for v in levels) + " |\n|" + "---|" * (len(levels) + 1) + "\n"
        for method in dict.fromkeys(s["method"] for s in summary):
            row = [cells.get((method, v)) for v in levels]
            text += f"| {method} | " + " | ".join(
                "" if c is None else f"{100 * c['mAP']:.1f} ± {100 * c['mAP_std']:.1f}" for c in row) + " |\n"
        text += f"\n### Every score ({title.lower()})\n\n" + markdown_table(summary, ["method", column], SCORES) + "\n"
    return text


def plot_multilabel(rows: Sequence[dict[str, Any]], path: Union[str, os.PathLike], title: str = "") -> bool:
    """mAP against shots and against the known fraction, one line per method with the standard deviation
    over seeds as a band; ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(s, c) for s, c in ((FEWSHOT, "shots"), (PARTIAL, "known")) if any(r["setting"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), dpi=120, squeeze=False)
    for ax, (setting, column) in zip(axes[0], panels):
        summary = summarize([r for r in rows if r["setting"] == setting], ["method", column], ["mAP"])
        for method in dict.fromkeys(s["method"] for s in summary):
            group = sorted((s for s in summary if s["method"] == method), key=lambda s: s[column])
            x = [s[column] for s in group]
            y = [100 * s["mAP"] for s in group]
            sd = [100 * s["mAP_std"] for s in group]
            line, = ax.plot(x, y, marker="o", label=method)
            ax.fill_between(x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)],
                            color=line.get_color(), alpha=0.15)
        if setting == FEWSHOT:
            ax.set_xscale("log", base=2)
            levels = sorted({s[column] for s in summary})
            ax.set_xticks(levels, [str(v) for v in levels])
            ax.set_xlabel("known positives per label")
        else:
            ax.set_xlabel("fraction of training labels known")
        ax.set_ylabel("test mAP (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "multi-label mAP")
    return save_figure(fig, path)


def write_multilabel_report(rows: Sequence[dict[str, Any]], out: Union[str, os.PathLike], title: str = "",
                            note: str = "") -> dict[str, Any]:
    """``results.csv``, ``results.json``, ``summary.md`` (:func:`multilabel_tables`, ``note`` under the title)
    and ``multilabel.png`` (when matplotlib is installed) under ``out``; returns their paths (``plot``: None
    without matplotlib)."""
    out = Path(out)
    text = f"# {title or 'Multi-label benchmark'}\n\n" + (note + "\n\n" if note else "") + multilabel_tables(rows)
    files: dict[str, Any] = dict(write_summary(rows, out, text))
    atomic_write(out / "results.json", (json.dumps(list(rows), indent=1) + "\n").encode())
    plotted = plot_multilabel(rows, out / "multilabel.png", title)
    return {**files, "json": out / "results.json", "plot": out / "multilabel.png" if plotted else None}


__all__ = ["SCORES", "FEWSHOT", "PARTIAL", "multilabel_methods", "multilabel_bench", "multilabel_tables",
           "plot_multilabel", "write_multilabel_report", "random_ranking_map"]
