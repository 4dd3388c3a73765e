"""What coopkit needs to know of any tokenizer's rows: where the text sits, and the end token."""

from __future__ import annotations

from typing import Any, Optional


def is_clip_bpe(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` is CLIP's BPE tokenizer (``encode`` plus start and end token ids),
    this class or open_clip's ``SimpleTokenizer``."""
    return all(hasattr(tokenizer, a) for a in ("encode", "sot_token_id", "eot_token_id"))


def token_layout(tokenizer: Any) -> tuple[int, int, int]:
    """``(n_prefix, n_suffix, end_id)`` of a tokenizer's rows: special tokens before the text
    (CLIP's start token, BERT's ``[CLS]``, ...), special tokens after it, and the id of the first
    token after the text (CLIP's end token, ``</s>``, or the padding id where nothing is added).

    Works for :class:`ClipTokenizer`, open_clip's ``SimpleTokenizer`` and :class:`HFTokenizer`.

    Raises:
        ValueError: a tokenizer of another kind.
    """
    if all(hasattr(tokenizer, a) for a in ("n_prefix", "n_suffix", "end_id")):  # HFTokenizer (or a wrapper)
        return int(tokenizer.n_prefix), int(tokenizer.n_suffix), int(tokenizer.end_id)
    if is_clip_bpe(tokenizer):
        return 1, 1, int(tokenizer.eot_token_id)
    raise ValueError(
        f"unsupported tokenizer {type(tokenizer).__name__}: coopkit runs CLIP's BPE and Hugging Face "
        "tokenizers (tokenizer.json)"
    )


def dot_token_id(tokenizer: Any, dot: str = ".") -> Optional[int]:
    """The id of ``dot`` as it follows a word (CoOp's prompt ends with it), or ``None`` where it
    merges with the word or the tokenizer's cleaning removes it (SigLIP's canonicalisation)."""
    word = tokenizer.encode("x")
    both = tokenizer.encode("x" + dot)
    if len(both) == len(word) + 1 and list(both[: len(word)]) == list(word):
        return int(both[-1])
    return None
