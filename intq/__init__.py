"""intq: an integer-only inference compiler.

    lib = intq.compile(model, example_input, calibration=batches, target="cpu-int8")
    lib.export("model.so")            # later, elsewhere: intq.runtime.load("model.so").run(x)

Heavy parts (torch, onnx, the TVM compiler) load lazily, so `import intq.runtime` on a device
pulls in numpy and the TVM runtime only.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "compile": ("intq.api", "compile"),
    "CompiledModel": ("intq.api", "CompiledModel"),
    "CompileConfig": ("intq.config", "CompileConfig"),
    "reference_run": ("intq.reference", "reference_run"),
    "check_integer_only": ("intq.check", "check_integer_only"),
    "errors": ("intq.errors", None),
}

__all__ = [*_LAZY, "runtime"]


def __getattr__(name: str) -> Any:
    if name == "runtime":
        import importlib

        return importlib.import_module("intq.runtime")
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        m = importlib.import_module(mod)
        return m if attr is None else getattr(m, attr)
    raise AttributeError(f"module 'intq' has no attribute {name!r}")
