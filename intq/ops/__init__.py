"""Every op an integer graph may hold, defined once (schema, shape rule, numpy semantics)."""

from intq.ops import bert, cnn, core, log2attn, std  # noqa: F401  (registers the ops)
from intq.ops.registry import OpDef, all_ops, intq_op, is_allowed, lookup, make_node

__all__ = ["OpDef", "all_ops", "intq_op", "is_allowed", "lookup", "make_node"]
