"""Optional dependencies (the package's extras), imported when a feature first needs them.

The base install is numpy, Pillow and onnxruntime. Everything else (the server, Ray, Parquet,
Hugging Face tokenizers, progress bars) is an extra, imported inside the function that needs it
through :func:`require`, so importing coopkit never needs it and a missing one is one line
naming what to install.
"""

from __future__ import annotations

import importlib
from typing import Any

#: ``pip install`` hints of the extras, by extra name (``pyproject.toml``'s optional dependencies).
EXTRAS = {
    "serve": "pip install 'coopkit[serve]'",
    "ray": "pip install 'coopkit[ray]'",
    "parquet": "pip install 'coopkit[parquet]'",
    "tokenizers": "pip install 'coopkit[tokenizers]'",
    "cli": "pip install 'coopkit[cli]'",
    "openvino": "pip install 'coopkit[openvino]'",
}


class MissingExtraError(ImportError, RuntimeError):
    """An optional dependency is not installed: a problem of the environment (``RuntimeError``),
    and an ``ImportError`` for callers that catch that."""


def require(module: str, extra: str, purpose: str) -> Any:
    """Import and return ``module``, or raise :class:`MissingExtraError` naming the extra to install.

    Args:
        module: What to import (``pyarrow.parquet``, ``ray.data``...).
        extra: The coopkit extra that brings it (a key of :data:`EXTRAS`).
        purpose: What needs it, the start of the message (``Parquet input or output``).
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; valid: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = (e.name or module).split(".")[0]  # the package to install, not its submodule
        raise MissingExtraError(f"{purpose} needs {missing} ({EXTRAS[extra]})", name=missing) from None
