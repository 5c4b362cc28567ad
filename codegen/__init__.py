"""Codegen: integer ONNX -> TVM Relax -> per-target executables (see build.TARGETS).

`build` loads lazily so `intq.codegen.compat` stays importable in a runtime-only process.
"""

from typing import Any

__all__ = ["TARGETS", "Build", "build"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from intq.codegen import build as _build_mod

        return getattr(_build_mod, name)
    raise AttributeError(f"module 'intq.codegen' has no attribute {name!r}")
