"""The official dataset layouts (tiny fake copies with real names), their errors, and the official few-shot cache."""

from __future__ import annotations

import os
import pickle
import shutil
import sys
import types
from pathlib import Path

import pytest

from coopkit.userdata import few_shot_splits, subsample_classes
from coopkit.official_datasets import DATASETS, dataset_spec, few_shot_official, load_official

from conftest import IMAGENET_CLASSES

EXPECTED = {  # class names as the official prompts use them: split-file names, "_" read as a space
    "caltech101": ["accordion", "airplane", "face", "yin yang"],
    "oxford_pets": ["abyssinian", "american bulldog", "bengal", "yorkshire terrier"],
    "stanford_cars": ["2012 AM General Hummer SUV", "2012 Acura RL Sedan", "2007 BMW X5 SUV",
                      "2012 smart fortwo Convertible"],
    "oxford_flowers": ["pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea"],
    "food101": ["apple pie", "baby back ribs", "baklava", "beef carpaccio"],
    "sun397": ["abbey", "outdoor apartment building", "shop bakery", "youth hostel"],
    "dtd": ["banded", "blotchy", "braided", "zigzagged"],
    "eurosat": ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Sea or Lake"],
    "ucf101": ["Apply Eye Makeup", "Archery", "Baby Crawling", "YoYo"],
    "fgvc_aircraft": ["707-320", "A300B4", "Cessna 172", "F/A-18"],
    "imagenet": list(IMAGENET_CLASSES.values()),
    "imagenetv2": list(IMAGENET_CLASSES.values()),
    "imagenet_sketch": list(IMAGENET_CLASSES.values()),
    "imagenet_a": ["goldfish", "great white shark"],
    "imagenet_r": ["tench", "tiger shark"],
}


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_official_layout_reads(official_root, name):
    data = load_official(name, official_root)
    assert data.classnames == EXPECTED[name]
    assert all(os.path.isfile(p) for p in data.test.paths)
    if data.spec.test_only:
        assert data.train is None and data.val is None
        assert len(data.test) >= len(data.classnames)
        return
    assert data.train.counts() == [5] * 4
    assert data.test.counts() == [2] * 4
    if name == "imagenet":
        assert data.val is None  # the official code tests and validates on ImageNet's val folder
        assert all("/images/val/" in p for p in data.test.paths)
    else:
        assert data.val.counts() == [2] * 4
    for p, y in data.train.items[:3]:
        assert os.path.isfile(p) and data.train.classnames[y] == data.classnames[y]


def test_names_official_names_and_aliases():
    assert dataset_spec("DescribableTextures").name == "dtd"
    assert dataset_spec("Flowers102").name == "oxford_flowers"
    assert dataset_spec("imagenet-sketch").name == "imagenet_sketch"
    assert dataset_spec("dtd").kg_template == "a photo of a {}, a type of texture." != dataset_spec("dtd").template
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; valid: imagenet, caltech101"):
        dataset_spec("mnist")


@pytest.fixture
def copy_of(official_root, tmp_path):
    def make(folder: str) -> Path:
        shutil.copytree(official_root / folder, tmp_path / folder)
        return tmp_path
    return make


def test_missing_root_folder_split_and_images(official_root, copy_of, tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset root not found"):
        load_official("dtd", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"dtd: dataset folder not found at .*/dtd; expected layout under the root: "
                                                r"dtd/images/<class>/\*.jpg, dtd/split_zhou_DescribableTextures.json"):
        load_official("dtd", tmp_path)
    root = copy_of("dtd")
    (root / "dtd/split_zhou_DescribableTextures.json").unlink()
    with pytest.raises(FileNotFoundError, match="split file split_zhou_DescribableTextures.json not found at"):
        load_official("dtd", root)
    root = copy_of("eurosat")
    shutil.rmtree(root / "eurosat/2750")
    with pytest.raises(FileNotFoundError, match=r"eurosat: image folder not found at .*/eurosat/2750"):
        load_official("eurosat", root)


def test_class_without_images_on_disk_is_named(copy_of):
    root = copy_of("food-101")
    shutil.rmtree(root / "food-101/images/baklava")
    with pytest.raises(ValueError, match=r"food101 train: no images on disk for 1 class\(es\) \['baklava'\] "
                                         r"\(e.g. .*baklava/1005601.jpg is missing\)"):
        load_official("food101", root)


def test_imagenet_and_fgvc_errors(copy_of):
    root = copy_of("imagenet")
    (root / "imagenet/classnames.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"imagenet: classnames.txt not found at .*imagenet/classnames.txt; "
                                                r"expected layout"):
        load_official("imagenet", root)
    root = copy_of("imagenet-rendition")
    (root / "imagenet-rendition/imagenet-r/n09999999").mkdir()
    with pytest.raises(ValueError, match=r"folders \['n09999999'\] under .* are not in classnames.txt"):
        load_official("imagenet_r", root)
    for f in (root / "imagenet-rendition/imagenet-r/n01440764").iterdir():
        f.unlink()
    shutil.rmtree(root / "imagenet-rendition/imagenet-r/n09999999")
    with pytest.raises(ValueError, match=r"no images on disk for 1 class\(es\) \['tench \(n01440764\)'\]"):
        load_official("imagenet_r", root)
    root = copy_of("fgvc_aircraft")
    (root / "fgvc_aircraft/images_variant_val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="images_variant_val.txt not found"):
        load_official("fgvc_aircraft", root)


def test_few_shot_official_draws_like_dassl_and_base_new_split(official_root):
    data = load_official("caltech101", official_root)
    train, val = few_shot_official(data, 2, seed=1)
    again, again_val = few_shot_splits(data.train, data.val, 2, 1)
    assert train.items == again.items and val.items == again_val.items
    assert train.counts() == [2] * 4 and val.counts() == [2] * 4  # val: min(shots, 4) of 2 available
    base, new = subsample_classes(train, "base"), subsample_classes(train, "new")
    assert base.classnames == ["accordion", "airplane"] and new.classnames == ["face", "yin yang"]
    assert {p for p, _ in base.items} | {p for p, _ in new.items} == set(train.paths)
    imagenet = load_official("imagenet", official_root)
    assert few_shot_official(imagenet, 1, 1)[1] is None  # ImageNet draws no validation set
    with pytest.raises(ValueError, match="test set only"):
        few_shot_official(load_official("imagenet_a", official_root), 1, 1)


class _Datum:  # the attributes Dassl's Datum pickles (its __dict__), under Dassl's module name
    def __init__(self, impath: str, label: int, classname: str) -> None:
        self._impath, self._label, self._domain, self._classname = impath, label, 0, classname


def _dassl_pickle(path: Path, data: dict) -> None:
    module = types.ModuleType("dassl.data.datasets.base_dataset")
    _Datum.__module__, _Datum.__qualname__ = module.__name__, "Datum"
    module.Datum = _Datum
    saved = {m: sys.modules.get(m) for m in ("dassl", "dassl.data", "dassl.data.datasets", module.__name__)}
    sys.modules.update({m: types.ModuleType(m) for m in saved})
    sys.modules[module.__name__] = module
    try:
        path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        for m, old in saved.items():
            sys.modules.pop(m) if old is None else sys.modules.__setitem__(m, old)


def test_official_fewshot_cache_is_used_without_running_it(copy_of, tmp_path):
    root = copy_of("dtd")
    data = load_official("dtd", root)
    # the official code saved absolute paths of its own machine: moved under this root by the dataset folder
    chosen = [data.train.items[3], data.train.items[9]]
    entries = [_Datum(f"/elsewhere/data/dtd/images/{Path(p).parent.name}/{Path(p).name}", y, "x") for p, y in chosen]
    cache = root / "dtd/split_fewshot/shot_1-seed_7.pkl"
    cache.parent.mkdir()
    _dassl_pickle(cache, {"train": entries, "val": entries[:1]})
    train, val = few_shot_official(data, 1, seed=7)
    assert train.items == chosen and val.items == chosen[:1]
    assert train.classnames == data.classnames
    cache.write_bytes(pickle.dumps({"train": [os.system]}))  # a pickle that would call os.system on load
    with pytest.raises(ValueError, match=r"refusing a pickle that names posix.system"):
        few_shot_official(data, 1, seed=7)
    cache.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="is not a Dassl few-shot cache"):
        few_shot_official(data, 1, seed=7)
