"""Model intake: torch.nn.Module / onnx.ModelProto / .onnx path -> float ONNX, and shape inference.

`to_onnx` gives an ONNX model at opset >= `opset` with static shapes (those of the example
inputs for torch modules); `infer_shapes` annotates every tensor with its dtype and shape.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from intq.errors import GraphError

_DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ONNX domain the model imports (0 when it imports none)."""
    return max((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), default=0)


def to_onnx(model: Any, example_inputs: Any = None, *, opset: int = 18) -> onnx.ModelProto:
    """`model` as an ONNX model whose default-domain opset is at least `opset`.

    model: a torch.nn.Module (exported with the dynamo exporter, in eval mode, with static
        shapes equal to `example_inputs`: a tensor / array or a tuple of them), an
        onnx.ModelProto (copied), or a path to an .onnx file; for these, given
        `example_inputs` pin the symbolic input dimensions. ONNX models at a lower opset are
        upgraded with onnx.version_converter; local functions are inlined; graph inputs that
        shadow an initializer (old exporters' weights-as-inputs) are dropped, so the
        initializers are constants.
    Raises GraphError (chained to the cause) naming what failed.
    """
    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        src = "the given onnx.ModelProto"
    elif isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise GraphError(f"cannot load ONNX model: no such file {path!r}")
        try:
            proto = onnx.load(path)
        except Exception as e:
            raise GraphError(f"cannot load ONNX model from {path!r}: {e}") from e
        src = repr(path)
    elif _is_torch_module(model):
        proto = _export_torch(model, example_inputs, opset)
        src = f"the export of {type(model).__name__}"
    else:
        raise GraphError(
            "to_onnx expects a torch.nn.Module, an onnx.ModelProto or a path to an .onnx file, "
            f"got {type(model).__name__}"
        )
    if not proto.graph.node:
        raise GraphError(f"{src} has an empty graph")
    init = {t.name for t in proto.graph.initializer}
    for i in [i for i in proto.graph.input if i.name in init]:
        proto.graph.input.remove(i)
    if example_inputs is not None and not _is_torch_module(model):
        _pin_input_shapes(proto, example_inputs, src)
    if proto.functions:
        try:
            proto = onnx.inliner.inline_local_functions(proto)
        except Exception as e:
            raise GraphError(f"cannot inline the local functions of {src}: {e}") from e
    have = default_opset(proto)
    if have < opset:
        try:
            proto = onnx.version_converter.convert_version(proto, opset)
        except Exception as e:
            raise GraphError(f"cannot convert {src} from opset {have} to {opset}: {e}") from e
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise GraphError(f"{src} is not a valid ONNX model: {e}") from e
    return proto


def _pin_input_shapes(proto: onnx.ModelProto, example_inputs: Any, src: str) -> None:
    """Set the graph inputs' dimensions to the example inputs' shapes (they must fit)."""
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    inputs = list(proto.graph.input)
    if len(items) != len(inputs):
        raise GraphError(f"{src} has {len(inputs)} inputs, got {len(items)} example inputs")
    for vi, x in zip(inputs, items, strict=True):
        shape = tuple(int(s) for s in getattr(x, "shape", np.shape(x)))
        tt = vi.type.tensor_type
        dims = tt.shape.dim
        if tt.HasField("shape") and (
            len(dims) != len(shape)
            or any(
                d.HasField("dim_value") and d.dim_value != s
                for d, s in zip(dims, shape, strict=True)
            )
        ):
            have = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
            raise GraphError(
                f"example input of shape {list(shape)} does not fit input "
                f"{vi.name!r} {have} of {src}"
            )
        del dims[:]
        for s in shape:
            dims.add().dim_value = s


def _is_torch_module(obj: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(obj, torch.nn.Module)


def _as_tensors(example_inputs: Any) -> tuple[Any, ...]:
    import torch

    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    out = []
    for k, x in enumerate(items):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (np.ndarray, np.generic)):
            out.append(torch.from_numpy(np.ascontiguousarray(x)))
        else:
            raise GraphError(
                f"example input {k} must be a torch.Tensor or a numpy array, got {type(x).__name__}"
            )
    if not out:
        raise GraphError("to_onnx needs at least one example input for a torch module")
    return tuple(out)


def _input_names(module: Any, n: int) -> list[str]:
    """forward's positional parameter names when they cover the inputs, else input_0, ..."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in params[:n] if p.kind in positional]
    if len(names) == n and all(s.isidentifier() for s in names):
        return names
    return [f"input_{k}" for k in range(n)]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter: its prints, its warnings and torch / onnxscript logging below
    CRITICAL (an export failure is reported by the GraphError raised instead)."""
    names = ["torch", "onnxscript", *logging.Logger.manager.loggerDict]
    loggers = [logging.getLogger(n) for n in names if n.split(".")[0] in ("torch", "onnxscript")]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _export_torch(module: Any, example_inputs: Any, opset: int) -> onnx.ModelProto:
    import torch

    args = _as_tensors(example_inputs)
    names = _input_names(module, len(args))
    was_training = module.training
    module.eval()
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=names,
                verbose=False,
                external_data=False,
            )
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        return program.model_proto
    except GraphError:
        raise
    except Exception as e:
        shapes = ", ".join(str(tuple(a.shape)) for a in args)
        raise GraphError(
            f"torch.onnx.export (dynamo, opset {opset}) failed for {type(module).__name__} "
            f"on inputs of shape {shapes}: {type(e).__name__}: {e}"
        ) from e
    finally:
        module.train(was_training)


# --------------------------------------------------------------------------------- shapes
def _dims(vi: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)


def _is_static(vi: onnx.ValueInfoProto) -> bool:
    d = _dims(vi)
    return d is not None and None not in d and vi.type.tensor_type.elem_type != 0


def _infer(model: onnx.ModelProto, strict: bool) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(
        model, check_type=strict, strict_mode=strict, data_prop=True
    )


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose value_info gives dtype and shape of every tensor.

    Runs onnx shape inference (strict, with data propagation; non-strict if strict fails).
    When every graph input has a static shape, tensors that inference leaves without a static
    shape are measured by running the model in onnxruntime on two different random inputs; a
    tensor whose shape differs between the runs (data dependent) raises GraphError.
    """
    try:
        out = _infer(model, strict=True)
    except Exception as strict_err:
        bare = onnx.ModelProto()
        bare.CopyFrom(model)
        del bare.graph.value_info[:]
        try:
            out = _infer(bare, strict=False)
        except Exception as e:
            raise GraphError(
                f"ONNX shape inference failed (strict: {strict_err}; non-strict: {e})"
            ) from e
    g = out.graph
    init = {t.name for t in g.initializer}
    if not all(_is_static(i) for i in g.input if i.name not in init):
        return out
    known = {vi.name for vi in [*g.input, *g.value_info, *g.output] if _is_static(vi)} | init
    missing = [o for n in g.node for o in n.output if o and o not in known]
    if missing:
        measured = _measure(out, missing)
        graph_outs = {o.name: o for o in g.output}
        vis = {vi.name: vi for vi in g.value_info}
        for name, (et, shape) in measured.items():
            vi = helper.make_tensor_value_info(name, et, list(shape))
            if name in graph_outs:
                graph_outs[name].type.CopyFrom(vi.type)
            elif name in vis:
                vis[name].type.CopyFrom(vi.type)
            else:
                g.value_info.append(vi)
    return out


def _random_feeds(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    init = {t.name for t in model.graph.initializer}
    feeds = {}
    for i in model.graph.input:
        if i.name in init:
            continue
        dt = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        shape = [int(d) for d in _dims(i) or ()]
        if np.issubdtype(dt, np.floating):  # run 1 zeroes about half: NonZero & co differ
            a = rng.standard_normal(shape)
            feeds[i.name] = np.where(rng.random(shape) < 0.5 * seed, 0.0, a).astype(dt)
        else:  # ids / masks / flags: 0 then 1 (valid for any index or boolean input)
            feeds[i.name] = np.full(shape, seed, dtype=dt)
    return feeds


def _measure(model: onnx.ModelProto, names: Sequence[str]) -> dict[str, tuple[int, tuple]]:
    """dtype and shape of tensors `names`, from two onnxruntime runs on random inputs."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    outs = {o.name for o in m.graph.output}
    for n in names:
        if n not in outs:
            m.graph.output.append(helper.make_empty_tensor_value_info(n))
    out_names = [o.name for o in m.graph.output]
    runs = []
    try:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        for seed in (0, 1):
            res = sess.run(out_names, _random_feeds(m, seed))
            runs.append({k: np.asarray(v) for k, v in zip(out_names, res, strict=True)})
    except Exception as e:
        raise GraphError(
            f"shape inference left {len(names)} tensors without a static shape "
            f"(e.g. {list(names)[:3]}) and running the model to measure them failed: {e}"
        ) from e
    result = {}
    for n in names:
        a, b = runs[0][n], runs[1][n]
        if a.shape != b.shape:
            raise GraphError(
                f"tensor {n!r} has a data-dependent shape ({a.shape} vs {b.shape}); "
                "intq needs static shapes"
            )
        result[n] = (helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
    return result
