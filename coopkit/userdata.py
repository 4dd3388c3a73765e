"""Your labelled images: ImageFolder, CSV and CoOp split readers, and few-shot sampling.

(The official datasets, in the layouts of CoOp's ``DATASETS.md``, are read by
:mod:`coopkit.official_datasets`, which builds on this module's :class:`Dataset`.)

A :class:`Dataset` is a list of ``(path, label index)`` plus the class names. It is read
from one of:

* a folder in ImageFolder layout (one sub-folder per class, sorted by name);
* a CSV file of ``path,label`` rows (a header row is optional; relative paths are read
  relative to the CSV's folder, or to ``image_root`` when given);
* a CoOp split file (``split_zhou_*.json``) with ``train``/``val``/``test`` lists of
  ``[relative path, label, classname]``; paths are relative to ``image_root`` (by default
  the JSON's folder).

Images are decoded by :func:`coopkit.runtime.preprocess.load_image`, the same decoder the
runtime uses.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from .runtime.preprocess import IMAGE_EXTENSIONS, is_image_file

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")

PathLike = Union[str, os.PathLike]


@dataclass
class Dataset:
    """Image paths with integer labels into ``classnames``."""

    items: list[tuple[str, int]]
    classnames: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.items)

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.items]

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.items]

    def counts(self) -> list[int]:
        """Images per class, in class order."""
        out = [0] * len(self.classnames)
        for _, y in self.items:
            out[y] += 1
        return out

    def relabel(self, classnames: Sequence[str]) -> "Dataset":
        """The same images labelled by their index in ``classnames`` (names must all be present)."""
        index = {c: i for i, c in enumerate(classnames)}
        missing = sorted(set(self.classnames) - set(index))
        if missing:
            raise ValueError(f"{self.source}: classes {missing} are not among the model's classes {list(classnames)}")
        return Dataset([(p, index[self.classnames[y]]) for p, y in self.items], list(classnames), self.source)

    def subset(self, classnames: Sequence[str]) -> "Dataset":
        """Only the images of ``classnames``, relabelled in that order."""
        unknown = sorted(set(classnames) - set(self.classnames))
        if unknown:
            raise ValueError(f"{self.source}: unknown classes {unknown}; available: {self.classnames}")
        index = {c: i for i, c in enumerate(classnames)}
        items = [(p, index[self.classnames[y]]) for p, y in self.items if self.classnames[y] in index]
        return Dataset(items, list(classnames), self.source)


def _is_image(path: Path) -> bool:
    return is_image_file(path)


def list_images(root: PathLike) -> list[str]:
    """Every image file under the folder ``root`` (any depth, by extension), sorted.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: it holds no image.
    """
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(str(p) for p in folder.rglob("*") if p.is_file() and _is_image(p))
    if not files:
        raise ValueError(f"{root}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    return files


def _check_unique(classnames: Sequence[str], source: str) -> None:
    seen: set[str] = set()
    dupes = sorted({c for c in classnames if c in seen or seen.add(c)})  # type: ignore[func-returns-value]
    if dupes:
        raise ValueError(f"{source}: duplicate class names {dupes}")


def _read_folder(root: Path) -> Dataset:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders; expected ImageFolder layout (one folder per class)")
    items: list[tuple[str, int]] = []
    empty = []
    for y, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and _is_image(p))
        if not files:
            empty.append(name)
        items += [(str(p), y) for p in files]
    if len(empty) == len(classes):
        raise ValueError(f"{root}: no images found (extensions: {', '.join(IMAGE_EXTENSIONS)})")
    if empty:
        raise ValueError(f"{root}: class folders without images: {empty}")
    return Dataset(items, classes, str(root))


def _read_csv(path: Path, image_root: Optional[Path]) -> Dataset:
    base = image_root or path.parent
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    if not rows:
        raise ValueError(f"{path}: empty dataset (expected rows of path,label)")
    bad = [i + 1 for i, r in enumerate(rows) if len(r) < 2 or not r[0].strip() or not r[1].strip()]
    if bad:
        raise ValueError(f"{path}: rows {bad[:5]} are not 'path,label'")
    classes = sorted({r[1].strip() for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    items = [(str(base / r[0].strip()), index[r[1].strip()]) for r in rows]
    return Dataset(items, classes, str(path))


def _read_split(path: Path, split: str, image_root: Optional[Path]) -> Dataset:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or split not in raw:
        raise ValueError(f"{path}: not a CoOp split file (expected keys {', '.join(SPLITS)})")
    base = image_root or path.parent
    names: dict[int, str] = {}
    for part in SPLITS:
        for entry in raw.get(part, []):
            if not (isinstance(entry, list) and len(entry) == 3):
                raise ValueError(f"{path}: {part} entries must be [relative path, label, classname]")
            names.setdefault(int(entry[1]), str(entry[2]))
    if not raw[split]:
        raise ValueError(f"{path}: split {split!r} is empty")
    labels = sorted(names)
    if labels != list(range(len(labels))):
        raise ValueError(f"{path}: labels must be 0..N-1, found {labels[:10]}")
    classes = [names[i] for i in labels]
    _check_unique(classes, str(path))
    items = [(str(base / e[0]), int(e[1])) for e in raw[split]]
    return Dataset(items, classes, f"{path}:{split}")


def load_dataset(
    source: Union[PathLike, Dataset],
    *,
    split: str = "train",
    image_root: Optional[PathLike] = None,
) -> Dataset:
    """Read a labelled image set from a folder, a CSV, or a CoOp split JSON.

    Args:
        source: ImageFolder directory, ``.csv`` file, CoOp ``.json`` split file, or a Dataset.
        split: Which list of a split file (``train``, ``val`` or ``test``); ignored otherwise.
        image_root: Folder that relative paths in a CSV or split file refer to.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: no images, empty class folders, duplicate classes, malformed files.
    """
    if isinstance(source, Dataset):
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {source}")
    root = Path(image_root).expanduser() if image_root is not None else None
    if root is not None and not root.is_dir():
        raise FileNotFoundError(f"image root not found: {image_root}")
    if path.is_dir():
        data = _read_folder(path)
    elif path.suffix.lower() == ".csv":
        data = _read_csv(path, root)
    elif path.suffix.lower() == ".json":
        data = _read_split(path, split, root)
    else:
        raise ValueError(f"{source}: expected an ImageFolder directory, a .csv of path,label, or a CoOp split .json")
    logger.info("read %d images in %d classes from %s", len(data), len(data.classnames), data.source)
    return data


def _sample(data: Dataset, shots: int, rng: random.Random) -> Dataset:
    """Dassl's ``generate_fewshot_dataset`` for one list, drawing from ``rng``.

    Classes in the order of their first image in ``data``, each class's images in data order;
    ``rng.sample(images, shots)`` per class (a class with fewer keeps all of them, unshuffled).
    """
    by_class: dict[int, list[str]] = {}
    for p, y in data.items:
        by_class.setdefault(y, []).append(p)
    items: list[tuple[str, int]] = []
    short = []
    for y, paths in by_class.items():
        if len(paths) >= shots:
            chosen = rng.sample(paths, shots)
        else:
            short.append(f"{data.classnames[y]} ({len(paths)})")
            chosen = paths
        items += [(p, y) for p in chosen]
    if short:
        logger.warning("fewer than %d images, using all of them: %s", shots, ", ".join(short))
    return Dataset(items, data.classnames, data.source)


def _check_shots(shots: int) -> int:
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
    return shots


def few_shot(data: Dataset, shots: int, seed: int) -> Dataset:
    """At most ``shots`` images per class, drawn exactly as Dassl (the official CoOp code) draws them.

    The same images, in the same order, as ``random.seed(seed)`` followed by Dassl's
    ``DatasetBase.generate_fewshot_dataset(items, num_shots=shots)`` over the same list of
    images (tested against a list recorded from Dassl itself). The draw depends on the order
    of ``data.items``: the folder reader lists classes and files sorted, a CSV or split file
    keeps its own order (as Dassl does). A class with fewer images than ``shots`` keeps all of
    them, with one warning naming them.
    """
    return _sample(data, _check_shots(shots), random.Random(seed))


def few_shot_splits(train: Dataset, val: Optional[Dataset], shots: int, seed: int) -> tuple[Dataset, Optional[Dataset]]:
    """The official few-shot train and validation sets for one seed.

    As every CoOp dataset reader does after ``random.seed(seed)``: ``shots`` training images
    per class, then, from the same random stream, ``min(shots, 4)`` validation images per
    class. ``val=None`` (ImageNet, which has no validation split) draws the training set only.
    """
    rng = random.Random(seed)
    sampled = _sample(train, _check_shots(shots), rng)
    return sampled, (_sample(val, min(shots, 4), rng) if val is not None else None)


def subsample_classes(data: Dataset, subsample: str) -> Dataset:
    """CoCoOp's base/new split: ``base`` is the first half of the classes in label order
    (rounded up), ``new`` the rest, ``all`` everything; images relabelled from 0.

    As the official ``subsample_classes``, which is applied after the few-shot draw.
    """
    names = data.classnames
    half = math.ceil(len(names) / 2)
    chosen = {"all": names, "base": names[:half], "new": names[half:]}.get(subsample)
    if chosen is None:
        raise ValueError(f"unknown subsample {subsample!r}; valid: 'all', 'base', 'new'")
    return data.subset(chosen)
