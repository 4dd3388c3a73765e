"""Hugging Face tokenizers (SigLIP, CLIPA, MetaCLIP 2, Hugging Face text towers) run exactly as
open_clip's ``HFTokenizer`` runs them, through the ``tokenizers`` library (the ``tokenizers``
extra), without torch or transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from ..extras import require
from .cleaning import CLEAN_MODES, clean


#: The files a local Hugging Face tokenizer folder needs (the first), and those read when present.
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")


def _import_tokenizers() -> Any:
    return require("tokenizers", "tokenizers", "this model's tokenizer")


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
