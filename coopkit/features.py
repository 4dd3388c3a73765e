"""Frozen image features, computed once per image and augmented view.

CLIP's image encoder never changes during CoOp, so every training image is decoded once,
augmented ``views`` times and encoded; training then runs on the cached features.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from .runtime.preprocess import ImageDecodeError, ImageInput, describe, load_image
from .runtime.session import check_threads, default_threads

if TYPE_CHECKING:
    from .backbone import Backbone

logger = logging.getLogger(__name__)


def autocast_for(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """fp32 on CPU; bf16 (or fp16 where bf16 is unsupported) autocast on CUDA, unless ``precision`` says."""
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    if precision == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast("cuda", dtype=dtype)


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
) -> tuple[torch.Tensor, list[int]]:
    """Encode images with the frozen image tower.

    Args:
        backbone: The backbone whose image encoder is used.
        images: Paths, bytes, PIL images or uint8 HWC arrays.
        transform: Image transform (``backbone.preprocess`` by default).
        views: Times each image is transformed and encoded (for random augmentations).
        batch_size: Images per forward pass.
        strict: Raise on the first unreadable image instead of skipping it.
        progress: Show a tqdm bar.
        desc: Label of the bar.
        precision: See :func:`autocast_for`.
        errors_out: A list of ``len(images)`` entries to fill with the error of each skipped
            image (``None`` stays for the others). With it, no image at all is not an error:
            the features are then ``(views, 0, 0)``.

    Returns:
        ``(features, kept)``: L2-normalised float32 features of shape ``(views, len(kept), embed_dim)``
        on the CPU, and the indices of the images that could be decoded.

    Raises:
        ImageDecodeError / FileNotFoundError: with ``strict=True``, for the first bad image.
        ValueError: no image could be decoded.
    """
    from tqdm.auto import tqdm

    transform = transform or backbone.preprocess
    model = backbone.model
    kept: list[int] = []
    skipped: list[str] = []
    out: list[torch.Tensor] = []  # each (views, b, embed_dim)
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=not progress, leave=False)
    with torch.inference_mode(), autocast_for(backbone.device, precision):
        for start in range(0, len(images), batch_size):
            decoded = []
            for i in range(start, min(len(images), start + batch_size)):
                try:
                    decoded.append(load_image(images[i]))
                    kept.append(i)
                except (ImageDecodeError, FileNotFoundError) as e:
                    if strict:
                        raise
                    skipped.append(describe(images[i]) if not isinstance(e, ImageDecodeError) else str(e))
                    if errors_out is not None:
                        errors_out[i] = str(e)
            if decoded:
                per_view = []
                for _ in range(views):
                    batch = torch.stack([transform(img) for img in decoded]).to(backbone.device)  # (b, 3, H, W)
                    per_view.append(F.normalize(model.encode_image(batch).float(), dim=-1).cpu())  # (b, D)
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
