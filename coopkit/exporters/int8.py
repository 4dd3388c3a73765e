"""The calibrated static int8 variant of an exported fp32 graph (for CPUs).

Three steps, each public: the calibration images (:func:`calibration_images`: the run's own
training images by default), the activation ranges on them (:func:`activation_ranges`) with
SmoothQuant's outlier smoothing (:func:`smooth_activations`), and the quantisation itself with a
trial of each smoothing strength (:func:`to_int8`), GPTQ's weight rounding
(:func:`round_weights`) and the accuracy-aware fallback to fp32
(:func:`keep_float_until_agreement`), all driven by one
:class:`~coopkit.exporters.config.QuantizationConfig`. The input normalisation and the head stay
fp32 (:mod:`~coopkit.exporters.nodes`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from coopkit.multilabel_data import load_multilabel
from coopkit.userdata import few_shot, list_images, load_dataset
from coopkit.runtime.contract import ModelMetadata
from coopkit.runtime.preprocess import preprocess
from coopkit.runtime.session import cpu_session

from .config import (CALIBRATION_BATCH, CALIBRATION_MAX_IMAGES, MIN_AGREEMENT, MIN_ESTIMATED_AGREEMENT, SMOOTH_ALPHA,
                     QuantizationConfig)
from .nodes import full_precision_nodes
from .verify import label_agreement, multilabel_thresholds, sigmoid

if TYPE_CHECKING:
    import onnx

    from coopkit.classifier import Classifier

logger = logging.getLogger(__name__)

#: Calibration images (those with the smallest fp32 margins) each product's sensitivity is measured on.
SENSITIVITY_IMAGES = 64
#: The matrix products quantised with float outputs (``MatMulIntegerToFloat``).
PRODUCTS = ("MatMul", "Gemm")
#: GPTQ: bytes of the inputs' second-moment matrices (float64) gathered in one pass over the calibration images.
GPTQ_PASS_BYTES = 512 << 20
#: GPTQ: damping added to each second-moment matrix's diagonal, as a share of its mean (the paper's 1%).
#: On random-init ViT-B-32 (near-tie logits, 128 calibration crops) 1% keeps fp32's top-1 on 99.2% of
#: 1000 held-out crops, 100% on 98.6%, nearest rounding on 98.4%. On coopkit-tiny's colors run, 1% fits
#: the calibration images so closely that the integer convolutions failed the export's verification on
#: its generated noise and colour fields (98.4% of clear calls): the export then writes the file again
#: with nearest rounding (:func:`coopkit.exporters.export_onnx`'s fallbacks).
GPTQ_DAMPING = 0.01
#: GPTQ: columns rounded per block before the rest of the matrix is updated (the paper's 128).
GPTQ_BLOCK = 128
#: GPTQ: calibration input rows needed per weight column, or the weight keeps nearest rounding: with
#: fewer (a product that reads one vector per image, 64 calibration images for 768 inputs) the second
#: moments miss most directions and GPTQ fits the calibration images at the expense of the others
#: (at 2 rows per column, the weak ViT's last projection still gains on held-out images, but coopkit-tiny
#: on 64 images loses: its worst held-out logit moves further than with nearest rounding).
GPTQ_ROWS_PER_COLUMN = 8

@dataclass(frozen=True)
class Int8Summary:
    """What :func:`to_int8` did.

    Attributes:
        nodes: Products quantised (:func:`int8_targets`).
        calibration_images: Images the activation ranges were taken on.
        smoothing: The smoothing strength kept (:func:`smooth_activations`).
        trials: For each strength tried, ``(top-1 changes, mean |logit diff|)`` against the fp32
            file on the calibration images (a multi-label file: changed label decisions; empty
            when only one was tried).
        float_nodes: Products kept in fp32 so that the calibration images agree with fp32
            (:func:`keep_float_until_agreement`; ``nodes`` counts the others).
        agreement: ``(measured, estimated)`` top-1 agreement with fp32 on the calibration
            images of the file written (:func:`top1_agreement`; ``None``: not checked); for a
            multi-label file, the per-label decision agreement
            (:func:`~coopkit.exporters.verify.label_agreement`).
        convolutions: Convolutions among ``nodes`` (0 with ``convolutions=False``, on a model
            without any, or where the export fell back to products alone).
    """

    nodes: int
    calibration_images: int
    smoothing: float
    trials: dict[float, tuple[int, float]] = field(default_factory=dict)
    float_nodes: tuple[str, ...] = ()
    agreement: Optional[tuple[float, float]] = None
    convolutions: int = 0


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
        if multilabel_thresholds(classifier) is not None:  # a multi-label run: fitted on every image of the set
            return list(load_multilabel(config.data.source, image_root=config.data.image_root).paths)
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
        elif multilabel_thresholds(classifier) is not None:
            sources = list(load_multilabel(path).paths)  # a multi-label CSV / JSON: its images
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



def int8_targets(model: "onnx.ModelProto", convolutions: bool = True) -> list[str]:
    """The nodes the int8 variant quantises: every MatMul / Gemm (and, with ``convolutions``,
    every Conv) whose weight operand is a constant, outside the full-precision parts (the head and
    the input normalisation).

    Products of two activations (attention's ``q k^T`` and ``softmax v``) stay fp32."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    keep = set(full_precision_nodes(model))
    ops = PRODUCTS + (("Conv",) if convolutions else ())
    return [
        n.name for n in model.graph.node
        if n.op_type in ops and len(n.input) > 1 and n.input[1] in constants and n.name not in keep
    ]


def _conv_tensors(model: "onnx.ModelProto", targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """For the Conv nodes among ``targets``: the ReLUs folded into them (a ReLU that is the only
    reader of a quantised convolution's output: the quantiser drops it and quantises the
    convolution's output with the ReLU's range, whose zero clamps what the ReLU would) and the
    output tensors whose fixed ranges the quantiser needs (each convolution's, or its ReLU's)."""
    wanted = set(targets)
    convs = {n.name: n for n in model.graph.node if n.name in wanted and n.op_type == "Conv"}
    readers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    relus, outputs = [], []
    for conv in convs.values():
        after = readers.get(conv.output[0], [])
        if len(after) == 1 and after[0].op_type == "Relu":
            relus.append(after[0].name)
            outputs.append(after[0].output[0])
        else:
            outputs.append(conv.output[0])
    return relus, outputs


def activation_ranges(
    source: Union[str, os.PathLike], tensors: Iterable[str], images: Any, input_name: str = "images",
    batch_size: int = CALIBRATION_BATCH,
) -> dict[str, tuple[Any, Any]]:
    """Smallest and largest value each float tensor takes on ``images`` (uint8 batches through
    onnxruntime on the CPU), per channel (the last axis), computed batch by batch so memory stays
    that of one batch. ``lo.min(), hi.max()`` is the tensor's range.

    (onnxruntime's own calibrator keeps every batch's tensors until the end, and its option
    to bound that, ``CalibMaxIntermediateOutputs``, drops the data it clears in 1.31.)"""
    import onnx

    names = list(dict.fromkeys(tensors))
    model = onnx.load(os.fspath(source), load_external_data=False)  # external data stays where it is
    model.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    augmented = Path(source).with_name(f".{Path(source).stem}.calibration.onnx")
    try:
        onnx.save(model, os.fspath(augmented))
        del model
        session = cpu_session(augmented)
        low: dict[str, Any] = {n: np.inf for n in names}
        high: dict[str, Any] = {n: -np.inf for n in names}
        for start in range(0, len(images), batch_size):
            values = session.run(names, {input_name: np.ascontiguousarray(images[start : start + batch_size])})
            for n, v in zip(names, values):
                rows = v.reshape(-1, v.shape[-1])
                low[n] = np.minimum(low[n], rows.min(0))
                high[n] = np.maximum(high[n], rows.max(0))
        del session
    finally:
        augmented.unlink(missing_ok=True)
    return {n: (low[n], high[n]) for n in names}


def smooth_activations(
    model: "onnx.ModelProto", targets: Sequence[str], ranges: dict[str, tuple[Any, Any]], alpha: float = SMOOTH_ALPHA,
) -> dict[str, tuple[float, float]]:
    """Move each quantised product's activation outliers into its weights (SmoothQuant: Xiao et
    al., 2023), in place: ``x W = (x / s) (s W)`` with one factor per input channel,
    ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)``. Exact in fp32 (one ``Mul`` by ``1 / s`` per
    distinct input, shared by the products that read it); after it, one per-tensor uint8 scale
    covers channels of similar range, where a few large channels (a ReLU network's positional
    embedding, a transformer's LayerNorm outliers) would otherwise leave the rest few levels.
    The factors are fixed at export, so the file stays batch-invariant.

    Args:
        model: The fp32 graph with its weights loaded.
        targets: The products to quantise (:func:`int8_targets`).
        ranges: Per-channel (low, high) of each product's input on the calibration images
            (:func:`activation_ranges`).
        alpha: How much of the outliers moves to the weights (0: none, 1: all).

    Returns:
        The per-tensor (low, high) of each quantised product's input after smoothing, by the
        name the product now reads.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes = list(model.graph.node)
    readers: dict[str, list[Any]] = {}
    wanted = set(targets)
    for n in nodes:
        if n.name in wanted:
            readers.setdefault(n.input[0], []).append(n)
    out: dict[str, tuple[float, float]] = {}
    for x, consumers in readers.items():
        lo, hi = (np.asarray(v, dtype=np.float64) for v in ranges[x])
        weights = []
        for n in consumers:
            w = numpy_helper.to_array(inits[n.input[1]])
            trans = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
            weights.append((n, w, trans, w.T if trans else w))  # the last: (in, out)
        if lo.shape != (weights[0][3].shape[0],):  # not one value per input channel: leave it
            out[x] = (float(lo.min()), float(hi.max()))
            continue
        x_max = np.maximum(np.abs(lo), np.abs(hi)) + 1e-8
        w_max = np.max([np.abs(w_in).max(1) for *_, w_in in weights], axis=0) + 1e-8
        factor = np.clip(x_max**alpha / w_max ** (1 - alpha), 1e-5, 1e5)
        for n, w, trans, w_in in weights:
            scaled = (w_in * factor[:, None]).astype(w.dtype)
            name = f"{n.input[1]}.smoothed"
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(scaled.T if trans else scaled),
                                                                   name))
            n.input[1] = name
        inv, smoothed = f"{x}.inverse_smoothing", f"{x}.smoothed"
        model.graph.initializer.append(numpy_helper.from_array((1.0 / factor).astype(np.float32), inv))
        first = min(nodes.index(n) for n in consumers)
        model.graph.node.insert(first, helper.make_node("Mul", [x, inv], [smoothed], name=f"{x}/smoothing"))
        nodes.insert(first, model.graph.node[first])
        for n in consumers:
            n.input[0] = smoothed
        out[smoothed] = (float((lo / factor).min()), float((hi / factor).max()))
    unused = {i.name for i in model.graph.initializer} - {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name not in unused]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return out


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """onnxruntime's quantiser logs "consider pre-processing" warnings on the root logger."""

    def keep(record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def to_int8(
    source: Union[str, os.PathLike],
    target: Union[str, os.PathLike],
    calibration: Any,
    config: Optional[QuantizationConfig] = None,
    *,
    input_name: str = "images",
    external_data: bool = False,
    thresholds: Optional[Sequence[float]] = None,
) -> Int8Summary:
    """Static int8 quantisation (QDQ), calibrated: the same answer for an image in any batch.

    Every MatMul / Gemm with a constant weight operand (:func:`int8_targets`) gets int8
    weights with one symmetric scale per output channel and uint8 inputs with ONE fixed scale
    and zero point per tensor, from the range that tensor takes on the ``calibration`` images
    (onnxruntime's MinMax calibration). Fixed activation scales are what makes the file
    batch-invariant: dynamic quantisation computes them over the whole batch at run time, so an
    image's logits depend on the images beside it. Outputs of the quantised products stay
    float (onnxruntime runs ``QuantizeLinear`` + ``MatMulIntegerToFloat``); attention's
    activation-activation products, LayerNorm, softmax, the input normalisation and the head
    (``x W^T`` with the class weights, multiplied by ``exp(logit_scale)``) stay fp32. With
    ``config.convolutions`` (default) every Conv with constant weights is quantised too, its output
    included (one fixed scale per tensor, from the calibration images, like its input's), with a
    ReLU that alone reads it folded into that output's range: onnxruntime and OpenVINO then run
    integer convolutions (``QLinearConv``) end to end, which is what speeds up a ResNet image tower.

    ``config.weight_rounding`` ``"gptq"`` (default) then rounds the kept file's weights again with
    :func:`round_weights` (GPTQ: each weight's rounding error made up by the weights after it, from
    the calibration inputs), the scales unchanged; the smoothing trial compares strengths with
    nearest rounding, and a file with external data keeps it.

    ``config.reduce_range`` (default) keeps weights within [-64, 64] (7 bits): CPUs without AVX-512
    VNNI multiply uint8 x int8 pairs with ``vpmaddubsw``, whose 16-bit sums saturate for full
    8-bit weights (255 * 127 * 2 > 32767) and then give wrong answers on those machines only.

    Args:
        source: The fp32 ONNX file.
        target: Where to write the quantised file.
        calibration: uint8 images ``(n, H, W, 3)`` at the model's input size, like those it
            will serve (a run's training images, centre-cropped as the runtime does;
            :func:`calibration_images`).
        config: The smoothing strengths to try (``smooth_alphas``: the file whose logits on the
            calibration images change top-1 least often, then move least, against the fp32
            file's, is kept; one value: no trial; files with external data take the first value),
            ``reduce_range`` (7-bit weights, safe on every x86 CPU; ``False``: full 8 bits, for
            VNNI-only deployments) and the calibration batch size.
        input_name: The graph's image input.
        external_data: Write the tensors to a ``<target>.data`` file (models over 2 GB).
        thresholds: A multi-label file's per-label thresholds: the trial and the accuracy-aware
            step count changed label decisions (probability at or above the threshold) in place of
            changed top-1 classes.

    Returns:
        An :class:`Int8Summary`.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    config = config or QuantizationConfig()
    if len(calibration) == 0:
        raise ValueError("int8 calibration needs at least one image")
    model = onnx.load(os.fspath(source), load_external_data=False)
    targets = int8_targets(model, config.convolutions)
    wanted = set(targets)
    products = [n.name for n in model.graph.node if n.name in wanted and n.op_type in PRODUCTS]  # smoothed
    relus, conv_outputs = _conv_tensors(model, targets)
    inputs = [n.input[0] for n in model.graph.node if n.name in wanted]
    del model
    if not targets:
        raise ValueError(f"{source}: no MatMul/Gemm/Conv with constant weights to quantise; export fp32 instead")
    ranges = activation_ranges(source, inputs + conv_outputs, calibration, input_name, config.calibration_batch)

    class OneBatch(CalibrationDataReader):  # quantize_static calibrates once more; the overrides win
        def __init__(self) -> None:
            self.batches = iter([{input_name: np.ascontiguousarray(calibration[:1])}])

        def get_next(self) -> Optional[dict[str, Any]]:
            return next(self.batches, None)

    def quantize(alpha: float, out: Path) -> None:
        smoothed = None
        tensor_ranges = {n: (float(lo.min()), float(hi.max())) for n, (lo, hi) in ranges.items()}
        if alpha:
            model = onnx.load(os.fspath(source))
            tensor_ranges.update(smooth_activations(model, products, ranges, alpha))
            smoothed = out.with_name(f".{out.stem}.smoothed.onnx")
            onnx.save(model, os.fspath(smoothed), save_as_external_data=external_data, location=f"{smoothed.name}.data")
            del model
        overrides = {n: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for n, (lo, hi) in tensor_ranges.items()}
        try:
            _quantize(smoothed or Path(source), out, OneBatch(), targets + relus, overrides, config.reduce_range,
                      external_data, config.convolutions)
            _check_ranged(out, overrides)
        finally:
            if smoothed is not None:
                smoothed.unlink(missing_ok=True)
                smoothed.with_name(f"{smoothed.name}.data").unlink(missing_ok=True)

    alphas = list(config.smooth_alphas)  # checked by the config: distinct, in [0, 1]
    if len(alphas) == 1 or external_data:  # external data files carry their data file's name: no trial copies
        chosen, errors = alphas[0], {}
        quantize(chosen, Path(target))
    else:
        reference = _logits(Path(source), calibration, input_name, config.calibration_batch)
        errors = {}
        for alpha in alphas:
            trial = Path(target).with_name(f".{Path(target).stem}.alpha{alpha:g}.onnx")
            try:
                quantize(alpha, trial)
                got = _logits(trial, calibration, input_name, config.calibration_batch)
                errors[alpha] = (_changed_answers(reference, got, thresholds), float(np.abs(got - reference).mean()))
                if alpha == min(errors, key=errors.__getitem__):
                    os.replace(trial, Path(target))
            finally:
                trial.unlink(missing_ok=True)
        chosen = min(errors, key=errors.__getitem__)
    logger.info("int8: quantised %d products of %s -> %s on %d calibration images (smoothing alpha %g; tried %s)",
                len(targets), source, target, len(calibration), chosen,
                {a: f"{e[0]} top-1 changes, mean |logit diff| {e[1]:.3g}" for a, e in errors.items()} or "no other")
    kept: list[str] = []
    agreement = None
    gptq_rounding = config.weight_rounding == "gptq" and not external_data  # a graph over 2 GB: nearest rounding
    if gptq_rounding or (config.min_agreement > 0 and not external_data):  # (over 2 GB: not editable in memory)
        float_model = onnx.load(os.fspath(source))  # the graph the file was quantised from, smoothed as it was
        if chosen:
            smooth_activations(float_model, products, ranges, chosen)
    if gptq_rounding:  # once, on the strength kept (the trial compares strengths with nearest rounding)
        rounded = round_weights(target, float_model, calibration, config.reduce_range, input_name,
                                config.calibration_batch)
        logger.info("int8: %d of %d weights rounded with GPTQ", rounded, len(targets))
    if config.min_agreement > 0 and not external_data:
        kept, agreement = keep_float_until_agreement(Path(target), float_model, targets, calibration, input_name,
                                                     config.min_agreement, config.calibration_batch, thresholds,
                                                     config.min_estimated_agreement)
    elif config.min_agreement > 0:
        logger.warning("int8: %s has external data; its agreement with fp32 is not tuned (min_agreement ignored)",
                       source)
    convs = sum(1 for name in targets if name not in kept and name not in products)
    return Int8Summary(len(targets) - len(kept), int(len(calibration)), chosen, errors, tuple(kept), agreement, convs)


def _gptq_layout(node: Any, dq: Any, weight: np.ndarray, scale: np.ndarray) -> Optional[int]:
    """The per-channel axis of ``weight`` if :func:`round_weights` can round it: one scale per output
    channel (the rows once that axis comes first), columns in the order of the node's input features
    (a plain 2-D convolution's ``(channel, kh, kw)``, a product's input dimension)."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    axis = axis % max(weight.ndim, 1)
    if scale.ndim != 1 or weight.ndim < 2 or scale.shape[0] != weight.shape[axis]:
        return None
    if node.op_type == "Conv":
        plain = (weight.ndim == 4 and axis == 0 and attrs.get("group", 1) == 1 and all(d == 1 for d in attrs.get("dilations", [1, 1]))
                 and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))
        return axis if plain else None
    if node.op_type == "Gemm" and attrs.get("transA", 0):
        return None
    out_axis = 0 if node.op_type == "Gemm" and attrs.get("transB", 0) else 1  # MatMul / Gemm: B is (in, out) or (out, in)
    return axis if weight.ndim == 2 and axis == out_axis else None


def input_rows(x: np.ndarray, node: Any) -> np.ndarray:
    """The input ``x`` of ``node`` as rows of the features one output value reads (one row per output
    position; a convolution's patches, im2col), float32."""
    from onnx import helper

    if node.op_type != "Conv":
        return x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    patches = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=(2, 3))[:, :, :: strides[0], :: strides[1]]
    return patches.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kernel[0] * kernel[1]).astype(np.float32)


def gptq(weight: np.ndarray, scale: np.ndarray, hessian: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """GPTQ (Frantar et al., 2023) rounding of ``weight`` ``(rows, cols)`` onto the grid
    ``scale[row] * q``, ``q`` in ``[qmin, qmax]``, with ``hessian`` ``(cols, cols)`` the second
    moments of the inputs (``X^T X / n``): the columns are rounded one by one, the largest inputs
    first, and each one's rounding error is spread over the columns not yet rounded, so that the
    layer's outputs on those inputs move least (round-to-nearest leaves each error where it falls).

    Returns:
        The integers ``q`` ``(rows, cols)``, int64.
    """
    w = weight.astype(np.float64, copy=True)
    h = hessian.astype(np.float64, copy=True)
    rows, cols = w.shape
    dead = np.diag(h) <= 0  # never non-zero on the calibration images: rounded to nearest, nothing spread
    h[:, dead] = 0
    h[dead, :] = 0
    h[dead, dead] = 1
    order = np.argsort(-np.diag(h), kind="stable")  # GPTQ's act-order: the largest inputs first
    w, h = w[:, order], h[np.ix_(order, order)]
    h[np.diag_indices(cols)] += GPTQ_DAMPING * float(np.mean(np.diag(h)))
    inverse = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: row j spreads column j's error to the columns after it
    s = scale.astype(np.float64)
    wt = np.ascontiguousarray(w.T)  # (cols, rows): one column per contiguous row
    q = np.zeros((cols, rows), dtype=np.int64)
    for start in range(0, cols, GPTQ_BLOCK):
        stop = min(start + GPTQ_BLOCK, cols)
        block, inv = wt[start:stop].copy(), inverse[start:stop, start:stop]
        errors = np.zeros_like(block)
        for j in range(stop - start):
            q[start + j] = np.clip(np.round(block[j] / s), qmin, qmax)
            errors[j] = (block[j] - q[start + j] * s) / inv[j, j]
            block[j:] -= inv[j, j:, None] * errors[j][None, :]
        wt[stop:] -= inverse[start:stop, stop:].T @ errors
    out = np.empty((rows, cols), dtype=np.int64)
    out[:, order] = q.T
    return out


def round_weights(
    target: Union[str, os.PathLike], float_source: Union[str, os.PathLike, "onnx.ModelProto"], calibration: Any,
    reduce_range: bool, input_name: str = "images", batch_size: int = CALIBRATION_BATCH,
) -> int:
    """Round the int8 weights of the QDQ file ``target`` with :func:`gptq` in place of nearest
    rounding, keeping every scale (the file's speed, format and batch invariance are unchanged).

    Each int8 MatMul / Gemm / plain 2-D Conv gets the second moments of its input as the fp32 graph
    it was quantised from (``float_source``, smoothed as it was) computes it on the ``calibration``
    images, gathered a few layers per pass so that memory stays near :data:`GPTQ_PASS_BYTES`. On
    coopkit-tiny's colored_shapes run (7-bit weights, every product int8) it takes the mean logit
    change against fp32 (centred per image) from 0.066 to 0.043 on the held-out images, about what
    8-bit weights give with nearest rounding.

    Returns:
        The number of weights rounded this way (the others keep nearest rounding: grouped or dilated
        convolutions, and weights with fewer than :data:`GPTQ_ROWS_PER_COLUMN` calibration input rows
        per column).
    """
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.quant_utils import get_qmin_qmax_for_qType

    model = onnx.load(os.fspath(target))
    source = float_source if isinstance(float_source, onnx.ModelProto) else onnx.load(os.fspath(float_source))
    made_by = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    float_nodes = {n.name: n for n in source.graph.node}
    float_inits = {i.name: i for i in source.graph.initializer}
    qmin, qmax = (int(v) for v in get_qmin_qmax_for_qType(onnx.TensorProto.INT8, reduce_range=reduce_range,
                                                           symmetric=True))
    jobs = []  # (node, float node, int8 initializer, scale, axis)
    for node in model.graph.node:
        dq = made_by.get(node.input[1]) if node.op_type in PRODUCTS + ("Conv",) and len(node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or node.name not in float_nodes:
            continue
        was = float_nodes[node.name]
        ints = numpy_helper.to_array(inits[dq.input[0]])
        zero = numpy_helper.to_array(inits[dq.input[2]]) if len(dq.input) > 2 and dq.input[2] in inits else 0
        if ints.dtype != np.int8 or np.any(zero) or dq.input[1] not in inits or was.input[1] not in float_inits:
            continue
        scale = numpy_helper.to_array(inits[dq.input[1]])
        axis = _gptq_layout(was, dq, ints, scale)
        if axis is not None:
            jobs.append((node, was, inits[dq.input[0]], scale, axis))
    per_image = _rows_per_image(source, [was for _, was, *_ in jobs])  # known from the shapes: skip before running
    jobs = [j for j in jobs if _enough_rows(per_image.get(j[1].name, 0) * len(calibration), _columns(j))]
    done = 0
    while jobs:
        batch, size = [], 0
        while jobs and (not batch or size + _columns(jobs[0]) ** 2 * 8 <= GPTQ_PASS_BYTES):
            size += _columns(jobs[0]) ** 2 * 8
            batch.append(jobs.pop(0))
        inputs = list(dict.fromkeys(was.input[0] for _, was, *_ in batch))
        augmented = onnx.ModelProto()
        augmented.CopyFrom(source)
        outputs = {o.name for o in augmented.graph.output}
        augmented.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                      for n in inputs if n not in outputs)
        session = cpu_session(augmented.SerializeToString())
        del augmented
        moments: dict[str, Any] = {}  # X^T X (its scale does not matter: GPTQ and its damping are scale-free)
        for start in range(0, len(calibration), batch_size):
            images = np.ascontiguousarray(calibration[start : start + batch_size])
            values = dict(zip(inputs, session.run(inputs, {input_name: images})))
            for node, was, *_ in batch:
                x = input_rows(values[was.input[0]], was)
                if start == 0 and not _enough_rows(len(x) // len(images) * len(calibration), x.shape[1]):
                    continue  # (shapes the graph did not tell)
                if start == 0 or node.name in moments:
                    moments[node.name] = moments.get(node.name, 0.0) + (x.T @ x).astype(np.float64)
        del session
        for node, was, ints, scale, axis in batch:
            if node.name not in moments:
                continue
            w = numpy_helper.to_array(float_inits[was.input[1]])
            moved = np.moveaxis(w, axis, 0)
            q = gptq(moved.reshape(moved.shape[0], -1), scale, moments[node.name], qmin, qmax)
            q = np.moveaxis(q.reshape(moved.shape), 0, axis).astype(np.int8)
            ints.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(q), ints.name))
            done += 1
    onnx.save(model, os.fspath(target))
    return done


def _enough_rows(rows: int, columns: int) -> bool:
    """Whether ``rows`` calibration input rows (0: unknown, taken as enough) are enough for GPTQ to round a weight of
    ``columns`` input features (:data:`GPTQ_ROWS_PER_COLUMN`)."""
    return rows == 0 or rows >= GPTQ_ROWS_PER_COLUMN * columns


def _rows_per_image(model: "onnx.ModelProto", nodes: Sequence[Any]) -> dict[str, int]:
    """Input rows per image of each MatMul / Gemm / Conv in ``nodes`` (:func:`input_rows`), from the
    graph's inferred shapes: a product's positions (every input dimension but the first and last),
    a convolution's output positions; 0 where a dimension is unknown."""
    dims = _inferred_dims(model)
    out = {}
    for n in nodes:
        shape = dims.get(n.output[0] if n.op_type == "Conv" else n.input[0], [])
        positions = shape[2:] if n.op_type == "Conv" else shape[1:-1]
        out[n.name] = int(np.prod(positions)) if len(shape) >= 2 and all(positions) else 0
    return out


def _inferred_dims(model: "onnx.ModelProto") -> dict[str, list[int]]:
    """Each tensor's dimensions from ONNX shape inference (0 where one is unknown, such as the batch)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}


def _columns(job: tuple[Any, ...]) -> int:
    """The number of input features of a :func:`round_weights` job's weight (its second-moment matrix's side)."""
    ints, axis = job[2], job[4]
    return int(np.prod(ints.dims)) // int(ints.dims[axis])


def _changed_answers(reference: np.ndarray, got: np.ndarray, thresholds: Optional[Sequence[float]]) -> int:
    """Images whose top-1 class changed, or for a multi-label file (``thresholds``) label decisions that changed."""
    if thresholds is None:
        return int((got.argmax(1) != reference.argmax(1)).sum())
    t = np.asarray(thresholds, dtype=np.float32)
    return int(((sigmoid(got) >= t) != (sigmoid(reference) >= t)).sum())


def top1_agreement(reference: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """``(measured, estimated)``: the share of images on which the logits ``got`` keep the top-1
    class of the logits ``reference`` (both ``(n, n_classes)``, the same images).

    ``measured`` counts these images. ``estimated`` pairs every image's fp32 margin (its top-1
    logit minus its runner-up's) with every image's int8 change of that margin (how much the
    runner-up gained on the top class) and counts the share of the ``n x n`` pairs in which the
    margin survives: a few calibration images that all keep their class do not vouch for the
    images the model will serve, and the estimate does (a random-init tiny ViT with close logits,
    64 calibration images: measured 100%, estimated 96.3%; on 300 other images, measured 97.7%,
    and the estimate made on them 97.5%).
    """
    n, classes = reference.shape
    if n == 0 or classes < 2:
        return 1.0, 1.0
    rows = np.arange(n)
    order = np.argsort(reference, axis=1)
    top, runner = order[:, -1], order[:, -2]
    margin = reference[rows, top] - reference[rows, runner]  # (n,) >= 0
    gain = (got[rows, runner] - got[rows, top]) + margin  # (n,): how much the runner-up gained
    measured = float((got.argmax(1) == top).mean())
    estimated = float((gain[None, :] < margin[:, None]).mean())  # (n margins, n gains)
    return measured, estimated


def keep_float(quantised: "onnx.ModelProto", float_model: "onnx.ModelProto", nodes: Iterable[str]) -> "onnx.ModelProto":
    """A copy of the QDQ graph ``quantised`` in which ``nodes`` read their inputs as in
    ``float_model``, the graph it was quantised from (float activation, float weight): what
    quantising without them writes, made without quantising again. An activation that no int8
    node reads any more, and that no int8 convolution writes, is no longer quantised (its other
    readers, such as ``Shape``, read it as they would have); nodes and int8 weights that nothing
    reads any more are dropped.

    Two things of quantised convolutions are kept exact: an int8 convolution's output stays
    quantised (onnxruntime fuses ``DequantizeLinear -> Conv -> QuantizeLinear`` into one integer
    ``QLinearConv`` only while nothing else reads the float output), so a float node reads its
    dequantised value; and a ReLU the quantiser folded into a convolution (its zero became the
    quantisation's clamp) is put back where a float node reads that convolution's float output."""
    import onnx
    import onnx.numpy_helper
    from onnx import helper

    model = onnx.ModelProto()
    model.CopyFrom(quantised)
    originals = {n.name: n for n in float_model.graph.node}
    float_made_by = {o: n for n in float_model.graph.node for o in n.output}
    weights = {i.name: i for i in float_model.graph.initializer}
    present = {i.name for i in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    wanted = set(nodes)
    made_by = {o: n for n in model.graph.node for o in n.output}

    def quantised_weight(node: Any) -> bool:
        weight = made_by.get(node.input[1]) if len(node.input) > 1 else None
        return weight is not None and weight.op_type == "DequantizeLinear"

    def int8_conv(node: Optional[Any]) -> bool:
        return node is not None and node.op_type == "Conv" and node.name not in wanted and quantised_weight(node)

    dequantising = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    dequantised = {  # an int8 convolution's output -> the DequantizeLinear output its readers read
        q.input[0]: dequantising[q.output[0]] for q in model.graph.node
        if q.op_type == "QuantizeLinear" and q.output[0] in dequantising and int8_conv(made_by.get(q.input[0]))}
    relus: dict[str, str] = {}

    def as_float(name: str) -> str:
        """The tensor a float reader of ``name`` (a name of ``float_model``) reads in the new graph."""
        if name in dequantised:
            return dequantised[name]
        maker, was = made_by.get(name), float_made_by.get(name)
        if was is None or was.op_type != "Relu" or maker is None or maker.op_type == "Relu":
            return name
        if name not in relus:  # a folded ReLU: put it back for float readers
            relus[name] = f"{name}.float_relu"
            at = list(model.graph.node).index(maker) + 1
            model.graph.node.insert(at, helper.make_node("Relu", [name], [relus[name]], name=f"{was.name}.float"))
        return relus[name]

    initializers = {i.name for i in model.graph.initializer}
    for node in list(model.graph.node):
        if node.name in wanted:
            del node.input[:]
            for name in originals[node.name].input:
                if name in weights and name in present and name not in initializers:
                    # the quantiser replaced this float weight by a node of the same name (a bias
                    # dequantised from int32, rounded to the int8 product's scale): the float node
                    # reads the float values, under a name of their own
                    floats = f"{name}.float"
                    if floats not in present:
                        model.graph.initializer.append(onnx.numpy_helper.from_array(
                            onnx.numpy_helper.to_array(weights[name]), floats))
                        present.add(floats)
                    node.input.append(floats)
                    continue
                node.input.append(as_float(name))
                if name in weights and name not in present:
                    model.graph.initializer.append(weights[name])
                    present.add(name)
    made_by = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def int8_node(node: Any) -> bool:
        return node.op_type in PRODUCTS + ("Conv",) and quantised_weight(node)

    for dq in list(model.graph.node):
        q = made_by.get(dq.input[0]) if dq.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear" or any(int8_node(r) for r in readers.get(dq.output[0], [])):
            continue
        if int8_conv(made_by.get(q.input[0])):  # an int8 convolution's output stays int8
            continue
        back = as_float(q.input[0])
        for reader in readers.get(dq.output[0], []):  # the activation goes back to float for all its readers
            reader.input[:] = [back if name == dq.output[0] else name for name in reader.input]
    _drop_unread(model)
    return model


def _drop_unread(model: "onnx.ModelProto") -> None:
    """Remove nodes whose outputs nothing reads (repeatedly) and initializers nothing reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [k for k, n in enumerate(graph.node) if not any(o in read for o in n.output)]
        if not dead:
            break
        for k in reversed(dead):
            del graph.node[k]
    read = {i for n in graph.node for i in n.input} | outputs
    keep = [i for i in graph.initializer if i.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def keep_float_until_agreement(
    target: Path, float_model: "onnx.ModelProto", targets: Sequence[str], calibration: Any,
    input_name: str = "images", min_agreement: float = MIN_AGREEMENT, batch_size: int = CALIBRATION_BATCH,
    thresholds: Optional[Sequence[float]] = None, min_estimated: float = MIN_ESTIMATED_AGREEMENT,
) -> tuple[list[str], tuple[float, float]]:
    """Accuracy-aware int8, as Intel Neural Compressor tunes it: keep the products that move the
    answers most in fp32 until at least ``min_agreement`` of the calibration images keep fp32's
    top-1 class and :func:`top1_agreement` estimates that at least ``min_estimated`` of other
    images will (32 calibration images of the embedded colors task all agreed while 1.25% of 400
    held-out images changed class, as the estimate, 98.4%, foretold); rewrites ``target`` when
    some are kept.

    Each product's sensitivity is measured alone: the file with only that product in int8
    (:func:`keep_float` on the others), its logits' distance to fp32's (centred per image: a shift
    of every class moves no answer) on the calibration images with the smallest fp32 margins (at
    most :data:`SENSITIVITY_IMAGES`). The most sensitive are then kept in fp32, as few as hold the
    agreement (doubling, then halving the interval). fp32 products keep the file
    batch-invariant: every remaining int8 product keeps its fixed activation scale.

    Args:
        target: The int8 file (QDQ) written from ``float_model``.
        float_model: The fp32 graph it was quantised from (smoothed as it was).
        targets: The quantised products.
        calibration: uint8 images ``(n, H, W, 3)``.
        thresholds: A multi-label file's per-label thresholds: the agreement is that of the
            (image, label) decisions (:func:`~coopkit.exporters.verify.label_agreement`), the
            closest calls are the decisions nearest their threshold, and distances are not centred
            (a shift of every logit moves a sigmoid's answers).

    Returns:
        The products kept in fp32 (most sensitive first) and the file's ``(measured, estimated)``
        agreement.
    """
    import onnx

    def logits(model: Any, images: Any) -> np.ndarray:
        return _logits(model.SerializeToString(), images, input_name, batch_size)

    def agreeing(reference: np.ndarray, got: np.ndarray) -> tuple[float, float]:
        return top1_agreement(reference, got) if thresholds is None else label_agreement(reference, got, thresholds)

    calibration = np.asarray(calibration)  # (n, H, W, 3) uint8
    reference = logits(float_model, calibration)
    quantised = onnx.load(os.fspath(target))
    first = agreement = agreeing(reference, logits(quantised, calibration))

    def enough(got: tuple[float, float]) -> bool:
        return got[0] >= min_agreement and got[1] >= min_estimated

    if enough(agreement):
        return [], agreement
    if thresholds is None:
        ordered = np.sort(reference, axis=1)
        closeness = ordered[:, -1] - ordered[:, -2]  # (n,): top-1 margin
    else:
        t = np.asarray(thresholds, dtype=np.float32)
        closeness = np.abs(sigmoid(reference) - t).min(1)  # (n,): the decision nearest its threshold
    hard = np.argsort(closeness)[:SENSITIVITY_IMAGES]  # the closest calls
    centre = thresholds is None  # a shift of every class moves no softmax answer, but moves sigmoids
    want = reference[hard] - (reference[hard].mean(1, keepdims=True) if centre else 0.0)

    def distance(model: Any) -> float:
        got = logits(model, calibration[hard])
        return float(np.square(got - (got.mean(1, keepdims=True) if centre else 0.0) - want).mean())

    alone = {name: distance(keep_float(quantised, float_model, [t for t in targets if t != name])) for name in targets}
    order = sorted(targets, key=lambda name: -alone[name])  # the largest error of its own first

    def trial(k: Union[int, Sequence[str]]) -> tuple[Any, tuple[float, float]]:
        model = keep_float(quantised, float_model, order[:k] if isinstance(k, int) else k)
        return model, agreeing(reference, logits(model, calibration))

    failing, k = 0, 1
    while True:
        model, got = trial(k)
        if enough(got) or k == len(order):
            break
        failing, k = k, min(2 * k, len(order))
    best = (k, model, got)
    while best[0] - failing > 1:
        mid = (failing + best[0]) // 2
        model, got = trial(mid)
        if enough(got):
            best = (mid, model, got)
        else:
            failing = mid
    k, model, agreement = best
    kept = order[:k]
    if enough(agreement) and k > 1:
        # the fewest most-sensitive products that hold the bars, then each of them, the costliest first,
        # back in int8 if the bars still hold without it (Neural Compressor's fallback, by cost)
        cost = _product_costs(float_model, kept)
        for name in sorted(kept, key=lambda n: -cost[n]):
            fewer = [n for n in kept if n != name]
            if not fewer:
                break
            candidate, got = trial(fewer)
            if enough(got):
                kept, model, agreement = fewer, candidate, got
    onnx.save(model, os.fspath(target))
    log = logger.info if enough(agreement) else logger.warning
    log("int8: %d of %d products kept in fp32 for the calibration images to agree with fp32: %.2f%% measured, %.2f%% "
        "estimated (all int8: %.2f%%, %.2f%%; wanted %.2f%%, %.2f%%)", len(kept), len(order), 100 * agreement[0],
        100 * agreement[1], 100 * first[0], 100 * first[1], 100 * min_agreement, 100 * min_estimated)
    return kept, agreement


def _product_costs(model: "onnx.ModelProto", names: Sequence[str]) -> dict[str, float]:
    """Multiply-adds per image of each named MatMul / Gemm / Conv (weight elements x output positions),
    from the model's inferred shapes (an unknown dimension, such as the batch, counts 1)."""
    dims = {name: [d or 1 for d in shape] for name, shape in _inferred_dims(model).items()}
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    wanted, out = set(names), {}
    for n in model.graph.node:
        if n.name not in wanted:
            continue
        w = weights.get(n.input[1], []) if len(n.input) > 1 else []
        shape = dims.get(n.output[0], [])
        if n.op_type == "Conv":  # (out_ch, in_ch / groups, kh, kw) per output position (n, out_ch, h, w)
            out[n.name] = float(np.prod(w)) * float(np.prod(shape[2:]) if len(shape) > 2 else 1)
        else:  # (in, out) weights once per output row
            out[n.name] = float(np.prod(w)) * float(np.prod(shape[:-1]) if len(shape) > 1 else 1)
    return {name: out.get(name, 0.0) for name in names}


def _logits(model: Union[Path, bytes], images: Any, input_name: str, batch_size: int = CALIBRATION_BATCH) -> Any:
    """The graph's first output (``logits`` for coopkit's image graphs) on ``images``, on the CPU
    (``model``: a path or a serialised model)."""
    session = cpu_session(model)
    name = session.get_outputs()[0].name
    return np.concatenate([session.run([name], {input_name: np.ascontiguousarray(images[i : i + batch_size])})[0]
                           for i in range(0, len(images), batch_size)])


def _check_ranged(target: Path, overrides: dict[str, Any]) -> None:
    """Every activation the file quantises has its range from all calibration images (``overrides``):
    one the quantiser calibrated alone (on one image) would be a wrong fixed scale."""
    import onnx

    model = onnx.load(os.fspath(target), load_external_data=False)
    constants = {i.name for i in model.graph.initializer}
    alone = sorted({n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"} - constants - set(overrides))
    if alone:
        raise RuntimeError(f"int8: activations quantised without a calibrated range: {', '.join(alone[:5])}")


def _quantize(source: Path, target: Path, reader: Any, targets: list[str], overrides: dict[str, Any],
              reduce_range: bool, external_data: bool, convolutions: bool = False) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with _without_preprocessing_advice():
        quantize_static(
            source,
            target,
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(PRODUCTS) + (["Conv", "Relu"] if convolutions else []),
            nodes_to_quantize=targets,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=external_data,
            extra_options={
                "OpTypesToExcludeOutputQuantization": list(PRODUCTS),  # float outputs: MatMulIntegerToFloat
                "TensorQuantOverrides": overrides,  # the ranges over every calibration image
            },
        )
