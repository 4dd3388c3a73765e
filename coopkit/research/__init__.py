"""Research tools on top of the SDK: the CoOp paper's experiments as functions
(:mod:`~coopkit.research.experiments`), the linear-probe baseline, the nearest-words reading
of a learned context (:mod:`~coopkit.research.interpret`) and import of contexts learned by
the official CoOp code (:mod:`~coopkit.research.compat`).
"""
