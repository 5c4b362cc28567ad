"""intq cuda-int8 against PyTorch FP32 / FP16 (eager and CUDA-graph replay) on DeiT models.

Two halves, because the GPU machine has no TVM:

    # here (TVM + nvcc): compile, export, compute inputs and reference outputs
    python benchmarks/gpu.py --prepare DIR [--models tiny,small,base] [--batches 1,64]
    python -m intq.codegen.bundle DIR/bundle --python 3.12      # runtime-only TVM + intq
    # on the GPU machine (PyTorch, numpy, the bundle):
    PYTHONPATH=DIR/bundle/site python3 benchmarks/gpu.py --run DIR

`--prepare` writes, per (model, batch): `<m>_b<n>.so` (cuda-int8 artifact), `<m>_b<n>_x.npy`
(float input) and `<m>_b<n>_ref.npy` (the numpy reference interpreter's integer output on that
input), plus `compile.json` (compile seconds). `--run` checks each artifact's output against the
reference element by element and times, in one process: intq (Relax VM, inputs already on the
GPU, `time_evaluator` over `invoke_stateful`), PyTorch FP32 and FP16 eager and CUDA-graph replay
(CUDA events), random weights (torch.manual_seed(0)). Speed-ups are ratios to PyTorch measured in
the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = {"tiny": "deit_tiny", "small": "deit_small", "base": "deit_base"}


def _vit_module():
    """models/vit.py by path (the GPU machine runs this file without installing intq)."""
    for cand in (os.path.join(HERE, "..", "models", "vit.py"), os.path.join(HERE, "vit.py")):
        if os.path.exists(cand):
            spec = importlib.util.spec_from_file_location("intq_vit", cand)
            mod = importlib.util.module_from_spec(spec)
            sys.modules["intq_vit"] = mod
            spec.loader.exec_module(mod)
            return mod
    raise FileNotFoundError("models/vit.py not found next to benchmarks/")


def _model(name: str):
    import torch

    torch.manual_seed(0)
    return getattr(_vit_module(), MODELS[name])().eval()


def prepare(out: str, models: list[str], batches: list[int], cuda_graph: bool = False) -> None:
    """Compile + export each (model, batch); with `cuda_graph` the artifact (tag suffix "_cg")
    captures its kernel sequence in a CUDA graph on the first run and replays it after."""
    import torch

    import intq

    os.makedirs(out, exist_ok=True)
    times_path = os.path.join(out, "compile.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for name in models:
        model = _model(name)
        for b in batches:
            tag = f"{name}_b{b}" + ("_cg" if cuda_graph else "")
            g = torch.Generator().manual_seed(b)
            cal = [torch.randn(b, 3, 224, 224, generator=g) for _ in range(8 if b < 8 else 2)]
            cfg = intq.CompileConfig(extra={"cuda_graph": True} if cuda_graph else {})
            t0 = time.perf_counter()
            lib = intq.compile(model, cal[0], calibration=cal, target="cuda-int8", config=cfg)
            lib.export(os.path.join(out, tag + ".so"))
            secs = time.perf_counter() - t0
            x = np.random.default_rng(100 + b).standard_normal((b, 3, 224, 224)).astype(np.float32)
            ref = intq.reference_run(lib.integer_onnx, x)
            np.save(os.path.join(out, tag + "_x.npy"), x)
            np.save(os.path.join(out, tag + "_ref.npy"), ref)
            times[tag] = round(secs, 1)
            print(f"{tag}: compile+export {secs:.1f} s, output {ref.dtype}{list(ref.shape)}")
            with open(times_path, "w") as f:
                json.dump(times, f, indent=1)


def _cuda_ms(fn, iters: int = 50, warmup: int = 10) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / iters)
    return best


def _graph_ms(model, *inputs) -> float:
    """Time of one CUDA-graph replay of model(*inputs) (captured after warm-up on a side stream)."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):
            model(*inputs)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        model(*inputs)
    return _cuda_ms(graph.replay)


def _torch_times(name: str, b: int) -> dict[str, float]:
    import torch

    out = {}
    for dtype, label in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        model = _model(name).to("cuda", dtype)
        x = torch.randn(b, 3, 224, 224, device="cuda", dtype=dtype)
        with torch.no_grad():
            out[f"torch_{label}_eager"] = _cuda_ms(lambda m=model, x=x: m(x))
        out[f"torch_{label}_graph"] = _graph_ms(model, x)
        del model
        torch.cuda.empty_cache()
    return out


def _intq_ms(ex, *inputs: np.ndarray) -> float:
    """VM time of `main` with the quantized inputs already on the GPU (time_evaluator: it
    synchronises the device around each repeat)."""
    from intq import boundary
    from intq.codegen import compat

    q = boundary.quantize_inputs(ex.signature.inputs, list(inputs))
    args = [compat.to_device_tensor(a, ex._device) for a in q]
    vm = ex._vm
    vm.set_input("main", *args)
    te = vm.time_evaluator("invoke_stateful", ex._device, number=20, repeat=5, min_repeat_ms=0)
    return min(te("main").results) * 1e3


def _profile_kernels(ex, x: np.ndarray, top: int = 30) -> None:
    """Per-kernel GPU time of one intq run, from CUPTI through torch.profiler (it records every
    kernel launched in the process, TVM's included). Kernels that differ only in the numbers
    TVM appends to a repeated name (``int8_dense_rq_pc3_kernel``) are summed as one kind."""
    import re

    import torch
    from torch.profiler import ProfilerActivity, profile

    from intq import boundary
    from intq.codegen import compat

    runs = 5
    q = boundary.quantize_inputs(ex.signature.inputs, [x])
    args = [compat.to_device_tensor(a, ex._device) for a in q]
    vm = ex._vm
    vm.set_input("main", *args)
    vm.invoke_stateful("main")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            vm.invoke_stateful("main")
        torch.cuda.synchronize()
    stats: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kind = re.sub(r"(?<!int)(?<=[a-z])\d+(?=_|$)", "", ev.name)
            stats.setdefault(kind, []).append(ev.device_time)
    total = sum(sum(v) for v in stats.values()) / runs
    print(
        f"kernels per run: {sum(len(v) for v in stats.values()) // runs}, "
        f"GPU busy {total / 1e3:.3f} ms per run"
    )
    for name, ts in sorted(stats.items(), key=lambda kv: -sum(kv[1]))[:top]:
        per = sum(ts) / runs
        n = len(ts) // runs
        print(f"  {per / 1e3:8.3f} ms {100 * per / total:5.1f}%  x{n:<3d} {name[:90]}")


def run(directory: str, models: list[str], batches: list[int], profile: bool = False) -> None:
    import torch

    from intq import runtime

    rows = []
    cases = [(n, b, cg) for n in models for b in batches for cg in ("", "_cg")]
    for name, b, cg in cases:
        tag = f"{name}_b{b}{cg}"
        so = os.path.join(directory, tag + ".so")
        if not os.path.exists(so):
            continue
        if not os.path.exists(os.path.join(directory, tag + "_x.npy")):  # regenerate
            x = np.random.default_rng(100 + b).standard_normal((b, 3, 224, 224))
            np.save(os.path.join(directory, tag + "_x.npy"), x.astype(np.float32))
        t0 = time.perf_counter()
        ex = runtime.load(so)
        load_s = time.perf_counter() - t0
        x = np.load(os.path.join(directory, tag + "_x.npy"))
        ref = np.load(os.path.join(directory, tag + "_ref.npy"))
        y = ex.run(x)
        exact = bool(y.shape == ref.shape and np.array_equal(y, ref))
        mismatches = int(np.sum(y != ref)) if y.shape == ref.shape else -1
        row = {"model": name + (" (CUDA graph)" if cg else ""), "batch": b}
        row.update(bit_exact=exact, mismatches=mismatches)
        row["load_s"] = round(load_s, 2)
        row["intq_ms"] = _intq_ms(ex, x)
        if profile:
            print(f"== {tag}")
            _profile_kernels(ex, x)
        row.update(_torch_times(name, b))
        for k in (
            "torch_fp32_eager",
            "torch_fp32_graph",
            "torch_fp16_eager",
            "torch_fp16_graph",
        ):
            row["x_" + k[6:]] = row[k] / row["intq_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ex
        torch.cuda.empty_cache()
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    cols = ["model", "batch", "bit-exact", "intq ms", "fp32 eager", "fp32 graph"]
    print("| " + " | ".join(cols + ["fp16 eager", "fp16 graph"]) + " |")
    print("|" + "---|" * 8)
    for r in rows:
        cells = [f"{r['intq_ms']:.3f}"] + [
            f"{r['torch_' + k]:.3f} ({r['x_' + k]:.2f}x)"
            for k in ("fp32_eager", "fp32_graph", "fp16_eager", "fp16_graph")
        ]
        print(f"| {r['model']} | {r['batch']} | {r['bit_exact']} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--prepare", metavar="DIR")
    g.add_argument("--run", metavar="DIR")
    ap.add_argument("--models", default="tiny,small,base")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--cuda-graph", action="store_true", help="--prepare: CUDA-graph artifacts")
    ap.add_argument("--profile", action="store_true", help="--run: per-kernel GPU times")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    if args.prepare:
        prepare(args.prepare, models, batches, args.cuda_graph)
    else:
        run(args.run, models, batches, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
