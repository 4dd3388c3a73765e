"""Load a frozen open_clip CLIP backbone: model, preprocessing, tokenizer, and a weights fingerprint.

``model`` is any open_clip model name (``open_clip.list_models()``), the path of an
open_clip model-config JSON (custom architectures; the model name is the file's stem), or
``coopkit-tiny``, the small pretrained CLIP that ships inside coopkit. ``pretrained`` is an
open_clip tag (downloaded by open_clip when online), a local checkpoint path, ``None`` for
random init (seeded, so a random-init run can be reloaded), ``"synthetic"`` for the
shipped weights of ``coopkit-tiny``, or ``"default"`` (the default of :func:`load_backbone`
and :func:`coopkit.fit` alike): ``"synthetic"`` for ``coopkit-tiny``; any other model must
name its weights, and the error lists its tags.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

if TYPE_CHECKING:
    import torch

from ._io import file_sha256
from .config import DEFAULT_PRETRAINED, BackboneConfig, default_of
from .embedded import ASSETS, EMBEDDED_MODEL, EMBEDDED_PRETRAINED

logger = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0


@dataclass
class Backbone:
    """A frozen open_clip model with what is needed to feed it.

    Attributes:
        model: The open_clip model (eval mode, no gradients).
        preprocess: open_clip's evaluation transform (resize, centre crop, normalise).
        train_preprocess: The CoOp training augmentation (random resized crop with scale
            0.08-1, horizontal flip, normalise).
        tokenizer: open_clip's tokenizer for the model.
        name: open_clip model name.
        pretrained: Tag or resolved checkpoint path; ``None`` for random init.
        device: Device the model lives on.
        preprocess_cfg: Image size, mean, std, interpolation, resize mode, fill colour.
        model_config: The model config dict when it came from a custom JSON file, else ``None``.
    """

    model: Any
    preprocess: Callable[[Any], "torch.Tensor"]
    train_preprocess: Callable[[Any], "torch.Tensor"]
    tokenizer: Any
    name: str
    pretrained: Optional[str]
    device: "torch.device"
    preprocess_cfg: dict[str, Any]
    model_config: Optional[dict[str, Any]] = None
    _sha256: Optional[str] = field(default=None, repr=False)

    @property
    def weights_sha256(self) -> str:
        """sha256 over the model's state dict (names, dtypes, shapes and bytes), computed once."""
        if self._sha256 is None:
            self._sha256 = state_dict_sha256(self.model.state_dict())
        return self._sha256

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.preprocess_cfg["size"]
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def state_dict_sha256(state_dict: dict[str, "torch.Tensor"]) -> str:
    """A stable fingerprint of model weights, independent of the file format they came from."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(dtype=_byte_dtype()).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _byte_dtype() -> "torch.dtype":
    import torch

    return torch.uint8


def resolve_device(device: Union[str, "torch.device"] = "auto") -> "torch.device":
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU raises RuntimeError."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str) or not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"unknown device {device!r}; valid: 'auto', 'cpu', 'cuda', 'cuda:N'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but torch sees no usable CUDA device; use 'cpu' or 'auto'")
    return torch.device(device)


def _register_config_file(path: Path) -> tuple[str, dict[str, Any]]:
    import open_clip

    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"model config {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(
            f"model config {path} is not an open_clip model config (needs embed_dim, vision_cfg and text_cfg)"
        )
    open_clip.add_model_config(path)
    return path.stem, cfg


def register_model_config(name: str, cfg: dict[str, Any]) -> None:
    """Register an open_clip model config under ``name`` (used when reloading custom-config runs)."""
    import open_clip

    if name in open_clip.list_models():
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)


def _resolve_model(model: str) -> tuple[str, Optional[dict[str, Any]]]:
    """Model name (registering config files and the embedded model) and custom config, if any."""
    import open_clip

    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise ValueError(f"model must be an open_clip model name or a config JSON path, got {model!r}")
    model = str(model)
    if model.endswith(".json") or os.sep in model:
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"model config file not found: {model}")
        return _register_config_file(path)
    if model == EMBEDDED_MODEL:
        path = ASSETS / f"{EMBEDDED_MODEL}.json"
        if not path.is_file():
            raise RuntimeError(f"the embedded model config {path} is missing from this installation")
        if model not in open_clip.list_models():
            open_clip.add_model_config(path)
        return model, None
    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models() + [EMBEDDED_MODEL], n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise ValueError(f"unknown model {model!r}{hint}")
    return model, None


def _resolve_pretrained(name: str, pretrained: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(value to hand open_clip, value to record). Checks files and tags before any download."""
    import open_clip

    if pretrained is None:
        return None, None
    pretrained = str(pretrained)
    if pretrained == DEFAULT_PRETRAINED:
        if name != EMBEDDED_MODEL:
            tags = open_clip.list_pretrained_tags_by_model(name)
            valid = ", ".join(tags) if tags else "none registered: pass a checkpoint path"
            raise ValueError(
                f"model {name!r} needs its weights named: pretrained= one of its open_clip tags ({valid}), "
                "a checkpoint path, or None for random init"
            )
        pretrained = EMBEDDED_PRETRAINED
    if name == EMBEDDED_MODEL and pretrained == EMBEDDED_PRETRAINED:
        path = ASSETS / f"{EMBEDDED_MODEL}.safetensors"
        if not path.is_file():
            raise RuntimeError(f"the embedded weights {path} are missing from this installation")
        expected = (ASSETS / f"{EMBEDDED_MODEL}.sha256").read_text().split()[0]
        actual = file_sha256(path)
        if actual != expected:
            raise RuntimeError(f"embedded weights {path} are corrupt: sha256 {actual}, expected {expected}")
        return str(path), EMBEDDED_PRETRAINED
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path.resolve()), str(path.resolve())
    if os.sep in pretrained or path.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        raise FileNotFoundError(f"pretrained checkpoint not found: {pretrained}")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        valid = ", ".join(tags) if tags else "none (pass a checkpoint path or None)"
        raise ValueError(f"unknown pretrained tag {pretrained!r} for model {name!r}; valid tags: {valid}")
    return pretrained, pretrained


def load_backbone(
    model: str = default_of(BackboneConfig, "model"),
    pretrained: Optional[str] = default_of(BackboneConfig, "pretrained"),
    device: Union[str, "torch.device"] = default_of(BackboneConfig, "device"),
) -> Backbone:
    """Load a frozen open_clip model with its transforms and tokenizer.

    Args:
        model: open_clip model name, path of an open_clip model-config JSON, or ``"coopkit-tiny"``.
        pretrained: open_clip tag, local checkpoint path, ``"synthetic"`` (the shipped weights
            of ``coopkit-tiny``), ``None`` for a random-init model (seeded, reproducible), or
            ``"default"``: the shipped weights for ``coopkit-tiny``; other models must name theirs.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        A :class:`Backbone` whose model is in eval mode with gradients off.

    Raises:
        ValueError: unknown model name (with close matches) or pretrained tag (with the valid tags).
        FileNotFoundError: a config or checkpoint path that does not exist.
        RuntimeError: the weights could not be fetched (offline) or the device is unusable.
    """
    import open_clip
    import torch
    from torchvision import transforms as T

    cfg = BackboneConfig(model=model, pretrained=pretrained, device=device)  # type: ignore[arg-type]
    model, pretrained = cfg.model, cfg.pretrained
    dev = resolve_device(device)
    name, custom_cfg = _resolve_model(model)
    load_from, recorded = _resolve_pretrained(name, pretrained)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            clip, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=load_from, device=dev)
    except (RuntimeError, OSError) as e:
        if load_from and not Path(load_from).is_file():
            raise RuntimeError(
                f"could not fetch pretrained weights {load_from!r} for {name!r} (offline? set HF_HUB_OFFLINE=0 "
                f"and check the network, or pass a local checkpoint path): {str(e).splitlines()[0]}"
            ) from None
        raise
    clip.eval().requires_grad_(False)
    pp = dict(open_clip.get_model_preprocess_cfg(clip))
    size = pp["size"]
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(
        pp.get("interpolation", "bicubic"), T.InterpolationMode.BICUBIC
    )
    train_preprocess = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=interp),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(pp["mean"], pp["std"]),
        ]
    )
    tokenizer = open_clip.get_tokenizer(name)
    logger.info("loaded %s (pretrained=%s) on %s", name, recorded, dev)
    return Backbone(
        model=clip,
        preprocess=preprocess,
        train_preprocess=train_preprocess,
        tokenizer=tokenizer,
        name=name,
        pretrained=recorded,
        device=dev,
        preprocess_cfg=pp,
        model_config=custom_cfg,
    )
