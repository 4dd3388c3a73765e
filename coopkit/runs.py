"""Saved runs: the folder format, its checksums and its readers, apart from the fitted model.

A run is a folder with ``config.json`` (:class:`coopkit.config.RunConfig`) and, for a method
that trained tensors, the method's tensors file (:attr:`coopkit.methods.Method.tensors_file`:
``ctx.safetensors`` for CoOp, ``head.safetensors`` for the few-shot baselines). Loading uses no
pickle.

What a run promises: a save replaces the folder in one atomic step (written beside it, then
swapped in), so a crash or a full disk leaves the previous run loadable byte for byte (Ctrl-C
lets the save finish first); ``config.json`` records a sha256 over the whole run (the config
itself and the tensors file), checked on load together with the meaning of every field; a
folder that holds anything but a run is never saved over unless asked (``overwrite=True``).

:meth:`coopkit.Classifier.save` and :func:`coopkit.load` are the public face of this module.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from . import __version__
from .atomic_dirs import atomic_dir, deferred_interrupt, interrupted_backup, probe_beside
from .backbone import Backbone, load_backbone, register_model_config
from .config import RunConfig
from .methods import get, names
from .methods.base import MethodModel
from .runtime.atomic import sha256_hex

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
#: The first tensors file of the run format (CoOp's context): hashed into ``run_sha256`` first,
#: without a label, as runs saved before the registry did.
_LEGACY_FIRST = "ctx.safetensors"
#: The field of ``config.json`` that records a tensors file's own sha256 (runs saved before the
#: registry wrote these two; every other tensors file is recorded in ``tensors_sha256``).
_SHA_FIELDS = {_LEGACY_FIRST: "ctx_sha256", "head.safetensors": "head_sha256"}

PathLike = Union[str, "os.PathLike[str]"]


def tensors_files() -> tuple[str, ...]:
    """Every tensors file a registered method saves."""
    return tuple(sorted({f for f in (get(m).tensors_file for m in names()) if f}))


def run_files() -> tuple[str, ...]:
    """Everything a saved run folder may hold."""
    return (CONFIG_FILE, *tensors_files())


def sha_field(tensors_file: str) -> str:
    """The ``config.json`` field recording the sha256 of ``tensors_file``."""
    return _SHA_FIELDS.get(tensors_file, "tensors_sha256")


def run_checksum(config: Mapping[str, Any], files: Mapping[str, Optional[bytes]]) -> str:
    """sha256 of a whole run: its config (as parsed JSON, without ``run_sha256``) in canonical
    form, then the bytes of each tensors file (``ctx.safetensors`` unlabelled, as before the
    registry; any other as ``"\\n<name without .safetensors>\\n"`` and its bytes, in name order)."""
    body = {k: v for k, v in config.items() if k != "run_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    parts: list[Any] = [b"coopkit run v1\n", text.encode("ascii"), b"\n", files.get(_LEGACY_FIRST) or b""]
    for name in sorted(n for n, blob in files.items() if n != _LEGACY_FIRST and blob is not None):
        parts += [f"\n{name.removesuffix('.safetensors')}\n", files[name]]
    return sha256_hex(*parts)


def _foreign_contents(folder: Path) -> str:
    """What in ``folder`` is not part of a coopkit run ('' for an empty folder or a run)."""
    listing = sorted(os.listdir(folder))
    other = [n for n in listing if n not in run_files()]
    if other:
        return f"other files ({', '.join(other[:5])}{', ...' if len(other) > 5 else ''})"
    if listing and CONFIG_FILE not in listing:
        return f"a {listing[0]} without {CONFIG_FILE}"
    if not listing:
        return ""
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None
    if not isinstance(raw, dict) or raw.get("method") not in names() or "classnames" not in raw:
        return f"a {CONFIG_FILE} that is not a coopkit run's"
    return ""


def check_run_target(path: PathLike, *, overwrite: bool = False) -> Path:
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


def save_run(path: PathLike, config: RunConfig, model: MethodModel, *, overwrite: bool = False) -> Path:
    """Write a run: ``config`` (its checksums and version filled in here) and the model's
    :meth:`~coopkit.methods.base.MethodModel.state` in its method's tensors file, swapped in as one
    folder. See :meth:`coopkit.Classifier.save`."""
    from safetensors.torch import save as st_save

    spec = get(config.method)
    with deferred_interrupt():  # Ctrl-C waits for the few milliseconds a save takes
        target = check_run_target(path, overwrite=overwrite)
        files: dict[str, bytes] = {}
        if spec.tensors_file is not None:
            blob = st_save(model.state())
            files[spec.tensors_file] = blob
            setattr(config, sha_field(spec.tensors_file), sha256_hex(blob))
        config.coopkit_version = __version__
        config.run_sha256 = run_checksum(json.loads(config.to_json()), files)
        text = config.to_json()
        try:
            with atomic_dir(target) as tmp:
                (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
                for name, blob in files.items():
                    (tmp / name).write_bytes(blob)
        except OSError as e:
            if e.filename is None and e.errno is not None:  # name the run, e.g. for a full disk
                raise OSError(e.errno, e.strerror or str(e), os.fspath(target)) from None
            raise
    logger.info("saved %s run to %s", config.method, target)
    return target


def read_run(
    path: PathLike,
    *,
    device: str = "auto",
    pretrained: Optional[str] = None,
    backbone: Optional[Backbone] = None,
    tokenizer: Optional[str] = None,
    strict: bool = False,
) -> tuple[RunConfig, MethodModel]:
    """A saved run's config and fitted model, every file checked first (see :func:`coopkit.load`)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        backup = interrupted_backup(folder)
        if backup is None:
            raise FileNotFoundError(f"run folder not found: {path}")
        logger.warning("%s is missing because a save to it was killed half-way; loading the previous run, kept "
                       "as %s (the next save cleans it up)", folder, backup.name)
        folder = backup
    cfg_path = folder / CONFIG_FILE
    found = read_version(folder, run_files())
    if CONFIG_FILE not in found:
        raise FileNotFoundError(f"{folder} is not a coopkit run: no {CONFIG_FILE}")
    try:
        raw = json.loads(found.pop(CONFIG_FILE).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is corrupt: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path} is corrupt: expected a JSON object, got {type(raw).__name__}")
    files = found
    method = raw.get("method")
    own = get(method).tensors_file if method in names() else None
    if own is not None and own not in files:
        raise FileNotFoundError(f"{folder} is a {method} run without {own}")
    check_checksums(raw, files, folder, strict=strict)
    try:
        config = RunConfig.from_dict(raw)
        spec = get(config.method)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    tensors_path = folder / spec.tensors_file if spec.tensors_file else cfg_path
    tensors = read_tensors(files[spec.tensors_file], tensors_path) if spec.tensors_file else None
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
    try:
        model = spec.build(backbone, config, tensors)
    except ValueError as e:
        raise ValueError(f"{tensors_path}: {e}") from None
    return config, model


#: How often :func:`read_version` reads a folder again that a save replaced while it was being read.
READ_ATTEMPTS = 20


def read_version(folder: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """The bytes of those of ``names`` that ``folder`` holds, all from one version of the folder.

    A save never changes a file inside a run folder: it swaps a complete new folder in and
    deletes the old one. So the files are read through one handle on the folder (``dir_fd``),
    which keeps naming the same folder whatever is renamed meanwhile; if that folder is no longer
    the one at ``folder`` when the reads end (a save swapped another in), the files may come from
    an old version being deleted, and they are read again. Where the platform has no ``dir_fd``
    (Windows), the folder's identity before and after the reads is compared instead.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        RuntimeError: saves replaced the folder during every one of :data:`READ_ATTEMPTS` reads.
    """
    for attempt in range(READ_ATTEMPTS):
        try:
            found = _read_once(folder, names)
        except FileNotFoundError:  # the folder itself: a save between its two renames (no exchange)
            if attempt == READ_ATTEMPTS - 1 or not folder.parent.is_dir():
                raise FileNotFoundError(f"run folder not found: {folder}") from None
            found = None
        if found is not None:
            return found
        logger.debug("%s was replaced by a save while it was read; reading it again", folder)
        time.sleep(0.001 * attempt)
    raise RuntimeError(f"{folder} was replaced by other saves during each of {READ_ATTEMPTS} reads; load it once "
                       "the saves have finished")


def _read_once(folder: Path, names: tuple[str, ...]) -> Optional[dict[str, bytes]]:
    """The files of ``names`` in ``folder``, or None if a save replaced the folder during the reads."""
    use_fd = os.open in os.supports_dir_fd
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if use_fd else None
    try:
        identity = os.fstat(fd) if fd is not None else os.stat(folder)
        found: dict[str, bytes] = {}
        for name in names:
            try:
                if fd is None:
                    found[name] = (folder / name).read_bytes()
                    continue
                handle = os.open(name, os.O_RDONLY, dir_fd=fd)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                continue  # not part of this run (or of this version, if it is being deleted)
            with os.fdopen(handle, "rb") as f:
                found[name] = f.read()
        try:
            unchanged = os.path.samestat(identity, os.stat(folder))
        except FileNotFoundError:
            unchanged = False
    finally:
        if fd is not None:
            os.close(fd)
    return found if unchanged else None


def check_checksums(raw: Mapping[str, Any], files: Mapping[str, bytes], folder: Path, *, strict: bool = False) -> None:
    """The whole-run checksum (``run_sha256``) and each tensors file's own.

    A run without ``run_sha256`` (saved by coopkit 0.1, or its checksum line deleted) loads with
    a warning naming what cannot be verified (``config.json``: class names, method, class-token
    position, every setting; and any tensors file without its own checksum), or, with
    ``strict``, is refused.
    """
    for name, blob in files.items():
        sha = raw.get(sha_field(name))
        if sha and sha256_hex(blob) != sha:
            raise ValueError(f"{folder / name} does not match {CONFIG_FILE} (an interrupted copy, an edited file, "
                             "or files of different runs mixed); restore the saved files or save the run again")
    recorded = raw.get("run_sha256")
    if recorded is None:
        unverified = [CONFIG_FILE] + [n for n in sorted(files) if not raw.get(sha_field(n))]
        what = (f"{', '.join(unverified)} cannot be verified (class names, method, class-token position and every "
                "other setting" + (", and the tensors" if len(unverified) > 1 else "") + ")")
        if strict:
            raise ValueError(f"{folder} records no run_sha256 (saved by coopkit 0.1, or edited): {what}; "
                             "load it without strict=True, or save it again with this version to record one")
        logger.warning("%s records no run_sha256 (saved by coopkit 0.1, or edited): %s; saving it again records "
                       "one, strict=True refuses such runs", folder, what)
    elif not isinstance(recorded, str) or recorded != run_checksum(raw, files):
        unchecked = [n for n in files if not raw.get(sha_field(n))]
        what = CONFIG_FILE if not unchecked else f"{CONFIG_FILE} or {', '.join(unchecked)}"
        raise ValueError(f"{folder}: {what} changed after the run was saved (checksum mismatch: edited, corrupted "
                         "or added); restore the saved files or save the run again")


def read_tensors(blob: bytes, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file's bytes (no pickle).

    Raises:
        ValueError: the bytes are not a safetensors file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    try:
        return st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is corrupt: {e}") from None


__all__ = ["CONFIG_FILE", "tensors_files", "run_files", "sha_field", "run_checksum", "check_run_target", "save_run",
           "read_run", "read_version", "check_checksums", "read_tensors"]
