"""The embedded default: coopkit-tiny's shipped weights, offline loading, and that it learns."""

from __future__ import annotations

import hashlib
import json
import socket

import numpy as np
import pytest

from coopkit.embedded import world

ASSETS = __import__("pathlib").Path(__file__).resolve().parents[1] / "coopkit" / "embedded" / "assets"
WEIGHTS = ASSETS / "coopkit-tiny.safetensors"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_checkpoint_checksum_and_size():
    expected = (ASSETS / "coopkit-tiny.sha256").read_text().split()[0]
    assert len(expected) == 64
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == expected
    assert WEIGHTS.stat().st_size <= 25 * 1024 * 1024


def test_config_is_open_clip_format_with_clip_bpe():
    cfg = json.loads((ASSETS / "coopkit-tiny.json").read_text())
    assert set(cfg) >= {"embed_dim", "vision_cfg", "text_cfg"}
    assert cfg["text_cfg"]["vocab_size"] == 49408
    # SOS + 16 context vectors + a class name of up to 6 tokens + "." + EOT
    assert cfg["text_cfg"]["context_length"] >= 1 + 16 + 6 + 1 + 1


def test_checkpoint_keys_are_open_clip_state_dict():
    from safetensors.torch import load_file

    from coopkit.embedded.pretrain import create_model

    model, _, _ = create_model()
    sd = load_file(str(WEIGHTS))
    assert set(sd) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert sd[k].shape == v.shape, k


def test_loads_offline_with_its_weights(no_network):
    import coopkit
    from safetensors.torch import load_file

    bb = coopkit.load_backbone("coopkit-tiny", pretrained="synthetic", device="cpu")
    shipped = load_file(str(WEIGHTS))
    sd = bb.model.state_dict()
    for key in ("token_embedding.weight", "visual.conv1.weight", "text_projection", "logit_scale"):
        assert np.array_equal(sd[key].float().numpy(), shipped[key].float().numpy()), key
    # the real CLIP BPE tokenizer, as open_clip ships it
    import open_clip

    ids = bb.tokenizer(["a sketch of a red circle."])[0].tolist()
    ref = open_clip.SimpleTokenizer().encode("a sketch of a red circle.")
    assert ids[1:1 + len(ref)] == ref and ids[0] == 49406 and ids[1 + len(ref)] == 49407


def test_random_init_is_not_the_shipped_model(no_network):
    import coopkit

    a = coopkit.load_backbone("coopkit-tiny", pretrained="synthetic", device="cpu")
    b = coopkit.load_backbone("coopkit-tiny", pretrained=None, device="cpu")
    assert a.weights_sha256 != b.weights_sha256


def _zero_shot_acc(bb, task_dir, classes):
    import coopkit

    return coopkit.zero_shot(bb, classes, templates=("a photo of a {}.",)).evaluate(task_dir / "test")["accuracy"]


def test_zero_shot_above_chance_on_every_task(tmp_path, no_network):
    import coopkit

    bb = coopkit.load_backbone("coopkit-tiny", pretrained="synthetic", device="cpu")
    # measured at 50 test images per class: shapes 25% (chance 12.5%), colors 72%,
    # textures 55%, colored_shapes 22% (chance 4%); shapes is the weak spot of coopkit-tiny
    for task in world.TASKS:
        d = world.write_task(task, tmp_path / task, shots_per_class=0, test_per_class=25, seed=11)
        classes = world.task_classes(task)
        acc = _zero_shot_acc(bb, d, classes)
        factor = 1.25 if task == "shapes" else 2.0
        assert acc > factor / len(classes), (task, acc)


def test_random_init_is_at_chance(tmp_path, no_network):
    """The same check fails without the pretrained weights, so the one above can fail too."""
    import coopkit

    bb = coopkit.load_backbone("coopkit-tiny", pretrained=None, device="cpu")
    d = world.write_task("colors", tmp_path, shots_per_class=0, test_per_class=15, seed=11)
    classes = world.task_classes("colors")
    assert _zero_shot_acc(bb, d, classes) < 2.0 / len(classes)


@pytest.mark.slow
def test_small_fit_beats_zero_shot(tmp_path, no_network):
    import coopkit

    task = "textures"
    d = world.write_task(task, tmp_path, shots_per_class=16, test_per_class=25, seed=5)
    classes = world.task_classes(task)
    bb = coopkit.load_backbone("coopkit-tiny", pretrained="synthetic", device="cpu")
    zs = _zero_shot_acc(bb, d, classes)
    clf = coopkit.fit(d / "train", backbone=bb, shots=16, seed=1, epochs=40, n_views=1, augment=False,
                      progress=False)  # whole-image views (see coopkit/_cli_demo.py)
    coop = clf.evaluate(d / "test")["accuracy"]
    assert coop > zs + 0.05, (zs, coop)


def test_pretraining_is_a_function_of_its_seed(tmp_path):
    from coopkit.embedded.pretrain import PretrainConfig, pretrain

    cfg = dict(steps=2, stop_after=0, batch_size=8, pool_size=32, warmup=1)
    a = pretrain(PretrainConfig(seed=3, **cfg), tmp_path / "a")["sha256"]
    b = pretrain(PretrainConfig(seed=3, **cfg), tmp_path / "b")["sha256"]
    c = pretrain(PretrainConfig(seed=4, **cfg), tmp_path / "c")["sha256"]
    assert a == b != c
    assert (tmp_path / "a" / "coopkit-tiny.sha256").read_text().strip() == a


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, no_network, monkeypatch):
    """`coopkit demo`: task, zero-shot, CoOp, save, export, runtime; everything under --out."""
    import re

    from click.testing import CliRunner

    from coopkit.cli import main

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--epochs", "20"])
    assert res.exit_code == 0, res.output
    zs, coop = (float(v) for v in re.findall(r"accuracy[^:]*: ([\d.]+)%", res.output))
    assert 0 < zs <= 100 and 0 < coop <= 100
    assert "execution provider: CPUExecutionProvider" in res.output
    predictions = re.findall(r"^\s+(\w+)/0000\.png -> (\w+)$", res.output, flags=re.M)
    classes = world.task_classes("textures")
    assert [p[0] for p in predictions] == classes[:4] and all(p[1] in classes for p in predictions)
    assert (out / "model.onnx").is_file() and (out / "run" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
