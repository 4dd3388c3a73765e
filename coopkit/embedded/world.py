"""A seeded synthetic world of captioned scenes and the few-shot tasks drawn from it.

coopkit ships its own small CLIP (``coopkit-tiny``) pretrained on this world, so that the
demo, the tests and the benchmarks have a model and data without any download. A scene is
one main object (shape, colour, size, fill texture) on a background, with small clutter
objects (a multi-label task's scene: up to three full objects, see below), drawn in an image
style (photo, sketch, blurry, dark, noisy, pixelated). :func:`caption` describes a scene (its
main object) in many phrasings, naming the image style the way web captions do ("a grainy
photo of ...", "a sketch of ..."); everything a caption says is true of the rendered image.
:func:`write_task` writes a few-shot task in ImageFolder layout.

Everything is a pure function of its seed: the same seed gives the same bytes.

Tasks (:data:`TASKS`; 16 shots and 50 test images per class by default):

* ``shapes``: 8 object shapes, in photos with random colours, textures, backgrounds, clutter;
* ``colors``: 8 object colours, in dark photos, often on a plain background of another colour;
* ``textures``: 4 fill patterns (plain, striped, dotted, checkered), in grainy photos;
* ``colored_shapes``: 25 colour-and-shape classes ("red circle"), in grainy photos; split into
  base and new halves by :func:`base_new_split`.

Domain-shifted test sets (:data:`SHIFTS`): ``sketch`` (outline drawings on paper), ``noise``
(heavy Gaussian noise) and ``newbg`` (brick and wood backgrounds, never seen in pretraining).

Multi-label tasks (:data:`MULTILABEL_TASKS`, written by :func:`write_multilabel_task` as
``train``/``val``/``test`` CSVs of ``path,labels,unknown``): scenes of 1 to 3 full objects, each
with another label, the image's labels being those of its objects:

* ``color_tags``: which of the 8 colours the objects have (random shapes and backgrounds; the
  default, :data:`DEFAULT_MULTILABEL_TASK`);
* ``shape_tags``: which of the 8 shapes are in a photo (random colours); coopkit-tiny barely
  tells shapes apart at this size, so every method stays near chance on it.

Public names: :data:`TASKS`, :data:`SHIFTS`, :func:`task_classes`, :func:`task_shifts`,
:func:`base_new_split`, :func:`write_task`, :class:`Scene`, :class:`Item`, :func:`sample_scene`,
:func:`sample_group`, :func:`render`, :func:`caption`; multi-label: :data:`MULTILABEL_TASKS`,
:func:`multilabel_classes`, :func:`multilabel_scene`, :func:`multilabel_task_image`, :func:`scene_labels`,
:func:`write_multilabel_task`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..multilabel_data import MultiLabelDataset, partial_labels, write_multilabel_csv
from ..runtime.atomic import atomic_path, sha256_hex

__all__ = [
    "SHAPES", "COLORS", "TEXTURES", "BACKGROUNDS", "STYLES", "TASKS", "SHIFTS",
    "Scene", "Clutter", "sample_scene", "sample_group", "render", "shape_mask", "caption", "task_classes",
    "task_shifts", "base_new_split", "write_task", "task_scene", "Item", "MULTILABEL_TASKS",
    "DEFAULT_MULTILABEL_TASK", "MAX_OBJECTS", "MULTILABEL_SPLITS", "multilabel_classes", "scene_labels",
    "multilabel_scene", "multilabel_task_image", "write_multilabel_task",
]

# ----------------------------------------------------------------------------- vocabulary

#: Object shapes (class names of the ``shapes`` task).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon")

#: Object colours with their RGB values (class names of the ``colors`` task).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 30),
    "orange": (245, 135, 20),
    "purple": (135, 50, 185),
    "pink": (245, 135, 190),
    "brown": (120, 72, 35),
}
#: Extra colours used only for plain backgrounds.
_BG_ONLY_COLORS: dict[str, tuple[int, int, int]] = {"white": (240, 240, 240), "gray": (128, 128, 128)}

#: Fill textures of the main object (class names of the ``textures`` task).
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered")

#: Background families seen in pretraining ("plain" is a flat named colour).
BACKGROUNDS: tuple[str, ...] = ("plain", "grass", "sand", "water", "snow")
#: Background families never seen in pretraining (the ``newbg`` shift).
NEW_BACKGROUNDS: tuple[str, ...] = ("brick", "wood")

#: Image styles; captions name them ("a sketch of", "a grainy photo of", ...).
STYLES: tuple[str, ...] = ("photo", "sketch", "blurry", "dark", "noisy", "pixelated")
#: Styles in which a fill texture can be seen (and so may be captioned).
_TEXTURE_STYLES = ("photo", "dark", "noisy")

SIZES: tuple[str, ...] = ("small", "large")

# ----------------------------------------------------------------------------- tasks

# name -> (attribute the class names are drawn from, class names, style, allowed shifts).
# Three tasks are drawn in a style that "a photo of a {}." fits poorly (dark, grainy), as
# EuroSAT's satellite images do for real CLIP; "shapes" is in plain photos.
_TASK_SPECS: dict[str, dict] = {
    "shapes": {"attr": "shape", "classes": SHAPES, "style": "photo", "shifts": ("sketch", "noise", "newbg")},
    "colors": {"attr": "color", "classes": tuple(COLORS), "style": "dark", "shifts": ("sketch", "noise", "newbg")},
    "textures": {"attr": "texture", "classes": TEXTURES, "style": "noisy", "shifts": ("noise", "newbg")},
    "colored_shapes": {
        "attr": "color+shape",
        "classes": tuple(f"{c} {s}" for c in ("red", "green", "blue", "yellow", "purple")
                         for s in ("circle", "square", "triangle", "star", "heart")),
        "style": "noisy",
        "shifts": ("sketch", "noise", "newbg"),
    },
}

#: Names of the shipped few-shot tasks.
TASKS: tuple[str, ...] = tuple(_TASK_SPECS)
#: Names of the domain shifts a test set can be rendered under.
SHIFTS: tuple[str, ...] = ("sketch", "noise", "newbg")


def _check_task(name: str) -> dict:
    if name not in _TASK_SPECS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return _TASK_SPECS[name]


def task_classes(name: str) -> list[str]:
    """Class names of a task, in label order (real words, e.g. ``"red circle"``)."""
    return list(_check_task(name)["classes"])


def task_shifts(name: str) -> tuple[str, ...]:
    """The domain shifts a task's test set can be rendered under (see :data:`SHIFTS`)."""
    return tuple(_check_task(name)["shifts"])


def base_new_split(name: str) -> tuple[list[str], list[str]]:
    """Split a task's classes into base and new halves (CoOp's base-to-new protocol).

    The first ``ceil(n/2)`` classes in label order are base, the rest new, as in
    CoCoOp's splits.
    """
    classes = task_classes(name)
    k = math.ceil(len(classes) / 2)
    return classes[:k], classes[k:]


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Clutter:
    """A small distractor object (drawn under the main object)."""

    shape: str
    color: str
    x: float
    y: float
    r: float


@dataclass(frozen=True)
class Item:
    """A further full object of a multi-object scene, drawn as the main object is (its fill
    texture, its shading; an outline in a sketch)."""

    shape: str
    color: str
    x: float
    y: float
    r: float
    angle: float = 0.0
    texture: Optional[str] = None

    def __post_init__(self) -> None:
        _check_object(self.shape, self.color, self.texture)


def _check_object(shape: str, color: str, texture: Optional[str]) -> None:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")
    if color not in COLORS:
        raise ValueError(f"unknown color {color!r}; valid: {tuple(COLORS)}")
    if texture is not None and texture not in TEXTURES:
        raise ValueError(f"unknown texture {texture!r}; valid: {TEXTURES}")


@dataclass(frozen=True)
class Scene:
    """Everything about an image that a caption may state.

    Geometry is in fractions of the image side, so a scene renders at any size.
    ``texture`` is ``None`` when the style hides fill textures (sketch, blurry, pixelated);
    ``bg_color`` names the colour of a ``plain`` background and is ``None`` otherwise;
    ``background`` is ``"paper"`` for sketches. ``others`` are further full objects (the
    multi-label tasks' scenes; captions describe the main object only).
    """

    shape: str
    color: str
    size: str
    texture: Optional[str]
    background: str
    bg_color: Optional[str]
    style: str
    x: float = 0.5
    y: float = 0.5
    r: float = 0.33
    angle: float = 0.0
    clutter: tuple[Clutter, ...] = field(default_factory=tuple)
    others: tuple[Item, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_object(self.shape, self.color, self.texture)
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; valid: {STYLES}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; valid: {SIZES}")
        valid_bg = BACKGROUNDS + NEW_BACKGROUNDS + ("paper",)
        if self.background not in valid_bg:
            raise ValueError(f"unknown background {self.background!r}; valid: {valid_bg}")

    def objects(self) -> tuple[Item, ...]:
        """Every full object, the main one first."""
        main = Item(self.shape, self.color, self.x, self.y, self.r, self.angle, self.texture)
        return (main, *self.others)


def _choice(rng: np.random.Generator, seq: Sequence):
    return seq[int(rng.integers(len(seq)))]


def sample_scene(
    rng: np.random.Generator,
    *,
    shape: Optional[str] = None,
    color: Optional[str] = None,
    texture: Optional[str] = None,
    style: Optional[str] = None,
    background: Optional[str] = None,
    bg_color: Optional[str] = None,
    new_backgrounds: bool = False,
) -> Scene:
    """Draw a random scene; keyword arguments fix attributes.

    Unfixed styles follow the pretraining mix (40% photo, 12% each other style).
    ``new_backgrounds=True`` draws backgrounds from the families never seen in pretraining.
    """
    if style is None:
        style = "photo" if rng.random() < 0.4 else _choice(rng, STYLES[1:])
    shape = shape or _choice(rng, SHAPES)
    color = color or _choice(rng, tuple(c for c in COLORS if c != bg_color))
    size = _choice(rng, SIZES)
    if style in _TEXTURE_STYLES:
        texture = texture or _choice(rng, TEXTURES)
        if size == "small" and texture != "plain":
            size = "large"  # a texture needs room to be seen
    else:
        texture = None
    if style == "sketch":
        background, bg_color = "paper", None
    else:
        if background is None:
            if new_backgrounds:
                background = _choice(rng, NEW_BACKGROUNDS)
            else:
                background = "plain" if rng.random() < 0.5 else _choice(rng, BACKGROUNDS[1:])
        if background == "plain":
            if bg_color is None:
                bg_color = _choice(rng, [c for c in (*COLORS, *_BG_ONLY_COLORS) if c != color])
        else:
            bg_color = None
    r = float(rng.uniform(0.27, 0.36) if size == "large" else rng.uniform(0.14, 0.19))
    x = float(rng.uniform(r + 0.02, 1 - r - 0.02))
    y = float(rng.uniform(r + 0.02, 1 - r - 0.02))
    clutter: list[Clutter] = []
    for _ in range(int(rng.integers(0, 5))):
        c = Clutter(
            shape=_choice(rng, SHAPES), color=_choice(rng, tuple(COLORS)),
            x=float(rng.uniform(0.08, 0.92)), y=float(rng.uniform(0.08, 0.92)),
            r=float(rng.uniform(0.06, 0.09)),
        )
        # keep clutter clear of the main object, so that what a caption says of it stays visible
        if math.hypot(c.x - x, c.y - y) > r + c.r:
            clutter.append(c)
    return Scene(shape=shape, color=color, size=size, texture=texture, background=background,
                 bg_color=bg_color, style=style, x=x, y=y, r=r,
                 angle=float(rng.uniform(-0.35, 0.35)), clutter=tuple(clutter))


def sample_group(rng: np.random.Generator, k: int = 4) -> tuple[str, list[Scene]]:
    """``k`` scenes equal in everything but one attribute: ``(attribute, scenes)``.

    Pretraining batches are built from such groups: within a group only the varied
    attribute tells the captions apart, so a contrastive model cannot get by on the easy
    attributes (colour, background) and must also learn shapes, textures and styles.
    """
    base = sample_scene(rng)
    options = ["shape", "shape", "color", "background", "style"]
    if base.texture is not None and base.size == "large":
        options += ["texture", "texture"]
    if base.background == "paper":
        options = [o for o in options if o not in ("background", "style")]
    attr = _choice(rng, options)

    def pick(values: Sequence) -> list:
        idx = rng.choice(len(values), size=min(k, len(values)), replace=False)
        return [values[int(i)] for i in idx]

    if attr == "shape":
        scenes = [replace(base, shape=v) for v in pick(SHAPES)]
    elif attr == "color":
        scenes = [replace(base, color=v) for v in pick([c for c in COLORS if c != base.bg_color])]
    elif attr == "texture":
        scenes = [replace(base, texture=v) for v in pick(TEXTURES)]
    elif attr == "background":
        bgs = [(b, None) for b in BACKGROUNDS[1:]]
        bgs += [("plain", c) for c in (*COLORS, *_BG_ONLY_COLORS) if c != base.color]
        scenes = [replace(base, background=b, bg_color=c) for b, c in pick(bgs)]
    else:  # style, among the styles that keep the background
        styles = pick([st for st in STYLES if st != "sketch"])
        scenes = [replace(base, style=st, texture=(base.texture or "plain") if st in _TEXTURE_STYLES else None)
                  for st in styles]
    return attr, scenes


# ----------------------------------------------------------------------------- rendering


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> Optional[list[tuple[float, float]]]:
    """Vertices of a shape (``None`` for a circle, drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
        pts = [(px, py + 0.15) for px, py in pts]
    elif shape == "star":
        pts = []
        for k in range(10):
            a = -math.pi / 2 + k * math.pi / 5
            rad = 1.0 if k % 2 == 0 else 0.42
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif shape == "heart":
        pts = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            px = 16 * math.sin(t) ** 3
            py = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((px / 17.0, py / 17.0 + 0.05))
    elif shape == "cross":
        a, b = 1.0, 0.34
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
    elif shape == "diamond":
        pts = [(0, -1.0), (0.62, 0), (0, 1.0), (-0.62, 0)]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in (k * math.pi / 3 for k in range(6))]
    else:  # pragma: no cover - guarded by Scene
        raise ValueError(shape)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (px * ca - py * sa), cy + r * (px * sa + py * ca)) for px, py in pts]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
                fill=None, outline=None, width: int = 1) -> None:
    pts = _polygon(shape, cx, cy, r, angle)
    if pts is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    elif outline is not None and fill is None:
        draw.line(pts + [pts[0]], fill=outline, width=width, joint="curve")
    else:
        draw.polygon(pts, fill=fill)


def shape_mask(scene: Scene, size: int) -> np.ndarray:
    """Boolean mask (size, size) of the main object's filled area (for tests and analysis)."""
    img = Image.new("L", (size, size), 0)
    _draw_shape(ImageDraw.Draw(img), scene.shape, scene.x * size, scene.y * size, scene.r * size,
                scene.angle, fill=255)
    return np.asarray(img) > 127


def _background(scene: Scene, n: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (n, n, 3) background in 0..255."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    bg = scene.background
    if bg == "paper":
        base = np.full((n, n, 3), (246, 244, 236), np.float32)
        return base + rng.normal(0, 3, (n, n, 1)).astype(np.float32)
    if bg == "plain":
        rgb = np.array((COLORS | _BG_ONLY_COLORS)[scene.bg_color], np.float32)
        grad = 1.0 + 0.12 * ((xx * rng.uniform(-1, 1)) + (yy * rng.uniform(-1, 1)))
        return rgb[None, None, :] * grad[..., None]
    if bg == "grass":
        base = np.array((70, 140, 45), np.float32)
        blades = np.sin(xx * rng.uniform(60, 90) + np.sin(yy * 9) * 2 + rng.uniform(0, 6)) * 22
        noise = rng.normal(0, 14, (n, n)).astype(np.float32)
        return base[None, None] + (blades + noise)[..., None] * np.array((0.5, 1.0, 0.4), np.float32)
    if bg == "sand":
        base = np.array((214, 184, 128), np.float32)
        ripple = np.sin((yy + 0.15 * np.sin(xx * 7)) * rng.uniform(25, 40)) * 10
        noise = rng.normal(0, 12, (n, n)).astype(np.float32)
        return base[None, None] + (ripple + noise)[..., None]
    if bg == "water":
        base = np.array((35, 95, 170), np.float32)
        waves = np.sin(yy * rng.uniform(35, 55) + np.sin(xx * rng.uniform(8, 14)) * 1.5) * 25
        return base[None, None] + waves[..., None] * np.array((0.6, 0.8, 1.0), np.float32)
    if bg == "snow":
        base = np.full((n, n, 3), (236, 240, 246), np.float32)
        speck = (rng.random((n, n)) < 0.04) * -60.0
        return base + (speck + rng.normal(0, 4, (n, n)))[..., None].astype(np.float32)
    if bg == "brick":
        h = n // 8
        rows = (np.arange(n)[:, None] // h)
        off = (rows % 2) * (n // 8)
        col = ((np.arange(n)[None, :] + off) % (n // 4))
        mortar = ((np.arange(n)[:, None] % h) < max(1, h // 6)) | (col < max(1, h // 6))
        base = np.empty((n, n, 3), np.float32)
        base[:] = (150, 60, 45)
        base[mortar] = (200, 195, 185)
        return base + rng.normal(0, 8, (n, n, 1)).astype(np.float32)
    if bg == "wood":
        base = np.array((150, 100, 55), np.float32)
        grain = np.sin((xx + 0.05 * np.sin(yy * 20)) * rng.uniform(40, 70)) * 22
        return base[None, None] + grain[..., None] * np.array((1.0, 0.8, 0.5), np.float32)
    raise ValueError(f"unknown background {bg!r}")  # pragma: no cover


def _texture_fill(texture: str, rgb: np.ndarray, n: int, angle: float, scale: float) -> np.ndarray:
    """float32 (n, n, 3) fill of the main object."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / scale
    light = rgb * 0.3 + 255 * 0.7
    if texture == "plain":
        t = np.zeros((n, n), bool)
    elif texture == "striped":
        ca, sa = math.cos(angle + 0.6), math.sin(angle + 0.6)
        t = ((xx * ca + yy * sa) / 3.0 % 2) < 1
    elif texture == "dotted":
        u, v = (xx % 6) - 3, (yy % 6) - 3
        t = (u * u + v * v) < 2.2 ** 2
    elif texture == "checkered":
        t = ((xx // 4 + yy // 4) % 2) == 0
    else:  # pragma: no cover - guarded by Scene
        raise ValueError(texture)
    out = np.empty((n, n, 3), np.float32)
    out[:] = rgb
    out[t] = light
    return out


def render(scene: Scene, size: int = 64, seed: int = 0, *, extra_noise: float = 0.0) -> Image.Image:
    """Render a scene to an RGB image of ``size`` x ``size`` pixels.

    Drawn at twice the size and box-downsampled (anti-aliasing); ``seed`` drives the pixel
    noise and background detail, so the same (scene, size, seed) gives the same pixels.
    ``extra_noise`` adds Gaussian noise of that standard deviation (the ``noise`` shift).
    """
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 7])
    n = 2 * size
    sketch = scene.style == "sketch"
    canvas = _background(scene, n, rng)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    line_w = max(2, n // 40)
    for c in scene.clutter:
        rgb = COLORS[c.color]
        if sketch:
            _draw_shape(draw, c.shape, c.x * n, c.y * n, c.r * n, 0.0, outline=rgb, width=max(1, line_w // 2))
        else:
            _draw_shape(draw, c.shape, c.x * n, c.y * n, c.r * n, 0.0, fill=rgb)
    if sketch:
        for obj in scene.objects():
            _draw_shape(draw, obj.shape, obj.x * n, obj.y * n, obj.r * n, obj.angle, outline=COLORS[obj.color],
                        width=line_w)
        arr = np.asarray(img, np.float32)
    else:
        arr = np.asarray(img, np.float32)
        shade = 1.0 + 0.10 * (np.mgrid[0:n, 0:n][0][..., None] / n - 0.5) * -2  # lit from above
        for obj in scene.objects():
            mask_img = Image.new("L", (n, n), 0)
            _draw_shape(ImageDraw.Draw(mask_img), obj.shape, obj.x * n, obj.y * n, obj.r * n, obj.angle, fill=255)
            m = np.asarray(mask_img, np.float32)[..., None] / 255.0  # (n, n, 1)
            fill = _texture_fill(obj.texture or "plain", np.array(COLORS[obj.color], np.float32), n, obj.angle,
                                 scale=n / 64.0)
            arr = arr * (1 - m) + fill * shade * m
    small = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").resize((size, size), Image.BOX)
    style = scene.style
    if style == "blurry":
        small = small.filter(ImageFilter.GaussianBlur(radius=size / 40.0))
    elif style == "pixelated":
        k = max(4, size // 4)
        small = small.resize((k, k), Image.BOX).resize((size, size), Image.NEAREST)
    out = np.asarray(small, np.float32)
    sigma = {"photo": 5.0, "sketch": 3.0, "blurry": 4.0, "dark": 5.0, "noisy": 38.0, "pixelated": 3.0}[style]
    if style == "dark":
        out = out * 0.32
    out = out + rng.normal(0, 1, out.shape).astype(np.float32) * math.hypot(sigma, extra_noise)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")


# ----------------------------------------------------------------------------- captions

_STYLE_PHRASES: dict[str, tuple[str, ...]] = {
    "photo": ("a photo of", "a picture of", "an image of", "a photograph of", "a snapshot of", "a clear photo of"),
    "sketch": ("a sketch of", "a drawing of", "an outline drawing of", "a line drawing of", "a pencil sketch of"),
    "blurry": ("a blurry photo of", "a blurred image of", "an out of focus photo of", "a blurry picture of"),
    "dark": ("a dark photo of", "a photo at night of", "a dim picture of", "a dark image of", "a low light photo of"),
    "noisy": ("a noisy photo of", "a grainy photo of", "a grainy image of", "a noisy picture of"),
    "pixelated": ("a pixelated image of", "a low resolution photo of", "a pixel art picture of", "a pixelated photo of"),
}
_STYLE_TAILS: dict[str, tuple[str, ...]] = {
    "photo": ("in a photo", "in a picture"),
    "sketch": ("in a sketch", "drawn as an outline", "in a drawing"),
    "blurry": ("in a blurry photo", "out of focus"),
    "dark": ("at night", "in the dark", "in a dark photo"),
    "noisy": ("in a grainy photo", "in a noisy photo"),
    "pixelated": ("in a pixelated image", "at low resolution"),
}
_TEXTURE_ADJ: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "solid"),
    "striped": ("striped",),
    "dotted": ("dotted", "spotted", "polka dot"),
    "checkered": ("checkered",),
}
_TEXTURE_WITH: dict[str, tuple[str, ...]] = {
    "plain": ("with no pattern", "in a single colour"),
    "striped": ("with stripes", "with a striped pattern"),
    "dotted": ("with dots", "with polka dots", "with a dotted pattern"),
    "checkered": ("with a checkered pattern", "with checks"),
}
_BG_PHRASES: dict[str, tuple[str, ...]] = {
    "grass": ("on grass", "on the grass", "on a grass field", "in a grassy field"),
    "sand": ("on sand", "on the sand", "on a sandy beach", "in the desert sand"),
    "water": ("on water", "on the water", "floating on water", "in the sea"),
    "snow": ("on snow", "in the snow", "on a snowy field"),
}


_LEADS: tuple[str, ...] = (
    "in this image we can see", "the picture below shows", "one more example from my collection:",
    "here we can clearly see", "an example from the data set showing", "my favourite one so far is",
    "look at this, it is", "found this today while looking through old files:",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _background_phrase(scene: Scene, rng: np.random.Generator) -> str:
    if scene.background == "plain":
        c = scene.bg_color
        return _choice(rng, (f"on a {c} background", f"against a {c} background", f"on {c}", f"in front of a {c} wall"))
    return _choice(rng, _BG_PHRASES[scene.background])


def caption(scene: Scene, rng: np.random.Generator, *, mention: Sequence[str] = ()) -> str:
    """One caption of a scene, in a randomly drawn phrasing.

    Every stated attribute is true of the rendered image: the style phrase names the
    style, a colour word next to the shape names the main object's colour, a background
    phrase names the background, a clutter phrase names a real clutter object. Attributes
    are left out at random, as web captions leave things out. Backgrounds of the
    never-pretrained families (brick, wood) are never captioned. ``mention`` names
    attributes (``"color"``, ``"texture"``, ``"background"``, ``"style"``) that must be said
    when the image shows them (the shape is always said).
    """
    s = scene
    rnd = rng.random
    # the object noun phrase: [size] [colour] [texture] shape [with texture]
    adjs: list[str] = []
    if rnd() < 0.3:
        adjs.append(_choice(rng, (s.size, "big" if s.size == "large" else "little")))
    say_color = rnd() < 0.75 or "color" in mention
    tex_adj = tex_with = None
    if s.texture is not None and (rnd() < 0.6 or "texture" in mention):
        if rnd() < 0.5:
            tex_adj = _choice(rng, _TEXTURE_ADJ[s.texture])
        else:
            tex_with = _choice(rng, _TEXTURE_WITH[s.texture])
    if tex_adj and rnd() < 0.5:
        adjs.append(tex_adj)
        tex_adj = None
    if say_color:
        adjs.append(s.color)
    if tex_adj:
        adjs.append(tex_adj)
    noun = s.shape if rnd() < 0.85 else f"{s.shape} shape"
    core = " ".join(adjs + [noun])
    if tex_with:
        core = f"{core} {tex_with}"
    if say_color and rnd() < 0.15:  # "a circle that is red"
        others = [a for a in adjs if a != s.color]
        core = " ".join(others + [noun]) + (f" {tex_with}" if tex_with else "") + f" that is {s.color}"
    np_phrase = f"{_article(core)} {core}"
    # extras: background, clutter
    extras: list[str] = []
    if s.background not in ("paper",) + NEW_BACKGROUNDS and (rnd() < 0.6 or "background" in mention):
        extras.append(_background_phrase(s, rng))
    if s.clutter and rnd() < 0.45:
        c = s.clutter[int(rng.integers(len(s.clutter)))]
        extras.append(_choice(rng, (
            f"next to a tiny {c.color} {c.shape}", f"near a tiny {c.color} {c.shape}",
            "among small shapes", "with clutter around it", f"and a tiny {c.shape}")))
    if rng.random() < 0.5:
        extras.reverse()
    # style: prefix, tail or nothing
    form = rnd()
    say_style_p = 1.0 if "style" in mention else 0.75 if s.style == "photo" else 0.9
    if form < say_style_p * 0.8:
        text = f"{_choice(rng, _STYLE_PHRASES[s.style])} {np_phrase}"
        if extras:
            text += " " + " ".join(extras)
    elif form < say_style_p:
        text = np_phrase + (" " + " ".join(extras) if extras else "") + f", {_choice(rng, _STYLE_TAILS[s.style])}"
    else:
        text = np_phrase + (" " + " ".join(extras) if extras else "")
    if rnd() < 0.15:
        text = _choice(rng, ("there is ", "here is ", "this is ")) + text
    elif rnd() < 0.3:  # neutral lead-ins push the words to later positions, as long web captions do
        text = _choice(rng, _LEADS) + " " + text
    return text + "."


# ----------------------------------------------------------------------------- tasks on disk


def _stable_id(text: str) -> int:
    return int.from_bytes(bytes.fromhex(sha256_hex(text))[:4], "little")


def task_scene(name: str, label: int, rng: np.random.Generator, *, shift: Optional[str] = None) -> Scene:
    """A random scene of class ``label`` of task ``name``, in the task's style or a shift."""
    spec = _check_task(name)
    cls = spec["classes"][label]
    kw: dict = {"style": spec["style"]}
    if shift == "sketch":
        kw["style"] = "sketch"
    elif shift == "newbg":
        kw["new_backgrounds"] = True
    return sample_scene(rng, **kw, **_label_attrs(spec["attr"], cls))


def _label_attrs(attr: str, cls: str) -> dict[str, str]:
    """The scene attributes a class name of a task fixes (``"red circle"`` -> colour and shape)."""
    if attr == "color+shape":
        color, shape = cls.split(" ")
        return {"color": color, "shape": shape}
    assert attr in ("shape", "color", "texture", "background"), attr
    return {attr: cls}


def _atomic_png(img: Image.Image, path: Path) -> None:
    with atomic_path(path, fsync=False) as tmp:  # thousands of small files: no fsync each
        img.save(tmp, format="PNG", optimize=False)


def _write_split(name: str, split: str, out_dir: Path, per_class: int, seed: int, size: int,
                 shift: Optional[str]) -> None:
    classes = task_classes(name)
    split_id = _stable_id(f"{name}/{split}")
    extra_noise = 45.0 if shift == "noise" else 0.0
    for label, cls in enumerate(classes):
        folder = out_dir / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, split_id, label, i])
            scene = task_scene(name, label, rng, shift=shift)
            img = render(scene, size, seed=int(rng.integers(2**31)), extra_noise=extra_noise)
            _atomic_png(img, folder / f"{i:04d}.png")


def write_task(
    name: str,
    out_dir: Union[str, os.PathLike],
    *,
    shots_per_class: int = 16,
    test_per_class: int = 50,
    seed: int = 0,
    shift: Union[None, str, Iterable[str]] = None,
    size: int = 64,
) -> Path:
    """Write task ``name`` to ``out_dir`` in ImageFolder layout and return ``out_dir``.

    Writes ``train/<class>/NNNN.png`` (``shots_per_class`` images per class),
    ``test/<class>/NNNN.png`` (``test_per_class``) and, for each shift named in ``shift``
    (``"sketch"``, ``"noise"``, ``"newbg"``; ``"all"`` for every shift the task allows),
    ``test_<shift>/<class>/NNNN.png``. Class folders are named by the class names
    verbatim (``red circle``), as ImageFolder readers take folder names as class names. Image ``i`` of a class depends only on (seed, task,
    split, class, i), so a smaller ``shots_per_class`` writes a subset of a larger one.
    """
    _check_task(name)
    if shots_per_class < 0 or test_per_class < 0:
        raise ValueError(f"shots_per_class and test_per_class must be >= 0, got {shots_per_class}, {test_per_class}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    if shift is None:
        shifts: tuple[str, ...] = ()
    elif isinstance(shift, str):
        shifts = task_shifts(name) if shift == "all" else (shift,)
    else:
        shifts = tuple(shift)
    for s in shifts:
        if s not in task_shifts(name):
            raise ValueError(f"shift {s!r} is not available for task {name!r}; valid: {task_shifts(name)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if shots_per_class:
        _write_split(name, "train", out, shots_per_class, seed, size, None)
    if test_per_class:
        _write_split(name, "test", out, test_per_class, seed, size, None)
        for s in shifts:
            _write_split(name, f"test_{s}", out, test_per_class, seed, size, s)
    return out


# ----------------------------------------------------------------------------- multi-label tasks

# name -> (attribute the labels name, labels, style). A scene holds 1 to MAX_OBJECTS full objects
# with different labels; an image's labels are those of its objects.
_MULTILABEL_SPECS: dict[str, dict] = {
    "color_tags": {"attr": "color", "labels": tuple(COLORS), "style": "photo"},
    "shape_tags": {"attr": "shape", "labels": SHAPES, "style": "photo"},
}

#: Names of the multi-label tasks (:func:`write_multilabel_task`).
MULTILABEL_TASKS: tuple[str, ...] = tuple(_MULTILABEL_SPECS)
#: The multi-label task of the demo and the report: coopkit-tiny sees colours at this size, not shapes
#: (measured: docs/embedded.md).
DEFAULT_MULTILABEL_TASK = "color_tags"
#: The most objects a multi-label scene holds (each has its own label).
MAX_OBJECTS = 3
#: The multi-label splits :func:`write_multilabel_task` writes, in order.
MULTILABEL_SPLITS: tuple[str, ...] = ("train", "val", "test")
# The full objects of a multi-label scene: radius range (fractions of the side) and the gap kept between them.
_ITEM_RADIUS = (0.15, 0.21)
_ITEM_GAP = 0.03


def _check_multilabel(name: str) -> dict:
    if name not in _MULTILABEL_SPECS:
        raise ValueError(f"unknown multi-label task {name!r}; valid: {', '.join(MULTILABEL_TASKS)}")
    return _MULTILABEL_SPECS[name]


def multilabel_classes(name: str) -> list[str]:
    """The labels of multi-label task ``name``, in label order."""
    return list(_check_multilabel(name)["labels"])


def scene_labels(name: str, scene: Scene) -> list[str]:
    """The labels of multi-label task ``name`` that ``scene`` shows (those of its full objects), in label order."""
    spec = _check_multilabel(name)
    shown = {" ".join(getattr(obj, a) for a in spec["attr"].split("+")) for obj in scene.objects()}
    return [c for c in spec["labels"] if c in shown]


def _place(rng: np.random.Generator, k: int) -> list[tuple[float, float, float]]:
    """Up to ``k`` non-overlapping discs ``(x, y, r)`` inside the image (an object whose disc finds no
    free place in 100 draws is left out, which the first never is)."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(k):
        for _ in range(100):
            r = float(rng.uniform(*_ITEM_RADIUS))
            x, y = (float(v) for v in rng.uniform(r + 0.02, 1 - r - 0.02, 2))
            if all(math.hypot(x - px, y - py) > r + pr + _ITEM_GAP for px, py, pr in placed):
                placed.append((x, y, r))
                break
    return placed


def multilabel_scene(name: str, first: str, rng: np.random.Generator) -> Scene:
    """A random scene of multi-label task ``name``: 1 to :data:`MAX_OBJECTS` full objects (equally likely),
    each with another label, the first labelled ``first``; no clutter, plain fills, in the task's style.
    A plain background never has the colour of an object."""
    spec = _check_multilabel(name)
    if first not in spec["labels"]:
        raise ValueError(f"unknown label {first!r} of task {name!r}; valid: {', '.join(spec['labels'])}")
    k = 1 + int(rng.integers(MAX_OBJECTS))
    texture = "plain" if spec["style"] in _TEXTURE_STYLES else None
    base = sample_scene(rng, style=spec["style"], texture=texture, **_label_attrs(spec["attr"], first))
    attrs = [_label_attrs(spec["attr"], c) for c in spec["labels"] if c != first]
    attrs = [a for a in attrs if a.get("color") != base.bg_color]  # a red object is not a red background
    others = [attrs[int(i)] for i in rng.permutation(len(attrs))[: k - 1]]
    colors = tuple(c for c in COLORS if c != base.bg_color)
    discs = _place(rng, 1 + len(others))
    items = [Item(shape=a.get("shape") or _choice(rng, SHAPES), color=a.get("color") or _choice(rng, colors),
                  x=x, y=y, r=r, angle=float(rng.uniform(-0.35, 0.35)), texture=texture)
             for a, (x, y, r) in zip(others, discs[1:])]
    x, y, r = discs[0]
    return replace(base, x=x, y=y, r=r, size="small", clutter=(), others=tuple(items))


def multilabel_task_image(name: str, split: str, index: int, *, seed: int = 0, size: int = 64) -> tuple[Scene, Image.Image]:
    """Image ``index`` of a split of multi-label task ``name``, as :func:`write_multilabel_task` writes it, and
    its scene (whose objects' labels are the image's: :func:`scene_labels`).

    It depends only on (seed, task, split, index); its first object has label ``index mod labels``,
    so every label is shown in any split of at least as many images as there are labels.
    """
    labels = multilabel_classes(name)
    rng = np.random.default_rng([seed, _stable_id(f"{name}/{split}"), index])
    scene = multilabel_scene(name, labels[index % len(labels)], rng)
    return scene, render(scene, size, seed=int(rng.integers(2**31)))


def write_multilabel_task(
    name: str,
    out_dir: Union[str, os.PathLike],
    *,
    train_images: int = 160,
    val_images: int = 80,
    test_images: int = 200,
    known: float = 1.0,
    seed: int = 0,
    size: int = 64,
) -> Path:
    """Write multi-label task ``name`` to ``out_dir`` and return ``out_dir``.

    Writes ``<split>/NNNN.png`` and ``<split>.csv`` for the splits ``train``, ``val`` and ``test``
    (a split of 0 images is not written): long-form CSVs ``path,labels,unknown`` (paths relative
    to ``out_dir``, labels joined by ``|``) that :func:`coopkit.multilabel_data.load_multilabel`
    reads; every label not listed for an image is absent from it. ``known`` < 1 hides each
    (image, label) pair of the training split with probability ``1 - known``
    (:func:`coopkit.multilabel_data.partial_labels` with ``seed``; listed as ``unknown``); the
    validation and test splits keep every label. The same arguments write the same bytes.
    """
    classes = multilabel_classes(name)
    counts = {"train": train_images, "val": val_images, "test": test_images}
    for split, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{split}_images must be an integer >= 0, got {n!r}")
    if isinstance(known, bool) or not isinstance(known, (int, float)) or not 0 < known <= 1:
        raise ValueError(f"known must be a fraction in (0, 1], got {known!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split in MULTILABEL_SPLITS:
        if not counts[split]:
            continue
        (out / split).mkdir(parents=True, exist_ok=True)
        paths, targets = [], np.zeros((counts[split], len(classes)), dtype=np.int8)  # (images, labels)
        for i in range(counts[split]):
            scene, img = multilabel_task_image(name, split, i, seed=seed, size=size)
            paths.append(out / split / f"{i:04d}.png")
            _atomic_png(img, paths[-1])
            targets[i] = [c in scene_labels(name, scene) for c in classes]
        data = MultiLabelDataset([str(p) for p in paths], targets, classes, f"{name}/{split}")
        if split == "train" and known < 1:
            data = partial_labels(data, float(known), seed=seed)
        write_multilabel_csv(data, out / f"{split}.csv")
    return out
