"""Integer-only CNNs on the digits: a small ResNet, and a RepVGG trained in its multi-branch
form and compiled folded (one 3x3 conv per block). Prints FP32 vs integer-only accuracy.

    python examples/cnn_digits.py [--epochs N]
"""

from __future__ import annotations

import argparse

from intq.models.cnn_digits import digits_cnn_report
from intq.models.digits import load_digits_split


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    split = load_digits_split()
    for kind in ("resnet", "repvgg"):
        r = digits_cnn_report(kind, args.epochs, args.seed, split)
        ops = r.float_ops
        print(r.line())
        print(
            f"        float graph compiled: {ops.count('Conv')} Conv, {ops.count('Add')} Add, "
            f"{ops.count('BatchNormalization')} BatchNormalization"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
