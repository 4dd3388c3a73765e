"""The CoOp paper's datasets, read from the on-disk layouts of the official code (torch-free).

The 11 few-shot datasets (ImageNet, Caltech101, OxfordPets, StanfordCars, Flowers102, Food101,
FGVCAircraft, SUN397, DTD, EuroSAT, UCF101) and the 4 ImageNet variants (ImageNet-V2, -Sketch,
-A, -R), each in the folder and layout that CoOp's ``DATASETS.md`` prescribes under one root
``$DATA``, read the way the official readers (``CoOp/datasets/*.py``) read them:

* the split-file datasets take train / val / test from their ``split_zhou_*.json``
  (``[relative path, label, class name]`` entries, paths relative to the dataset's image folder);
* FGVCAircraft reads ``variants.txt`` (label order) and ``images_variant_{train,val,test}.txt``;
* ImageNet reads ``classnames.txt`` (``<folder> <class name>`` per line) and the class folders
  of ``images/train`` and ``images/val`` (the validation images are the test set; labels follow
  the sorted folder names, images the order of ``os.listdir``, as the official reader);
* the variants are test sets: ImageNet-V2's folders ``0``-``999`` are the labels in
  ``classnames.txt`` order; -Sketch, -A and -R label their sorted ``n*`` folders, so -A and -R
  hold their own 200 classes.

Class names are the official ones as its prompts use them: the names of the split file or
class list with ``_`` read as a space (:func:`coopkit.runtime.contract.prompt_name`), e.g.
OxfordPets' ``"american bulldog"``. :data:`DATASETS` also records each dataset's hand-written
prompt (CoOp's ``CUSTOM_TEMPLATES``) and KgCoOp's.

Few-shot sets come from :func:`few_shot_official`: the official code's own cached draw
(``split_fewshot/shot_K-seed_S.pkl``, read without running code from it) when it is there,
else the same draw made again (:func:`coopkit.userdata.few_shot_splits`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from ._unpickle import SafeUnpickler, UnsafeGlobalError
from .userdata import Dataset, few_shot_splits
from .runtime.contract import prompt_name

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
#: CLIP's ensemble of 7 ImageNet templates that CoOp (``IMAGENET_TEMPLATES_SELECT``) and Tip-Adapter use.
IMAGENET_TEMPLATES_SELECT = (
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
    "a {} in a video game.", "art of the {}.", "a photo of the small {}.",
)


@dataclass(frozen=True)
class DatasetSpec:
    """Where one dataset lives under ``$DATA`` and how the official code reads and prompts it.

    Attributes:
        name: coopkit's name (the official config file name, e.g. ``oxford_pets``).
        official: The official class name (``cfg.DATASET.NAME``, e.g. ``OxfordPets``).
        folder: Its folder under the root.
        reader: ``split`` (a ``split_zhou_*.json``), ``fgvc``, ``imagenet`` or ``variant``.
        images: The image folder inside ``folder`` (``""``: the dataset folder itself).
        split_file: The split file inside ``folder`` (``split`` datasets).
        layout: The expected layout, as error messages state it.
        template: CoOp's hand-written prompt for it (``CUSTOM_TEMPLATES``).
        kg_template: KgCoOp's hand-written prompt (its regulariser's target).
        label_folders: For the variants, ``index`` (folders named by label) or ``sorted``.
    """

    name: str
    official: str
    folder: str
    reader: str
    images: str
    layout: str
    template: str
    kg_template: str = ""
    split_file: str = ""
    label_folders: str = "sorted"
    aliases: tuple[str, ...] = field(default=())

    @property
    def test_only(self) -> bool:
        return self.reader == "variant"


def _split(name: str, official: str, folder: str, images: str, split_file: str, layout: str, template: str,
           kg_template: str = "", aliases: tuple[str, ...] = ()) -> DatasetSpec:
    return DatasetSpec(name, official, folder, "split", images, layout, template, kg_template or template,
                       split_file=split_file, aliases=aliases)


def _variant(name: str, official: str, folder: str, images: str, label_folders: str,
             aliases: tuple[str, ...] = ()) -> DatasetSpec:
    layout = f"{folder}/{images}/<{'0..999' if label_folders == 'index' else 'n*'} class folders>/*, {folder}/classnames.txt"
    return DatasetSpec(name, official, folder, "variant", images, layout, "a photo of a {}.", "a photo of a {}.",
                       label_folders=label_folders, aliases=aliases)


#: The 15 datasets, by coopkit name. Folders, files and templates as in the official code
#: (CoOp's DATASETS.md, datasets/*.py, trainers/zsclip.py; KgCoOp's trainers/kgcoop.py).
DATASETS: dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec("imagenet", "ImageNet", "imagenet", "imagenet", "images",
                "imagenet/images/{train,val}/<n* class folders>/*, imagenet/classnames.txt", "a photo of a {}.",
                "a photo of a {}."),
    _split("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json",
           "caltech-101/101_ObjectCategories/<class>/*.jpg, caltech-101/split_zhou_Caltech101.json",
           "a photo of a {}."),
    _split("oxford_pets", "OxfordPets", "oxford_pets", "images", "split_zhou_OxfordPets.json",
           "oxford_pets/images/*.jpg, oxford_pets/split_zhou_OxfordPets.json", "a photo of a {}, a type of pet.",
           aliases=("pets", "oxfordpets")),
    _split("stanford_cars", "StanfordCars", "stanford_cars", "", "split_zhou_StanfordCars.json",
           "stanford_cars/{cars_train,cars_test}/*.jpg, stanford_cars/split_zhou_StanfordCars.json",
           "a photo of a {}.", aliases=("cars", "stanfordcars")),
    _split("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json",
           "oxford_flowers/jpg/image_*.jpg, oxford_flowers/split_zhou_OxfordFlowers.json",
           "a photo of a {}, a type of flower.", aliases=("flowers102", "flowers", "oxfordflowers")),
    _split("food101", "Food101", "food-101", "images", "split_zhou_Food101.json",
           "food-101/images/<class>/*.jpg, food-101/split_zhou_Food101.json", "a photo of {}, a type of food."),
    DatasetSpec("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "fgvc", "images",
                "fgvc_aircraft/images/*.jpg, fgvc_aircraft/variants.txt, "
                "fgvc_aircraft/images_variant_{train,val,test}.txt", "a photo of a {}, a type of aircraft.",
                "a photo of a {}, a type of aircraft.", aliases=("fgvc", "aircraft", "fgvcaircraft")),
    _split("sun397", "SUN397", "sun397", "SUN397", "split_zhou_SUN397.json",
           "sun397/SUN397/<letter>/<class>/*.jpg, sun397/split_zhou_SUN397.json", "a photo of a {}."),
    _split("dtd", "DescribableTextures", "dtd", "images", "split_zhou_DescribableTextures.json",
           "dtd/images/<class>/*.jpg, dtd/split_zhou_DescribableTextures.json", "{} texture.",
           kg_template="a photo of a {}, a type of texture.", aliases=("describabletextures",)),
    _split("eurosat", "EuroSAT", "eurosat", "2750", "split_zhou_EuroSAT.json",
           "eurosat/2750/<class>/*.jpg, eurosat/split_zhou_EuroSAT.json", "a centered satellite photo of {}."),
    _split("ucf101", "UCF101", "ucf101", "UCF-101-midframes", "split_zhou_UCF101.json",
           "ucf101/UCF-101-midframes/<class>/*.jpg, ucf101/split_zhou_UCF101.json",
           "a photo of a person doing {}."),
    _variant("imagenetv2", "ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val", "index",
             aliases=("imagenet_v2",)),
    _variant("imagenet_sketch", "ImageNetSketch", "imagenet-sketch", "images", "sorted", aliases=("sketch",)),
    _variant("imagenet_a", "ImageNetA", "imagenet-adversarial", "imagenet-a", "sorted"),
    _variant("imagenet_r", "ImageNetR", "imagenet-rendition", "imagenet-r", "sorted"),
)}
#: The 11 few-shot datasets, in the order of the CoOp paper's figure.
FEWSHOT_DATASETS = ("imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")
#: ImageNet's shifted test sets (the paper's Table 1).
IMAGENET_VARIANTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name`` (coopkit name, official name or alias, any case)."""
    key = _key(str(name))
    for spec in DATASETS.values():
        if key in (spec.name, _key(spec.official), *spec.aliases):
            return spec
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


@dataclass
class OfficialDataset:
    """One dataset as the official code sees it.

    Attributes:
        spec: What it is and where it lives.
        root: The dataset's folder (``$DATA/<folder>``).
        train, val: Full training and validation sets (``None`` for the variants; ImageNet's
            validation set is its test set, as in the official code).
        test: The test set.
    """

    spec: DatasetSpec
    root: Path
    train: Optional[Dataset]
    val: Optional[Dataset]
    test: Dataset

    @property
    def classnames(self) -> list[str]:
        return list(self.test.classnames)


def _missing(spec: DatasetSpec, what: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{spec.name}: {what} not found at {path}; expected layout under the root: {spec.layout}")


def _check_classes_on_disk(spec: DatasetSpec, data: Dataset, split: str) -> None:
    """Every class must have at least one of its images on disk (one stat per class when they do)."""
    first: dict[int, str] = {}
    found: set[int] = set()
    for p, y in data.items:
        if y in found:
            continue
        first.setdefault(y, p)
        if os.path.isfile(p):
            found.add(y)
    empty = [y for y in range(len(data.classnames)) if y not in found]
    if empty:
        names = [data.classnames[y] for y in empty]
        example = first.get(empty[0])
        where = f" (e.g. {example} is missing)" if example else " (no entries)"
        raise ValueError(f"{spec.name} {split}: no images on disk for {len(names)} class(es) {names[:5]}{where}; "
                         f"expected layout under the root: {spec.layout}")


def _read_split_file(spec: DatasetSpec, folder: Path) -> dict[str, Dataset]:
    path = folder / spec.split_file
    if not path.is_file():
        raise _missing(spec, f"split file {spec.split_file}", path)
    images = folder / spec.images if spec.images else folder
    if not images.is_dir():
        raise _missing(spec, "image folder", images)
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(s), list) for s in ("train", "val", "test")):
        raise ValueError(f"{path}: not a CoOp split file (expected lists 'train', 'val' and 'test')")
    names: dict[int, str] = {}
    out: dict[str, list[tuple[str, int]]] = {}
    for part in ("train", "val", "test"):
        items = []
        for entry in raw[part]:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
                raise ValueError(f"{path}: {part} entries must be [relative path, label, class name], got {entry!r:.80}")
            y = int(entry[1])
            names.setdefault(y, prompt_name(entry[2]))
            items.append((str(images / entry[0]), y))
        out[part] = items
    labels = sorted(names)
    if labels != list(range(len(labels))):
        raise ValueError(f"{path}: labels must be 0..N-1, found {labels[:10]}")
    classnames = [names[y] for y in labels]
    return {part: Dataset(items, classnames, f"{path}:{part}") for part, items in out.items()}


def _read_lines(spec: DatasetSpec, path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise _missing(spec, what, path)
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_fgvc(spec: DatasetSpec, folder: Path) -> dict[str, Dataset]:
    variants = _read_lines(spec, folder / "variants.txt", "variants.txt")
    index = {v: i for i, v in enumerate(variants)}
    images = folder / spec.images
    if not images.is_dir():
        raise _missing(spec, "image folder", images)
    classnames = [prompt_name(v) for v in variants]
    out = {}
    for part in ("train", "val", "test"):
        name = f"images_variant_{part}.txt"
        items = []
        for line in _read_lines(spec, folder / name, name):
            image, _, variant = line.partition(" ")
            if variant not in index:
                raise ValueError(f"{folder / name}: variant {variant!r} of image {image} is not in variants.txt")
            items.append((str(images / f"{image}.jpg"), index[variant]))
        out[part] = Dataset(items, classnames, f"{folder / name}")
    return out


def _class_list(spec: DatasetSpec, folder: Path) -> dict[str, str]:
    """``classnames.txt``: ``<folder> <class name>`` per line, in ImageNet's label order."""
    out: dict[str, str] = {}
    for line in _read_lines(spec, folder / "classnames.txt", "classnames.txt"):
        wnid, _, name = line.partition(" ")
        out[wnid] = name
    return out


def _listdir(path: Path) -> list[str]:
    """``os.listdir`` without hidden entries, in the order the OS gives (Dassl's ``listdir_nohidden``)."""
    return [f for f in os.listdir(path) if not f.startswith(".")]


def _read_class_folders(spec: DatasetSpec, images: Path, folders: Sequence[str], names: Sequence[str],
                        source: str) -> Dataset:
    items: list[tuple[str, int]] = []
    empty = []
    for y, sub in enumerate(folders):
        files = _listdir(images / sub) if (images / sub).is_dir() else []
        if not files:
            empty.append(f"{names[y]} ({sub})")
        items += [(str(images / sub / f), y) for f in files]
    if empty:
        raise ValueError(f"{spec.name}: no images on disk for {len(empty)} class(es) {empty[:5]} under {images}; "
                         f"expected layout under the root: {spec.layout}")
    return Dataset(items, [prompt_name(n) for n in names], source)


def _named_folders(spec: DatasetSpec, images: Path, classes: dict[str, str]) -> tuple[list[str], list[str]]:
    if not images.is_dir():
        raise _missing(spec, "image folder", images)
    folders = sorted(f.name for f in os.scandir(images) if f.is_dir() and not f.name.startswith("."))
    unknown = [f for f in folders if f not in classes]
    if unknown:
        raise ValueError(f"{spec.name}: folders {unknown[:5]} under {images} are not in classnames.txt")
    if not folders:
        raise _missing(spec, "class folders", images)
    return folders, [classes[f] for f in folders]


def _read_imagenet(spec: DatasetSpec, folder: Path) -> dict[str, Dataset]:
    classes = _class_list(spec, folder)
    out = {}
    for part, sub in (("train", "train"), ("test", "val")):
        images = folder / spec.images / sub
        folders, names = _named_folders(spec, images, classes)
        out[part] = _read_class_folders(spec, images, folders, names, str(images))
    return out


def _read_variant(spec: DatasetSpec, folder: Path) -> dict[str, Dataset]:
    classes = _class_list(spec, folder)
    images = folder / spec.images
    if spec.label_folders == "index":
        if not images.is_dir():
            raise _missing(spec, "image folder", images)
        folders, names = [str(y) for y in range(len(classes))], list(classes.values())
    else:
        folders, names = _named_folders(spec, images, classes)
    return {"test": _read_class_folders(spec, images, folders, names, str(images))}


def load_official(name: str, root: PathLike) -> OfficialDataset:
    """Read a dataset from its official layout under ``root`` (the ``$DATA`` of CoOp's DATASETS.md).

    Args:
        name: A name of :data:`DATASETS` (or its official name, e.g. ``DescribableTextures``).
        root: The folder holding the dataset folders (``dtd/``, ``imagenet/``, ...).

    Raises:
        FileNotFoundError: the root, the dataset folder, its split file, class list or image
            folder is missing (the message names the path and the layout expected).
        ValueError: a malformed split file or class list, or a class with no images on disk
            (named).
    """
    spec = dataset_spec(name)
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    folder = base / spec.folder
    if not folder.is_dir():
        raise _missing(spec, "dataset folder", folder)
    reader = {"split": _read_split_file, "fgvc": _read_fgvc, "imagenet": _read_imagenet, "variant": _read_variant}
    parts = reader[spec.reader](spec, folder)
    if spec.reader in ("split", "fgvc"):
        for part, data in parts.items():
            _check_classes_on_disk(spec, data, part)
    logger.info("read %s: %s", spec.name, ", ".join(f"{p} {len(d)}" for p, d in parts.items()))
    return OfficialDataset(spec, folder, parts.get("train"), parts.get("val"), parts["test"])


def _datum_path(entry: object, base: Path, folder: Path) -> tuple[str, int]:
    """``(impath, label)`` of a Dassl ``Datum`` placeholder, its path moved under ``base`` when the
    recorded absolute path is from another machine."""
    state = getattr(entry, "state", None)
    if not isinstance(state, dict) or "_impath" not in state or "_label" not in state:
        raise ValueError(f"not a Dassl Datum: {entry!r}")
    path = str(state["_impath"])
    if not os.path.exists(path):
        parts = Path(path).parts
        if folder.name in parts:  # .../<dataset folder>/<rest> -> base/<dataset folder>/<rest>
            path = str(base.joinpath(*parts[len(parts) - parts[::-1].index(folder.name) - 1:]))
    return path, int(state["_label"])


def read_fewshot_cache(path: PathLike, data: OfficialDataset) -> tuple[Dataset, Optional[Dataset]]:
    """The official code's cached few-shot draw (``split_fewshot/shot_K-seed_S.pkl``), unpickled
    without running code from it (Dassl ``Datum`` records become placeholders)."""
    file = Path(path)
    try:
        with open(file, "rb") as f:
            raw = SafeUnpickler(f, inert=("dassl",)).load()
    except UnsafeGlobalError as e:
        raise ValueError(f"{file}: refusing a pickle that names {e.name} (not a Dassl few-shot cache)") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file raises many types
        raise ValueError(f"{file} is not a Dassl few-shot cache: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(raw, dict) or "train" not in raw:
        raise ValueError(f"{file} is not a Dassl few-shot cache (expected a dict with 'train')")
    names = data.classnames
    out = []
    for part in ("train", "val"):
        entries = raw.get(part)
        if entries is None:
            out.append(None)
            continue
        items = [_datum_path(e, data.root.parent, data.root) for e in entries]
        out.append(Dataset(items, names, f"{file}:{part}"))
    return out[0], out[1]


def few_shot_official(data: OfficialDataset, shots: int, seed: int) -> tuple[Dataset, Optional[Dataset]]:
    """The few-shot training and validation sets the official code trains on for ``shots`` and ``seed``.

    Its own cached draw ``<dataset>/split_fewshot/shot_<shots>-seed_<seed>.pkl`` when present
    (what the official code itself reuses), else the same draw made again with Dassl's sampling
    (:func:`coopkit.userdata.few_shot_splits`; ImageNet draws no validation set).
    """
    if data.train is None:
        raise ValueError(f"{data.spec.name} is a test set only; it has no training images to sample")
    cache = data.root / "split_fewshot" / f"shot_{shots}-seed_{seed}.pkl"
    if cache.is_file():
        logger.info("using the official few-shot cache %s", cache)
        return read_fewshot_cache(cache, data)
    val = data.val if data.spec.reader != "imagenet" else None
    return few_shot_splits(data.train, val, shots, seed)


__all__ = [
    "DATASETS", "FEWSHOT_DATASETS", "IMAGENET_VARIANTS", "IMAGENET_TEMPLATES_SELECT", "DatasetSpec",
    "OfficialDataset", "dataset_spec", "load_official", "few_shot_official", "read_fewshot_cache",
]
