"""Codegen: integer ONNX -> TVM Relax -> per-target executables (see build.TARGETS)."""

from intq.codegen.build import TARGETS, Build, build

__all__ = ["TARGETS", "Build", "build"]
