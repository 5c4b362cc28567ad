"""Typed errors. Every error names what is at fault: the node, the op, the input, shape or dtype."""

from __future__ import annotations


class IntqError(Exception):
    """Base class of every error intq raises on purpose."""


class UnsupportedOpError(IntqError):
    """The graph holds an op (or an op configuration) that intq cannot make integer-only."""

    def __init__(self, op_type: str, node_name: str, detail: str = "") -> None:
        self.op_type = op_type
        self.node_name = node_name
        msg = f"unsupported op {op_type!r} at node {node_name!r}"
        super().__init__(msg + (f": {detail}" if detail else ""))


class GraphError(IntqError):
    """The ONNX graph is malformed or not in the form a pass expects."""


class CalibrationError(IntqError):
    """Calibration data is missing, empty or does not match the model's inputs."""


class InputSignatureError(IntqError):
    """An input given to `run` does not match the compiled signature."""


class InputValueError(InputSignatureError):
    """An integer input holds a value outside its valid range (e.g. a token id outside the
    vocabulary): `input` names the input, `value` is the first offending value."""

    def __init__(self, message: str, input_name: str, value: int) -> None:
        super().__init__(message)
        self.input = input_name
        self.value = value


class IntegerOnlyViolation(IntqError):
    """A float tensor or float op was found where only integers are allowed."""


class LoweringError(IntqError):
    """An integer ONNX node could not be lowered to TVM Relax."""


class ArtifactError(IntqError):
    """An exported artifact is missing, incomplete or from an incompatible intq version."""


class ConfigError(IntqError, ValueError):
    """A configuration value is out of range or of the wrong kind."""
