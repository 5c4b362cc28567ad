"""Run an exported artifact on inputs stored as .npy, in a runtime-only process.

    python -m intq.runtime model.so --input x.npy [--input ids.npy ...] --output y.npy

Prints the signature and whether TVM's compiler library is mapped (it must not be).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from intq import runtime
from intq.codegen import compat


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m intq.runtime", description=__doc__)
    ap.add_argument("artifact")
    ap.add_argument("--input", action="append", default=[], help=".npy file, one per input")
    ap.add_argument("--output", help=".npy file for the (first) integer output")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    model = runtime.load(args.artifact, threads=args.threads)
    print(f"signature: {model.signature.describe()} (batch {model.signature.batch})")
    if args.input:
        y = model.run(*[np.load(p) for p in args.input])
        first = y if isinstance(y, np.ndarray) else y[0]
        if args.output:
            np.save(args.output, first)
        print(f"output: {first.dtype}{list(first.shape)}")
    print(f"compiler library loaded: {compat.compiler_loaded()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
