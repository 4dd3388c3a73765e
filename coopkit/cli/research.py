"""CLI for the paper's experiments (``coopkit bench ...``), ``explain`` and ``import-official``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import click

from ..config import BackboneConfig, PromptConfig, TrainConfig
from .base import LazyGroup, command, config_options, pop_config, print_table


def _strs(value: str, option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"{option} is empty; give comma-separated values, e.g. {option} 1,2")
    return items


def _ints(value: str, option: str) -> list[int]:
    items = _strs(value, option)
    try:
        return [int(v) for v in items]
    except ValueError:
        raise ValueError(f"{option} expects comma-separated integers, got {value!r}") from None


@click.group("bench", cls=LazyGroup)
def bench() -> None:
    """The CoOp paper's experiments on your data: few-shot curves, domain shift, base-to-new."""


@bench.command("fewshot")
@click.option("--train", "train", required=True, type=click.Path(), help="Training set (ImageFolder, CSV or split JSON).")
@click.option("--test", "test", required=True, type=click.Path(), help="Test set with the same classes.")
@config_options(BackboneConfig, exclude=("tokenizer", "text_model", "threads"))  # each fit picks its threads
@click.option("--shots", default="1,2,4,8,16", show_default=True, help="Comma-separated shots per class.")
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated seeds.")
@click.option("--methods", default="zeroshot,linear-probe,coop,coop-csc", show_default=True,
              help="Any of zeroshot, zeroshot-ensemble, linear-probe, coop, coop-csc.")
@click.option("--n-ctx", default="16", show_default=True, help="Comma-separated context lengths (CoOp methods).")
@click.option("--position", default="end", show_default=True, help="Comma-separated class-token positions.")
@config_options(TrainConfig, only=("epochs", "n_views", "augment"))
@click.option("--out", required=True, type=click.Path(), help="Folder for results.csv, summary.md, fewshot.png.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def fewshot_cmd(train: str, test: str, shots: str, seeds: str, methods: str, n_ctx: str, position: str,
                epochs: Optional[int], n_views: int, augment: bool, out: str, quiet: bool, **settings: Any) -> None:
    """Accuracy against shots for each method, over seeds (the paper's Figure 3)."""
    from ..research.experiments import fewshot_curves, markdown_table, summarize, write_fewshot_report

    bb = pop_config(BackboneConfig, settings)
    rows = fewshot_curves(train, test, model=bb.model, pretrained=bb.pretrained, device=bb.device,
                          shots=_ints(shots, "--shots"), seeds=_ints(seeds, "--seeds"),
                          methods=_strs(methods, "--methods"), n_ctx=_ints(n_ctx, "--n-ctx"),
                          positions=_strs(position, "--position"), epochs=epochs, n_views=n_views, augment=augment,
                          progress=not quiet)
    files = write_fewshot_report(rows, out, title=f"{_task_name(train)} ({bb.model})")
    click.echo(markdown_table(summarize(rows, ["method", "setting", "shots"], ["accuracy"]),
                              ["method", "setting", "shots"], ["accuracy"]))
    click.echo(f"wrote {files['csv']} and {files['summary']}")
    if files["plot"]:
        click.echo(f"wrote {files['plot']}")
    else:
        click.echo("no plot: install matplotlib (pip install 'coopkit[plot]') to get fewshot.png")


def _task_name(train: str) -> str:
    """``data/pets/train`` -> ``pets``: the folder named for the task, not for the split."""
    path = Path(train).resolve()
    if path.is_file() or path.name.lower() in ("train", "training", "images"):
        return path.parent.name or path.name
    return path.name


@bench.command("shift")
@click.option("--train", "train", required=True, type=click.Path())
@click.option("--test", "tests", required=True, multiple=True,
              help="NAME=PATH of a test set; repeat for the source test set and each shifted one.")
@config_options(BackboneConfig, exclude=("tokenizer", "text_model", "threads"))  # each fit picks its threads
@config_options(TrainConfig, only=("shots",))
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated seeds.")
@config_options(TrainConfig, only=("epochs", "augment"))
@click.option("--out", type=click.Path(), default=None, help="Also write results.csv and summary.md here.")
@click.option("-q", "--quiet", is_flag=True)
def shift_cmd(train: str, tests: tuple[str, ...], shots: int, seeds: str, epochs: Optional[int], augment: bool,
              out: Optional[str], quiet: bool, **settings: Any) -> None:
    """Fit on a source task, compare zero-shot and CoOp on shifted test sets (the paper's Table 1)."""
    from ..research.experiments import domain_shift, markdown_table, summarize

    named = {}
    for t in tests:
        if "=" not in t:
            raise click.BadParameter(f"expected NAME=PATH, got {t!r}", param_hint="--test")
        name, path = t.split("=", 1)
        named[name] = path
    bb = pop_config(BackboneConfig, settings)
    rows = domain_shift(train, named, model=bb.model, pretrained=bb.pretrained, device=bb.device, shots=shots,
                        seeds=_ints(seeds, "--seeds"), epochs=epochs, augment=augment, progress=not quiet)
    table = markdown_table(summarize(rows, ["method", "test"], ["accuracy"]), ["method", "test"], ["accuracy"])
    click.echo(table)
    _write(out, rows, "# Domain shift\n\n" + table)


@bench.command("base2new")
@click.option("--train", "train", required=True, type=click.Path())
@click.option("--test", "test", required=True, type=click.Path())
@click.option("--base", required=True, help="Comma-separated base classes (trained on).")
@click.option("--new", required=True, help="Comma-separated new classes (never seen in training).")
@config_options(BackboneConfig, exclude=("tokenizer", "text_model", "threads"))  # each fit picks its threads
@click.option("--shots", default=16, show_default=True)
@click.option("--seeds", default="1,2,3", show_default=True)
@click.option("--kg-weight", "kg_weights", default="0", show_default=True,
              help="Comma-separated KgCoOp weights to compare (0 = plain CoOp).")
@config_options(TrainConfig, only=("epochs", "augment"))
@click.option("--out", type=click.Path(), default=None)
@click.option("-q", "--quiet", is_flag=True)
def base2new_cmd(train: str, test: str, base: str, new: str, shots: int, seeds: str, kg_weights: str,
                 epochs: Optional[int], augment: bool, out: Optional[str], quiet: bool, **settings: Any) -> None:
    """Fit on base classes; accuracy on base, on new classes, and their harmonic mean (CoCoOp protocol)."""
    from ..research.experiments import base_to_new, markdown_table, summarize

    names = _strs(kg_weights, "--kg-weight")
    try:
        weights = [float(w) for w in names]
    except ValueError:
        raise ValueError(f"--kg-weight expects comma-separated numbers, got {kg_weights!r}") from None
    bb = pop_config(BackboneConfig, settings)
    rows = base_to_new(train, test, _strs(base, "--base"), _strs(new, "--new"), model=bb.model,
                       pretrained=bb.pretrained, device=bb.device, shots=shots, seeds=_ints(seeds, "--seeds"),
                       kg_weights=weights, epochs=epochs,
                       augment=augment, progress=not quiet)
    keys, values = ["method", "kg_weight"], ["base", "new", "hm"]
    table = markdown_table(summarize(rows, keys, values), keys, values)
    click.echo(table)
    _write(out, rows, "# Base-to-new generalisation\n\n" + table)


def _write(out: Optional[str], rows: list[dict[str, Any]], summary: str) -> None:
    if not out:
        return
    from .._io import atomic_write
    from ..research.experiments import write_csv

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(rows, folder / "results.csv")
    atomic_write(folder / "summary.md", summary.encode())
    click.echo(f"wrote {folder / 'results.csv'} and {folder / 'summary.md'}")


@command("explain")
@click.argument("run_dir", type=click.Path())
@click.option("--top", default=5, show_default=True, help="Nearest words per context vector.")
@config_options(BackboneConfig, only=("device",))
def explain(run_dir: str, top: int, device: str) -> None:
    """Nearest vocabulary words to each learned context vector (Euclidean, as in the paper)."""
    from ..classifier import load
    from ..research.interpret import nearest_words

    words = nearest_words(load(run_dir, device=device), top=top)
    for name, vectors in words.items():
        if name is not None:
            click.echo(f"[{name}]")
        print_table([(f"ctx {i + 1}", "  ".join(f"{w} ({d:.2f})" for w, d in row)) for i, row in enumerate(vectors)])


@command("import-official")
@click.argument("checkpoint", type=click.Path())
@click.option("--classes-from", required=True, type=click.Path(),
              help="Dataset (split JSON, folder or CSV) whose class names, in label order, the run used.")
@config_options(BackboneConfig, exclude=("tokenizer", "text_model", "threads"), defaults={"model": "RN50", "pretrained": "openai"})
@config_options(PromptConfig, only=("class_token_position",))
@click.option("--out", required=True, type=click.Path(), help="Folder to save the coopkit run to.")
def import_official_cmd(checkpoint: str, classes_from: str, class_token_position: str, out: str,
                        **settings: Any) -> None:
    """Import a context learned by the official CoOp code (prompt_learner/model.pth.tar-N)."""
    from ..classifier import check_run_target
    from ..data import load_dataset
    from ..research.compat import import_official

    check_run_target(out)
    names = load_dataset(classes_from).classnames
    bb = pop_config(BackboneConfig, settings)
    clf = import_official(checkpoint, names, model=bb.model, pretrained=bb.pretrained,
                          class_token_position=class_token_position, device=bb.device)
    click.echo(f"imported {len(names)} classes, context {tuple(clf.learner.ctx.shape)}; saved to {clf.save(out)}")
