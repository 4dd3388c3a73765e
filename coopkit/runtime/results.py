"""What a prediction returns, shared by both classifiers (the torch one in :mod:`coopkit.classifier`
and the ONNX one in :mod:`coopkit.runtime.classifier`): :class:`Prediction`, the ranking that
makes it from a row of probabilities, and the checks of ``predict``'s arguments."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .configbase import check_choice

#: ``predict``'s ``errors``: ``raise`` on the first unreadable image, or ``skip`` it (its result carries the error).
ERROR_MODES = ("raise", "skip")


@dataclass(frozen=True)
class Prediction:
    """The result for one image: labels and probabilities, best first.

    Attributes:
        source: A short name of the input (its path, or e.g. ``<array (480, 640, 3) uint8>``).
        labels: Single-label models: the ``top_k`` most probable class names, best first.
            Multi-label models: every label whose probability reaches its threshold, most
            probable first (none when no label applies; ``top_k`` does not cut them).
        probs: Their probabilities.
        index: Position of the image in the input list.
        error: ``None``, or why the image could not be read (only with ``errors="skip"``);
            ``labels`` and ``probs`` are then empty.
        label_probs: Multi-label models: every label's own probability (sigmoid of its logit),
            in class order, those below their threshold included; ``None`` for single-label
            models (and unreadable images).
    """

    source: str
    labels: tuple[str, ...] = ()
    probs: tuple[float, ...] = ()
    index: int = 0
    error: Optional[str] = None
    label_probs: Optional[Mapping[str, float]] = field(default=None, hash=False)

    @property
    def ok(self) -> bool:
        """True when the image was classified."""
        return self.error is None

    @property
    def label(self) -> Optional[str]:
        """The best label (``None`` for an unreadable image)."""
        return self.labels[0] if self.labels else None

    @property
    def prob(self) -> Optional[float]:
        """Probability of the best label (``None`` for an unreadable image)."""
        return self.probs[0] if self.probs else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"source", "labels", "probs"}``, plus ``"label_probs"`` (every label's
        probability) for a multi-label model and ``"error"`` when unreadable."""
        out: dict[str, Any] = {"source": self.source, "labels": list(self.labels), "probs": list(self.probs)}
        if self.label_probs is not None:
            out["label_probs"] = dict(self.label_probs)
        if self.error is not None:
            out["error"] = self.error
        return out


def check_predict_args(top_k: Any, errors: str) -> int:
    """Validate ``predict``'s ``top_k`` and ``errors`` (shared by every classifier's predict)."""
    check_choice("errors", errors, ERROR_MODES)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    return int(top_k)


def rank(
    probs: np.ndarray,
    classnames: Sequence[str],
    sources: Sequence[str],
    errors: Sequence[Optional[str]],
    top_k: int,
    start: int = 0,
    thresholds: Optional[Sequence[float]] = None,
) -> list[Prediction]:
    """One :class:`Prediction` per input: the ``top_k`` classes of its row of ``probs``, best first;
    with ``thresholds`` (a multi-label model: one per class, ``probs`` independent sigmoids) every
    class whose probability reaches its threshold, best first, and every class's probability.

    ``probs`` ``(n_ok, n_classes)`` holds the rows of the inputs whose ``errors`` entry is
    ``None``, in order; the others get a result carrying their error. ``start`` is the index of
    the first input.
    """
    k = min(int(top_k), len(classnames))
    limits = None if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if limits is not None and limits.shape != (len(classnames),):
        raise ValueError(f"thresholds must hold one value per class ({len(classnames)}), got shape {limits.shape}")
    rows = iter(probs)
    out = []
    for offset, (src, err) in enumerate(zip(sources, errors)):
        if err is not None:
            out.append(Prediction(src, index=start + offset, error=err))
            continue
        p = next(rows)
        order = np.argsort(-p, kind="stable")
        if limits is None:
            order = order[:k]
            every = None
        else:
            order = order[p[order] >= limits[order]]  # every label that applies, best first
            every = {name: float(v) for name, v in zip(classnames, p)}
        out.append(Prediction(src, tuple(classnames[i] for i in order), tuple(float(p[i]) for i in order),
                              index=start + offset, label_probs=every))
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(n, n_classes)`` logits, float32 (what the graph's ``probs`` output is)."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
