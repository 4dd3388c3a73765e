"""An unpickler that runs no code from the file (standard library only).

Pickles from other programs (the official CoOp trainer's checkpoints, Dassl's cached few-shot
lists) hold more than data: optimizer and scheduler objects, Dassl ``Datum`` records. A plain
``pickle.load`` would import and call whatever the file names. :class:`SafeUnpickler` instead
resolves every global the file names in one of three ways:

* **materialised**: plain containers the pickle machine builds itself (dict, list, tuple,
  str, numbers, bytes, None) and the globals in ``allowed`` (``collections.OrderedDict`` here;
  the torch checkpoint reader adds torch's tensor-rebuilding functions);
* **inert placeholder**: a global whose module is in ``inert`` becomes a :class:`Placeholder`
  subclass named after it; "calling" it or restoring its state only records the arguments and
  the state (a Dassl ``Datum`` keeps ``state["_impath"]``), nothing is imported or run;
* **refused**: any other global (``posix.system``, ``builtins.eval``, ``subprocess.Popen``, ...)
  stops the load with :class:`UnsafeGlobalError` naming it, before anything is called.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
from typing import Any, BinaryIO, Iterable, Optional


class UnsafeGlobalError(pickle.UnpicklingError):
    """The file names a global that is neither data nor a known inert part of the format."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Placeholder:
    """An object a pickle described but that was not built: its class name, arguments and state.

    Attributes:
        global_name: ``module.name`` of the class or function the pickle named.
        args: Arguments it was "called" with (``()`` when made by ``NEWOBJ``).
        state: What ``__setstate__`` received (usually the original ``__dict__``), or ``None``.
        items: Key/value pairs and list items the pickle added to it.
    """

    global_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None
        self.items: dict[Any, Any] = {}
        self.list: list[Any] = []

    def __new__(cls, *args: Any, **kwargs: Any) -> "Placeholder":
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items, obj.list = args, kwargs, None, {}, []
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.list.append(value)

    def extend(self, values: Iterable[Any]) -> None:
        self.list.extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> "Placeholder":
        return placeholder(f"{self.global_name}()")(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<placeholder {self.global_name}>"


_PLACEHOLDERS: dict[str, type] = {}


def placeholder(global_name: str) -> type:
    """The inert stand-in class for ``global_name`` (one class per name)."""
    if global_name not in _PLACEHOLDERS:
        _PLACEHOLDERS[global_name] = type(global_name.rsplit(".", 1)[-1], (Placeholder,), {"global_name": global_name})
    return _PLACEHOLDERS[global_name]


def _in(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


class SafeUnpickler(pickle.Unpickler):
    """A :class:`pickle.Unpickler` whose globals are materialised, inert or refused (see the module).

    Subclasses (or the keyword arguments) set what is allowed: ``allowed_globals`` maps
    ``(module, name)`` to the object to materialise; ``inert_modules`` lists modules whose
    globals (their sub-modules' too) become placeholders; ``inert_globals`` lists single
    ``(module, name)`` pairs that do.

    Args:
        file: The binary stream.
        allowed, inert, inert_globals: Added to the class's settings for this load.
        **kwargs: Passed to :class:`pickle.Unpickler` (``encoding`` for Python 2 pickles).
    """

    allowed_globals: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict}
    inert_modules: tuple[str, ...] = ()
    inert_pairs: frozenset[tuple[str, str]] = frozenset()

    def __init__(self, file: BinaryIO, *, allowed: Optional[dict[tuple[str, str], Any]] = None,
                 inert: Iterable[str] = (), inert_globals: Iterable[tuple[str, str]] = (), **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.allowed = {**self.allowed_globals, **(allowed or {})}
        self.inert = (*self.inert_modules, *inert)
        self.inert_names = self.inert_pairs | set(inert_globals)

    def find_class(self, module: str, name: str) -> Any:
        # Python 2 names (protocol 2 pickles, e.g. torch.save's ``__builtin__``), as pickle's own find_class maps them
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if (module, name) in self.inert_names or _in(module, self.inert):
            return placeholder(f"{module}.{name}")
        raise UnsafeGlobalError(f"{module}.{name}")


def safe_loads(data: bytes, **kwargs: Any) -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler` (same keyword arguments)."""
    return SafeUnpickler(io.BytesIO(data), **kwargs).load()
