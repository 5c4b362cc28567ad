"""How an intq artifact's run time depends on what came just before it: back to back, after
the input quantizer, after sleeping, and the calls after an idle gap (why benchmarks/cpu.py
idles --gap-ms and then makes --turn-warmup untimed calls). Runtime only.

    taskset -c 0,1 python3 benchmarks/idle.py MODEL.so --threads 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from artifact import load, median_ms  # noqa: E402 - shared with kernels.py / ab.py


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from intq import boundary

    ex, xs, dev_args = load(args.artifact, args.threads)
    specs = ex.signature.inputs
    main_fn = ex._vm["main"]

    def vm_main() -> None:
        main_fn(*dev_args)

    def quantize() -> None:
        boundary.quantize_inputs(specs, xs)

    print(f"VM main back to back     {median_ms(vm_main):8.2f} ms")
    print(f"input quantizer          {median_ms(quantize):8.2f} ms")
    print(f"VM main after quantizer  {median_ms(vm_main, before=quantize):8.2f} ms")
    for ms in (1, 10, 300):
        after = median_ms(
            vm_main, calls=5 if ms == 300 else 15, before=lambda s=ms: time.sleep(s / 1e3)
        )
        print(f"VM main after {ms:3d} ms idle {after:8.2f} ms")
    print(f"Executor.run back to back {median_ms(lambda: ex.run(*xs)):7.2f} ms")
    for _ in range(4):
        time.sleep(0.3)
        row = []
        for _ in range(4):
            t = time.perf_counter()
            ex.run(*xs)
            row.append(f"{(time.perf_counter() - t) * 1e3:.2f}")
        print("Executor.run x4 after 300 ms idle:", ", ".join(row))


if __name__ == "__main__":
    main()
