"""The preprocessing of a raw-input export, as ONNX: a decoded uint8 image in, open_clip's crop out.

A raw-input file (``coopkit export --raw-input``) takes ``images`` as decoded uint8 RGB images of
any height and width, ``(batch, height, width, 3)`` (the images of one run share one size), and
does in the graph what :func:`coopkit.runtime.preprocess.resize_and_crop` does with Pillow,
following the same :func:`~coopkit.runtime.preprocess.resize_plan`:

1. the target size, computed from the input's shape with torchvision's and open_clip's
   arithmetic (``shortest_edge``: ``size * long // short`` in int64; ``keep_ratio_*``: the ratios
   in float64 and ``Round``, which rounds half to even like Python's ``round``);
2. Pillow's resampling: two one-axis ``Resize`` passes (opset 18: ``antialias=1``,
   ``exclude_outside=1``, ``cubic_coeff_a=-0.5``, ``half_pixel``) on the uint8 image itself,
   with a uint8 image between them, in Pillow's order (:func:`_resample_graph`). Measured: at
   most 1-2 grey levels from Pillow, over 99% of the values identical; one two-axis ``Resize``
   drifts by up to 22 levels (float32: 26) wherever a cubic overshoot is clipped, and
   ``keep_aspect_ratio_policy`` rounds sizes differently from torchvision. The resize sits in
   an ``If`` and is skipped when the image already has the target size, as torchvision does; so
   a crop at ``image_size`` passes through unchanged, which is how the runtime feeds a raw file
   on CUDA (see :mod:`coopkit.runtime.classifier`) and why an older runtime that feeds crops still
   gets the right answers;
3. the centre pad (``fill``) and crop with torchvision's offsets (``Round((padded - crop) / 2)``).

The result, ``uint8 (batch, h, w, 3)``, feeds the unchanged image graph (normalisation, encoder,
head), so fp16 and int8 variants are made exactly as for cropped files, and the preprocessing
stays uint8 in every precision. Every raw-input export is verified against the Pillow path
(:func:`coopkit.exporters.verify.verify_raw_input`). Needs ``onnx`` only (no torch).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

from coopkit.runtime.contract import INPUT_NAME, ModelMetadata
from coopkit.runtime.preprocess import ResizePlan, resize_plan

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

#: The first opset whose ``Resize`` has ``antialias`` (Pillow-style downscaling).
RAW_INPUT_OPSET = 18
#: onnxruntime ``Resize`` modes of the filters a raw-input graph reproduces. Pillow's
#: ``NEAREST`` picks source pixels with a float64 rule that ``Resize`` (float32) misses on
#: some rows (measured: one row or column in four test sizes), and open_clip never uses it.
ONNX_RESIZE_MODES = {"bicubic": "cubic", "bilinear": "linear"}
#: The value linking the preprocessing to the image graph: the crop ``uint8 (batch, h, w, 3)``.
CROP_NAME = "/preprocess/crop"
_P = "/preprocess/"


def check_raw_input_supported(meta: ModelMetadata) -> ResizePlan:
    """The resize plan of ``meta``, or a ValueError when a graph cannot reproduce it."""
    plan = resize_plan(meta.image_size, meta.resize_mode, meta.interpolation, meta.fill_color)
    if plan.interpolation not in ONNX_RESIZE_MODES:
        raise ValueError(
            f"raw input needs a bicubic or bilinear resize (open_clip's); this model resizes with "
            f"{plan.interpolation!r}: export without --raw-input"
        )
    if plan.fill is not None and not 0 <= plan.fill <= 255:
        raise ValueError(f"fill_color must be a grey level 0-255 for a raw-input graph, got {plan.fill}")
    return plan


def _const(nodes: list, name: str, values: list, dtype: int, shape: Optional[list] = None) -> str:
    """Append a Constant node ``/preprocess/<name>``; returns its output name."""
    from onnx import helper

    dims = [len(values)] if shape is None else shape
    nodes.append(helper.make_node("Constant", [], [_P + name], value=helper.make_tensor(_P + name, dtype, dims, values)))
    return _P + name


def _target_size(hw: str, nodes: list, plan: ResizePlan, target: tuple[int, int]) -> str:
    """Append nodes computing the resized ``(h, w)`` (int64 ``(2,)``) from ``hw``; returns its name."""
    from onnx import TensorProto, helper

    if plan.rule == "exact":
        return _const(nodes, "size", [target[0], target[1]], TensorProto.INT64)
    if plan.rule == "shortest_edge":
        # torchvision: short side -> size, long side int(size * long / short); for the short side
        # size * short // short == size, so one integer division gives both (exact in int64)
        size = _const(nodes, "edge", [target[0]], TensorProto.INT64)
        nodes += [
            helper.make_node("ReduceMin", [hw], [_P + "short"], keepdims=1),  # (1,)
            helper.make_node("Mul", [hw, size], [_P + "scaled"]),  # (2,)
            helper.make_node("Div", [_P + "scaled", _P + "short"], [_P + "size"]),  # (2,) int64: floor
        ]
        return _P + "size"
    # open_clip ResizeKeepRatio: ratio = max or min of (h / th, w / tw); size = round(side / ratio),
    # in float64 as Python computes it, Round half to even as Python's round; at least 1
    reduce = "ReduceMax" if plan.rule == "keep_ratio_longest" else "ReduceMin"
    tgt = _const(nodes, "target", [float(target[0]), float(target[1])], TensorProto.DOUBLE)
    one = _const(nodes, "one", [1], TensorProto.INT64)
    nodes += [
        helper.make_node("Cast", [hw], [_P + "hw_f64"], to=TensorProto.DOUBLE),  # (2,)
        helper.make_node("Div", [_P + "hw_f64", tgt], [_P + "ratios"]),  # (2,)
        helper.make_node(reduce, [_P + "ratios"], [_P + "ratio"], keepdims=1),  # (1,)
        helper.make_node("Div", [_P + "hw_f64", _P + "ratio"], [_P + "scaled"]),  # (2,)
        helper.make_node("Round", [_P + "scaled"], [_P + "rounded"]),
        helper.make_node("Cast", [_P + "rounded"], [_P + "size_raw"], to=TensorProto.INT64),
        helper.make_node("Max", [_P + "size_raw", one], [_P + "size"]),  # (2,)
    ]
    return _P + "size"


def _branch(name: str, nodes: list, output: str) -> "onnx.GraphProto":
    """A subgraph of an ``If`` (no inputs: it reads the outer values) with one uint8 output."""
    from onnx import TensorProto, helper

    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(output, TensorProto.UINT8, None)])


def _resample_graph(plan: ResizePlan, size: str, vertical_first_rule: bool) -> "onnx.GraphProto":
    """Pillow's resampling as two one-axis ``Resize`` passes with a uint8 image between them.

    Pillow resamples one axis, rounds and clips to uint8, then resamples the other; cubic
    overshoot clipped in between is why one two-axis ``Resize`` drifts by up to ~20 grey levels.
    Pillow up to 12 always goes horizontal first; Pillow 13 goes vertical first when the height
    shrinks by more than twice as many pixels as the width (``vertical_first_rule``).
    """
    from onnx import TensorProto, helper

    attrs = dict(mode=ONNX_RESIZE_MODES[plan.interpolation], antialias=1, exclude_outside=1, cubic_coeff_a=-0.5,
                 coordinate_transformation_mode="half_pixel")

    def passes(tag: str, order: tuple[str, str]) -> list:
        axis = {"rows": (1, _P + "new_h"), "columns": (2, _P + "new_w")}
        nodes, current = [], INPUT_NAME
        for i, which in enumerate(order):
            out = f"{_P}{tag}_{which}"
            nodes.append(helper.make_node("Resize", [current, "", "", axis[which][1]], [out],
                                          name=f"{_P}Resize_{tag}_{which}", axes=[axis[which][0]], **attrs))
            current = out  # (b, h', w', 3) uint8 after each pass
        return nodes

    split = helper.make_node("Split", [size], [_P + "new_h", _P + "new_w"], axis=0, num_outputs=2)  # (1,), (1,)
    if not vertical_first_rule:
        body = passes("h_first", ("columns", "rows"))
        return _branch("resample", [split, *body], body[-1].output[0])
    two = helper.make_tensor(_P + "two_i64", TensorProto.INT64, [1], [2])
    zero = helper.make_tensor(_P + "zero_i64", TensorProto.INT64, [1], [0])
    h_first = passes("h_first", ("columns", "rows"))
    v_first = passes("v_first", ("rows", "columns"))
    rule = [
        split,
        helper.make_node("Sub", [_P + "hw", size], [_P + "shrink"]),  # (2,): rows, columns removed
        helper.make_node("Split", [_P + "shrink"], [_P + "shrink_h", _P + "shrink_w"], axis=0, num_outputs=2),
        helper.make_node("Constant", [], [_P + "two_i64"], value=two),
        helper.make_node("Constant", [], [_P + "zero_i64"], value=zero),
        helper.make_node("Mul", [_P + "shrink_w", _P + "two_i64"], [_P + "twice_shrink_w"]),
        helper.make_node("Greater", [_P + "shrink_h", _P + "zero_i64"], [_P + "shrinks_h"]),
        helper.make_node("Greater", [_P + "shrink_h", _P + "twice_shrink_w"], [_P + "shrinks_h_more"]),
        helper.make_node("And", [_P + "shrinks_h", _P + "shrinks_h_more"], [_P + "v_first_1"]),  # (1,)
        helper.make_node("Squeeze", [_P + "v_first_1"], [_P + "v_first"]),  # ()
        helper.make_node("If", [_P + "v_first"], [_P + "resampled"], name=_P + "If_order",
                         then_branch=_branch("vertical_first", v_first, v_first[-1].output[0]),
                         else_branch=_branch("horizontal_first", h_first, h_first[-1].output[0])),
    ]
    return _branch("resample", rule, _P + "resampled")


def pillow_resamples_vertical_first() -> bool:
    """Whether the installed Pillow (13 or newer) may resample rows before columns."""
    import PIL

    return int(PIL.__version__.split(".")[0]) >= 13


def preprocess_model(
    meta: ModelMetadata,
    opset: int = RAW_INPUT_OPSET,
    ir_version: int = 8,
    vertical_first_rule: Optional[bool] = None,
) -> "onnx.ModelProto":
    """A standalone ONNX model: ``images`` uint8 ``(batch, height, width, 3)`` -> :data:`CROP_NAME`
    uint8 ``(batch, h, w, 3)``, the crop the runtime's Pillow path makes for ``meta``'s settings.

    ``vertical_first_rule``: follow Pillow 13's order of the two resampling passes (``None``:
    as the installed Pillow does; see :func:`_resample_graph`).

    Raises:
        ValueError: a filter the graph cannot reproduce (``nearest``), or ``opset`` below 18.
    """
    from onnx import TensorProto, helper

    plan = check_raw_input_supported(meta)
    if vertical_first_rule is None:
        vertical_first_rule = pillow_resamples_vertical_first()
    if opset < RAW_INPUT_OPSET:
        raise ValueError(f"raw input needs opset {RAW_INPUT_OPSET} or newer (Resize with antialias), got {opset}")
    th, tw = meta.image_size
    nodes: list = [helper.make_node("Shape", [INPUT_NAME], [_P + "hw"], start=1, end=3)]  # (2,): (H, W)
    size = _target_size(_P + "hw", nodes, plan, (th, tw))

    # resize unless the image already has the target size (torchvision returns it untouched)
    resized = _P + "resized"
    nodes += [
        helper.make_node("Equal", [_P + "hw", size], [_P + "equal"]),  # (2,) bool
        helper.make_node("Cast", [_P + "equal"], [_P + "equal_i64"], to=TensorProto.INT64),
        helper.make_node("ReduceMin", [_P + "equal_i64"], [_P + "same_i64"], keepdims=0),  # () 1 when both equal
        helper.make_node("Cast", [_P + "same_i64"], [_P + "same_size"], to=TensorProto.BOOL),
        helper.make_node("If", [_P + "same_size"], [resized], name=_P + "If_resize",
                         then_branch=_branch("unchanged", [helper.make_node("Identity", [INPUT_NAME], [_P + "same"])],
                                             _P + "same"),
                         else_branch=_resample_graph(plan, size, vertical_first_rule)),
    ]
    if plan.fill is None:
        out = resized
    else:
        # torchvision center_crop: pad (d // 2 before, d - d // 2 after) where the crop is larger,
        # then crop at round((padded - crop) / 2), rounding half to even as Python's round
        target = _const(nodes, "crop_size", [th, tw], TensorProto.INT64)
        zero = _const(nodes, "zero", [0], TensorProto.INT64)
        two = _const(nodes, "two", [2], TensorProto.INT64)
        two_f64 = _const(nodes, "two_f64", [2.0], TensorProto.DOUBLE)
        axes = _const(nodes, "axes", [1, 2], TensorProto.INT64)
        fill = _const(nodes, "fill", [plan.fill], TensorProto.UINT8, shape=[])
        nodes += [
            helper.make_node("Sub", [target, size], [_P + "missing"]),
            helper.make_node("Max", [_P + "missing", zero], [_P + "pad"]),  # (2,) rows, columns to add
            helper.make_node("Div", [_P + "pad", two], [_P + "pad_before"]),
            helper.make_node("Sub", [_P + "pad", _P + "pad_before"], [_P + "pad_after"]),
            helper.make_node("Concat", [zero, _P + "pad_before", zero, zero, _P + "pad_after", zero], [_P + "pads"],
                             axis=0),  # (8,): begins (b, h, w, c), ends (b, h, w, c)
            helper.make_node("Pad", [resized, _P + "pads", fill], [_P + "padded"], mode="constant"),
            helper.make_node("Add", [size, _P + "pad"], [_P + "padded_hw"]),  # (2,)
            helper.make_node("Sub", [_P + "padded_hw", target], [_P + "excess"]),
            helper.make_node("Cast", [_P + "excess"], [_P + "excess_f64"], to=TensorProto.DOUBLE),
            helper.make_node("Div", [_P + "excess_f64", two_f64], [_P + "offset_f64"]),
            helper.make_node("Round", [_P + "offset_f64"], [_P + "offset_rounded"]),
            helper.make_node("Cast", [_P + "offset_rounded"], [_P + "offset"], to=TensorProto.INT64),
            helper.make_node("Add", [_P + "offset", target], [_P + "end"]),
            helper.make_node("Slice", [_P + "padded", _P + "offset", _P + "end", axes], [CROP_NAME]),  # (b, th, tw, 3)
        ]
        out = CROP_NAME
    if out != CROP_NAME:
        nodes.append(helper.make_node("Identity", [out], [CROP_NAME]))
    for i, node in enumerate(nodes):
        if not node.name:
            node.name = f"{_P}{node.op_type}_{i}"
    graph = helper.make_graph(
        nodes,
        "coopkit_preprocess",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", "height", "width", 3])],
        [helper.make_tensor_value_info(CROP_NAME, TensorProto.UINT8, ["batch", th, tw, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="coopkit")
    model.ir_version = ir_version
    return model


def prepend_preprocessing(model: "onnx.ModelProto", meta: ModelMetadata) -> "onnx.ModelProto":
    """``model`` (an image graph taking crops as ``images``) with :func:`preprocess_model` in front.

    The image graph is left as it is (so fp16 and int8 variants compose the same way); its
    ``images`` input becomes the internal value :data:`CROP_NAME`, and the new ``images`` input
    takes decoded images of any size. The model's default-domain opset must be 18 or newer.
    """
    graph = model.graph
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    pre = preprocess_model(meta, opset=opset, ir_version=model.ir_version)
    old = [i for i in graph.input if i.name == INPUT_NAME]
    if len(old) != 1:
        raise RuntimeError(f"the image graph has no single {INPUT_NAME!r} input to put the preprocessing in front of")
    crop_info = pre.graph.output[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == INPUT_NAME:
                node.input[i] = CROP_NAME
    graph.input.remove(old[0])
    graph.input.insert(0, pre.graph.input[0])
    nodes = [*pre.graph.node, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.value_info.append(crop_info)
    logger.info("raw input: %d preprocessing nodes in front of the image graph (%s, %s)",
                len(pre.graph.node), meta.resize_mode, meta.interpolation)
    return model
