"""The fp16 variant of an exported fp32 graph (for GPUs): a small converter of coopkit's own.

It keeps the graph's interface (uint8 ``images`` in, float32 outputs) and keeps the parts where
precision matters in fp32: the input normalisation and the head (:mod:`~coopkit.exporters.nodes`),
and every LayerNorm, Softmax and reduction (:data:`FP16_KEEP_OPS`).
"""

from __future__ import annotations

import heapq
import logging
from typing import TYPE_CHECKING, Any, Iterable

from .nodes import full_precision_nodes

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
    keep_nodes = set(full_precision_nodes(model))
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
