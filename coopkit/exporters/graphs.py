"""The two torch modules that are traced into ONNX (nn.Modules only: no I/O, no logging).

:class:`ImageGraph` is the served classifier: uint8 images in, logits / probabilities /
normalised embeddings out, with the class weight matrix ``W`` baked in as a buffer.

:class:`TextGraph` is the optional companion for open vocabularies: token ids in, class
weights out, with CoOp's learned (unified) context baked in, for every text-tower family. Its
token layout is the one of :mod:`coopkit.runtime.contract` (:func:`~coopkit.runtime.contract.prompt_order`);
in short, the runtime tokenises ``"X X ... X <name>."`` (``n_ctx`` placeholders, exactly the
prompt coopkit trains with) and the graph overwrites the placeholder embeddings after the
tokenizer's prefix with the learned context, then moves the class-name tokens to the learned
position (``middle`` / ``front``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from coopkit.runtime.contract import check_position, context_before_name


def image_encoder(classifier: Any) -> nn.Module:
    """The module the image graph traces for ``classifier``: normalised pixels ``(b, 3, H, W)``
    -> unnormalised image features ``(b, embed_dim)``, from its ``image_encoder()`` (deep visual
    prompts baked in, LoRA updates merged: whatever the method trains in the image tower)."""
    return classifier.image_encoder()


class ImageGraph(nn.Module):
    """``uint8 (b, H, W, 3)`` -> ``logits (b, C)``, ``probs (b, C)``, ``image_embeds (b, D)``.

    Args:
        encoder: The classifier's image encoder (:func:`image_encoder`): normalised pixels
            ``(b, 3, H, W)`` -> unnormalised features ``(b, embed_dim)``.
        head: The classifier's head (:meth:`coopkit.Classifier.head`): L2-normalised image
            features ``(b, embed_dim)`` -> logits ``(b, n_classes)``; for CoOp and zero-shot,
            ``x W^T`` with the class weights baked in.
        mean: Per-channel mean of the model's preprocessing (RGB, on the 0-1 scale).
        std: Per-channel standard deviation.
        multilabel: ``probs`` is each label's own probability (``sigmoid(logits)``: a multi-label
            classifier) instead of the softmax over the label set.

    A region encoder (DualCoOp: features ``(b, positions, embed_dim)``, normalised per position
    before its head aggregates them) gives ``image_embeds`` its first position, the pooled token.

    The submodules ``encoder`` and ``head`` give the exported node names the prefixes
    ``/encoder/`` and ``/head/``, which the fp16 and int8 conversions use to keep the
    input normalisation and the head (L2, the classifier's head, softmax) in fp32.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, mean: Sequence[float], std: Sequence[float],
                 multilabel: bool = False) -> None:
        super().__init__()
        self.encoder = _Encoder(encoder, mean, std)
        self.head = _Head(head, multilabel)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.head(self.encoder(images))


class _Encoder(nn.Module):
    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        device = next(model.parameters()).device
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32, device=device).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # channels first while still uint8 (a quarter of the bytes to move), then the same element-wise
        # arithmetic per channel plane: the values are bit-identical to normalising NHWC and transposing
        # after, and onnxruntime runs the per-plane broadcast faster (28.7 -> 26.2 ms for coopkit-tiny at
        # batch 32 on one thread)
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # (b, 3, H, W) in [0, 1], as ToTensor
        x = (x - self.mean) / self.std  # as Normalize
        return self.model(x).to(torch.float32)  # (b, embed_dim), unnormalised


class _Head(nn.Module):
    def __init__(self, scorer: nn.Module, multilabel: bool = False) -> None:
        super().__init__()
        self.scorer = scorer
        self.multilabel = multilabel

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeds = F.normalize(features, dim=-1)  # (b, embed_dim), or (b, positions, embed_dim) of a region encoder
        logits = self.scorer(embeds).to(torch.float32)  # (b, C)
        probs = logits.sigmoid() if self.multilabel else logits.softmax(dim=-1)  # (b, C)
        if embeds.dim() == 3:
            embeds = embeds[:, 0]  # (b, embed_dim): the pooled token
        return logits, probs, embeds


class TextGraph(nn.Module):
    """``token_ids int64 (n, context_length)`` -> ``class_weights (n, embed_dim)``.

    Args:
        tower: The classifier's text tower (:attr:`coopkit.Classifier.text_tower`): any family's
            adapter, with ``embed(ids)``, ``encode(x, ids)``, ``width`` and ``parts``.
        logit_scale: ``log`` of the logit scale (the model's ``logit_scale``); the output is
            multiplied by its ``exp``.
        ctx: The learned unified context ``(n_ctx, width)``, or ``None`` for plain prompts
            (zero-shot: the token ids are the whole prompt).
        class_token_position: ``end``, ``middle`` or ``front`` (CoOp only).
        n_prefix: Special tokens the tokenizer puts before the text (the context follows them).
        end_id: Id of the first token after the text (the tokenizer's end token, or padding).
        dot_id: Id of ``"."`` after a word, or ``None`` where the tokenizer drops it.
        deep: Deep text prompts (IVLP, MaPLe, PromptSRC), per text layer ``1 .. J - 1``:
            ``(n_ctx, width)`` each, replacing the context positions before that layer (the
            tower's ``encode(..., deep=, at=)``; open_clip's text transformer, class name at the end).

    With ``ctx``, row ``i`` of ``token_ids`` must be the tokenisation of ``"X X ... X <name>."``
    (``n_ctx`` placeholder words): ``[prefix, X * n_ctx, name tokens, ".", end, pad ...]``.
    Positions ``n_prefix .. n_prefix + n_ctx`` are replaced by ``ctx`` (the "end" layout); for
    ``middle`` and ``front`` the name tokens are then moved in front of the last
    ``n_ctx - n_ctx // 2`` or all context vectors, the name's length read off the ids by the
    contract's rule (:func:`~coopkit.runtime.contract.name_length`), exactly as
    :class:`coopkit.prompts.PromptLearner` lays out its prompts. The tower then runs its own
    full-length pass (its masks and pooling), as in training.
    """

    def __init__(
        self,
        tower: Any,
        logit_scale: torch.Tensor,
        ctx: Optional[torch.Tensor],
        class_token_position: str = "end",
        *,
        n_prefix: int = 1,
        end_id: int = 49407,
        dot_id: Optional[int] = 269,
        deep: Sequence[torch.Tensor] = (),
    ) -> None:
        super().__init__()
        check_position(class_token_position)
        self.tower = tower
        self.parts = nn.ModuleList(tower.parts)  # registered, so .to() and .eval() reach them
        self.register_buffer("scale", logit_scale.detach().exp().float().reshape(()).clone())
        self.class_token_position = class_token_position
        self.n_prefix, self.end_id, self.dot_id = int(n_prefix), int(end_id), dot_id
        if ctx is not None:
            if ctx.dim() != 2 or ctx.shape[1] != tower.width:
                raise ValueError(f"ctx must be (n_ctx, {tower.width}) (unified context), got {tuple(ctx.shape)}")
            self.register_buffer("ctx", ctx.detach().to(device=tower.device, dtype=torch.float32).clone())
            self.n_ctx = int(ctx.shape[0])
        else:
            self.ctx = None
            self.n_ctx = 0
        self.n_before = context_before_name(class_token_position, self.n_ctx)
        if len(deep):
            if self.ctx is None or class_token_position != "end":
                raise ValueError("deep text prompts need a learned context and the class name at the end")
            stacked = torch.stack([d.detach().float() for d in deep])  # (J - 1, n_ctx, width)
            if stacked.shape[1:] != self.ctx.shape:
                raise ValueError(f"deep text prompts must be (n_ctx, width) = {tuple(self.ctx.shape)} each, "
                                 f"got {tuple(stacked.shape[1:])}")
            self.register_buffer("deep", stacked.to(tower.device).clone())
        else:
            self.deep = None

    def _name_length(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Tokens of each row's class name ``(n,)``: the contract's ``name_length`` on tensors."""
        length = token_ids.shape[1]
        start = self.n_prefix + self.n_ctx
        j = torch.arange(length, device=token_ids.device).unsqueeze(0)  # (1, L)
        is_end = (token_ids == self.end_id) & (j >= start)  # (n, L)
        end = torch.where(is_end.any(dim=1), is_end.to(torch.int64).argmax(dim=1),
                          torch.full_like(token_ids[:, 0], length))  # (n,): first end token after the context
        name_len = end - start
        if self.dot_id is not None:
            before = torch.gather(token_ids, 1, (end - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # (n,)
            name_len = name_len - ((before == self.dot_id) & (end > start)).to(name_len.dtype)
        return name_len

    def _prompts(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings ``(n, L, width)`` with the learned context in place."""
        x = self.tower.embed(token_ids)  # (n, L, width)
        if self.ctx is None:
            return x
        n, length, width = x.shape
        p, m = self.n_prefix, self.n_ctx
        ctx = self.ctx.to(x.dtype).unsqueeze(0).expand(n, -1, -1)  # (n, m, width)
        x = torch.cat([x[:, :p], ctx, x[:, p + m :]], dim=1)  # (n, L, width): prefix, ctx, name, ".", end
        if self.n_before == m:
            return x
        j = torch.arange(length, device=x.device).unsqueeze(0)  # (1, L)
        k = self._name_length(token_ids).unsqueeze(1)  # (n, 1)
        s = self.n_before
        # output position j takes end-layout position order[j]: the prefix and the first s context
        # vectors stay, then the name (from p + m), then the remaining context, then the rest
        order = torch.where(
            j < p + s,
            j,
            torch.where(j < p + s + k, j + (m - s), torch.where(j < p + m + k, j - k, j)),
        )  # (n, L)
        return torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, width))  # (n, L, width)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.deep is None:
            x = self.tower.encode(self._prompts(token_ids), token_ids)  # (n, embed_dim)
        else:
            x = self.tower.encode(self._prompts(token_ids), token_ids, deep=list(self.deep.unbind(0)),
                                  at=self.n_prefix)  # (n, embed_dim)
        return F.normalize(x.to(torch.float32), dim=-1) * self.scale
