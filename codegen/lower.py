"""Integer ONNX -> TVM Relax. One lowering per op, registered by name; the driver walks the
graph once in topological order. Standard data-movement ops become Relax ops; intq ops become
TE computes (codegen/te_ops.py) placed with `emit_te`, so their arithmetic is the reference's.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from tvm import relax, te

from intq.codegen import te_ops
from intq.errors import LoweringError
from intq.ir import topo_sort
from intq.ops import lookup
from intq.ops.core import gelu_core, multiplier_array, out_dtype, requant_bounds
from intq.ops.fixedpoint import dtype_bounds, requantize_dyadic

Lowering = Callable[["LowerCtx", onnx.NodeProto, dict[str, Any]], relax.Expr]
_LOWERINGS: dict[str, Lowering] = {}


def lowering(*names: str) -> Callable[[Lowering], Lowering]:
    def deco(fn: Lowering) -> Lowering:
        for n in names:
            _LOWERINGS[n] = fn
        return fn

    return deco


# Lowerings for op families kept in their own modules (codegen/lower_<family>.py).
LOWERING_MODULES: tuple[str, ...] = (
    "intq.codegen.lower_log2",
    "intq.codegen.lower_bert",
    "intq.codegen.lower_cnn",
)


def _load_lowering_modules() -> None:
    for mod in LOWERING_MODULES:
        importlib.import_module(mod)


def supported_ops() -> set[str]:
    _load_lowering_modules()
    return set(_LOWERINGS)


@dataclass(frozen=True)
class View:
    """A tensor of `shape` whose element idx is `source`[index(idx)]: written by another kernel
    into that kernel's own output buffer (e.g. a q / k / v head inside the fused projection)."""

    source: relax.Expr
    shape: tuple[int, ...]
    index: Callable[[list], list]
    source_shape: tuple[int, ...]

    def contiguous(self, axis: int) -> bool:
        """Whether consecutive elements along `axis` are consecutive in the row-major source
        (checked at the first and the last run along it): a reader can load along that axis."""
        n = self.shape[axis]
        if n < 2:
            return True
        for base in (0, 1):
            at = [(d - 1) * base for d in self.shape]
            at[axis] = (n - 2) * base
            first = _flat(self.index(list(at)), self.source_shape)
            at[axis] += 1
            if _flat(self.index(list(at)), self.source_shape) - first != 1:
                return False
        return True


def _flat(idx: Sequence[int], shape: Sequence[int]) -> int:
    return int(sum(int(i) * s for i, s in zip(idx, _strides(shape), strict=True)))


@dataclass
class LowerCtx:
    bb: relax.BlockBuilder
    consts: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    env: dict[str, relax.Expr] = field(default_factory=dict)
    kernels: Any = None  # target kernel library (schedules); None -> plain TE computes
    # tensor name -> the nodes reading it; names of the graph outputs (for epilogue fusion)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    producers: dict[str, onnx.NodeProto] = field(default_factory=dict)
    graph_outputs: frozenset[str] = frozenset()
    folded: set[str] = field(default_factory=set)  # outputs of nodes run in another kernel
    skipped: set[str] = field(default_factory=set)  # outputs never materialised (fused away)
    views: dict[str, View] = field(default_factory=dict)  # outputs written inside another buffer

    def bind_folded(self, node: onnx.NodeProto, value: relax.Expr) -> None:
        """`node` runs inside the kernel that computed `value` (its epilogue)."""
        self.env[node.output[0]] = value
        self.folded.add(node.output[0])

    def fusable_requant(self, tensor: str) -> tuple[str, tuple] | None:
        """(input name, (b, c, lo, hi, dtype)) when `tensor` is the output of a per-tensor
        Requantize that no kernel has absorbed yet, read by one node only and no graph output,
        so that its reader may apply it itself (the Requantize's own kernel then goes unused and
        dead-code elimination drops it)."""
        node = self.producers.get(tensor)
        if node is None or node.op_type != "Requantize" or tensor in self.folded:
            return None
        if tensor in self.views:  # applied already, in the epilogue of the kernel it lives in
            return None
        if len(self.consumers.get(tensor, [])) != 1 or tensor in self.graph_outputs:
            return None
        rq = self.per_tensor_requant(node)
        return (node.input[0], rq) if rq is not None else None

    def epilogue_requant(self, node: onnx.NodeProto) -> tuple[onnx.NodeProto | None, tuple | None]:
        """(Requantize node, (b, c, lo, hi, dtype)) when a Requantize alone reads `node`'s output
        and a kernel writing that output can apply it in its epilogue, else (None, None)."""
        out_shape = self.shapes[node.output[0]]
        rq_node = self.sole_consumer(node.output[0], "Requantize")
        if rq_node is None:
            return None, None
        rq = self.last_axis_requant(rq_node, len(out_shape), int(out_shape[-1]))
        return (rq_node, rq) if rq is not None else (None, None)

    def sole_consumer(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        """The node of type `op_type` that is the only reader of `tensor` (and `tensor` is no
        graph output), else None. A lowering that folds that node into its own kernel (an
        epilogue) binds the node's output in `env`; the driver then skips the node."""
        users = self.consumers.get(tensor, [])
        if tensor in self.graph_outputs or len(users) != 1 or users[0].op_type != op_type:
            return None
        return users[0]

    def broadcast_requant(self, node: onnx.NodeProto) -> tuple | None:
        """(b, c, lo, hi, dtype) of a Requantize node with constant multipliers, b and c int64
        arrays of its output's shape (a scalar, per-axis or broadcast multiplier expanded), else
        None."""
        if node.input[1] not in self.consts or node.input[2] not in self.consts:
            return None
        attrs = lookup(node).attrs_of(node)
        shape = tuple(int(d) for d in self.shapes[node.output[0]])
        ax = int(attrs["axis"])
        b, c = (
            np.broadcast_to(multiplier_array(self.consts[k], len(shape), ax), shape)
            for k in node.input[1:3]
        )
        lo, hi = requant_bounds(attrs)
        return b, c, lo, hi, out_dtype(attrs).name

    def per_tensor_requant(self, node: onnx.NodeProto) -> tuple[int, int, int, int, str] | None:
        """(b, c, lo, hi, dtype) of a Requantize node with a constant scalar multiplier and
        shift, else None."""
        if node.input[1] not in self.consts or node.input[2] not in self.consts:
            return None
        b, c = self.consts[node.input[1]], self.consts[node.input[2]]
        if b.size != 1 or c.size != 1:
            return None
        attrs = lookup(node).attrs_of(node)
        lo, hi = requant_bounds(attrs)
        return int(b.reshape(())), int(c.reshape(())), lo, hi, out_dtype(attrs).name

    def last_axis_requant(
        self, node: onnx.NodeProto, ndim: int, channels: int, axis: int = -1
    ) -> tuple | None:
        """(b, c, lo, hi, dtype) of a Requantize node that a kernel producing an `ndim`-D tensor
        with `channels` on axis `axis` (default: the last) can apply in its epilogue: b, c python
        ints (per-tensor) or int32 arrays of length `channels` (per-channel along that axis);
        else None."""
        if node.input[1] not in self.consts or node.input[2] not in self.consts:
            return None
        raw = self.consts[node.input[1]]
        if raw.ndim > 1 and any(d != 1 for i, d in enumerate(raw.shape) if i != axis % ndim):
            return None  # a broadcast multiplier that varies along another axis
        b, c = self.consts[node.input[1]].reshape(-1), self.consts[node.input[2]].reshape(-1)
        attrs = lookup(node).attrs_of(node)
        lo, hi = requant_bounds(attrs)
        dt = out_dtype(attrs).name
        if b.size == 1 and c.size == 1:
            return int(b[0]), int(c[0]), lo, hi, dt
        if b.size != channels or c.size != channels or int(attrs["axis"]) % ndim != axis % ndim:
            return None
        return b.astype(np.int32), c.astype(np.int32), lo, hi, dt

    def bind_view(self, node: onnx.NodeProto, view: View) -> None:
        """`node`'s output is never written on its own: its elements live in `view.source` (a
        kernel wrote them there in its epilogue). Readers that can index it read it in place;
        `value` materialises it for any other reader."""
        self.views[node.output[0]] = view
        self.skipped.add(node.output[0])

    def value(self, name: str) -> relax.Expr:
        if name in self.env:
            return self.env[name]
        if name in self.views:  # a reader that cannot index the view: one copy kernel
            v = self.views[name]
            out = self.emit_te(
                lambda t: te.compute(v.shape, lambda *i: t(*v.index(list(i))), name="view"),
                v.source,
                name="view_copy",
            )
            self.env[name] = out
            return out
        if name in self.consts:
            v = relax.const(self.consts[name])
            self.env[name] = v
            return v
        raise LoweringError(f"tensor {name!r} is neither computed nor constant")

    def const(self, name: str) -> np.ndarray:
        if name not in self.consts:
            raise LoweringError(f"operand {name!r} must be a compile-time constant")
        return self.consts[name]

    def emit_te(self, fn, *args, name: str, **kw) -> relax.Expr:
        """Emit an elementwise / row-reduction TE kernel (tagged for the target's generic
        schedule when the target has a kernel library)."""
        if self.kernels is not None:
            kw["primfunc_attrs"] = self.kernels.elementwise_attrs()
        return self.bb.emit_te(fn, *args, primfunc_name_hint=name, **kw)


def _type_info(model: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    shapes, dtypes = {}, {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        shapes[vi.name] = tuple(int(d.dim_value) for d in tt.shape.dim)
        dtypes[vi.name] = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
    for t in g.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
        dtypes[t.name] = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name
    return shapes, dtypes


def to_relax(model: onnx.ModelProto, kernels: Any = None) -> tvm.IRModule:  # noqa: F821
    """Build an IRModule whose `main` maps the graph inputs to the graph outputs."""
    _load_lowering_modules()
    g = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    shapes, dtypes = _type_info(model)
    bb = relax.BlockBuilder()
    names = [i.name for i in g.input if i.name not in consts]
    params = [relax.Var(n, relax.TensorType(list(shapes[n]), dtypes[n])) for n in names]
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for i in node.input:
            if i:
                consumers.setdefault(i, []).append(node)
    outputs = frozenset(o.name for o in g.output)
    ctx = LowerCtx(bb, consts, shapes, dtypes, kernels=kernels, consumers=consumers)
    ctx.producers = {o: node for node in g.node for o in node.output if o}
    ctx.graph_outputs = outputs
    with bb.function("main", params):
        with bb.dataflow():
            ctx.env.update(zip(names, params, strict=True))
            for node in topo_sort(g):
                if node.output[0] in ctx.env or node.output[0] in ctx.skipped:
                    continue  # folded into its producer's kernel
                op = lookup(node)
                fn = _LOWERINGS.get(node.op_type)
                if fn is None:
                    raise LoweringError(f"no lowering for op {node.op_type!r} (node {node.name!r})")
                try:
                    out = fn(ctx, node, op.attrs_of(node))
                except LoweringError:
                    raise
                except Exception as e:
                    raise LoweringError(
                        f"lowering node {node.name!r} ({node.op_type}) failed: {e}"
                    ) from e
                if node.output[0] not in ctx.views and node.output[0] not in ctx.skipped:
                    ctx.env[node.output[0]] = out  # (else inside another buffer, or fused away)
            # a graph output bound as a view inside another buffer is materialised here
            outs = [ctx.value(o.name) for o in g.output]
            result = outs[0] if len(outs) == 1 else relax.Tuple(outs)
            gv = bb.emit_output(result)
        bb.emit_func_output(gv)
    # kernels whose readers all computed their value themselves (a Requantize applied by its
    # reader, data movement read through an index map) are dropped here
    return relax.transform.DeadCodeElimination(["main"])(bb.get())


# ------------------------------------------------------------------ data movement (Relax ops)
@lowering("Identity")
def _identity(ctx: LowerCtx, node, attrs):
    return ctx.value(node.input[0])


@lowering("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(ctx: LowerCtx, node, attrs):
    shape = ctx.shapes[node.output[0]]
    return ctx.bb.emit(relax.op.reshape(ctx.value(node.input[0]), shape))


@lowering("Transpose")
def _transpose(ctx: LowerCtx, node, attrs):
    perm = attrs["perm"] or None
    return ctx.bb.emit(relax.op.permute_dims(ctx.value(node.input[0]), perm))


@lowering("Concat")
def _concat(ctx: LowerCtx, node, attrs):
    xs = [ctx.value(i) for i in node.input]
    return ctx.bb.emit(relax.op.concat(xs, axis=int(attrs["axis"])))


@lowering("Gather")
def _gather(ctx: LowerCtx, node, attrs):
    idx = ctx.const(node.input[1]).astype(np.int64)
    x = ctx.value(node.input[0])
    axis = int(attrs["axis"])
    out = ctx.bb.emit(relax.op.take(x, relax.const(idx.reshape(-1)), axis=axis))
    return ctx.bb.emit(relax.op.reshape(out, ctx.shapes[node.output[0]]))


@lowering("Slice")
def _slice(ctx: LowerCtx, node, attrs):
    x = ctx.value(node.input[0])
    shape = ctx.shapes[node.input[0]]
    starts = ctx.const(node.input[1]).tolist()
    ends = ctx.const(node.input[2]).tolist()

    def operand(k: int, default: list[int]) -> list[int]:
        has = len(node.input) > k and node.input[k]
        return ctx.const(node.input[k]).tolist() if has else default

    axes = operand(3, list(range(len(starts))))
    steps = operand(4, [1] * len(starts))
    spans = zip(starts, ends, axes, steps, strict=True)
    norm = [slice(s, e, st).indices(shape[a]) for s, e, a, st in spans]
    return ctx.bb.emit(
        relax.op.strided_slice(
            x,
            [a % len(shape) for a in axes],
            [n[0] for n in norm],
            [n[1] for n in norm],
            [n[2] for n in norm],
        )
    )


# ------------------------------------------------------------------ index maps of data movement
# A kernel that reads a tensor produced by pure data movement (reshape / transpose / a gather of
# one constant index) reads the movement's source through the composed index map instead, so
# the moved copy is never written (and is dropped when nothing else reads it).
IndexMap = Callable[[list], list]
_RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def _strides(shape: Sequence[int]) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= int(d)
    return out[::-1]


def index_offsets(index: IndexMap, shape: Sequence[int], target_shape: Sequence[int]):
    """Row-major offsets in a tensor of `target_shape` of index(i) for every index i of
    `shape`, as a flat int64 array in i's row-major order (index maps evaluate on numpy)."""
    grid = [a.reshape(-1) for a in np.indices([int(d) for d in shape], dtype=np.int64)]
    at = index(grid)
    strides = _strides(target_shape)
    flat = sum(np.asarray(i, np.int64) * st for i, st in zip(at, strides, strict=True))
    return np.broadcast_to(flat, grid[0].shape if grid else ())


def fit_affine(flat: np.ndarray, shape: Sequence[int]) -> tuple[int, list[int]] | None:
    """(base, coefficients) with flat[i] == base + sum_d c_d * i_d for every index i of `shape`
    (`flat` given in row-major order), else None."""
    shape = [int(d) for d in shape]
    flat = np.asarray(flat, dtype=np.int64).reshape(shape)
    base = int(flat.reshape(-1)[0]) if flat.size else 0
    coeffs = []
    for d, extent in enumerate(shape):  # an axis of extent 1 gets coefficient 0
        unit = tuple(int(k == d) for k in range(len(shape)))
        coeffs.append(int(flat[unit]) - base if extent > 1 else 0)
    grid = np.indices(shape, dtype=np.int64)
    predicted = base + sum(c * grid[d] for d, c in enumerate(coeffs))
    return (base, coeffs) if np.array_equal(predicted, flat) else None


def view_affine(view: View) -> tuple[int, list[int]] | None:
    """The view's element offsets in its source as base + sum_d c_d * i_d, else None."""
    return fit_affine(index_offsets(view.index, view.shape, view.source_shape), view.shape)


def reshape_index(src_shape: Sequence[int], out_shape: Sequence[int]) -> IndexMap:
    """Index into a tensor of `src_shape` -> index of the same row-major element after a reshape
    to `out_shape`."""
    si, so = _strides(src_shape), _strides(out_shape)

    def index(idx):
        flat = sum((i * s for i, s in zip(idx, si, strict=True) if s), 0)
        return [(flat // s) % int(d) for s, d in zip(so, out_shape, strict=True)]

    return index


def _movement_step(ctx: LowerCtx, node: onnx.NodeProto) -> IndexMap | None:
    """out index -> in index of one data-movement node, or None if it is not one we map."""
    src_shape, out_shape = ctx.shapes[node.input[0]], ctx.shapes[node.output[0]]
    if node.op_type in _RESHAPES:
        return reshape_index(out_shape, src_shape)
    if node.op_type == "Transpose":
        perm = list(lookup(node).attrs_of(node)["perm"] or range(len(src_shape))[::-1])

        def transpose(idx):
            src = [None] * len(idx)
            for k, p in enumerate(perm):
                src[p] = idx[k]
            return src

        return transpose
    if node.op_type == "Gather" and node.input[1] in ctx.consts:
        ind = ctx.consts[node.input[1]]
        if ind.ndim != 0:
            return None
        axis = int(lookup(node).attrs_of(node)["axis"]) % len(src_shape)
        pos = int(ind) % int(src_shape[axis])
        return lambda idx: [*idx[:axis], pos, *idx[axis:]]
    return None


def movement_source(ctx: LowerCtx, tensor: str) -> tuple[str, IndexMap]:
    """(source, index map): the nearest tensor that `tensor` is a pure data-movement view of
    (itself, with the identity map, when it is computed by a kernel)."""
    maps: list[IndexMap] = []
    while tensor not in ctx.folded:
        node = ctx.producers.get(tensor)
        step = _movement_step(ctx, node) if node is not None else None
        if step is None or node.input[0] in ctx.consts:
            break
        maps.append(step)
        tensor = node.input[0]

    def index(idx):
        for step in maps:
            idx = step(list(idx))
        return idx

    return tensor, index


@dataclass(frozen=True)
class RequantSplit:
    """The per-tensor Requantizes at the leaves of the pure data-movement tree that alone reads
    a kernel's output `tensor` (e.g. the fused qkv projection -> Reshape -> Transpose -> three
    Gathers [-> Transpose] -> Requantize each), when the leaves cover every element of `tensor`
    exactly once and every column (last axis) of it goes to a single leaf. The kernel can then
    apply the leaves' Requantizes in its write-back (`rq`: per column) and their readers can read
    them in place (`View`s of its output); the moved copies are never written."""

    leaves: tuple[tuple[onnx.NodeProto, IndexMap], ...]  # Requantize, its out index -> tensor's
    inner: tuple[str, ...]  # the movement outputs in between
    rq: tuple  # (b, c, lo, hi, dtype): ints, or int32 arrays along `tensor`'s last axis
    shape: tuple[int, ...]  # `tensor`'s shape

    def bind(self, ctx: LowerCtx, source: relax.Expr, source_shape: Sequence[int]) -> None:
        """Bind every leaf as a view of `source`: the kernel's output, holding `tensor`'s
        elements in row-major order in a buffer of shape `source_shape`."""
        src_shape = tuple(int(d) for d in source_shape)
        to_source = reshape_index(self.shape, src_shape)
        ctx.skipped.update(self.inner)
        for node, index in self.leaves:
            shape = tuple(int(d) for d in ctx.shapes[node.output[0]])
            view_index = _compose([index, to_source])
            ctx.bind_view(node, View(source, shape, view_index, src_shape))


def _compose(steps: list[IndexMap]) -> IndexMap:
    def index(idx):
        for step in steps:
            idx = step(list(idx))
        return idx

    return index


def requant_split(ctx: LowerCtx, tensor: str) -> RequantSplit | None:
    """See `RequantSplit`; None when `tensor` is not read that way. The cover is checked by
    evaluating every leaf's index map on all of the leaf's indices."""
    if tensor in ctx.graph_outputs or tensor not in ctx.shapes:
        return None
    leaves, inner, todo = [], [], [(tensor, [])]
    while todo:
        name, steps = todo.pop()
        users = ctx.consumers.get(name, [])
        if not users:
            return None
        for node in users:
            if node.input[0] != name or name in node.input[1:]:
                return None
            if node.op_type == "Requantize":
                rq = ctx.broadcast_requant(node)
                if rq is None:
                    return None
                leaves.append((node, rq, _compose(steps)))
                continue
            step = _movement_step(ctx, node)
            if step is None or node.output[0] in ctx.graph_outputs:
                return None
            inner.append(node.output[0])
            todo.append((node.output[0], [step, *steps]))
    if not leaves or len({rq[2:] for _, rq, _ in leaves}) != 1:
        return None
    shape = tuple(int(d) for d in ctx.shapes[tensor])
    size, n = int(np.prod(shape)), shape[-1]
    count = np.zeros(size, dtype=np.int64)
    b, c = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    for node, (bl, cl, *_), index in leaves:  # each column's multiplier: one, from any leaf
        flat = index_offsets(index, ctx.shapes[node.output[0]], shape).reshape(-1)
        count += np.bincount(flat, minlength=size)
        col, bl, cl = flat % n, bl.reshape(-1), cl.reshape(-1)
        seen = b[col] != -1  # columns an earlier leaf gave a multiplier: they must agree
        if (b[col][seen] != bl[seen]).any() or (c[col][seen] != cl[seen]).any():
            return None
        b[col], c[col] = bl, cl
        if (b[col] != bl).any() or (c[col] != cl).any():  # and within this leaf
            return None
    if (count != 1).any():
        return None
    if (b == b[0]).all() and (c == c[0]).all():
        rq = (int(b[0]), int(c[0]), *leaves[0][1][2:])
    else:
        rq = (b.astype(np.int32), c.astype(np.int32), *leaves[0][1][2:])
    return RequantSplit(tuple((nd, ix) for nd, _, ix in leaves), tuple(inner), rq, shape)


# ------------------------------------------------------------------ intq ops (TE computes)
def _vec_or_int(ctx: LowerCtx, name: str):
    v = ctx.const(name)
    if v.size == 1:
        return int(v.reshape(())), None
    return None, v


@lowering("Requantize")
def _requantize(ctx: LowerCtx, node, attrs):
    lo, hi = requant_bounds(attrs)
    dt = out_dtype(attrs).name
    bi, bv = _vec_or_int(ctx, node.input[1])
    ci, cv = _vec_or_int(ctx, node.input[2])
    kw = dict(axis=int(attrs["axis"]), dtype=dt, lo=lo, hi=hi)
    src, index = movement_source(ctx, node.input[0])
    view = ctx.views.get(src)
    if view is not None:  # its elements live in another kernel's output: read them there
        index = _compose([index, view.index])
    if src != node.input[0] or view is not None:  # read through the movement's index map
        kw.update(shape=ctx.shapes[node.input[0]], index=index)
    x = view.source if view is not None else ctx.value(src)
    if bv is None and cv is None:
        return ctx.emit_te(lambda t: te_ops.requantize(t, bi, ci, **kw), x, name="requantize")
    shape = bv.shape if bv is not None and bv.ndim > 1 else (-1,)  # broadcast form: kept
    b = relax.const(ctx.const(node.input[1]).reshape(shape).astype("int32"))
    c = relax.const(ctx.const(node.input[2]).reshape(shape).astype("int32"))
    return ctx.emit_te(
        lambda t, tb, tc: te_ops.requantize(t, tb, tc, **kw), x, b, c, name="requantize_pc"
    )


@lowering("QuantizeFloatBits")
def _quantize_float_bits(ctx: LowerCtx, node, attrs):
    lo, hi = requant_bounds(attrs)
    dt = out_dtype(attrs).name
    b, c = int(attrs["multiplier"]), int(attrs["shift"])
    return ctx.emit_te(
        lambda t: te_ops.quantize_float_bits(t, b, c, lo=lo, hi=hi, dtype=dt),
        ctx.value(node.input[0]),
        name="quantize_float_bits",
    )


@lowering("IntAdd")
def _int_add(ctx: LowerCtx, node, attrs):
    dt = out_dtype(attrs).name
    lo, hi = dtype_bounds(dt)
    shape = ctx.shapes[node.output[0]]
    args, rqs = [], []
    for name in node.input[:2]:  # a per-tensor Requantize read only here is applied here
        fr = ctx.fusable_requant(name)
        if fr is not None:
            args.append(ctx.value(fr[0]))
            rqs.append(fr[1])
        else:
            args.append(ctx.value(name))
            rqs.append(None)
    ln = _layernorm_reader(ctx, node)
    if ln is not None:  # the residual add and the LayerNorm that reads it: one row pass
        add = te_ops.RowAdd(tuple(rqs), dt, lo, hi)
        out = node.output[0]
        keep = out in ctx.graph_outputs or len(ctx.consumers.get(out, [])) > 1
        if not keep:  # the LayerNorm is its only reader (post-LN): the sum is never stored
            ctx.skipped.add(out)
        return _emit_layernorm(ctx, ln, lookup(ln).attrs_of(ln), args, add, keep)
    return ctx.emit_te(
        lambda a, b: te_ops.int_add(a, b, shape, dt, lo, hi, rqs[0], rqs[1]),
        *args,
        name="int_add",
    )


def _layernorm_reader(ctx: LowerCtx, node) -> onnx.NodeProto | None:
    """The IntLayerNorm reading IntAdd `node`'s output over the same shape, when the kernel
    library fuses the two (capability `fuse_add_layernorm`); other readers of the sum (the
    residual stream) read the fused kernel's first output."""
    if not getattr(ctx.kernels, "fuse_add_layernorm", False):
        return None
    out = node.output[0]
    lns = [n for n in ctx.consumers.get(out, []) if n.op_type == "IntLayerNorm"]
    if len(lns) != 1 or lns[0].input[0] != out or ctx.shapes[lns[0].output[0]] != ctx.shapes[out]:
        return None
    if any(i not in ctx.consts for i in lns[0].input[1:3]):
        return None
    return lns[0]


@lowering("IntLayerNorm")
def _int_layernorm(ctx: LowerCtx, node, attrs):
    return _emit_layernorm(ctx, node, attrs, [ctx.value(node.input[0])])


def _emit_layernorm(
    ctx: LowerCtx, node, attrs, x_args: list, add: te_ops.RowAdd | None = None, keep_sum=True
) -> relax.Expr:
    """One LayerNorm kernel (the kernel library's `layernorm_rows` where it has one and it
    applies, else TE stages); a following Requantize that alone reads the output runs in its
    last stage. `add`: the LayerNorm's input is that IntAdd of `x_args`, computed in the same
    kernel row by row; with `keep_sum` the kernel has two outputs, the sum (returned: the
    IntAdd's value) and the LayerNorm (bound to `node`'s output), else the LayerNorm alone
    (returned and bound)."""
    kw = dict(eps=int(attrs["epsilon"]), frac_bits=int(attrs["frac_bits"]))
    kw["narrow"] = bool(getattr(ctx.kernels, "narrow_layernorm", False))
    shape = ctx.shapes[node.output[0]]
    rq_node = ctx.sole_consumer(node.output[0], "Requantize")
    rq = ctx.last_axis_requant(rq_node, len(shape), shape[-1]) if rq_node is not None else None
    rq_args = [relax.const(v) for v in rq[:2]] if rq and isinstance(rq[0], np.ndarray) else []

    def kernel(*ts):
        x = ts[0]
        if add is not None:  # "_row": computed per row inside the LayerNorm's row loop
            a, b = ts[:2]
            x = te_ops.int_add(a, b, shape, add.dtype, add.lo, add.hi, *add.rqs, name="int_add_row")
        g, b, *trq = ts[len(x_args) :]
        r = (*trq, *rq[2:]) if trq else rq
        y = te_ops.int_layernorm(x, g, b, rq=r, **kw)
        return [x, y] if add is not None and keep_sum else y

    name = ("int_add_" if add is not None else "") + "int_layernorm" + ("_rq" if rq else "")
    gamma, beta = (ctx.value(i) for i in node.input[1:3])
    pair = None  # (the sum or None, the LayerNorm's output)
    if hasattr(ctx.kernels, "layernorm_rows"):
        pair = ctx.kernels.layernorm_rows(ctx, node, x_args, add, keep_sum, rq, name)
    if pair is None:
        out = ctx.emit_te(kernel, *x_args, gamma, beta, *rq_args, name=name)
        pair = (None, out)
        if add is not None and keep_sum:
            pair = tuple(ctx.bb.emit(relax.TupleGetItem(out, i)) for i in (0, 1))
    total, out = pair
    if add is not None:
        ctx.env[node.output[0]] = out
    if rq is not None:
        ctx.bind_folded(rq_node, out)
    return total if total is not None else out


@lowering("IntSoftmax")
def _int_softmax(ctx: LowerCtx, node, attrs):
    if ctx.kernels is not None and hasattr(ctx.kernels, "softmax"):
        out = ctx.kernels.softmax(ctx, node, attrs)
        if out is not None:
            return out
    return ctx.emit_te(
        lambda x: te_ops.int_softmax(x, frac_bits=int(attrs["frac_bits"])),
        ctx.value(node.input[0]),
        name="int_softmax",
    )


def _requantize_table(table: np.ndarray, rq: tuple[int, int, int, int, str]) -> np.ndarray:
    """Requantize (per-tensor b, c, lo, hi, dtype) applied to a table of int values: the op's
    reference formula."""
    b, c, lo, hi, dt = rq
    return requantize_dyadic(table.astype(np.int64), b, c, lo, hi).astype(dt)


def gelu_table(ctx: LowerCtx, node: onnx.NodeProto) -> tuple[np.ndarray, onnx.NodeProto] | None:
    """For an IntGELU of int8 input: (table, last node) where table[v + 128] is the reference's
    gelu_core(v) for every int8 v, with the following per-tensor Requantize composed in when it
    is the only reader (last node = that Requantize, else the IntGELU); None otherwise."""
    if ctx.dtypes.get(node.input[0]) != "int8":
        return None
    attrs = lookup(node).attrs_of(node)
    values = np.arange(-128, 128, dtype=np.int64)
    table = gelu_core(values, int(attrs["alpha"]), int(attrs["frac_bits"])).astype(np.int32)
    rq_node = ctx.sole_consumer(node.output[0], "Requantize")
    rq = ctx.per_tensor_requant(rq_node) if rq_node is not None else None
    if rq is None:
        return table, node
    return _requantize_table(table, rq), rq_node


@lowering("IntGELU")
def _int_gelu(ctx: LowerCtx, node, attrs):
    """int8 input: a 256-entry table (gelu_table); else the TE formula."""
    tab = gelu_table(ctx, node)
    if tab is not None:
        table, last = tab
        out = None
        if hasattr(ctx.kernels, "byte_table"):  # a target's own byte-table kernel
            out = ctx.kernels.byte_table(ctx, node.input[0], table, ctx.shapes[node.output[0]])
        if out is None:
            out = ctx.emit_te(
                lambda x, t: te_ops.table_lookup(x, t, 128, str(table.dtype)),
                ctx.value(node.input[0]),
                relax.const(table.astype(np.int32)),  # 32-bit entries: vector gathers
                name="int_gelu_table",
            )
        if last is not node:
            ctx.bind_folded(last, out)
        return out
    return ctx.emit_te(
        lambda x: te_ops.int_gelu(x, alpha=int(attrs["alpha"]), frac_bits=int(attrs["frac_bits"])),
        ctx.value(node.input[0]),
        name="int_gelu",
    )


@lowering("IntMean")
def _int_mean(ctx: LowerCtx, node, attrs):
    return ctx.emit_te(
        lambda x: te_ops.int_mean(x, axes=list(attrs["axes"]), keepdims=bool(attrs["keepdims"])),
        ctx.value(node.input[0]),
        name="int_mean",
    )


@lowering("IntMatMul")
def _int_matmul(ctx: LowerCtx, node, attrs):
    has_bias = len(node.input) > 2 and node.input[2]
    if ctx.kernels is not None and node.input[1] in ctx.consts:
        return ctx.kernels.dense(ctx, node)
    if ctx.kernels is not None:
        return ctx.kernels.batch_matmul(ctx, node)
    args = [ctx.value(i) for i in node.input if i]
    if has_bias:
        return ctx.emit_te(lambda a, b, c: te_ops.int_matmul(a, b, c), *args, name="int_matmul")
    return ctx.emit_te(lambda a, b: te_ops.int_matmul(a, b), *args, name="int_matmul")


@lowering("IntConv")
def _int_conv(ctx: LowerCtx, node, attrs):
    if ctx.kernels is None:
        raise LoweringError(f"IntConv at node {node.name!r} needs a target kernel library")
    return ctx.kernels.conv2d(ctx, node, attrs)
