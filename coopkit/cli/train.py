"""``coopkit fit``, ``coopkit eval`` and ``coopkit zeroshot``: training and evaluating on your data.

Their options are generated from :class:`~coopkit.config.BackboneConfig`,
:class:`~coopkit.config.PromptConfig` and :class:`~coopkit.config.TrainConfig`, so every
training setting is reachable here and each default is written once, in :mod:`coopkit.config`.
"""

from __future__ import annotations

from typing import Any, Optional

import click

from ..config import BackboneConfig, PromptConfig, TrainConfig
from .base import command, config_options, emit, pct, pop_config, print_table

IMAGE_ROOT_HELP = "Root of relative paths in CSV/split files."
OVERWRITE_HELP = "Save even over a folder that holds files other than a coopkit run (everything in it is replaced)."


@command("fit")
@click.argument("data", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(), help="Folder to save the run to.")
@config_options(BackboneConfig)
@config_options(PromptConfig)
@config_options(TrainConfig)
@click.option("--val", type=click.Path(), default=None, help="Labelled set evaluated after training.")
@click.option("--image-root", type=click.Path(), default=None, help=IMAGE_ROOT_HELP)
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def fit_cmd(data: str, out: str, val: Optional[str], image_root: Optional[str], overwrite: bool, as_json: bool,
            quiet: bool, **settings: Any) -> None:
    """Fit CoOp context vectors on DATA (ImageFolder dir, CSV of path,label, or CoOp split JSON)."""
    from ..classifier import check_run_target
    from ..train import fit

    bb = pop_config(BackboneConfig, settings)
    prompt, train = pop_config(PromptConfig, settings), pop_config(TrainConfig, settings)
    check_run_target(out, overwrite=overwrite)  # before training, not after
    clf = fit(data, prompt=prompt, train=train, model=bb.model, pretrained=bb.pretrained, device=bb.device,
              threads=bb.threads, tokenizer=bb.tokenizer, text_model=bb.text_model, val=val, image_root=image_root,
              progress=not quiet)
    path = clf.save(out, overwrite=overwrite)
    m = clf.config.metrics
    emit({
        "run": str(path), "classes": len(clf.classnames), "train_images": m["train_images"],
        "epochs": m["epochs"], "train_loss": m["train_loss"], "train_accuracy": m["train_accuracy"],
        "val_accuracy": m.get("val_accuracy"), "seconds": m["seconds"],
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
@click.argument("data", type=click.Path())
@click.option("--split", default="test", show_default=True, help="Split of a CoOp split JSON.")
@click.option("--image-root", type=click.Path(), default=None, help=IMAGE_ROOT_HELP)
@config_options(BackboneConfig, only=("device", "threads"))
@click.option("--per-class", is_flag=True, help="Also print accuracy per class.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(run_dir: str, data: str, split: str, image_root: Optional[str], device: str, threads: Optional[int],
             per_class: bool, as_json: bool) -> None:
    """Evaluate a saved run (fit or zeroshot --out) on labelled DATA."""
    from ..classifier import load
    from ..features import torch_threads

    clf = load(run_dir, device=device)
    with torch_threads(threads):
        res = clf.evaluate(data, split=split, image_root=image_root, progress=not as_json)
    _emit_eval(res, clf.method, per_class, as_json)


@command("zeroshot")
@click.argument("data", type=click.Path())
@config_options(BackboneConfig)
@click.option("--template", "templates", multiple=True,
              help="Prompt template with {} for the class name; repeat to ensemble. Default: 'a photo of a {}.'")
@click.option("--split", default="test", show_default=True, help="Split of a CoOp split JSON.")
@click.option("--image-root", type=click.Path(), default=None, help=IMAGE_ROOT_HELP)
@click.option("--out", type=click.Path(), default=None, help="Also save the zero-shot classifier as a run.")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@click.option("--per-class", is_flag=True, help="Also print accuracy per class.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def zeroshot_cmd(data: str, templates: tuple[str, ...], split: str, image_root: Optional[str], out: Optional[str],
                 overwrite: bool, per_class: bool, as_json: bool, **settings: Any) -> None:
    """Evaluate hand-written prompts on labelled DATA (the zero-shot baseline)."""
    from ..backbone import load_backbone
    from ..classifier import DEFAULT_TEMPLATES, check_run_target, zero_shot
    from ..data import load_dataset
    from ..features import torch_threads

    bb = pop_config(BackboneConfig, settings)
    if out:
        check_run_target(out, overwrite=overwrite)
    dataset = load_dataset(data, split=split, image_root=image_root)
    with torch_threads(bb.threads):
        clf = zero_shot(load_backbone(bb.model, bb.pretrained, bb.device, bb.tokenizer, bb.text_model),
                        dataset.classnames, templates or DEFAULT_TEMPLATES, threads=bb.threads)
        res = clf.evaluate(dataset, progress=not as_json)
    if out:
        clf.save(out, overwrite=overwrite)
    _emit_eval(res, "zeroshot", per_class, as_json)
