"""The synthetic world: determinism, captions true of their images, task layout."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from PIL import Image

from coopkit.embedded import world


def _digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path):
    a = world.write_task("colors", tmp_path / "a", shots_per_class=2, test_per_class=2, seed=3, shift="sketch")
    b = world.write_task("colors", tmp_path / "b", shots_per_class=2, test_per_class=2, seed=3, shift="sketch")
    c = world.write_task("colors", tmp_path / "c", shots_per_class=2, test_per_class=2, seed=4, shift="sketch")
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db
    assert da.keys() == dc.keys()
    assert all(da[k] != dc[k] for k in da)


def test_render_and_caption_are_pure_functions_of_the_seed():
    s1 = world.sample_scene(np.random.default_rng(5))
    s2 = world.sample_scene(np.random.default_rng(5))
    assert s1 == s2
    assert np.array_equal(np.asarray(world.render(s1, 64, seed=9)), np.asarray(world.render(s2, 64, seed=9)))
    assert not np.array_equal(np.asarray(world.render(s1, 64, seed=9)), np.asarray(world.render(s1, 64, seed=10)))
    assert world.caption(s1, np.random.default_rng(1)) == world.caption(s1, np.random.default_rng(1))


def test_fewer_shots_write_a_subset(tmp_path):
    small = _digest(world.write_task("shapes", tmp_path / "s", shots_per_class=2, test_per_class=0))
    big = _digest(world.write_task("shapes", tmp_path / "b", shots_per_class=4, test_per_class=0))
    assert small and all(big[k] == v for k, v in small.items())


def test_task_layout(tmp_path):
    out = world.write_task("colored_shapes", tmp_path, shots_per_class=1, test_per_class=2, shift="all")
    classes = world.task_classes("colored_shapes")
    assert len(classes) >= 20
    for split in ["train", "test"] + [f"test_{s}" for s in world.task_shifts("colored_shapes")]:
        folders = sorted(p.name for p in (out / split).iterdir())
        assert folders == sorted(classes), split
    assert len(list((out / "train" / "red circle").glob("*.png"))) == 1
    assert len(list((out / "test" / "red circle").glob("*.png"))) == 2
    img = Image.open(next((out / "test" / "red circle").glob("*.png")))
    assert img.size == (64, 64) and img.mode == "RGB"


def test_tasks_kinds_shifts_and_base_new():
    assert len(world.TASKS) >= 4
    kinds = {world._TASK_SPECS[t]["attr"] for t in world.TASKS}
    assert {"shape", "color", "texture", "color+shape"} <= kinds
    assert len({s for t in world.TASKS for s in world.task_shifts(t)}) >= 2
    assert all(world.task_shifts(t) for t in world.TASKS)
    base, new = world.base_new_split("colored_shapes")
    assert base and new and not set(base) & set(new)
    assert base + new == world.task_classes("colored_shapes")
    for t in world.TASKS:  # class names are real words
        assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", c) for c in world.task_classes(t))


def test_bad_input_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="valid tasks: shapes"):
        world.write_task("nope", tmp_path)
    with pytest.raises(ValueError, match="valid"):
        world.write_task("textures", tmp_path, shift="sketch")  # a sketch shows no texture
    with pytest.raises(ValueError, match="shape"):
        world.Scene(shape="blob", color="red", size="large", texture=None, background="paper",
                    bg_color=None, style="sketch")


def _hue_distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


def _nearest_color(rgb) -> str:
    return min(world.COLORS, key=lambda c: _hue_distance(world.COLORS[c], rgb))


_COLOR_RE = "|".join(world.COLORS)
_SHAPE_RE = "|".join(world.SHAPES)


@pytest.mark.parametrize("seed", range(3))
def test_captions_true_of_their_images(seed):
    """Parse each caption and check every stated attribute against the scene and its pixels."""
    rng = np.random.default_rng(seed)
    style_words = {s: [p.split(" of")[0] for p in world._STYLE_PHRASES[s]] for s in world.STYLES}
    checked_pixels = 0
    for i in range(150):
        scene = world.sample_scene(rng)
        img = np.asarray(world.render(scene, 64, seed=i), float)
        for _ in range(3):
            text = world.caption(scene, rng)
            # the main object: "<colour> [texture] <shape>" or "<shape> ... that is <colour>"
            clutter_free = re.sub(rf"tiny (({_COLOR_RE}) )?({_SHAPE_RE})", "", text)
            bg = re.findall(rf"(?:on a|against a|in front of a|on) ({_COLOR_RE})(?: background| wall|\.|,)", clutter_free)
            assert set(bg) <= {scene.bg_color}, (text, scene)
            clutter_free = re.sub(rf"(?:on a|against a|in front of a|on) ({_COLOR_RE})(?: background| wall)?", "",
                                  clutter_free)
            shapes = re.findall(rf"\b({_SHAPE_RE})\b", clutter_free)
            assert shapes and set(shapes) == {scene.shape}, (text, scene)
            m = re.search(rf"\b({_COLOR_RE})\b", clutter_free)
            colors = re.findall(rf"\b({_COLOR_RE})\b", clutter_free)
            assert set(colors) <= {scene.color}, (text, scene)
            # clutter mentioned by colour and shape exists
            for c_col, c_shape in re.findall(rf"tiny ({_COLOR_RE}) ({_SHAPE_RE})", text):
                assert any(c.color == c_col and c.shape == c_shape for c in scene.clutter), (text, scene)
            # style words appear only for the scene's style
            for style, words in style_words.items():
                for word in words:
                    if text.startswith(word + " of") or f" {word} of " in text:
                        assert style == scene.style or word in ("a photo", "a picture", "an image"), (text, scene)
            # texture words only when the style shows textures, and only the right one
            for tex, adjs in world._TEXTURE_ADJ.items():
                for adj in adjs + tuple(world._TEXTURE_WITH[tex]):
                    if adj in text and tex != "plain":
                        assert scene.texture == tex, (text, scene)
            for bg, phrases in world._BG_PHRASES.items():
                if any(p in text for p in phrases):
                    assert scene.background == bg, (text, scene)
            if m and scene.style in ("photo", "blurry", "pixelated") and scene.texture in (None, "plain"):
                # independent check on pixels: the object's mean colour is nearest the named one
                mask = world.shape_mask(scene, 64)
                inner = mask & np.roll(mask, 2, 0) & np.roll(mask, -2, 0) & np.roll(mask, 2, 1) & np.roll(mask, -2, 1)
                if inner.sum() > 20:
                    assert _nearest_color(img[inner].mean(0)) == m.group(1), (text, scene, img[inner].mean(0))
                    checked_pixels += 1
    assert checked_pixels > 20


def test_dark_and_sketch_styles_look_like_their_names():
    rng = np.random.default_rng(0)
    dark = [np.asarray(world.render(world.sample_scene(rng, style="dark"), 64, i), float).mean() for i in range(10)]
    photo = [np.asarray(world.render(world.sample_scene(rng, style="photo"), 64, i), float).mean() for i in range(10)]
    sketch = [np.asarray(world.render(world.sample_scene(rng, style="sketch"), 64, i), float) for i in range(10)]
    assert max(dark) < min(photo)
    # a sketch is an outline on paper: most pixels are near-white paper
    assert all((s.min(2) > 200).mean() > 0.7 for s in sketch)


# --- multi-label tasks ----------------------------------------------------------------------------


def test_multilabel_task_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(train_images=6, val_images=3, test_images=4)
    a = world.write_multilabel_task("shape_tags", tmp_path / "a", seed=2, **kw)
    b = world.write_multilabel_task("shape_tags", tmp_path / "b", seed=2, **kw)
    c = world.write_multilabel_task("shape_tags", tmp_path / "c", seed=3, **kw)
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert len(da) == 13 and da == db and da.keys() == dc.keys()
    assert all(da[k] != dc[k] for k in da)
    for split in world.MULTILABEL_SPLITS:
        assert (a / f"{split}.csv").read_bytes() == (b / f"{split}.csv").read_bytes()
    assert sorted(p.name for p in a.iterdir()) == ["test", "test.csv", "train", "train.csv", "val", "val.csv"]


@pytest.mark.parametrize("task", world.MULTILABEL_TASKS)
def test_multilabel_labels_are_the_objects_drawn(tmp_path, task):
    """Each CSV row names exactly the labels of the objects in its scene, and each object is drawn where
    the scene says, in its colour, clear of the others."""
    from dataclasses import replace

    from coopkit.multilabel_data import load_multilabel

    labels = world.multilabel_classes(task)
    out = world.write_multilabel_task(task, tmp_path, train_images=24, val_images=0, test_images=0, seed=5)
    data = load_multilabel(out / "train.csv", classnames=labels)
    counts = []
    for i, path in enumerate(data.paths):
        scene, img = world.multilabel_task_image(task, "train", i, seed=5)
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(img))
        objects = scene.objects()
        named = [o.shape if task == "shape_tags" else o.color for o in objects]
        assert sorted(named) == sorted(data.labels_of(i)) and len(set(named)) == len(named)
        assert labels[i % len(labels)] in data.labels_of(i)  # every label shows in any 8 images in a row
        assert scene.clutter == () and scene.bg_color not in [o.color for o in objects]
        pixels = np.asarray(img, np.float32)
        for j, o in enumerate(objects):
            mask = world.shape_mask(replace(scene, shape=o.shape, x=o.x, y=o.y, r=o.r, angle=o.angle), 64)
            assert np.abs(np.median(pixels[mask], 0) - world.COLORS[o.color]).max() < 30, (i, o)
            for q in objects[j + 1:]:
                assert np.hypot(o.x - q.x, o.y - q.y) > o.r + q.r
        counts.append(len(objects))
    assert set(counts) == set(range(1, world.MAX_OBJECTS + 1))


def test_multilabel_partial_labels_hide_training_labels_only(tmp_path):
    from coopkit.multilabel_data import load_multilabel

    labels = world.multilabel_classes("color_tags")
    kw = dict(train_images=40, val_images=8, test_images=8, seed=1)
    full = world.write_multilabel_task("color_tags", tmp_path / "full", **kw)
    half = world.write_multilabel_task("color_tags", tmp_path / "half", known=0.5, **kw)
    assert _digest(full) == _digest(half)  # the same images
    f, h = (load_multilabel(d / "train.csv", classnames=labels) for d in (full, half))
    known = h.targets != -1
    assert f.known_fraction == 1.0 and 0.4 < h.known_fraction < 0.6
    assert np.array_equal(h.targets[known], f.targets[known])  # a known label is the true one
    for split in ("val", "test"):
        assert (full / f"{split}.csv").read_bytes() == (half / f"{split}.csv").read_bytes()
        assert load_multilabel(half / f"{split}.csv", classnames=labels).known_fraction == 1.0
    assert "unknown" in (half / "train.csv").read_text().splitlines()[0]


def test_multilabel_bad_input_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="valid: color_tags, shape_tags"):
        world.write_multilabel_task("shapes", tmp_path)
    with pytest.raises(ValueError, match=r"known must be a fraction in \(0, 1\]"):
        world.write_multilabel_task("shape_tags", tmp_path, known=0.0)
    with pytest.raises(ValueError, match="train_images must be an integer >= 0"):
        world.write_multilabel_task("shape_tags", tmp_path, train_images=-1)
    with pytest.raises(ValueError, match="unknown label 'red'"):
        world.multilabel_scene("shape_tags", "red", np.random.default_rng(0))
    with pytest.raises(ValueError, match="color"):
        world.Item(shape="circle", color="teal", x=0.5, y=0.5, r=0.2)
