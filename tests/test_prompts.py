"""PromptLearner: exactness of the fast paths against the plain full-length computation."""

from __future__ import annotations

import itertools

import pytest
import torch

import coopkit
from coopkit.prompts import PromptLearner, reference_text_features

NAMES = ["cat", "golden retriever", "red_panda", "a rather long multi word class name", "x"]


def _learner(bb, **kw) -> PromptLearner:
    torch.manual_seed(0)
    pl = PromptLearner(bb, NAMES, **kw)
    with torch.no_grad():  # move away from the init so every position matters
        pl.ctx.add_(torch.randn_like(pl.ctx) * 0.3)
    return pl


@pytest.mark.parametrize(
    "csc,position,ctx_init,chunk",
    # chunk 2: several checkpointed chunks; chunk 256: every length group packed into one pass
    [(*v, 2) for v in itertools.product([False, True], ["end", "middle", "front"], [None, "a photo of a"])]
    + [(False, "end", None, 256), (True, "middle", "a photo of a", 256)],
)
def test_text_features_equal_full_length_reference(tiny_backbone, csc, position, ctx_init, chunk):
    pl = _learner(tiny_backbone, n_ctx=6, csc=csc, class_token_position=position, ctx_init=ctx_init,
                  text_chunk_size=chunk)
    assert pl.packed
    if chunk > len(NAMES):
        assert len(pl.chunks()) == 1 and len(pl.chunks()[0]) > 1  # one pass, several length groups
    fast = pl.text_features()
    ref = reference_text_features(pl)
    assert fast.shape == (len(NAMES), tiny_backbone.model.text_projection.shape[1])
    assert pl.length < pl.tokens.shape[1]  # the prompts really were cut
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)
    # Gradients w.r.t. the context agree too (chunks go through activation checkpointing).
    w = torch.randn_like(ref)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), pl.ctx)
    (g_ref,) = torch.autograd.grad((reference_text_features(pl) * w).sum(), pl.ctx)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-4)
    assert g_fast.abs().sum() > 0


def test_unified_context_uses_shared_prefix(tiny_backbone):
    assert _learner(tiny_backbone, n_ctx=4).use_shared_prefix
    assert not _learner(tiny_backbone, n_ctx=4, csc=True).use_shared_prefix


def test_word_init_reproduces_hand_written_prompt(tiny_backbone):
    """Untrained, ctx_init='a photo of a' is exactly open_clip's encode_text of 'a photo of a {name}.'."""
    pl = PromptLearner(tiny_backbone, NAMES, ctx_init="a photo of a")
    assert pl.n_ctx == 4
    tokens = tiny_backbone.tokenizer([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])
    ref = tiny_backbone.model.encode_text(tokens, normalize=True)
    torch.testing.assert_close(pl.text_features().detach(), ref, atol=1e-5, rtol=0)


def test_ctx_shapes_and_only_ctx_is_saved(tiny_backbone):
    width = tiny_backbone.model.token_embedding.weight.shape[1]
    assert PromptLearner(tiny_backbone, NAMES, n_ctx=3).ctx.shape == (3, width)
    csc = PromptLearner(tiny_backbone, NAMES, n_ctx=3, csc=True)
    assert csc.ctx.shape == (len(NAMES), 3, width)
    assert list(csc.state_dict()) == ["ctx"]
    assert [n for n, p in csc.named_parameters() if p.requires_grad] == ["ctx"]


def test_random_init_is_seeded_normal(tiny_backbone):
    torch.manual_seed(3)
    a = PromptLearner(tiny_backbone, NAMES, n_ctx=16).ctx
    torch.manual_seed(3)
    b = PromptLearner(tiny_backbone, NAMES, n_ctx=16).ctx
    assert torch.equal(a, b)
    assert 0.01 < float(a.detach().std()) < 0.03


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_ctx": 0}, "n_ctx must be an integer >= 1"),
        ({"class_token_position": "left"}, "valid: 'end', 'middle', 'front'"),
        ({"ctx_init": "   "}, "ctx_init has no words"),
        ({"ctx_init": "!!! ???"}, None),  # punctuation still tokenises; must not crash
    ],
)
def test_bad_prompt_settings(tiny_backbone, kwargs, match):
    if match is None:
        PromptLearner(tiny_backbone, NAMES, **kwargs)
        return
    with pytest.raises(ValueError, match=match):
        PromptLearner(tiny_backbone, NAMES, **kwargs)


def test_bad_classnames(tiny_backbone):
    with pytest.raises(ValueError, match="duplicate class names"):
        PromptLearner(tiny_backbone, ["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="classnames is empty"):
        PromptLearner(tiny_backbone, [])
    with pytest.raises(ValueError, match="need more than"):
        PromptLearner(tiny_backbone, ["word " * 70], n_ctx=16)


def test_public_name_is_exported():
    assert coopkit.PromptLearner is PromptLearner
