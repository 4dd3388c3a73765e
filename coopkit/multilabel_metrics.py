"""Multi-label metrics and thresholds (numpy only): AP per class, mAP, F1 at thresholds, thresholds from validation.

Inputs are ``scores`` ``(images, classes)`` (probabilities or any monotone score) and ``targets``
of the same shape with 1 (applies), 0 (does not) and -1 (unknown: skipped everywhere, as
DualCoOp's loss skips it).

* :func:`average_precision` is the non-interpolated AP (the mean, over the positives, of the
  precision at their score); tied scores count as one threshold (as scikit-learn's
  ``average_precision_score``), so the value does not depend on the order of tied images.
  Without ties it equals the official DualCoOp / ASL ``average_precision``.
* :func:`f1_at` gives per-class precision, recall and F1 at a threshold (``score > threshold``,
  the official ``gt(thre)``), their means over classes (``CP``, ``CR``, ``CF1``: the official
  ``mean_f_c`` is the mean of the per-class F1) and the overall ones (``OP``, ``OR``, ``OF1``),
  all as fractions in [0, 1] (the official code prints percentages).
* :func:`choose_thresholds` picks, per class, the threshold with the best F1 on validation data.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np

#: The threshold a class keeps when validation cannot choose one (no known positive).
DEFAULT_THRESHOLD = 0.5


def _check(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets)
    if s.ndim == 1:
        s, t = s[:, None], t.reshape(-1, 1)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must have the same (images, classes) shape")
    bad = sorted(set(np.unique(t).tolist()) - {-1, 0, 1})
    if bad:
        raise ValueError(f"target values {bad}; valid: 1 (applies), 0 (does not), -1 (unknown)")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return s, t.astype(np.int8)


def _ap_one(scores: np.ndarray, targets: np.ndarray) -> float:
    known = targets != -1
    s, pos = scores[known], targets[known] == 1
    n_pos = int(pos.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, pos = s[order], pos[order]
    tp = np.cumsum(pos)  # true positives among the first k+1
    last = np.r_[s[1:] != s[:-1], True]  # the last image of each group of tied scores
    tp, count = tp[last], np.flatnonzero(last) + 1  # at each distinct threshold
    precision = tp / count
    recall_step = np.diff(np.r_[0, tp]) / n_pos
    return float((precision * recall_step).sum())


def average_precision(scores: Any, targets: Any) -> np.ndarray:
    """Per-class average precision ``(classes,)``; NaN for a class without a known positive.

    ``scores``/``targets``: ``(images, classes)`` (or one class as ``(images,)``).
    """
    s, t = _check(scores, targets)
    return np.array([_ap_one(s[:, c], t[:, c]) for c in range(s.shape[1])])


def mean_average_precision(scores: Any, targets: Any) -> float:
    """mAP: the mean of :func:`average_precision` over the classes that have a known positive."""
    ap = average_precision(scores, targets)
    if np.isnan(ap).all():
        raise ValueError("no class has a known positive image: mAP is undefined")
    return float(np.nanmean(ap))


def _thresholds(threshold: Union[float, Any], n_cls: int) -> np.ndarray:
    th = np.asarray(threshold, dtype=np.float64)
    if th.ndim == 0:
        th = np.full(n_cls, float(th))
    if th.shape != (n_cls,) or not np.isfinite(th).all():
        raise ValueError(f"threshold must be a finite number or one per class ({n_cls}), got shape {th.shape}")
    return th


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)


def f1_at(scores: Any, targets: Any, threshold: Union[float, Any] = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Precision, recall and F1 at ``threshold`` (one number, or one per class): ``score > threshold``.

    Returns a dict with ``per_class`` (lists ``precision``, ``recall``, ``f1``, ``support``: known
    positives per class), the class means ``CP``, ``CR``, ``CF1`` (the mean of the per-class F1,
    as the official code) and the overall (micro) ``OP``, ``OR``, ``OF1``. A class with no
    predicted or no known positive has precision / recall 0, as in the official code.
    """
    s, t = _check(scores, targets)
    pred = s > _thresholds(threshold, s.shape[1])  # (images, classes)
    known = t != -1
    tp = (pred & (t == 1)).sum(0).astype(np.float64)
    fp = (pred & (t == 0)).sum(0).astype(np.float64)
    fn = (~pred & (t == 1)).sum(0).astype(np.float64)
    p, r = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * p * r, p + r)
    op, orr = _ratio(tp.sum(), tp.sum() + fp.sum()), _ratio(tp.sum(), tp.sum() + fn.sum())
    return {
        "per_class": {"precision": p.tolist(), "recall": r.tolist(), "f1": f1.tolist(),
                      "support": (known & (t == 1)).sum(0).astype(int).tolist()},
        "CP": float(p.mean()), "CR": float(r.mean()), "CF1": float(f1.mean()),
        "OP": float(op), "OR": float(orr), "OF1": float(_ratio(2 * op * orr, op + orr)),
    }


def _best_threshold(scores: np.ndarray, targets: np.ndarray, default: float) -> float:
    known = targets != -1
    s, pos = scores[known], targets[known] == 1
    n_pos = int(pos.sum())
    if n_pos == 0:
        return default
    order = np.argsort(-s, kind="stable")
    s, pos = s[order], pos[order]
    last = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(pos)[last]  # predicting every image down to each distinct score as positive
    count = np.flatnonzero(last) + 1
    f1 = 2 * tp / (count + n_pos)
    k = int(np.argmax(f1))  # the first best: the highest such threshold
    cut = np.unique(s)[::-1]  # distinct scores, descending
    below = cut[k + 1] if k + 1 < len(cut) else cut[k] - 1.0
    return float((cut[k] + below) / 2)  # halfway to the next score: cut[k] is in, the next is out


def choose_thresholds(scores: Any, targets: Any, default: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Per-class thresholds ``(classes,)`` with the best F1 on validation ``scores``/``targets``.

    Each class's threshold lies halfway between the lowest score it counts as positive and the
    next lower score (among the known images), so ``score > threshold`` reproduces the best
    split on these images; among equally good splits the highest threshold is kept. A class
    without a known positive keeps ``default``.
    """
    s, t = _check(scores, targets)
    return np.array([_best_threshold(s[:, c], t[:, c], float(default)) for c in range(s.shape[1])])


def multilabel_report(scores: Any, targets: Any, threshold: Union[float, Any] = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """mAP, per-class AP and :func:`f1_at` in one dict (what ``evaluate`` of a multi-label run reports)."""
    ap = average_precision(scores, targets)
    out = {"mAP": mean_average_precision(scores, targets), "AP": [None if np.isnan(a) else float(a) for a in ap]}
    out.update(f1_at(scores, targets, threshold))
    return out
