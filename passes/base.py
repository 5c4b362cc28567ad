"""Pass infrastructure: a pass maps a model to a `PassResult`; a `PassManager` runs a list.

Pattern passes follow pattern -> check -> rewrite: every candidate that matched the pattern but
failed a check is recorded in `PassResult.skipped` with the reason, so "why did my LayerNorm not
fuse?" has an answer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import onnx


@dataclass
class PassResult:
    model: onnx.ModelProto
    modified: bool
    rewrites: list[str] = field(default_factory=list)
    """One line per rewrite that fired (node names involved)."""
    skipped: list[str] = field(default_factory=list)
    """One line per candidate that matched the pattern but failed a check, with the reason."""


class Pass(ABC):
    """A graph-to-graph transformation. Subclasses implement `run`; they may edit in place."""

    @property
    def name(self) -> str:
        return type(self).__name__

    @abstractmethod
    def run(self, model: onnx.ModelProto) -> PassResult: ...

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        return self.run(model)


@dataclass
class PassManager:
    """Run passes in order; `fixpoint=True` repeats the list until no pass modifies the model."""

    passes: list[Pass]
    fixpoint: bool = False
    max_iterations: int = 10
    log: list[str] = field(default_factory=list)

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        any_modified = False
        all_rewrites: list[str] = []
        all_skipped: list[str] = []
        for _ in range(self.max_iterations if self.fixpoint else 1):
            round_modified = False
            for p in self.passes:
                res = p(model)
                model = res.model
                round_modified |= res.modified
                all_rewrites += [f"{p.name}: {r}" for r in res.rewrites]
                all_skipped += [f"{p.name}: {s}" for s in res.skipped]
            any_modified |= round_modified
            if not round_modified:
                break
        self.log = all_rewrites + all_skipped
        return PassResult(model, any_modified, all_rewrites, all_skipped)
