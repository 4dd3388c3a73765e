"""CLI for the paper's experiments (``coopkit bench ...``), ``explain`` and ``import-official``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import click

from ..config import BackboneConfig, PromptConfig, TrainConfig
from ..research.protocols import DEFAULT_METHODS, METHODS, PROTOCOL_DEFAULTS, PROTOCOL_METHODS
from .base import LazyGroup, command, config_options, pop_config, print_table


def _strs(value: str, option: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"{option} is empty; give comma-separated values, e.g. {option} 1,2")
    return items


def _numbers(value: str, option: str, cast: Callable[[str], Any], what: str) -> list[Any]:
    items = _strs(value, option)
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise ValueError(f"{option} expects comma-separated {what}, got {value!r}") from None


def _ints(value: str, option: str) -> list[int]:
    return _numbers(value, option, int, "integers")


def _floats(value: str, option: str) -> list[float]:
    return _numbers(value, option, float, "numbers")


def _settings_option(fn: Any) -> Any:
    """``--set ROW.FIELD=VALUE`` (repeatable): a setting of one method's rows alone."""
    return click.option("--set", "row_settings", multiple=True, metavar="METHOD.FIELD=VALUE",
                        help="A setting of one method's rows alone, a field of its config (repeatable), e.g. "
                             "--set ivlp.prompt_depth_vision=0 --set clip-lora.encoder=text; VALUE is read as "
                             "JSON (numbers, true, null), else as text.")(fn)


def _append_option(fn: Any) -> Any:
    return click.option(
        "--append", is_flag=True,
        help="Keep the rows of other methods already in OUT/results.csv (a method run again replaces its own); "
             "the summary (and plot) cover them all: add a method to a report without running the others again.",
    )(fn)


def _row_settings(values: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """``("ivlp.prompt_depth_vision=0", ...)`` -> ``{"ivlp": {"prompt_depth_vision": 0}}``."""
    import json

    out: dict[str, dict[str, Any]] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        row, dot, name = key.strip().rpartition(".")
        if not sep or not dot or not row or not name:
            raise click.BadParameter(f"expected METHOD.FIELD=VALUE, got {item!r}", param_hint="--set")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        out.setdefault(row, {})[name] = value
    return out


@click.group("bench", cls=LazyGroup)
def bench() -> None:
    """The CoOp paper's experiments on your data: few-shot curves, domain shift, base-to-new, multi-label."""


def _dataset_options(fn: Any) -> Any:
    """``--dataset NAME --root DATA``: run the papers' protocol on an official dataset instead of --train/--test."""
    fn = click.option("--root", type=click.Path(), default=None,
                      help="With --dataset: the folder holding the datasets ($DATA of CoOp's DATASETS.md).")(fn)
    return click.option("--dataset", default=None,
                        help="An official dataset (coopkit datasets lists them): the papers' protocol, "
                             "backbone and epochs, beside their published numbers.")(fn)


def _protocol_backbone(experiment: str, dataset: Optional[str], bb: BackboneConfig) -> BackboneConfig:
    """With --dataset, the paper's backbone and weights, except for what --model / --pretrained gave."""
    from ..research.protocols import PAPER_BACKBONES

    if dataset is None:
        return bb
    model, pretrained = PAPER_BACKBONES[experiment]
    return BackboneConfig(model=_default_unless_given("model", bb.model, model),
                          pretrained=_default_unless_given("pretrained", bb.pretrained, pretrained), device=bb.device)


def _sources(dataset: Optional[str], root: Optional[str], train: Optional[str], test: Optional[str]) -> None:
    if dataset is not None:
        if root is None:
            raise click.UsageError("--dataset needs --root (the folder holding the datasets)")
        if train or test:
            raise click.UsageError("give --dataset NAME --root DATA or --train/--test, not both")
    elif not (train and test):
        raise click.UsageError("give --train and --test (or --dataset NAME --root DATA)")


def _read_official(dataset: Optional[str], root: Optional[str]) -> Any:
    """The official dataset of --dataset/--root (None without --dataset)."""
    if dataset is None:
        return None
    from ..official_datasets import load_official

    return load_official(dataset, root)  # type: ignore[arg-type]


def _default_unless_given(name: str, value: Any, protocol_value: Any) -> Any:
    from click.core import ParameterSource

    given = click.get_current_context().get_parameter_source(name) != ParameterSource.DEFAULT
    return value if given else protocol_value


@bench.command("fewshot")
@click.option("--train", "train", default=None, type=click.Path(), help="Training set (ImageFolder, CSV or split JSON).")
@click.option("--test", "test", default=None, type=click.Path(), help="Test set with the same classes.")
@_dataset_options
@config_options(BackboneConfig, exclude=("tokenizer", "text_model", "threads"))  # each fit picks its threads
@click.option("--shots", default="1,2,4,8,16", show_default=True, help="Comma-separated shots per class.")
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated seeds.")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True,
              help=f"Any of {', '.join(METHODS)}.")
@click.option("--n-ctx", default="16", show_default=True, help="Comma-separated context lengths (CoOp methods).")
@click.option("--position", default="end", show_default=True, help="Comma-separated class-token positions.")
@config_options(TrainConfig, only=("epochs", "n_views", "augment"))
@click.option("--val", type=click.Path(), default=None,
              help="Validation set Tip-Adapter searches alpha and beta on (with --dataset: the official one).")
@_settings_option
@click.option("--out", required=True, type=click.Path(), help="Folder for results.csv, summary.md, fewshot.png.")
@_append_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def fewshot_cmd(train: Optional[str], test: Optional[str], dataset: Optional[str], root: Optional[str], shots: str,
                seeds: str, methods: str, n_ctx: str, position: str, epochs: Optional[int], n_views: int,
                augment: bool, val: Optional[str], row_settings: tuple[str, ...], out: str, append: bool, quiet: bool,
                **settings: Any) -> None:
    """Accuracy against shots for each method, over seeds (the paper's Figure 3), with the few-shot
    baselines beside CoOp; top-1, top-5 and mean per-class accuracy."""
    from ..backbone import load_backbone
    from ..research.experiments import (
        appended,
        check_methods,
        check_seeds,
        check_settings,
        fewshot_curves,
        fewshot_paper_table,
        official_fewshot,
        write_fewshot_report,
    )
    from ..research.protocols import published_for

    _sources(dataset, root, train, test)
    common: dict[str, Any] = dict(
        shots=_ints(shots, "--shots"), seeds=check_seeds(_ints(seeds, "--seeds")),
        methods=check_methods(_strs(methods, "--methods")), n_ctx=_ints(n_ctx, "--n-ctx"),
        positions=_strs(position, "--position"), epochs=epochs, n_views=n_views, augment=augment, progress=not quiet)
    common["settings"] = check_settings(_row_settings(row_settings), common["methods"])
    official = _read_official(dataset, root)  # a missing layout fails before the model loads
    bb = _protocol_backbone("fewshot", dataset, pop_config(BackboneConfig, settings))
    common["backbone"] = load_backbone(bb.model, bb.pretrained, bb.device)
    if official is not None:
        name = official.spec.name
        rows = official_fewshot(official, **common)
        title = f"{name} ({bb.model}, {bb.pretrained or 'random init'})"
    else:
        rows = fewshot_curves(train, test, val=val, **common)
        name, title = None, f"{_task_name(train)} ({bb.model})"
    rows = appended(rows, out, append)
    table = fewshot_paper_table(rows, published_for("fewshot", name))
    files = write_fewshot_report(rows, out, title=title, extra="## In the papers' form (top-1 %)\n\n" + table)
    click.echo(table)
    click.echo(f"wrote {files['csv']} and {files['summary']} (top-1, top-5 and mean per-class accuracy)")
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
@click.option("--train", "train", default=None, type=click.Path())
@click.option("--test", "tests", multiple=True,
              help="NAME=PATH of a test set; repeat for the source test set and each shifted one.")
@_dataset_options
@click.option("--targets", default="imagenetv2,imagenet_sketch,imagenet_a,imagenet_r", show_default=True,
              help="With --dataset imagenet: the shifted test sets.")
@config_options(BackboneConfig, exclude=("tokenizer", "text_model", "threads"))  # each fit picks its threads
@config_options(TrainConfig, only=("shots",))
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated seeds.")
@config_options(TrainConfig, only=("epochs", "augment"))
@click.option("--methods", default=",".join(PROTOCOL_DEFAULTS["shift"]), show_default=True,
              help=f"Any of {', '.join(PROTOCOL_METHODS['shift'])}.")
@_settings_option
@click.option("--out", type=click.Path(), default=None, help="Also write results.csv and summary.md here.")
@_append_option
@click.option("-q", "--quiet", is_flag=True)
def shift_cmd(train: Optional[str], tests: tuple[str, ...], dataset: Optional[str], root: Optional[str], targets: str,
              shots: int, seeds: str, epochs: Optional[int], augment: bool, methods: str,
              row_settings: tuple[str, ...], out: Optional[str], append: bool, quiet: bool, **settings: Any) -> None:
    """Fit on a source task, compare zero-shot and the methods that train (CoOp...) on shifted test sets
    (the paper's Table 1)."""
    from ..backbone import load_backbone
    from ..research.experiments import (
        appended,
        check_seeds,
        check_settings,
        domain_shift,
        official_shift,
        protocol_methods,
        shift_report,
    )

    _sources(dataset, root, train, "x" if tests else None)
    common: dict[str, Any] = dict(shots=shots, seeds=check_seeds(_ints(seeds, "--seeds")), augment=augment,
                                  progress=not quiet,
                                  methods=[m.name for m in protocol_methods("shift", _strs(methods, "--methods"))])
    common["settings"] = check_settings(_row_settings(row_settings), common["methods"])
    if epochs is not None:
        common["epochs"] = epochs
    loaded = []
    if dataset is not None:
        from ..official_datasets import dataset_spec

        if dataset_spec(dataset).name != "imagenet":
            raise click.BadParameter("the shifted test sets are ImageNet's variants: use --dataset imagenet",
                                     param_hint="--dataset")
        loaded = [_read_official(n, root) for n in ("imagenet", *_strs(targets, "--targets"))]  # before the model
    bb = _protocol_backbone("shift", dataset, pop_config(BackboneConfig, settings))
    common["backbone"] = load_backbone(bb.model, bb.pretrained, bb.device)
    if loaded:
        rows = official_shift(None, source=loaded[0], targets=loaded[1:], **common)
        note = ("\nCoOp's Table 1 numbers could not be verified from a readable source here, so none are printed "
                "beside these.\n")
    else:
        named = {}
        for t in tests:
            if "=" not in t:
                raise click.BadParameter(f"expected NAME=PATH, got {t!r}", param_hint="--test")
            name, path = t.split("=", 1)
            named[name] = path
        rows = domain_shift(train, named, **common)
        note = ""
    rows = appended(rows, out, append)
    table, summary = shift_report(rows, note)
    click.echo(table)
    _write(out, rows, summary)


@bench.command("base2new")
@click.option("--train", "train", default=None, type=click.Path())
@click.option("--test", "test", default=None, type=click.Path())
@click.option("--base", default=None, help="Comma-separated base classes (trained on).")
@click.option("--new", default=None, help="Comma-separated new classes (never seen in training).")
@_dataset_options
@config_options(BackboneConfig, exclude=("tokenizer", "text_model", "threads"))  # each fit picks its threads
@click.option("--shots", default=16, show_default=True)
@click.option("--seeds", default="1,2,3", show_default=True)
@click.option("--kg-weight", "kg_weights", default="0", show_default=True,
              help="Comma-separated KgCoOp weights to compare (0 = plain CoOp; with --dataset: 0,8).")
@config_options(TrainConfig, only=("epochs", "augment"))
@click.option("--methods", default=",".join(PROTOCOL_DEFAULTS["base2new"]), show_default=True,
              help=f"Any of {', '.join(PROTOCOL_METHODS['base2new'])}.")
@_settings_option
@click.option("--out", type=click.Path(), default=None)
@_append_option
@click.option("-q", "--quiet", is_flag=True)
def base2new_cmd(train: Optional[str], test: Optional[str], base: Optional[str], new: Optional[str],
                 dataset: Optional[str], root: Optional[str], shots: int, seeds: str, kg_weights: str,
                 epochs: Optional[int], augment: bool, methods: str, row_settings: tuple[str, ...],
                 out: Optional[str], append: bool, quiet: bool, **settings: Any) -> None:
    """Fit on base classes; accuracy on base, on new classes, and their harmonic mean (CoCoOp protocol)."""
    from ..backbone import load_backbone
    from ..research.experiments import (
        appended,
        base2new_report,
        base_to_new,
        check_seeds,
        check_settings,
        official_base2new,
        protocol_methods,
    )
    from ..research.protocols import published_for

    _sources(dataset, root, train, test)
    common: dict[str, Any] = dict(shots=shots, seeds=check_seeds(_ints(seeds, "--seeds")), augment=augment,
                                  progress=not quiet,
                                  methods=[m.name for m in protocol_methods("base2new", _strs(methods, "--methods"))])
    common["settings"] = check_settings(_row_settings(row_settings), common["methods"])
    if dataset is None and not (base and new):
        raise click.UsageError("give --base and --new (or --dataset NAME --root DATA)")
    weights = _floats(_default_unless_given("kg_weights", kg_weights, "0,8" if dataset else kg_weights), "--kg-weight")
    if epochs is not None:
        common["epochs"] = epochs
    official = _read_official(dataset, root)  # a missing layout fails before the model loads
    bb = _protocol_backbone("base2new", dataset, pop_config(BackboneConfig, settings))
    common["backbone"] = load_backbone(bb.model, bb.pretrained, bb.device)
    if official is not None:
        rows = official_base2new(official, kg_weights=weights, **common)
        published = published_for("base2new", dataset)
    else:
        rows = base_to_new(train, test, _strs(base, "--base"), _strs(new, "--new"), kg_weights=weights, **common)
        published = []
    rows = appended(rows, out, append)
    tables, summary = base2new_report(rows, published)
    click.echo(tables)
    _write(out, rows, summary)


def _optional(value: str, option: str, parse: Callable[[str, str], list[Any]]) -> list[Any]:
    """A comma-separated list, or ``none`` for an empty one (a setting left out)."""
    return [] if value.strip().lower() == "none" else parse(value, option)


@bench.command("multilabel")
@click.option("--train", "train", required=True, type=click.Path(),
              help="Training pool: a multi-label CSV (path,labels[,unknown]) or JSON; its labels are the classes.")
@click.option("--test", "test", required=True, type=click.Path(), help="Test set (multi-label CSV or JSON).")
@click.option("--val", type=click.Path(), default=None,
              help="Validation set the per-label thresholds are chosen on (without one: 0.5).")
@click.option("--image-root", type=click.Path(), default=None, help="Root of relative paths in the CSV / JSON files.")
@config_options(BackboneConfig, exclude=("tokenizer", "text_model", "threads"))  # each fit picks its threads
@click.option("--shots", default="1,2,4,8", show_default=True,
              help="Few-shot rows: comma-separated known positives per label ('none': no few-shot rows).")
@click.option("--known", default="0.1,0.5,1", show_default=True,
              help="Partial-label rows: comma-separated fractions of training labels kept ('none': no such rows).")
@click.option("--seeds", default="1,2,3", show_default=True, help="Comma-separated seeds.")
@click.option("--methods", default=None,
              help="Comma-separated multi-label methods (default: every one the model can run).")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Epochs of every method that trains (default: each method's own).")
@click.option("--out", required=True, type=click.Path(),
              help="Folder for results.csv, results.json, summary.md, multilabel.png.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def multilabel_cmd(train: str, test: str, val: Optional[str], image_root: Optional[str], shots: str, known: str,
                   seeds: str, methods: Optional[str], epochs: Optional[int], out: str, quiet: bool,
                   **settings: Any) -> None:
    """mAP and F1 of the multi-label methods (zero-shot, CoOp with a sigmoid, DualCoOp, ...) against
    known positives per label (few-shot) and against the fraction of labels known (partial labels),
    at per-label thresholds chosen on --val."""
    from ..backbone import load_backbone
    from ..research.experiments import check_seeds
    from ..multilabel_data import load_multilabel
    from ..research.multilabel import multilabel_bench, multilabel_tables, random_ranking_map, write_multilabel_report

    chance = random_ranking_map(load_multilabel(test, image_root=image_root))  # a bad file fails before the model loads
    bb = pop_config(BackboneConfig, settings)
    backbone = load_backbone(bb.model, bb.pretrained, bb.device)
    rows = multilabel_bench(
        train, test, val=val, image_root=image_root, shots=_optional(shots, "--shots", _ints),
        known=_optional(known, "--known", _floats), seeds=check_seeds(_ints(seeds, "--seeds")),
        methods=_strs(methods, "--methods") if methods is not None else None, epochs=epochs, backbone=backbone,
        progress=not quiet)
    thresholds = "chosen on the validation set" if val else "0.5 (no validation set)"
    note = (f"{_task_name(train)}, {bb.model} ({bb.pretrained or 'random init'}); mean ± std over seeds (%); "
            f"F1 at per-label thresholds {thresholds}. A random ranking's test mAP: about {100 * chance:.1f}.")
    files = write_multilabel_report(rows, out, title=f"Multi-label: {_task_name(train)}", note=note)
    click.echo(multilabel_tables(rows))
    click.echo(f"wrote {files['csv']}, {files['json']} and {files['summary']}")
    if files["plot"]:
        click.echo(f"wrote {files['plot']}")
    else:
        click.echo("no plot: install matplotlib (pip install 'coopkit[plot]') to get multilabel.png")


@command("datasets")
@click.option("--root", type=click.Path(), default=None, help="Also read each dataset found under this folder.")
def datasets_cmd(root: Optional[str]) -> None:
    """The official datasets coopkit reads (--dataset NAME) and, with --root, which are present and their sizes."""
    from ..official_datasets import DATASETS, load_official

    rows = []
    for name, spec in DATASETS.items():
        status = spec.layout
        if root is not None:
            if not (Path(root) / spec.folder).is_dir():
                status = f"absent ({spec.folder}/)"
            else:
                try:
                    data = load_official(name, root)
                    sizes = ", ".join(f"{p} {len(d)}" for p, d in (("train", data.train), ("val", data.val),
                                                                    ("test", data.test)) if d is not None)
                    status = f"{len(data.classnames)} classes: {sizes}"
                except (ValueError, FileNotFoundError) as e:
                    status = f"unreadable: {e}"
        rows.append((f"{name} ({spec.official})", status))
    print_table(rows)


def _write(out: Optional[str], rows: list[dict[str, Any]], summary: str) -> None:
    if not out:
        return
    from ..research.experiments import write_summary

    files = write_summary(rows, out, summary)
    click.echo(f"wrote {files['csv']} and {files['summary']}")


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
@click.option("--classes-from", type=click.Path(), default=None,
              help="Dataset (split JSON, folder or CSV) whose class names, in label order, the run used.")
@click.option("--dataset", default=None, help="Or: the official dataset the run used (e.g. dtd; see coopkit datasets).")
@click.option("--root", type=click.Path(), default=None, help="With --dataset: the folder holding the datasets ($DATA).")
@click.option("--subsample", type=click.Choice(["all", "base", "new"]), default="all", show_default=True,
              help="With --dataset: the classes the run was trained on (base: a base-to-new run).")
@config_options(BackboneConfig, exclude=("tokenizer", "text_model", "threads"), defaults={"model": "RN50", "pretrained": "openai"})
@config_options(PromptConfig, only=("class_token_position",))
@click.option("--ctx-init", default=None,
              help="IVLP / MaPLe / PromptSRC: the run's CTX_INIT (default: the official configs' 'a photo of a').")
@click.option("--out", required=True, type=click.Path(), help="Folder to save the coopkit run to.")
def import_official_cmd(checkpoint: str, classes_from: Optional[str], dataset: Optional[str], root: Optional[str],
                        subsample: str, class_token_position: str, ctx_init: Optional[str], out: str,
                        **settings: Any) -> None:
    """Import what the official CoOp, KgCoOp, CoCoOp, IVLP, MaPLe or PromptSRC code learned (its model.pth.tar-N),
    or adapters saved by the official CLIP-LoRA code (save_lora's .pt; its settings come from the file).

    The file is read without running code from it.
    IVLP / MaPLe / PromptSRC were trained on OpenAI's ViT-B/16: --model ViT-B-16 --pretrained openai.
    """
    from ..runs import check_run_target
    from ..research.compat import import_official

    check_run_target(out)
    names = _official_classnames(classes_from, dataset, root, subsample)
    bb = pop_config(BackboneConfig, settings)
    clf = import_official(checkpoint, names, model=bb.model, pretrained=bb.pretrained,
                          class_token_position=class_token_position, device=bb.device, ctx_init=ctx_init)
    trainer = clf.config.metrics.get("official_trainer", "CoOp")
    what = (f"context {tuple(clf.learner.ctx.shape)}" if clf.learner is not None
            else "prompts " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in clf.model.state().items()))
    click.echo(f"imported {trainer} {what} for {len(names)} classes; saved to {clf.save(out)}")


def _official_classnames(classes_from: Optional[str], dataset: Optional[str], root: Optional[str],
                         subsample: str) -> list[str]:
    if (classes_from is None) == (dataset is None):
        raise click.UsageError("give either --classes-from PATH or --dataset NAME --root DATA")
    if classes_from is not None:
        from ..userdata import load_dataset

        return load_dataset(classes_from).classnames
    if root is None:
        raise click.UsageError("--dataset needs --root (the folder holding the datasets)")
    from ..userdata import Dataset, subsample_classes
    from ..official_datasets import load_official

    names = load_official(dataset, root).classnames
    return subsample_classes(Dataset([], names), subsample).classnames
