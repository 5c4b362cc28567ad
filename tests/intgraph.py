"""A one-output integer ONNX graph (standard + intq ops) built from nodes, example feeds and
constants, shapes inferred by the reference's shape rules, checked by onnx: shared by the
kernel tests (and `python tests/test_cpu_amx.py --prepare`)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from intq.ir import INTQ_DOMAIN
from intq.reference import infer_integer_shapes


def integer_graph(
    nodes, feeds: dict[str, np.ndarray], consts: dict[str, np.ndarray], name: str = "t"
) -> tuple[onnx.ModelProto, str]:
    """(model, output name): the last node's first output is the graph output."""
    out = nodes[-1].output[0]
    g = helper.make_graph(
        nodes,
        name,
        [
            helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
            for k, v in feeds.items()
        ],
        [helper.make_tensor_value_info(out, TensorProto.INT32, None)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    m = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(INTQ_DOMAIN, 1)]
    )
    infer_integer_shapes(m, feeds)
    onnx.checker.check_model(m)
    return m, out
