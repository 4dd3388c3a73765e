"""CLIP's byte-level BPE tokenizer in pure Python and numpy (no torch, no open_clip).

A copy of open_clip's ``SimpleTokenizer`` with ``clean="lower"`` (what ``open_clip.tokenize``
uses), built from the same vocabulary file (``bpe_simple_vocab_16e6.txt.gz``, shipped in
:mod:`coopkit.runtime`). Two dependencies of the original are optional here:

* ``ftfy`` (text repair): see :mod:`~coopkit.runtime.tokenizers.cleaning`.
* ``regex`` (for ``\\p{L}``/``\\p{N}`` in the split pattern) is never needed: the pattern is
  applied by a small scanner over :func:`unicodedata.category`, which agrees with ``regex`` on
  every code point assigned in the Unicode version of this Python's ``unicodedata``.
"""

from __future__ import annotations

import gzip
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from .cleaning import clean_text

#: The vocabulary file, shipped in the runtime package (beside this folder).
VOCAB_FILE = Path(__file__).parent.parent / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_NAME = "clip_bpe_49408"
DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after "'", in the order of open_clip's pattern


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """open_clip's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# --- pre-tokenisation: open_clip's regex, without the regex package -----------------------------


@lru_cache(maxsize=65536)
def char_class(ch: str) -> str:
    """``L`` (\\p{L}), ``N`` (\\p{N}), ``S`` (\\s) or ``O`` (anything else)."""
    if ch.isspace() and ch not in "\x1c\x1d\x1e\x1f":  # str.isspace() also counts these separators
        return "S"
    cat = unicodedata.category(ch)[0]
    return cat if cat in ("L", "N") else "O"


def _fold(ch: str) -> str:
    # the pattern is case-insensitive (simple case folding); the text is already lower-cased,
    # so only the long s, which folds to "s" but is its own lower case, still differs
    return "s" if ch == "\u017f" else ch.lower()


def _match_ci(text: str, pos: int, literal: str) -> bool:
    end = pos + len(literal)
    return end <= len(text) and all(_fold(a) == b for a, b in zip(text[pos:end], literal))


def split_words(text: str) -> list[str]:
    """``re.findall`` of open_clip's pattern
    ``<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
    (case-insensitive) on ``text``."""
    words: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "<":
            special = next((t for t in (SOT_TOKEN, EOT_TOKEN) if _match_ci(text, i, t)), None)
            if special is not None:
                words.append(text[i : i + len(special)])
                i += len(special)
                continue
        if ch == "'":
            c = next((c for c in _CONTRACTIONS if _match_ci(text, i + 1, c)), None)
            if c is not None:
                words.append(text[i : i + 1 + len(c)])
                i += 1 + len(c)
                continue
        kind = char_class(ch)
        if kind == "S":
            i += 1
            continue
        if kind == "N":
            words.append(ch)
            i += 1
            continue
        j = i + 1
        while j < n and char_class(text[j]) == kind:  # a run of letters, or of "other" characters
            j += 1
        words.append(text[i:j])
        i = j
    return words


# --- byte-pair encoding ------------------------------------------------------------------------


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:]))


class ClipTokenizer:
    """CLIP's BPE tokeniser: text -> int64 token ids, identical to ``open_clip.tokenize``.

    Args:
        vocab_file: The gzipped merges file (defaults to the one shipped with coopkit).
        context_length: Length of each row of token ids.
    """

    def __init__(self, vocab_file: Union[str, Path, None] = None, context_length: int = DEFAULT_CONTEXT_LENGTH):
        path = Path(vocab_file) if vocab_file is not None else VOCAB_FILE
        if not path.is_file():
            raise RuntimeError(
                f"CLIP vocabulary file not found: {path} (it should ship inside coopkit.runtime; reinstall coopkit)"
            )
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        merges_text = gzip.open(path).read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges_text[1 : 49152 - 256 - 2 + 1]]
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, ...], int] = {m: i for i, m in enumerate(merges)}
        self._cache: dict[str, str] = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        self._byte_encoder = bytes_to_unicode()
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self.vocab_size = len(self.encoder)
        self.context_length = int(context_length)

    def bpe(self, token: str) -> str:
        """Merge the characters of one pre-token; returns space-separated BPE symbols."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word: tuple[str, ...] = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        result = " ".join(word)
        if len(self._cache) < 100_000:  # bounded: a server may tokenise arbitrary text
            self._cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the start/end tokens."""
        ids: list[int] = []
        for word in split_words(clean_text(text)):
            chars = "".join(self._byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(chars).split(" "))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids (special tokens included verbatim), as open_clip decodes it."""
        byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: Union[str, list[str]], context_length: Optional[int] = None) -> np.ndarray:
        """Tokenise to an int64 array ``(len(texts), context_length)``: start token, text, end
        token, zero padding; too-long texts are cut and end with the end token (as open_clip)."""
        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        out = np.zeros((len(texts), length), dtype=np.int64)  # (n, context_length)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = ids
        return out


@lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """The shared tokeniser (the vocabulary is read once per process)."""
    return ClipTokenizer()
