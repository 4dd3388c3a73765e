"""export_onnx(): a fitted or zero-shot classifier as one ONNX graph, proven equal on every export.

The graph (contract in :mod:`coopkit.runtime.contract`): uint8 images ``(batch, H, W, 3)`` ->
``/255`` -> ``(x - mean) / std`` -> NCHW -> the classifier's image encoder -> L2 -> its head (``x W^T``) ->
``logits``, ``probs`` (softmax) and ``image_embeds``. ``W`` (the class weights) is baked in.
A multi-label run (``config.task == "multilabel"``: DualCoOp, its baselines) gives ``probs`` as each
label's own probability (sigmoid; DualCoOp's region aggregation is its head, inside the graph) and
records its per-label thresholds and its own preprocessing (DualCoOp: a stretch to its input size).
With ``raw_input=True`` the file takes decoded images of any size and resizes and crops them
itself first (:mod:`~coopkit.exporters.preprocess`).

How a file is made, one layer each:

0. the settings are one :class:`~coopkit.exporters.config.ExportConfig`, checked with the
   classifier and the target before anything is traced (:func:`prepare`);
1. the PyTorch module (:class:`~coopkit.exporters.graphs.ImageGraph`: the classifier's
   ``image_encoder()`` and ``head()``) is traced (:mod:`~coopkit.exporters.trace`);
2. fp16 / int8 variants are derived from that fp32 graph (:mod:`~coopkit.exporters.fp16`,
   :mod:`~coopkit.exporters.int8`);
   a raw-input file then gets the uint8 preprocessing put in front (:mod:`~coopkit.exporters.preprocess`);
3. the metadata goes into ``metadata_props`` and the file is written and checked
   (:mod:`~coopkit.exporters.io`);
4. onnxruntime runs it on the CPU against the PyTorch classifier on the same inputs
   (:mod:`~coopkit.exporters.verify`); a file that does not match is never moved into place;
5. everything is written in a temporary folder beside the target and renamed into place
   (external data and the text graph first, the image graph last);
6. the sidecar ``<stem>.json`` (metadata and every file's sha256, for web clients) is written
   beside it (:func:`~coopkit.exporters.io.write_sidecar`);
7. everything it did is returned as an :class:`ExportReport`.

The exporter uses a small documented part of the classifier it is given: ``backbone`` (the
model's name, preprocessing, tokenizer and logit bias), ``classnames``, ``config`` (prompt
settings, templates, where the training images are and ``task``), ``method``, ``head()``,
``class_weights()``, ``image_encoder()``, and where present ``preprocess_cfg`` (a method's own
preprocessing) and ``thresholds`` (multi-label runs); the text graph also uses ``text_context()``
(the learned text prompt), ``learner`` (CoOp's, to refuse class-specific context) and ``text_tower``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from coopkit.runtime.contract import (
    INPUT_CROPPED,
    INPUT_NAME,
    INPUT_RAW,
    OUTPUT_NAMES,
    TASK_CLASSIFY,
    TASK_MULTILABEL,
    ModelMetadata,
    ResizeSpec,
)
from coopkit.runtime.integrity import weights_sha256
from coopkit.runtime.preprocess import resize_plan

from .config import ExportConfig
from .fp16 import to_fp16
from .graphs import ImageGraph, image_encoder
from .int8 import Int8Summary, calibration_images, to_int8
from .io import (
    ExportVerificationError,
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
from .preprocess import check_raw_input_supported, prepend_preprocessing
from .text import check_text_encoder_supported, export_text_graph
from .trace import example_tensor, trace
from .verify import (
    FP16_CPU_DISABLED_OPTIMIZERS,
    ImageCheck,
    RawInputCheck,
    TextCheck,
    cpu_session_crashes,
    decoded_images,
    logit_scale,
    multilabel_thresholds,
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
class ExportReport:
    """What :func:`export_onnx` wrote and how it was checked.

    Attributes:
        path: The image graph.
        precision: ``fp32``, ``fp16`` or ``int8``.
        files: Every file written (image graph, external data, text graph).
        size_bytes: Total size of ``files``.
        seconds: Wall time of the export, verification included.
        metadata: The metadata stored in the file.
        image: The proof of equality of the image graph against PyTorch
            (:class:`~coopkit.exporters.verify.ImageCheck`: largest logit difference, top-1
            agreement, images, batch sizes, batch invariance, accuracies on labelled images).
        config: The settings it ran with.
        text: The text graph's check (:class:`~coopkit.exporters.verify.TextCheck`), when exported.
        raw: The raw-input check against the Pillow path
            (:class:`~coopkit.exporters.verify.RawInputCheck`), for ``raw_input``.
        int8: The quantisation (:class:`~coopkit.exporters.int8.Int8Summary`: products quantised,
            calibration images, smoothing kept), for ``int8``.
        cpu_default_session_crashes: fp16: whether onnxruntime's CPU provider at its default
            optimisation level crashes on the file (``None`` for other precisions).
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
    metadata: ModelMetadata
    image: ImageCheck
    config: ExportConfig
    text: Optional[TextCheck] = None
    raw: Optional[RawInputCheck] = None
    int8: Optional[Int8Summary] = None
    cpu_default_session_crashes: Optional[bool] = None
    text_path: Optional[Path] = None
    external_data: bool = False
    sidecar: Optional[Path] = None


#: The name of :class:`ExportReport` in coopkit 0.2.0.
ExportResult = ExportReport


@dataclass
class ExportPlan:
    """An export checked and ready to run (:func:`prepare`): where it goes, what the file will
    say about itself, and the images it is verified (and, for int8, calibrated) on."""

    target: Path
    metadata: ModelMetadata
    images: np.ndarray  # (n, H, W, 3) uint8 at the model's size
    labels: Optional[np.ndarray]  # -1 for unlabelled images
    calibration: Optional[np.ndarray]  # int8: (n, H, W, 3) uint8


def _check_classifier(classifier: "Classifier") -> None:
    for attr in ("backbone", "config", "class_weights", "head"):
        if not hasattr(classifier, attr):
            raise ValueError(
                f"export_onnx needs a coopkit Classifier (from coopkit.fit, coopkit.zero_shot or coopkit.load), "
                f"got {type(classifier).__name__}"
            )


def _multilabel(classifier: "Classifier") -> bool:
    return multilabel_thresholds(classifier) is not None


def _recorded_pretrained(pretrained: Optional[str]) -> Optional[str]:
    if pretrained is None:
        return None
    path = Path(pretrained)
    return path.name if (os.sep in pretrained or path.suffix) else pretrained


def resolved_resize(image_size: tuple[int, int], resize_mode: str, interpolation: str, fill_color: int) -> ResizeSpec:
    """The resize plan the runtime derives from these fields
    (:func:`~coopkit.runtime.preprocess.resize_plan`), resolved for the metadata."""
    plan = resize_plan(image_size, resize_mode, interpolation, fill_color)
    return ResizeSpec(rule=plan.rule, interpolation=plan.interpolation, size=image_size, crop=plan.fill is not None,
                      fill=int(plan.fill or 0))


def build_metadata(
    classifier: "Classifier", precision: str, text_encoder: Optional[Any] = None, input_kind: str = INPUT_CROPPED
) -> ModelMetadata:
    """The :class:`ModelMetadata` of an export of ``classifier``."""
    from coopkit import __version__

    bb = classifier.backbone
    cfg = getattr(classifier, "preprocess_cfg", None) or bb.preprocess_cfg  # DualCoOp: its own stretch
    size = cfg.get("size", bb.image_size)
    image_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    weights = classifier.class_weights()
    thresholds = multilabel_thresholds(classifier)
    p = classifier.config.prompt
    if p is not None:
        prompt: dict[str, Any] = {
            "n_ctx": int(p.n_ctx),
            "csc": bool(p.csc),
            "class_token_position": p.class_token_position,
            "ctx_init": p.ctx_init,
        }
    else:
        prompt = {"templates": list(classifier.config.templates or [])}
    interpolation = str(cfg.get("interpolation", "bicubic"))
    resize_mode = str(cfg.get("resize_mode", "shortest"))
    fill = cfg.get("fill_color", 0)
    fill_color = int(fill if isinstance(fill, (int, float)) else 0)
    try:
        return ModelMetadata(
            classnames=list(classifier.classnames),
            image_size=image_size,
            resize_mode=resize_mode,
            interpolation=interpolation,
            mean=tuple(cfg["mean"]),
            std=tuple(cfg["std"]),
            fill_color=fill_color,
            model=bb.name,
            pretrained=_recorded_pretrained(bb.pretrained),
            method=classifier.method,
            prompt=prompt,
            precision=precision,
            # image-dependent class weights (CoCoOp) have no constant matrix to fingerprint: the
            # runtime then skips its weight check, and tensors_sha256 still covers every tensor
            embed_dim=int(bb.embed_dim if weights is None else weights.shape[1]),
            weights_sha256="" if weights is None else weights_sha256(weights.detach().to("cpu").float().numpy()),
            coopkit_version=__version__,
            text_encoder=text_encoder,
            logit_bias=bb.logit_bias,
            input_kind=input_kind,
            resize_plan=resolved_resize(image_size, resize_mode, interpolation, fill_color),
            task=TASK_CLASSIFY if thresholds is None else TASK_MULTILABEL,
            thresholds=None if thresholds is None else [float(t) for t in thresholds],
        )
    except ValueError as e:  # MetadataError: e.g. an interpolation the runtime cannot reproduce
        raise ValueError(f"cannot export {bb.name}: {e}") from None


def _image_module(classifier: "Classifier") -> "torch.nn.Module":
    bb = classifier.backbone
    encoder = image_encoder(classifier)
    head = classifier.head().to(next(encoder.parameters()).device)
    return ImageGraph(encoder, head, bb.preprocess_cfg["mean"], bb.preprocess_cfg["std"], _multilabel(classifier)).eval()


def _fix_output_dims(model: "onnx.ModelProto", n_classes: int, embed_dim: int) -> None:
    """Write the static widths of the outputs into the graph (the tracer leaves some symbolic)."""
    width = {"logits": n_classes, "probs": n_classes, "image_embeds": embed_dim}
    for out in model.graph.output:
        dims = out.type.tensor_type.shape.dim
        if out.name in width and len(dims) == 2:
            dims[1].Clear()
            dims[1].dim_value = width[out.name]


# --- the steps ---------------------------------------------------------------------------------


def _int8_fallbacks(config: ExportConfig) -> list[tuple[ExportConfig, str]]:
    """What an int8 export with integer convolutions writes instead, in order, when its file fails the
    verification, each with the warning's words. Integer convolutions quantise their outputs to ranges
    from the calibration images, and images far from those (the generated noise and colour fields)
    can saturate them: nearest rounding first where the weights were rounded with GPTQ (which fits
    the calibration images), then the matrix products alone (float convolution outputs: the file
    before convolutions were quantised), each checked the same way."""
    int8 = config.int8
    steps = []
    if int8.weight_rounding != "nearest":
        steps.append((dataclasses.replace(config, int8=dataclasses.replace(int8, weight_rounding="nearest")),
                      "rounding the weights to nearest instead of with GPTQ"))
    steps.append((dataclasses.replace(config, int8=dataclasses.replace(int8, convolutions=False)),
                  "quantising the matrix products alone (give more calibration images like those served to keep "
                  "them)"))
    return steps


def prepare(classifier: "Classifier", path: Union[str, os.PathLike], config: ExportConfig) -> ExportPlan:
    """Check everything that can be checked before tracing (the classifier, the target, the
    metadata, raw-input support, the text graph) and gather the verification and calibration images."""
    _check_classifier(classifier)
    if config.with_text_encoder and _multilabel(classifier):
        raise ValueError(f"--with-text-encoder is for single-label runs: a multi-label {classifier.method} run does not "
                         "score its labels with one prompt's text features (a positive against a negative prompt, a "
                         "learned bias, DualCoOp's region aggregation), which a text graph of class weights cannot give; "
                         "export without it")
    if config.with_text_encoder:
        check_text_encoder_supported(classifier)
    target = check_target(path)
    meta = build_metadata(classifier, config.precision, input_kind=INPUT_RAW if config.raw_input else INPUT_CROPPED)
    if config.raw_input:
        check_raw_input_supported(meta)
    calibration = None
    if config.precision == "int8":
        calibration = calibration_images(classifier, config.int8.calibration, meta, config.int8.calibration_max_images)
    images = random_images(config.n_verify, meta.image_size, config.seed)
    labels = None
    if config.verify_data is not None:
        extra, labels = verification_data(config.verify_data, classifier, meta)
        images = np.concatenate([images, extra])
        if labels is not None:
            labels = np.concatenate([np.full(config.n_verify, -1), labels])
    return ExportPlan(target, meta, images, labels, calibration)


def convert(classifier: "Classifier", plan: ExportPlan, config: ExportConfig, folder: Path) -> tuple[list[Path], Optional[Int8Summary]]:
    """Trace the image graph into ``folder``, derive its precision variant, put the raw-input
    preprocessing in front if asked, store the metadata and save it (with its external data
    when large) under the target's name; ``onnx.checker`` checks it.

    Returns the files written (the graph first) and, for int8, what the quantisation did."""
    import onnx

    meta, int8 = plan.metadata, None
    raw = folder / "raw-fp32.onnx"
    module = _image_module(classifier)
    trace(module, example_tensor(plan.images[: min(2, len(plan.images))], module), raw, config.resolved_opset,
          INPUT_NAME, OUTPUT_NAMES, "batch", fused_attention=config.fused_attention)
    del module
    if config.precision == "int8":
        big = tensor_bytes(onnx.load(os.fspath(raw), load_external_data=False)) > config.size_threshold
        quantised = folder / "raw-int8.onnx"
        int8 = to_int8(raw, quantised, plan.calibration, config.int8, input_name=INPUT_NAME, external_data=big,
                       thresholds=meta.thresholds)
        model = onnx.load(os.fspath(quantised))
    else:
        model = onnx.load(os.fspath(raw))
        if config.precision == "fp16":
            model = to_fp16(model)
    if config.raw_input:
        model = prepend_preprocessing(model, meta)
    _fix_output_dims(model, len(meta.classnames), meta.embed_dim)
    set_metadata(model, meta)
    final = folder / plan.target.name
    files = save_model(model, final, config.size_threshold)
    record_tensors_sha256(model, meta, final)
    del model
    check_model(final)
    return files, int8


def validate(
    classifier: "Classifier", plan: ExportPlan, config: ExportConfig, path: Path
) -> tuple[ImageCheck, Optional[RawInputCheck], Optional[bool]]:
    """Prove the written file equal to PyTorch (and, for raw input, to the Pillow path); raise
    :class:`~coopkit.exporters.io.ExportVerificationError` if it is not. Returns the image
    check, the raw-input check and, for fp16, whether onnxruntime's default CPU session crashes on it."""
    precision, meta = config.precision, plan.metadata
    image = verify_image_graph(path, classifier, precision, plan.images, config.verify_batch, plan.labels)
    if image.label_agreement is not None:
        logger.info("verified %s against PyTorch: max |logit diff| %.3g, per-label decision agreement %.2f%% on %d "
                    "images", precision, image.max_abs_logit_diff, 100 * image.label_agreement, image.n_images)
    else:
        logger.info(
            "verified %s against PyTorch: max |logit diff| %.3g, top-1 agreement %.1f%% on %d images",
            precision, image.max_abs_logit_diff, 100 * image.top1_agreement, image.n_images,
        )
    raw = None
    if config.raw_input:
        raw_images = raw_test_images(meta.image_size, seed=config.seed)
        if config.verify_data is not None:
            raw_images += decoded_images(config.verify_data, classifier)
        raw = verify_raw_input(path, meta, precision, raw_images, logit_scale(classifier))
        logger.info(
            "verified the raw input against Pillow on %d images of many sizes: crops within %d grey levels "
            "(mean %.4f), max |logit diff| %.3g, top-1 agreement %.1f%%",
            raw.n_images, raw.max_pixel_diff, raw.mean_pixel_diff, raw.max_abs_logit_diff, 100 * raw.top1_agreement,
        )
    crashes = None
    if precision == "fp16":
        crashes = cpu_session_crashes(path)
        if crashes:
            logger.warning(
                "onnxruntime's CPU provider crashes on this fp16 file at its default optimisation level; "
                "serve fp16 on CUDA, or on the CPU with disabled_optimizers=%s (fp32/int8 are the CPU choices)",
                list(FP16_CPU_DISABLED_OPTIMIZERS),
            )
    return image, raw, crashes


def export_onnx(
    classifier: "Classifier",
    path: Union[str, os.PathLike],
    precision: Optional[str] = None,
    *,
    config: Optional[ExportConfig] = None,
    **overrides: Any,
) -> ExportReport:
    """Export a fitted or zero-shot classifier as one ONNX graph, verified against PyTorch.

    ``export_onnx(clf, "model.onnx", "int8", calibration="data/train")`` is
    ``export_onnx(clf, "model.onnx", config=ExportConfig(precision="int8",
    int8=QuantizationConfig(calibration="data/train")))``.

    Args:
        classifier: From :func:`coopkit.fit`, :func:`coopkit.zero_shot` or :func:`coopkit.load`.
        path: The ``.onnx`` file to write (its folder is created).
        config: The settings (:class:`~coopkit.exporters.config.ExportConfig`; default: its defaults).
        **overrides: Fields of ``config`` (or of its ``int8`` part) to replace, described below.

    Settings (fields of :class:`~coopkit.exporters.config.ExportConfig` and its ``int8`` part):
        precision: ``fp32``; ``fp16`` (weights and most activations in half precision; inputs,
            outputs, LayerNorm, softmax and the head in fp32: for GPUs); ``int8`` (static
            quantisation, calibrated: int8 per-channel weights and fixed uint8 activation scales
            for every MatMul/Gemm with constant weights, so an image's answer does not depend on
            the batch; for CPUs; see :func:`~coopkit.exporters.int8.to_int8`).
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
            task's real test images; see :func:`~coopkit.exporters.verify.compare` for how close calls are counted.
        n_verify: Generated test images (uniform noise and smooth colour fields).
        verify_batch: Batch size of the verification runs (a batch of 1 is always run too).
        size_threshold: Tensors above this many bytes are written to ``<file>.data``.
        seed: Seed of the generated test images.
        calibration: (``int8``) int8 only: images to calibrate the activation ranges on (see
            :func:`~coopkit.exporters.int8.calibration_images`). Default: the run's own training images, drawn again
            from the data source its config records; a zero-shot classifier has none and
            needs this.

    Returns:
        An :class:`ExportReport`: the files, their size, the time taken and the checks of the
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
    started = time.perf_counter()
    if precision is not None:
        overrides["precision"] = precision
    config = ExportConfig.build(config, **overrides)
    plan = prepare(classifier, path, config)
    target, meta = plan.target, plan.metadata
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        text_files: list[Path] = []
        text = None
        if config.with_text_encoder:
            text_files, meta.text_encoder, text = export_text_graph(
                classifier, tmp / text_graph_name(target.name), opset=config.resolved_opset,
                size_threshold=config.size_threshold)
        files, int8 = convert(classifier, plan, config, tmp)
        fallbacks = _int8_fallbacks(config)
        while True:
            try:
                image, raw, crashes = validate(classifier, plan, config, files[0])
                break
            except ExportVerificationError as e:
                if int8 is None or not int8.convolutions or not fallbacks:
                    raise
                config, instead = fallbacks.pop(0)
                logger.warning("int8 with %d convolutions failed the verification (%s); %s", int8.convolutions, e,
                               instead)
                for f in files:
                    f.unlink(missing_ok=True)
                files, int8 = convert(classifier, plan, config, tmp)
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
    report = ExportReport(
        path=main_file,
        precision=config.precision,
        files=[main_file, *written[:-1]],
        size_bytes=file_size(written),
        seconds=time.perf_counter() - started,
        metadata=meta,
        image=image,
        config=config,
        text=text,
        raw=raw,
        int8=int8,
        cpu_default_session_crashes=crashes,
        text_path=next((w for w in written if w.name == text_graph_name(target.name)), None),
        external_data=len(files) > 1,
        sidecar=write_sidecar(main_file, meta, written),
    )
    logger.info("exported %s (%s, %.1f MB) in %.1fs", main_file, config.precision, report.size_bytes / 1e6,
                report.seconds)
    return report
