"""The ``coopkit`` command group (``coopkit.cli.main``): lazy subcommands, one error policy, options made from configs.

Every subcommand lives in its own module of :mod:`coopkit.cli` and is imported when used, so
``coopkit --help`` starts without torch. The CLI is the only part of coopkit that prints.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import importlib
import importlib.util
import json
import logging
import sys
import typing
from typing import Any, Callable, Optional, Sequence

import click
from click.core import ParameterSource

from .. import __version__
from .._lazy import missing_train_dependency

logger = logging.getLogger("coopkit.cli")

#: Subcommands, loaded when used: name -> "module:attribute".
LAZY_COMMANDS = {
    "fit": "coopkit.cli.train:fit_cmd",
    "eval": "coopkit.cli.train:eval_cmd",
    "zeroshot": "coopkit.cli.train:zeroshot_cmd",
    "export": "coopkit.cli.export:export",
    "predict": "coopkit.cli.predict:predict",
    "serve": "coopkit.cli.serve:serve_cmd",
    "demo": "coopkit.cli.demo:demo",
    "bench": "coopkit.cli.research:bench",
    "explain": "coopkit.cli.research:explain",
    "import-official": "coopkit.cli.research:import_official_cmd",
    "datasets": "coopkit.cli.research:datasets_cmd",
}

EXIT_OK, EXIT_ENVIRONMENT, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

#: OS errors that say a path given is unusable as written (bad input, exit 2), not that the
#: environment failed: a name too long for the file system, a symlink loop, bytes the file system
#: refuses in a name. (Not-found, is-a-folder, not-a-folder and exists are caught by their types.)
PATH_ERRNOS = frozenset(n for n in (errno.ENAMETOOLONG, errno.ELOOP, getattr(errno, "EILSEQ", None)) if n is not None)

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 2 bad input (a one-line 'Error: ...' names the value and what would be valid); "
    "1 a problem of the environment (missing package, disk full, permission denied, no GPU), also one line; "
    "130 interrupted."
)


def error_exit(message: str, code: int = EXIT_BAD_INPUT) -> "click.exceptions.Exit":
    """Print ``Error: <first line of message>`` on stderr; return the Exit to raise."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "unknown error"
    click.echo(f"Error: {first}", err=True)
    return click.exceptions.Exit(code)


def _os_message(e: OSError) -> str:
    """``No such file or directory: x`` for errors raised by the OS, the message for our own."""
    if e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)


def classify_error(e: BaseException) -> tuple[int, str]:
    """Exit code and one-line message for an exception escaping a command (the one policy)."""
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(e, ImportError):
        return EXIT_ENVIRONMENT, str(missing_train_dependency(e))
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)) or (
            isinstance(e, OSError) and e.errno in PATH_ERRNOS):
        return EXIT_BAD_INPUT, _os_message(e)
    if isinstance(e, OSError):
        if e.errno == errno.ENOSPC:
            return EXIT_ENVIRONMENT, f"no space left on the device{f' (writing {e.filename})' if e.filename else ''}"
        return EXIT_ENVIRONMENT, _os_message(e)
    if isinstance(e, ValueError):
        return EXIT_BAD_INPUT, str(e)
    if isinstance(e, RuntimeError):
        return EXIT_ENVIRONMENT, str(e) or type(e).__name__
    return EXIT_ENVIRONMENT, f"unexpected {type(e).__name__}: {e} (run with -v to log the traceback; please report it)"


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use; its own subcommands (and itself)
    follow the error policy."""

    def __init__(self, *args: Any, lazy: Optional[dict[str, str]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name in self.commands:
            return self.commands[name]
        if name not in self.lazy:
            return None
        module, attr = self.lazy[name].split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:  # a missing extra: a command that says so instead of a traceback
            message = str(missing_train_dependency(e))

            @click.command(name, help=f"(unavailable: {message})", context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def unavailable(args: Sequence[str]) -> None:
                raise error_exit(message, EXIT_ENVIRONMENT)

            return unavailable

    def invoke(self, ctx: click.Context) -> Any:
        return with_error_policy(super().invoke, ctx)


def with_error_policy(invoke: Callable[[click.Context], Any], ctx: click.Context) -> Any:
    """Run a command; any exception becomes a one-line ``Error:`` and its exit code (:func:`classify_error`)."""
    try:
        return invoke(ctx)
    except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
        raise
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - the one place errors become exit codes
        code, message = classify_error(e)
        logger.debug("command failed", exc_info=True)
        raise error_exit(message, code) from None


class Command(click.Command):
    """A command that applies the error policy however it is invoked (in the group or alone)."""

    def invoke(self, ctx: click.Context) -> Any:
        return with_error_policy(super().invoke, ctx)


def command(name: Optional[str] = None, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """``click.command`` with the error policy: use it for every coopkit command."""
    return click.command(name, cls=Command, **kwargs)


LazyGroup.command_class = Command
LazyGroup.group_class = LazyGroup


@click.group(cls=LazyGroup, lazy=LAZY_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="coopkit")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details (INFO level) and tracebacks of failures.")
def main(verbose: bool) -> None:
    """coopkit: adapt CLIP to your classes with CoOp, export one ONNX file, serve it anywhere."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if verbose:
        logging.getLogger().setLevel(logging.INFO)
        logging.getLogger("coopkit").setLevel(logging.DEBUG)
    else:
        logging.getLogger().setLevel(logging.ERROR)  # open_clip logs its chatter on the root logger
        logging.getLogger("coopkit").setLevel(logging.WARNING)  # coopkit's own warnings still show


# --- options generated from the config dataclasses ---------------------------------------------


def _click_type(hint: Any, meta: dict[str, Any]) -> Any:
    if "choices" in meta:
        return click.Choice([c for c in meta["choices"] if ":" not in c])
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
    if typing.get_origin(base) is tuple and Ellipsis not in typing.get_args(base):
        return tuple({int: int, float: float}.get(a, str) for a in typing.get_args(base))  # e.g. --scale 7 3
    return {int: int, float: float, str: str}.get(base, str)


def flag_of(f: "dataclasses.Field[Any]") -> str:
    """The option of a config field: ``--<flag>`` from its metadata, else ``--field-name``."""
    return "--" + f.metadata.get("flag", f.name).replace("_", "-")


def config_options(cls: type, *, only: Optional[Sequence[str]] = None, exclude: Sequence[str] = (),
                   defaults: Optional[dict[str, Any]] = None, prefix: str = "",
                   dest: Callable[[str], str] = lambda name: name) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Click options for the fields of a config dataclass, with its defaults and ``help`` texts.

    ``--field-name`` (or ``--<flag>`` from the field's metadata); booleans become
    ``--name/--no-name``. The command receives each value under the field's name (or
    ``dest(name)``); build the config with :func:`pop_config`. ``defaults`` overrides a field's
    default for one command; ``prefix`` goes before every flag (``clap-`` makes ``--clap-epochs``).
    """
    hints = typing.get_type_hints(cls)
    chosen = [f for f in dataclasses.fields(cls)
              if (only is None or f.name in only) and f.name not in exclude]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(chosen):
            meta = dict(f.metadata)
            flag = "--" + prefix + flag_of(f)[2:]
            default = (defaults or {}).get(f.name, f.default)
            help_text = meta.get("help", "")
            if hints[f.name] is bool:
                fn = click.option(f"{flag}/--no-{flag[2:]}", dest(f.name), default=default, show_default=True,
                                  help=help_text)(fn)
            else:
                fn = click.option(flag, dest(f.name), type=_click_type(hints[f.name], meta), default=default,
                                  show_default=default is not None, help=help_text)(fn)
        return fn

    return decorate


class MethodOptions:
    """The options of every registered method's own config for one command (``coopkit fit``).

    Each config dataclass gets its options once, in registration order; a field whose flag is
    already taken (by ``taken``, or by an earlier method's config) is prefixed with the method's
    name (``--clap-epochs`` beside TrainConfig's ``--epochs``). :meth:`pop` builds the chosen
    method's config from what the command received and refuses options of another method.

    Args:
        specs: The registry's methods (:class:`coopkit.methods.Method`) to make options for.
        taken: Flags the command has already (``--epochs``, ``--out``...).
        skip: Config classes whose options the command makes itself, under their field names
            (CoOp's PromptConfig); :meth:`pop` reads them too.
    """

    def __init__(self, specs: Sequence[Any], taken: set[str], skip: Sequence[type] = ()) -> None:
        self.owner: dict[type, str] = {}  # config class -> the method whose name prefixes its taken flags
        self.prefixed: dict[type, set[str]] = {}
        self.skip = tuple(skip)
        used = set(taken)
        for spec in specs:
            cls = spec.config
            if cls is None or cls in self.owner:
                continue
            self.owner[cls] = spec.name
            if cls in self.skip:
                used |= {flag_of(f) for f in dataclasses.fields(cls)}
                continue
            self.prefixed[cls] = {f.name for f in dataclasses.fields(cls) if flag_of(f) in used}
            used |= {(f"--{spec.name}-" + flag_of(f)[2:]) if f.name in self.prefixed[cls] else flag_of(f)
                     for f in dataclasses.fields(cls)}

    def dest(self, cls: type, name: str) -> str:
        return name if cls in self.skip else f"{cls.__name__}__{name}"

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        for cls, method in reversed(list(self.owner.items())):
            if cls in self.skip:
                continue
            dest = functools.partial(self.dest, cls)  # type: ignore[arg-type]
            fn = config_options(cls, exclude=sorted(self.prefixed[cls]), dest=dest)(fn)
            if self.prefixed[cls]:
                fn = config_options(cls, only=sorted(self.prefixed[cls]), prefix=f"{method}-", dest=dest)(fn)
        return fn

    def pop(self, spec: Any, settings: dict[str, Any], ctx: click.Context) -> Any:
        """The config of ``spec`` from the command's arguments (``None`` if it has none); every
        method option is removed from ``settings``. Options of other methods must be left at their
        defaults (a ValueError names the first one given)."""
        chosen = None
        for cls in self.owner:
            values = {f.name: settings.pop(self.dest(cls, f.name)) for f in dataclasses.fields(cls)}
            if cls is spec.config:
                chosen = cls(**values)
                continue
            given = [f.name for f in dataclasses.fields(cls)
                     if ctx.get_parameter_source(self.dest(cls, f.name)) is not ParameterSource.DEFAULT]
            if given:
                raise ValueError(f"{given[0]!r} is a setting of {self.owner[cls]}, not of {spec.name}; drop it or "
                                 f"use --method {self.owner[cls]}")
        return chosen


def pop_config(cls: type, kwargs: dict[str, Any]) -> Any:
    """Build ``cls`` from the command's keyword arguments, removing the fields it used."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: kwargs.pop(n) for n in names if n in kwargs})


# --- output --------------------------------------------------------------------------------------


def print_table(rows: Sequence[tuple[str, Any]]) -> None:
    """Two aligned columns."""
    if not rows:
        return
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        if isinstance(value, float):
            value = f"{value:.4f}"
        click.echo(f"{key.ljust(width)}  {value}")


def pct(x: float, digits: int = 2) -> str:
    """``0.1234`` -> ``12.34%``."""
    return f"{100 * x:.{digits}f}%"


def emit(result: dict[str, Any], as_json: bool) -> None:
    """A result as JSON, or as a table with accuracies in percent (nested values left out)."""
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    rows = []
    for k, v in result.items():
        if v is None or isinstance(v, dict):
            continue
        rows.append((k, pct(v) if "accuracy" in k and isinstance(v, float) else v))
    print_table(rows)


def run(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of the ``coopkit`` command."""
    main(args=argv, prog_name="coopkit")


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=sys.argv[0])
