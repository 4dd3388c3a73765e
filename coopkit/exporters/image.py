"""export_onnx(): a fitted or zero-shot classifier as one ONNX graph, proven equal on every export.

The graph (contract in :mod:`coopkit.runtime.contract`): uint8 images ``(batch, H, W, 3)`` ->
``/255`` -> ``(x - mean) / std`` -> NCHW -> open_clip image encoder -> L2 -> ``x W^T`` ->
``logits``, ``probs`` (softmax) and ``image_embeds``. ``W`` (the class weights) is baked in.
With ``raw_input=True`` the file takes decoded images of any size and resizes and crops them
itself first (:mod:`~coopkit.exporters.preprocess`).

How a file is made, one layer each:

1. the PyTorch module (:class:`~coopkit.exporters.graphs.ImageGraph`) is traced
   (:mod:`~coopkit.exporters.trace`);
2. fp16 / int8 variants are derived from that fp32 graph (:mod:`~coopkit.exporters.quantize`);
   a raw-input file then gets the uint8 preprocessing put in front (:mod:`~coopkit.exporters.preprocess`);
3. the metadata goes into ``metadata_props`` and the file is written and checked
   (:mod:`~coopkit.exporters.io`);
4. onnxruntime runs it on the CPU against the PyTorch classifier on the same inputs
   (:mod:`~coopkit.exporters.verify`); a file that does not match is never moved into place;
5. everything is written in a temporary folder beside the target and renamed into place
   (external data and the text graph first, the image graph last);
6. the sidecar ``<stem>.json`` (metadata and every file's sha256, for web clients) is written
   beside it (:func:`~coopkit.exporters.io.write_sidecar`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from coopkit.userdata import few_shot, list_images, load_dataset
from coopkit.runtime.atomic import sha256_hex
from coopkit.runtime.contract import INPUT_CROPPED, INPUT_NAME, INPUT_RAW, OUTPUT_NAMES, PRECISIONS, ModelMetadata
from coopkit.runtime.preprocess import preprocess

from .graphs import ImageGraph
from .io import (
    EXTERNAL_DATA_THRESHOLD,
    check_model,
    check_target,
    file_size,
    move_into_place,
    record_tensors_sha256,
    remove_stale_companions,
    save_model,
    set_metadata,
    tensor_bytes,
    text_graph_name,
    write_sidecar,
)
from .preprocess import RAW_INPUT_OPSET, check_raw_input_supported, prepend_preprocessing
from .quantize import to_fp16, to_int8
from .text import check_text_encoder_supported, export_text_graph
from .trace import DEFAULT_OPSET, check_opset, example_tensor, trace
from .verify import (
    FP16_CPU_DISABLED_OPTIMIZERS,
    VERIFY_IMAGES,
    cpu_session_crashes,
    decoded_images,
    logit_scale,
    random_images,
    raw_test_images,
    verification_data,
    verify_image_graph,
    verify_raw_input,
)

if TYPE_CHECKING:
    import onnx
    import torch

    from coopkit.classifier import Classifier

logger = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how it was checked.

    Attributes:
        path: The image graph.
        precision: ``fp32``, ``fp16`` or ``int8``.
        files: Every file written (image graph, external data, text graph).
        size_bytes: Total size of ``files``.
        seconds: Wall time of the export, verification included.
        checks: Numbers of the proof of equality: ``max_abs_logit_diff``, ``top1_agreement``,
            ``n_images``, ``batch_sizes``, ``tolerance``; with a text graph,
            ``text_max_abs_diff``; for raw input, ``raw_max_pixel_diff``,
            ``raw_max_abs_logit_diff``, ``raw_top1_agreement`` and the other ``raw_*`` numbers
            of :func:`~coopkit.exporters.verify.verify_raw_input`.
        metadata: The metadata stored in the file.
        text_path: The text graph, when exported.
        external_data: Whether the tensors live in ``<file>.data``.
        sidecar: ``<stem>.json`` beside the graph: the metadata and every file's sha256, for
            clients that cannot read ONNX metadata (onnxruntime-web).
    """

    path: Path
    precision: str
    files: list[Path]
    size_bytes: int
    seconds: float
    checks: dict[str, Any]
    metadata: ModelMetadata
    text_path: Optional[Path] = None
    external_data: bool = False
    sidecar: Optional[Path] = None



def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"unsupported precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return precision



def _check_classifier(classifier: "Classifier") -> None:
    for attr in ("backbone", "config", "class_weights", "head"):
        if not hasattr(classifier, attr):
            raise ValueError(
                f"export_onnx needs a coopkit Classifier (from coopkit.fit, coopkit.zero_shot or coopkit.load), "
                f"got {type(classifier).__name__}"
            )



def weights_sha256(weights: "torch.Tensor") -> str:
    """sha256 of the class weight matrix as float32, C order (the value stored in the metadata)."""
    array = np.ascontiguousarray(weights.detach().to("cpu").float().numpy(), dtype=np.float32)
    return sha256_hex(array)


def _recorded_pretrained(pretrained: Optional[str]) -> Optional[str]:
    if pretrained is None:
        return None
    path = Path(pretrained)
    return path.name if (os.sep in pretrained or path.suffix) else pretrained


def build_metadata(
    classifier: "Classifier", precision: str, text_encoder: Optional[Any] = None, input_kind: str = INPUT_CROPPED
) -> ModelMetadata:
    """The :class:`ModelMetadata` of an export of ``classifier``."""
    from coopkit import __version__

    bb = classifier.backbone
    cfg = bb.preprocess_cfg
    weights = classifier.class_weights()
    if classifier.learner is not None:
        p = classifier.learner.config
        prompt: dict[str, Any] = {
            "n_ctx": int(classifier.learner.n_ctx),
            "csc": bool(p.csc),
            "class_token_position": p.class_token_position,
            "ctx_init": p.ctx_init,
        }
    else:
        prompt = {"templates": list(classifier.config.templates or [])}
    interpolation = str(cfg.get("interpolation", "bicubic"))
    resize_mode = str(cfg.get("resize_mode", "shortest"))
    fill = cfg.get("fill_color", 0)
    try:
        return ModelMetadata(
            classnames=list(classifier.classnames),
            image_size=bb.image_size,
            resize_mode=resize_mode,
            interpolation=interpolation,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            fill_color=int(fill if isinstance(fill, (int, float)) else 0),
            model=bb.name,
            pretrained=_recorded_pretrained(bb.pretrained),
            method=classifier.method,
            prompt=prompt,
            precision=precision,
            embed_dim=int(weights.shape[1]),
            weights_sha256=weights_sha256(weights),
            coopkit_version=__version__,
            text_encoder=text_encoder,
            logit_bias=bb.logit_bias,
            input_kind=input_kind,
        )
    except ValueError as e:  # MetadataError: e.g. an interpolation the runtime cannot reproduce
        raise ValueError(f"cannot export {bb.name}: {e}") from None



#: int8: calibration images used at most (an even spread over those given).
CALIBRATION_MAX_IMAGES = 256
_CALIBRATION_HINT = (
    "pass calibration= images like those the model will serve (coopkit export --calibration DIR: "
    "a folder of images, an ImageFolder, CSV or CoOp split)"
)


def _training_images(classifier: "Classifier") -> list[str]:
    """The few-shot sample the run was trained on, drawn again from its recorded data source."""
    config = classifier.config
    if config.data is None or config.train is None:
        why = ("a zero-shot classifier has no training images" if not classifier.trained else
               "this run does not record where its training images are (fitted on a Dataset object, or saved by "
               "an older coopkit)")
        raise ValueError(f"int8 calibrates on the run's training images, but {why}; {_CALIBRATION_HINT}")
    try:
        dataset = load_dataset(config.data.source, split="train", image_root=config.data.image_root)
    except FileNotFoundError as e:
        raise ValueError(
            f"int8 calibrates on the run's training images, but they are not where the run recorded them ({e}); "
            f"{_CALIBRATION_HINT}"
        ) from None
    return few_shot(dataset.subset(classifier.classnames), config.train.shots, config.train.seed).paths


def calibration_images(
    classifier: "Classifier", calibration: Optional[Any], meta: ModelMetadata, limit: int = CALIBRATION_MAX_IMAGES
) -> np.ndarray:
    """uint8 images ``(n, H, W, 3)`` at the model's size for int8 calibration, as the runtime
    crops them: the run's own training images by default, else ``calibration`` (a folder of
    images at any depth, an ImageFolder / CSV / CoOp split file, a list of images, or a uint8
    batch at the model's size). At most ``limit``, spread evenly over those given."""
    h, w = meta.image_size
    if isinstance(calibration, np.ndarray):
        if calibration.dtype != np.uint8 or calibration.ndim != 4 or calibration.shape[1:] != (h, w, 3):
            raise ValueError(f"calibration images must be uint8 (n, {h}, {w}, 3), got {calibration.dtype} {calibration.shape}")
        sources: list[Any] = list(calibration)
    elif calibration is None:
        sources = _training_images(classifier)
    elif isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration).expanduser()
        if path.is_dir():
            sources = list_images(path)  # plain or ImageFolder: every image at any depth, labels unused
        else:
            sources = load_dataset(path, split="train").paths
    else:
        sources = list(calibration)
    if not sources:
        raise ValueError(f"no calibration images; {_CALIBRATION_HINT}")
    if len(sources) > limit:
        sources = [sources[i] for i in np.linspace(0, len(sources) - 1, limit).round().astype(int)]
    arrays = [preprocess(s, meta.image_size, meta.resize_mode, meta.interpolation, meta.fill_color) for s in sources]
    return np.stack(arrays)  # (n, H, W, 3)


def _image_module(classifier: "Classifier") -> "torch.nn.Module":
    bb = classifier.backbone
    head = classifier.head().to(next(bb.model.parameters()).device)
    return ImageGraph(bb.model, head, bb.preprocess_cfg["mean"], bb.preprocess_cfg["std"]).eval()


def _fix_output_dims(model: "onnx.ModelProto", n_classes: int, embed_dim: int) -> None:
    """Write the static widths of the outputs into the graph (the tracer leaves some symbolic)."""
    width = {"logits": n_classes, "probs": n_classes, "image_embeds": embed_dim}
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if out.name in width and len(dims) == 2:
            dims[1].Clear()
            dims[1].dim_value = width[out.name]


def export_onnx(
    classifier: "Classifier",
    path: Union[str, os.PathLike],
    precision: str = "fp32",
    *,
    opset: Optional[int] = None,
    raw_input: bool = False,
    with_text_encoder: bool = False,
    verify_data: Optional[Any] = None,
    n_verify: int = VERIFY_IMAGES,
    verify_batch: int = 8,
    size_threshold: int = EXTERNAL_DATA_THRESHOLD,
    seed: int = 0,
    calibration: Optional[Any] = None,
) -> ExportResult:
    """Export a fitted or zero-shot classifier as one ONNX graph, verified against PyTorch.

    Args:
        classifier: From :func:`coopkit.fit`, :func:`coopkit.zero_shot` or :func:`coopkit.load`.
        path: The ``.onnx`` file to write (its folder is created).
        precision: ``fp32``; ``fp16`` (weights and most activations in half precision; inputs,
            outputs, LayerNorm, softmax and the head in fp32: for GPUs); ``int8`` (static
            quantisation, calibrated: int8 per-channel weights and fixed uint8 activation scales
            for every MatMul/Gemm with constant weights, so an image's answer does not depend on
            the batch; for CPUs; see :func:`~coopkit.exporters.quantize.to_int8`).
        opset: ONNX opset, 14 to 20 (``None``: 17, or 18 with ``raw_input``, which needs 18 or newer).
        raw_input: The file takes decoded uint8 RGB images of any size, ``(batch, height,
            width, 3)`` with the images of one run sharing a size, and resizes and crops them in
            the graph as open_clip does (bicubic and bilinear models). Verified against the
            runtime's Pillow path on images of many sizes and aspect ratios (and on
            ``verify_data`` at full size), besides the usual check against PyTorch.
        with_text_encoder: Also write the text tower with the learned context baked in, as
            ``<name>.text.onnx`` beside ``path`` (unified-context CoOp and zero-shot runs; a
            class-specific context has nothing to give a new class name). It stays fp32.
        verify_data: More images to verify on, besides ``n_verify`` generated ones: a labelled
            set (ImageFolder, CSV or CoOp split path, or a :class:`coopkit.Dataset`, whose
            ``test`` split is used), a list of images, or a uint8 ``(n, H, W, 3)`` batch at the
            model's size. With labels, both accuracies are reported and, for int8, must be
            within 1 point (from 100 labelled images on). The int8 criteria are meant for a
            task's real test images; see :func:`compare` for how close calls are counted.
        n_verify: Generated test images (uniform noise and smooth colour fields).
        verify_batch: Batch size of the verification runs (a batch of 1 is always run too).
        size_threshold: Tensors above this many bytes are written to ``<file>.data``.
        seed: Seed of the generated test images.
        calibration: int8 only: images to calibrate the activation ranges on (see
            :func:`calibration_images`). Default: the run's own training images, drawn again
            from the data source its config records; a zero-shot classifier has none and
            needs this.

    Returns:
        An :class:`ExportResult`: the files, their size, the time taken and the numbers of the
        proof of equality.

    Raises:
        ValueError: bad precision or opset, an output path that is a folder or cannot be created,
            a class-specific context with ``with_text_encoder``, unreadable verification data,
            ``raw_input`` for a model that resizes nearest-neighbour or with an opset below 18.
        ExportVerificationError: the graph did not match PyTorch (nothing was written).
        RuntimeError: the exporter or a converter failed.
        OSError: the environment: permission denied, a read-only or full disk (nothing is left
            behind, and an earlier file at ``path`` is kept).
    """
    import onnx

    started = time.perf_counter()
    _check_classifier(classifier)
    _check_precision(precision)
    if opset is None:
        opset = RAW_INPUT_OPSET if raw_input else DEFAULT_OPSET
    check_opset(opset)
    if raw_input and opset < RAW_INPUT_OPSET:
        raise ValueError(f"raw input needs opset {RAW_INPUT_OPSET} or newer (Resize with antialias), got {opset}")
    if n_verify < 1 or verify_batch < 1:
        raise ValueError(f"n_verify and verify_batch must be >= 1, got {n_verify} and {verify_batch}")
    if with_text_encoder:
        check_text_encoder_supported(classifier)
    target = check_target(path)
    meta = build_metadata(classifier, precision, input_kind=INPUT_RAW if raw_input else INPUT_CROPPED)
    if raw_input:
        check_raw_input_supported(meta)
    calib = calibration_images(classifier, calibration, meta) if precision == "int8" else None
    if calibration is not None and precision != "int8":
        raise ValueError(f"calibration images are for int8 exports; precision is {precision}")
    images = random_images(n_verify, meta.image_size, seed)
    labels = None
    if verify_data is not None:
        extra, labels = verification_data(verify_data, classifier, meta)
        images = np.concatenate([images, extra])
        if labels is not None:
            labels = np.concatenate([np.full(n_verify, -1), labels])

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        checks: dict[str, Any] = {}
        text_files: list[Path] = []
        if with_text_encoder:
            text_files, text_spec, text_checks = export_text_graph(
                classifier, tmp / text_graph_name(target.name), opset=opset, size_threshold=size_threshold
            )
            meta.text_encoder = text_spec
            checks.update(text_checks)

        raw = tmp / "raw-fp32.onnx"
        module = _image_module(classifier)
        trace(module, example_tensor(images[: min(2, len(images))], module), raw, opset, INPUT_NAME, OUTPUT_NAMES,
              "batch")
        del module
        final = tmp / target.name
        if precision == "int8":
            big = tensor_bytes(onnx.load(os.fspath(raw), load_external_data=False)) > size_threshold
            quantised = tmp / "raw-int8.onnx"
            checks.update(to_int8(raw, quantised, calib, input_name=INPUT_NAME, external_data=big))
            model = onnx.load(os.fspath(quantised))
        else:
            model = onnx.load(os.fspath(raw))
            if precision == "fp16":
                model = to_fp16(model)
        if raw_input:
            model = prepend_preprocessing(model, meta)
        _fix_output_dims(model, len(meta.classnames), meta.embed_dim)
        set_metadata(model, meta)
        files = save_model(model, final, size_threshold)
        record_tensors_sha256(model, meta, final)
        del model
        check_model(final)
        checks.update(verify_image_graph(final, classifier, precision, images, verify_batch, labels))
        if raw_input:
            raw_images = raw_test_images(meta.image_size, seed=seed)
            if verify_data is not None:
                raw_images += decoded_images(verify_data, classifier)
            checks.update(verify_raw_input(final, meta, precision, raw_images, logit_scale(classifier)))
        if precision == "fp16":
            crashes = cpu_session_crashes(final)
            checks["cpu_default_session_crashes"] = crashes
            if crashes:
                logger.warning(
                    "onnxruntime's CPU provider crashes on this fp16 file at its default optimisation level; "
                    "serve fp16 on CUDA, or on the CPU with disabled_optimizers=%s (fp32/int8 are the CPU choices)",
                    list(FP16_CPU_DISABLED_OPTIMIZERS),
                )
        logger.info(
            "verified %s against PyTorch: max |logit diff| %.3g, top-1 agreement %.1f%% on %d images",
            precision, checks["max_abs_logit_diff"], 100 * checks["top1_agreement"], checks["n_images"],
        )
        if raw_input:
            logger.info(
                "verified the raw input against Pillow on %d images of many sizes: crops within %d grey levels "
                "(mean %.4f), max |logit diff| %.3g, top-1 agreement %.1f%%",
                checks["raw_n_images"], checks["raw_max_pixel_diff"], checks["raw_mean_pixel_diff"],
                checks["raw_max_abs_logit_diff"], 100 * checks["raw_top1_agreement"],
            )
        # into place: external data and the text graph first, the image graph (which names them) last
        written = move_into_place([*text_files, *files[1:], files[0]], target.parent)
        remove_stale_companions(target, written)
    except OSError as e:
        if e.filename is None and e.errno is not None:  # name the output, e.g. for a full disk
            raise OSError(e.errno, e.strerror or str(e), os.fspath(target)) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    main_file = written[-1]
    sidecar = write_sidecar(main_file, meta, written)
    result = ExportResult(
        path=main_file,
        precision=precision,
        files=[main_file, *written[:-1]],
        size_bytes=file_size(written),
        seconds=time.perf_counter() - started,
        checks=checks,
        metadata=meta,
        text_path=next((w for w in written if w.name == text_graph_name(target.name)), None),
        external_data=len(files) > 1,
        sidecar=sidecar,
    )
    logger.info("exported %s (%s, %.1f MB) in %.1fs", main_file, precision, result.size_bytes / 1e6, result.seconds)
    return result

