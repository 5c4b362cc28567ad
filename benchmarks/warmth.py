"""Each kernel's time inside whole-model runs (the VM's instrument hook), with the machine as
the model leaves it ("cold") against the same call after something warmed it: the main thread
reading the dense kernels' weights ("weights") or every input of every kernel ("inputs"); one
extra call of the kernel itself ("self"); a replay of the kernel before it ("prev"). Modes
interleave per run; every mode leaves the outputs unchanged. (Replaying the previous kernel
after the extra call is not offered: the extra call may write where the memory plan reused a
dead input of the previous kernel.) A probe of where in-model time goes, not a speed claim (no
peer). Runtime only.

    taskset -c 0,1 python3 benchmarks/warmth.py MODEL.so --threads 2 --rounds 5
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import artifact  # noqa: E402 - shared loading (inputs its signature accepts)

MODES = ("cold", "weights", "inputs", "self", "prev")


def _read_lines(tensor, sink: list[int]) -> None:
    """Read one byte per 64-byte line of a CPU tensor (brings it into this core's caches)."""
    try:
        a = np.from_dlpack(tensor)
    except (TypeError, ValueError, BufferError, RuntimeError):
        return
    if a.flags.c_contiguous and a.nbytes >= 4096:
        sink[0] += int(a.reshape(-1).view(np.uint8)[::64].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2, help="runs per mode per round")
    args = ap.parse_args()

    ex, _, vm_args = artifact.load(args.artifact, args.threads)
    total = {m: collections.Counter() for m in MODES}
    count: collections.Counter[str] = collections.Counter()
    state = {"mode": "cold", "last": None}
    started: list[float] = []
    sink = [0]

    def hook(func, symbol, before, ret, *a) -> int:
        name = str(symbol)
        kernel = not name.startswith("vm.builtin")
        mode = state["mode"]
        if before:
            if kernel and mode == "weights" and "dense" in name and len(a) > 1:
                _read_lines(a[1], sink)
            elif kernel and mode == "inputs":
                for t in a[:-1]:
                    _read_lines(t, sink)
            if kernel and mode == "self":
                func(*a)  # rewrites its own output with the same values
            if kernel and mode == "prev" and state["last"] is not None:
                prev_func, prev_args = state["last"]
                prev_func(*prev_args)  # nothing ran since: its inputs are as it read them
            started.append(time.perf_counter())
        else:
            group = artifact.kernel_group(name)
            total[mode][group] += time.perf_counter() - started.pop()
            if mode == "cold":
                count[group] += 1
            if kernel:
                state["last"] = (func, a)
        return 0  # VMInstrumentReturnKind.kNoOp

    ex._vm.set_instrument(hook)
    main_fn = ex._vm["main"]
    for mode in MODES:  # one untimed run per mode
        state["mode"] = mode
        main_fn(*vm_args)
    for mode in MODES:
        total[mode].clear()
    count.clear()
    for _ in range(args.rounds):
        for mode in MODES:
            state["mode"] = mode
            for _ in range(args.calls):
                main_fn(*vm_args)
    n = args.rounds * args.calls
    print(f"{'kernel (ms per run)':28s} {'calls':>5s} " + " ".join(f"{m:>9s}" for m in MODES))
    kernels = [g for g, _ in total["cold"].most_common() if not g.startswith("vm.builtin")]
    for g in kernels[:10]:
        cells = " ".join(f"{total[m][g] / n * 1e3:9.3f}" for m in MODES)
        print(f"{g:28s} {count[g] // n:5d} {cells}")
    sums = " ".join(f"{sum(total[m][g] for g in kernels) / n * 1e3:9.3f}" for m in MODES)
    print(f"{'all kernels':28s} {'':5s} {sums}")


if __name__ == "__main__":
    main()
