"""Small CNNs on the 8x8 digits, trained in float and compiled integer-only: the accuracy check
shared by `examples/cnn_digits.py` and the slow test.

:func:`digits_cnn_report` trains :func:`intq.models.resnet.resnet_digits` or
:func:`intq.models.repvgg.repvgg_digits` (RepVGG in its train-time multi-branch form) with
:func:`intq.models.digits.train_classifier`, compiles it with `intq.compile` (the RepVGG blocks
are folded into single convs from the exported graph), and scores FP32 and integer-only top-1
accuracy on the held-out split.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .digits import DigitsSplit, evaluate, load_digits_split, train_classifier
from .repvgg import repvgg_digits
from .resnet import resnet_digits

BUILDERS = {"resnet": resnet_digits, "repvgg": repvgg_digits}


@dataclass(frozen=True)
class DigitsCNNReport:
    kind: str
    fp32_acc: float  # percent
    int_acc: float  # percent, integer-only model on cpu-int8
    agreement: float  # percent of test images where both predict the same class
    train_s: float
    compile_s: float
    float_ops: tuple[str, ...]  # the float graph that was quantized (after folding)
    lib: object  # the CompiledModel

    def line(self) -> str:
        return (
            f"{self.kind:7s} FP32 {self.fp32_acc:6.2f}%  integer-only {self.int_acc:6.2f}%  "
            f"(delta {self.int_acc - self.fp32_acc:+.2f} points, agreement {self.agreement:.2f}%)"
            f"  train {self.train_s:.0f} s, compile {self.compile_s:.0f} s"
        )


def digits_cnn_report(
    kind: str,
    epochs: int = 15,
    seed: int = 0,
    split: DigitsSplit | None = None,
    batch: int = 64,
    threads: int = 2,
) -> DigitsCNNReport:
    """Train the `kind` ("resnet" | "repvgg") digits CNN, compile it, and score both."""
    import intq

    split = split or load_digits_split()
    torch.manual_seed(seed)
    model = BUILDERS[kind]()
    t0 = time.perf_counter()
    model = train_classifier(model, split, epochs, 3e-3, seed, threads=threads)
    train_s = time.perf_counter() - t0
    fp32 = evaluate(model, split.x_test, split.y_test)
    x_train = split.x_train.numpy()
    calib = [x_train[i : i + batch] for i in range(0, len(x_train), batch)]
    t0 = time.perf_counter()
    lib = intq.compile(model, torch.as_tensor(x_train[:batch]), calibration=calib)
    compile_s = time.perf_counter() - t0
    x_test = split.x_test.numpy()
    logits = np.asarray(lib.run(x_test))
    pred = logits.argmax(-1)
    with torch.no_grad():
        fpred = model(split.x_test).argmax(-1).numpy()
    y = split.y_test.numpy()
    return DigitsCNNReport(
        kind,
        fp32,
        100.0 * float((pred == y).mean()),
        100.0 * float((pred == fpred).mean()),
        train_s,
        compile_s,
        tuple(n.op_type for n in lib.float_onnx.graph.node),
        lib,
    )
