"""The validating base of every coopkit config: field checks and JSON save/load, written once.

Every config in coopkit (training's in :mod:`coopkit.config`, the runtime's
:class:`~coopkit.runtime.batch.BatchConfig`, :class:`~coopkit.runtime.serve.ServeConfig` and
:class:`~coopkit.runtime.ray_engine.RayConfig`) is a dataclass that checks its fields in
``__post_init__`` with the validators below and inherits :class:`ConfigMixin`. A bad value
fails with one ``ValueError`` naming the field, the value and what would be valid.

It lives in the runtime (numpy-free, torch-free) so that the torch-free configs can use it; the
rest of coopkit imports it from here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import asdict
from typing import Any, Optional, Sequence, TypeVar

logger = logging.getLogger(__name__)

C = TypeVar("C")


def check_int(name: str, value: Any, minimum: int = 1, optional: bool = False, maximum: Optional[int] = None,
              hint: str = "") -> Optional[int]:
    """``value`` if it is an integer (not a bool) from ``minimum`` to ``maximum``, or ``None`` when
    ``optional``; else a ValueError naming ``name`` (``hint`` says what ``None`` means)."""
    if optional and value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
            or (maximum is not None and value > maximum)):
        rng = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        extra = f" or None{f' ({hint})' if hint else ''}" if optional else ""
        raise ValueError(f"{name} must be an integer {rng}{extra}, got {value!r}")
    return value


def check_float(name: str, value: Any, minimum: float = 0.0, *, positive: bool = False,
                below: Optional[float] = None, maximum: Optional[float] = None, optional: bool = False) -> Optional[float]:
    """``value`` as a finite float ``>= minimum`` (``> minimum`` when ``positive``), ``< below``
    and ``<= maximum`` when given, or ``None`` when ``optional``; else a ValueError naming ``name``."""
    if optional and value is None:
        return None
    extra = " or None" if optional else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number{extra}, got {value!r}")
    number = float(value)
    low_ok = number > minimum if positive else number >= minimum
    high_ok = (below is None or number < below) and (maximum is None or number <= maximum)
    if not math.isfinite(number) or not low_ok or not high_ok:
        rng = f"{'>' if positive else '>='} {minimum:g}"
        rng += f" and < {below:g}" if below is not None else ""
        rng += f" and <= {maximum:g}" if maximum is not None else ""
        raise ValueError(f"{name} must be a finite number {rng}{extra}, got {value!r}")
    return number


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``; else a ValueError naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, valid: Sequence[str]) -> str:
    """``value`` if it is one of ``valid``; else a ValueError naming it and the choices."""
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, valid))}")
    return value


def check_text(name: str, value: Any, what: str = "a non-empty string") -> str:
    """``value`` if it is a string with something besides whitespace; else a ValueError naming ``name``."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def help_of(cls: type, name: str) -> str:
    """The ``help`` text of a config field (used by the CLI and the docs)."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == name)


def default_of(cls: type, name: str) -> Any:
    """The default of a config field: the one place it is written."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


class ConfigMixin:
    """``to_dict`` / ``from_dict`` / ``to_json`` / ``from_json``, written once for every config.

    ``from_dict`` ignores keys this version does not know, with one warning naming them
    (a run saved by a newer coopkit still loads).
    """

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls: type[C], raw: Any) -> C:
        if isinstance(raw, cls):
            return raw
        if not isinstance(raw, dict):
            raise ValueError(f"{cls.__name__} must be a JSON object, got {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(raw) - known)
        if unknown:
            logger.warning("ignoring unknown %s keys %s (written by a newer coopkit?)", cls.__name__, unknown)
        try:
            return cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as e:
            raise ValueError(f"{cls.__name__}: {e}") from None

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON: {e}") from None
        return cls.from_dict(raw)  # type: ignore[attr-defined]
