"""The method registry: every training method coopkit knows, as one registered unit each.

Modelled on peft's ``register_peft_method``: each method lives in its own module of this package
(its config dataclass, its fitted model, how it is fitted, rebuilt from a saved run and imported
from an official checkpoint) and ends with one :func:`register` call. Everything else (``fit``,
the command line, saving and loading runs, the exporter's text graph, ``coopkit bench``) asks
the registry instead of keeping its own list::

    from coopkit import methods
    methods.names()                      # ('zeroshot', 'linear-probe', ..., 'coop', ...)
    spec = methods.get("coop")           # a Method
    spec.config, spec.tensors_file, spec.protocols, spec.text_graph

A method's name is written in its own module only. Adding a method is one new module here
(found and imported by this package), its tests and its docs page.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, Mapping, Optional

from ..config import TASKS

#: Protocols of ``coopkit bench`` a method can take part in.
PROTOCOLS = ("fewshot", "base2new", "shift")


@dataclass(frozen=True)
class Method:
    """What the registry knows about one method.

    Attributes:
        name: The method's name (``config.json``'s ``method``, ``fit(method=...)``, ``--method``).
        summary: One line for ``--help``, the docs and errors.
        config: The method's own config dataclass (a :class:`~coopkit.config.ConfigMixin`), or
            ``None`` when it has no settings of its own.
        config_field: The field of :class:`~coopkit.config.RunConfig` that records ``config``
            (``method_config``; CoOp's ``prompt``, as runs saved before the registry have it).
        tensors_file: The run file holding what it trained (safetensors), or ``None``: nothing.
        fit: ``fit(backbone, shots, config, train, *, progress, callback) -> (MethodModel, metrics)``
            (:class:`~coopkit.methods.base.Shots` holds the few-shot sample, the optional
            validation set and the hand-written templates); ``None`` for a method that trains nothing.
        build: ``build(backbone, run_config, tensors) -> MethodModel``: the fitted model again from a
            saved run (``tensors``: the tensors file's contents, or ``None``); refuses bad tensors
            with one ValueError.
        importer: ``importer(state_dict, classnames, backbone, config) -> MethodModel``: the model from
            the official trainer's weights; ``None``: not importable.
        protocols: The ``coopkit bench`` protocols that run it (see :data:`PROTOCOLS`).
        text_graph: Whether ``--with-text-encoder`` can export its text side.
        merged_weights: Whether its fitted model writes the backbone's weights with what it trained
            merged in (``MethodModel.save_merged_weights(path)``, an open_clip checkpoint;
            ``coopkit export --merged-weights``).
        check_backbone: ``check_backbone(backbone, config) -> None``: raises a one-line ValueError
            for a backbone the method cannot handle; ``None``: every backbone.
        variants: Extra rows of ``coopkit bench``: a row's name -> the settings it overrides (fields
            of ``config`` or of :class:`~coopkit.config.TrainConfig`, or ``templates``).
        bench_default: Which of the method and its variants ``coopkit bench`` runs by default.
        bench_default_protocols: The protocols whose default runs include ``bench_default`` (default:
            all); e.g. CoCoOp runs by default in ``base2new`` and ``shift`` but not in ``fewshot``.
        prompt_grid: Whether ``coopkit bench fewshot`` fits it over the ``n_ctx`` x ``positions`` grid
            through :func:`coopkit.fit` (CoOp's prompt learners; its ``config`` has ``n_ctx``). Other
            methods, MaPLe's ``n_ctx`` included, fit once per shots and seed with their own settings.
        bench_setting: How ``coopkit bench`` describes the settings of the method's rows (its
            ``setting`` column; ``searched on val`` instead when the fit searched them on a validation set).
        task: What it answers (:data:`coopkit.config.TASKS`): ``classify`` (one label per image) or
            ``multilabel`` (its ``fit`` receives a :class:`~coopkit.multilabel_data.MultiLabelDataset`
            in ``shots.dataset`` and ``shots.val``; its runs record ``task``).
    """

    name: str
    summary: str
    build: Callable[..., Any]
    config: Optional[type] = None
    config_field: str = "method_config"
    tensors_file: Optional[str] = None
    fit: Optional[Callable[..., Any]] = None
    importer: Optional[Callable[..., Any]] = None
    protocols: tuple[str, ...] = ()
    text_graph: bool = False
    merged_weights: bool = False
    check_backbone: Optional[Callable[..., None]] = None
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    bench_default: tuple[str, ...] = ()
    bench_default_protocols: tuple[str, ...] = PROTOCOLS
    prompt_grid: bool = False
    bench_setting: str = ""
    task: str = "classify"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"method {self.name}: unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip().lower():
            raise ValueError(f"a method name is a non-empty lower-case string, got {self.name!r}")
        bad = [p for p in (*self.protocols, *self.bench_default_protocols) if p not in PROTOCOLS]
        if bad:
            raise ValueError(f"method {self.name}: unknown protocols {bad}; valid: {', '.join(PROTOCOLS)}")
        grid_ready = is_dataclass(self.config) and "n_ctx" in {f.name for f in fields(self.config)}
        if self.prompt_grid and not grid_ready:
            raise ValueError(f"method {self.name}: prompt_grid needs a config with an n_ctx field")
        rows = (self.name, *self.variants)
        extra = [r for r in self.bench_default if r not in rows]
        if extra:
            raise ValueError(f"method {self.name}: bench_default names {extra}, not among {list(rows)}")

    def make_config(self, raw: Any = None) -> Any:
        """The method's config from ``raw`` (a dict, an instance, or ``None`` for the defaults);
        ``None`` for a method without one."""
        if self.config is None:
            if raw:
                raise ValueError(f"method {self.name} has no settings of its own, got {raw!r:.80}")
            return None
        return self.config() if raw is None else self.config.from_dict(raw)

    def run_config(self, run: Any) -> Any:
        """The method's config as a saved run records it (:attr:`config_field` of a
        :class:`~coopkit.config.RunConfig`), or the defaults when the run has none."""
        return self.make_config(getattr(run, self.config_field, None))


_REGISTRY: dict[str, Method] = {}
#: The method :func:`coopkit.fit` and ``coopkit fit`` use unless told otherwise.
DEFAULT_METHOD = "coop"


def register(method: Method) -> Method:
    """Add a method to the registry (at the bottom of its module). Refuses a name taken by another
    method, or a bench row named like another method."""
    rows = (method.name, *method.variants)
    taken = {r: m.name for m in _REGISTRY.values() for r in (m.name, *m.variants)}
    clash = [r for r in rows if r in taken and taken[r] != method.name]
    if clash:
        raise ValueError(f"method names {clash} are already registered")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> Method:
    """Remove a method from the registry (for tests, or a plugin replacing a method); returns it."""
    spec = get(name)
    del _REGISTRY[name]
    return spec


def get(name: str) -> Method:
    """The registered method called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the registered ones).
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    """Every registered method, in registration order."""
    return tuple(_REGISTRY)


def for_protocol(protocol: str, *, default: bool = False) -> tuple[str, ...]:
    """The ``coopkit bench`` rows of ``protocol``: each method that runs it, followed by its variants
    (``default=True``: only those it runs by default in ``protocol``: its ``bench_default`` rows when
    ``protocol`` is among its ``bench_default_protocols``), in registration order."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    rows: list[str] = []
    for m in _REGISTRY.values():
        if protocol in m.protocols and (not default or protocol in m.bench_default_protocols):
            rows += [r for r in (m.name, *m.variants) if not default or r in m.bench_default]
    return tuple(rows)


def method_names(protocol: str, *, default: bool = False) -> tuple[str, ...]:
    """The methods (not their variants) that run in ``protocol`` (``default=True``: those that run by
    default, see :func:`for_protocol`), in registration order: the rows of ``coopkit bench base2new`` / ``shift``."""
    return tuple(r for r in for_protocol(protocol, default=default) if r in _REGISTRY)


def bench_row(row: str) -> tuple[Method, dict[str, Any]]:
    """The method of a ``coopkit bench`` row, and the settings the row overrides."""
    for m in _REGISTRY.values():
        if row == m.name:
            return m, {}
        if row in m.variants:
            return m, dict(m.variants[row])
    rows = [r for m in _REGISTRY.values() for r in (m.name, *m.variants)]
    raise ValueError(f"unknown method {row!r}; valid: {', '.join(rows)}")


#: The methods that ship with coopkit, registered in this order (the order of ``coopkit bench``'s
#: rows); any other module of this package registers after them, in name order.
_BUILTIN = ("zeroshot", "linear_probe", "clap", "tip_adapter", "coop")


def _import_methods() -> None:
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base" and not m.name.startswith("_"))
    for module in (*_BUILTIN, *(m for m in found if m not in _BUILTIN)):
        importlib.import_module(f"{__name__}.{module}")


_import_methods()

__all__ = ["Method", "PROTOCOLS", "DEFAULT_METHOD", "register", "unregister", "get", "names", "for_protocol", "method_names", "bench_row"]
