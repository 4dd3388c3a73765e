"""Image decoding and open_clip-equivalent preprocessing in numpy and Pillow (no torch).

:func:`load_image` is the one image decoder of coopkit: the training side (``coopkit.userdata``)
and the runtime both use it, so an image is read the same way everywhere.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import numpy as np
from PIL import Image, ImageOps

ImageInput = Union[str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray]

#: Largest image (in pixels) decoded before it is refused as a decompression bomb.
MAX_PIXELS = 89_478_485  # Pillow's own default limit
#: Largest intermediate image of the resize step: the short side goes to the model's size, so a
#: 2x40000 strip would become 224x4480000 (4 GB); such extreme aspect ratios (beyond about 1:330
#: at 224 pixels) are refused instead, by the Pillow path and before a raw-input graph alike.
MAX_RESIZED_PIXELS = 4096 * 4096

#: File extensions read as images where a folder is listed (training folders, batch prediction).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def is_image_file(name: Union[str, os.PathLike]) -> bool:
    """True for a file name with an image extension that is not hidden (``.name``)."""
    base = os.path.basename(os.fspath(name))
    return os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS and not base.startswith(".")


class ImageDecodeError(ValueError):
    """An input could not be decoded as an image; the message names it."""


class ImageTooLargeError(ImageDecodeError):
    """An image has more pixels than allowed (``max_pixels``, or Pillow's decompression-bomb
    limit): refused before its pixels are decoded where its header tells (a server's 413)."""


def describe(source: Any) -> str:
    """A short human name for an image input, for error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    if isinstance(source, np.ndarray):
        return f"<array {source.shape} {source.dtype}>"
    if isinstance(source, Image.Image):
        return f"<PIL image {source.mode} {source.size}>"
    return f"<{type(source).__name__}>"


def as_image_list(images: Any) -> list[Any]:
    """One image or many, as a list: a single path, bytes, PIL image or HW/HWC array becomes
    ``[images]``, a uint8 ``(n, H, W, C)`` array its ``n`` images, any other iterable a list."""
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            return [images]
        if images.ndim == 4:
            return list(images)  # (n, H, W, C): a batch of arrays
    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)):
        return [images]
    try:
        return list(images)
    except TypeError:
        raise ImageDecodeError(f"unsupported images argument {describe(images)}: expected an image or a list of images") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (16/32-bit greyscale is rescaled, not clipped)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)  # (H, W); scaled in place: one float copy, not four
        top = 65535.0 if (img.mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        np.multiply(arr, 255.0 / top, out=arr)
        np.clip(np.round(arr, out=arr), 0, 255, out=arr)
        arr8 = arr.astype(np.uint8)
        del arr
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def apply_orientation(img: Image.Image) -> Image.Image:
    """``ImageOps.exif_transpose(img)``, without its full-size copy of an image that needs no turn."""
    try:
        if img.getexif().get(0x0112, 1) in (None, 1):  # 0x0112: Orientation; 1 is upright
            return img
        return ImageOps.exif_transpose(img) or img
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unreadable
        return img


def rgb_array(img: Image.Image) -> np.ndarray:
    """``np.asarray(img)`` of an RGB image, copied in strips of about 1 MB: Pillow's own conversion
    holds two full-size byte copies at once beside the image, this one none."""
    w, h = img.size
    step = max(1, (1 << 20) // (3 * w))  # rows per strip
    if h <= step:
        return np.asarray(img, dtype=np.uint8)
    out = np.empty((h, w, 3), np.uint8)  # (H, W, 3)
    for y in range(0, h, step):
        out[y : y + step] = np.asarray(img.crop((0, y, w, min(h, y + step))), dtype=np.uint8)
    return out


def load_image(source: ImageInput, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode one image to an 8-bit RGB PIL image.

    Accepts a path, encoded bytes, a PIL image or a uint8 array (HW, HW1, HW3 or HW4).
    EXIF orientation is applied; greyscale, palette, RGBA, CMYK and 16-bit images become
    RGB (alpha is dropped, as open_clip does). Images over ``max_pixels`` are refused, and so
    are empty (zero-size) and closed images: every problem of one input is an error of that
    input alone.

    Raises:
        ImageDecodeError: the input is unreadable, empty, closed, of an unsupported type, or too large.
        FileNotFoundError: a path that does not exist.
    """
    if isinstance(source, np.ndarray):
        arr = source
        if arr.dtype != np.uint8:
            raise ImageDecodeError(f"{describe(source)}: arrays must be uint8 HWC, got dtype {arr.dtype}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
            raise ImageDecodeError(f"{describe(source)}: arrays must be HW, HW1, HW3 or HW4")
        if arr.shape[0] * arr.shape[1] == 0:
            raise ImageDecodeError(f"{describe(source)}: empty image (no pixels)")
        if arr.shape[0] * arr.shape[1] > max_pixels:
            raise ImageTooLargeError(f"{describe(source)}: image has more than {max_pixels} pixels")
        return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)))
    if isinstance(source, Image.Image):
        img = source
        if img.size[0] * img.size[1] == 0:
            raise ImageDecodeError(f"{describe(source)}: empty image (no pixels)")
        if img.size[0] * img.size[1] > max_pixels:
            raise ImageTooLargeError(f"{describe(source)}: image has more than {max_pixels} pixels")
        try:
            img.load()  # a closed image, or a lazily opened file that is gone or truncated
        except Exception as e:  # noqa: BLE001 - whatever Pillow raises, it is this input's problem
            raise ImageDecodeError(f"{describe(source)}: cannot read this PIL image ({type(e).__name__}: {e})") from None
    elif isinstance(source, (str, os.PathLike, bytes, bytearray)):
        if isinstance(source, (str, os.PathLike)) and not os.path.isfile(source):  # no Path(): it interns every name
            raise FileNotFoundError(f"image not found: {source}")
        # a path is opened here and closed when the first frame is decoded, whatever happens:
        # Pillow would keep it open after a failure, or for the other frames of a GIF or TIFF
        try:
            fp = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
        except OSError as e:  # unreadable (permissions), or gone since the check above
            raise ImageDecodeError(f"{describe(source)}: cannot decode image ({type(e).__name__}: {e})") from None
        with fp:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    img = Image.open(fp)
                    if img.size[0] * img.size[1] > max_pixels:
                        raise ImageTooLargeError(
                            f"{describe(source)}: {img.size[0]}x{img.size[1]} image has more than "
                            f"{max_pixels} pixels (possible decompression bomb)"
                        )
                    img.load()
            except ImageDecodeError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise ImageTooLargeError(f"{describe(source)}: refused as a decompression bomb ({e})") from None
            except Exception as e:  # noqa: BLE001 - a malformed file can make Pillow raise almost anything
                raise ImageDecodeError(f"{describe(source)}: cannot decode image ({type(e).__name__}: {e})") from None
    else:
        raise ImageDecodeError(
            f"unsupported image input {describe(source)}: expected a path, bytes, a PIL image "
            "or a uint8 HWC numpy array"
        )
    if img.size[0] * img.size[1] > max_pixels:
        raise ImageTooLargeError(f"{describe(source)}: image has more than {max_pixels} pixels")
    if img.size[0] * img.size[1] == 0:
        raise ImageDecodeError(f"{describe(source)}: empty image (no pixels)")
    img = apply_orientation(img)
    try:
        return _to_rgb(img)
    except Exception as e:  # noqa: BLE001 - e.g. a mode Pillow cannot convert
        raise ImageDecodeError(f"{describe(source)}: cannot convert the image to RGB ({type(e).__name__}: {e})") from None


#: After decoding an image of at least this many pixels, once no other decode runs, a server
#: returns freed memory to the OS (:func:`release_memory`); smaller images are left to the allocator.
TRIM_AFTER_PIXELS = 4_000_000

@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    import ctypes

    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_memory() -> bool:
    """Return freed heap memory (decoded images) to the OS, where the C library allows (glibc's
    ``malloc_trim``); True if some was returned. glibc otherwise keeps large freed blocks in the
    arena of the thread that freed them, so a server decoding in many threads stays at its peak
    after a burst of big images (and sequential decodes in different threads add up)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def check_image_header(data: Union[bytes, bytearray], max_pixels: int = MAX_PIXELS) -> Optional[tuple[int, int]]:
    """Refuse encoded image bytes whose header declares more than ``max_pixels`` pixels, before any
    pixel is decoded (:class:`ImageTooLargeError`; Pillow's own decompression-bomb refusal
    included); else return the ``(width, height)`` it declares. Bytes whose header cannot be read
    pass (``None``): decoding them reports why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(data))) as img:
                w, h = img.size
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"image over the limit of {max_pixels} pixels, refused from its header ({e})") from None
    except Exception:  # noqa: BLE001 - an unreadable header: the decoder's own message comes later
        return None
    if w * h > max_pixels:
        raise ImageTooLargeError(f"{w}x{h} image is over the limit of {max_pixels} pixels")
    return w, h


# --- open_clip's eval transform, up to (not including) ToTensor + Normalize ----------------------
#
# The exported graph normalises inside, so the runtime only has to produce the uint8 crop that
# open_clip's ``image_transform(size, is_train=False, ...)`` would turn into a tensor. On PIL
# images torchvision's Resize is ``PIL.Image.resize`` with torchvision's output-size arithmetic
# and CenterCrop is ``Image.crop`` (padding first when the image is too small), so the same
# Pillow calls with the same sizes give the same pixels.

_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


class ResizePlan(NamedTuple):
    """How open_clip's eval transform resizes an image for one preprocessing config.

    Attributes:
        rule: How the resized size follows from the image's size (see :func:`resized_size`):
            ``exact`` (stretch to the target), ``shortest_edge`` (torchvision ``Resize(int)``:
            short side to the target, long side truncated), ``keep_ratio_shortest`` or
            ``keep_ratio_longest`` (open_clip ``ResizeKeepRatio``: the short or the long side
            fits, both sides rounded).
        interpolation: The filter really used (``bicubic``, ``bilinear`` or ``nearest``).
        fill: Grey level of the centre crop-or-pad that follows, or ``None`` (no crop).
    """

    rule: str
    interpolation: str
    fill: Optional[int]


def _size_rule(image_size: tuple[int, int], resize_mode: str) -> str:
    if resize_mode not in ("shortest", "longest", "squash"):
        raise ValueError(f"resize_mode {resize_mode!r} is not one of ('shortest', 'longest', 'squash')")
    if resize_mode == "squash":
        return "exact"
    if resize_mode == "longest":
        return "keep_ratio_longest"
    return "shortest_edge" if image_size[0] == image_size[1] else "keep_ratio_shortest"


def resize_plan(image_size: tuple[int, int], resize_mode: str, interpolation: str, fill_color: int = 0) -> ResizePlan:
    """The steps of open_clip's ``image_transform(image_size, is_train=False, ...)`` up to ``ToTensor``.

    The one statement of the rule: :func:`resize_and_crop` follows it with Pillow, and the raw-input
    export (:mod:`coopkit.exporters.preprocess`) builds the same steps into the ONNX graph.
    """
    rule = _size_rule(image_size, resize_mode)
    if interpolation not in _FILTERS:
        raise ValueError(f"interpolation {interpolation!r} is not one of {tuple(_FILTERS)}")
    if rule == "exact":
        return ResizePlan(rule, interpolation, None)
    if rule == "keep_ratio_longest":
        return ResizePlan(rule, interpolation, int(fill_color))
    if rule == "shortest_edge":
        return ResizePlan(rule, interpolation, 0)
    # open_clip builds ResizeKeepRatio(image_size) here without passing the interpolation, so
    # non-square "shortest" models always resize bicubic; mirrored on purpose.
    return ResizePlan(rule, "bicubic", 0)


def resized_size(size_wh: tuple[int, int], image_size: tuple[int, int], resize_mode: str = "shortest") -> tuple[int, int]:
    """``(width, height)`` of an image of ``size_wh`` after the resize step of :func:`resize_and_crop`."""
    width, height = size_wh
    target = (int(image_size[0]), int(image_size[1]))  # (h, w)
    rule = _size_rule(target, resize_mode)
    if rule == "exact":
        return target[1], target[0]
    if rule == "shortest_edge":  # torchvision Resize(int): short edge -> size, long edge truncated
        size = target[0]
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)
    # open_clip ResizeKeepRatio.get_params (no random scaling)
    longest = 1.0 if rule == "keep_ratio_longest" else 0.0
    ratio_h, ratio_w = height / target[0], width / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    new_h, new_w = (round(x * 1.0 / ratio) for x in (height, width))  # Python round, as open_clip
    return max(1, new_w), max(1, new_h)


def check_resizable(size_wh: tuple[int, int], image_size: tuple[int, int], resize_mode: str = "shortest") -> None:
    """Refuse (:class:`ImageDecodeError`) an image so elongated that resizing it for the model would
    exceed :data:`MAX_RESIZED_PIXELS`."""
    w, h = resized_size(size_wh, image_size, resize_mode)
    if w * h > MAX_RESIZED_PIXELS:
        raise ImageDecodeError(
            f"{size_wh[0]}x{size_wh[1]} image: aspect ratio too extreme (resizing it for the model would make a "
            f"{w}x{h} image, more than {MAX_RESIZED_PIXELS} pixels)"
        )


def _resize(img: Image.Image, size_wh: tuple[int, int], interpolation: str) -> Image.Image:
    if img.size == size_wh:  # torchvision returns the image untouched
        return img
    return img.resize(size_wh, _FILTERS[interpolation])


def _center_crop_or_pad(img: Image.Image, size: tuple[int, int], fill: int) -> Image.Image:
    """torchvision ``center_crop`` / open_clip ``center_crop_or_pad`` on a PIL image."""
    crop_h, crop_w = size
    width, height = img.size
    if crop_w > width or crop_h > height:
        border = (
            (crop_w - width) // 2 if crop_w > width else 0,
            (crop_h - height) // 2 if crop_h > height else 0,
            (crop_w - width + 1) // 2 if crop_w > width else 0,
            (crop_h - height + 1) // 2 if crop_h > height else 0,
        )  # left, top, right, bottom
        img = ImageOps.expand(img, border=border, fill=(fill,) * len(img.getbands()))
        width, height = img.size
        if (crop_w, crop_h) == (width, height):
            return img
    top = int(round((height - crop_h) / 2.0))
    left = int(round((width - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def resize_and_crop(
    img: Image.Image,
    image_size: tuple[int, int],
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    fill_color: int = 0,
) -> np.ndarray:
    """Apply open_clip's eval-time resize and crop to an RGB image.

    Args:
        img: An RGB image, as :func:`load_image` returns.
        image_size: ``(height, width)`` of the output.
        resize_mode: ``shortest`` (short side to size, centre crop), ``longest`` (long side to
            size, centre pad with ``fill_color``) or ``squash`` (stretch to size).
        interpolation: ``bicubic``, ``bilinear`` or ``nearest``.
        fill_color: Padding grey level for ``longest``.

    Returns:
        A contiguous uint8 array ``(height, width, 3)``.

    Raises:
        ImageDecodeError: an aspect ratio so extreme that the resized image would exceed
            :data:`MAX_RESIZED_PIXELS`.
    """
    target = (int(image_size[0]), int(image_size[1]))  # (h, w)
    plan = resize_plan(target, resize_mode, interpolation, fill_color)
    if img.mode != "RGB":
        img = _to_rgb(img)
    check_resizable(img.size, target, resize_mode)
    img = _resize(img, resized_size(img.size, target, resize_mode), plan.interpolation)
    if plan.fill is not None:
        img = _center_crop_or_pad(img, target, plan.fill)
    arr = np.asarray(img, dtype=np.uint8)
    assert arr.shape == (target[0], target[1], 3), arr.shape
    return np.ascontiguousarray(arr)


def preprocess(
    source: ImageInput,
    image_size: tuple[int, int],
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    fill_color: int = 0,
    *,
    max_pixels: int = MAX_PIXELS,
) -> np.ndarray:
    """Decode one image with :func:`load_image` and resize/crop it like open_clip's eval transform.

    Equivalent to ``open_clip.image_transform(image_size, is_train=False, resize_mode=...,
    interpolation=..., fill_color=...)`` applied to ``load_image(source)``, stopped before
    ``ToTensor``/``Normalize`` (the exported graph does those), as a uint8 ``(H, W, 3)`` array.
    """
    img = load_image(source, max_pixels=max_pixels)
    try:
        return resize_and_crop(img, image_size, resize_mode, interpolation, fill_color)
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{describe(source)}: {e}") from None


def decode(
    source: ImageInput,
    *,
    max_pixels: int = MAX_PIXELS,
    image_size: Optional[tuple[int, int]] = None,
    resize_mode: str = "shortest",
) -> np.ndarray:
    """Decode one image with :func:`load_image` to a uint8 ``(H, W, 3)`` RGB array, at full size.

    What a raw-input file receives (it resizes and crops in its graph). With ``image_size``, an
    image whose resize for that model would exceed :data:`MAX_RESIZED_PIXELS` is refused too.

    Raises:
        ImageDecodeError: as :func:`load_image`, and for an image without pixels or too elongated.
        FileNotFoundError: a path that does not exist.
    """
    if isinstance(source, np.ndarray) and source.dtype == np.uint8 and source.ndim == 3 and source.shape[2] == 3:
        h, w = source.shape[:2]  # already RGB: used as it is, without a copy through Pillow
        if h * w > max_pixels:
            raise ImageTooLargeError(f"{describe(source)}: image has more than {max_pixels} pixels")
        arr = np.ascontiguousarray(source)
    else:
        arr = rgb_array(load_image(source, max_pixels=max_pixels))  # (H, W, 3)
    h, w = arr.shape[:2]
    if h * w == 0:
        raise ImageDecodeError(f"{describe(source)}: empty image ({w}x{h} pixels)")
    if image_size is not None:
        try:
            check_resizable((w, h), image_size, resize_mode)
        except ImageDecodeError as e:
            raise ImageDecodeError(f"{describe(source)}: {e}") from None
    return arr
