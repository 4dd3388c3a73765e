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


# --- tiny copies of the official dataset layouts (CoOp's DATASETS.md), real file and folder names ---

IMAGENET_CLASSES = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark",
                    "n01491361": "tiger shark"}
#: One split-file dataset per line: folder | split file | image folder | image path pattern | class folder=class
#: name in the split file, ... (pattern: {c} the class folder, {c_} without "_", {n} a running number, {k} the
#: image's index within its class and split, {split_dir} StanfordCars' cars_train or cars_test)
SPLIT_LAYOUTS = [line.split(" | ") for line in """\
caltech-101 | split_zhou_Caltech101.json | 101_ObjectCategories | {c}/image_{k:04d}.jpg | accordion=accordion,\
airplanes=airplane,Faces=face,yin_yang=yin_yang
oxford_pets | split_zhou_OxfordPets.json | images | {c}_{k}.jpg | Abyssinian=abyssinian,american_bulldog=american_bulldog,\
Bengal=bengal,yorkshire_terrier=yorkshire_terrier
stanford_cars | split_zhou_StanfordCars.json |  | {split_dir}/{n:05d}.jpg | a=2012 AM General Hummer SUV,\
b=2012 Acura RL Sedan,c=2007 BMW X5 SUV,d=2012 smart fortwo Convertible
oxford_flowers | split_zhou_OxfordFlowers.json | jpg | image_{n:05d}.jpg | 1=pink primrose,2=hard-leaved pocket orchid,\
3=canterbury bells,4=sweet pea
food-101 | split_zhou_Food101.json | images | {c}/10056{k:02d}.jpg | apple_pie=apple_pie,baby_back_ribs=baby_back_ribs,\
baklava=baklava,beef_carpaccio=beef_carpaccio
sun397 | split_zhou_SUN397.json | SUN397 | {c}/sun_aaa{k}zqrimafwbiv.jpg | a/abbey=abbey,\
a/apartment_building/outdoor=outdoor apartment_building,b/bakery/shop=shop bakery,y/youth_hostel=youth_hostel
dtd | split_zhou_DescribableTextures.json | images | {c}/{c}_{k:04d}.jpg | banded=banded,blotchy=blotchy,\
braided=braided,zigzagged=zigzagged
eurosat | split_zhou_EuroSAT.json | 2750 | {c}/{c}_{k}.jpg | AnnualCrop=Annual Crop Land,Forest=Forest,\
HerbaceousVegetation=Herbaceous Vegetation Land,SeaLake=Sea or Lake
ucf101 | split_zhou_UCF101.json | UCF-101-midframes | {c}/v_{c_}_g{k:02d}_c01.jpg | Apply_Eye_Makeup=Apply_Eye_Makeup,\
Archery=Archery,Baby_Crawling=Baby_Crawling,YoYo=YoYo""".splitlines()]
FGVC_VARIANTS = ["707-320", "A300B4", "Cessna 172", "F/A-18"]
PER_SPLIT = {"train": 5, "val": 2, "test": 2}


def _tiny_image(path: Path, label: int, k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = list(COLOURS.values())[label % len(COLOURS)]
    rng = np.random.default_rng(1000 * label + k)
    img = np.array(colour)[None, None] + rng.normal(0, 20, (20 + k, 24, 3))
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, format="JPEG")


def write_official_layouts(root: Path) -> Path:
    """All 15 datasets under ``root`` as CoOp's DATASETS.md lays them out (4 classes each; 5 train,
    2 val and 2 test images per class; ImageNet-A/-R hold 2 of ImageNet's classes)."""
    n = 0
    for folder, split_file, images, pattern, classes in SPLIT_LAYOUTS:
        split: dict[str, list] = {s: [] for s in PER_SPLIT}
        for y, pair in enumerate(classes.split(",")):
            sub, cname = pair.split("=")
            for part, count in PER_SPLIT.items():
                for j in range(count):
                    n += 1
                    k = {"train": 1, "val": 11, "test": 21}[part] + j
                    rel = pattern.format(c=sub, c_=sub.replace("_", ""), n=n, k=k,
                                         split_dir="cars_test" if part == "test" else "cars_train")
                    _tiny_image(root / folder / images / rel, y, j)
                    split[part].append([rel, y, cname])
        (root / folder / split_file).write_text(json.dumps(split))
    (root / "oxford_pets" / "annotations").mkdir()
    fgvc = root / "fgvc_aircraft"
    (fgvc / "images").mkdir(parents=True)
    (fgvc / "variants.txt").write_text("\n".join(FGVC_VARIANTS) + "\n")
    for part, count in PER_SPLIT.items():
        lines = []
        for y, variant in enumerate(FGVC_VARIANTS):
            for j in range(count):
                n += 1
                _tiny_image(fgvc / "images" / f"{1025794 + n}.jpg", y, j)
                lines.append(f"{1025794 + n} {variant}")
        (fgvc / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    names = "".join(f"{w} {c}\n" for w, c in IMAGENET_CLASSES.items())
    wnids = list(IMAGENET_CLASSES)
    for y, w in enumerate(wnids):
        for j in range(PER_SPLIT["train"]):
            _tiny_image(root / "imagenet/images/train" / w / f"{w}_{10026 + j}.JPEG", y, j)
        for j in range(PER_SPLIT["test"]):
            _tiny_image(root / "imagenet/images/val" / w / f"ILSVRC2012_val_{8 * y + j + 1:08d}.JPEG", y, j)
        _tiny_image(root / "imagenetv2/imagenetv2-matched-frequency-format-val" / str(y) / f"{y}a7b3c.jpeg", y, 0)
        _tiny_image(root / "imagenet-sketch/images" / w / f"sketch_{y}.JPEG", y, 0)
    for folder, sub, chosen in (("imagenet-adversarial", "imagenet-a", wnids[1:3]),
                                ("imagenet-rendition", "imagenet-r", wnids[::3])):
        for w in chosen:
            y = wnids.index(w)
            _tiny_image(root / folder / sub / w / f"art_{y}.jpg", y, 1)
        (root / folder / sub / "README.txt").write_text("readme\n")
    for folder in ("imagenet", "imagenetv2", "imagenet-sketch", "imagenet-adversarial", "imagenet-rendition"):
        (root / folder / "classnames.txt").write_text(names)
    return root


@pytest.fixture(scope="session")
def official_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$DATA`` with tiny copies of all 15 official layouts (read-only: copy it to modify)."""
    return write_official_layouts(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="session")
def check_tensors_file_guarded():
    """A check for a saved run's tensors file: a corrupted copy is refused against the config's
    checksum, and a missing one is named, both before anything is built from them."""

    def check(run: Path, tensors_file: str, method: str, backbone) -> None:
        import coopkit

        blob = (run / tensors_file).read_bytes()
        (run / tensors_file).write_bytes(blob[:-4] + b"\0\0\0\0")
        with pytest.raises(ValueError, match=f"{tensors_file} does not match config.json"):
            coopkit.load(run, backbone=backbone)
        (run / tensors_file).unlink()
        with pytest.raises(FileNotFoundError, match=f"{method} run without {tensors_file}"):
            coopkit.load(run, backbone=backbone)

    return check
