"""``coopkit bench multilabel`` and ``coopkit demo --multilabel`` end to end on coopkit-tiny and the world's
multi-label task (the real model and real fits, on short schedules)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

import coopkit
from coopkit import methods
from coopkit.cli import main
from coopkit.embedded import world
from coopkit.multilabel_data import few_shot_multilabel, load_multilabel
from coopkit.multilabel_metrics import f1_at, mean_average_precision
from coopkit.research.multilabel import multilabel_bench, multilabel_methods

#: Every registered multi-label method (the bench's default rows on a ResNet).
MULTILABEL = [m for m in methods.names() if methods.get(m).task == "multilabel"]


def test_bench_multilabel_writes_a_row_per_method_setting_and_seed(multilabel_task, tmp_path):
    out = tmp_path / "bench"
    task = multilabel_task
    res = CliRunner().invoke(main, [
        "bench", "multilabel", "--train", str(task / "train.csv"), "--val", str(task / "val.csv"),
        "--test", str(task / "test.csv"), "--device", "cpu", "--shots", "1,2", "--known", "0.5", "--seeds", "1,2",
        "--epochs", "2", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert len(MULTILABEL) >= 3 and {"dualcoop", "coop-sigmoid", "zeroshot-multilabel"} <= set(MULTILABEL)
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == len(MULTILABEL) * 3 * 2  # methods x (2 shots + 1 fraction) x 2 seeds
    assert {r["method"] for r in rows} == set(MULTILABEL)
    assert all(0 <= float(r[s]) <= 1 for r in rows for s in ("mAP", "CF1", "OF1", "CP", "CR", "OP", "OR"))
    for r in rows:
        if r["setting"] == "fewshot":
            assert int(r["shots"]) <= int(r["train_images"]) <= int(r["shots"]) * 8 and r["known"] == "1.0"
        else:
            assert r["shots"] == "" and r["known"] == "0.5" and r["train_images"] == "40"
    zs = {r["mAP"] for r in rows if r["method"] == "zeroshot-multilabel"}
    assert len(zs) == 1  # it trains nothing: the same scores whatever the training images
    assert json.loads((out / "results.json").read_text()) == [
        {**r, "shots": int(r["shots"]) if r["shots"] else None, "known": float(r["known"]), "seed": int(r["seed"]),
         "train_images": int(r["train_images"]), **{s: float(r[s]) for s in ("mAP", "CF1", "OF1", "CP", "CR", "OP", "OR")}}
        for r in rows]
    summary = (out / "summary.md").read_text()
    assert "## Few-shot" in summary and "## Partial labels" in summary and "±" in summary
    assert "chosen on the validation set" in summary and "A random ranking's test mAP: about" in summary
    assert all(f"| {m} |" in summary for m in MULTILABEL)
    assert (out / "multilabel.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Few-shot" in res.output


def test_bench_rows_are_the_fitted_models_test_scores(tiny_resnet, multilabel_task):
    """A row's mAP and F1 are those of the same fit scored independently: its probabilities on the test
    images, the metrics at the thresholds it chose on the validation set."""
    task = multilabel_task
    rows = multilabel_bench(task / "train.csv", task / "test.csv", val=task / "val.csv", shots=[2], known=[],
                            seeds=[3], methods=["coop-sigmoid"], epochs=3, backbone=tiny_resnet, progress=False)
    assert len(rows) == 1
    labels = world.multilabel_classes(world.DEFAULT_MULTILABEL_TASK)
    pool, val, test = (load_multilabel(task / f"{s}.csv", classnames=labels) for s in ("train", "val", "test"))
    clf = coopkit.fit(few_shot_multilabel(pool, 2, 3), backbone=tiny_resnet, method="coop-sigmoid", val=val,
                      seed=3, epochs=3, progress=False)
    probs = clf.probs(test.paths)
    assert rows[0]["train_images"] == len(few_shot_multilabel(pool, 2, 3))
    assert rows[0]["mAP"] == pytest.approx(mean_average_precision(probs, test.targets), abs=1e-6)
    f1 = f1_at(probs, test.targets, clf.model.thresholds.numpy())
    assert rows[0]["CF1"] == pytest.approx(f1["CF1"], abs=1e-6) and rows[0]["OF1"] == pytest.approx(f1["OF1"], abs=1e-6)
    assert not np.allclose(clf.model.thresholds.numpy(), 0.5)  # chosen on the validation set


def test_default_methods_are_those_the_backbone_can_run(tiny_resnet, tiny_backbone):
    assert [m.name for m in multilabel_methods(backbone=tiny_resnet)] == MULTILABEL
    on_vit = [m.name for m in multilabel_methods(backbone=tiny_backbone)]
    assert "dualcoop" not in on_vit and "coop-sigmoid" in on_vit  # DualCoOp needs a ResNet tower
    with pytest.raises(ValueError, match="ModifiedResNet"):
        multilabel_methods(["dualcoop"], tiny_backbone)
    with pytest.raises(ValueError, match="not multi-label methods; valid: .*dualcoop"):
        multilabel_methods(["coop"])


@pytest.mark.parametrize("bad, message", [
    (dict(shots=[0]), "shots must be integers >= 1"),
    (dict(known=[1.5]), r"known fractions must be in \(0, 1\]"),
    (dict(shots=[], known=[]), "nothing to run"),
    (dict(seeds=[]), "seeds must be a non-empty list"),
    (dict(epochs=0), "epochs must be an integer >= 1"),
])
def test_bench_refuses_bad_settings(tiny_resnet, multilabel_task, bad, message):
    task = multilabel_task
    with pytest.raises(ValueError, match=message):
        multilabel_bench(task / "train.csv", task / "test.csv", backbone=tiny_resnet, **bad)


def test_multilabel_demo_runs_end_to_end(tmp_path, monkeypatch):
    """`coopkit demo --multilabel`: the task, every multi-label method fitted and scored, the runs saved,
    a few test images labelled; everything under --out."""
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["demo", "--multilabel", "--out", str(out), "--epochs", "3"])
    assert res.exit_code == 0, res.output
    scores = dict(re.findall(r"^\s+(\S+)\s+test mAP\s+([\d.]+)%", res.output, flags=re.M))
    assert sorted(scores) == sorted(MULTILABEL)
    for name, printed in scores.items():
        clf = coopkit.load(out / "runs" / name)
        assert clf.multilabel
        assert 100 * clf.evaluate(out / "task" / "test.csv")["mAP"] == pytest.approx(float(printed), abs=0.051)
    truths = re.findall(r"^\s+(\d{4}\.png): .*\(true: (.*)\)$", res.output, flags=re.M)
    test = load_multilabel(out / "task" / "test.csv", classnames=world.multilabel_classes(world.DEFAULT_MULTILABEL_TASK))
    assert truths == [(f"{i:04d}.png", ", ".join(test.labels_of(i))) for i in range(4)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    res = CliRunner().invoke(main, ["demo", "--multilabel", "--out", str(out), "--shots", "4"])
    assert res.exit_code == 2 and "--shots is the single-label demo's" in res.output


def test_random_ranking_map_is_what_random_scores_reach(multilabel_task):
    from coopkit.multilabel_data import partial_labels
    from coopkit.research.multilabel import random_ranking_map

    test = partial_labels(load_multilabel(multilabel_task / "test.csv"), 0.7, seed=1)
    rng = np.random.default_rng(0)
    reached = np.mean([mean_average_precision(rng.random(test.targets.shape), test.targets) for _ in range(2000)])
    assert random_ranking_map(test) == pytest.approx(reached, abs=0.005)
    share = np.mean([(t == 1).sum() / (t != -1).sum() for t in test.targets.T])
    assert random_ranking_map(test) > share + 0.05  # on 32 images chance is well above the share of positives
