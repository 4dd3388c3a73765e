"""What the learned context "says": the nearest vocabulary words to each context vector.

As in the CoOp paper (Section 4.4), each context vector is compared with CLIP's token
embedding table by Euclidean distance, and the closest tokens are decoded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from ..classifier import Classifier


def nearest_words(clf: "Classifier", top: int = 5) -> dict[Optional[str], list[list[tuple[str, float]]]]:
    """For each context vector, the ``top`` nearest tokens and their distances.

    Returns a mapping from class name (``None`` for unified context) to one list per context
    vector, each of ``(word, distance)`` pairs, nearest first.
    """
    if clf.learner is None:
        raise ValueError("a zero-shot classifier has no learned context to explain")
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be an integer >= 1, got {top!r}")
    tokenizer = clf.backbone.tokenizer
    decoder = getattr(tokenizer, "decoder", None)
    if decoder is None:
        raise ValueError(f"{type(tokenizer).__name__} has no vocabulary decoder")
    table = clf.learner.tower.token_embedding.weight.detach().float().cpu()  # (vocab, width)
    ctx = clf.learner.ctx.detach().float().cpu()
    sets = {None: ctx} if ctx.ndim == 2 else {name: ctx[i] for i, name in enumerate(clf.classnames)}
    out: dict[Optional[str], list[list[tuple[str, float]]]] = {}
    for name, vectors in sets.items():
        dist = torch.cdist(vectors, table)  # (n_ctx, vocab)
        values, ids = dist.topk(min(top, table.shape[0]), largest=False)
        out[name] = [
            [(decoder[int(t)].replace("</w>", ""), round(float(d), 4)) for t, d in zip(row_ids, row_vals)]
            for row_ids, row_vals in zip(ids, values)
        ]
    return out
