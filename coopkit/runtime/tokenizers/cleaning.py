"""Text cleaning as open_clip's tokenizers do it (``clean="lower"``, ``"canonicalize"``,
``"whitespace"``), shared by CLIP's BPE and the Hugging Face tokenizers.

``ftfy`` (text repair, pure Python) is a dependency of the base install, and every text is
repaired by it exactly as open_clip does. Where it is missing (an install that left it out), a
text is tokenised only if ftfy would leave it unchanged: printable ASCII, tabs and newlines,
without ``&`` (no HTML entity to unescape, no byte that mojibake repair could touch); any other
text is refused with one line naming ftfy, never tokenised differently from training.
"""

from __future__ import annotations

import html
import string
from functools import lru_cache
from typing import Any, Optional

from ..extras import MissingExtraError

#: Characters ftfy leaves as they are in any combination (tested against ftfy): printable
#: ASCII, tab and newline, but not ``&`` (an HTML entity ftfy would unescape, repeatedly).
_UNCHANGED_BY_FTFY = frozenset(chr(c) for c in range(0x20, 0x7F) if chr(c) != "&") | {"\t", "\n"}


@lru_cache(maxsize=1)
def ftfy_module() -> Optional[Any]:
    """The ftfy module, imported when first needed (once), or None where it is not installed
    (``ftfy_module.cache_clear()`` looks again, after an install or in a test that hides it)."""
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy


def _fix_text(text: str) -> str:
    """``ftfy.fix_text(text)``; without ftfy, ``text`` itself where ftfy provably returns it, else a
    :class:`~coopkit.runtime.extras.MissingExtraError` (an environment error)."""
    ftfy = ftfy_module()
    if ftfy is None:
        if all(ch in _UNCHANGED_BY_FTFY for ch in text):
            return text
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise MissingExtraError(
            f"tokenizing {shown!r} exactly as training did needs ftfy (text repair), which is not installed "
            "(pip install ftfy; it is a dependency of coopkit)", name="ftfy")
    return ftfy.fix_text(text)


def _basic_clean(text: str) -> str:
    return html.unescape(html.unescape(_fix_text(text))).strip()


def clean_text(text: str) -> str:
    """open_clip's ``clean="lower"``: repair, unescape HTML twice, collapse whitespace, lower-case."""
    return " ".join(_basic_clean(text).split()).strip().lower()


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def canonicalize_text(text: str) -> str:
    """open_clip's ``clean="canonicalize"`` (SigLIP's, from big_vision): repair, ``_`` to space,
    ASCII punctuation removed, lower-case, whitespace collapsed."""
    text = _basic_clean(text).replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split()).strip()


def whitespace_clean(text: str) -> str:
    """open_clip's ``clean="whitespace"`` (the default of its Hugging Face tokenizers): repair and
    collapse whitespace, case kept."""
    return " ".join(_basic_clean(text).split()).strip()


#: open_clip's text cleaning modes (``tokenizer_kwargs={"clean": ...}`` in a model config).
CLEAN_MODES = {"lower": clean_text, "canonicalize": canonicalize_text, "whitespace": whitespace_clean}


def clean(text: str, mode: str) -> str:
    """Clean ``text`` as open_clip's tokenizers do with ``clean=mode``."""
    if mode not in CLEAN_MODES:
        raise ValueError(f"unknown text cleaning {mode!r}; valid: {', '.join(CLEAN_MODES)}")
    return CLEAN_MODES[mode](text)
