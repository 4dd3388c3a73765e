"""Multi-label image sets: several labels per image, some of them possibly unknown (torch-free).

A :class:`MultiLabelDataset` is a list of image paths, the class names, and a target matrix
``(images, classes)`` of ``int8`` with ``1`` (the label applies), ``0`` (it does not) and
``-1`` (unknown: DualCoOp's partial-label setting; the loss and the metrics skip it). It is read
by :func:`load_multilabel` from one of:

* a CSV file, long form: ``path,labels[,unknown]`` where ``labels`` lists the labels that apply
  and ``unknown`` those whose state is unknown, each joined by ``sep`` (``|`` by default); every
  other class is a negative. A header row is optional;
* a CSV file, wide form: a header ``path,<class>,<class>,...`` and one ``1``/``0``/``-1`` (or
  empty: unknown) per class;
* a JSON list of ``{"path": ..., "labels": [...], "unknown": [...]}`` (``unknown`` optional), or
  an object ``{"classnames": [...], "items": [that list]}`` that fixes the classes and their order;
* the MS-COCO layout DualCoOp reads: ``<root>/annotations/instances_<split>.json`` and the images
  in ``<root>/<split>/`` (splits ``train2014``, ``val2014``, ...);
* the PASCAL VOC layout: ``<root>/ImageSets/Main/<split>.txt``, ``<root>/Annotations/<id>.xml``,
  ``<root>/JPEGImages/<id>.jpg`` (splits ``trainval``, ``test``, ...), objects marked ``difficult``
  ignored as DualCoOp ignores them.

Relative paths in a CSV or JSON file are read relative to the file's folder, or to ``image_root``.
Without ``classnames``, the classes are every label the file names, sorted.
:func:`partial_labels` hides a random portion of the labels (the official ``-pp`` setting);
:func:`few_shot_multilabel` draws a few images per label; :func:`write_multilabel_csv` writes a set
as a long-form CSV.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .runtime.atomic import atomic_write
from .runtime.contract import check_classnames

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: Target values: the label applies, does not apply, is unknown.
POSITIVE, NEGATIVE, UNKNOWN = 1, 0, -1
#: The default separator between labels in a CSV cell.
LABEL_SEP = "|"
#: The PASCAL VOC classes, in the order of DualCoOp's ``voc2007`` reader (its label indices).
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


@dataclass
class MultiLabelDataset:
    """Image paths with a target row each: ``targets[i, c]`` is 1, 0 or -1 (unknown)."""

    paths: list[str]
    targets: np.ndarray  # (images, classes) int8
    classnames: list[str]
    source: str = ""

    def __post_init__(self) -> None:
        self.targets = np.asarray(self.targets, dtype=np.int8)
        if self.targets.shape != (len(self.paths), len(self.classnames)):
            raise ValueError(f"{self.source}: targets have shape {self.targets.shape}, expected "
                             f"({len(self.paths)}, {len(self.classnames)}) (images, classes)")
        bad = sorted(set(np.unique(self.targets).tolist()) - {POSITIVE, NEGATIVE, UNKNOWN})
        if bad:
            raise ValueError(f"{self.source}: target values {bad}; valid: 1 (applies), 0 (does not), -1 (unknown)")

    def __len__(self) -> int:
        return len(self.paths)

    def positives(self) -> list[int]:
        """Images each label applies to, in class order."""
        return (self.targets == POSITIVE).sum(0).astype(int).tolist()

    def labels_of(self, i: int) -> list[str]:
        """The labels that apply to image ``i``."""
        return [self.classnames[c] for c in np.flatnonzero(self.targets[i] == POSITIVE)]

    @property
    def known_fraction(self) -> float:
        """The share of (image, class) pairs whose label is known."""
        return float((self.targets != UNKNOWN).mean()) if self.targets.size else 1.0

    def select(self, indices: Sequence[int]) -> "MultiLabelDataset":
        """The images ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        return MultiLabelDataset([self.paths[i] for i in idx], self.targets[idx], list(self.classnames), self.source)

    def relabel(self, classnames: Sequence[str]) -> "MultiLabelDataset":
        """The same images with the columns of ``classnames``, in that order (all must be present)."""
        index = {c: i for i, c in enumerate(self.classnames)}
        missing = [c for c in classnames if c not in index]
        if missing:
            raise ValueError(f"{self.source}: classes {missing} are not among {self.classnames}")
        cols = [index[c] for c in classnames]
        return MultiLabelDataset(list(self.paths), self.targets[:, cols], list(classnames), self.source)


def _split_labels(cell: str, sep: str) -> list[str]:
    return [x.strip() for x in cell.split(sep) if x.strip()] if cell else []


def _from_rows(rows: list[tuple[str, list[str], list[str]]], classnames: Optional[Sequence[str]], source: str,
               base: Path) -> MultiLabelDataset:
    """``(path, positive labels, unknown labels)`` rows -> a dataset (every other class negative)."""
    named = sorted({c for _, pos, unk in rows for c in pos + unk})
    classes = check_classnames(list(classnames), "classnames") if classnames is not None else named
    index = {c: i for i, c in enumerate(classes)}
    stray = sorted(set(named) - set(index))
    if stray:
        raise ValueError(f"{source}: labels {stray[:5]} are not among the classes {classes}")
    if not classes:
        raise ValueError(f"{source}: no labels at all; give each image its labels (or classnames=)")
    targets = np.zeros((len(rows), len(classes)), dtype=np.int8)
    for i, (_, pos, unk) in enumerate(rows):
        both = sorted(set(pos) & set(unk))
        if both:
            raise ValueError(f"{source}: row {i + 1} marks {both} both as a label and as unknown")
        targets[i, [index[c] for c in unk]] = UNKNOWN
        targets[i, [index[c] for c in pos]] = POSITIVE
    return MultiLabelDataset([str(base / p) for p, _, _ in rows], targets, list(classes), source)


def _read_csv(path: Path, base: Path, sep: str, classnames: Optional[Sequence[str]]) -> MultiLabelDataset:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: empty dataset (expected rows of path,labels)")
    head = [c.lower() for c in rows[0]]
    if head[0] == "path" and len(head) > 1 and head[1:] not in (["labels"], ["labels", "unknown"]):
        return _read_wide(path, base, rows, classnames)
    if head[0] == "path":
        rows = rows[1:]
    bad = [i + 1 for i, r in enumerate(rows) if not r[0] or len(r) > 3]
    if bad:
        raise ValueError(f"{path}: rows {bad[:5]} are not 'path,labels[,unknown]' (labels joined by {sep!r})")
    items = [(r[0], _split_labels(r[1] if len(r) > 1 else "", sep), _split_labels(r[2] if len(r) > 2 else "", sep))
             for r in rows]
    return _from_rows(items, classnames, str(path), base)


def _read_wide(path: Path, base: Path, rows: list[list[str]], classnames: Optional[Sequence[str]]) -> MultiLabelDataset:
    columns = check_classnames(rows[0][1:], f"{path}: header classes")
    values = {"1": POSITIVE, "0": NEGATIVE, "-1": UNKNOWN, "": UNKNOWN}
    targets = np.zeros((len(rows) - 1, len(columns)), dtype=np.int8)
    for i, r in enumerate(rows[1:]):
        cells = r[1:] + [""] * (len(columns) - len(r) + 1)
        if len(r) > len(columns) + 1 or not r[0] or any(c not in values for c in cells):
            raise ValueError(f"{path}: row {i + 2} must be a path and one of 1, 0, -1 or empty per class "
                             f"({len(columns)} classes)")
        targets[i] = [values[c] for c in cells]
    data = MultiLabelDataset([str(base / r[0]) for r in rows[1:]], targets, columns, str(path))
    return data.relabel(check_classnames(list(classnames))) if classnames is not None else data


def _as_label_list(value: Any, what: str, source: str, i: int) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{source}: item {i}: {what} must be a list of label strings, got {value!r}")
    return [v.strip() for v in value if v.strip()]


def _read_json(path: Path, base: Path, classnames: Optional[Sequence[str]]) -> MultiLabelDataset:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if isinstance(raw, dict) and "items" in raw:
        if classnames is None and raw.get("classnames") is not None:
            classnames = raw["classnames"]
        raw = raw["items"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: expected a non-empty list of {{\"path\", \"labels\"[, \"unknown\"]}} objects "
                         "(or {\"classnames\", \"items\"})")
    rows = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("path"), str) or not item["path"].strip():
            raise ValueError(f"{path}: item {i} is not an object with a \"path\" string")
        rows.append((item["path"].strip(), _as_label_list(item.get("labels"), "labels", str(path), i),
                     _as_label_list(item.get("unknown"), "unknown", str(path), i)))
    return _from_rows(rows, classnames, str(path), base)


def _read_coco(root: Path, split: str) -> MultiLabelDataset:
    """As DualCoOp's ``CocoDetection``: images that have annotations, in the order pycocotools'
    ``imgToAnns`` lists them (first annotation first); classes by category id; any object of a
    category makes that label apply."""
    ann = root / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        found = sorted(p.name for p in (root / "annotations").glob("instances_*.json"))
        raise FileNotFoundError(f"{ann} not found; splits there: {[n[10:-5] for n in found]}")
    raw = json.loads(ann.read_text(encoding="utf-8"))
    cats = sorted(raw["categories"], key=lambda c: c["id"])
    col = {c["id"]: i for i, c in enumerate(cats)}
    files = {img["id"]: img["file_name"] for img in raw["images"]}
    order: dict[int, list[int]] = {}
    for a in raw["annotations"]:
        order.setdefault(a["image_id"], []).append(col[a["category_id"]])
    targets = np.zeros((len(order), len(cats)), dtype=np.int8)
    for i, cols in enumerate(order.values()):
        targets[i, cols] = POSITIVE
    paths = [str(root / split / files[img_id]) for img_id in order]
    return MultiLabelDataset(paths, targets, [c["name"] for c in cats], f"{root}:{split}")


def _read_voc(root: Path, split: str) -> MultiLabelDataset:
    """As DualCoOp's ``voc2007``: the ids of ``ImageSets/Main/<split>.txt``, objects marked
    difficult skipped, the 20 VOC classes in their fixed order."""
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        found = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem)
        raise FileNotFoundError(f"{listing} not found; splits there: {found}")
    ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    targets = np.zeros((len(ids), len(VOC_CLASSES)), dtype=np.int8)
    for i, image_id in enumerate(ids):
        tree = ET.parse(root / "Annotations" / f"{image_id}.xml")
        for obj in tree.getroot().iter("object"):
            if (obj.findtext("difficult") or "0").strip() == "1":
                continue
            name = (obj.findtext("name") or "").strip().lower()
            if name not in VOC_CLASSES:
                raise ValueError(f"{root}/Annotations/{image_id}.xml: object {name!r} is not a VOC class "
                                 f"({', '.join(VOC_CLASSES)})")
            targets[i, VOC_CLASSES.index(name)] = POSITIVE
    paths = [str(root / "JPEGImages" / f"{image_id}.jpg") for image_id in ids]
    return MultiLabelDataset(paths, targets, list(VOC_CLASSES), f"{root}:{split}")


def load_multilabel(
    source: Union[PathLike, MultiLabelDataset],
    *,
    split: Optional[str] = None,
    image_root: Optional[PathLike] = None,
    sep: str = LABEL_SEP,
    classnames: Optional[Sequence[str]] = None,
) -> MultiLabelDataset:
    """Read a multi-label image set (see the module docstring for the formats).

    Args:
        source: ``.csv`` or ``.json`` file, a COCO or VOC root folder, or a dataset (returned as is, or
            with the columns of ``classnames``).
        split: COCO (``train2014``, ``val2014``) or VOC (``trainval``, ``test``) split; required there.
        image_root: Folder that relative paths in a CSV or JSON file refer to.
        sep: Separator between labels in a long-form CSV cell.
        classnames: The classes, in output order (CSV / JSON; default every label named, sorted).

    Raises:
        FileNotFoundError: ``source`` (or the split's files) does not exist.
        ValueError: malformed files, labels outside ``classnames``, a label both known and unknown.
    """
    if isinstance(source, MultiLabelDataset):
        return source.relabel(check_classnames(list(classnames))) if classnames is not None else source
    if not isinstance(sep, str) or not sep or sep in ",\n\"":
        raise ValueError(f"sep must be a non-empty string other than a comma, newline or quote, got {sep!r}")
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {source}")
    base = Path(image_root).expanduser() if image_root is not None else path.parent
    if path.is_dir():
        kind = "coco" if (path / "annotations").is_dir() else "voc" if (path / "ImageSets" / "Main").is_dir() else None
        if kind is None:
            raise ValueError(f"{source}: not a COCO root (annotations/instances_<split>.json) nor a VOC root "
                             "(ImageSets/Main/<split>.txt); for your own images give a .csv or .json")
        if not split:
            raise ValueError(f"{source}: a {kind.upper()} root needs split= "
                             f"({'train2014, val2014' if kind == 'coco' else 'trainval, test'})")
        data = _read_coco(path, split) if kind == "coco" else _read_voc(path, split)
        if classnames is not None:
            data = data.relabel(check_classnames(list(classnames)))
    elif path.suffix.lower() == ".csv":
        data = _read_csv(path, base, sep, classnames)
    elif path.suffix.lower() == ".json":
        data = _read_json(path, base, classnames)
    else:
        raise ValueError(f"{source}: expected a .csv, a .json list, or a COCO / VOC root folder")
    logger.info("read %d images with %d labels from %s (%.0f%% of labels known)", len(data), len(data.classnames),
                data.source, 100 * data.known_fraction)
    return data


def partial_labels(data: MultiLabelDataset, portion: float, seed: int = 0) -> MultiLabelDataset:
    """Keep each (image, class) label with probability ``portion``; the rest become unknown (-1).

    DualCoOp's partial-label setting (``-pp``): ``mask = rand(images, classes) < portion``. The
    draw here is numpy's (``default_rng(seed)``), not torch's, so the mask differs from the one
    the official code draws; labels already unknown stay unknown.
    """
    if isinstance(portion, bool) or not isinstance(portion, (int, float)) or not 0 < portion <= 1:
        raise ValueError(f"portion must be in (0, 1], got {portion!r}")
    keep = np.random.default_rng(seed).random(data.targets.shape) < portion  # (images, classes)
    targets = np.where(keep, data.targets, UNKNOWN).astype(np.int8)
    return MultiLabelDataset(list(data.paths), targets, list(data.classnames), data.source)


def few_shot_multilabel(data: MultiLabelDataset, shots: int, seed: int = 0) -> MultiLabelDataset:
    """Draw images until every label has at least ``shots`` known positives (all of its own, when it has fewer).

    Labels are served rarest first (ties in class order); for each, images showing it are taken in
    a random order (``default_rng(seed)``), and every label of a taken image counts, so the draw is
    at most ``shots x classes`` images and often fewer. Images keep their order in ``data``.
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
    pos = data.targets == POSITIVE  # (images, classes)
    order = np.random.default_rng(seed).permutation(len(data))
    taken = np.zeros(len(data), dtype=bool)
    have = np.zeros(len(data.classnames), dtype=np.int64)
    for c in np.argsort(pos.sum(0), kind="stable"):
        for i in order[pos[order, c]]:
            if have[c] >= shots:
                break
            if not taken[i]:
                taken[i] = True
                have += pos[i]
    return data.select(np.flatnonzero(taken))


def write_multilabel_csv(data: MultiLabelDataset, path: PathLike, *, sep: str = LABEL_SEP) -> Path:
    """Write ``data`` to ``path`` (atomically) as a long-form CSV with a header: ``path,labels,unknown``,
    the labels that apply and the unknown ones joined by ``sep``; returns the path.

    Image paths inside the CSV's folder are written relative to it. A class that no row names (neither
    applies nor is unknown anywhere) is read back only with ``classnames=``.
    """
    bad = [c for c in data.classnames if sep in c]
    if bad:
        raise ValueError(f"labels {bad[:5]} contain the separator {sep!r}; choose another sep")
    out = Path(path)
    folder = out.parent.resolve()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "labels", "unknown"])
    for i, image in enumerate(data.paths):
        where = Path(image).resolve()
        rel = where.relative_to(folder).as_posix() if where.is_relative_to(folder) else str(where)
        row = data.targets[i]
        writer.writerow([rel, sep.join(c for c, t in zip(data.classnames, row) if t == POSITIVE),
                         sep.join(c for c, t in zip(data.classnames, row) if t == UNKNOWN)])
    atomic_write(out, buf.getvalue().encode("utf-8"), fsync=False)
    return out
