"""Scoring heads: pure modules from L2-normalised image features to logits.

A coopkit classifier scores L2-normalised image features with one pure ``nn.Module``, its head
(:meth:`coopkit.Classifier.head`), which PyTorch uses and the exporter bakes into the ONNX
graph. Methods with constant class weights (CoOp, zero-shot) use :class:`LinearHead`, one
matrix product. The few-shot baselines keep a few more tensors, saved in a run's
``head.safetensors`` and rebuilt here, by the kind of head (:data:`HEAD_TENSORS`):

* ``linear`` (the linear probe and CLAP): a linear classifier ``x W^T + b`` (tensors ``weight``
  ``(C, D)`` and ``bias`` ``(C,)``; CLAP's bias is zero and its ``weight`` already holds
  ``exp(logit_scale) * normalise(prototypes)``);
* ``cache`` (Tip-Adapter and Tip-Adapter-F): Tip-Adapter's cache model over the text weights ``W``
  (and the model's logit bias ``b``, SigLIP's; none for CLIP),
  ``x W^T + b + alpha * exp(-beta * (1 - x K^T)) V`` (tensors ``keys`` ``K`` ``(N, D)``, ``labels``
  ``(N,)`` whose one-hot rows are ``V``, ``alpha`` and ``beta``; Tip-Adapter-F's keys are
  fine-tuned, Tip-Adapter's are the training images' features).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

#: The tensors each kind of head saves.
HEAD_TENSORS = {"linear": ("weight", "bias"), "cache": ("keys", "labels", "alpha", "beta")}


class LinearHead(nn.Module):
    """Logits of L2-normalised image features: ``x W^T + b`` with ``W = exp(logit_scale) * text
    features`` and ``b`` the model's logit bias (SigLIP-family models; none for CLIP's).

    The head of every method with constant class weights (CoOp, zero-shot), and the one the
    exporter bakes into the graph (a pure module: the weights and the bias are buffers, nothing else).
    """

    def __init__(self, weights: torch.Tensor, bias: Optional[float] = None) -> None:
        super().__init__()
        self.register_buffer("weights_t", weights.detach().to(torch.float32).t().contiguous())  # (embed_dim, C)
        self.register_buffer("bias", None if bias is None else torch.tensor(float(bias), dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = features.to(torch.float32) @ self.weights_t  # (b, C)
        return logits if self.bias is None else logits + self.bias


class AffineHead(nn.Module):
    """``x W^T + b``: a linear probe's logits over L2-normalised image features."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight_t", weight.detach().to(torch.float32).t().contiguous())  # (D, C)
        self.register_buffer("bias", bias.detach().to(torch.float32).reshape(1, -1).clone())  # (1, C)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(torch.float32) @ self.weight_t + self.bias  # (b, C)


class CacheHead(nn.Module):
    """Tip-Adapter: ``x W^T + b + alpha * exp(-beta * (1 - x K^T)) V`` over L2-normalised image features.

    Args:
        class_weights: ``W = exp(logit_scale) * text features``, ``(C, D)``.
        keys: ``K``, the cached training features ``(N, D)``.
        labels: Class index of each key ``(N,)``; ``V`` is their one-hot matrix ``(N, C)``.
        alpha: Weight of the cache logits.
        beta: Sharpness of the affinity.
        logit_bias: The model's logit bias ``b`` (SigLIP family), or ``None``.
    """

    def __init__(self, class_weights: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor,
                 alpha: torch.Tensor, beta: torch.Tensor, logit_bias: Optional[float] = None) -> None:
        super().__init__()
        n_classes = class_weights.shape[0]
        self.register_buffer("weights_t", class_weights.detach().to(torch.float32).t().contiguous())  # (D, C)
        self.register_buffer("keys_t", keys.detach().to(torch.float32).t().contiguous())  # (D, N)
        values = F.one_hot(labels.detach().long(), n_classes).to(torch.float32)  # (N, C)
        self.register_buffer("values", values)
        self.register_buffer("alpha", alpha.detach().to(torch.float32).reshape(()).clone())
        self.register_buffer("beta", beta.detach().to(torch.float32).reshape(()).clone())
        self.register_buffer("logit_bias", None if logit_bias is None else torch.tensor(float(logit_bias)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.to(torch.float32)
        affinity = x @ self.keys_t  # (b, N)
        cache = torch.exp(-self.beta * (1 - affinity)) @ self.values  # (b, C)
        text = x @ self.weights_t if self.logit_bias is None else x @ self.weights_t + self.logit_bias  # (b, C)
        return text + self.alpha * cache  # (b, C)


def check_head_tensors(kind: str, tensors: Mapping[str, torch.Tensor], n_classes: int, embed_dim: int,
                       method: str = "") -> None:
    """Refuse a head file whose tensors are missing or of the wrong shape (one ValueError naming it).

    Args:
        kind: The kind of head, a key of :data:`HEAD_TENSORS`.
        tensors: The saved tensors.
        n_classes: Classes of the run.
        embed_dim: Width of the image features.
        method: The run's method, named in the errors.
    """
    if kind not in HEAD_TENSORS:
        raise ValueError(f"unknown head kind {kind!r}; valid: {', '.join(HEAD_TENSORS)}")
    what = method or kind
    missing = [n for n in HEAD_TENSORS[kind] if n not in tensors]
    if missing:
        raise ValueError(f"a {what} head needs tensors {list(HEAD_TENSORS[kind])}; missing {missing}")
    shapes = {n: tuple(tensors[n].shape) for n in HEAD_TENSORS[kind]}
    if kind == "linear":
        ok = shapes["weight"] == (n_classes, embed_dim) and shapes["bias"] == (n_classes,)
    else:
        n = shapes["keys"][0] if len(shapes["keys"]) == 2 else -1
        ok = (shapes["keys"] == (n, embed_dim) and shapes["labels"] == (n,) and shapes["alpha"] == ()
              and shapes["beta"] == () and n > 0
              and 0 <= int(tensors["labels"].min()) and int(tensors["labels"].max()) < n_classes)
    if not ok:
        raise ValueError(f"{what} head tensors {shapes} do not fit {n_classes} classes of width {embed_dim}")


def build_head(kind: str, tensors: Mapping[str, torch.Tensor], class_weights: torch.Tensor,
               logit_bias: Optional[float] = None) -> nn.Module:
    """The head module of a ``kind`` head from its saved tensors, the class text weights ``(C, D)``
    and the model's logit bias (used by the cache head's text part; a linear probe has its own bias)."""
    check_head_tensors(kind, tensors, class_weights.shape[0], class_weights.shape[1])
    if kind == "linear":
        return AffineHead(tensors["weight"], tensors["bias"]).eval()
    return CacheHead(class_weights, tensors["keys"], tensors["labels"], tensors["alpha"], tensors["beta"],
                     logit_bias).eval()
