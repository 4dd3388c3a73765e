"""The fitted classifier: logits, predictions, evaluation, and the save/load pair.

Whether its class text features come from learned context (CoOp) or from hand-written
templates (zero-shot), a classifier reduces to one matrix once fitted:
``W = exp(logit_scale) * normalise(text features)`` of shape ``(n_classes, embed_dim)``, and
``logits = normalise(image features) @ W.T``. That matrix is what the exporter bakes into ONNX.

A saved run is a folder with ``config.json`` (:class:`coopkit.config.RunConfig`) and, for
CoOp, ``ctx.safetensors`` holding only the learned context; a few-shot baseline's run holds its
head's tensors in ``head.safetensors`` instead (:mod:`coopkit.heads`). Loading uses no pickle.

What a run promises: a save replaces the folder in one atomic step (written beside it, then
swapped in), so a crash or a full disk leaves the previous run loadable byte for byte (Ctrl-C
lets the save finish first); ``config.json`` records a sha256 over the whole run (the config
itself, the context file and the head file), checked on load together with the meaning of every field; a
folder that holds anything but a run is never saved over unless asked (``overwrite=True``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from ._io import atomic_dir, deferred_interrupt, interrupted_backup, probe_beside
from .backbone import Backbone, load_backbone, register_model_config
from .config import RunConfig
from .data import Dataset, load_dataset
from .features import autocast_for, encode_images, torch_threads
from .heads import HEAD_METHODS, build_head, check_head_tensors
from .prompts import PromptLearner, TextTower
from .runtime.contract import (
    DEFAULT_TEMPLATE,
    METHODS,
    check_classnames,
    check_prompts_fit,
    check_templates,
    fill_templates,
)
from .runtime.results import Prediction, check_predict_args, rank
from .runtime.preprocess import ImageInput, as_image_list, describe
from .runtime.tokenizers.layout import token_layout

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CTX_FILE = "ctx.safetensors"
HEAD_FILE = "head.safetensors"
#: Everything a saved run folder holds.
RUN_FILES = (CONFIG_FILE, CTX_FILE, HEAD_FILE)
DEFAULT_TEMPLATES = (DEFAULT_TEMPLATE,)


class LinearHead(nn.Module):
    """Logits of L2-normalised image features: ``x W^T + b`` with ``W = exp(logit_scale) * text
    features`` and ``b`` the model's logit bias (SigLIP-family models; none for CLIP's).

    The head :meth:`Classifier.head` returns, and the one the exporter bakes into the graph
    (a pure module: the weights and the bias are buffers, nothing else).
    """

    def __init__(self, weights: torch.Tensor, bias: Optional[float] = None) -> None:
        super().__init__()
        self.register_buffer("weights_t", weights.detach().to(torch.float32).t().contiguous())  # (embed_dim, C)
        self.register_buffer("bias", None if bias is None else torch.tensor(float(bias), dtype=torch.float32))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits = features.to(torch.float32) @ self.weights_t  # (b, C)
        return logits if self.bias is None else logits + self.bias


class Classifier:
    """A CLIP classifier over a fixed label set (CoOp, zero-shot, or a few-shot baseline's head).

    Build one with :func:`coopkit.fit`, :func:`coopkit.zero_shot`, :func:`coopkit.load` or the
    baselines of :mod:`coopkit.research.baselines`.

    Attributes:
        backbone: The frozen backbone.
        config: What the run is (method, model, prompt and training settings, metrics).
        learner: The CoOp prompt learner, or ``None``.
        head_tensors: The extra tensors of a baseline's head (:mod:`coopkit.heads`), or ``None``.
    """

    def __init__(self, backbone: Backbone, config: RunConfig, learner: Optional[PromptLearner] = None,
                 head_tensors: Optional[dict[str, torch.Tensor]] = None) -> None:
        if (learner is None) == (config.method == "coop"):
            raise ValueError("a coop classifier needs a PromptLearner; other methods must not have one")
        if (head_tensors is None) == (config.method in HEAD_METHODS):
            raise ValueError(f"{config.method} classifiers {'need' if config.method in HEAD_METHODS else 'have no'} "
                             "head tensors")
        self.backbone = backbone
        self.config = config
        self.learner = learner
        self.head_tensors = dict(head_tensors) if head_tensors is not None else None
        self._weights: Optional[torch.Tensor] = None

    @property
    def classnames(self) -> list[str]:
        return list(self.config.classnames)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def text_tower(self) -> TextTower:
        """The backbone's text tower, as the prompt learner and the exporter's text graph see it."""
        return self.learner.tower if self.learner is not None else TextTower.of(self.backbone.model)

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        """L2-normalised class text features ``(n_classes, embed_dim)``, float32."""
        if self.learner is not None:
            with autocast_for(self.backbone.device):
                return self.learner.text_features().float()
        return template_features(self.backbone, self.classnames, self.config.templates or DEFAULT_TEMPLATES)

    @torch.no_grad()
    def class_weights(self) -> torch.Tensor:
        """``W = exp(logit_scale) * text features``, ``(n_classes, embed_dim)`` float32 on the CPU (cached).

        For a linear-probe head, its learned weight matrix instead.
        """
        if self._weights is None:
            if self.head_tensors is not None and HEAD_METHODS[self.method] == "linear":
                self._weights = self.head_tensors["weight"].detach().float().cpu().contiguous()
            else:
                scale = self.backbone.model.logit_scale.exp().float().cpu()
                self._weights = (scale * self.text_features().cpu()).contiguous()
        return self._weights

    def head(self) -> nn.Module:
        """L2-normalised image features ``(b, embed_dim)`` -> logits ``(b, n_classes)``, on the CPU.

        Every score this classifier gives goes through it, and :func:`coopkit.exporters.export_onnx`
        bakes it into the graph, so PyTorch and ONNX compute the same function. Baselines return
        their own head (:mod:`coopkit.heads`) holding their extra matrices.
        """
        if self.head_tensors is not None:
            return build_head(self.method, self.head_tensors, self.class_weights(), self.backbone.logit_bias)
        return LinearHead(self.class_weights(), self.backbone.logit_bias).eval()

    def with_classes(self, classnames: Sequence[str]) -> "Classifier":
        """The same prompt over other class names (base-to-new, open vocabulary).

        Unified context is class-agnostic and carries over as it is; class-specific context
        has no vectors for unseen classes, so it is refused.
        """
        names = check_classnames(classnames)
        if self.head_tensors is not None:
            raise ValueError(f"a {self.method} head holds weights for its training classes only; it has none for "
                             "other class names")
        config = RunConfig(**{**self.config.__dict__, "classnames": names, "metrics": {}, "run_sha256": ""})
        if self.learner is None:
            check_templates_fit(self.backbone, names, self.config.templates or DEFAULT_TEMPLATES)
            return Classifier(self.backbone, config)
        if self.learner.config.csc:
            raise ValueError("a class-specific-context run has no context for new classes; fit with csc=False")
        learner = PromptLearner(self.backbone, names, self.learner.config,
                                text_chunk_size=self.learner.text_chunk_size).to(self.backbone.device)
        with torch.no_grad():
            learner.ctx.copy_(self.learner.ctx)
        learner.requires_grad_(False)
        return Classifier(self.backbone, config, learner)

    def image_features(self, images: Sequence[ImageInput], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
        """L2-normalised image features ``(n, embed_dim)``; every image must decode."""
        images = as_image_list(images)
        if len(images) == 0:
            raise ValueError("no images given")
        feats, _ = encode_images(self.backbone, images, batch_size=batch_size, strict=True, progress=progress)
        return feats[0]

    def logits(self, images: Union[ImageInput, Sequence[ImageInput]], *, batch_size: int = 64) -> np.ndarray:
        """Logits ``(n_images, n_classes)`` (scaled cosine similarities, plus the logit bias of
        SigLIP-family models), float32, for paths, bytes, PIL images or uint8 HWC arrays; the
        same numbers the exported file gives."""
        with torch.no_grad():
            return self.head()(self.image_features(images, batch_size)).numpy()

    def probs(self, images: Union[ImageInput, Sequence[ImageInput]], *, batch_size: int = 64) -> np.ndarray:
        """Class probabilities ``(n_images, n_classes)`` (softmax of the logits over the label
        set, for every model family; a logit bias cancels), float32."""
        return torch.from_numpy(self.logits(images, batch_size=batch_size)).softmax(-1).numpy()

    def scores(self, images: Union[ImageInput, Sequence[ImageInput]], *, batch_size: int = 64) -> np.ndarray:
        """Per-class match probabilities ``sigmoid(logits)`` ``(n_images, n_classes)`` of a model
        trained with a sigmoid loss (SigLIP family: it has a logit bias), as it was trained to
        output them; each class on its own, so rows need not sum to 1.

        Raises:
            ValueError: a softmax-trained model (no logit bias), whose logits are not calibrated
                for a sigmoid; use :meth:`probs`.
        """
        if self.backbone.logit_bias is None:
            raise ValueError(
                f"{self.backbone.name} was trained with a softmax loss (no logit bias), so sigmoid scores mean "
                "nothing for it; use probs() (softmax over the label set)"
            )
        return torch.from_numpy(self.logits(images, batch_size=batch_size)).sigmoid().numpy()

    def embed(self, images: Union[ImageInput, Sequence[ImageInput]], *, batch_size: int = 64) -> np.ndarray:
        """L2-normalised image embeddings ``(n_images, embed_dim)``, float32."""
        return self.image_features(images, batch_size).numpy()

    def predict(
        self,
        images: Union[ImageInput, Sequence[ImageInput]],
        top_k: int = 5,
        *,
        errors: str = "raise",
        batch_size: int = 64,
    ) -> list[Prediction]:
        """Label images: one :class:`~coopkit.runtime.Prediction` per input, best label first.

        The same contract as :meth:`coopkit.runtime.Classifier.predict` (``p.label``,
        ``p.labels``, ``p.probs``, ``p.error``).

        Args:
            images: One image or a list: paths, encoded bytes, PIL images, uint8 HWC arrays.
            top_k: Labels per image (at most the number of classes).
            errors: ``raise`` (the first unreadable image raises, naming it) or ``skip``
                (unreadable images get a result with ``error`` set).
            batch_size: Images per forward pass.
        """
        k = check_predict_args(top_k, errors)
        sources = as_image_list(images)
        if not sources:
            return []
        errs: list[Optional[str]] = [None] * len(sources)
        feats, _ = encode_images(self.backbone, sources, batch_size=batch_size, strict=errors == "raise",
                                 errors_out=errs)
        if feats.shape[1]:
            with torch.no_grad():
                probs = self.head()(feats[0]).softmax(-1).numpy()  # (n_readable, n_classes)
        else:
            probs = np.zeros((0, len(self.classnames)), np.float32)
        return rank(probs, self.classnames, [describe(s) for s in sources], errs, k)

    def evaluate(
        self,
        data: Union[str, os.PathLike, Dataset],
        *,
        split: str = "test",
        image_root: Optional[Union[str, os.PathLike]] = None,
        batch_size: int = 64,
        progress: bool = False,
    ) -> dict[str, Any]:
        """Accuracy on a labelled set (ImageFolder, CSV or CoOp split, by class name).

        Returns:
            ``accuracy`` (fraction correct), ``macro_accuracy`` (mean over classes),
            ``per_class`` (class -> accuracy) and ``n`` (images evaluated; unreadable ones are skipped).
        """
        dataset = load_dataset(data, split=split, image_root=image_root).relabel(self.classnames)
        feats, kept = encode_images(
            self.backbone, dataset.paths, batch_size=batch_size, progress=progress, desc="evaluating"
        )
        with torch.no_grad():
            pred = self.head()(feats[0]).argmax(dim=1).numpy()
        labels = np.array([dataset.labels[i] for i in kept])
        correct = pred == labels
        per_class = {
            self.classnames[c]: float(correct[labels == c].mean()) for c in sorted(set(labels.tolist()))
        }
        return {
            "accuracy": float(correct.mean()),
            "macro_accuracy": float(np.mean(list(per_class.values()))),
            "per_class": per_class,
            "n": int(len(labels)),
        }

    def save(self, path: Union[str, os.PathLike], *, overwrite: bool = False) -> Path:
        """Write the run to a folder: ``config.json`` and, for CoOp, ``ctx.safetensors``.

        The folder is written beside ``path`` and swapped in with one rename: a crash or a full
        disk at any moment leaves the previous run (or no folder) exactly as it was, and Ctrl-C
        takes effect once the save (a few milliseconds) is complete. ``config.json`` records
        ``run_sha256``, a checksum of the whole run that :func:`load` verifies.

        Args:
            path: The run folder (created with its parents; an existing run is replaced).
            overwrite: Also replace a folder that holds something other than a coopkit run
                (everything in it is deleted). Without it, such a folder is refused.

        Raises:
            ValueError: ``path`` is a file, or a folder that is not a run (without ``overwrite``).
            OSError: the environment: permission denied, disk full (the old run is kept).
        """
        from safetensors.torch import save as st_save

        with deferred_interrupt():  # Ctrl-C waits for the few milliseconds a save takes
            target = check_run_target(path, overwrite=overwrite)
            ctx = head = None
            if self.learner is not None:
                ctx = st_save({"ctx": self.learner.ctx.detach().float().cpu().contiguous()})
                self.config.ctx_sha256 = hashlib.sha256(ctx).hexdigest()
            if self.head_tensors is not None:
                head = st_save({k: v.detach().cpu().contiguous() for k, v in self.head_tensors.items()})
                self.config.head_sha256 = hashlib.sha256(head).hexdigest()
            self.config.coopkit_version = __version__
            self.config.run_sha256 = run_checksum(json.loads(self.config.to_json()), ctx, head)
            text = self.config.to_json()
            try:
                with atomic_dir(target) as tmp:
                    (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
                    for name, blob in ((CTX_FILE, ctx), (HEAD_FILE, head)):
                        if blob is not None:
                            (tmp / name).write_bytes(blob)
            except OSError as e:
                if e.filename is None and e.errno is not None:  # name the run, e.g. for a full disk
                    raise OSError(e.errno, e.strerror or str(e), os.fspath(target)) from None
                raise
        logger.info("saved %s run to %s", self.method, target)
        return target


def run_checksum(config: dict[str, Any], ctx: Optional[bytes], head: Optional[bytes] = None) -> str:
    """sha256 of a whole run: its config (as parsed JSON, without ``run_sha256``) in canonical
    form, then the bytes of ``ctx.safetensors`` (none for zero-shot runs) and, for a few-shot
    baseline, of ``head.safetensors``."""
    body = {k: v for k, v in config.items() if k != "run_sha256"}
    digest = hashlib.sha256(b"coopkit run v1\n")
    digest.update(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii"))
    digest.update(b"\n")
    digest.update(ctx or b"")
    if head is not None:
        digest.update(b"\nhead\n")
        digest.update(head)
    return digest.hexdigest()


def _foreign_contents(folder: Path) -> str:
    """What in ``folder`` is not part of a coopkit run ('' for an empty folder or a run)."""
    names = sorted(os.listdir(folder))
    other = [n for n in names if n not in RUN_FILES]
    if other:
        return f"other files ({', '.join(other[:5])}{', ...' if len(other) > 5 else ''})"
    if names and CONFIG_FILE not in names:
        return f"a {CTX_FILE} without {CONFIG_FILE}"
    if not names:
        return ""
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None
    if not isinstance(raw, dict) or raw.get("method") not in METHODS or "classnames" not in raw:
        return f"a {CONFIG_FILE} that is not a coopkit run's"
    return ""


def check_run_target(path: Union[str, os.PathLike], *, overwrite: bool = False) -> Path:
    """The folder a run will be saved to, checked before any long work (training) starts.

    Refuses a file, or a folder holding anything but a coopkit run (unless ``overwrite``)
    with a ValueError; creates the parent folders and proves that a folder can be made there
    (made and removed at once), so a permission problem, a read-only or full filesystem
    surfaces now as the ``OSError`` it is, and a path that cannot exist as a ValueError.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"a run is saved to a folder path, got {path!r}")
    target = Path(path).expanduser()
    if target.is_symlink():
        target = target.resolve()
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot save a run to {target}: it is a file; give a folder")
    if target.is_dir() and not overwrite:
        other = _foreign_contents(target)
        if other:
            raise ValueError(
                f"{target} is not a coopkit run (it holds {other}); save to another folder, or pass "
                "overwrite=True (--overwrite) to replace the folder and everything in it"
            )
    try:
        probe_beside(target)
    except OSError as e:
        where = os.fspath(target.parent) if e.filename is None or Path(e.filename).parent == target.parent \
            else e.filename  # the folder that could not be written, not the probe's name
        if isinstance(e, PermissionError) or e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, e.strerror, where) from None  # the environment (exit 1)
        raise ValueError(f"cannot save a run to {target}: {e.strerror or e}: {where}") from None
    return target


def template_features(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], chunk: int = 256,
                      *, raw: bool = False) -> torch.Tensor:
    """Hand-written prompt features: mean of normalised template embeddings, renormalised.

    ``raw=True``: the plain mean of the unnormalised embeddings instead (CLAP's prototypes).
    """
    model, tok = backbone.model, backbone.tokenizer
    norm = (lambda x: x) if raw else (lambda x: F.normalize(x, dim=-1))
    out = []
    with torch.no_grad(), autocast_for(backbone.device):
        for start in range(0, len(classnames), chunk):
            names = list(classnames[start : start + chunk])
            per_template = []
            for t in templates:
                tokens = torch.as_tensor(tok(fill_templates(t, names))).to(backbone.device)
                per_template.append(norm(model.encode_text(tokens).float()))
            out.append(norm(torch.stack(per_template).mean(0)))  # (chunk, D)
    return torch.cat(out)


def check_templates_fit(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> None:
    """Refuse filled-in templates too long for the text context (they would be cut silently).

    Checked for the tokenizers coopkit can lay out (CLIP's BPE, Hugging Face); others are trusted.
    """
    tok = backbone.tokenizer
    try:
        n_prefix, n_suffix, _ = token_layout(tok)
    except ValueError:
        return
    for t in templates:
        prompts = fill_templates(t, classnames)
        length = int(tok(prompts[:1]).shape[-1])  # the context length, as the tokenizer pads to it
        check_prompts_fit(prompts, [len(tok.encode(p)) for p in prompts], length, n_prefix + n_suffix)


def zero_shot(
    backbone: Backbone,
    classnames: Sequence[str],
    templates: Union[str, Sequence[str]] = DEFAULT_TEMPLATES,
    *,
    threads: Optional[int] = None,
) -> Classifier:
    """The hand-written-prompt baseline: one template, or an ensemble of them.

    The class weights are computed here (the text tower over every class and template).

    Args:
        backbone: From :func:`coopkit.load_backbone`.
        classnames: Labels, in output order.
        templates: Strings with one ``{}`` for the class name; several are averaged (CLIP's ensembling).
        threads: CPU threads for torch meanwhile (``None``: one per CPU that other processes
            leave idle; torch's own count is restored after).
    """
    names = check_classnames(classnames)
    templates = check_templates(templates)
    check_templates_fit(backbone, names, templates)
    if len(names) == 1:
        logger.warning("zero-shot classifier over one class %r: its probability is always 1; use its logit "
                       "(a scaled cosine similarity) as a score", names[0])
    config = RunConfig(method="zeroshot", classnames=names, templates=templates, coopkit_version=__version__,
                       **backbone.run_fields())
    clf = Classifier(backbone, config)
    with torch_threads(threads):
        clf.class_weights()
    return clf


def load(
    path: Union[str, os.PathLike],
    *,
    device: str = "auto",
    pretrained: Optional[str] = None,
    backbone: Optional[Backbone] = None,
    tokenizer: Optional[str] = None,
) -> Classifier:
    """Restore a saved run, checking every file first.

    ``config.json`` and ``ctx.safetensors`` must match the checksum recorded at save time
    (runs saved by earlier versions record only the context file's), and every field must make
    sense: class names a list of distinct non-blank strings, a known method and class-token
    position, a finite float32 context whose shape fits the prompt settings and class count.

    Args:
        path: Folder written by :meth:`Classifier.save`.
        device: Where to load the backbone.
        pretrained: Override the recorded checkpoint path (e.g. the run moved machines).
        backbone: Reuse an already loaded backbone (must be the one the run was trained with).
        tokenizer: Override the recorded local tokenizer path (e.g. the run moved machines).

    Raises:
        FileNotFoundError: the folder or its files are missing.
        ValueError: a corrupt or edited run (one line naming the file and the problem), or a
            backbone whose weights differ from the recorded ones.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        backup = interrupted_backup(folder)
        if backup is None:
            raise FileNotFoundError(f"run folder not found: {path}")
        logger.warning("%s is missing because a save to it was killed half-way; loading the previous run, kept "
                       "as %s (the next save cleans it up)", folder, backup.name)
        folder = backup
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{folder} is not a coopkit run: no {CONFIG_FILE}")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is corrupt: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path} is corrupt: expected a JSON object, got {type(raw).__name__}")
    ctx_path, head_path = folder / CTX_FILE, folder / HEAD_FILE
    blob = ctx_path.read_bytes() if ctx_path.is_file() else None
    head_blob = head_path.read_bytes() if head_path.is_file() else None
    if raw.get("method") == "coop" and blob is None:
        raise FileNotFoundError(f"{folder} is a CoOp run without {CTX_FILE}")
    if raw.get("method") in HEAD_METHODS and head_blob is None:
        raise FileNotFoundError(f"{folder} is a {raw['method']} run without {HEAD_FILE}")
    _check_checksums(raw, blob, folder, head_blob)
    try:
        config = RunConfig.from_dict(raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    ctx = _read_context(blob, config, ctx_path) if config.method == "coop" and blob is not None else None
    head_tensors = _read_head(head_blob, config, head_path) if config.method in HEAD_METHODS else None
    if backbone is None:
        if config.model_config is not None:
            register_model_config(config.model, config.model_config)
        backbone = load_backbone(config.model, pretrained if pretrained is not None else config.pretrained, device,
                                 tokenizer if tokenizer is not None else config.tokenizer, config.text_model)
    if config.backbone_sha256 and backbone.weights_sha256 != config.backbone_sha256:
        raise ValueError(
            f"the backbone weights differ from those this run was trained with ({config.model}, "
            f"pretrained={config.pretrained}): sha256 {backbone.weights_sha256[:12]}..., recorded "
            f"{config.backbone_sha256[:12]}...; load the same weights"
        )
    learner = None
    if ctx is not None:
        assert config.prompt is not None
        learner = PromptLearner(
            backbone, config.classnames, config.prompt,
            text_chunk_size=config.train.text_chunk_size if config.train else 256,
        ).to(backbone.device)
        if tuple(ctx.shape) != tuple(learner.ctx.shape):
            raise ValueError(f"{ctx_path}: context of shape {tuple(ctx.shape)}, expected {tuple(learner.ctx.shape)} "
                             f"for {config.model}")
        with torch.no_grad():
            learner.ctx.copy_(ctx)
        learner.requires_grad_(False)
    return Classifier(backbone, config, learner, head_tensors)


def _check_checksums(raw: dict[str, Any], ctx: Optional[bytes], folder: Path, head: Optional[bytes] = None) -> None:
    """The whole-run checksum (``run_sha256``); for older runs only the context file's."""
    recorded_ctx = raw.get("ctx_sha256")
    for name, blob, sha in ((CTX_FILE, ctx, recorded_ctx), (HEAD_FILE, head, raw.get("head_sha256"))):
        if blob is not None and sha and hashlib.sha256(blob).hexdigest() != sha:
            raise ValueError(f"{folder / name} does not match {CONFIG_FILE} (an interrupted copy, an edited file, "
                             "or files of different runs mixed); restore the saved files or save the run again")
    recorded = raw.get("run_sha256")
    if recorded is None:
        logger.info("%s was saved before runs recorded a checksum of %s; only %s is checked",
                    folder, CONFIG_FILE, CTX_FILE)
    elif not isinstance(recorded, str) or recorded != run_checksum(raw, ctx, head):
        config_only = ctx is None or (recorded_ctx and hashlib.sha256(ctx).hexdigest() == recorded_ctx)
        what = CONFIG_FILE if config_only else f"{CONFIG_FILE} or {CTX_FILE}"
        raise ValueError(f"{folder}: {what} changed after the run was saved (checksum mismatch: edited, corrupted "
                         "or added); restore the saved files or save the run again")


def _read_context(blob: bytes, config: RunConfig, path: Path) -> torch.Tensor:
    """The learned context from the bytes of ``ctx.safetensors``: one finite float32 tensor
    whose shape fits the prompt settings (the width is checked against the backbone later)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is corrupt: {e}") from None
    if set(tensors) != {"ctx"}:
        raise ValueError(f"{path} must hold exactly one tensor 'ctx', holds {sorted(tensors)}")
    ctx = tensors["ctx"]
    assert config.prompt is not None
    p = config.prompt
    lead = (len(config.classnames), p.n_ctx) if p.csc else (p.n_ctx,)
    if ctx.dtype != torch.float32 or ctx.ndim != len(lead) + 1 or tuple(ctx.shape[:-1]) != lead:
        shape = f"({', '.join(map(str, lead))}, width)"
        raise ValueError(f"{path}: context is {ctx.dtype} {tuple(ctx.shape)}, expected float32 {shape} for "
                         f"{len(config.classnames)} classes, n_ctx={p.n_ctx}, csc={p.csc}")
    if not bool(torch.isfinite(ctx).all()):
        raise ValueError(f"{path}: the context holds NaN or infinite values; retrain the run")
    return ctx


def _read_head(blob: Optional[bytes], config: RunConfig, path: Path) -> dict[str, torch.Tensor]:
    """A baseline's head tensors from the bytes of ``head.safetensors``: the tensors its method
    needs, of shapes that fit the class count, finite."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    assert blob is not None
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is corrupt: {e}") from None
    width = next((int(tensors[k].shape[-1]) for k in ("weight", "keys") if k in tensors and tensors[k].ndim == 2), 0)
    try:
        check_head_tensors(config.method, tensors, len(config.classnames), width)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if not all(bool(torch.isfinite(t.float()).all()) for t in tensors.values()):
        raise ValueError(f"{path}: the head holds NaN or infinite values; fit the run again")
    return tensors
