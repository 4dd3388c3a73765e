"""Tokenisers in pure Python and numpy (no torch, no open_clip): CLIP's byte-level BPE, and
the Hugging Face tokenizers other open_clip models use (SigLIP, CLIPA, MetaCLIP 2, Hugging Face
text towers) run through the ``tokenizers`` library (an optional extra) as open_clip runs them.

A copy of open_clip's ``SimpleTokenizer`` with ``clean="lower"`` (what ``open_clip.tokenize``
uses), built from the same vocabulary file (``bpe_simple_vocab_16e6.txt.gz``, shipped in this
package). Two dependencies of the original are optional here:

* ``ftfy`` (text repair) is used when it is installed. Without it, :func:`_fix_text_lite`
  applies the ftfy steps that matter for class names (HTML entities, Latin ligatures,
  full-width forms, curly quotes, line breaks, control characters, NFC), but it cannot
  repair mojibake ("cafÃ©"), which ftfy would turn into "café".
* ``regex`` (for ``\\p{L}``/``\\p{N}`` in the split pattern) is never needed: the pattern is
  applied by a small scanner over :func:`unicodedata.category`, which agrees with ``regex`` on
  every code point assigned in the Unicode version of this Python's ``unicodedata``.
"""

from __future__ import annotations

import gzip
import html
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
import json
import string
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

#: The vocabulary file, next to this module.
VOCAB_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
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


# --- text cleaning (open_clip's basic_clean + whitespace_clean + lower) -------------------------

_SINGLE_QUOTES = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTES = re.compile("[\u201c-\u201f]")
_ANSI_ESCAPES = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_LINE_BREAKS = re.compile("\r\n|\r|\u2028|\u2029|\u0085")
_LIGATURES = {
    ord("Ĳ"): "IJ", ord("ĳ"): "ij", ord("ŉ"): "ʼn", ord("Ǳ"): "DZ", ord("ǲ"): "Dz", ord("ǳ"): "dz",
    ord("Ǆ"): "DŽ", ord("ǅ"): "Dž", ord("ǆ"): "dž", ord("Ǉ"): "LJ", ord("ǈ"): "Lj", ord("ǉ"): "lj",
    ord("Ǌ"): "NJ", ord("ǋ"): "Nj", ord("ǌ"): "nj", ord("ﬀ"): "ff", ord("ﬁ"): "fi", ord("ﬂ"): "fl",
    ord("ﬃ"): "ffi", ord("ﬄ"): "ffl", ord("ﬅ"): "ſt", ord("ﬆ"): "st",
}  # fmt: skip
_CONTROL_CHARS = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
)


@lru_cache()
def _width_map() -> dict[int, str]:
    table = {0x3000: " "}
    for i in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(i))
        if alt != chr(i):
            table[i] = alt
    return table


def _c1_to_cp1252(match: "re.Match[str]") -> str:
    try:
        return match.group(0).encode("latin-1").decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D: undefined in cp1252, kept
        return match.group(0)


_C1_CONTROLS = re.compile("[\x80-\x9f]")


def _fix_text_lite(text: str) -> str:
    """The parts of ``ftfy.fix_text`` that apply to text without mojibake, to a fixed point."""
    if "<" not in text:
        text = html.unescape(text)
    while True:
        orig = text
        text = _C1_CONTROLS.sub(_c1_to_cp1252, text)
        text = text.translate(_LIGATURES).translate(_width_map())
        text = _SINGLE_QUOTES.sub("'", _DOUBLE_QUOTES.sub('"', text))
        text = _LINE_BREAKS.sub("\n", text)
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace") if _has_surrogates(text) else text
        text = _ANSI_ESCAPES.sub("", text).translate(_CONTROL_CHARS)
        text = unicodedata.normalize("NFC", text)
        if text == orig:
            return text


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= c <= "\udfff" for c in text)


def _fix_text(text: str) -> str:
    try:
        import ftfy  # optional: the same repair as open_clip when installed
    except ImportError:
        return _fix_text_lite(text)
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


# --- pre-tokenisation: open_clip's regex, without the regex package -----------------------------


@lru_cache(maxsize=65536)
def _char_class(ch: str) -> str:
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
        kind = _char_class(ch)
        if kind == "S":
            i += 1
            continue
        if kind == "N":
            words.append(ch)
            i += 1
            continue
        j = i + 1
        while j < n and _char_class(text[j]) == kind:  # a run of letters, or of "other" characters
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


# --- Hugging Face tokenizers (the ``tokenizers`` library, an optional extra) ---------------------

#: The files a local Hugging Face tokenizer folder needs (the first), and those read when present.
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")
TOKENIZERS_HINT = "pip install 'coopkit[tokenizers]' (or: pip install tokenizers)"


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ImportError(f"this model's tokenizer needs the `tokenizers` library: {TOKENIZERS_HINT}") from None
    return tokenizers


def _token_text(value: Any) -> Optional[str]:
    """A special token as written in tokenizer_config.json / special_tokens_map.json."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


class HFTokenizer:
    """A Hugging Face tokenizer run exactly as open_clip's ``HFTokenizer`` runs it, without
    torch or transformers: clean the text, encode with special tokens, truncate to and pad up
    to ``context_length``, and (``strip_sep_token``, CLIPA) replace the ``[SEP]`` token by 0.

    Args:
        backend: A ``tokenizers.Tokenizer``.
        context_length: Length of each row of token ids.
        pad_id: Padding id; ``pad_token`` its text.
        clean: open_clip's text cleaning (:data:`CLEAN_MODES`).
        strip_sep_id: With open_clip's ``strip_sep_token``, the id replaced by 0.
        padding_side: ``right`` or ``left``; ``truncation_side`` likewise.

    Use :meth:`from_pretrained` for a folder (``tokenizer.json`` with the special tokens of
    ``tokenizer_config.json``) and :meth:`from_file` for a ``tokenizer.json`` alone (as coopkit
    writes beside an exported text graph, padding and truncation included).
    """

    def __init__(
        self,
        backend: Any,
        context_length: int,
        pad_id: int,
        pad_token: str,
        *,
        clean: str = "whitespace",
        strip_sep_id: Optional[int] = None,
        padding_side: str = "right",
        truncation_side: str = "right",
    ) -> None:
        if clean not in CLEAN_MODES:
            raise ValueError(f"unknown text cleaning {clean!r}; valid: {', '.join(CLEAN_MODES)}")
        if int(context_length) < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        self.context_length = int(context_length)
        self.clean = clean
        self.pad_id = int(pad_id)
        self.strip_sep_id = None if strip_sep_id is None else int(strip_sep_id)
        self.backend = backend
        self._plain = type(backend).from_str(backend.to_str())  # a copy that neither pads nor truncates
        self._plain.no_truncation()
        self._plain.no_padding()
        # as transformers' fast tokenizers call it: longest_first truncation, padding to max_length
        backend.enable_truncation(self.context_length, stride=0, strategy="longest_first", direction=truncation_side)
        backend.enable_padding(direction=padding_side, pad_id=self.pad_id, pad_type_id=0, pad_token=pad_token,
                               length=self.context_length, pad_to_multiple_of=None)
        self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
        self.n_prefix, self.n_suffix, self.end_id = self._layout()

    def _layout(self) -> tuple[int, int, int]:
        content = self.encode("x")
        row = self(["x"])[0].tolist()
        n_special = int(self.backend.num_special_tokens_to_add(False))
        for start in range(len(row) - len(content) + 1):
            if row[start : start + len(content)] == content:
                after = start + len(content)
                return start, n_special - start, int(row[after]) if after < len(row) else self.pad_id
        raise ValueError("the tokenizer does not keep the text's tokens in its rows; coopkit cannot place a prompt")

    @classmethod
    def from_file(
        cls,
        path: Union[str, Path],
        context_length: Optional[int] = None,
        *,
        clean: str = "whitespace",
        strip_sep_id: Optional[int] = None,
    ) -> "HFTokenizer":
        """A ``tokenizer.json`` file; its padding (id, token, side) and truncation settings are
        used, ``context_length`` defaults to its padding length."""
        tokenizers = _import_tokenizers()
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {file}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises its own exception type
            raise ValueError(f"{file} is not a Hugging Face tokenizer.json: {str(e).splitlines()[0]}") from None
        padding = backend.padding or {}
        truncation = backend.truncation or {}
        length = context_length or padding.get("length") or truncation.get("max_length")
        if not length:
            raise ValueError(f"{file} records no padding length; give context_length")
        return cls(backend, int(length), int(padding.get("pad_id", 0)), str(padding.get("pad_token", "<pad>")),
                   clean=clean, strip_sep_id=strip_sep_id, padding_side=padding.get("direction", "right"),
                   truncation_side=truncation.get("direction", "right"))

    @classmethod
    def from_pretrained(
        cls,
        folder: Union[str, Path],
        context_length: int,
        *,
        clean: str = "whitespace",
        strip_sep_token: bool = False,
    ) -> "HFTokenizer":
        """A local Hugging Face tokenizer folder: ``tokenizer.json``, with the pad and separator
        tokens and the padding side of ``tokenizer_config.json`` / ``special_tokens_map.json``."""
        tokenizers = _import_tokenizers()
        root = Path(folder)
        file = root / HF_TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(f"no {HF_TOKENIZER_FILE} in {root}")
        backend = tokenizers.Tokenizer.from_file(str(file))
        settings: dict[str, Any] = {}
        for name in reversed(HF_TOKENIZER_CONFIGS):  # tokenizer_config.json wins
            if (root / name).is_file():
                settings.update(_read_json(root / name))
        return cls.from_backend(backend, context_length, settings, clean=clean, strip_sep_token=strip_sep_token)

    @classmethod
    def from_backend(
        cls,
        backend: Any,
        context_length: int,
        settings: dict[str, Any],
        *,
        clean: str = "whitespace",
        strip_sep_token: bool = False,
    ) -> "HFTokenizer":
        """A ``tokenizers.Tokenizer`` with the settings of a tokenizer_config.json (``pad_token``,
        ``sep_token``, ``padding_side``, ``truncation_side``)."""
        pad_token = _token_text(settings.get("pad_token"))
        pad_id = backend.token_to_id(pad_token) if pad_token is not None else None
        if pad_id is None:
            raise ValueError(
                f"the tokenizer has no padding token (pad_token {pad_token!r} in tokenizer_config.json); "
                "open_clip pads every prompt to the context length"
            )
        sep_id = None
        if strip_sep_token:
            sep = _token_text(settings.get("sep_token"))
            sep_id = backend.token_to_id(sep) if sep is not None else None
            if sep_id is None:
                raise ValueError("strip_sep_token is set but the tokenizer has no sep_token")
        return cls(backend, context_length, pad_id, pad_token, clean=clean, strip_sep_id=sep_id,
                   padding_side=str(settings.get("padding_side", "right")),
                   truncation_side=str(settings.get("truncation_side", "right")))

    def save(self, path: Union[str, Path]) -> None:
        """Write ``tokenizer.json`` with this tokenizer's padding and truncation settings."""
        Path(path).write_text(self.backend.to_str(), encoding="utf-8")

    def to_str(self) -> str:
        """The ``tokenizer.json`` text (padding and truncation included)."""
        return str(self.backend.to_str())

    def encode(self, text: str) -> list[int]:
        """Token ids of the cleaned ``text`` without special tokens or padding."""
        return list(self._plain.encode(clean(text, self.clean), add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return str(self.backend.decode([int(i) for i in ids], skip_special_tokens=False))

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> np.ndarray:
        """Token ids ``(len(texts), context_length)`` int64, as open_clip's ``HFTokenizer``."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length is not None and int(context_length) != self.context_length:
            raise ValueError(f"this tokenizer pads to {self.context_length} tokens, not {context_length}")
        encoded = self.backend.encode_batch([clean(t, self.clean) for t in texts], add_special_tokens=True)
        out = np.array([e.ids for e in encoded], dtype=np.int64).reshape(len(texts), self.context_length)
        if self.strip_sep_id is not None:
            out[out == self.strip_sep_id] = 0  # as open_clip: torch.where(ids == sep, 0, ids)
        return out


@lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """The shared tokeniser (the vocabulary is read once per process)."""
    return ClipTokenizer()
