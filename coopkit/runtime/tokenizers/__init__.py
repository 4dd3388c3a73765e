"""Tokenizers without torch: CLIP's byte-level BPE (:mod:`.clip_bpe`, pure Python and numpy) and
the Hugging Face tokenizers other open_clip models use (:mod:`.hf`, through the ``tokenizers``
library, an optional extra), each run exactly as open_clip runs it; the text cleaning they share
(:mod:`.cleaning`) and what coopkit reads of any tokenizer's rows (:mod:`.layout`)."""

from .cleaning import CLEAN_MODES, clean, clean_text
from .clip_bpe import ClipTokenizer, default_tokenizer
from .hf import HF_TOKENIZER_CONFIGS, HF_TOKENIZER_FILE, HFTokenizer
from .layout import dot_token_id, is_clip_bpe, token_layout

__all__ = [
    "ClipTokenizer",
    "HFTokenizer",
    "default_tokenizer",
    "token_layout",
    "is_clip_bpe",
    "dot_token_id",
    "clean",
    "clean_text",
    "CLEAN_MODES",
    "HF_TOKENIZER_FILE",
    "HF_TOKENIZER_CONFIGS",
]
