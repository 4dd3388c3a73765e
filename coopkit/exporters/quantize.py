"""Precision variants of an exported fp32 graph: fp16 (GPU) and calibrated static int8 (CPU).

Both keep the graph's interface (uint8 ``images`` in, float32 outputs) and keep the parts
where precision matters in fp32: the input normalisation, the head (L2 normalisation, the
product with the class weights, softmax) and, for fp16, every LayerNorm, Softmax and
reduction. Node names of the head and the input normalisation start with ``/head/`` and
``/encoder/`` followed by an op name (see :class:`coopkit.exporters.graphs.ImageGraph`).
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence, Union

from .verify import cpu_session

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

#: Ops kept in fp32 in the fp16 variant (numerically sensitive: variance, exp, sums of squares).
FP16_KEEP_OPS = (
    "LayerNormalization",
    "Softmax",
    "ReduceL2",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "Pow",
    "Sqrt",
    "Exp",
    "Erf",
)

#: How much of the activations' per-channel outliers the int8 export may move into the weights before
#: fixing the activations' scales (SmoothQuant's alpha; 0.5 is its paper's default, 0 is none):
#: each is tried and the one closest to fp32 on the calibration images is kept.
SMOOTH_ALPHA = 0.5
SMOOTH_ALPHAS = (0.0, SMOOTH_ALPHA)

#: Node-name prefixes kept in full precision in every variant.
FULL_PRECISION_PREFIXES = ("/head/",)
_ENCODER_OWN = re.compile(r"^/encoder/[^/]+$")


def _full_precision_nodes(model: "onnx.ModelProto", prefixes: Iterable[str]) -> list[str]:
    """Names of the nodes that stay fp32: the head, plus the uint8 -> normalised input steps."""
    prefixes = tuple(prefixes)
    keep = [n.name for n in model.graph.node if n.name.startswith(prefixes)]
    # the input normalisation: nodes directly in /encoder/ (Cast, Div, Sub, Transpose, the last
    # Cast), not those of the open_clip model inside it (/encoder/visual/...)
    keep += [n.name for n in model.graph.node if _ENCODER_OWN.match(n.name)]
    return keep


#: Ops whose output has the precision of their (single) float data input: no Casts around them.
_FOLLOWERS = frozenset(
    {"Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Expand", "Shape", "Size"}
)
_FLOAT, _FLOAT16 = 1, 10  # onnx.TensorProto.FLOAT, FLOAT16


def to_fp16(model: "onnx.ModelProto", keep_ops: Iterable[str] = FP16_KEEP_OPS) -> "onnx.ModelProto":
    """Half-precision copy of an fp32 graph: inputs, outputs and sensitive parts stay fp32.

    Each node runs in fp16 unless its op is in ``keep_ops`` or it belongs to the head or the
    input normalisation; data-movement ops (reshape, transpose, gather, ...) follow their input.
    Float weights and constants are stored in fp16 when only fp16 nodes read them. A Cast is
    inserted wherever a value crosses between the two precisions (one per value and direction).

    (A small converter of our own: onnxconverter-common and onnxruntime's copy of it produced
    invalid graphs for these models, and onnxruntime's CPU layout optimiser crashed on them.)
    """
    import onnx
    from onnx import helper, numpy_helper

    keep_ops = frozenset(keep_ops)
    keep_nodes = set(_full_precision_nodes(model, FULL_PRECISION_PREFIXES))
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    types = _value_types(model)

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == _FLOAT

    nodes = list(graph.node)
    mode: list[str] = []
    for node in nodes:
        floats = [x for x in [*node.input, *node.output] if is_float(x)]
        if node.op_type in _FOLLOWERS:
            mode.append("follow")
        elif not floats and not (node.op_type == "Cast" and _attr(node, "to") == _FLOAT):
            mode.append("none")
        elif node.name in keep_nodes or node.op_type in keep_ops:
            mode.append("fp32")
        else:
            mode.append("fp16")

    # constants (initializers and Constant nodes): fp16 only when every reader is an fp16 node
    readers: dict[str, set[str]] = {}
    for node, m in zip(nodes, mode):
        for x in node.input:
            readers.setdefault(x, set()).add(m)
    outputs = {o.name for o in graph.output}

    def store_fp16(name: str) -> bool:
        r = readers.get(name, set()) - {"none"}
        return bool(r) and r <= {"fp16", "follow"} and "fp16" in r and name not in outputs

    precision: dict[str, str] = {}
    for init in graph.initializer:
        if init.data_type == _FLOAT:
            if store_fp16(init.name):
                init.CopyFrom(numpy_helper.from_array(_half(numpy_helper.to_array(init)), init.name))
                precision[init.name] = "fp16"
            else:
                precision[init.name] = "fp32"
    for inp in graph.input:
        if is_float(inp.name):
            precision[inp.name] = "fp32"

    casts: dict[tuple[str, str], str] = {}
    new_nodes = []

    def cast(name: str, to: str) -> str:
        key = (name, to)
        if key not in casts:
            target = f"{name}__to_{to}"
            new_nodes.append(
                helper.make_node("Cast", [name], [target], name=f"{name}__cast_{to}", to=_FLOAT16 if to == "fp16" else _FLOAT)
            )
            casts[key] = target
        return casts[key]

    for node, m in zip(nodes, mode):
        if node.op_type == "Constant" and node.output and is_float(node.output[0]):
            m = "fp16" if store_fp16(node.output[0]) else "fp32"
            if m == "fp16":
                value = next(a for a in node.attribute if a.name == "value")
                value.t.CopyFrom(numpy_helper.from_array(_half(numpy_helper.to_array(value.t)), value.t.name))
        if m == "follow":
            data = [x for x in node.input if is_float(x)]
            m = precision.get(data[0], "fp32") if data else "none"
        if m in ("fp16", "fp32"):
            for i, x in enumerate(node.input):
                if is_float(x) and precision.get(x, "fp32") != m:
                    node.input[i] = cast(x, m)
            if m == "fp16":
                for a in node.attribute:
                    if node.op_type == "Cast" and a.name == "to" and a.i == _FLOAT:
                        a.i = _FLOAT16
                    elif node.op_type == "ConstantOfShape" and a.name == "value" and a.t.data_type == _FLOAT:
                        a.t.CopyFrom(numpy_helper.from_array(_half(numpy_helper.to_array(a.t)), a.t.name))
        for o in node.output:
            if is_float(o) or (node.op_type == "Cast" and _attr(node, "to") == _FLOAT and o):
                precision[o] = m if m in ("fp16", "fp32") else "fp32"
        new_nodes.append(node)

    # graph outputs stay fp32
    for o in graph.output:
        if types.get(o.name) == _FLOAT and precision.get(o.name) == "fp16":
            raise RuntimeError(f"fp16 conversion left graph output {o.name!r} in fp16; keep its producer in fp32")
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]  # stale float32 annotations; onnxruntime infers them again
    topological_sort(graph)
    logger.info(
        "fp16: %d of %d nodes in fp16, %d casts inserted",
        sum(1 for m in mode if m == "fp16"), len(nodes), len(casts),
    )
    return out


def _attr(node: Any, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return a.i
    return None


def _half(array: Any) -> Any:
    import numpy as np

    limit = float(np.finfo(np.float16).max)
    return np.clip(array, -limit, limit).astype(np.float16)


def _value_types(model: "onnx.ModelProto") -> dict[str, int]:
    """Element type of every value in the graph (after onnx shape inference)."""
    import onnx

    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for init in skeleton.graph.initializer:  # only types matter: drop the data (models over 2 GB)
        if init.raw_data:
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.DEFAULT
    inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False)
    types: dict[str, int] = {}
    g = inferred.graph
    for v in [*g.input, *g.value_info, *g.output]:
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    missing = [o for n in model.graph.node for o in n.output if o and o not in types]
    if missing:
        raise RuntimeError(f"cannot infer the element type of {len(missing)} values (e.g. {missing[0]!r}); fp16 needs them")
    return types


def topological_sort(graph: "onnx.GraphProto") -> None:
    """Reorder ``graph.node`` in place so that every node comes after the producers of its inputs
    (stable where the data flow allows; onnx.checker requires the order)."""
    produced_by: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for out in node.output:
            if out:
                produced_by[out] = i
    nodes = list(graph.node)
    deps = [{produced_by[x] for x in node.input if x in produced_by and produced_by[x] != i} for i, node in enumerate(nodes)]
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    remaining = [len(d) for d in deps]
    ready = [i for i, r in enumerate(remaining) if r == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users.get(i, []):
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise RuntimeError("the converted graph has a cycle; cannot order its nodes")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


#: int8 calibration: images fed per calibration batch (the ranges do not depend on it).
CALIBRATION_BATCH = 8


def int8_targets(model: "onnx.ModelProto") -> list[str]:
    """The nodes the int8 variant quantises: every MatMul / Gemm whose weight operand is a
    constant, outside the full-precision parts (the head and the input normalisation).

    Products of two activations (attention's ``q k^T`` and ``softmax v``) stay fp32."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    keep = set(_full_precision_nodes(model, FULL_PRECISION_PREFIXES))
    return [
        n.name for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in constants and n.name not in keep
    ]


def activation_ranges(
    source: Union[str, os.PathLike], tensors: Iterable[str], images: Any, input_name: str = "images",
    batch_size: int = CALIBRATION_BATCH,
) -> dict[str, tuple[Any, Any]]:
    """Smallest and largest value each float tensor takes on ``images`` (uint8 batches through
    onnxruntime on the CPU), per channel (the last axis), computed batch by batch so memory stays
    that of one batch. ``lo.min(), hi.max()`` is the tensor's range.

    (onnxruntime's own calibrator keeps every batch's tensors until the end, and its option
    to bound that, ``CalibMaxIntermediateOutputs``, drops the data it clears in 1.31.)"""
    import numpy as np
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
    import numpy as np
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
    *,
    input_name: str = "images",
    reduce_range: bool = True,
    external_data: bool = False,
    smooth_alphas: Sequence[float] = SMOOTH_ALPHAS,
) -> dict[str, Any]:
    """Static int8 quantisation (QDQ), calibrated: the same answer for an image in any batch.

    Every MatMul / Gemm with a constant weight operand (:func:`int8_targets`) gets int8
    weights with one symmetric scale per output channel and uint8 inputs with ONE fixed scale
    and zero point per tensor, from the range that tensor takes on the ``calibration`` images
    (onnxruntime's MinMax calibration). Fixed activation scales are what makes the file
    batch-invariant: dynamic quantisation computes them over the whole batch at run time, so an
    image's logits depend on the images beside it. Outputs of the quantised products stay
    float (onnxruntime runs ``QuantizeLinear`` + ``MatMulIntegerToFloat``); attention's
    activation-activation products, LayerNorm, softmax, the input normalisation and the head
    (``x W^T`` with the class weights, multiplied by ``exp(logit_scale)``) stay fp32.

    ``reduce_range`` (default) keeps weights within [-64, 64] (7 bits): CPUs without AVX-512
    VNNI multiply uint8 x int8 pairs with ``vpmaddubsw``, whose 16-bit sums saturate for full
    8-bit weights (255 * 127 * 2 > 32767) and then give wrong answers on those machines only.

    Args:
        source: The fp32 ONNX file.
        target: Where to write the quantised file.
        calibration: uint8 images ``(n, H, W, 3)`` at the model's input size, like those it
            will serve (a run's training images, centre-cropped as the runtime does).
        input_name: The graph's image input.
        reduce_range: 7-bit weights (safe on every x86 CPU); ``False``: full 8 bits, for
            VNNI-only deployments.
        external_data: Write the tensors to a ``<target>.data`` file (models over 2 GB).
        smooth_alphas: Strengths of the outlier smoothing (:func:`smooth_activations`; 0: the
            graph as it is) to try: the file whose logits on the calibration images change
            top-1 least often, then move least, against the fp32 file's, is kept (one value:
            no trial; files with external data take the first value).

    Returns:
        ``{"int8_nodes": quantised products, "calibration_images": n, "int8_smoothing": alpha}``.
    """
    import numpy as np
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    if len(calibration) == 0:
        raise ValueError("int8 calibration needs at least one image")
    model = onnx.load(os.fspath(source), load_external_data=False)
    targets = int8_targets(model)
    wanted = set(targets)
    inputs = [n.input[0] for n in model.graph.node if n.name in wanted]
    del model
    if not targets:
        raise ValueError(f"{source}: no MatMul/Gemm with constant weights to quantise; export fp32 instead")
    ranges = activation_ranges(source, inputs, calibration, input_name)

    class OneBatch(CalibrationDataReader):  # quantize_static calibrates once more; the overrides win
        def __init__(self) -> None:
            self.batches = iter([{input_name: np.ascontiguousarray(calibration[:1])}])

        def get_next(self) -> Optional[dict[str, Any]]:
            return next(self.batches, None)

    def quantize(alpha: float, out: Path) -> None:
        smoothed = None
        if alpha:
            model = onnx.load(os.fspath(source))
            tensor_ranges = smooth_activations(model, targets, ranges, alpha)
            smoothed = out.with_name(f".{out.stem}.smoothed.onnx")
            onnx.save(model, os.fspath(smoothed), save_as_external_data=external_data, location=f"{smoothed.name}.data")
            del model
        else:
            tensor_ranges = {n: (float(lo.min()), float(hi.max())) for n, (lo, hi) in ranges.items()}
        overrides = {n: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}] for n, (lo, hi) in tensor_ranges.items()}
        try:
            _quantize(smoothed or Path(source), out, OneBatch(), targets, overrides, reduce_range, external_data)
        finally:
            if smoothed is not None:
                smoothed.unlink(missing_ok=True)
                smoothed.with_name(f"{smoothed.name}.data").unlink(missing_ok=True)

    alphas = [float(a) for a in dict.fromkeys(smooth_alphas)]
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise ValueError(f"smooth_alphas must be one or more numbers in [0, 1], got {smooth_alphas!r}")
    if len(alphas) == 1 or external_data:  # external data files carry their data file's name: no trial copies
        chosen, errors = alphas[0], {}
        quantize(chosen, Path(target))
    else:
        reference = _logits(Path(source), calibration, input_name)
        errors = {}
        for alpha in alphas:
            trial = Path(target).with_name(f".{Path(target).stem}.alpha{alpha:g}.onnx")
            try:
                quantize(alpha, trial)
                got = _logits(trial, calibration, input_name)
                errors[alpha] = (int((got.argmax(1) != reference.argmax(1)).sum()), float(np.abs(got - reference).mean()))
                if alpha == min(errors, key=errors.__getitem__):
                    os.replace(trial, Path(target))
            finally:
                trial.unlink(missing_ok=True)
        chosen = min(errors, key=errors.__getitem__)
    logger.info("int8: quantised %d products of %s -> %s on %d calibration images (smoothing alpha %g; tried %s)",
                len(targets), source, target, len(calibration), chosen,
                {a: f"{e[0]} top-1 changes, mean |logit diff| {e[1]:.3g}" for a, e in errors.items()} or "no other")
    return {"int8_nodes": len(targets), "calibration_images": int(len(calibration)), "int8_smoothing": chosen}


def _logits(path: Path, images: Any, input_name: str) -> Any:
    """The graph's first output (``logits`` for coopkit's image graphs) on ``images``, on the CPU."""
    import numpy as np

    session = cpu_session(path)
    name = session.get_outputs()[0].name
    return np.concatenate([session.run([name], {input_name: np.ascontiguousarray(images[i : i + CALIBRATION_BATCH])})[0]
                           for i in range(0, len(images), CALIBRATION_BATCH)])


def _quantize(source: Path, target: Path, reader: Any, targets: list[str], overrides: dict[str, Any],
              reduce_range: bool, external_data: bool) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with _without_preprocessing_advice():
        quantize_static(
            source,
            target,
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_quantize=targets,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=external_data,
            extra_options={
                "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],  # float outputs: MatMulIntegerToFloat
                "TensorQuantOverrides": overrides,  # the ranges over every calibration image
            },
        )
