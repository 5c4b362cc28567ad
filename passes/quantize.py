"""QuantizePass: canonical float ONNX graph + calibration -> integer-only ONNX graph.

Every float tensor t gets an integer representation q(t) with a compile-time scale s (real
value = q * s, zero point 0):
  * weights: symmetric per-output-channel int8, s_w[c] = max|W[c]| / 127;
  * biases: int32 at s_in * s_w[c];
  * activations: int8 (s = range/127), the residual stream int16 (s = range/32767), matmul and
    conv accumulators int32 at s_a * s_b (per channel when the weight is);
  * between layers, `Requantize` with the dyadic multiplier M = s_in / s_out = b / 2^c.
Scalar positive Mul/Div (attention's 1/sqrt(d)) only relabel the scale. Softmax and GELU
inputs are requantized into a base-2 fixed-point exponent (log2(e) folded into M).
The pass emits no float tensor and no float op; scales land only in the Signature metadata.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from intq import boundary
from intq.config import CompileConfig
from intq.errors import GraphError, UnsupportedOpError
from intq.ir import INTQ_DOMAIN, INTQ_OPSET, NameGen, attrs, consumers, get_constant, topo_sort
from intq.ops import fixedpoint as fp
from intq.ops import lookup, make_node
from intq.ops.core import SOFTMAX_OUT_BITS
from intq.ops.log2attn import zero_code
from intq.passes.base import Pass, PassResult
from intq.passes.calibration import Calibration
from intq.reference import infer_integer_shapes

LOG2E = 1.0 / math.log(2.0)
GELU_SIGMOID_SLOPE = 1.702
QMAX = {"int8": 127, "uint8": 255, "int16": 32767}
ONNX_DT = {
    "int8": TensorProto.INT8,
    "uint8": TensorProto.UINT8,
    "int16": TensorProto.INT16,
    "int32": TensorProto.INT32,
}
# Graph outputs that are int32 accumulators are requantized to int32 with this many bits of
# headroom below the calibrated range (so 2^(31-OUTPUT_BITS) x the range still fits).
OUTPUT_BITS = 23
TENSOR_MAP_KEY = "intq.tensor_map"
MOVEMENT_OPS = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity")


# Rules for op families kept in their own modules (passes/quantize_<family>.py) register here;
# a rule is `fn(qp: QuantizePass, node: onnx.NodeProto) -> None` and sets qp.q[output].
QuantRule = Callable[["QuantizePass", onnx.NodeProto], None]
_RULES: dict[str, QuantRule] = {}
RULE_MODULES: tuple[str, ...] = ("intq.passes.quantize_bert", "intq.passes.quantize_cnn")
# Prescans run once per graph before the rules: `fn(qp, graph)`; they may mark nodes fused
# (qp.fused) and register anchors (qp.anchors: node name -> rule) for multi-node patterns.
_PRESCANS: list[Callable[[QuantizePass, onnx.GraphProto], None]] = []


def quant_rule(*op_types: str) -> Callable[[QuantRule], QuantRule]:
    """Register `fn` as the integer rule for the ONNX `op_types` (overrides a method rule)."""

    def deco(fn: QuantRule) -> QuantRule:
        for op in op_types:
            _RULES[op] = fn
        return fn

    return deco


def quant_prescan(
    fn: Callable[[QuantizePass, onnx.GraphProto], None],
) -> Callable[[QuantizePass, onnx.GraphProto], None]:
    """Register a prescan (see _PRESCANS)."""
    _PRESCANS.append(fn)
    return fn


def _rule_for(op_type: str) -> Callable[[onnx.NodeProto], None] | None:
    for mod in RULE_MODULES:
        importlib.import_module(mod)
    return _RULES.get(op_type)


def int16_linear_qmax(k: int, bias: np.ndarray | None, amax: float, s_w: np.ndarray) -> int:
    """Largest level q of an int16 linear-layer input (|x_q| <= q, step amax / q) for which
    K products with int8 weights plus the int32 bias cannot overflow int32:
    q (127 K + max_n |b_n| / (amax s_W[n])) + 1 <= 2^31 - 1 (the bias's own rounding <= 1/2)."""
    per_level = 127.0 * k
    if bias is not None and amax > 0:
        per_level += float(np.max(np.abs(np.asarray(bias, np.float64)) / (amax * s_w)))
    return max(127, min(32767, int((2**31 - 2) // per_level)))


def round_half_up(x: np.ndarray) -> np.ndarray:
    return np.floor(np.asarray(x, dtype=np.float64) + 0.5)


@dataclass(frozen=True)
class QTensor:
    """An integer tensor in the output graph and its scale (scalar, or per channel on axis)."""

    name: str
    dtype: str
    scale: np.ndarray
    axis: int | None = None  # channel axis when `scale` is a vector
    encoding: str = "linear"  # "log2": uint8 exponent codes (IntSoftmaxLog2), not q * scale
    # every element's scale (the tensor's shape) where no single axis carries it: a per-channel
    # accumulator moved by Reshape / Transpose / Gather (attention's q / k / v split); `scale`
    # is then unused
    scale_map: np.ndarray | None = None

    @property
    def per_tensor(self) -> bool:
        return self.axis is None and self.scale_map is None


class QuantizePass(Pass):
    """Rewrite a canonical float graph into an integer-only graph in the ``ai.intq`` domain."""

    def __init__(self, calibration: Calibration, config: CompileConfig | None = None) -> None:
        self.cal = calibration
        self.cfg = config or CompileConfig()

    # ------------------------------------------------------------------ driver
    def run(self, model: onnx.ModelProto) -> PassResult:
        g = model.graph
        self.src = model
        self.names = NameGen(g)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.q: dict[str, QTensor] = {}
        self.cache: dict[tuple[str, str, float], QTensor] = {}
        self.uses = consumers(g)
        self.graph_outputs = {o.name for o in g.output}
        self.shapes = {
            vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
            for vi in list(g.input) + list(g.value_info) + list(g.output)
        }
        self.fused: set[str] = set()
        self.anchors: dict[str, QuantRule] = {}
        self.input_ranges: dict[str, tuple[int, int]] = {}
        self.rewrites: list[str] = []
        init_names = {t.name for t in g.initializer}
        in_specs = []
        for inp in g.input:
            if inp.name in init_names:
                continue
            in_specs.append(self._quantize_input(inp))
        _rule_for("")  # imports the rule modules (their prescans register)
        for scan in _PRESCANS:
            scan(self, g)
        for node in topo_sort(g):
            if node.name in self.fused:
                continue
            if node.op_type == "Constant":
                continue
            rule = self.anchors.get(node.name) or _rule_for(node.op_type)
            handler = getattr(self, f"_op_{node.op_type}", None)
            if (rule is None and handler is None) or node.domain not in ("", "ai.onnx"):
                raise UnsupportedOpError(node.op_type, node.name, "no integer rule for this op")
            if rule is not None:
                rule(self, node)
            else:
                handler(node)
        out_specs = [self._graph_output(o) for o in g.output]
        in_specs = [
            dataclasses.replace(s, valid_range=self.input_ranges[s.name])
            if s.name in self.input_ranges
            else s
            for s in in_specs
        ]
        batch = in_specs[0].shape[0] if in_specs and in_specs[0].shape else 1
        sig = boundary.Signature(tuple(in_specs), tuple(out_specs), int(batch))
        qmodel = self._assemble(model, sig)
        return PassResult(qmodel, True, self.rewrites)

    def _assemble(self, model: onnx.ModelProto, sig: boundary.Signature) -> onnx.ModelProto:
        inputs = [
            onnx.helper.make_tensor_value_info(
                s.name, ONNX_DT.get(s.qdtype, TensorProto.INT64), list(s.shape)
            )
            for s in sig.inputs
        ]
        outputs = [
            onnx.helper.make_tensor_value_info(s.name, ONNX_DT[s.qdtype], list(s.shape))
            for s in sig.outputs
        ]
        graph = onnx.helper.make_graph(
            self.nodes, (model.graph.name or "model") + "_int", inputs, outputs, self.inits
        )
        qm = onnx.helper.make_model(
            graph,
            opset_imports=[
                onnx.helper.make_opsetid("", 18),
                onnx.helper.make_opsetid(INTQ_DOMAIN, INTQ_OPSET),
            ],
            producer_name="intq",
        )
        qm.ir_version = min(model.ir_version or 9, 10)
        onnx.helper.set_model_props(
            qm, {boundary.METADATA_KEY: sig.to_json(), TENSOR_MAP_KEY: self._tensor_map()}
        )
        feeds = {s.name: np.zeros(s.shape, dtype=s.qdtype) for s in sig.inputs}
        infer_integer_shapes(qm, feeds)
        onnx.checker.check_model(qm)
        return qm

    def _tensor_map(self) -> str:
        """JSON {float tensor: {"int": integer tensor, "scale": s or [s_c], "axis": a}} for
        every float tensor with a linear integer form: compile-time metadata for error reports
        (real value = int * scale); nothing at run time reads it."""
        out = {}
        for name, qt in self.q.items():
            if qt.encoding != "linear" or qt.scale_map is not None:  # (moved accumulators)
                continue
            sc = np.asarray(qt.scale, dtype=np.float64)
            out[name] = {
                "int": qt.name,
                "scale": float(sc) if sc.ndim == 0 else sc.reshape(-1).tolist(),
                "axis": qt.axis,
            }
        return json.dumps(out)

    # ------------------------------------------------------------------ helpers
    def _amax(self, name: str, dtype: str = "int8") -> float:
        method = self.cfg.calibration if dtype in ("int8", "uint8") else "minmax"
        return self.cal.amax(name, method)

    def _scale_for(self, name: str, dtype: str) -> float:
        return self._amax(name, dtype) / QMAX[dtype]

    def _const(self, base: str, value: np.ndarray) -> str:
        name = self.names(base)
        self.inits.append(numpy_helper.from_array(np.array(value, copy=True, order="C"), name))
        return name

    def _emit(self, op: str, inputs: list[str], out_base: str, node_base: str, **kw) -> str:
        out = self.names(out_base)
        self.nodes.append(make_node(op, inputs, [out], self.names(node_base), **kw))
        return out

    def _get(self, name: str) -> QTensor:
        if name not in self.q:
            raise GraphError(f"tensor {name!r} has no integer form (its producer was not handled)")
        return self.q[name]

    def _const_value(self, name: str) -> np.ndarray | None:
        return get_constant(self.src.graph, name)

    def requant(
        self, qt: QTensor, dtype: str, scale: float, base: str, clip: tuple[int, int] | None = None
    ) -> QTensor:
        """Requantize `qt` to `dtype` at per-tensor `scale` (cached per target)."""
        if qt.encoding != "linear":
            raise UnsupportedOpError(
                "Requantize", qt.name, f"{qt.encoding}-coded tensor can only feed a MatMul"
            )
        key = (qt.name, dtype, float(scale))
        if key in self.cache and clip is None:
            return self.cache[key]
        same = qt.per_tensor and qt.dtype == dtype and float(qt.scale) == float(scale)
        if same and clip is None:
            return qt
        smap = qt.scale_map if qt.scale_map is not None else qt.scale
        ratios = _compact(np.asarray(smap, dtype=np.float64) / scale)
        bc = [fp.quantize_multiplier(float(r)) for r in ratios.reshape(-1)]
        b = np.array([x[0] for x in bc], dtype=np.int32).reshape(ratios.shape)
        c = np.array([x[1] for x in bc], dtype=np.int32).reshape(ratios.shape)
        if np.all(b == b.flat[0]) and np.all(c == c.flat[0]):
            b, c = b.reshape(-1)[:1].reshape(()), c.reshape(-1)[:1].reshape(())
        kw = {"to": ONNX_DT[dtype]}
        if b.ndim == 1 and qt.scale_map is None:
            kw["axis"] = int(qt.axis)
        if clip is not None:
            kw["clip_min"], kw["clip_max"] = int(clip[0]), int(clip[1])
        out = self._emit(
            "Requantize",
            [qt.name, self._const(f"{base}_mult", b), self._const(f"{base}_shift", c)],
            f"{base}_{dtype}",
            f"{base}_requant",
            **kw,
        )
        res = QTensor(out, dtype, np.asarray(scale, dtype=np.float64))
        if clip is None:
            self.cache[key] = res
        return res

    def as_dtype(self, name: str, dtype: str) -> QTensor:
        """The integer form of float tensor `name` as a per-tensor `dtype` tensor."""
        qt = self._get(name)
        if qt.per_tensor and qt.dtype == dtype and qt.encoding == "linear":
            return qt
        return self.requant(qt, dtype, self._scale_for(name, dtype), _base(name))

    def materialize(self, name: str) -> QTensor:
        """A per-tensor form of a per-channel tensor without losing precision: int32 at
        range / 2^OUTPUT_BITS (consumers requantize further as they need)."""
        qt = self._get(name)
        if qt.per_tensor:
            return qt
        return self.requant(qt, "int32", self._amax(name, "int32") / 2**OUTPUT_BITS, _base(name))

    def as_narrow(self, name: str) -> QTensor:
        """int8 (or an existing uint8) per-tensor form, as matmul/conv operands need."""
        qt = self._get(name)
        if qt.per_tensor and qt.dtype in ("int8", "uint8") and qt.encoding == "linear":
            return qt
        return self.as_dtype(name, "int8")

    def _quantize_weight(self, w: np.ndarray, axis: int, base: str) -> tuple[str, np.ndarray]:
        """Symmetric per-channel int8 along `axis`: s[c] = max|W[c]| / 127."""
        w = np.asarray(w, dtype=np.float64)
        red = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        amax = np.abs(w).max(axis=red)
        s = np.where(amax > 0, amax / 127.0, 1.0)
        shape = [1] * w.ndim
        shape[axis % w.ndim] = -1
        wq = np.clip(round_half_up(w / s.reshape(shape)), -127, 127).astype(np.int8)
        return self._const(f"{base}_w_i8", wq), s

    def _quantize_bias(self, b: np.ndarray, scale: np.ndarray, base: str) -> str:
        bq = round_half_up(np.asarray(b, np.float64).reshape(-1) / scale)
        lo, hi = fp.dtype_bounds(np.int32)
        return self._const(f"{base}_b_i32", np.clip(bq, lo, hi).astype(np.int32))

    # ------------------------------------------------------------------ boundary
    def _quantize_input(self, vi: onnx.ValueInfoProto) -> boundary.InputSpec:
        tt = vi.type.tensor_type
        shape = tuple(int(d.dim_value) for d in tt.shape.dim)
        if any(d <= 0 for d in shape):
            raise GraphError(f"input {vi.name!r} must have a static shape, got {shape}")
        np_dt = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np_dt.kind == "f":  # quantized by the graph's first op, from the float32 bits
            # a step below 2^-30 (an input calibrated all zeros) keeps 1 / s a dyadic multiplier
            s = max(self._scale_for(vi.name, "int8"), 2.0**-30)
            b, c = fp.quantize_multiplier(1.0 / s)
            base = _base(vi.name)
            q = self._emit(
                "QuantizeFloatBits",
                [vi.name],
                f"{base}_int8",
                f"{base}_quantize",
                multiplier=b,
                shift=c,
                to=ONNX_DT["int8"],
            )
            self.q[vi.name] = QTensor(q, "int8", np.asarray(s))
            return boundary.InputSpec(vi.name, shape, "float32", "int32", float(s), bits=True)
        if np_dt.kind in "iu":
            self.q[vi.name] = QTensor(vi.name, np_dt.name, np.asarray(1.0))
            return boundary.InputSpec(vi.name, shape, np_dt.name, np_dt.name, None)
        raise GraphError(f"input {vi.name!r} has unsupported dtype {np_dt}")

    def _graph_output(self, vi: onnx.ValueInfoProto) -> boundary.OutputSpec:
        qt = self.materialize(vi.name)
        # integer tensors get derived names, so the graph output's own name is free
        self.nodes.append(
            make_node("Identity", [qt.name], [vi.name], self.names(f"{_base(vi.name)}_out"))
        )
        shape = self.shapes.get(vi.name, ())
        return boundary.OutputSpec(vi.name, shape, qt.dtype, float(qt.scale))

    # ------------------------------------------------------------------ op rules
    def _op_Conv(self, node: onnx.NodeProto) -> None:
        w = self._const_value(node.input[1])
        if w is None:
            raise UnsupportedOpError("Conv", node.name, "weight must be a constant")
        x = self.as_narrow(node.input[0])
        base = _base(node.name or node.output[0])
        wname, sw = self._quantize_weight(w, 0, base)
        acc_scale = float(x.scale) * sw
        ins = [x.name, wname]
        if len(node.input) > 2 and node.input[2]:
            b = self._const_value(node.input[2])
            if b is None:
                raise UnsupportedOpError("Conv", node.name, "bias must be a constant")
            ins.append(self._quantize_bias(b, acc_scale, base))
        a = attrs(node)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise UnsupportedOpError("Conv", node.name, "auto_pad is not supported; use pads")
        kw = {k: a[k] for k in ("strides", "pads", "dilations", "group") if k in a}
        out = self._emit("IntConv", ins, f"{base}_acc", base, **kw)
        self.q[node.output[0]] = QTensor(out, "int32", acc_scale, axis=1)

    def _op_MatMul(self, node: onnx.NodeProto) -> None:
        base = _base(node.name or node.output[0])
        wconst = self._const_value(node.input[1])
        if self._const_value(node.input[0]) is not None:
            raise UnsupportedOpError("MatMul", node.name, "constant left operand")
        if wconst is None and self._get(node.input[0]).encoding == "log2":
            self._log2_matmul(node, base)
            return
        if wconst is None:
            a = self.as_narrow(node.input[0])
            b = self.as_dtype(node.input[1], "int8")
            out = self._emit("IntMatMul", [a.name, b.name], f"{base}_acc", base)
            self.q[node.output[0]] = QTensor(
                out, "int32", np.asarray(float(a.scale) * float(b.scale))
            )
            return
        if wconst.ndim != 2:
            raise UnsupportedOpError("MatMul", node.name, f"weight of rank {wconst.ndim} (need 2)")
        wname, sw = self._quantize_weight(wconst, 1, base)
        bias_add = self._fusable_bias(node, wconst.shape[1])
        if self.cfg.linear_input == "int16" and self._get(node.input[0]).dtype not in (
            "int8",
            "uint8",
        ):  # widening an int8 tensor would add no information
            amax = self._amax(node.input[0], "int16")
            bias = None if bias_add is None else bias_add[1]
            qmax = int16_linear_qmax(int(wconst.shape[0]), bias, amax, sw)
            x = self.requant(self._get(node.input[0]), "int16", amax / qmax, base, (-qmax, qmax))
        else:
            x = self.as_narrow(node.input[0])
        acc_scale = float(x.scale) * sw
        ins = [x.name, wname]
        out_float = node.output[0]
        if bias_add is not None:
            add, bias = bias_add
            ins.append(self._quantize_bias(bias, acc_scale, base))
            self.fused.add(add.name)
            out_float = add.output[0]
            self.rewrites.append(f"{node.name} + {add.name} -> IntMatMul with int32 bias")
        out = self._emit("IntMatMul", ins, f"{base}_acc", base)
        self.q[out_float] = QTensor(out, "int32", acc_scale, axis=-1)

    def _log2_matmul(self, node: onnx.NodeProto, base: str) -> None:
        """Log2-coded attention probabilities times values: IntLog2MatMul (shifts and adds),
        int32 at s_V * 2^-(Z-1)."""
        codes = self._get(node.input[0])
        v = self.as_dtype(node.input[1], "int8")
        bits = self.cfg.softmax_log2_bits
        out = self._emit("IntLog2MatMul", [codes.name, v.name], f"{base}_acc", base, bits=bits)
        scale = float(v.scale) * 2.0 ** -(zero_code(bits) - 1)
        self.q[node.output[0]] = QTensor(out, "int32", np.asarray(scale))
        self.rewrites.append(f"{node.name} -> IntLog2MatMul (log2 attention)")

    def _fusable_bias(self, node: onnx.NodeProto, n: int):
        uses = self.uses.get(node.output[0], [])
        if node.output[0] in self.graph_outputs or len(uses) != 1 or uses[0].op_type != "Add":
            return None
        add = uses[0]
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        b = self._const_value(other)
        if b is None or b.size != n or b.shape[-1:] != (n,):
            return None
        return add, b.reshape(-1)

    def _common_scale(self, node: onnx.NodeProto, dt: str) -> tuple[list[str], float]:
        """Bring every input of `node` (activations and constants) to one per-tensor scale of
        dtype `dt`: s = max(range of each input, range of the output) / qmax(dt)."""
        base = _base(node.name or node.output[0])
        consts = [self._const_value(i) for i in node.input]
        amax = self._amax(node.output[0], dt)
        for i, c in zip(node.input, consts, strict=True):
            amax = max(amax, float(np.abs(c).max()) if c is not None else self._amax(i, dt))
        s = amax / QMAX[dt]
        lo, hi = fp.dtype_bounds(dt)
        ins = []
        for i, c in zip(node.input, consts, strict=True):
            if c is not None:
                cq = np.clip(round_half_up(c / s), lo, hi).astype(dt)
                ins.append(self._const(f"{base}_c", cq))
            else:
                ins.append(self.requant(self._get(i), dt, s, _base(i)).name)
        return ins, s

    def _op_Add(self, node: onnx.NodeProto) -> None:
        """Residual add: both branches requantized to the residual dtype at a common scale."""
        dt = self.cfg.residual_dtype
        ins, s = self._common_scale(node, dt)
        base = _base(node.name or node.output[0])
        y = self._emit("IntAdd", ins, f"{base}_{dt}", base, to=ONNX_DT[dt])
        self.q[node.output[0]] = QTensor(y, dt, np.asarray(s))

    def _scalar_relabel(self, node: onnx.NodeProto, invert: bool) -> None:
        c = self._const_value(node.input[1])
        src = node.input[0]
        if c is None and node.op_type == "Mul":
            c, src = self._const_value(node.input[0]), node.input[1]
        if c is None or c.size != 1 or not float(c.reshape(())) > 0:
            raise UnsupportedOpError(
                node.op_type,
                node.name,
                "only multiplication/division by a positive scalar "
                "constant is supported (it becomes a scale change)",
            )
        k = float(c.reshape(()))
        qt = self._get(src)
        if qt.encoding != "linear":
            raise UnsupportedOpError(
                node.op_type, node.name, f"scaling a {qt.encoding}-coded tensor is not supported"
            )
        factor = 1.0 / k if invert else k
        self.q[node.output[0]] = QTensor(qt.name, qt.dtype, qt.scale * factor, qt.axis)
        self.rewrites.append(f"{node.name}: scalar {node.op_type} folded into the scale")

    def _op_Mul(self, node: onnx.NodeProto) -> None:
        self._scalar_relabel(node, invert=False)

    def _op_Div(self, node: onnx.NodeProto) -> None:
        if self._const_value(node.input[1]) is None:
            raise UnsupportedOpError("Div", node.name, "division by a tensor")
        self._scalar_relabel(node, invert=True)

    def _op_LayerNormalization(self, node: onnx.NodeProto) -> None:
        a = attrs(node)
        base = _base(node.name or node.output[0])
        shape = self.shapes.get(node.input[0])
        axis = int(a.get("axis", -1))
        if shape and axis not in (-1, len(shape) - 1):
            raise UnsupportedOpError("LayerNormalization", node.name, "axis must be the last one")
        gamma = self._const_value(node.input[1])
        beta = self._const_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if gamma is None:
            raise UnsupportedOpError("LayerNormalization", node.name, "scale must be a constant")
        beta = np.zeros_like(gamma) if beta is None else beta
        qt = self._get(node.input[0])
        x = (
            qt
            if (qt.per_tensor and qt.dtype in ("int8", "int16"))
            else self.as_dtype(node.input[0], "int16")
        )
        c = int(gamma.size)
        k = self.cfg.layernorm_frac_bits
        # y = div_round(xc << k, std) is bounded by sqrt(C) * 2^k; keep |y * gamma| < 2^30.
        gbits = 11
        while k > 4 and math.sqrt(c) * 2**k * 2**gbits >= 2**30:
            k -= 1
        gmax = float(np.abs(gamma).max())
        s_g = gmax / (2**gbits - 1) if gmax > 0 else 1.0
        gq = np.clip(round_half_up(gamma / s_g), -(2**gbits - 1), 2**gbits - 1).astype(np.int32)
        s_out = s_g / 2**k
        lo, hi = fp.dtype_bounds(np.int32)
        bq = np.clip(round_half_up(beta / s_out), lo // 2, hi // 2).astype(np.int32)
        eps = float(a.get("epsilon", 1e-5))
        eps_q = int(min(round_half_up(eps / float(x.scale) ** 2), 2**31 - 1))
        y = self._emit(
            "IntLayerNorm",
            [x.name, self._const(f"{base}_gamma", gq), self._const(f"{base}_beta", bq)],
            f"{base}_i32",
            base,
            epsilon=eps_q,
            frac_bits=k,
        )
        self.q[node.output[0]] = QTensor(y, "int32", np.asarray(s_out))

    def _op_Softmax(self, node: onnx.NodeProto) -> None:
        a = attrs(node)
        shape = self.shapes.get(node.input[0])
        if shape and int(a.get("axis", -1)) not in (-1, len(shape) - 1):
            raise UnsupportedOpError("Softmax", node.name, "axis must be the last one")
        base = _base(node.name or node.output[0])
        f = self.cfg.softmax_frac_bits
        qt = self._get(node.input[0])
        # z = x * s * log2(e) in fixed point with F fraction bits: softmax = 2^z / sum 2^z
        z = self.requant(qt, "int32", 1.0 / (LOG2E * 2**f), f"{base}_exp2in")
        if self.cfg.softmax_out == "log2":
            bits = self.cfg.softmax_log2_bits
            y = self._emit("IntSoftmaxLog2", [z.name], f"{base}_log2", base, frac_bits=f, bits=bits)
            scale = np.asarray(2.0 ** -(zero_code(bits) - 1))
            self.q[node.output[0]] = QTensor(y, "uint8", scale, encoding="log2")
            return
        y = self._emit("IntSoftmax", [z.name], f"{base}_u8", base, frac_bits=f)
        self.q[node.output[0]] = QTensor(y, "uint8", np.asarray(2.0**-SOFTMAX_OUT_BITS))

    def _op_Gelu(self, node: onnx.NodeProto) -> None:
        base = _base(node.name or node.output[0])
        x = self.as_dtype(node.input[0], "int8")
        s_x = float(x.scale)
        f = self.cfg.gelu_frac_bits
        slope = GELU_SIGMOID_SLOPE * LOG2E * s_x
        while f < 24 and slope * 2**f < 2**12:  # keep alpha's rounding error below 2^-12
            f += 1
        alpha = int(round_half_up(slope * 2**f))
        y = self._emit("IntGELU", [x.name], f"{base}_i32", base, alpha=max(alpha, 1), frac_bits=f)
        self.q[node.output[0]] = QTensor(y, "int32", np.asarray(s_x / 2**fp.EXP2_BITS))

    def _op_Relu(self, node: onnx.NodeProto) -> None:
        """ReLU folded into a requantization's saturation: clip to [0, 127] at the output's
        calibrated int8 scale."""
        self._clipped(node, 0.0, None)

    def _op_Clip(self, node: onnx.NodeProto) -> None:
        lo = self._const_value(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        hi = self._const_value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        for k, name in ((1, lo), (2, hi)):
            if len(node.input) > k and node.input[k] and name is None:
                raise UnsupportedOpError("Clip", node.name, "bounds must be constants")
        self._clipped(node, None if lo is None else float(lo), None if hi is None else float(hi))

    def _clipped(self, node: onnx.NodeProto, lo: float | None, hi: float | None) -> None:
        base = _base(node.name or node.output[0])
        s = self._scale_for(node.output[0], "int8")
        qlo = -128 if lo is None else int(np.clip(np.ceil(lo / s - 0.5), -128, 127))
        qhi = 127 if hi is None else int(np.clip(np.floor(hi / s + 0.5), -128, 127))
        qt = self.requant(self._get(node.input[0]), "int8", s, base, clip=(qlo, qhi))
        self.q[node.output[0]] = qt

    def _op_ReduceMean(self, node: onnx.NodeProto) -> None:
        a = attrs(node)
        axes = a.get("axes")
        if len(node.input) > 1 and node.input[1]:
            axes = self._const_value(node.input[1])
            if axes is None:
                raise UnsupportedOpError("ReduceMean", node.name, "axes must be constant")
        if axes is None or len(np.atleast_1d(axes)) == 0:
            raise UnsupportedOpError("ReduceMean", node.name, "reduction over all axes")
        qt = self._get(node.input[0])
        if not qt.per_tensor:
            qt = self.materialize(node.input[0])
        base = _base(node.name or node.output[0])
        y = self._emit(
            "IntMean",
            [qt.name],
            f"{base}_i32",
            base,
            axes=[int(v) for v in np.atleast_1d(axes)],
            keepdims=int(a.get("keepdims", 1)),
        )
        self.q[node.output[0]] = QTensor(y, "int32", qt.scale)

    # data movement ---------------------------------------------------------------
    def _movement(self, node: onnx.NodeProto) -> None:
        qt = self._get(node.input[0])
        axis = qt.axis
        if qt.axis is not None:
            axis = self._track_axis(node, qt.axis)
            if axis is None and self._feeds_activation_matmuls(node.input[0]):
                qt = dataclasses.replace(qt, axis=None, scale_map=self._full_scale(qt, node))
            elif axis is None:  # channel axis does not survive: materialize per-tensor first
                qt = self.materialize(node.input[0])
        ins = [qt.name] + [self._copy_const(i) for i in node.input[1:]]
        base = _base(node.name or node.output[0])
        y = self._emit(node.op_type, ins, f"{base}_{qt.dtype}", base, **attrs(node))
        if qt.scale_map is not None:  # move the scales with the elements
            consts = [self._const_value(i) if i else None for i in node.input[1:]]
            moved = lookup(node).reference([qt.scale_map, *consts], lookup(node).attrs_of(node))
            smap = moved[0]
            if np.all(smap == smap.flat[0]):  # one scale left (a q / k / v head): per tensor
                self.q[node.output[0]] = QTensor(y, qt.dtype, np.asarray(smap.flat[0]))
            else:
                self.q[node.output[0]] = QTensor(y, qt.dtype, qt.scale, scale_map=smap)
            return
        self.q[node.output[0]] = QTensor(
            y, qt.dtype, qt.scale, axis if not qt.per_tensor else None, qt.encoding
        )

    def _full_scale(self, qt: QTensor, node: onnx.NodeProto) -> np.ndarray:
        """Every element's scale of per-channel `qt` (the shape of `node`'s input)."""
        shape = self.shapes[node.input[0]]
        sv = np.asarray(qt.scale, dtype=np.float64).reshape(-1)
        view = [1] * len(shape)
        view[int(qt.axis) % len(shape)] = sv.size
        return np.broadcast_to(sv.reshape(view), shape).copy()

    def _feeds_activation_matmuls(self, name: str) -> bool:
        """True when `name` (a per-channel accumulator whose channel axis a data movement
        loses) reaches, through data movement only, nothing but MatMuls of two activations
        (attention's q / k / v split): each such operand is requantized to int8 anyway, so the
        scales can travel with the elements (`QTensor.scale_map`) and one Requantize per head
        replaces materializing an int32 tensor and requantizing it again."""
        todo, seen = [name], 0
        while todo:
            t = todo.pop()
            if t in self.graph_outputs or not self.uses.get(t):
                return False
            for user in self.uses[t]:
                if user.op_type in MOVEMENT_OPS + ("Gather", "Slice") and user.input[0] == t:
                    if any(self._const_value(i) is None for i in user.input[1:] if i):
                        return False
                    todo.append(user.output[0])
                elif user.op_type == "MatMul" and all(
                    self._const_value(i) is None for i in user.input
                ):
                    seen += 1
                else:
                    return False
        return seen > 0

    def _track_axis(self, node: onnx.NodeProto, axis: int) -> int | None:
        """Where channel `axis` of the input lands in the output, if it survives intact.
        Selections (Gather, Slice) may cut the channel axis: never tracked."""
        if node.op_type in ("Gather", "Slice"):
            return None
        sin, sout = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        if not sin or not sout:
            return None
        axis %= len(sin)
        if node.op_type == "Transpose":
            perm = attrs(node).get("perm") or list(range(len(sin)))[::-1]
            return list(perm).index(axis)
        before = int(np.prod(sin[:axis]))
        for j in range(len(sout)):
            if int(np.prod(sout[:j])) == before and sout[j] == sin[axis]:
                return j
        return None

    def _copy_const(self, name: str) -> str:
        if not name:
            return ""
        v = self._const_value(name)
        if v is None:
            raise GraphError(f"expected a constant operand, got activation {name!r}")
        if v.dtype.kind == "f":
            raise GraphError(f"float constant {name!r} used as a shape/index operand")
        return self._const(_base(name), v)

    _op_Reshape = _op_Transpose = _op_Flatten = _movement
    _op_Squeeze = _op_Unsqueeze = _op_Identity = _movement

    _op_Gather = _op_Slice = _movement

    def _op_Concat(self, node: onnx.NodeProto) -> None:
        wide = any(
            self._const_value(i) is None and self._get(i).dtype not in ("int8", "uint8")
            for i in node.input
        )
        dt = self.cfg.residual_dtype if wide else "int8"
        ins, s = self._common_scale(node, dt)
        base = _base(node.name or node.output[0])
        y = self._emit("Concat", ins, f"{base}_{dt}", base, axis=int(attrs(node)["axis"]))
        self.q[node.output[0]] = QTensor(y, dt, np.asarray(s))


def _compact(r: np.ndarray) -> np.ndarray:
    """`r` with every axis along which it is constant reduced to length 1 (a multiplier that
    still broadcasts to the tensor, as small as it can be)."""
    for ax in range(r.ndim):
        first = np.take(r, [0], axis=ax)
        if np.all(r == first):
            r = first
    return r


def _base(name: str) -> str:
    """A readable, ONNX-safe base for derived names."""
    keep = "".join(ch if ch.isalnum() or ch in "_." else "_" for ch in name.strip("/"))
    return keep or "t"
