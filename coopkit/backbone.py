"""Load a frozen open_clip CLIP backbone: model, preprocessing, tokenizer, and a weights fingerprint.

``model`` is any open_clip model name (``open_clip.list_models()``), the path of an
open_clip model-config JSON (custom architectures; the model name is the file's stem), or
``coopkit-tiny``, the small pretrained CLIP that ships inside coopkit. ``pretrained`` is an
open_clip tag (downloaded by open_clip when online), a local checkpoint path, ``None`` for
random init (seeded, so a random-init run can be reloaded), ``"synthetic"`` for the
shipped weights of ``coopkit-tiny``, or ``"default"`` (the default of :func:`load_backbone`
and :func:`coopkit.fit` alike): ``"synthetic"`` for ``coopkit-tiny``; any other model must
name its weights, and the error lists its tags.

Nothing here needs the Hugging Face hub once the files are local: ``tokenizer`` points to a
local tokenizer (a folder with ``tokenizer.json``, the file itself, or a CLIP BPE vocabulary),
``text_model`` to a Hugging Face text tower's ``config.json`` folder, and ``pretrained=None``
builds every tower at random (Hugging Face text towers included: their base weights are never
fetched). Every hub failure is one line naming the model and the local files that replace it.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

if TYPE_CHECKING:
    import torch

from .runtime.atomic import file_sha256, sha256_hex
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
        tokenizer_path: The local tokenizer given to :func:`load_backbone`, if any.
        text_model: The local Hugging Face text-model folder given to :func:`load_backbone`, if any.
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
    tokenizer_path: Optional[str] = None
    text_model: Optional[str] = None
    _sha256: Optional[str] = field(default=None, repr=False)

    @property
    def logit_bias(self) -> Optional[float]:
        """The model's logit bias (SigLIP-family models, trained with a sigmoid loss), else ``None``."""
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach().float().reshape(-1)[0])

    def run_fields(self) -> dict[str, Any]:
        """What a saved run records about this backbone (the :class:`~coopkit.config.RunConfig`
        fields that let :func:`coopkit.load` rebuild it and check its weights)."""
        return {
            "model": self.name,
            "pretrained": self.pretrained,
            "model_config": self.model_config,
            "tokenizer": self.tokenizer_path,
            "text_model": self.text_model,
            "backbone_sha256": self.weights_sha256,
        }

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
    def parts() -> Iterator[Any]:
        for key in sorted(state_dict):
            t = state_dict[key].detach().to("cpu").contiguous()
            yield f"{key}|{t.dtype}|{tuple(t.shape)}|"
            yield t.view(-1).view(dtype=_byte_dtype()).numpy().tobytes() if t.numel() else b""

    return sha256_hex(parts())


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


class TorchTokenizer:
    """A torch-free tokenizer (:class:`coopkit.runtime.tokenizers.hf.HFTokenizer`) returning
    ``torch.LongTensor`` rows, as open_clip's tokenizers do; other attributes pass through."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, texts: Any, context_length: Optional[int] = None) -> "torch.Tensor":
        import torch

        return torch.from_numpy(self.tokenizer(texts, context_length))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["tokenizer"], name)


def _offline_hint(what: str) -> str:
    flag = {"tokenizer": "tokenizer= (--tokenizer)", "text_model": "text_model= (--text-model)"}[what]
    return f"put the files in a local folder and pass {flag}"


def _hf_tokenizer_from_transformers(source: str, context_length: int, clean: str, strip_sep: bool) -> Any:
    """A Hugging Face tokenizer that has no tokenizer.json (a sentencepiece model, a hub name),
    converted by transformers, then run torch-free like any other."""
    from .runtime.tokenizers.hf import HFTokenizer

    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError(
            f"{source} has no tokenizer.json; converting its tokenizer needs transformers: "
            "pip install 'coopkit[hf]' (or save a tokenizer.json with transformers elsewhere)"
        ) from None
    tok = AutoTokenizer.from_pretrained(source)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"the tokenizer of {source} has no fast (tokenizers) version; coopkit needs one")
    settings = {"pad_token": tok.pad_token, "sep_token": tok.sep_token, "padding_side": tok.padding_side,
                "truncation_side": tok.truncation_side}
    return HFTokenizer.from_backend(backend, context_length, settings, clean=clean, strip_sep_token=strip_sep)


def load_tokenizer(name: str, path: Optional[str] = None) -> Any:
    """The tokenizer of open_clip model ``name``, from ``path`` when given (no hub access).

    CLIP-BPE models use open_clip's ``SimpleTokenizer`` (its vocabulary ships with open_clip; a
    ``.txt.gz`` ``path`` replaces it). Models with a Hugging Face tokenizer (``hf_tokenizer_name``
    in their config: SigLIP, CLIPA, MetaCLIP 2, HF text towers) get coopkit's torch-free
    :class:`~coopkit.runtime.tokenizers.hf.HFTokenizer` (the ``tokenizers`` library), set up as
    open_clip sets its own up (context length, cleaning, ``strip_sep_token``), from a local
    folder or ``tokenizer.json``, else from the hub (through transformers when installed).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unusable tokenizer or tokenizer setting.
        ImportError: ``tokenizers`` (or, to convert a tokenizer without tokenizer.json,
            ``transformers``) is missing; the message names what to install.
        RuntimeError: the hub was needed and could not be reached; the message names the model,
            the files and the flag that points to them.
    """
    import open_clip

    from .runtime.tokenizers.hf import HF_TOKENIZER_CONFIGS, HF_TOKENIZER_FILE, HFTokenizer

    text_cfg = dict((open_clip.get_model_config(name) or {}).get("text_cfg", {}))
    context_length = int(text_cfg.get("context_length", 77))
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    hf_name = text_cfg.get("hf_tokenizer_name", "")
    local = Path(path).expanduser() if path is not None else None
    if local is not None and not local.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if local is not None and local.is_file() and local.name.endswith(".gz"):
        return open_clip.SimpleTokenizer(bpe_path=str(local), context_length=context_length,
                                         clean=kwargs.get("clean", "lower"))
    if local is None and not hf_name:
        return open_clip.get_tokenizer(name)
    if text_cfg.get("tokenizer_mode"):
        raise ValueError(f"model {name!r}: tokenizer_mode {text_cfg['tokenizer_mode']!r} is not supported")
    clean = kwargs.get("clean", "whitespace" if hf_name else "lower")
    strip_sep = bool(kwargs.get("strip_sep_token", False))
    if local is None and Path(hf_name).expanduser().is_dir():  # a custom config naming a local folder
        local = Path(hf_name).expanduser()
    if local is not None:
        if local.is_file():
            return HFTokenizer.from_file(local, context_length, clean=clean,
                                         strip_sep_id=None if not strip_sep else _sep_id(local))
        if (local / HF_TOKENIZER_FILE).is_file():
            return HFTokenizer.from_pretrained(local, context_length, clean=clean, strip_sep_token=strip_sep)
        return _hf_tokenizer_from_transformers(str(local), context_length, clean, strip_sep)
    files = ", ".join((HF_TOKENIZER_FILE,) + HF_TOKENIZER_CONFIGS)
    try:
        try:
            import transformers  # noqa: F401  (handles the hub, its cache and sentencepiece-only repos)
        except ImportError:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(hf_name, allow_patterns=[HF_TOKENIZER_FILE, *HF_TOKENIZER_CONFIGS])
            return HFTokenizer.from_pretrained(folder, context_length, clean=clean, strip_sep_token=strip_sep)
        return _hf_tokenizer_from_transformers(hf_name, context_length, clean, strip_sep)
    except (ImportError, ValueError):
        raise
    except Exception as e:  # the hub client's errors (offline, not found, HTTP) share no base class
        raise RuntimeError(
            f"model {name!r} needs the Hugging Face tokenizer {hf_name!r}, which could not be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'}); to work offline, "
            f"{_offline_hint('tokenizer')} with {files}"
        ) from None


def _sep_id(tokenizer_json: Path) -> Optional[int]:
    """The ``[SEP]`` id of a lone tokenizer.json (open_clip's ``strip_sep_token``)."""
    vocab = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("model", {}).get("vocab", {})
    sep = vocab.get("[SEP]") if isinstance(vocab, dict) else None
    if sep is None:
        raise ValueError(f"{tokenizer_json}: strip_sep_token needs a [SEP] token; pass the tokenizer's folder")
    return int(sep)


def _text_overrides(name: str, text_model: Optional[str], tokenizer: Optional[str]) -> dict[str, Any]:
    """``create_model`` keyword arguments for a Hugging Face text tower: its config from a local
    folder where one is given, and never its base weights (random init, or the CLIP checkpoint's)."""
    import open_clip

    text_cfg = dict((open_clip.get_model_config(name) or {}).get("text_cfg", {}))
    hf_model = text_cfg.get("hf_model_name")
    if not hf_model:
        if text_model is not None:
            raise ValueError(f"model {name!r} has no Hugging Face text tower; text_model applies to those only")
        return {}
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError(
            f"model {name!r} has a Hugging Face text tower ({hf_model}); it needs transformers: "
            "pip install 'coopkit[hf]'"
        ) from None
    folder = Path(text_model).expanduser() if text_model is not None else None
    if folder is None and tokenizer is not None and (Path(tokenizer).expanduser() / "config.json").is_file():
        folder = Path(tokenizer).expanduser()
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {folder} (the Hugging Face config of {hf_model})")
        source = str(folder)
    else:
        source = hf_model
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(source)
        except Exception as e:  # the hub client's errors share no base class
            raise RuntimeError(
                f"model {name!r}: the config of its Hugging Face text tower {hf_model!r} could not be loaded "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else 'no detail'}); to work offline, "
                f"{_offline_hint('text_model')} with its config.json"
            ) from None
    return {"text_cfg": {**text_cfg, "hf_model_name": source, "hf_model_pretrained": False}}


def load_backbone(
    model: str = default_of(BackboneConfig, "model"),
    pretrained: Optional[str] = default_of(BackboneConfig, "pretrained"),
    device: Union[str, "torch.device"] = default_of(BackboneConfig, "device"),
    tokenizer: Optional[str] = default_of(BackboneConfig, "tokenizer"),
    text_model: Optional[str] = default_of(BackboneConfig, "text_model"),
) -> Backbone:
    """Load a frozen open_clip model with its transforms and tokenizer.

    Args:
        model: open_clip model name, path of an open_clip model-config JSON, or ``"coopkit-tiny"``.
        pretrained: open_clip tag, local checkpoint path, ``"synthetic"`` (the shipped weights
            of ``coopkit-tiny``), ``None`` for a random-init model (seeded, reproducible), or
            ``"default"``: the shipped weights for ``coopkit-tiny``; other models must name theirs.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        tokenizer: A local tokenizer (folder with ``tokenizer.json``, the file, or a CLIP BPE
            ``.txt.gz``), so that nothing is fetched from the hub (see :func:`load_tokenizer`).
        text_model: Hugging Face text towers: a local folder with the text model's
            ``config.json`` (default: ``tokenizer`` when that folder has one).

    Returns:
        A :class:`Backbone` whose model is in eval mode with gradients off.

    Raises:
        ValueError: unknown model name (with close matches) or pretrained tag (with the valid tags).
        FileNotFoundError: a config, checkpoint or tokenizer path that does not exist.
        ImportError: an optional dependency the model needs (tokenizers, transformers) is missing.
        RuntimeError: the weights, tokenizer or text config could not be fetched (offline; the
            message names the local files that replace them) or the device is unusable.
    """
    import open_clip
    import torch
    from torchvision import transforms as T

    cfg = BackboneConfig(model=model, pretrained=pretrained, device=device, tokenizer=tokenizer,  # type: ignore[arg-type]
                         text_model=text_model)
    model, pretrained = cfg.model, cfg.pretrained
    dev = resolve_device(device)
    name, custom_cfg = _resolve_model(model)
    load_from, recorded = _resolve_pretrained(name, pretrained)
    text_tokenizer = load_tokenizer(name, cfg.tokenizer)  # before the model: a missing tokenizer fails fast
    overrides = _text_overrides(name, cfg.text_model, cfg.tokenizer)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            clip, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=load_from, device=dev, pretrained_text=False, **overrides)
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
    if not hasattr(text_tokenizer, "sot_token_id"):  # coopkit's torch-free HF tokenizer
        text_tokenizer = TorchTokenizer(text_tokenizer)
    logger.info("loaded %s (pretrained=%s) on %s", name, recorded, dev)
    return Backbone(
        model=clip,
        preprocess=preprocess,
        train_preprocess=train_preprocess,
        tokenizer=text_tokenizer,
        name=name,
        pretrained=recorded,
        device=dev,
        preprocess_cfg=pp,
        model_config=custom_cfg,
        tokenizer_path=cfg.tokenizer,
        text_model=cfg.text_model,
    )
