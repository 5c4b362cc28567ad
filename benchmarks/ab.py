"""A/B of intq artifacts of the same model in one process: the VM's `main` of each, interleaved
for --rounds rounds (one untimed call, then --inner timed calls per turn); medians and
quartiles, and the median over rounds of each artifact's time over the first artifact's in
the same round (quartiles in brackets). Also checks that they give the same output. Runtime
only (the device machine).

    taskset -c 0,1 python3 benchmarks/ab.py --threads 2 --rounds 25 A.so B.so

On a shared machine whose speed drifts within minutes, only artifacts measured like this,
in one process and interleaved, compare (run both orders).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import artifact  # noqa: E402 - shared loading (inputs its signature accepts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--inner", type=int, default=3)
    args = ap.parse_args()

    loaded = [artifact.load(so, args.threads) for so in args.artifacts]
    exs = [ex for ex, _, _ in loaded]
    _, xs, dev_args = loaded[0]
    outs = [ex.run(*xs) for ex in exs]
    print("outputs equal:", all(np.array_equal(outs[0], o) for o in outs[1:]))
    samples: dict[str, list[float]] = {so: [] for so in args.artifacts}
    for _ in range(args.rounds):
        for so, ex in zip(args.artifacts, exs, strict=True):
            main = ex._vm["main"]
            main(*dev_args)
            for _ in range(args.inner):
                t = time.perf_counter()
                main(*dev_args)
                samples[so].append((time.perf_counter() - t) * 1e3)
    # per round, each artifact's median of its turn over the first artifact's of that round:
    # the machine's speed drifts within minutes, and a ratio taken within one round cancels it
    base = np.array(samples[args.artifacts[0]]).reshape(args.rounds, args.inner)
    for so, v in samples.items():
        p25, p50, p75 = np.percentile(v, [25, 50, 75])
        turns = np.median(np.array(v).reshape(args.rounds, args.inner), axis=1)
        ratio = turns / np.median(base, axis=1)
        r25, r50, r75 = np.percentile(ratio, [25, 50, 75])
        print(
            f"{so:40s} median {p50:7.2f} ms  p25 {p25:7.2f}  p75 {p75:7.2f}  "
            f"/first per round {r50:5.3f} ({r25:5.3f}-{r75:5.3f})"
        )


if __name__ == "__main__":
    main()
