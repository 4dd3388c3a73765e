"""Shared fixtures: tiny random-init open_clip models and small image folders, all offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a tiny open_clip model config (2 layers, width 64); the model name is its stem."""
    path = tmp_path_factory.mktemp("configs") / "coopkit-test-tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="session")
def tiny_backbone(tiny_config: Path):
    """The tiny model, random init (seeded), on the CPU. Shared: do not modify it."""
    import torch

    import coopkit

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return coopkit.load_backbone(str(tiny_config), pretrained=None, device="cpu")


def write_colour_folder(root: Path, per_class: int, seed: int, classes=tuple(COLOURS)) -> Path:
    """ImageFolder of noisy flat-colour images of odd sizes, one folder per colour name."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = int(rng.integers(28, 60)), int(rng.integers(28, 60))
            img = np.array(COLOURS[name])[None, None] + rng.normal(0, 25, (h, w, 3))
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / name / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-class colour task: ``train/`` (8 per class) and ``test/`` (6 per class)."""
    root = tmp_path_factory.mktemp("colours")
    write_colour_folder(root / "train", 8, seed=0)
    write_colour_folder(root / "test", 6, seed=1)
    return root
