"""The ``coopkit`` command line: the only module of coopkit that prints.

Subcommands are loaded lazily, so ``coopkit --help`` starts without torch. Bad input ends
with a one-line ``Error: ...`` on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

import click

from . import __version__

#: Commands defined in other modules, loaded when used: name -> "module:attribute".
LAZY_COMMANDS = {
    "bench": "coopkit._cli_bench:bench",
    "explain": "coopkit._cli_bench:explain",
    "import-official": "coopkit._cli_bench:import_official_cmd",
    "demo": "coopkit._cli_demo:demo",
    "export": "coopkit._cli_export:export",
    "predict": "coopkit._cli_predict:predict",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._available()))

    def _available(self) -> list[str]:
        return [n for n, target in LAZY_COMMANDS.items() if importlib.util.find_spec(target.split(":")[0])]

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name in self.commands:
            return self.commands[name]
        if name in self._available():
            module, attr = LAZY_COMMANDS[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return None


def fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit (2 for bad input)."""
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's bad-input exceptions into one-line errors with exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, PermissionError) as e:
            fail(str(e))
        except RuntimeError as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__, code=1)

    return wrapper


def print_table(rows: Sequence[tuple[str, Any]]) -> None:
    """Two aligned columns."""
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        if isinstance(value, float):
            value = f"{value:.4f}"
        click.echo(f"{key.ljust(width)}  {value}")


def _pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}%"


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="coopkit")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details (INFO level).")
def main(verbose: bool) -> None:
    """coopkit: adapt CLIP to your classes with CoOp, export one ONNX file, serve it anywhere."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not verbose:
        logging.getLogger().setLevel(logging.ERROR)  # open_clip logs its chatter on the root logger
        logging.getLogger("coopkit").setLevel(logging.WARNING)  # coopkit's own warnings still show


def _backbone_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(fn)
    fn = click.option(
        "--pretrained", default="synthetic", show_default=True,
        help="open_clip pretrained tag, checkpoint path, 'synthetic' (shipped coopkit-tiny weights) or 'none'.",
    )(fn)
    fn = click.option(
        "--model", default="coopkit-tiny", show_default=True,
        help="open_clip model name, model-config JSON path, or coopkit-tiny (shipped).",
    )(fn)
    return fn


def augment_option(fn: Any) -> Any:
    """``--augment/--no-augment``: CoOp's crop augmentation or whole-image training views."""
    return click.option(
        "--augment/--no-augment", default=True, show_default=True,
        help="Training views with CoOp's random resized crop (scale 0.08-1) + flip; --no-augment encodes "
             "whole images (resize + centre crop), better when each image shows one small object.",
    )(fn)


def _pretrained(value: str) -> Optional[str]:
    return None if value.lower() in ("none", "random", "") else value


@main.command("fit")
@click.argument("data", type=click.Path())
@_backbone_options
@click.option("--out", "out", required=True, type=click.Path(), help="Folder to save the run to.")
@click.option("--shots", default=16, show_default=True, help="Training images per class.")
@click.option("--seed", default=1, show_default=True, help="Random seed.")
@click.option("--n-ctx", default=16, show_default=True, help="Number of context vectors.")
@click.option("--csc", is_flag=True, help="Class-specific context (default: unified).")
@click.option("--position", "class_token_position", default="end", show_default=True,
              type=click.Choice(["end", "middle", "front"]), help="Where the class name goes.")
@click.option("--ctx-init", default=None, help="Initialise context from these words, e.g. 'a photo of a'.")
@click.option("--epochs", type=int, default=None, help="Epochs (default: 50/100/200 by shots, as in the paper).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--lr", default=0.002, show_default=True)
@click.option("--n-views", default=10, show_default=True, help="Augmented views cached per training image.")
@augment_option
@click.option("--val", type=click.Path(), default=None, help="Labelled set evaluated after training.")
@click.option("--image-root", type=click.Path(), default=None, help="Root of relative paths in CSV/split files.")
@click.option("--kg-weight", default=0.0, show_default=True, help="KgCoOp regularisation weight.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@handle_errors
def fit_cmd(data: str, model: str, pretrained: str, device: str, out: str, val: Optional[str],
            as_json: bool, quiet: bool, **kwargs: Any) -> None:
    """Fit CoOp context vectors on DATA (ImageFolder dir, CSV of path,label, or CoOp split JSON)."""
    from .train import fit

    clf = fit(data, model=model, pretrained=_pretrained(pretrained), device=device, val=val,
              progress=not quiet, **kwargs)
    path = clf.save(out)
    m = clf.config.metrics
    result = {
        "run": str(path), "classes": len(clf.classnames), "train_images": m["train_images"],
        "epochs": m["epochs"], "train_loss": m["train_loss"], "train_accuracy": m["train_accuracy"],
        "val_accuracy": m.get("val_accuracy"), "seconds": m["seconds"],
    }
    _emit(result, as_json)


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    rows = []
    for k, v in result.items():
        if v is None or isinstance(v, dict):
            continue
        rows.append((k, _pct(v) if "accuracy" in k and isinstance(v, float) else v))
    print_table(rows)


@main.command("eval")
@click.argument("run_dir", type=click.Path())
@click.argument("data", type=click.Path())
@click.option("--split", default="test", show_default=True, help="Split of a CoOp split JSON.")
@click.option("--image-root", type=click.Path(), default=None, help="Root of relative paths in CSV/split files.")
@click.option("--device", default="auto", show_default=True)
@click.option("--per-class", is_flag=True, help="Also print accuracy per class.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def eval_cmd(run_dir: str, data: str, split: str, image_root: Optional[str], device: str,
             per_class: bool, as_json: bool) -> None:
    """Evaluate a saved run (fit or zeroshot --out) on labelled DATA."""
    from .classifier import load

    clf = load(run_dir, device=device)
    res = clf.evaluate(data, split=split, image_root=image_root, progress=not as_json)
    _emit_eval(res, clf.method, per_class, as_json)


def _emit_eval(res: dict[str, Any], method: str, per_class: bool, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"method": method, **res}, indent=2))
        return
    print_table([("method", method), ("images", res["n"]), ("accuracy", _pct(res["accuracy"])),
                 ("macro accuracy", _pct(res["macro_accuracy"]))])
    if per_class:
        print_table([(f"  {c}", _pct(a)) for c, a in res["per_class"].items()])


@main.command("zeroshot")
@click.argument("data", type=click.Path())
@_backbone_options
@click.option("--template", "templates", multiple=True,
              help="Prompt template with {} for the class name; repeat to ensemble. Default: 'a photo of a {}.'")
@click.option("--split", default="test", show_default=True, help="Split of a CoOp split JSON.")
@click.option("--image-root", type=click.Path(), default=None)
@click.option("--out", type=click.Path(), default=None, help="Also save the zero-shot classifier as a run.")
@click.option("--per-class", is_flag=True, help="Also print accuracy per class.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def zeroshot_cmd(data: str, model: str, pretrained: str, device: str, templates: tuple[str, ...],
                 split: str, image_root: Optional[str], out: Optional[str], per_class: bool, as_json: bool) -> None:
    """Evaluate hand-written prompts on labelled DATA (the zero-shot baseline)."""
    from .backbone import load_backbone
    from .classifier import DEFAULT_TEMPLATES, zero_shot
    from .data import load_dataset

    dataset = load_dataset(data, split=split, image_root=image_root)
    clf = zero_shot(load_backbone(model, _pretrained(pretrained), device), dataset.classnames,
                    templates or DEFAULT_TEMPLATES)
    res = clf.evaluate(dataset, progress=not as_json)
    if out:
        clf.save(out)
    _emit_eval(res, "zeroshot", per_class, as_json)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
