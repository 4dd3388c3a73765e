"""Which nodes of a traced image graph keep full precision in every variant (fp16 and int8).

Node names of the head and of the input normalisation start with ``/head/`` and ``/encoder/``
followed by an op name (see :class:`coopkit.exporters.graphs.ImageGraph`); both precision
variants (:mod:`~coopkit.exporters.fp16`, :mod:`~coopkit.exporters.int8`) leave them in fp32.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import onnx

#: Node-name prefixes kept in full precision in every variant.
FULL_PRECISION_PREFIXES = ("/head/",)
_ENCODER_OWN = re.compile(r"^/encoder/[^/]+$")


def full_precision_nodes(model: "onnx.ModelProto", prefixes: Iterable[str] = FULL_PRECISION_PREFIXES) -> list[str]:
    """Names of the nodes that stay fp32: the head, plus the uint8 -> normalised input steps."""
    prefixes = tuple(prefixes)
    keep = [n.name for n in model.graph.node if n.name.startswith(prefixes)]
    # the input normalisation: nodes directly in /encoder/ (Cast, Div, Sub, Transpose, the last
    # Cast), not those of the open_clip model inside it (/encoder/visual/...)
    keep += [n.name for n in model.graph.node if _ENCODER_OWN.match(n.name)]
    return keep
