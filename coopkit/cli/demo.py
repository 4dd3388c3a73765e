"""``coopkit demo``: the main job end to end on the embedded default (coopkit-tiny + the world).

Writes a few-shot task from :mod:`coopkit.world`, prints the zero-shot accuracy of the
hand-written prompt, fits CoOp (a short schedule, so that it runs in a few minutes on two CPU
cores), prints the CoOp accuracy, saves the run, exports ONNX and classifies a few test images
through the torch-free runtime.
Everything is written under ``--out``.

``coopkit demo --multilabel`` does the same for several labels per image: it writes the world's
multi-label task (scenes of 1 to 3 shapes; train, validation and test CSVs), fits every
registered multi-label method (zero-shot with a positive and a negative prompt, CoOp with a
sigmoid, DualCoOp) with per-label thresholds chosen on the validation images, prints their test
mAP and F1, saves the runs and labels a few test images.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import click

from ..config import BackboneConfig
from .base import command, config_options, pct

DEMO_TASK = "textures"
DEMO_EPOCHS = 200  # CoOp's schedule at 16 shots; about 10 s on two CPU cores with coopkit-tiny


@command("demo")
@click.option("--out", "out", type=click.Path(file_okay=False), default="coopkit-demo", show_default=True,
              help="Folder for the task, the run and the exported model (created if missing).")
@click.option("--task", type=str, default=None,
              help=f"Task of the embedded world (see coopkit.world.TASKS; default {DEMO_TASK}, or with --multilabel "
                   "one of coopkit.world.MULTILABEL_TASKS).")
@click.option("--shots", type=click.IntRange(1, 64), default=None, help="Training images per class (default 16).")
@click.option("--epochs", type=click.IntRange(1, 500), default=None,
              help=f"CoOp epochs (default {DEMO_EPOCHS}, the paper's schedule at 16 shots); with --multilabel: "
                   "the epochs of every method that trains (default: each method's own).")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the task images and of the fits.")
@click.option("--multilabel", is_flag=True, help="The multi-label demo: several labels per image (DualCoOp and its "
                                                 "baselines).")
@config_options(BackboneConfig, only=("device",))
def demo(out: str, task: Optional[str], shots: Optional[int], epochs: Optional[int], seed: int, multilabel: bool,
         device: str) -> None:
    """Run CoOp (or, with --multilabel, DualCoOp and its baselines) end to end on the embedded model and world,
    on a CPU."""
    from ..embedded import world

    if multilabel:
        if shots is not None:
            raise click.UsageError("--shots is the single-label demo's; the multi-label demo trains on its whole "
                                   "training split")
        _multilabel_demo(Path(out).resolve(), task or world.DEFAULT_MULTILABEL_TASK, epochs, seed, device)
        return
    task, shots, epochs = task or DEMO_TASK, shots or 16, epochs or DEMO_EPOCHS
    if task not in world.TASKS:
        raise click.BadParameter(f"unknown task {task!r}; valid: {', '.join(world.TASKS)}", param_hint="--task")
    from ..backbone import resolve_device
    from ..runs import check_run_target

    resolve_device(BackboneConfig(device=device).device)  # a bad name or no GPU: before anything is written
    out_dir = Path(out).resolve()
    check_run_target(out_dir / "run")  # the output folder can be written (and its run replaced)
    t0 = time.time()

    # 1. the task
    task_dir = out_dir / "task"
    click.echo(f"[1/5] writing task {task!r} ({shots} shots, 50 test images per class) to {task_dir}")
    world.write_task(task, task_dir, shots_per_class=shots, test_per_class=50, seed=seed)
    classes = world.task_classes(task)
    click.echo(f"      {len(classes)} classes: {', '.join(classes)}")

    import coopkit

    # 2. zero-shot
    backbone = coopkit.load_backbone("coopkit-tiny", pretrained="synthetic", device=device)
    template = "a photo of a {}."
    zs = coopkit.zero_shot(backbone, classes, templates=(template,))
    zs_acc = zs.evaluate(task_dir / "test")["accuracy"]
    click.echo(f"[2/5] zero-shot accuracy with {template!r}: {pct(zs_acc, 1)} (chance {pct(1 / len(classes), 1)})")

    # 3. CoOp
    note = "the paper's schedule" if epochs == 200 else "the paper uses 200 at 16 shots"
    click.echo(f"[3/5] fitting CoOp: 16 context vectors, {shots} shots, {epochs} epochs ({note}); "
               f"training views are the whole images, not CoOp's random crops")
    # The world's 64-pixel scenes show one whole object: CoOp's random resized crops (scale
    # 0.08-1, made for 224-pixel photos) cut it away and cost accuracy here (measured), so
    # the demo trains on the plain evaluation view of each image.
    clf = coopkit.fit(task_dir / "train", backbone=backbone, train=coopkit.TrainConfig(
        shots=shots, seed=seed, epochs=epochs, n_views=1, augment=False), progress=True)
    coop_acc = clf.evaluate(task_dir / "test")["accuracy"]
    click.echo(f"      CoOp accuracy: {pct(coop_acc, 1)} ({100 * (coop_acc - zs_acc):+.1f} points over zero-shot)")

    # 4. save
    run_dir = clf.save(out_dir / "run")
    click.echo(f"[4/5] saved the run to {run_dir}")

    # 5. export and serve
    _export_and_serve(clf, out_dir, task_dir, classes)
    click.echo(f"done in {time.time() - t0:.0f} s; everything is under {out_dir}")


def _export_and_serve(clf, out_dir: Path, task_dir: Path, classes: list[str]) -> None:
    """Export ONNX and classify one test image per class (up to 4) through the runtime."""
    from ..exporters import export_onnx
    from ..runtime import Classifier as RuntimeClassifier

    onnx_path = out_dir / "model.onnx"
    export_onnx(clf, onnx_path)
    click.echo(f"[5/5] exported {onnx_path}")
    rt = RuntimeClassifier(str(onnx_path))
    images = [sorted((task_dir / "test" / c).glob("*.png"))[0] for c in classes[:4]]
    preds = rt.predict([str(p) for p in images])
    click.echo(f"      runtime on {len(images)} test images, execution provider: {rt.provider}")
    for path, pred in zip(images, preds):
        click.echo(f"        {path.parent.name}/{path.name} -> {pred.label}")


def _multilabel_demo(out_dir: Path, task: str, epochs: Optional[int], seed: int, device: str) -> None:
    """Write a multi-label task, fit every multi-label method on it, print their test mAP and F1, save the
    runs and label a few test images with the best of them."""
    from ..embedded import world

    if task not in world.MULTILABEL_TASKS:
        raise click.BadParameter(f"unknown multi-label task {task!r}; valid: {', '.join(world.MULTILABEL_TASKS)}",
                                 param_hint="--task")
    from ..backbone import resolve_device
    from ..runs import check_run_target

    resolve_device(BackboneConfig(device=device).device)  # a bad name or no GPU: before anything is written
    t0 = time.time()
    import coopkit
    from ..multilabel_data import load_multilabel
    from ..research.multilabel import multilabel_methods, random_ranking_map

    backbone = coopkit.load_backbone("coopkit-tiny", pretrained="synthetic", device=device)
    methods = multilabel_methods(backbone=backbone)
    for spec in methods:
        check_run_target(out_dir / "runs" / spec.name)  # the runs can be written (and replaced)

    # 1. the task
    task_dir = out_dir / "task"
    click.echo(f"[1/4] writing multi-label task {task!r} (scenes of 1 to {world.MAX_OBJECTS} objects; train, val and "
               f"test CSVs) to {task_dir}")
    world.write_multilabel_task(task, task_dir, seed=seed)
    labels = world.multilabel_classes(task)
    click.echo(f"      {len(labels)} labels: {', '.join(labels)}")
    train, val, test = (load_multilabel(task_dir / f"{split}.csv", classnames=labels) for split in world.MULTILABEL_SPLITS)
    chance = random_ranking_map(test)
    overrides: dict[str, Any] = {} if epochs is None else {"epochs": epochs}

    # 2. fit and evaluate
    click.echo(f"[2/4] fitting the multi-label methods on {len(train)} images, thresholds chosen on {len(val)} "
               f"validation images; test on {len(test)} (a random ranking's mAP: about {pct(chance, 1)})")
    fitted = {}
    for spec in methods:  # epochs go to a method's own config, or unused to the training config of one without
        clf = coopkit.fit(train, backbone=backbone, method=spec.name, val=val, seed=seed, progress=False, **overrides)
        res = clf.evaluate(test)
        fitted[spec.name] = (clf, res["mAP"])
        click.echo(f"      {spec.name:<20} test mAP {pct(res['mAP'], 1):>6}   CF1 {pct(res['CF1'], 1):>6}   "
                   f"OF1 {pct(res['OF1'], 1):>6}")

    # 3. save
    for name, (clf, _) in fitted.items():
        clf.save(out_dir / "runs" / name)
    click.echo(f"[3/4] saved the runs to {out_dir / 'runs'}/<method>")

    # 4. label a few test images
    best = max(fitted, key=lambda n: fitted[n][1])
    clf = fitted[best][0]
    shown = test.select(range(4))
    probs = clf.probs(shown.paths)  # (4, labels)
    click.echo(f"[4/4] labels of {len(shown)} test images by {best} (best test mAP), above its per-label thresholds:")
    for i, path in enumerate(shown.paths):
        said = [c for c, p, t in zip(clf.classnames, probs[i], clf.model.thresholds.tolist()) if p > t]
        click.echo(f"        {Path(path).name}: {', '.join(said) or '(none)'}   (true: {', '.join(shown.labels_of(i))})")
    click.echo(f"done in {time.time() - t0:.0f} s; everything is under {out_dir}")
