"""load_backbone(): names, tags, config files, checkpoints, errors; import stays torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import coopkit


def test_unknown_model_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean.*ViT-B-32"):
        coopkit.load_backbone("ViT-B-33")


def test_unknown_tag_lists_valid_tags():
    with pytest.raises(ValueError, match="valid tags: .*openai"):
        coopkit.load_backbone("ViT-B-32", pretrained="not-a-tag")


def test_missing_paths():
    with pytest.raises(FileNotFoundError, match="model config file not found"):
        coopkit.load_backbone("/nowhere/model.json")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        coopkit.load_backbone("ViT-B-32", pretrained="/nowhere/weights.pt")


def test_bad_device():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        coopkit.load_backbone("ViT-B-32", device="tpu")


def test_config_file_random_init_is_reproducible(tiny_config, tiny_backbone):
    again = coopkit.load_backbone(str(tiny_config), pretrained=None, device="cpu")
    assert again.name == "coopkit-test-tiny"
    assert again.model_config["embed_dim"] == 64
    assert again.weights_sha256 == tiny_backbone.weights_sha256
    assert not any(p.requires_grad for p in again.model.parameters())
    assert again.image_size == (32, 32)


def test_local_checkpoint(tiny_config, tiny_backbone, tmp_path):
    from safetensors.torch import save_file

    bb = coopkit.load_backbone(str(tiny_config), pretrained=None, device="cpu")
    with torch.no_grad():
        bb.model.ln_final.bias.add_(1.0)
    ckpt = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, ckpt)
    loaded = coopkit.load_backbone(str(tiny_config), pretrained=str(ckpt), device="cpu")
    assert loaded.pretrained == str(ckpt.resolve())
    torch.testing.assert_close(loaded.model.ln_final.bias, bb.model.ln_final.bias)
    assert loaded.weights_sha256 != tiny_backbone.weights_sha256


def test_bad_config_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not an open_clip model config"):
        coopkit.load_backbone(str(bad))


def test_import_coopkit_does_not_import_torch():
    code = "import sys, coopkit, coopkit.runtime; print('torch' in sys.modules, 'open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
