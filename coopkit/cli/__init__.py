"""The ``coopkit`` command line (one module per command group; the only part of coopkit that prints).

* :mod:`~coopkit.cli.base`: the group, the error policy (bad input exits 2 with ``Error: ...``,
  environment problems exit 1 with a one-line reason) and options generated from the configs;
* :mod:`~coopkit.cli.train`: ``fit``, ``eval``, ``zeroshot``;
* :mod:`~coopkit.cli.export`: ``export``; :mod:`~coopkit.cli.predict`: ``predict`` (torch-free);
* :mod:`~coopkit.cli.demo`: ``demo``; :mod:`~coopkit.cli.research`: ``bench``, ``explain``,
  ``import-official``.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence


def run(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``coopkit`` command: a one-line error when click is not installed."""
    try:
        from .base import run as run_main
    except ImportError as e:
        if (e.name or "").split(".")[0] != "click":
            raise
        print("Error: the coopkit command needs click: pip install 'coopkit[cli]' (or 'coopkit[train]')",
              file=sys.stderr)
        raise SystemExit(1) from None
    run_main(argv)


def __getattr__(name: str) -> Any:
    if name == "main":  # coopkit.cli.main the click group, for CliRunner and python -m coopkit
        from .base import main

        return main
    raise AttributeError(f"module 'coopkit.cli' has no attribute {name!r}")
