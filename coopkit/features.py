"""Frozen image features, computed once per image and augmented view.

CLIP's image encoder never changes during CoOp, so every training image is decoded once,
augmented ``views`` times and encoded; training then runs on the cached features.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from .runtime.preprocess import ImageDecodeError, ImageInput, check_resizable, describe, load_image
from .runtime.progress import progress_bar
from .runtime.session import check_threads, default_threads

if TYPE_CHECKING:
    from .backbone import Backbone

logger = logging.getLogger(__name__)


def effective_precision(device: torch.device, precision: str = "auto") -> str:
    """The precision a computation really runs in: ``fp32`` on CPU or when asked, else ``bf16``
    or ``fp16`` (``auto``: bf16 where the GPU supports it)."""
    if precision == "fp32" or device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def autocast_for(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """fp32 on CPU; bf16 (or fp16 where bf16 is unsupported) autocast on CUDA, unless ``precision`` says."""
    used = effective_precision(device, precision)
    if used == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[used])


def _check_resizable(img: Any, source: ImageInput, image_size: tuple[int, int], resize_mode: str) -> None:
    try:
        check_resizable(img.size, image_size, resize_mode)
    except ImageDecodeError as e:
        raise ImageDecodeError(f"{describe(source)}: {e}") from None


def _transform_one(transform: Callable, img: Any, source: ImageInput) -> torch.Tensor:
    """``transform(img)``; a failure becomes that image's :class:`ImageDecodeError`."""
    try:
        return transform(img)
    except (ValueError, RuntimeError, OSError, ArithmeticError) as e:
        raise ImageDecodeError(f"{describe(source)}: cannot preprocess ({type(e).__name__}: {e})") from None


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[int]:
    """Run the block with ``threads`` torch intra-op threads (``None``: one per CPU that other
    processes leave idle, :func:`coopkit.runtime.session.default_threads`); restores the previous
    count afterwards. Yields the count used."""
    n = check_threads(threads) or default_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    if threads is None:
        logger.info("torch threads: %d (%d before)", n, previous)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


def encode_images(
    backbone: "Backbone",
    images: Sequence[ImageInput],
    *,
    transform: Optional[Callable] = None,
    views: int = 1,
    batch_size: int = 64,
    strict: bool = False,
    progress: bool = False,
    desc: str = "encoding images",
    precision: str = "auto",
    errors_out: Optional[list[Optional[str]]] = None,
    encoder: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> tuple[torch.Tensor, list[int]]:
    """Encode images with the frozen image tower.

    Args:
        backbone: The backbone whose image encoder is used.
        images: Paths, bytes, PIL images or uint8 HWC arrays.
        transform: Image transform (``backbone.preprocess`` by default).
        views: Times each image is transformed and encoded (for random augmentations).
        batch_size: Images per forward pass.
        strict: Raise on the first unreadable image instead of skipping it.
        progress: Show a progress bar (:func:`~coopkit.runtime.progress.progress_bar`).
        desc: Label of the bar.
        precision: See :func:`autocast_for`.
        errors_out: A list of ``len(images)`` entries to fill with the error of each skipped
            image (``None`` stays for the others). With it, no image at all is not an error:
            the features are then ``(views, 0, 0)``.
        encoder: Normalised pixels ``(b, 3, H, W)`` -> image features (a fitted method's
            :meth:`~coopkit.methods.base.MethodModel.image_encoder`; default: the backbone's
            frozen ``encode_image``).

    Returns:
        ``(features, kept)``: L2-normalised float32 features of shape ``(views, len(kept), embed_dim)``
        on the CPU, and the indices of the images that could be decoded.

    Raises:
        ImageDecodeError / FileNotFoundError: with ``strict=True``, for the first bad image.
        ValueError: no image could be decoded.
    """
    transform = transform or backbone.preprocess
    # the eval transform resizes the short side to the model's size: refuse extreme strips as
    # the runtime does, instead of building a gigapixel intermediate image
    resize_mode = backbone.preprocess_cfg.get("resize_mode", "shortest") if transform is backbone.preprocess else None
    encode = encoder if encoder is not None else backbone.model.encode_image
    kept: list[int] = []
    skipped: list[str] = []
    out: list[torch.Tensor] = []  # each (views, b, embed_dim)
    bar = progress_bar(total=len(images), desc=desc, unit="img", enabled=progress, leave=False)
    with torch.inference_mode(), autocast_for(backbone.device, precision):
        for start in range(0, len(images), batch_size):
            decoded, first = [], []  # images, and their first view: every failure stays with its image
            for i in range(start, min(len(images), start + batch_size)):
                try:
                    img = load_image(images[i])
                    if resize_mode is not None:
                        _check_resizable(img, images[i], backbone.image_size, resize_mode)
                    first.append(_transform_one(transform, img, images[i]))
                    decoded.append(img)
                    kept.append(i)
                except (ImageDecodeError, FileNotFoundError) as e:
                    if strict:
                        raise
                    skipped.append(describe(images[i]) if not isinstance(e, ImageDecodeError) else str(e))
                    if errors_out is not None:
                        errors_out[i] = str(e)
            if decoded:
                per_view = []
                for v in range(views):
                    views_v = first if v == 0 else [transform(img) for img in decoded]
                    batch = torch.stack(views_v).to(backbone.device)  # (b, 3, H, W)
                    per_view.append(F.normalize(encode(batch).float(), dim=-1).cpu())  # (b, D)
                out.append(torch.stack(per_view))  # (views, b, D)
            bar.update(min(batch_size, len(images) - start))
    bar.close()
    if skipped and errors_out is None:
        logger.warning("skipped %d unreadable image(s): %s", len(skipped), "; ".join(skipped[:10]))
    if not out:
        if errors_out is not None:
            return torch.zeros(views, 0, 0), kept
        raise ValueError(f"none of the {len(images)} images could be decoded")
    return torch.cat(out, dim=1), kept
