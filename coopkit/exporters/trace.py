"""Tracing torch modules into ONNX (the TorchScript exporter), with export-friendly ops.

:func:`trace` writes a module to a file; :func:`export_friendly` swaps, while tracing, the
forwards that trace into slow graphs (``nn.MultiheadAttention``, a ViT's patch convolution)
for plain-op versions with the same results. Every file traced here is verified afterwards
against the unpatched module (:mod:`coopkit.exporters.verify`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def _exporting() -> Iterator[None]:
    """No grad, MultiheadAttention's fused fast path off, tracer chatter to the debug log."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        seen = sorted({str(w.message).splitlines()[0][:160] for w in caught})
        for message in seen:
            logger.debug("exporter warning: %s", message)
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def trace(module: nn.Module, example: torch.Tensor, path: Path, opset: int,
          input_name: str, output_names: Sequence[str], batch_axis: str, fused_attention: bool = False) -> None:
    """Trace ``module`` on ``example`` into ``path`` (batch axis dynamic on the input and every output);
    ``fused_attention``: unmasked self-attention as onnxruntime's ``Attention`` operator."""
    module.eval()
    dynamic = {input_name: {0: batch_axis}, **{name: {0: batch_axis} for name in output_names}}
    with _exporting(), export_friendly(module, fused_attention):
        torch.onnx.export(
            module,
            (example,),
            os.fspath(path),
            dynamo=False,
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_axes=dynamic,
            opset_version=opset,
            do_constant_folding=True,
        )


def example_tensor(images: np.ndarray, module: nn.Module) -> torch.Tensor:
    """A uint8 example batch on the module's device."""
    device = next(module.parameters()).device
    return torch.from_numpy(np.ascontiguousarray(images)).to(device)


class _FusedAttention(torch.autograd.Function):
    """Self-attention without mask, q/k/v projected by ``x @ weight + bias`` (``weight``: (d, 3d)),
    out projection not included; traced as one ``com.microsoft`` ``Attention`` node (onnxruntime's
    contrib operator, which OpenVINO reads too; scale 1/sqrt(head size), as here)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = ((x @ weight + bias).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)

    @staticmethod
    def symbolic(g: object, x: object, weight: object, bias: object, heads: int) -> object:
        return g.op("com.microsoft::Attention", x, weight, bias, num_heads_i=heads)  # type: ignore[attr-defined]


def _plain_attention_forward(mha: nn.MultiheadAttention, fused: bool = False):
    """A forward for ``mha`` (self-attention, additive float mask or none) written as plain ops.

    nn.MultiheadAttention traces into a graph full of layout Transposes and Gathers (its
    internal ``(seq, batch)`` layout); this version keeps ``(batch, heads, seq, dim)`` and
    projects q, k and v with three products (the packed weight cut in three when traced) rather
    than one product and a Split, which OpenVINO runs with a slow reference kernel: bitwise the
    same answers, and OpenVINO runs a 64-pixel ViT's int8 file 1.14-1.17x faster at batch 32
    (fp32 and ViT-B-32 1.01-1.05x). Anything it does not cover
    (cross-attention, padding or boolean masks, ``need_weights``) goes to the original forward.
    With ``fused``, unmasked self-attention with a bias is one ``Attention`` node instead
    (:class:`_FusedAttention`), followed by the out projection.
    """
    original = mha.forward
    heads = mha.num_heads
    scale = float(mha.head_dim) ** -0.5
    fuse = fused and mha.in_proj_bias is not None

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if (query is not key or key is not value or key_padding_mask is not None or need_weights or is_causal
                or (attn_mask is not None and attn_mask.dtype == torch.bool)):
            return original(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        x = query if mha.batch_first else query.transpose(0, 1)  # (b, n, d)
        if fuse and attn_mask is None:
            out = mha.out_proj(_FusedAttention.apply(x, mha.in_proj_weight.t(), mha.in_proj_bias, heads))
            return (out if mha.batch_first else out.transpose(0, 1)), None
        b, d = x.shape[0], x.shape[2]
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        q, k, v = (F.linear(x, w, bias) for w, bias in zip(mha.in_proj_weight.chunk(3), biases))  # each (b, n, d)
        q = q.reshape(b, -1, heads, d // heads).transpose(1, 2) * scale  # (b, h, n, hd)
        k = k.reshape(b, -1, heads, d // heads).permute(0, 2, 3, 1)  # (b, h, hd, n)
        v = v.reshape(b, -1, heads, d // heads).transpose(1, 2)  # (b, h, n, hd)
        scores = q @ k  # (b, h, n, n)
        if attn_mask is not None:  # (n, n), or per sequence and head (b * h, n, n) as CoCa's padding mask
            scores = scores + (attn_mask.view(b, heads, *attn_mask.shape[1:]) if attn_mask.dim() == 3 else attn_mask)
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, -1, d)  # (b, n, d)
        out = mha.out_proj(out)
        return (out if mha.batch_first else out.transpose(0, 1)), None

    return forward


def _patchify_forward(conv: nn.Conv2d):
    """A forward for a patch-embedding conv (kernel == stride, no padding) as reshape + MatMul.

    Same result; onnxruntime's Conv is slow for 32x32 kernels, and a MatMul is what int8
    dynamic quantisation speeds up.
    """
    kh, kw = conv.kernel_size
    weight = conv.weight  # (out, in, kh, kw)

    def forward(x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        gh, gw = h // kh, w // kw
        patches = x.reshape(b, c, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * kh * kw)
        y = patches @ weight.reshape(weight.shape[0], -1).T  # (b, gh * gw, out)
        if conv.bias is not None:
            y = y + conv.bias
        return y.transpose(1, 2).reshape(b, -1, gh, gw)  # (b, out, gh, gw), as the conv returns

    return forward


def _is_patch_conv(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == m.stride and m.kernel_size != (1, 1)
            and m.padding == (0, 0) and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


@contextlib.contextmanager
def export_friendly(module: nn.Module, fused_attention: bool = False) -> Iterator[None]:
    """While tracing, write ops that trace into fast ONNX graphs; the results stay the same.

    Every fused-weight nn.MultiheadAttention runs as plain ops (unmasked self-attention as one
    ``Attention`` node with ``fused_attention``), and patch-embedding convs (kernel == stride,
    e.g. a ViT's ``conv1``) as reshape + MatMul. The export verification compares the file with
    the unpatched PyTorch module afterwards.
    """
    patched = []
    for m in module.modules():
        if isinstance(m, nn.MultiheadAttention) and m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn:
            patched.append((m, _plain_attention_forward(m, fused_attention)))
        elif _is_patch_conv(m):
            patched.append((m, _patchify_forward(m)))
    for m, forward in patched:
        m.forward = forward  # instance attribute: shadows the class method
    try:
        yield
    finally:
        for m, _ in patched:
            del m.forward
