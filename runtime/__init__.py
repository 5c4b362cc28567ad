"""Load and run intq artifacts with the TVM runtime only.

    from intq import runtime
    model = runtime.load("deit_s.so")
    logits = model.run(images)            # float in, integer out; model.dequantize(logits)

Importing this package before `tvm` sets TVM_USE_RUNTIME_LIB=1, so the process maps
libtvm_runtime + libtvm_ffi and never the compiler library. Imports numpy and tvm only.
"""

from __future__ import annotations

import os
import sys

if "tvm" not in sys.modules:  # a deployment process: keep the compiler library out
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")

from intq.runtime.executor import Executor, load  # noqa: E402

__all__ = ["Executor", "load"]
