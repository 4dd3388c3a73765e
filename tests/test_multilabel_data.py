"""Multi-label readers on tiny generated files: CSV (long and wide), JSON, COCO and VOC layouts, partial labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from coopkit.multilabel_data import (
    VOC_CLASSES,
    MultiLabelDataset,
    few_shot_multilabel,
    load_multilabel,
    partial_labels,
    write_multilabel_csv,
)


def test_csv_long_form_with_unknown_and_header(tmp_path):
    path = tmp_path / "tags.csv"
    path.write_text("path,labels,unknown\na.jpg,dog|beach,\nb.jpg,,cat\nsub/c.jpg,cat | dog,beach\n")
    data = load_multilabel(path)
    assert data.classnames == ["beach", "cat", "dog"]
    assert data.targets.tolist() == [[1, 0, 1], [0, -1, 0], [-1, 1, 1]]
    assert data.paths == [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), str(tmp_path / "sub/c.jpg")]
    assert data.labels_of(2) == ["cat", "dog"] and data.positives() == [1, 1, 2]
    assert data.known_fraction == pytest.approx(7 / 9)


def test_csv_long_form_without_header_other_separator_and_fixed_classes(tmp_path):
    path = tmp_path / "tags.csv"
    path.write_text("a.jpg,dog;beach\nb.jpg,sunset\n")
    data = load_multilabel(path, sep=";", classnames=["sunset", "dog", "beach", "cat"], image_root=tmp_path / "img")
    assert data.classnames == ["sunset", "dog", "beach", "cat"]
    assert data.targets.tolist() == [[0, 1, 1, 0], [1, 0, 0, 0]]
    assert data.paths[0] == str(tmp_path / "img" / "a.jpg")
    with pytest.raises(ValueError, match=r"labels \['sunset'\] are not among"):
        load_multilabel(path, sep=";", classnames=["dog", "beach"])


def test_csv_wide_form(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text("path,person,dog,car\na.jpg,1,0,-1\nb.jpg,0,,1\n")
    data = load_multilabel(path)
    assert data.classnames == ["person", "dog", "car"]
    assert data.targets.tolist() == [[1, 0, -1], [0, -1, 1]]
    assert load_multilabel(path, classnames=["car", "person"]).targets.tolist() == [[-1, 1], [1, 0]]
    path.write_text("path,person,dog\na.jpg,1,yes\n")
    with pytest.raises(ValueError, match="row 2 must be a path and one of 1, 0, -1"):
        load_multilabel(path)


def test_csv_refuses_a_label_both_known_and_unknown(tmp_path):
    path = tmp_path / "tags.csv"
    path.write_text("a.jpg,dog,dog\n")
    with pytest.raises(ValueError, match=r"row 1 marks \['dog'\] both"):
        load_multilabel(path)


def test_json_list_and_object(tmp_path):
    items = [{"path": "a.jpg", "labels": ["dog", "beach"]}, {"path": "b.jpg", "labels": [], "unknown": ["cat"]}]
    (tmp_path / "list.json").write_text(json.dumps(items))
    data = load_multilabel(tmp_path / "list.json")
    assert data.classnames == ["beach", "cat", "dog"] and data.targets.tolist() == [[1, 0, 1], [0, -1, 0]]
    (tmp_path / "obj.json").write_text(json.dumps({"classnames": ["dog", "cat", "beach", "boat"], "items": items}))
    data = load_multilabel(tmp_path / "obj.json")
    assert data.classnames == ["dog", "cat", "beach", "boat"]
    assert data.targets.tolist() == [[1, 0, 1, 0], [0, -1, 0, 0]]
    (tmp_path / "bad.json").write_text(json.dumps([{"path": "a.jpg", "labels": "dog"}]))
    with pytest.raises(ValueError, match="labels must be a list of label strings"):
        load_multilabel(tmp_path / "bad.json")


def _coco(root: Path) -> Path:
    """A tiny COCO: category ids with gaps, annotations out of image order, an image without annotations."""
    (root / "annotations").mkdir(parents=True)
    cats = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    images = [{"id": 7, "file_name": "COCO_train2014_7.jpg"}, {"id": 9, "file_name": "COCO_train2014_9.jpg"},
              {"id": 4, "file_name": "COCO_train2014_4.jpg"}]
    anns = [{"image_id": 9, "category_id": 18, "area": 10.0}, {"image_id": 7, "category_id": 1, "area": 9000.0},
            {"image_id": 9, "category_id": 1, "area": 2000.0}, {"image_id": 9, "category_id": 18, "area": 50.0}]
    (root / "annotations" / "instances_train2014.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def test_coco_layout(tmp_path):
    root = _coco(tmp_path / "coco")
    data = load_multilabel(root, split="train2014")
    assert data.classnames == ["person", "car", "dog"]  # by category id, as DualCoOp's cat2cat
    assert data.paths == [str(root / "train2014" / "COCO_train2014_9.jpg"), str(root / "train2014" / "COCO_train2014_7.jpg")]
    assert data.targets.tolist() == [[1, 0, 1], [1, 0, 0]]
    with pytest.raises(FileNotFoundError, match=r"splits there: \['train2014'\]"):
        load_multilabel(root, split="val2014")
    with pytest.raises(ValueError, match="needs split="):
        load_multilabel(root)


def _voc_xml(objects: list[tuple[str, int]]) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objects)
    return f"<annotation><filename>x.jpg</filename>{objs}</annotation>"


def test_voc_layout_skips_difficult_objects(tmp_path):
    root = tmp_path / "VOC2007"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("000005\n000007\n")
    (root / "ImageSets" / "Main" / "dog_trainval.txt").write_text("000005 -1\n")
    (root / "Annotations" / "000005.xml").write_text(_voc_xml([("Dog", 0), ("chair", 1), ("person", 0)]))
    (root / "Annotations" / "000007.xml").write_text(_voc_xml([("car", 1), ("car", 0), ("sofa", 1)]))
    data = load_multilabel(root, split="trainval")
    assert data.classnames == list(VOC_CLASSES)
    expect = np.zeros((2, 20), dtype=int)
    expect[0, [VOC_CLASSES.index("dog"), VOC_CLASSES.index("person")]] = 1
    expect[1, VOC_CLASSES.index("car")] = 1
    assert data.targets.tolist() == expect.tolist()
    assert data.paths[1] == str(root / "JPEGImages" / "000007.jpg")
    with pytest.raises(FileNotFoundError, match=r"splits there: \['trainval'\]"):
        load_multilabel(root, split="test")


def test_partial_labels_hide_the_asked_portion():
    rng = np.random.default_rng(0)
    full = MultiLabelDataset([f"{i}.jpg" for i in range(400)], (rng.random((400, 10)) < 0.3).astype(np.int8),
                             [f"c{i}" for i in range(10)])
    half = partial_labels(full, 0.5, seed=1)
    known = half.targets != -1
    assert 0.45 < known.mean() < 0.55
    assert (half.targets[known] == full.targets[known]).all()  # what is kept is unchanged
    assert (partial_labels(full, 0.5, seed=1).targets == half.targets).all()
    assert (partial_labels(full, 0.5, seed=2).targets != half.targets).any()
    assert (partial_labels(full, 1.0).targets == full.targets).all()
    with pytest.raises(ValueError, match=r"portion must be in \(0, 1\]"):
        partial_labels(full, 0)


def test_bad_targets_and_sources(tmp_path):
    with pytest.raises(ValueError, match=r"target values \[2\]"):
        MultiLabelDataset(["a"], np.array([[2, 0]]), ["x", "y"])
    with pytest.raises(ValueError, match="targets have shape"):
        MultiLabelDataset(["a"], np.zeros((2, 2)), ["x", "y"])
    with pytest.raises(FileNotFoundError):
        load_multilabel(tmp_path / "nope.csv")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="not a COCO root"):
        load_multilabel(tmp_path / "d")


def test_a_dataset_is_returned_with_the_asked_columns():
    data = MultiLabelDataset(["a", "b"], np.array([[1, 0, -1], [0, 1, 1]]), ["x", "y", "z"])
    assert load_multilabel(data) is data
    assert load_multilabel(data, classnames=["z", "x"]).targets.tolist() == [[-1, 1], [1, 0]]


def _random_set(n: int = 60, classes: int = 5, seed: int = 0) -> MultiLabelDataset:
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, classes)) < np.linspace(0.05, 0.6, classes)).astype(np.int8)  # rare to common labels
    targets[rng.random((n, classes)) < 0.1] = -1
    return MultiLabelDataset([f"/imgs/{i}.png" for i in range(n)], targets, [f"tag{c}" for c in range(classes)])


@pytest.mark.parametrize("shots", [1, 2, 4])
def test_few_shot_draw_gives_every_label_its_positives(shots):
    data = _random_set()
    sample = few_shot_multilabel(data, shots, seed=3)
    index = {p: i for i, p in enumerate(data.paths)}
    rows = [index[p] for p in sample.paths]
    assert rows == sorted(set(rows))  # distinct images, in the set's order
    assert np.array_equal(sample.targets, data.targets[rows])  # unknown labels stay unknown
    have, full = np.array(sample.positives()), np.array(data.positives())
    assert (have >= np.minimum(shots, full)).all(), (have, full)
    assert len(sample) <= shots * len(data.classnames)
    assert few_shot_multilabel(data, shots, seed=3).paths == sample.paths
    assert few_shot_multilabel(data, shots, seed=4).paths != sample.paths


def test_few_shot_draw_stops_once_each_label_has_enough():
    """From a large set the draw takes a few images, not every image that shows a label."""
    data = _random_set(n=200, seed=1)
    sample = few_shot_multilabel(data, 2, seed=0)
    assert min(data.positives()) > 2 and len(sample) <= 2 * len(data.classnames)
    assert min(sample.positives()) >= 2 and sum(sample.positives()) < sum(data.positives()) / 5
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        few_shot_multilabel(data, 0)


def test_csv_writer_round_trips_targets_unknowns_and_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    data = _random_set(n=12)
    data = MultiLabelDataset([str(tmp_path / "imgs" / f"{i}.png") for i in range(6)] + data.paths[6:], data.targets,
                             data.classnames)
    path = write_multilabel_csv(data, tmp_path / "set.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "path,labels,unknown" and lines[1].startswith("imgs/0.png,")  # relative inside its folder
    assert lines[7].startswith("/imgs/6.png,")  # outside: as given
    back = load_multilabel(path, classnames=data.classnames)
    assert back.paths == data.paths
    assert np.array_equal(back.targets, data.targets)
    with pytest.raises(ValueError, match="contain the separator"):
        write_multilabel_csv(MultiLabelDataset(["a.png"], [[1]], ["a|b"]), tmp_path / "bad.csv")
