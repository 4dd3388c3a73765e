"""CoOp's prompt learner and the text-tower pass with learned context (nn.Modules only: no I/O).

A prompt is ``[SOS] + context + class tokens + "." + [EOT]`` (class tokens at the end, in
the middle after M/2 context vectors, or at the front), run through CLIP's own text tower.

Three computations here are exact rewrites of the plain full-length pass, not
approximations (``tests/test_prompts.py`` checks them against :func:`reference_text_features`):

* prompts are cut after their EOT token, classes grouped by prompt length so that no
  group carries padding: the causal mask makes later positions irrelevant to the EOT features;
* with unified context, the positions before the first class token (SOS and the leading
  context vectors) are the same for every class and attend only to each other, so they go
  through each layer once, and every class reuses their keys and values;
* the rows of all length groups are packed into one matrix for the token-wise layers (one
  large matmul instead of one small one per group; attention stays per group), and the last
  block runs its output projection and MLP on the EOT rows only, the only ones read;
* large label sets go through the tower in chunks, with activation checkpointing when
  gradients are needed, so memory stays bounded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import PromptConfig, apply_overrides
from .runtime.contract import PROMPT_SUFFIX, check_classnames, context_before_name, prompt_name, prompt_order
from .runtime.tokenizer import is_clip_bpe

if TYPE_CHECKING:
    from .backbone import Backbone


@dataclass
class TextTower:
    """Views of an open_clip model's text transformer (not a module: nothing here is owned)."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Any
    attn_mask: Optional[torch.Tensor]
    pool_type: str
    context_length: int

    @classmethod
    def of(cls, model: nn.Module) -> "TextTower":
        """Find the CLIP-style text tower of an open_clip ``CLIP`` or ``CustomTextCLIP``."""
        src = getattr(model, "text", None)
        if src is None or not hasattr(src, "token_embedding"):
            src = model
        if not hasattr(src, "token_embedding") or not hasattr(src, "transformer"):
            raise ValueError(
                f"{type(model).__name__} has no CLIP-style text transformer (token embedding + causal "
                "transformer); CoOp needs one, Hugging Face text towers are not supported"
            )
        if getattr(src, "cls_emb", None) is not None:
            raise ValueError("text towers with a CLS embedding (embed_cls) are not supported")
        pool = getattr(src, "text_pool_type", getattr(src, "pool_type", "argmax"))
        if pool not in ("argmax", "eos"):
            raise ValueError(f"text pool type {pool!r} is not supported; CoOp reads the feature at the EOT token")
        return cls(
            token_embedding=src.token_embedding,
            positional_embedding=src.positional_embedding,
            transformer=src.transformer,
            ln_final=src.ln_final,
            text_projection=src.text_projection,
            attn_mask=getattr(src, "attn_mask", None),
            pool_type=pool,
            context_length=int(src.positional_embedding.shape[0]),
        )

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    @property
    def cast_dtype(self) -> torch.dtype:
        get = getattr(self.transformer, "get_cast_dtype", None)
        return get() if get is not None else self.token_embedding.weight.dtype

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and text projection of EOT features ``(n, width) -> (n, embed_dim)``."""
        x = self.ln_final(x)
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Module):
            return self.text_projection(x)
        return x @ self.text_projection


def _causal_mask(n_query: int, n_key: int, device: torch.device) -> torch.Tensor:
    """Boolean mask ``(n_query, n_key)``: query i sees keys up to ``n_key - n_query + i``."""
    q = torch.arange(n_query, device=device).unsqueeze(1)
    k = torch.arange(n_key, device=device).unsqueeze(0)
    return k <= q + (n_key - n_query)


def _split_attention_supported(transformer: nn.Module) -> bool:
    blocks = getattr(transformer, "resblocks", None)
    if not blocks:
        return False
    for blk in blocks:
        attn = getattr(blk, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            return False
        if not all(hasattr(blk, n) for n in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")) or hasattr(blk, "ln_1_kv"):
            return False
        if type(blk).__name__ != "ResidualAttentionBlock":
            return False
    return True


def _qkv(blk: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key, value of one block: ``(b, n, d) -> 3 x (b, heads, n, d / heads)``."""
    attn = blk.attn
    b, n, d = h.shape
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # (b, n, 3d)
    qkv = qkv.view(b, n, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)  # (3, b, heads, n, hd)
    return qkv[0], qkv[1], qkv[2]


def _merge_heads(attn_out: torch.Tensor) -> torch.Tensor:
    """``(b, heads, n, hd) -> (b, n, heads * hd)``."""
    b, _, n, _ = attn_out.shape
    return attn_out.transpose(1, 2).reshape(b, n, -1)


def _finish_block(blk: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """Output projection, residuals and MLP of one block; ``attn_out`` has heads merged (``(..., d)``)."""
    x = x + blk.ls_1(blk.attn.out_proj(attn_out))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


class PromptLearner(nn.Module):
    """Learnable CoOp context for a label set, over a frozen open_clip text tower.

    Args:
        backbone: The frozen backbone (its model is referenced, not owned or saved).
        classnames: Labels, in output order; underscores are read as spaces in prompts.
        config: The prompt (:class:`~coopkit.config.PromptConfig`); default ``PromptConfig()``.
        text_chunk_size: Classes per pass through the text tower (a compute setting, not
            part of the prompt).
        **overrides: Fields of ``config`` to replace, e.g. ``n_ctx=4, csc=True`` (as open_clip's
            ``create_model`` keyword arguments override its config).

    Attributes:
        config: The prompt settings, with ``n_ctx`` the real number of context vectors.
        ctx: The only trainable parameter: ``(n_ctx, width)`` or ``(n_classes, n_ctx, width)``.
    """

    def __init__(
        self,
        backbone: "Backbone",
        classnames: Sequence[str],
        config: Optional[PromptConfig] = None,
        *,
        text_chunk_size: int = 256,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if config is not None and not isinstance(config, PromptConfig):
            raise ValueError(f"config must be a PromptConfig, got {type(config).__name__}")
        config = apply_overrides({"prompt": config or PromptConfig()}, overrides)["prompt"]
        self.classnames = check_classnames(classnames)
        if isinstance(text_chunk_size, bool) or not isinstance(text_chunk_size, int) or text_chunk_size < 1:
            raise ValueError(f"text_chunk_size must be an integer >= 1, got {text_chunk_size!r}")
        self.text_chunk_size = text_chunk_size
        self.tower = TextTower.of(backbone.model)
        tokenizer = backbone.tokenizer
        if not is_clip_bpe(tokenizer):
            raise ValueError(
                f"model {backbone.name!r} uses a {type(tokenizer).__name__} tokenizer; CoOp needs CLIP's "
                "BPE tokenizer with start and end tokens"
            )
        device = self.tower.token_embedding.weight.device
        names = [prompt_name(n) for n in self.classnames]

        if config.ctx_init is not None:
            init_ids = tokenizer.encode(config.ctx_init)
            if not init_ids:
                raise ValueError(f"ctx_init {config.ctx_init!r} gives no tokens; give words like 'a photo of a'")
            n_ctx = len(init_ids)
            prompt_prefix = config.ctx_init
            config = dataclasses.replace(config, n_ctx=n_ctx)
        else:
            n_ctx = config.n_ctx
            prompt_prefix = " ".join(["X"] * n_ctx)
        self.config = config
        self.n_ctx = n_ctx
        self.n_cls = len(names)

        name_lens = [len(tokenizer.encode(n)) for n in names]
        budget = self.tower.context_length - n_ctx - 3  # SOS, ".", EOT
        too_long = [n for n, ln in zip(self.classnames, name_lens) if ln > budget]
        if too_long:
            raise ValueError(
                f"class names {too_long[:3]} need more than the {budget} tokens left by n_ctx={n_ctx} in a "
                f"context of {self.tower.context_length}; shorten them or lower n_ctx"
            )
        tokens = tokenizer([f"{prompt_prefix} {n}{PROMPT_SUFFIX}" for n in names]).to(device)  # (n_cls, context_length)
        eot = (tokens == tokenizer.eot_token_id).int().argmax(dim=-1)  # (n_cls,)
        length = int(eot.max()) + 1 if self.tower.attn_mask is not None else tokens.shape[1]
        with torch.no_grad():
            embedding = self.tower.token_embedding(tokens).to(self.tower.cast_dtype)  # (n_cls, context_length, width)

        width = self.tower.width
        if self.config.ctx_init is not None:
            ctx = embedding[0, 1 : 1 + n_ctx, :].detach().clone().float()  # (n_ctx, width)
            if self.config.csc:
                ctx = ctx.unsqueeze(0).repeat(self.n_cls, 1, 1)  # (n_cls, n_ctx, width)
        else:
            shape = (self.n_cls, n_ctx, width) if self.config.csc else (n_ctx, width)
            ctx = torch.empty(shape, device=device).normal_(std=0.02)
        self.ctx = nn.Parameter(ctx)

        # Derived tensors: non-persistent, so a saved learner holds only ctx.
        self.register_buffer("tokens", tokens, persistent=False)  # (n_cls, context_length)
        self.register_buffer("token_prefix", embedding[:, :1, :].clone(), persistent=False)  # (n_cls, 1, width)
        self.register_buffer(
            "token_suffix", embedding[:, 1 + n_ctx : length, :].clone(), persistent=False
        )  # (n_cls, length - 1 - n_ctx, width): class tokens, ".", EOT
        self.register_buffer("eot_idx", eot, persistent=False)  # (n_cls,)
        order = torch.stack([self._order(nl, length) for nl in name_lens]).to(device)  # (n_cls, length)
        self.register_buffer("order", order, persistent=False)
        self.length = length

        # Packed pass (with split attention) for open_clip's standard causal blocks; otherwise
        # open_clip's own transformer on the cut prompts.
        self.packed = self.tower.attn_mask is not None and _split_attention_supported(self.tower.transformer)
        position = self.config.class_token_position
        shared = 1 + context_before_name(position, n_ctx)
        # Positions computed once for all classes (0: none, every class runs its whole prompt).
        self.n_shared = shared if self.packed and not self.config.csc and shared < int(eot.min()) + 1 else 0

    def _order(self, name_len: int, length: int) -> torch.Tensor:
        """Positions, in prompt order, of ``cat([SOS, ctx, class tokens, rest])`` (the "end" layout)."""
        return torch.tensor(prompt_order(self.config.class_token_position, self.n_ctx, name_len, length),
                            dtype=torch.long)

    def prompts(self, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Prompt embeddings ``(k, length, width)`` for the classes ``idx`` (all by default)."""
        if idx is None:
            idx = torch.arange(self.n_cls, device=self.ctx.device)
        ctx = self.ctx.to(self.token_prefix.dtype)
        ctx = ctx[idx] if self.config.csc else ctx.unsqueeze(0).expand(len(idx), -1, -1)  # (k, n_ctx, width)
        end_layout = torch.cat([self.token_prefix[idx], ctx, self.token_suffix[idx]], dim=1)  # (k, length, width)
        if self.config.class_token_position == "end":
            return end_layout
        order = self.order[idx].unsqueeze(-1).expand(-1, -1, end_layout.shape[-1])  # (k, length, width)
        return torch.gather(end_layout, 1, order)

    def _plain(self, prompts: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Text tower over cut prompts ``(k, L, width) -> (k, embed_dim)`` (unnormalised)."""
        t = self.tower
        n = prompts.shape[1]
        x = prompts + t.positional_embedding[:n].to(prompts.dtype)
        mask = t.attn_mask[:n, :n] if t.attn_mask is not None else None
        x = t.transformer(x, attn_mask=mask)  # (k, L, width)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # (k, width)
        return t.project(x)

    def _shared_pass(self) -> list[torch.Tensor]:
        """Run the shared positions (SOS + leading context) once; keys and values per layer."""
        t = self.tower
        p = self.n_shared
        x = self.prompts(torch.zeros(1, dtype=torch.long, device=self.ctx.device))[:, :p]  # (1, p, width)
        x = x + t.positional_embedding[:p].to(x.dtype)
        mask = _causal_mask(p, p, x.device)
        kv: list[torch.Tensor] = []
        for blk in t.transformer.resblocks:
            q, k, v = _qkv(blk, blk.ln_1(x))  # each (1, heads, p, hd)
            kv += [k, v]
            x = _finish_block(blk, x, _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        return kv

    def _packed_pass(self, groups: Sequence[torch.Tensor], *kv: torch.Tensor) -> torch.Tensor:
        """Positions ``n_shared..EOT`` of the classes in ``groups`` (each of one prompt length).

        The rows of all groups are packed into one ``(rows, width)`` matrix for the token-wise
        layers; attention runs per group (``(k, heads, s, hd)``), over the shared keys and values
        ``kv`` (one pair per layer; none when ``n_shared == 0``) followed by the group's own.
        Returns unnormalised features ``(classes, embed_dim)`` in the order of ``groups``.
        """
        t = self.tower
        p = self.n_shared
        blocks = list(t.transformer.resblocks)
        spans = []  # (first row, classes, length) per group
        rows, parts = 0, []
        for idx in groups:
            s = int(self.eot_idx[idx[0]]) + 1 - p
            x = self.prompts(idx)[:, p : p + s] + t.positional_embedding[p : p + s].to(self.token_prefix.dtype)
            parts.append(x.reshape(-1, x.shape[-1]))  # (k * s, width)
            spans.append((rows, len(idx), s))
            rows += len(idx) * s
        x = torch.cat(parts)  # (rows, width)
        eot_rows = torch.cat([torch.arange(k, device=x.device) * s + (r0 + s - 1) for r0, k, s in spans])
        masks = {s: _causal_mask(s, p + s, x.device) for _, _, s in spans}
        for i, blk in enumerate(blocks):
            attn = blk.attn
            heads, d = attn.num_heads, x.shape[-1]
            qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (rows, 3 * width)
            outs = []
            for r0, k_cls, s in spans:
                q, k, v = qkv[r0 : r0 + k_cls * s].view(k_cls, s, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
                if kv:  # prepend the shared keys/values: (k, heads, p + s, hd)
                    k = torch.cat([kv[2 * i].expand(k_cls, -1, -1, -1), k], dim=2)
                    v = torch.cat([kv[2 * i + 1].expand(k_cls, -1, -1, -1), v], dim=2)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[s])  # (k, heads, s, hd)
                outs.append(_merge_heads(o).reshape(k_cls * s, d))
            a = torch.cat(outs)  # (rows, width)
            if i == len(blocks) - 1:  # only the EOT rows are read after the last block
                x, a = x[eot_rows], a[eot_rows]
            x = _finish_block(blk, x, a)
        return t.project(x)  # (classes, embed_dim)

    def _plain_chunk(self, idx: torch.Tensor) -> torch.Tensor:
        eot = self.eot_idx[idx]
        prompts = self.prompts(idx)
        if self.tower.attn_mask is not None:
            prompts = prompts[:, : int(eot.max()) + 1]  # (k, L, width)
        return self._plain(prompts, eot)

    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features ``(n_classes, embed_dim)``, differentiable w.r.t. ``ctx``."""
        kv = self._shared_pass() if self.n_shared else []
        ckpt = torch.is_grad_enabled() and self.n_cls > self.text_chunk_size
        out, order = [], []
        for chunk in self._chunks():
            if self.packed:
                fn, args = self._packed_pass, (chunk, *kv)
            else:
                fn, args = self._plain_chunk, (chunk[0],)
            out.append(checkpoint(fn, *args, use_reentrant=False) if ckpt else fn(*args))
            order += chunk
        feats = torch.cat(out).float()  # (n_cls, embed_dim), in chunk order
        feats = torch.empty_like(feats).index_copy(0, torch.cat(order), feats)  # back to class order
        return F.normalize(feats, dim=-1)

    def _chunks(self) -> list[list[torch.Tensor]]:
        """Chunks of at most ``text_chunk_size`` classes, each a list of equal-length groups.

        Packed towers take several length groups per chunk; the plain path takes one group.
        """
        if self.tower.attn_mask is None:  # no causal mask: every position matters, no cutting
            lengths = torch.zeros_like(self.eot_idx)
        else:
            lengths = self.eot_idx
        by_length = torch.argsort(lengths, stable=True)
        chunks = []
        for chunk in torch.split(by_length, self.text_chunk_size):
            ln = lengths[chunk]
            groups = [chunk[ln == v] for v in torch.unique(ln)]
            chunks += [groups] if self.packed else [[g] for g in groups]
        return chunks

    @property
    def use_shared_prefix(self) -> bool:
        """Whether the shared SOS + context positions run once for all classes (unified context)."""
        return self.n_shared > 0

    forward = text_features


def reference_text_features(learner: PromptLearner) -> torch.Tensor:
    """The plain computation: every class's full-length prompt through open_clip's own text tower.

    No cutting, no shared prefix, no chunks: the prompt embeddings are placed into the full
    context, passed through ``transformer`` with the model's full causal mask, and pooled with
    open_clip's ``text_global_pool``. Tests and benchmarks compare :meth:`PromptLearner.text_features`
    with this.
    """
    from open_clip.transformer import text_global_pool

    t = learner.tower
    full_len = learner.tokens.shape[1]
    emb = t.token_embedding(learner.tokens).to(t.cast_dtype)  # (n_cls, context_length, width)
    cut = learner.prompts()  # (n_cls, length, width)
    x = torch.cat([cut, emb[:, learner.length :]], dim=1)  # (n_cls, context_length, width)
    assert x.shape[1] == full_len
    x = x + t.positional_embedding.to(x.dtype)
    x = t.transformer(x, attn_mask=t.attn_mask)
    x = t.ln_final(x)
    x = text_global_pool(x, learner.tokens, "argmax")  # (n_cls, width)
    if t.text_projection is not None:
        x = t.text_projection(x) if isinstance(t.text_projection, nn.Module) else x @ t.text_projection
    return F.normalize(x.float(), dim=-1)
