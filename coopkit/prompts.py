"""CoOp's prompt learner and the text-tower pass with learned context (nn.Modules only: no I/O).

A prompt is ``[prefix] + context + class tokens + "." + [end]`` (class tokens at the end, in the
middle after M/2 context vectors, or at the front), run through the model's own text tower.
``prefix`` is whatever the tokenizer puts before the text (CLIP's start token, BERT's
``[CLS]``, ``<s>``; nothing for SigLIP or mT5), so the context goes where CoOp puts it.

Every open_clip text tower is reached through a :class:`TextTower` adapter:

* :class:`ClipTower`: open_clip's own text transformer (CLIP, SigLIP / SigLIP 2, CLIPA,
  MetaCLIP 2, CoCa, EVA, PE, MobileCLIP, ...), causal or not, pooled at the EOT token
  (``argmax``), at an end token by id (``eos``), at the ``first`` or ``last`` position, or at
  an appended CLS embedding (CoCa's ``embed_cls``, with its padding mask);
* :class:`HFTower`: Hugging Face text towers (RoBERTa, XLM-R, mT5, NLLB), fed through their
  input embeddings (``inputs_embeds``) with the padding mask open_clip gives them.

Where the tower is causal and pooled at the end token (:attr:`TextTower.exact_cut`), three
computations here are exact rewrites of the plain full-length pass, not approximations
(``tests/test_prompts.py`` and ``tests/test_families.py`` check them):

* prompts are cut after their end token, classes grouped by prompt length so that no
  group carries padding: the causal mask makes later positions irrelevant to its features;
* with unified context, the positions before the first class token (prefix and the leading
  context vectors) are the same for every class and attend only to each other, so they go
  through each layer once, and every class reuses their keys and values;
* the rows of all length groups are packed into one matrix for the token-wise layers (one
  large matmul instead of one small one per group; attention stays per group), and the last
  block runs its output projection and MLP on the end-token rows only, the only ones read.

With a per-image shift of the context (CoCoOp's meta-net, :meth:`PromptLearner.text_features`
``shift=``), the same passes run over images x classes at once: each image's shared positions
run once for all classes, and the packed rows carry a leading image dimension.

Other towers (non-causal ones attend to their padding; CoCa's CLS sees the whole row) run the
plain full-length pass. Large label sets go through the tower in chunks, with activation
checkpointing when gradients are needed, so memory stays bounded.
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
from .runtime.contract import (
    PLACEHOLDER,
    PROMPT_SUFFIX,
    check_classnames,
    context_before_name,
    name_length,
    prompt_name,
    prompt_order,
)
from .runtime.tokenizers.layout import dot_token_id, token_layout

if TYPE_CHECKING:
    from .backbone import Backbone

#: open_clip pool types CoOp can read a class feature from.
POOL_TYPES = ("argmax", "eos", "first", "last")


class TextTower:
    """A view of an open_clip model's text tower, as CoOp uses it (not a module: nothing is owned).

    :meth:`embed` gives token embeddings, :meth:`encode` runs the tower on prompt embeddings
    exactly as the model's ``encode_text`` runs on its own, so learned context can stand
    where word embeddings were. Build one with :meth:`of`.
    """

    #: Positions after the pooled token cannot change its features (a causal tower pooled at its
    #: end token, no appended CLS): prompts may be cut there, and the fast paths apply.
    exact_cut: bool = False
    #: ``clip`` (open_clip's text transformer) or ``hf`` (a Hugging Face tower).
    kind: str = ""

    @staticmethod
    def of(model: nn.Module) -> "TextTower":
        """The text tower of an open_clip ``CLIP``, ``CustomTextCLIP`` or ``CoCa``."""
        src = getattr(model, "text", None)
        if src is not None and all(hasattr(src, a) for a in ("transformer", "pooler", "proj", "config")):
            return HFTower.of(src)
        if src is not None and hasattr(src, "token_embedding"):
            return ClipTower.of(src)
        if hasattr(model, "token_embedding") and hasattr(model, "transformer"):
            return ClipTower.of(model)
        raise ValueError(
            f"{type(model).__name__} has no text tower coopkit knows (open_clip's text transformer or a "
            "Hugging Face text encoder); CoOp needs one"
        )

    #: The module that owns the tower's weights (the model, or its ``text``).
    source: nn.Module

    @property
    def parts(self) -> list[nn.Module]:
        """The modules the tower runs (an export graph registers them, so they move with it)."""
        return [self.source]

    @property
    def device(self) -> torch.device:
        return next(self.parts[0].parameters()).device

    @property
    def width(self) -> int:
        raise NotImplementedError

    @property
    def cast_dtype(self) -> torch.dtype:
        raise NotImplementedError

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``(n, L) -> (n, L, width)`` in the tower's compute dtype."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Text features ``(n, embed_dim)`` (unnormalised) of prompt embeddings ``x (n, L, width)``
        standing for the token ids ``tokens (n, L)`` (their padding and pooling position)."""
        raise NotImplementedError

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the pooled token of each row ``(n,)`` (towers with :attr:`exact_cut`)."""
        raise NotImplementedError


@dataclass
class ClipTower(TextTower):
    """open_clip's text transformer, in a ``CLIP`` (attributes on the model) or as ``model.text``."""

    source: nn.Module
    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Any
    attn_mask: Optional[torch.Tensor]
    pool_type: str
    eos_id: Optional[int]
    context_length: int
    cls_emb: Optional[torch.Tensor] = None
    pad_mask: bool = False
    kind: str = "clip"

    @classmethod
    def of(cls, src: nn.Module) -> "ClipTower":
        is_text = hasattr(src, "pool_type")  # a TextTransformer; a CLIP carries text_pool_type
        pool = src.pool_type if is_text else getattr(src, "text_pool_type", "argmax")
        if pool not in POOL_TYPES:
            raise ValueError(f"text pool type {pool!r} gives no single text feature; CoOp reads one of {POOL_TYPES}")
        cls_emb = getattr(src, "cls_emb", None) if is_text else None
        tower = cls(
            source=src,
            token_embedding=src.token_embedding,
            positional_embedding=src.positional_embedding,
            transformer=src.transformer,
            ln_final=src.ln_final,
            text_projection=src.text_projection,
            attn_mask=getattr(src, "attn_mask", None),
            pool_type=pool,
            eos_id=getattr(src, "eos_id" if is_text else "text_eos_id", None),
            context_length=int(src.positional_embedding.shape[0]) - (cls_emb is not None),
            cls_emb=cls_emb,
            pad_mask=bool(is_text and (cls_emb is not None or getattr(src, "use_pad_mask", False))),
        )
        tower.exact_cut = tower.attn_mask is not None and cls_emb is None and pool in ("argmax", "eos")
        return tower

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    @property
    def cast_dtype(self) -> torch.dtype:
        get = getattr(self.transformer, "get_cast_dtype", None)
        return get() if get is not None else self.token_embedding.weight.dtype

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens).to(self.cast_dtype)

    def pool_index(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)  # the end token has the largest id

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and text projection of pooled features ``(n, width) -> (n, embed_dim)``."""
        return self._projection(self.ln_final(x))

    def _projection(self, x: torch.Tensor) -> torch.Tensor:
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Module):
            return self.text_projection(x)
        return x @ self.text_projection

    def run_blocks(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor], deep: Sequence[torch.Tensor] = (),
                   at: int = 0) -> torch.Tensor:
        """The transformer's blocks over ``x (k, n, width)``; ``deep[i] (m, width)`` replaces positions
        ``at .. at + m`` before block ``i + 1`` (the deep text prompts of IVLP, MaPLe and PromptSRC, as
        their official ``ResidualAttentionBlock``s drop the previous layer's prompt outputs)."""
        if not len(deep):
            return self.transformer(x, attn_mask=attn_mask)
        for i, blk in enumerate(self.transformer.resblocks):
            if 1 <= i <= len(deep):
                d = deep[i - 1]
                x = torch.cat([x[:, :at], d.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1),
                               x[:, at + d.shape[0] :]], dim=1)  # (k, n, width)
            x = run_block(blk, x, attn_mask)
        return x

    def encode(self, x: torch.Tensor, tokens: torch.Tensor, deep: Sequence[torch.Tensor] = (),
               at: int = 0) -> torch.Tensor:
        """:meth:`TextTower.encode`; ``deep`` and ``at``: deep text prompts, see :meth:`run_blocks`."""
        from open_clip.transformer import text_global_pool

        n = x.shape[1]
        if self.cls_emb is not None:  # CoCa: a CLS embedding appended after the whole row
            cls_row = self.cls_emb.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)  # (k, 1, width)
            x = torch.cat([x, cls_row], dim=1)  # (k, n + 1, width)
            n += 1
        mask = self.attn_mask[:n, :n] if self.attn_mask is not None else None
        if self.pad_mask:  # open_clip's own padding (and CLS) mask: (k * heads, n, n)
            extra = self.source._build_additive_mask(tokens, n, x.dtype)
            mask = extra if mask is None else mask.unsqueeze(0) + extra
        x = x + self.positional_embedding[:n].to(x.dtype)
        x = self.run_blocks(x, mask, deep, at)  # (k, n, width)
        if self.cls_emb is not None:
            return self._projection(self.ln_final(x[:, -1]))  # CoCa pools the CLS, LayerNorm after
        pooled = text_global_pool(self.ln_final(x), tokens, self.pool_type, eos_token_id=self.eos_id)
        return self._projection(pooled)


@dataclass
class HFTower(TextTower):
    """A Hugging Face text encoder in an open_clip ``CustomTextCLIP`` (``HFTextEncoder``)."""

    source: nn.Module
    embeddings: nn.Module
    pad_id: int
    kind: str = "hf"

    @classmethod
    def of(cls, src: nn.Module) -> "HFTower":
        pad = getattr(src.config, "pad_token_id", None)
        if pad is None:
            raise ValueError(f"the Hugging Face text tower {type(src.transformer).__name__} has no pad_token_id")
        return cls(source=src, embeddings=src.transformer.get_input_embeddings(), pad_id=int(pad))

    @property
    def width(self) -> int:
        return int(self.embeddings.weight.shape[1])

    @property
    def cast_dtype(self) -> torch.dtype:
        return self.embeddings.weight.dtype

    @property
    def context_length(self) -> int:
        return int(getattr(self.source, "context_length", 0) or 0)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embeddings(tokens)  # (n, L, width), scaled where the model scales them (NLLB)

    def encode(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        src = self.source
        mask = (tokens != self.pad_id).long()  # (n, L): as HFTextEncoder.forward
        out = src.transformer(inputs_embeds=x, attention_mask=mask)
        return src.proj(src.pooler(out, mask))


def _causal_mask(n_query: int, n_key: int, device: torch.device) -> torch.Tensor:
    """Boolean mask ``(n_query, n_key)``: query i sees keys up to ``n_key - n_query + i``."""
    q = torch.arange(n_query, device=device).unsqueeze(1)
    k = torch.arange(n_key, device=device).unsqueeze(0)
    return k <= q + (n_key - n_query)


def _plain_block(blk: nn.Module) -> bool:
    """Whether ``blk`` is open_clip's plain ``ResidualAttentionBlock`` (self-attention, packed q/k/v)."""
    attn = getattr(blk, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
        return False
    if not all(hasattr(blk, n) for n in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")) or hasattr(blk, "ln_1_kv"):
        return False
    return type(blk).__name__ == "ResidualAttentionBlock"


def _split_attention_supported(transformer: nn.Module) -> bool:
    blocks = getattr(transformer, "resblocks", None)
    return bool(blocks) and all(_plain_block(blk) for blk in blocks)


def run_block(blk: nn.Module, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``blk(x, attn_mask=attn_mask)`` for a batch-first ``x (b, n, width)``, faster where gradients flow.

    While autograd records, a plain open_clip block runs its attention sequence-first (the layout
    ``nn.MultiheadAttention`` computes in; OpenAI's CLIP and the official prompt-learning code run
    it so): the same operations as the block's own forward, without the batch-first module's
    layout copies (its input projection on a transposed view): forward and backward through
    ViT-B-16's 12 blocks at batch 4 took 2.7 s instead of 4.3 s on one CPU thread. Without
    gradients (and for other blocks) the block's own forward runs, with PyTorch's fused
    inference path.
    """
    if not torch.is_grad_enabled() or not _plain_block(blk):
        return blk(x, attn_mask=attn_mask)
    attn = blk.attn
    h = blk.ln_1(x).transpose(0, 1).contiguous()  # (n, b, width), laid out sequence-first
    mask = attn_mask.to(h.dtype) if attn_mask is not None else None
    a = F.multi_head_attention_forward(
        h, h, h, attn.embed_dim, attn.num_heads, attn.in_proj_weight, attn.in_proj_bias, attn.bias_k, attn.bias_v,
        attn.add_zero_attn, attn.dropout, attn.out_proj.weight, attn.out_proj.bias, training=attn.training,
        need_weights=False, attn_mask=mask)[0]  # (n, b, width)
    x = x + blk.ls_1(a.transpose(0, 1))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


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
        n_prefix, n_suffix, end_id = token_layout(tokenizer)
        device = self.tower.device
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
            prompt_prefix = " ".join([PLACEHOLDER] * n_ctx)
            init_ids = tokenizer.encode(prompt_prefix)
            if len(init_ids) != n_ctx:
                raise ValueError(
                    f"model {backbone.name!r}: its tokenizer splits the placeholder word {PLACEHOLDER!r} into "
                    f"{len(init_ids) / n_ctx:g} tokens; CoOp needs one token per context vector (give ctx_init words)"
                )
        self.config = config
        self.n_ctx = n_ctx
        self.n_cls = len(names)
        self.n_prefix = n_prefix

        texts = [f"{prompt_prefix} {n}{PROMPT_SUFFIX}" for n in names]
        tokens = torch.as_tensor(tokenizer(texts)).to(device)  # (n_cls, context_length)
        context_length = tokens.shape[1]
        too_long = [c for c, t in zip(self.classnames, texts) if n_prefix + len(tokenizer.encode(t)) + n_suffix > context_length]
        if too_long:
            budget = context_length - n_prefix - n_suffix - n_ctx - len(tokenizer.encode(PROMPT_SUFFIX))
            raise ValueError(
                f"class names {too_long[:3]} need more than the {budget} tokens left by n_ctx={n_ctx} in a "
                f"context of {context_length}; shorten them or lower n_ctx"
            )
        rows = tokens.tolist()
        moved = [c for c, r in zip(self.classnames, rows) if r[n_prefix : n_prefix + n_ctx] != list(init_ids)]
        if moved:
            raise ValueError(
                f"model {backbone.name!r}: its tokenizer merges the context words {prompt_prefix!r} with the class "
                f"names {moved[:3]}, so the context has no fixed place in the prompt"
            )
        dot_id = dot_token_id(tokenizer, PROMPT_SUFFIX)
        name_lens = [name_length(r, n_prefix, n_ctx, end_id, dot_id) for r in rows]
        if self.tower.exact_cut:
            eot = self.tower.pool_index(tokens)  # (n_cls,)
            length = int(eot.max()) + 1
        else:  # every position matters: no cutting
            eot = torch.zeros(self.n_cls, dtype=torch.long, device=device)
            length = context_length
        with torch.no_grad():
            embedding = self.tower.embed(tokens)  # (n_cls, context_length, width)

        width = self.tower.width
        if self.config.ctx_init is not None:
            ctx = embedding[0, n_prefix : n_prefix + n_ctx, :].detach().clone().float()  # (n_ctx, width)
            if self.config.csc:
                ctx = ctx.unsqueeze(0).repeat(self.n_cls, 1, 1)  # (n_cls, n_ctx, width)
        else:
            shape = (self.n_cls, n_ctx, width) if self.config.csc else (n_ctx, width)
            ctx = torch.empty(shape, device=device).normal_(std=0.02)
        self.ctx = nn.Parameter(ctx)

        # Derived tensors: non-persistent, so a saved learner holds only ctx.
        self.register_buffer("tokens", tokens, persistent=False)  # (n_cls, context_length)
        self.register_buffer("token_prefix", embedding[:, :n_prefix, :].clone(), persistent=False)  # (n_cls, p, width)
        self.register_buffer(
            "token_suffix", embedding[:, n_prefix + n_ctx : length, :].clone(), persistent=False
        )  # (n_cls, length - p - n_ctx, width): class tokens, ".", end token
        self.register_buffer("eot_idx", eot, persistent=False)  # (n_cls,): pooled position (exact_cut towers)
        order = torch.stack([self._order(nl, length) for nl in name_lens]).to(device)  # (n_cls, length)
        self.register_buffer("order", order, persistent=False)
        self.length = length

        # Packed pass (with split attention) for open_clip's standard causal blocks; otherwise
        # the tower's own pass, on cut prompts where that is exact.
        self.packed = self.tower.exact_cut and _split_attention_supported(self.tower.transformer)
        position = self.config.class_token_position
        shared = n_prefix + context_before_name(position, n_ctx)
        # Positions computed once for all classes (0: none, every class runs its whole prompt).
        self.n_shared = shared if self.packed and not self.config.csc and 0 < shared < int(eot.min()) + 1 else 0

    def _order(self, name_len: int, length: int) -> torch.Tensor:
        """Positions, in prompt order, of ``cat([prefix, ctx, class tokens, rest])`` (the "end" layout)."""
        return torch.tensor(
            prompt_order(self.config.class_token_position, self.n_ctx, name_len, length, self.n_prefix),
            dtype=torch.long)

    def prompts(self, idx: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Prompt embeddings ``(k, length, width)`` for the classes ``idx`` (all by default).

        With ``shift`` ``(b, width)``, every context vector of image ``i`` is moved by ``shift[i]``
        (CoCoOp's meta-net output): ``(b, k, length, width)``.
        """
        if idx is None:
            idx = torch.arange(self.n_cls, device=self.ctx.device)
        dtype = self.token_prefix.dtype
        ctx = self.ctx.to(dtype)
        ctx = ctx[idx] if self.config.csc else ctx.unsqueeze(0).expand(len(idx), -1, -1)  # (k, n_ctx, width)
        prefix, suffix = self.token_prefix[idx], self.token_suffix[idx]  # (k, p, width), (k, rest, width)
        order = self.order[idx]  # (k, length)
        if shift is not None:
            b = shift.shape[0]
            ctx = ctx.unsqueeze(0) + shift.to(dtype)[:, None, None, :]  # (b, k, n_ctx, width)
            prefix, suffix, order = (t.unsqueeze(0).expand(b, *t.shape) for t in (prefix, suffix, order))
        end_layout = torch.cat([prefix, ctx, suffix], dim=-2)  # ([b,] k, length, width)
        if self.config.class_token_position == "end":
            return end_layout
        return torch.gather(end_layout, -2, order.unsqueeze(-1).expand(*order.shape, end_layout.shape[-1]))

    def _shared_pass(self, shift: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """Run the shared positions (prefix + leading context) once; keys and values per layer,
        each ``(b, heads, p, hd)`` (``b`` images with ``shift``, else 1)."""
        t = self.tower
        p = self.n_shared
        x = self.prompts(torch.zeros(1, dtype=torch.long, device=self.ctx.device), shift)[..., :p, :]  # ([b,] 1, p, w)
        x = x.reshape(-1, p, x.shape[-1]) + t.positional_embedding[:p].to(x.dtype)  # (b, p, width)
        mask = _causal_mask(p, p, x.device)
        kv: list[torch.Tensor] = []
        for blk in t.transformer.resblocks:
            q, k, v = _qkv(blk, blk.ln_1(x))  # each (b, heads, p, hd)
            kv += [k, v]
            x = _finish_block(blk, x, _merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        return kv

    def _packed_pass(self, groups: Sequence[torch.Tensor], shift: Optional[torch.Tensor], *kv: torch.Tensor) -> torch.Tensor:
        """Positions ``n_shared..EOT`` of the classes in ``groups`` (each of one prompt length).

        The rows of all groups are packed into one ``(b, rows, width)`` tensor for the token-wise
        layers (``b``: images with ``shift``, else 1); attention runs per group
        (``(b * k, heads, s, hd)``), over the shared keys and values ``kv`` (one pair per layer,
        ``(b, heads, p, hd)``; none when ``n_shared == 0``) followed by the group's own.
        Returns unnormalised features ``(b, classes, embed_dim)`` in the order of ``groups``.
        Only the batch size is dynamic (a traced graph keeps every other size).
        """
        t = self.tower
        p = self.n_shared
        blocks = list(t.transformer.resblocks)
        spans = []  # (first row, classes, length) per group
        rows, parts = 0, []
        for idx in groups:
            s = int(self.eot_idx[idx[0]]) + 1 - p
            x = self.prompts(idx, shift)[..., p : p + s, :] + t.positional_embedding[p : p + s].to(self.token_prefix.dtype)
            parts.append(x.reshape(-1, len(idx) * s, x.shape[-1]))  # (b, k * s, width)
            spans.append((rows, len(idx), s))
            rows += len(idx) * s
        x = torch.cat(parts, dim=1)  # (b, rows, width)
        eot_rows = torch.cat([torch.arange(k, device=x.device) * s + (r0 + s - 1) for r0, k, s in spans])
        masks = {s: _causal_mask(s, p + s, x.device) for _, _, s in spans}
        for i, blk in enumerate(blocks):
            attn = blk.attn
            heads, d = attn.num_heads, x.shape[-1]
            qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # (b, rows, 3 * width)
            outs = []
            for r0, k_cls, s in spans:
                q, k, v = qkv[:, r0 : r0 + k_cls * s].reshape(-1, s, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
                if kv:  # prepend each image's shared keys/values: (b * k, heads, p + s, hd)
                    shared = [kv[j][:, None].expand(-1, k_cls, -1, -1, -1).flatten(0, 1) for j in (2 * i, 2 * i + 1)]
                    k, v = torch.cat([shared[0], k], dim=2), torch.cat([shared[1], v], dim=2)
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[s])  # (b * k, heads, s, hd)
                outs.append(_merge_heads(o).reshape(-1, k_cls * s, d))  # (b, k * s, width)
            a = torch.cat(outs, dim=1)  # (b, rows, width)
            if i == len(blocks) - 1:  # only the EOT rows are read after the last block
                x, a = x[:, eot_rows], a[:, eot_rows]
            x = _finish_block(blk, x, a)
        return t.project(x)  # (b, classes, embed_dim)

    def _plain_chunk(self, idx: torch.Tensor, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tower's own pass over the prompts of ``idx``, cut after their end token where exact:
        unnormalised features ``(b, k, embed_dim)`` (``b``: images with ``shift``, else 1)."""
        prompts = self.prompts(idx, shift)  # ([b,] k, length, width)
        tokens = self.tokens[idx].unsqueeze(0).expand(prompts.shape[0] if shift is not None else 1, -1, -1)  # (b, k, L)
        prompts, tokens = prompts.reshape(-1, *prompts.shape[-2:]), tokens.reshape(-1, tokens.shape[-1])  # (b * k, ...)
        if self.tower.exact_cut:
            cut = int(self.eot_idx[idx].max()) + 1
            prompts, tokens = prompts[:, :cut], tokens[:, :cut]  # (b * k, cut, width), (b * k, cut)
        feats = self.tower.encode(prompts, tokens)  # (b * k, embed_dim)
        return feats.reshape(-1, len(idx), feats.shape[-1])

    def text_features(self, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalised class text features ``(n_classes, embed_dim)``, differentiable w.r.t. ``ctx``.

        With ``shift`` ``(b, width)`` (CoCoOp's per-image context shift, see :meth:`prompts`), the
        features of every image's prompts: ``(b, n_classes, embed_dim)``, computed for all images
        at once with the same shortcuts (each image's shared positions run once for all classes).
        """
        kv = self._shared_pass(shift) if self.n_shared else []
        ckpt = torch.is_grad_enabled() and self.n_cls > self.text_chunk_size
        out, order = [], []
        for chunk in self.chunks():
            if self.packed:
                fn, args = self._packed_pass, (chunk, shift, *kv)
            else:
                fn, args = self._plain_chunk, (chunk[0], shift)
            out.append(checkpoint(fn, *args, use_reentrant=False) if ckpt else fn(*args))
            order += chunk
        feats = torch.cat(out, dim=1).float()  # (b, n_cls, embed_dim), in chunk order
        feats = torch.empty_like(feats).index_copy(1, torch.cat(order), feats)  # back to class order
        feats = F.normalize(feats, dim=-1)
        return feats if shift is not None else feats[0]

    def chunks(self) -> list[list[torch.Tensor]]:
        """Chunks of at most ``text_chunk_size`` classes, each a list of equal-length groups.

        Packed towers take several length groups per chunk; the plain path takes one group.
        """
        lengths = self.eot_idx  # zeros where every position matters (no cutting)
        by_length = torch.argsort(lengths, stable=True)
        chunks = []
        for chunk in torch.split(by_length, self.text_chunk_size):
            ln = lengths[chunk]
            groups = [chunk[ln == v] for v in torch.unique(ln)]
            chunks += [groups] if self.packed else [[g] for g in groups]
        return chunks

    @property
    def use_shared_prefix(self) -> bool:
        """Whether the shared prefix + context positions run once for all classes (unified context)."""
        return self.n_shared > 0

    forward = text_features


def reference_text_features(learner: PromptLearner) -> torch.Tensor:
    """The plain computation: every class's full-length prompt through the tower's own pass.

    No cutting, no shared prefix, no chunks, no packing: the prompt embeddings are placed into
    the full context (the token embeddings of the padding after them) and passed through
    :meth:`TextTower.encode` with the full token rows. Tests and benchmarks compare
    :meth:`PromptLearner.text_features` with this.
    """
    t = learner.tower
    emb = t.embed(learner.tokens)  # (n_cls, context_length, width)
    x = torch.cat([learner.prompts(), emb[:, learner.length :]], dim=1)  # (n_cls, context_length, width)
    assert x.shape[1] == learner.tokens.shape[1]
    return F.normalize(t.encode(x, learner.tokens).float(), dim=-1)
