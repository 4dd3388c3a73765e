"""The paper's experiments as commands, the linear probe, KgCoOp, explain, and official-checkpoint import."""

from __future__ import annotations

import csv
import dataclasses
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import coopkit
from coopkit.classifier import Classifier
from coopkit.cli import main
from coopkit.config import PromptConfig, RunConfig
from coopkit.research.experiments import plot_fewshot
from coopkit.features import encode_images
from coopkit.research.interpret import nearest_words
from coopkit.methods.base import template_features
from coopkit.methods.coop import CoOpModel, kg_penalty
from coopkit.methods.linear_probe import fit_linear_probe
from coopkit.prompts import PromptLearner

NAMES = ["blue", "green", "red", "yellow"]


def _common(tiny_config):
    return ["--model", str(tiny_config), "--pretrained", "none", "--device", "cpu"]


def test_bench_fewshot_writes_csv_summary_and_plot(image_folder, tiny_config, tmp_path):
    out = tmp_path / "fs"
    res = CliRunner().invoke(main, ["bench", "fewshot", "--train", str(image_folder / "train"),
                                    "--test", str(image_folder / "test"), *_common(tiny_config),
                                    "--shots", "1,2", "--seeds", "1,2", "--methods",
                                    "zeroshot,zeroshot-ensemble,linear-probe,coop,coop-csc",
                                    "--epochs", "2", "--n-views", "1", "--no-augment", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {"method", "shots", "seed", "accuracy"} <= set(rows[0])
    # 2 zero-shot rows + (probe, coop, coop-csc) x 2 shots x 2 seeds
    assert len(rows) == 2 + 3 * 2 * 2
    assert {r["method"] for r in rows} == {"zeroshot", "zeroshot-ensemble", "linear-probe", "coop", "coop-csc"}
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert "±" in (out / "summary.md").read_text()
    assert (out / "fewshot.png").read_bytes()[:4] == b"\x89PNG"


def test_fewshot_rows_fit_maple_with_its_own_settings_not_coops_grid(tiny_backbone, image_folder):
    """MaPLe's config has an ``n_ctx`` field but MaPLe is not a CoOp prompt learner: its few-shot row is one
    fit with its own settings (not the n_ctx grid), scored as a plain ``coopkit.fit`` of the same shots."""
    from coopkit.methods import get
    from coopkit.methods.maple import MaPLeConfig
    from coopkit.research.experiments import fewshot_curves

    cfg = MaPLeConfig(prompt_depth=2, epochs=1)
    rows = fewshot_curves(image_folder / "train", image_folder / "test", backbone=tiny_backbone, shots=(2,),
                          seeds=(1,), methods=["maple", "coop"], n_ctx=(3,), epochs=1, n_views=1, configs=[cfg],
                          progress=False)
    by = {r["method"]: r for r in rows}
    assert by["coop"]["setting"] == "n_ctx=3,end"  # CoOp still runs the grid
    assert by["maple"]["setting"] == get("maple").bench_setting and "n_ctx" not in by["maple"]["setting"]
    ref = coopkit.fit(image_folder / "train", method="maple", method_config=cfg, backbone=tiny_backbone, shots=2,
                      seed=1, n_views=1, progress=False)
    assert ref.model.config.n_ctx == 2  # MaPLe's own default, not the grid's 3
    assert by["maple"]["accuracy"] == pytest.approx(ref.evaluate(image_folder / "test")["accuracy"], abs=1e-6)
    assert get("coop").prompt_grid and get("cocoop").prompt_grid and not get("maple").prompt_grid
    with pytest.raises(ValueError, match="prompt_grid needs a config with an n_ctx field"):
        dataclasses.replace(get("clap"), prompt_grid=True)


def test_prompt_grid_rows_say_what_was_learned_and_settings_apply_to_their_row(tiny_backbone, image_folder):
    """CoCoOp's default init words fix its context at their 4 tokens: one row per shots and seed, labelled
    with what was learned, not one per grid value labelled with the grid's; ``settings`` change one method's
    rows alone (IVLP with text prompts only), shown in the row and equal to a plain fit with them."""
    from coopkit.research.experiments import check_settings, fewshot_curves

    common = dict(backbone=tiny_backbone, shots=(1,), seeds=(1,), n_ctx=(3, 5), epochs=1, n_views=1, progress=False)
    text_only = {"prompt_depth_text": 2, "prompt_depth_vision": 0, "n_ctx_vision": 0, "epochs": 1}
    rows = fewshot_curves(image_folder / "train", image_folder / "test", methods=["cocoop", "ivlp"],
                          settings={"ivlp": text_only}, **common)
    assert [(r["method"], r["setting"]) for r in rows] == [
        ("cocoop", "n_ctx=4,init=a photo of a"),
        ("ivlp", "independent deep prompts (prompt_depth_text=2, prompt_depth_vision=0, n_ctx_vision=0, epochs=1)")]
    ref = coopkit.fit(image_folder / "train", method="ivlp", backbone=tiny_backbone, shots=1, seed=1, n_views=1,
                      progress=False, **text_only)
    assert ref.model.prompts().vision_ctx is None  # text prompts only
    assert rows[1]["accuracy"] == pytest.approx(ref.evaluate(image_folder / "test")["accuracy"], abs=1e-6)
    grid = fewshot_curves(image_folder / "train", image_folder / "test", methods=["cocoop"], ctx_init=None, **common)
    assert [r["setting"] for r in grid] == ["n_ctx=3", "n_ctx=5"]  # random init: the grid applies
    for bad, match in [({"maple": {"n_ctx": 1}}, "not among the rows run"),
                       ({"ivlp": {"depth": 1}}, r"ivlp: unknown settings \['depth'\]; ivlp's settings: batch_size"),
                       ({"ivlp": {"prompt_depth_vision": 0}}, "ivlp: n_ctx_vision=2 with prompt_depth_vision=0")]:
        with pytest.raises(ValueError, match=match):
            check_settings(bad, ["cocoop", "ivlp"])


def test_bench_set_option_is_checked_before_the_model_loads(image_folder, tmp_path):
    base = ["--train", str(image_folder / "train"), "--test", str(image_folder / "test"), "--model", "no-such-model"]
    for command, extra in [("fewshot", ["--methods", "coop,ivlp", "--out", str(tmp_path)]),
                           ("base2new", ["--base", "blue,green", "--new", "red,yellow", "--methods", "coop,ivlp"])]:
        res = CliRunner().invoke(main, ["bench", command, *base, *extra, "--set", "ivlp.prompt_depth_text=0"])
        assert res.exit_code == 2 and "ivlp: prompt_depth_text must be" in res.output, res.output
        res = CliRunner().invoke(main, ["bench", command, *base, *extra, "--set", "ivlp-depth"])
        assert res.exit_code == 2 and "expected METHOD.FIELD=VALUE, got 'ivlp-depth'" in res.output, res.output


def test_plot_is_optional(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    rows = [{"method": "coop", "setting": "s", "shots": 1, "seed": 1, "accuracy": 0.5}]
    assert plot_fewshot(rows, tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()


def test_unknown_method(image_folder, tiny_config, tmp_path):
    res = CliRunner().invoke(main, ["bench", "fewshot", "--train", str(image_folder / "train"), "--test",
                                    str(image_folder / "test"), *_common(tiny_config), "--methods", "coop,magic",
                                    "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown methods ['magic']" in res.output


def test_linear_probe_beats_chance(tiny_backbone, image_folder):
    train = coopkit.load_dataset(image_folder / "train")
    test = coopkit.load_dataset(image_folder / "test")
    ftr, _ = encode_images(tiny_backbone, train.paths)
    fte, _ = encode_images(tiny_backbone, test.paths)
    probe = fit_linear_probe(ftr[0], torch.tensor(train.labels), 4)
    assert probe.lam in [10.0 ** e for e in range(-6, 3)]
    assert probe.accuracy(fte[0], torch.tensor(test.labels)) > 0.6  # chance is 0.25


def test_kg_penalty_is_zero_when_context_reproduces_the_hand_prompt(tiny_backbone):
    hand = template_features(tiny_backbone, NAMES, ["a photo of a {}."])
    same = PromptLearner(tiny_backbone, NAMES, ctx_init="a photo of a")
    assert float(kg_penalty(same.text_features().detach(), hand)) == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(0)
    other = PromptLearner(tiny_backbone, NAMES, n_ctx=4)
    assert float(kg_penalty(other.text_features().detach(), hand)) > 1e-3


def test_kg_weight_pulls_towards_the_hand_prompt(tiny_backbone, image_folder):
    hand = template_features(tiny_backbone, NAMES, ["a photo of a {}."])
    dist = {}
    for kg in (0.0, 50.0):
        clf = coopkit.fit(image_folder / "train", backbone=tiny_backbone, shots=4, epochs=4, n_views=1,
                          ctx_init="a photo of a", lr=0.05, kg_weight=kg, progress=False)
        dist[kg] = float(kg_penalty(clf.text_features(), hand))
    assert dist[50.0] < dist[0.0]


def _untrained(bb, csc=False) -> Classifier:
    learner = PromptLearner(bb, NAMES, ctx_init="a photo of a", csc=csc)
    config = RunConfig(method="coop", classnames=NAMES, model=bb.name, model_config=bb.model_config,
                       backbone_sha256=bb.weights_sha256, prompt=PromptConfig(4, csc, "end", "a photo of a"))
    return Classifier(bb, config, CoOpModel(bb, learner))


@pytest.mark.parametrize("csc", [False, True])
def test_explain_returns_the_init_words(tiny_backbone, csc):
    words = nearest_words(_untrained(tiny_backbone, csc), top=3)
    assert list(words) == ([None] if not csc else NAMES)
    for vectors in words.values():
        assert [row[0][0] for row in vectors] == ["a", "photo", "of", "a"]
        assert all(row[0][1] < 1e-3 < row[1][1] and len(row) == 3 for row in vectors)


def test_explain_cli(tiny_backbone, tmp_path):
    run = _untrained(tiny_backbone).save(tmp_path / "run")
    res = CliRunner().invoke(main, ["explain", str(run), "--top", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "ctx 2" in res.output and "photo (0.00)" in res.output


def test_base2new_and_shift_commands(image_folder, tiny_config, tmp_path):
    common = [*_common(tiny_config), "--shots", "2", "--seeds", "1", "--epochs", "2", "-q"]
    res = CliRunner().invoke(main, ["bench", "base2new", "--train", str(image_folder / "train"), "--test",
                                    str(image_folder / "test"), "--base", "blue,green", "--new", "red,yellow",
                                    "--kg-weight", "0,1", *common, "--out", str(tmp_path / "b2n")])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "b2n" / "results.csv")))
    assert [r["method"] for r in rows] == ["zeroshot", "coop", "kgcoop", "cocoop"]  # the registry's base2new rows
    for r in rows:
        b, n, hm = float(r["base"]), float(r["new"]), float(r["hm"])
        assert hm == pytest.approx(0 if b + n == 0 else 2 * b * n / (b + n), abs=1e-5)
    res = CliRunner().invoke(main, ["bench", "shift", "--train", str(image_folder / "train"),
                                    "--test", f"same={image_folder / 'test'}", "--test", f"again={image_folder / 'train'}",
                                    *common])
    assert res.exit_code == 0, res.output
    assert "zeroshot" in res.output and "again" in res.output
    bad = CliRunner().invoke(main, ["bench", "base2new", "--train", str(image_folder / "train"), "--test",
                                    str(image_folder / "test"), "--base", "blue,red", "--new", "red", *common])
    assert bad.exit_code == 2 and "both base and new" in bad.output


def test_append_adds_a_method_to_a_report(image_folder, tiny_config, tmp_path):
    """``--append`` keeps the other methods' rows of OUT/results.csv and replaces the rerun method's."""
    common = [*_common(tiny_config), "--shots", "2", "--seeds", "1", "--epochs", "1", "-q", "--out", str(tmp_path)]
    shift = ["bench", "shift", "--train", str(image_folder / "train"), "--test", f"same={image_folder / 'test'}"]
    res = CliRunner().invoke(main, [*shift, "--methods", "zeroshot,coop", *common])
    assert res.exit_code == 0, res.output
    first = list(csv.DictReader(open(tmp_path / "results.csv")))
    res = CliRunner().invoke(main, [*shift, "--methods", "zeroshot,cocoop", *common, "--append"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    # coop's row kept as written, zero-shot's replaced (once), cocoop's added; the summary covers all three
    assert [r["method"] for r in rows] == ["coop", "zeroshot", "cocoop"]
    assert rows[0] == next(r for r in first if r["method"] == "coop")
    summary = (tmp_path / "summary.md").read_text()
    assert all(f"| {m} | same |" in summary for m in ("zeroshot", "coop", "cocoop"))
    # without --append the file holds this run's rows alone
    res = CliRunner().invoke(main, [*shift, "--methods", "zeroshot", *common])
    assert res.exit_code == 0, res.output
    assert [r["method"] for r in csv.DictReader(open(tmp_path / "results.csv"))] == ["zeroshot"]


# --- the papers' protocols on the official layouts (tiny fake copies; mechanics only) -------------


def test_bench_fewshot_on_an_official_dataset_prints_the_published_row(official_root, tiny_config, tmp_path):
    out = tmp_path / "dtd"
    res = CliRunner().invoke(main, ["bench", "fewshot", "--dataset", "DescribableTextures", "--root", str(official_root),
                                    *_common(tiny_config), "--shots", "1", "--seeds", "1", "--epochs", "1",
                                    "--n-views", "1", "--no-augment", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["method"] for r in rows} == {"zeroshot", "linear-probe", "clap", "tip-adapter", "tip-adapter-f", "coop",
                                           "coop-csc"}
    assert next(r for r in rows if r["method"] == "zeroshot")["setting"] == "{} texture."  # dtd's hand prompt
    assert next(r for r in rows if r["method"] == "tip-adapter")["setting"] == "searched on val"
    for r in rows:
        assert 0 <= float(r["accuracy"]) <= float(r["top5"]) <= 1 and 0 <= float(r["macro"]) <= 1
    # beside them, Tip-Adapter's published 1-shot DTD numbers (RN50), with their source
    assert "| published: Tip-Adapter, RN50* |  | 46.22 |" in res.output
    assert "| published: Tip-Adapter-F, RN50* |  | 49.65 |" in res.output and "exp.log" in res.output
    summary = (out / "summary.md").read_text()
    assert "| method | setting | shots | accuracy | top5 | macro | seeds |" in summary and "46.22" in summary


def test_scores_restrict_to_the_test_sets_classes_top5_and_macro(tiny_backbone, official_root):
    from coopkit.official_datasets import load_official
    from coopkit.research.experiments import domain_shift

    imagenet, adv = load_official("imagenet", official_root), load_official("imagenet_a", official_root)
    rows = domain_shift(imagenet.train, {"a": adv.test, "in": imagenet.test}, backbone=tiny_backbone, seeds=(1,),
                        shots=1, epochs=1, n_views=1, templates=["a photo of a {}."], progress=False)
    rows = [r for r in rows if r["method"] == "zeroshot"]
    # independently: the zero-shot logits of ImageNet-A's images, among its own 2 classes only
    zs = coopkit.zero_shot(tiny_backbone, imagenet.classnames)
    cols = [imagenet.classnames.index(c) for c in adv.classnames]
    pred = zs.logits(adv.test.paths)[:, cols].argmax(1)
    labels = torch.tensor(adv.test.labels)
    got = {r["test"]: r for r in rows}
    assert got["a"]["accuracy"] == pytest.approx(float((torch.from_numpy(pred) == labels).float().mean()), abs=1e-6)
    assert got["a"]["top5"] == 1.0  # 2 classes: top-5 holds both
    logits = zs.logits(imagenet.test.paths)
    hit = logits.argmax(1) == np.array(imagenet.test.labels)
    per_class = [hit[np.array(imagenet.test.labels) == c].mean() for c in range(4)]
    assert got["in"]["macro"] == pytest.approx(float(np.mean(per_class)), abs=1e-6)


def test_bench_base2new_and_shift_on_official_datasets(official_root, tiny_config, tmp_path):
    common = [*_common(tiny_config), "--seeds", "1", "--epochs", "1", "-q"]
    res = CliRunner().invoke(main, ["bench", "base2new", "--dataset", "caltech101", "--root", str(official_root),
                                    *common, "--out", str(tmp_path / "b2n")])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(open(tmp_path / "b2n" / "results.csv")))
    assert [(r["method"], float(r["kg_weight"])) for r in rows] == [("zeroshot", 0), ("coop", 0), ("kgcoop", 8),
                                                                    ("cocoop", 0)]
    assert {"base_top5", "base_macro", "new_top5", "new_macro"} <= set(rows[0])
    # CoCoOp's Table 1 row for Caltech101 (CLIP and CoOp, then CoCoOp from another reprint), then the averages
    assert "| published: CoOp, ViT-B/16* | 98.00 | 89.81 | 93.73 |" in res.output
    assert "| published: CoCoOp, ViT-B/16** | 97.96 | 93.81 | 95.84 |" in res.output
    assert "| published: CoCoOp, ViT-B/16*** | 80.47 | 71.69 | 75.83 |" in res.output
    assert "average over the 11 datasets" in res.output and "RMAdapter" in res.output
    res = CliRunner().invoke(main, ["bench", "shift", "--dataset", "imagenet", "--root", str(official_root), "--shots",
                                    "2", *common])
    assert res.exit_code == 0, res.output
    for name in ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        assert f"| coop | {name} |" in res.output
    assert "could not be verified" in res.output
    bad = CliRunner().invoke(main, ["bench", "shift", "--dataset", "dtd", "--root", str(official_root), *common])
    assert bad.exit_code == 2 and "use --dataset imagenet" in bad.output
    bad = CliRunner().invoke(main, ["bench", "fewshot", "--dataset", "dtd", *common, "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--dataset needs --root" in bad.output
    for cmd in (["fewshot", "--out", str(tmp_path / "x")], ["base2new"], ["shift"]):  # the layout fails first
        bad = CliRunner().invoke(main, ["bench", *cmd, "--dataset", "imagenet", "--root", str(tmp_path / "none"),
                                        "--model", "no-such-model"])
        assert bad.exit_code == 2 and "dataset root not found" in bad.output, bad.output


def test_fit_eval_and_zeroshot_on_an_official_dataset(official_root, tiny_config, tmp_path):
    from coopkit.official_datasets import few_shot_official, load_official

    common = [*_common(tiny_config)]
    res = CliRunner().invoke(main, ["fit", "--dataset", "oxford_pets", "--root", str(official_root), *common, "--shots",
                                    "2", "--seed", "3", "--epochs", "1", "--n-views", "1", "--out", str(tmp_path / "run"),
                                    "-q", "--json"])
    assert res.exit_code == 0, res.output
    clf = coopkit.load(tmp_path / "run")
    pets = load_official("oxford_pets", official_root)
    assert clf.classnames == pets.classnames == ["abyssinian", "american bulldog", "bengal", "yorkshire terrier"]
    assert clf.config.metrics["train_images"] == len(few_shot_official(pets, 2, 3)[0]) == 8
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--dataset", "oxford_pets", "--root",
                                    str(official_root), "--device", "cpu", "--json"])
    assert res.exit_code == 0 and '"n": 8' in res.output
    res = CliRunner().invoke(main, ["zeroshot", "--dataset", "oxford_pets", "--root", str(official_root), *common,
                                    "--out", str(tmp_path / "zs"), "--json"])
    assert res.exit_code == 0, res.output
    assert coopkit.load(tmp_path / "zs").config.templates == ["a photo of a {}, a type of pet."]
    res = CliRunner().invoke(main, ["datasets", "--root", str(official_root)])
    assert res.exit_code == 0 and "imagenet_a (ImageNetA)" in res.output and "2 classes: test 2" in res.output


def test_published_base2new_rows_agree_with_the_published_averages():
    """The per-dataset rows (typed from reprints of CoCoOp's Table 1) must average to the averages
    typed from MaPLe's README, and each row's H must be the harmonic mean of its base and new."""
    from coopkit.official_datasets import FEWSHOT_DATASETS
    from coopkit.research.protocols import BASE2NEW_AVERAGES, published_for

    averages = {p.method: p.values for p in BASE2NEW_AVERAGES if "MaPLe" in p.source}
    names = list(FEWSHOT_DATASETS)
    assert len(names) == 11
    for method in ("CLIP", "CoOp", "CoCoOp"):
        rows = [next(p for p in published_for("base2new", n) if p.method == method and "Table 1" in p.source)
                for n in names]
        for col in ("base", "new"):
            assert np.mean([r.values[col] for r in rows]) == pytest.approx(averages[method][col], abs=0.006), (method, col)
        for r in rows:
            b, n = r.values["base"], r.values["new"]
            assert r.values["hm"] == pytest.approx(2 * b * n / (b + n), abs=0.011), (method, r.values)
    coop = {p.method: p.values for p in published_for("fewshot", "imagenet")}["CoOp"]
    assert coop[16] == 62.95 and set(coop) == {1, 2, 4, 8, 16}
