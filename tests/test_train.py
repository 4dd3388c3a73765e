"""fit(): learning, determinism, the learning-rate schedule, and failures (saving and loading runs: test_runs.py)."""

from __future__ import annotations

import json
import logging
import shutil

import types

import numpy as np
import pytest
import torch
from helpers import fit_tiny
from reference import dassl_lr_scheduler

import coopkit
from coopkit.train import lr_at
from coopkit.config import TrainConfig
from coopkit.methods.base import dassl_lr


def _fit(bb, folder, **kw):
    """A longer fit than :func:`helpers.fit_tiny`'s: 8 shots, 10 epochs, 2 views."""
    return fit_tiny(bb, folder, **{"shots": 8, "epochs": 10, "n_views": 2, **kw})


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


def _dassl_lrs(epochs: int, warmup: int, lr: float, warmup_lr: float) -> list[float]:
    """The rate of each epoch under the vendored Dassl ``build_lr_scheduler`` (constant warm-up, cosine),
    stepped once per epoch as Dassl's trainers do."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = dassl_lr_scheduler.build_lr_scheduler(opt, types.SimpleNamespace(
        LR_SCHEDULER="cosine", STEPSIZE=(-1,), GAMMA=0.1, MAX_EPOCH=epochs, WARMUP_EPOCH=warmup,
        WARMUP_RECOUNT=True, WARMUP_TYPE="constant", WARMUP_CONS_LR=warmup_lr))
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("epochs,warmup,lr", [(10, 1, 0.002), (3, 1, 0.002), (5, 0, 0.01), (50, 1, 0.1),
                                              (7, 2, 0.0035), (200, 1, 0.002), (1, 1, 0.002)])
def test_schedule_is_dassls_at_every_epoch(epochs, warmup, lr):
    """The one schedule (CoOp, CoCoOp, the deep-prompt methods, DualCoOp, CLAP) equals Dassl's scheduler."""
    ref = _dassl_lrs(epochs, warmup, lr, 1e-5)
    cfg = TrainConfig(epochs=epochs, warmup_epochs=warmup, lr=lr)
    for epoch in range(epochs):
        assert lr_at(epoch, cfg) == pytest.approx(ref[epoch], rel=1e-12, abs=0), epoch
        assert dassl_lr(epoch, lr=lr, epochs=epochs, warmup_epochs=warmup, warmup_lr=1e-5) == lr_at(epoch, cfg)


def test_coop_fit_trains_on_dassls_schedule(fitted):
    """The rates CoOp's fit recorded per epoch are the vendored Dassl scheduler's."""
    train = fitted.config.train
    ref = _dassl_lrs(train.resolved_epochs, train.warmup_epochs, train.lr, train.warmup_lr)
    assert fitted.config.metrics["history"]["lr"] == pytest.approx(ref, rel=1e-5, abs=1e-6)


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


# --- training refuses what cannot train -------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": float("nan")}, "lr must be a finite number > 0"),
    ({"lr": float("inf")}, "lr must be a finite number > 0"),
    ({"lr": 0.0}, "lr must be a finite number > 0"),
    ({"lr": True}, "lr must be a number, got True"),
    ({"epochs": True}, "epochs must be an integer >= 1 or None, got True"),
    ({"shots": True}, "shots must be an integer >= 1, got True"),
    ({"momentum": 1.0}, "momentum must be a finite number >= 0 and < 1"),
    ({"warmup_lr": float("nan")}, "warmup_lr must be a finite number > 0"),
])
def test_configs_refuse_what_cannot_train(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_one_class_and_bad_classnames_fail_before_the_model_loads(image_folder, tmp_path):
    one = tmp_path / "one"
    shutil.copytree(image_folder / "train" / "red", one / "red")
    with pytest.raises(ValueError, match=r"1 class \['red'\]; CoOp learns to tell classes apart and needs at least two"):
        coopkit.fit(one, model="no-such-model")
    for names, match in [(["red", "red"], "duplicate class names"), (["red", " "], "blank names"),
                         ("red", "must be a list of strings"), (["red"], "needs at least two")]:
        with pytest.raises(ValueError, match=match):
            coopkit.fit(image_folder / "train", classnames=names, model="no-such-model")


def test_non_finite_context_stops_training_naming_the_epoch(tiny_backbone, image_folder, monkeypatch):
    """The loss check fires first for a huge lr; here the context turns NaN while the loss of
    the step that did it was still finite, so the per-epoch context check is what stops it."""
    real_step = torch.optim.SGD.step

    def poisoned(self, closure=None):
        out = real_step(self, closure)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", poisoned)
    with pytest.raises(ValueError, match=r"context vectors became NaN or infinite at epoch 1/2"):  # DivergedError
        fit_tiny(tiny_backbone, image_folder)
