"""One helper for packages whose public names load on first use (PEP 562).

``import coopkit`` and ``import coopkit.exporters`` must not import torch, onnx or open_clip:
each package lists its public names and the module that defines each, and the module is
imported when the name is first read.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping

#: Third-party packages of the ``train`` extra; a missing one gets an install hint.
TRAIN_PACKAGES = ("torch", "torchvision", "open_clip", "onnx", "safetensors", "tqdm", "click")
TRAIN_EXTRA_HINT = "pip install 'coopkit[train]'"


def missing_train_dependency(error: ImportError) -> ImportError:
    """An ImportError naming the extra to install when ``error`` is about a training dependency."""
    name = (error.name or "").split(".")[0]
    if name in TRAIN_PACKAGES:
        return ImportError(f"{name} is not installed: this part of coopkit needs the training dependencies "
                           f"({TRAIN_EXTRA_HINT})")
    return error


def lazy_exports(
    package: str, namespace: dict[str, Any], exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose public ``exports`` map name -> module.

    Module paths may be relative (``".onnx"``) to ``package``. A loaded name is cached in the
    package ``namespace``, so the module is imported once.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            module = importlib.import_module(exports[name], package)
        except ImportError as e:
            raise missing_train_dependency(e) from None
        value = getattr(module, name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*exports, *(k for k in namespace if not k.startswith("_"))})

    return __getattr__, __dir__
