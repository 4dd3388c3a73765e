"""Text cleaning as open_clip's tokenizers do it (``clean="lower"``, ``"canonicalize"``,
``"whitespace"``), shared by CLIP's BPE and the Hugging Face tokenizers.

``ftfy`` (text repair) is used when it is installed. Without it, :func:`_fix_text_lite` applies
the ftfy steps that matter for class names (HTML entities, Latin ligatures, full-width forms,
curly quotes, line breaks, control characters, NFC), but it cannot repair mojibake ("cafÃ©"),
which ftfy would turn into "café".
"""

from __future__ import annotations

import html
import re
import string
import unicodedata
from functools import lru_cache


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
