"""Run prepared kernel cases with the TVM runtime alone and compare them with the reference.

    python tests/test_cpu_amx.py --prepare DIR     # here: build each case, save .so + .npz
    python benchmarks/run_cases.py DIR             # there (runtime only, e.g. the device Xeon)

Each DIR/NAME.so is called as vm["main"](inputs...) with the arrays of DIR/NAME.npz other than
"want" (in their saved order); the output must equal "want" (the reference interpreter's)
element for element. Exit status: the number of cases that differ.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from intq.codegen import compat


def run(folder: str) -> int:
    bad = 0
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".so"):
            continue
        name = fname[:-3]
        data = np.load(os.path.join(folder, f"{name}.npz"))
        vm = compat.virtual_machine(compat.load_executable(os.path.join(folder, fname)))
        args = [compat.to_device_tensor(data[k]) for k in data.files if k != "want"]
        got = compat.to_numpy(vm["main"](*args))
        diff = int(np.count_nonzero(got != data["want"]))
        bad += diff > 0
        print(f"{name}: {'bit-exact' if diff == 0 else f'{diff} of {got.size} elements differ'}")
    return bad


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))
