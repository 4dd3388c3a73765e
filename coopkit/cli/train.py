"""``coopkit fit``, ``coopkit eval`` and ``coopkit zeroshot``: training and evaluating on your data.

Their options are generated from :class:`~coopkit.config.BackboneConfig`,
:class:`~coopkit.config.TrainConfig` and every registered method's config (``coopkit fit
--method``; CoOp's :class:`~coopkit.config.PromptConfig` unprefixed, another method's option
prefixed with its name where the flag is taken, e.g. ``--clap-epochs``), so every training
setting is reachable here and each default is written once, beside its config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import click

from ..config import BackboneConfig, PromptConfig, TrainConfig
from .base import MethodOptions, command, config_options, emit, flag_of, pct, pop_config, print_table

IMAGE_ROOT_HELP = "Root of relative paths in CSV/split files."
OVERWRITE_HELP = "Save even over a folder that holds files other than a coopkit run (everything in it is replaced)."
DATASET_HELP = "Instead of DATA: an official dataset (coopkit datasets lists them), read from --root."
ROOT_HELP = "With --dataset: the folder holding the datasets ($DATA of CoOp's DATASETS.md)."


def _official(data: Optional[str], dataset: Optional[str], root: Optional[str]) -> Any:
    """The official dataset named by --dataset/--root, or None when DATA was given (exactly one of them)."""
    if (data is None) == (dataset is None):
        raise click.UsageError("give DATA or --dataset NAME --root DATA_ROOT (one of them)")
    if dataset is None:
        return None
    if root is None:
        raise click.UsageError("--dataset needs --root (the folder holding the datasets)")
    from ..official_datasets import load_official

    return load_official(dataset, root)


def _split_of(official: Any, split: str) -> Any:
    part = getattr(official, split, None) if split in ("train", "val", "test") else None
    if part is None:
        raise click.BadParameter(f"{official.spec.name} has no {split!r} split", param_hint="--split")
    return part


def _method_options() -> Any:
    """``--method`` and the options of every registered method's own config (CoOp's unprefixed)."""
    from ..methods import DEFAULT_METHOD, get, names

    trainable = [get(m) for m in names() if get(m).fit is not None]
    taken = {flag_of(f) for cls in (BackboneConfig, TrainConfig) for f in dataclasses.fields(cls)}
    taken |= {"--dataset", "--root", "--out", "--val", "--image-root", "--overwrite", "--json", "--quiet", "--method"}
    options = MethodOptions(trainable, taken, skip=(PromptConfig,))
    summaries = "; ".join(f"{m.name}: {m.summary}" for m in trainable)
    method = click.option("--method", type=click.Choice([m.name for m in trainable]), default=DEFAULT_METHOD,
                          show_default=True, help=f"The method to fit ({summaries}).")
    return options, method


FIT_METHOD_OPTIONS, METHOD_OPTION = _method_options()


@command("fit")
@click.argument("data", type=click.Path(), required=False)
@click.option("--dataset", default=None, help=DATASET_HELP + " Trains on the official few-shot draw of --shots, --seed.")
@click.option("--root", type=click.Path(), default=None, help=ROOT_HELP)
@click.option("--out", "out", required=True, type=click.Path(), help="Folder to save the run to.")
@METHOD_OPTION
@config_options(BackboneConfig)
@config_options(PromptConfig)
@config_options(TrainConfig)
@FIT_METHOD_OPTIONS
@click.option("--val", type=click.Path(), default=None, help="Labelled set evaluated after training.")
@click.option("--image-root", type=click.Path(), default=None, help=IMAGE_ROOT_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def fit_cmd(data: Optional[str], dataset: Optional[str], root: Optional[str], out: str, method: str,
            val: Optional[str], image_root: Optional[str], overwrite: bool, as_json: bool, quiet: bool,
            **settings: Any) -> None:
    """Fit a method (CoOp context vectors unless --method says otherwise) on DATA (ImageFolder dir,
    CSV of path,label, or CoOp split JSON) or on an official dataset (--dataset NAME --root DATA_ROOT)."""
    from ..methods import get
    from ..runs import check_run_target
    from ..train import fit

    bb = pop_config(BackboneConfig, settings)
    method_config = FIT_METHOD_OPTIONS.pop(get(method), settings, click.get_current_context())
    train = pop_config(TrainConfig, settings)
    official = _official(data, dataset, root)
    check_run_target(out, overwrite=overwrite)  # before training, not after
    source: Any = data
    if official is not None:
        from ..official_datasets import few_shot_official

        source = few_shot_official(official, train.shots, train.seed)[0]
    clf = fit(source, method=method, method_config=method_config, train=train, model=bb.model, pretrained=bb.pretrained, device=bb.device,
              threads=bb.threads, tokenizer=bb.tokenizer, text_model=bb.text_model, val=val, image_root=image_root,
              progress=not quiet)
    path = clf.save(out, overwrite=overwrite)
    m = clf.config.metrics
    emit({
        "run": str(path), "method": clf.method, "classes": len(clf.classnames), "train_images": m.get("train_images"),
        "epochs": m.get("epochs"), "train_loss": m.get("train_loss"), "train_accuracy": m.get("train_accuracy"),
        "val_accuracy": m.get("val_accuracy"), "seconds": m.get("seconds"),
    }, as_json)


def _emit_eval(res: dict[str, Any], method: str, per_class: bool, as_json: bool) -> None:
    if as_json:
        emit({"method": method, **res}, True)
        return
    print_table([("method", method), ("images", res["n"]), ("accuracy", pct(res["accuracy"])),
                 ("macro accuracy", pct(res["macro_accuracy"]))])
    if per_class:
        print_table([(f"  {c}", pct(a)) for c, a in res["per_class"].items()])


@command("eval")
@click.argument("run_dir", type=click.Path())
@click.argument("data", type=click.Path(), required=False)
@click.option("--dataset", default=None, help=DATASET_HELP)
@click.option("--root", type=click.Path(), default=None, help=ROOT_HELP)
@click.option("--split", default="test", show_default=True, help="Split of a CoOp split JSON or of --dataset.")
@click.option("--image-root", type=click.Path(), default=None, help=IMAGE_ROOT_HELP)
@config_options(BackboneConfig, only=("device", "threads"))
@click.option("--per-class", is_flag=True, help="Also print accuracy per class.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(run_dir: str, data: Optional[str], dataset: Optional[str], root: Optional[str], split: str,
             image_root: Optional[str], device: str, threads: Optional[int], per_class: bool, as_json: bool) -> None:
    """Evaluate a saved run (fit or zeroshot --out) on labelled DATA or an official dataset's split."""
    from ..classifier import load
    from ..features import torch_threads

    official = _official(data, dataset, root)
    source: Any = _split_of(official, split) if official is not None else data
    clf = load(run_dir, device=device)
    with torch_threads(threads):
        res = clf.evaluate(source, split=split, image_root=image_root, progress=not as_json)
    _emit_eval(res, clf.method, per_class, as_json)


@command("zeroshot")
@click.argument("data", type=click.Path(), required=False)
@click.option("--dataset", default=None, help=DATASET_HELP + " Its hand-written prompt is the default template.")
@click.option("--root", type=click.Path(), default=None, help=ROOT_HELP)
@config_options(BackboneConfig)
@click.option("--template", "templates", multiple=True,
              help="Prompt template with {} for the class name; repeat to ensemble. Default: 'a photo of a {}.'")
@click.option("--split", default="test", show_default=True, help="Split of a CoOp split JSON or of --dataset.")
@click.option("--image-root", type=click.Path(), default=None, help=IMAGE_ROOT_HELP)
@click.option("--out", type=click.Path(), default=None, help="Also save the zero-shot classifier as a run.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--per-class", is_flag=True, help="Also print accuracy per class.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def zeroshot_cmd(data: Optional[str], dataset: Optional[str], root: Optional[str], templates: tuple[str, ...],
                 split: str, image_root: Optional[str], out: Optional[str], overwrite: bool, per_class: bool,
                 as_json: bool, **settings: Any) -> None:
    """Evaluate hand-written prompts on labelled DATA or an official dataset (the zero-shot baseline)."""
    from ..backbone import load_backbone
    from ..methods.base import DEFAULT_TEMPLATES
    from ..runs import check_run_target
    from ..train import zero_shot
    from ..userdata import load_dataset
    from ..features import torch_threads

    bb = pop_config(BackboneConfig, settings)
    if out:
        check_run_target(out, overwrite=overwrite)
    official = _official(data, dataset, root)
    if official is not None:
        templates = templates or (official.spec.template,)
        labelled = _split_of(official, split)
    else:
        labelled = load_dataset(data, split=split, image_root=image_root)
    with torch_threads(bb.threads):
        clf = zero_shot(load_backbone(bb.model, bb.pretrained, bb.device, bb.tokenizer, bb.text_model),
                        labelled.classnames, templates or DEFAULT_TEMPLATES, threads=bb.threads)
        res = clf.evaluate(labelled, progress=not as_json)
    if out:
        clf.save(out, overwrite=overwrite)
    _emit_eval(res, clf.method, per_class, as_json)
