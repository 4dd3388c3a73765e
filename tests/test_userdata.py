"""Dataset readers, few-shot sampling and image decoding on real files."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coopkit.userdata import few_shot, load_dataset
from coopkit.runtime.preprocess import ImageDecodeError, load_image

from conftest import write_colour_folder


def test_image_folder(image_folder):
    data = load_dataset(image_folder / "train")
    assert data.classnames == ["blue", "green", "red", "yellow"]
    assert data.counts() == [8, 8, 8, 8]
    assert all(Path(p).parent.name == data.classnames[y] for p, y in data.items)


def test_csv_with_and_without_header(tmp_path, image_folder):
    rows = [(str(Path(p).relative_to(image_folder)), Path(p).parent.name) for p in sorted((image_folder / "train").rglob("*.png"))]
    for header in (True, False):
        csv = tmp_path / f"h{header}.csv"
        lines = (["path,label"] if header else []) + [f"{p},{c}" for p, c in rows]
        csv.write_text("\n".join(lines))
        data = load_dataset(csv, image_root=image_folder)
        assert len(data) == 32 and data.classnames == ["blue", "green", "red", "yellow"]
        assert all(Path(p).is_file() for p in data.paths)


def test_coop_split_json(tmp_path, image_folder):
    files = sorted((image_folder / "train").rglob("*.png"))
    names = ["blue", "green", "red", "yellow"]
    entry = lambda p: [str(p.relative_to(image_folder / "train")), names.index(p.parent.name), p.parent.name]  # noqa: E731
    split = {"train": [entry(p) for p in files[::2]], "val": [entry(p) for p in files[1::4]], "test": [entry(p) for p in files[3::4]]}
    path = tmp_path / "split_zhou_Colours.json"
    path.write_text(json.dumps(split))
    train = load_dataset(path, split="train", image_root=image_folder / "train")
    test = load_dataset(path, split="test", image_root=image_folder / "train")
    assert train.classnames == names and len(train) == 16 and len(test) == 8
    assert all(Path(p).is_file() for p in train.paths + test.paths)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_dataset(path, split="dev")


def test_few_shot_is_deterministic_and_per_class(image_folder, caplog):
    data = load_dataset(image_folder / "train")
    a, b, c = few_shot(data, 3, seed=1), few_shot(data, 3, seed=1), few_shot(data, 3, seed=2)
    assert a.items == b.items and a.items != c.items
    assert a.counts() == [3, 3, 3, 3]
    with caplog.at_level(logging.WARNING):
        many = few_shot(data, 20, seed=1)
    assert many.counts() == [8, 8, 8, 8] and "fewer than 20 images" in caplog.text


@pytest.mark.parametrize(
    "setup,match",
    [
        (lambda p: None, "dataset not found"),
        (lambda p: p.mkdir(), "no class sub-folders"),
        (lambda p: ((p / "a").mkdir(parents=True), (p / "b").mkdir()), "no images found"),
        (lambda p: (write_colour_folder(p, 2, 0, ("red",)), (p / "empty").mkdir()), r"class folders without images: \['empty'\]"),
        (lambda p: p.with_suffix(".csv").write_text("path,label\n"), "empty dataset"),
        (lambda p: p.with_suffix(".csv").write_text("a.png\n"), "not 'path,label'"),
        (lambda p: p.with_suffix(".json").write_text("{}"), "not a CoOp split file"),
        (lambda p: p.with_suffix(".txt").write_text("x"), "expected an ImageFolder directory"),
    ],
)
def test_bad_datasets(tmp_path, setup, match):
    target = tmp_path / "data"
    setup(target)
    for candidate in (target, target.with_suffix(".csv"), target.with_suffix(".json"), target.with_suffix(".txt")):
        if candidate.exists():
            target = candidate
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_dataset(target)


def test_duplicate_classnames_in_split(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": [["a.png", 0, "cat"], ["b.png", 1, "cat"]], "val": [], "test": []}))
    with pytest.raises(ValueError, match="duplicate class names"):
        load_dataset(path)


def _encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_image_modes_become_rgb():
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    grey16 = Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16))
    sources = {
        "L": _encoded(base.convert("L")),
        "P": _encoded(base.convert("P")),
        "RGBA": _encoded(base.convert("RGBA")),
        "CMYK": _encoded(base.convert("CMYK"), "JPEG"),
        "I;16": _encoded(grey16),
        "array_gray": np.asarray(base.convert("L")),
        "array_rgba": np.asarray(base.convert("RGBA")),
    }
    for name, src in sources.items():
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (30, 20), name
    # 16-bit is rescaled, not clipped to white: the ramp stays a ramp.
    arr16 = np.asarray(load_image(sources["I;16"]))[:, :, 0].astype(int)
    assert arr16.min() < 10 and arr16.max() > 200
    np.testing.assert_array_equal(np.asarray(load_image(sources["RGBA"])), rgb)


def test_exif_orientation_is_applied():
    img = Image.fromarray(np.zeros((10, 40, 3), dtype=np.uint8))  # landscape pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    out = load_image(_encoded(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 40)  # shown as portrait


def test_decompression_bomb_and_corrupt_files(tmp_path):
    big = _encoded(Image.new("L", (3000, 3000)))
    with pytest.raises(ImageDecodeError, match="more than 1000000 pixels"):
        load_image(big, max_pixels=1_000_000)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageDecodeError, match="broken.png"):
        load_image(bad)
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError, match="uint8"):
        load_image(np.zeros((4, 4, 3), dtype=np.float32))


def test_subset_and_relabel(image_folder):
    data = load_dataset(image_folder / "train")
    sub = data.subset(["yellow", "blue"])
    assert sub.classnames == ["yellow", "blue"] and sub.counts() == [8, 8]
    assert all(Path(p).parent.name == sub.classnames[y] for p, y in sub.items)
    with pytest.raises(ValueError, match=r"unknown classes \['purple'\]"):
        data.subset(["purple"])
    with pytest.raises(ValueError, match="not among the model's classes"):
        data.relabel(["blue", "green"])


def test_few_shot_equals_dassls_recorded_draw():
    """coopkit's draw against Dassl's own: ``tests/data/dassl_fewshot.json`` was recorded by running
    Dassl's ``generate_fewshot_dataset`` (see its ``how`` field) on the lists rebuilt here."""
    from coopkit.userdata import Dataset, few_shot_splits

    rec = json.loads((Path(__file__).parent / "data" / "dassl_fewshot.json").read_text())

    def items(sizes, prefix, shuffle):
        out = [(f"{prefix}c{y}_{j:02d}.jpg", y) for y, n in enumerate(sizes) for j in range(n)]
        if shuffle:
            out = [out[i] for i in sorted(range(len(out)), key=lambda i: (i * 37) % len(out))]
        return out

    names = [f"class {y}" for y in range(len(rec["train_sizes"]))]
    train = Dataset(items(rec["train_sizes"], "t_", True), names)
    val = Dataset(items(rec["val_sizes"], "v_", False), names)
    assert len(rec["samples"]) == 15
    for key, expected in rec["samples"].items():
        seed, shots = (int(x) for x in key.replace("seed", "").split("_shots"))
        got_train, got_val = few_shot_splits(train, val, shots, seed)
        assert got_train.paths == expected["train"], key
        assert got_val.paths == expected["val"], key
        assert few_shot(train, shots, seed).paths == expected["train"], key
