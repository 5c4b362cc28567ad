"""Per-kernel time of a compiled model on cpu-int8: each PrimFunc timed alone on zero inputs,
multiplied by its call count in `main`, grouped by kernel name.

    python benchmarks/kernels.py --model deit_tiny --batch 1                 # here
    (--model: any of benchmarks/cpu.py's models, compiled the same way)
    python benchmarks/kernels.py --model deit_small --batch 1 8 --export DIR --mcpu cascadelake
    taskset -c 0,1 python3 kernels.py --run DIR --threads 2                    # runtime only

--run also times each kernel inside whole-model runs (`in_context`). --export writes per case
the exported model .so and a manifest (kernel names, parameter shapes
and dtypes, call counts; `benchmarks/cpu.py --prepare DIR --kernels` writes the same manifest
beside its .so); --run times those kernels through the .so's own library module with the TVM
runtime alone (no compiler: the device machine). An estimate of where time goes
(data-independent kernels only; no peer: this is a profile, not a speed claim).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import artifact  # noqa: E402 - shared with ab.py / idle.py
from cpu import MODELS, compile_case  # noqa: E402 - the models benchmarks/cpu.py measures


def manifest(integer_onnx, target) -> list[dict]:
    """[{name, params: [[shape, dtype]], calls}] of every PrimFunc the build of this graph has."""
    from tvm import tirx

    from intq.codegen import compat
    from intq.codegen.cpu import CpuKernels
    from intq.codegen.lower import to_relax

    kernels = CpuKernels(target)
    mod = compat.lower(kernels.schedule(to_relax(integer_onnx, kernels)), target)
    main_text = str(mod["main"])
    out = []
    for gv, f in mod.functions_items():
        if not isinstance(f, tirx.PrimFunc):
            continue
        name = gv.name_hint
        # direct calls `name(args)` only (not e.g. the "vm.builtin.reshape" view)
        calls = len(re.findall(r"(?<![\w.\"])" + re.escape(name) + r"\(", main_text))
        params = [[[int(s) for s in p.shape], str(p.dtype)] for p in f.params]
        out.append({"name": name, "params": params, "calls": calls})
    return out


def compile_model(name: str, batch: int, mcpu: str | None):
    """The compiled model, exactly as benchmarks/cpu.py compiles it."""
    return compile_case(name, batch, mcpu)[2]


def time_kernels(lib, kernels: list[dict], dev, number: int = 5, repeat: int = 3) -> None:
    """Time each kernel of `lib` (a library module) on zero inputs; print the grouped table."""
    import tvm

    total: collections.Counter[str] = collections.Counter()
    calls: collections.Counter[str] = collections.Counter()
    for k in kernels:
        if k["calls"] == 0:
            continue
        bufs = [tvm.runtime.tensor(np.zeros(shape, dtype), dev) for shape, dtype in k["params"]]
        ev = lib.time_evaluator(k["name"], dev, number=number, repeat=repeat)
        ms = ev(*bufs).mean * 1e3
        group = artifact.kernel_group(k["name"])
        total[group] += ms * k["calls"]
        calls[group] += k["calls"]
    whole = sum(total.values())
    print(f"sum of kernel estimates {whole:.2f} ms")
    for group, ms in total.most_common():
        print(f"{group:24s} {ms:8.2f} ms {100 * ms / whole:5.1f} %  ({calls[group]} calls)")


def whole_model(so: str, threads: int, calls: int = 20) -> None:
    """The same model end to end, for comparison with the kernel sum: `main` of the VM alone on
    an already quantized input, and Executor.run on the float input (input quantizer and
    output copy included). Medians of `calls` calls."""
    ex, xs, args = artifact.load(so, threads)
    main = ex._vm["main"]
    print(
        f"whole model: VM main {artifact.median_ms(lambda: main(*args), calls):.2f} ms, "
        f"Executor.run {artifact.median_ms(lambda: ex.run(*xs), calls):.2f} ms"
    )


def in_context(so: str, threads: int, calls: int = 10) -> None:
    """Each kernel's time inside whole-model runs (the VM's instrument hook timestamps every
    call; the hook's own cost is in the hooked total, not in a kernel's time), grouped by name:
    what the kernels cost with the caches as the model leaves them."""
    import time

    ex, _, args = artifact.load(so, threads)
    total: collections.Counter[str] = collections.Counter()
    count: collections.Counter[str] = collections.Counter()
    started: list[float] = []

    def hook(func, symbol, before, ret, *a) -> int:
        now = time.perf_counter()
        if before:
            started.append(now)
        else:
            group = artifact.kernel_group(symbol)
            total[group] += now - started.pop()
            count[group] += 1
        return 0  # VMInstrumentReturnKind.kNoOp

    ex._vm.set_instrument(hook)
    ex._vm["main"](*args)
    total.clear()
    count.clear()
    t = time.perf_counter()
    for _ in range(calls):
        ex._vm["main"](*args)
    whole = (time.perf_counter() - t) / calls * 1e3
    inside = sum(total.values()) / calls * 1e3
    print(f"in context: hooked run {whole:.2f} ms, sum of its calls {inside:.2f} ms")
    for group, sec in total.most_common(12):
        print(f"  {group:28s} {sec / calls * 1e3:8.3f} ms  ({count[group] // calls} calls)")


def export(args) -> None:
    from intq.codegen import compat

    os.makedirs(args.export, exist_ok=True)
    for batch in args.batch:
        tag = f"{args.model}_b{batch}"
        lib = compile_model(args.model, batch, args.mcpu)
        so = os.path.join(args.export, f"{tag}_kernels.so")
        lib.export(so)
        target = compat.cpu_target(mcpu=args.mcpu)
        with open(os.path.join(args.export, f"{tag}_kernels.json"), "w") as f:
            json.dump(manifest(lib.integer_onnx, target), f)
        print(f"{tag}: exported {so}")


def run(args) -> None:
    import tvm

    from intq.codegen import compat

    compat.set_num_threads(args.threads)
    for fname in sorted(os.listdir(args.run)):
        if not fname.endswith("_kernels.json"):
            continue
        tag = fname[: -len("_kernels.json")]
        kernels = json.load(open(os.path.join(args.run, fname)))
        so = os.path.join(args.run, f"{tag}_kernels.so")
        if not os.path.exists(so):  # written by benchmarks/cpu.py --prepare --kernels
            so = os.path.join(args.run, f"{tag}.so")
        mod = compat.load_executable(so)
        print(f"\n{tag}: {args.threads} threads")
        time_kernels(mod.imports[0], kernels, tvm.cpu())
        if os.path.exists(os.path.join(args.run, f"{tag}.so")):  # a whole intq artifact
            whole_model(so, args.threads)
            in_context(so, args.threads)


def local(args) -> None:
    import tvm

    from intq.codegen import compat

    compat.set_num_threads(args.threads)
    for batch in args.batch:
        lib = compile_model(args.model, batch, None)
        kernels = manifest(lib.integer_onnx, compat.cpu_target())
        import tempfile

        with tempfile.TemporaryDirectory() as wd:
            so = os.path.join(wd, "m.so")
            lib.export(so)
            mod = compat.load_executable(so)
            print(f"{args.model} batch {batch}: {args.threads} threads")
            time_kernels(mod.imports[0], kernels, tvm.cpu())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=sorted(MODELS), default="deit_tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--mcpu", default=None, help="--export: LLVM CPU to compile for")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--export", metavar="DIR")
    ap.add_argument("--run", metavar="DIR")
    args = ap.parse_args()
    if args.export:
        export(args)
    elif args.run:
        run(args)
    else:
        local(args)


if __name__ == "__main__":
    main()
