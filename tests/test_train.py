"""fit(): learning, determinism, save/load round trips, and failures."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

import coopkit
from coopkit.train import lr_at
from coopkit.config import TrainConfig


def _fit(bb, folder, **kw):
    args = dict(backbone=bb, shots=8, epochs=10, n_views=2, n_ctx=4, batch_size=8, progress=False)
    args.update(kw)
    return coopkit.fit(folder / "train", **args)


@pytest.fixture(scope="module")
def fitted(tiny_backbone, image_folder):
    return _fit(tiny_backbone, image_folder, csc=True)


def test_fit_lowers_loss_and_beats_chance(fitted, image_folder):
    loss = fitted.config.metrics["history"]["loss"]
    assert loss[-1] < loss[0] * 0.5, loss
    res = fitted.evaluate(image_folder / "test")
    assert res["n"] == 24
    assert res["accuracy"] > 0.5  # chance is 0.25
    assert set(res["per_class"]) == set(fitted.classnames)


def test_unified_context_fit_learns(tiny_backbone, image_folder):
    clf = _fit(tiny_backbone, image_folder, class_token_position="middle")
    assert clf.learner.ctx.ndim == 2
    loss = clf.config.metrics["history"]["loss"]
    assert loss[-1] < loss[0] * 0.5, loss
    assert clf.evaluate(image_folder / "test")["accuracy"] > 0.5


def test_seed_determinism(tiny_backbone, image_folder):
    a = _fit(tiny_backbone, image_folder, epochs=2, seed=5)
    b = _fit(tiny_backbone, image_folder, epochs=2, seed=5)
    c = _fit(tiny_backbone, image_folder, epochs=2, seed=6)
    assert torch.equal(a.learner.ctx, b.learner.ctx)
    assert not torch.equal(a.learner.ctx, c.learner.ctx)


def test_save_load_round_trip(fitted, tiny_backbone, image_folder, tmp_path):
    imgs = [str(p) for p in sorted((image_folder / "test").rglob("*.png"))[:5]]
    run = fitted.save(tmp_path / "run")
    assert sorted(os.listdir(run)) == ["config.json", "ctx.safetensors"]
    again = coopkit.load(run, device="cpu")  # loads its own backbone from the recorded config file
    np.testing.assert_array_equal(again.logits(imgs), fitted.logits(imgs))
    assert again.predict(imgs) == fitted.predict(imgs)
    assert again.config.metrics["history"] == fitted.config.metrics["history"]
    # Saving over an existing run replaces it.
    fitted.save(run)
    assert coopkit.load(run, backbone=tiny_backbone).classnames == fitted.classnames


def test_load_refuses_other_backbone_weights(fitted, tiny_config, tmp_path):
    run = fitted.save(tmp_path / "run")
    other = coopkit.load_backbone(str(tiny_config), pretrained=None, device="cpu")
    with torch.no_grad():
        other.model.ln_final.weight.add_(0.1)
    with pytest.raises(ValueError, match="backbone weights differ"):
        coopkit.load(run, backbone=other)


def test_load_detects_mismatched_or_corrupt_files(fitted, tmp_path):
    run = fitted.save(tmp_path / "run")
    (run / "ctx.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="does not match config.json"):
        coopkit.load(run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        coopkit.load(run)
    with pytest.raises(FileNotFoundError, match="not a coopkit run"):
        coopkit.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="run folder not found"):
        coopkit.load(tmp_path / "nope")


def test_interrupted_save_keeps_the_old_run(fitted, tmp_path, monkeypatch):
    import coopkit._io

    run = fitted.save(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def crash(*args, **kwargs):  # the disk "fails" when the new folder is flushed, before any rename
        raise OSError("simulated crash")

    monkeypatch.setattr(coopkit._io, "_fsync_tree", crash)
    with pytest.raises(OSError):
        fitted.save(run)
    with pytest.raises(OSError):
        fitted.save(tmp_path / "fresh")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    assert not (tmp_path / "fresh").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary leftovers, hidden ones included


def test_unreadable_images_are_skipped_or_fatal(tiny_backbone, image_folder, tmp_path, caplog):
    import shutil

    shutil.copytree(image_folder / "train", tmp_path / "train")
    (tmp_path / "train" / "red" / "zz_broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="coopkit"):
        clf = _fit(tiny_backbone, tmp_path, epochs=1, shots=9)
    assert clf.config.metrics["train_images"] == 32
    assert "zz_broken.png" in caplog.text
    with pytest.raises(ValueError, match="zz_broken.png"):
        _fit(tiny_backbone, tmp_path, epochs=1, shots=9, strict=True)


def test_nan_loss_names_the_epoch(tiny_backbone, image_folder):
    with pytest.raises(ValueError, match=r"at epoch \d+/3; lower lr \(now .*; this run already trains in fp32\)"):
        _fit(tiny_backbone, image_folder, epochs=3, lr=1e30, n_views=1)  # DivergedError: bad input (exit 2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"shots": 0}, "shots must be an integer >= 1"),
        ({"n_ctx": 0}, "n_ctx must be"),
        ({"class_token_position": "start"}, "unknown class_token_position"),
        ({"ctx_init": ""}, "ctx_init has no words"),
        ({"epochs": 0}, "epochs must be"),
        ({"n_views": 0}, "n_views must be"),
    ],
)
def test_bad_fit_arguments_fail_before_loading(image_folder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        coopkit.fit(image_folder / "train", model="no-such-model", **kwargs)


def test_lr_schedule_follows_the_recipe():
    cfg = TrainConfig(epochs=10)
    lrs = [lr_at(e, cfg) for e in range(10)]
    assert lrs[0] == pytest.approx(1e-5)
    assert lrs[1] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))
    assert TrainConfig(shots=1).resolved_epochs == 50 and TrainConfig(shots=4).resolved_epochs == 100
    assert TrainConfig(shots=16).resolved_epochs == 200


def test_zero_shot_template_ensemble(tiny_backbone, image_folder, tmp_path):
    names = ["blue", "green", "red", "yellow"]
    single = coopkit.zero_shot(tiny_backbone, names)
    ens = coopkit.zero_shot(tiny_backbone, names, ["a photo of a {}.", "a drawing of a {}."])
    tok = tiny_backbone.tokenizer
    with torch.no_grad():
        f1 = torch.nn.functional.normalize(tiny_backbone.model.encode_text(tok([f"a photo of a {n}." for n in names])), dim=-1)
        f2 = torch.nn.functional.normalize(tiny_backbone.model.encode_text(tok([f"a drawing of a {n}." for n in names])), dim=-1)
    torch.testing.assert_close(single.text_features(), f1)
    torch.testing.assert_close(ens.text_features(), torch.nn.functional.normalize(f1 + f2, dim=-1))
    run = ens.save(tmp_path / "zs")
    assert json.loads((run / "config.json").read_text())["templates"] == ["a photo of a {}.", "a drawing of a {}."]
    again = coopkit.load(run, backbone=tiny_backbone)
    torch.testing.assert_close(again.class_weights(), ens.class_weights())
    with pytest.raises(ValueError, match="exactly once"):
        coopkit.zero_shot(tiny_backbone, names, ["no placeholder"])


def test_logits_accept_paths_pil_and_arrays(fitted, image_folder):
    from PIL import Image

    path = sorted((image_folder / "test").rglob("*.png"))[0]
    pil = Image.open(path)
    arr = np.asarray(pil.convert("RGB"))
    out = fitted.logits([str(path), pil, arr])
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)
    np.testing.assert_allclose(out[0], out[2], atol=1e-6)
    with pytest.raises(ValueError, match="no images"):
        fitted.logits([])


def _v010_folder(root):
    """The 12 images the runs in tests/data were fitted and scored on by coopkit 0.1.0."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "sea_turtle": (40, 190, 60), "blue": (40, 60, 220)}
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            img = (np.array(rgb)[None, None] + rng.normal(0, 25, (40, 48, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_runs_saved_by_coopkit_0_1_0_load_unchanged(tmp_path):
    """config.json + ctx.safetensors written by the 0.1.0 code (before the configs became the
    interface) load with today's code and give the logits 0.1.0 computed (recorded then)."""
    data = __import__("pathlib").Path(__file__).parent / "data"
    expected = json.loads((data / "run-0.1.0-expected.json").read_text())
    folder = _v010_folder(tmp_path / "imgs")
    images = [str(folder / p) for p in expected["images"]]
    coop = coopkit.load(data / "run-0.1.0-coop", device="cpu")
    assert coop.config.coopkit_version == "0.1.0" and coop.learner.config.class_token_position == "middle"
    np.testing.assert_allclose(coop.logits(images), np.array(expected["coop_logits"]), atol=1e-5, rtol=0)
    zs = coopkit.load(data / "run-0.1.0-zeroshot", device="cpu", backbone=coop.backbone)
    assert zs.config.templates == ["a photo of a {}.", "a {} thing."]
    again = coopkit.zero_shot(coop.backbone, zs.classnames, zs.config.templates)
    np.testing.assert_array_equal(zs.logits(images), again.logits(images))


@pytest.mark.parametrize("method", ["coop", "zeroshot", "linear-probe", "clap", "tip-adapter", "tip-adapter-f"])
def test_runs_saved_by_coopkit_0_2_0_load_unchanged(tmp_path, method):
    """Runs of every method written by the 0.2.0 code (before the method registry) load with
    today's code and give the logits 0.2.0 computed (recorded then, on the shipped coopkit-tiny)."""
    data = __import__("pathlib").Path(__file__).parent / "data"
    expected = json.loads((data / "run-0.2.0-expected.json").read_text())
    folder = _v010_folder(tmp_path / "imgs")
    images = [str(folder / p) for p in expected["images"]]
    clf = coopkit.load(data / f"run-0.2.0-{method}", device="cpu")
    assert clf.method == method and clf.config.coopkit_version == "0.2.0"
    np.testing.assert_allclose(clf.logits(images), np.array(expected[f"{method}_logits"]), atol=1e-5, rtol=0)
    pred = clf.predict(images, top_k=1)
    assert [p.label for p in pred] == [clf.classnames[i] for i in np.argmax(expected[f"{method}_logits"], 1)]
