"""intq cpu-int8 vs ONNX Runtime (FP32, best INT8) vs PyTorch FP32: one process, same threads,
contenders interleaved for --rounds rounds, medians and ratios (peer median / intq median).

    python benchmarks/cpu.py --model deit_tiny --batch 1 --rounds 10          # all here
    python benchmarks/cpu.py --prepare DIR --model deit_small --batch 1 8 --mcpu sapphirerapids
    taskset -c 0,1 python3 benchmarks/cpu.py --run DIR --threads 2             # on the device

Models (--model): deit_tiny, deit_small, vit_digits, resnet18 (224x224 images) and minilm
(all-MiniLM-L6-v2 at sequence 128, compiled from the packaged pretrained weights with its
accuracy config; the device's PyTorch / ORT contenders use its architecture with random
weights). --mcpu sapphirerapids builds the AMX kernels, cascadelake the AVX-512 VNNI ones.

Before each contender's turn the harness idles --gap-ms (default 300): without it the previous
contender's spinning worker threads slowed the next one (ORT's INT8 sessions ran 1.6-1.8x slower
right after the FP32 session here; see interleave). Each turn then opens with --turn-warmup
(default 1) untimed calls: the first call after the idle gap is slow on the device Xeon. Figures
in docs/ before 2026-12-01 04:00 were taken with no gap, before 2026-12-01 05:00 with no
untimed opening call.

ORT INT8 is timed in both recipes (static QDQ, per-channel s8 weights, u8 activations, through
onnxruntime.quantization.quantize_static; and quantize_dynamic) and the faster one is reported
as "ORT best INT8". Also printed: intq compile time, artifact size and the peak resident memory
of one run of each contender in a fresh subprocess (VmHWM, else ru_maxrss).

Split mode (the device has ONNX Runtime and PyTorch but no TVM): --prepare compiles here (any
--mcpu: e.g. cascadelake for the VNNI kernels) and writes per case the exported .so, the input,
the reference interpreter's output and the float ONNX with its large float weights stripped
(ORT's speed does not depend on their values: --run refills them with seeded random numbers,
keeping the files small enough to carry). --run times everything there and checks that the .so
reproduces the reference output bit for bit. Random weights; calibration on random data.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spec:
    """A benchmarked model: `torch_model` / `compile_model` are "module:function" in
    intq.models (else a module carried beside this script); `compile_model` is what --prepare
    compiles (pretrained where a package ships weights), `torch_model` what --run times for
    PyTorch (random weights do: speed does not depend on them). `inputs(batch)` gives the
    example inputs and calibration batches; `config` names a CompileConfig ("module:NAME")."""

    torch_model: str
    inputs: Callable[[int], tuple[list[np.ndarray], list[list[np.ndarray]]]]
    compile_model: str = ""
    config: str = ""


def image_inputs(shape: tuple[int, ...]):
    def make(batch: int):
        rng = np.random.default_rng(1)
        x, *cal = (rng.standard_normal((batch, *shape)).astype(np.float32) for _ in range(3))
        return [x], [[c] for c in cal]

    return make


def text_inputs(batch: int):
    """Token ids + attention mask of real text (numpy docstrings, padded to 128): example;
    scikit-learn docstrings: calibration (the tokenizer is packaged with all-MiniLM-L6-v2)."""
    from intq.models.minilm import Tokenizer
    from intq.models.textdata import calibration_texts, numpy_doc_pairs

    tok = Tokenizer()
    ids, mask = tok([p[2] for p in numpy_doc_pairs()[:batch]])
    cal_ids, cal_mask = tok(calibration_texts(8 * batch))
    cal = [[cal_ids[i : i + batch], cal_mask[i : i + batch]] for i in range(0, 8 * batch, batch)]
    return [ids, mask], cal


MODELS: dict[str, Spec] = {
    "deit_tiny": Spec("vit:deit_tiny", image_inputs((3, 224, 224))),
    "deit_small": Spec("vit:deit_small", image_inputs((3, 224, 224))),
    "vit_digits": Spec("vit:vit_digits", image_inputs((1, 8, 8))),
    "resnet18": Spec("resnet:resnet18", image_inputs((3, 224, 224))),
    # all-MiniLM-L6-v2 at sequence 128 with its accuracy config (int16 linear inputs)
    "minilm": Spec(
        "minilm:minilm_l6_random", text_inputs, "minilm:minilm_l6", "minilm:MINILM_CONFIG"
    ),
}
STRIP_MIN_ELEMENTS = 1024  # float initializers at least this large are stripped / refilled


def _models_attr(ref: str):
    """intq.models.<module>.<name>, or on a device without the compiler package, <name> of
    the repository's models/<module>.py (loaded by path: benchmarks/ has files of the same
    names)."""
    import importlib
    import importlib.util

    mod_name, attr = ref.split(":")
    try:
        mod = importlib.import_module(f"intq.models.{mod_name}")
    except ImportError:  # device: the working tree's models/ directory
        here = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(here, os.pardir, "models", f"{mod_name}.py")
        spec = importlib.util.spec_from_file_location(f"_intq_models_{mod_name}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return getattr(mod, attr)


def make_torch_model(name: str, for_compile: bool = False):
    import torch

    spec = MODELS[name]
    torch.manual_seed(0)
    return _models_attr(
        spec.compile_model if for_compile and spec.compile_model else spec.torch_model
    )().eval()


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


# ------------------------------------------------------------------------------ ONNX Runtime


def strip_weights(model):
    """Copy of `model` whose large float initializers keep only dims and dtype."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and int(np.prod(init.dims)) >= (
            STRIP_MIN_ELEMENTS
        ):
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.doc_string = "intq-stripped"
    return out


def refill_weights(model, seed: int = 0):
    """Inverse of strip_weights with random N(0, 0.02) values (speed does not depend on them)."""
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    for init in model.graph.initializer:
        if init.doc_string == "intq-stripped":
            v = (rng.standard_normal(tuple(init.dims)) * 0.02).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(v, init.name))
    return model


def ort_sessions(
    float_onnx, xs: list[np.ndarray], threads: int, workdir: str
) -> dict[str, Callable]:
    """FP32, INT8 static (QDQ, per-channel, u8 activations) and INT8 dynamic sessions. Static
    calibration: random normal data for float inputs, the example itself for integer ones (token
    ids). A recipe that ORT cannot quantize is left out (its error printed)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    fp32 = os.path.join(workdir, "fp32.onnx")
    onnx.save(float_onnx, fp32)
    names = [i.name for i in float_onnx.graph.input]
    feed = dict(zip(names, xs, strict=True))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = np.random.default_rng(1)

            def sample(x):
                if x.dtype.kind == "f":
                    return rng.standard_normal(x.shape).astype(np.float32)
                return x

            self.batches = iter([{k: sample(v) for k, v in feed.items()} for _ in range(2)])

        def get_next(self):
            return next(self.batches, None)

    paths = {"ORT FP32": fp32}
    st = os.path.join(workdir, "int8_static.onnx")
    try:
        quantize_static(
            fp32,
            st,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        paths["ORT INT8 static"] = st
    except Exception as e:  # noqa: BLE001 - report and go on with the other recipes
        print(f"ORT INT8 static: quantize_static failed: {e!r}")
    dy = os.path.join(workdir, "int8_dynamic.onnx")
    quantize_dynamic(fp32, dy, weight_type=QuantType.QInt8)
    paths["ORT INT8 dynamic"] = dy
    out = {}
    for label, path in paths.items():
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        out[label] = lambda s=sess: s.run(None, feed)
    return out


# ------------------------------------------------------------------------------ timing


def interleave(
    contenders: dict[str, Callable],
    rounds: int,
    inner: int,
    gap_s: float = 0.0,
    turn_warmup: int = 0,
    samples_out: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Median ms per contender over `rounds` rounds of `inner` timed calls each. `gap_s`: idle
    time before each contender's turn; `turn_warmup`: untimed calls opening each turn. Runtimes
    keep their worker threads spinning for a while after a call (ONNX Runtime's intra-op pool,
    PyTorch's OpenMP, TVM's pool); on few cores those spinners take the cores from whoever runs
    next: here (2 cores, DeiT-Tiny b1) intq took 19 ms alone, 35 ms right after a PyTorch call
    and 79 ms right after an ORT FP32 call. The gap stops that, but the first call after an
    idle gap is slow in its turn (on the device Xeon: 17-23 ms against 15.6-18.3 ms for the calls
    after it, DeiT-Small b1), so each turn opens with untimed calls. Every contender is treated
    alike. `samples_out` receives every timed sample."""
    for fn in contenders.values():  # warm up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            if gap_s:
                time.sleep(gap_s)
            for _ in range(turn_warmup):
                fn()
            samples[name] += [timed(fn) for _ in range(inner)]
    if samples_out is not None:
        samples_out.update(samples)
    return {k: float(np.median(v)) for k, v in samples.items()}


def report(title: str, med: dict[str, float], extra: dict[str, str]) -> dict:
    int8 = {k: v for k, v in med.items() if k.startswith("ORT INT8")}
    best = min(int8, key=int8.get) if int8 else None
    rows = dict(med)
    if best:
        rows[f"ORT best INT8 ({best.split()[-1]})"] = med[best]
    print(title)
    print(f"{'contender':28s} {'median ms':>10s} {'peer/intq':>9s}  {'peak RSS MiB':>12s}")
    for name, m in rows.items():
        print(f"{name:28s} {m:10.2f} {m / med['intq']:8.2f}x  {extra.get(name, ''):>12s}")
    return {"medians_ms": med, "best_int8": best}


def peak_rss_mib(argv: list[str]) -> str:
    """Peak RSS of one run in a fresh subprocess (this script's --rss-child mode)."""
    r = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--rss-child", *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = r.stdout.strip().splitlines()
    return lines[-1] if r.returncode == 0 and lines else f"err{r.returncode}"


def rss_child(argv: list[str]) -> None:
    kind, path, xpath, threads = argv[0], argv[1], argv[2], int(argv[3])
    xs = load_inputs(xpath)
    if kind == "intq":
        from intq import runtime

        runtime.load(path, threads=threads).run(*xs)
    elif kind == "torch":
        import torch

        torch.set_num_threads(threads)
        with torch.inference_mode():
            make_torch_model(path)(*[torch.from_numpy(x) for x in xs])
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), xs, strict=True)})
    # VmHWM: the peak of this process's own address space (ru_maxrss can carry the parent's
    # peak over fork + exec)
    try:
        with open("/proc/self/status") as f:
            hwm_kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        hwm_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{hwm_kb / 1024:.0f}")


# ------------------------------------------------------------------------------ modes


def compile_case(name: str, batch: int, mcpu: str | None):
    """(float model, example inputs, compiled model, compile seconds)."""
    import torch

    import intq
    from intq.config import CompileConfig

    spec = MODELS[name]
    model = make_torch_model(name, for_compile=True)
    xs, cal = spec.inputs(batch)
    cfg = _models_attr(spec.config) if spec.config else CompileConfig()
    tensors = lambda arrays: tuple(torch.from_numpy(a) for a in arrays)  # noqa: E731
    example = tensors(xs) if len(xs) > 1 else tensors(xs)[0]
    calibration = [tensors(c) if len(c) > 1 else tensors(c)[0] for c in cal]
    t = time.perf_counter()
    lib = intq.compile(model, example, calibration=calibration, config=cfg.with_(cpu_mcpu=mcpu))
    return model, xs, lib, time.perf_counter() - t


def reference_output(lib, xs: list[np.ndarray]) -> np.ndarray:
    from intq import boundary
    from intq.reference import ReferenceInterpreter

    q = boundary.quantize_inputs(lib.signature.inputs, list(xs))
    feeds = {s.name: a for s, a in zip(lib.signature.inputs, q, strict=True)}
    outs = ReferenceInterpreter(lib.integer_onnx).run(feeds)
    return outs[lib.integer_onnx.graph.output[0].name]


def save_inputs(path: str, xs: list[np.ndarray]) -> None:
    np.savez(path, *xs)


def load_inputs(path: str) -> list[np.ndarray]:
    data = np.load(path)
    return [data[f"arr_{i}"] for i in range(len(data.files))]


def prepare(args) -> None:
    import onnx

    os.makedirs(args.prepare, exist_ok=True)
    meta = {}
    for batch in args.batch:
        tag = f"{args.model}_b{batch}"
        _, xs, lib, compile_s = compile_case(args.model, batch, args.mcpu)
        so = os.path.join(args.prepare, f"{tag}.so")
        lib.export(so)
        save_inputs(os.path.join(args.prepare, f"{tag}_x.npz"), xs)
        np.save(os.path.join(args.prepare, f"{tag}_ref.npy"), reference_output(lib, xs))
        onnx.save(strip_weights(lib.float_onnx), os.path.join(args.prepare, f"{tag}.onnx"))
        if args.kernels:  # the kernel manifest benchmarks/kernels.py --run profiles this .so by
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from kernels import manifest

            from intq.codegen import compat

            with open(os.path.join(args.prepare, f"{tag}_kernels.json"), "w") as f:
                json.dump(manifest(lib.integer_onnx, compat.cpu_target(mcpu=args.mcpu)), f)
        meta[tag] = {
            "model": args.model,
            "batch": batch,
            "compile_s": round(compile_s, 1),
            "artifact_bytes": os.path.getsize(so),
            "mcpu": args.mcpu or "host",
        }
        print(f"{tag}: compile {compile_s:.1f} s, artifact {os.path.getsize(so) / 2**20:.1f} MiB")
    mpath = os.path.join(args.prepare, "meta.json")
    old = json.load(open(mpath)) if os.path.exists(mpath) else {}
    old.update(meta)
    with open(mpath + ".tmp", "w") as f:
        json.dump(old, f, indent=1)
    os.replace(mpath + ".tmp", mpath)


def run_case(tag, meta, xs, intq_fn, ref, float_onnx, args, so_path) -> dict:
    import torch

    name = meta["model"]
    model = make_torch_model(name)
    xts = [torch.from_numpy(x) for x in xs]
    with tempfile.TemporaryDirectory() as wd:
        ort_fns = ort_sessions(float_onnx, xs, args.threads, wd)
        contenders = {"intq": intq_fn, **ort_fns}
        contenders["PyTorch FP32"] = lambda: torch.inference_mode()(model)(*xts)
        exact = ref is None or np.array_equal(intq_fn(), ref)
        samples: dict[str, list[float]] = {}
        med = interleave(
            contenders, args.rounds, args.inner, args.gap_ms / 1e3, args.turn_warmup, samples
        )
        rss = {}
        xp = os.path.join(wd, "x.npz")
        save_inputs(xp, xs)
        if not args.no_rss:
            rss["intq"] = peak_rss_mib(["intq", so_path, xp, str(args.threads)])
            for label, fname in (
                ("ORT FP32", "fp32.onnx"),
                ("ORT INT8 static", "int8_static.onnx"),
                ("ORT INT8 dynamic", "int8_dynamic.onnx"),
            ):
                if label in ort_fns:
                    path = os.path.join(wd, fname)
                    rss[label] = peak_rss_mib(["ort", path, xp, str(args.threads)])
            rss["PyTorch FP32"] = peak_rss_mib(["torch", name, xp, str(args.threads)])
    title = (
        f"\n{tag}: {args.threads} threads, {args.rounds} rounds x {args.inner} (each turn: "
        f"{args.gap_ms:g} ms idle, {args.turn_warmup} untimed); intq compile "
        f"{meta.get('compile_s', '?')} s (mcpu {meta.get('mcpu', 'host')}), artifact "
        f"{meta.get('artifact_bytes', 0) / 2**20:.1f} MiB; bit-exact vs reference: {exact}"
    )
    out = report(title, med, rss)
    out.update(meta, bit_exact=bool(exact), peak_rss_mib=rss, samples_ms=samples)
    return out


def run_prepared(args) -> None:
    import onnx

    from intq import runtime

    sys.path.insert(0, args.run)  # the carried model file (vit.py), also for --rss-child
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [args.run, os.environ.get("PYTHONPATH")])
    )
    meta_all = json.load(open(os.path.join(args.run, "meta.json")))
    results = {}
    for tag, meta in meta_all.items():
        if args.only and tag not in args.only:
            continue
        so = os.path.join(args.run, f"{tag}.so")
        xpath = os.path.join(args.run, f"{tag}_x.npz")
        xs = load_inputs(xpath) if os.path.exists(xpath) else [np.load(xpath[:-1] + "y")]
        ref = np.load(os.path.join(args.run, f"{tag}_ref.npy"))
        ex = runtime.load(so, threads=args.threads)
        fo = refill_weights(onnx.load(os.path.join(args.run, f"{tag}.onnx")))
        results[tag] = run_case(tag, meta, xs, lambda e=ex, xs=xs: e.run(*xs), ref, fo, args, so)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def run_local(args) -> None:
    for batch in args.batch:
        model, xs, lib, compile_s = compile_case(args.model, batch, args.mcpu)
        with tempfile.TemporaryDirectory() as wd:
            so = os.path.join(wd, "m.so")
            lib.export(so)
            meta = {
                "model": args.model,
                "batch": batch,
                "compile_s": round(compile_s, 1),
                "artifact_bytes": os.path.getsize(so),
                "mcpu": args.mcpu or "host",
            }
            ref = reference_output(lib, xs) if args.check else None
            tag = f"{args.model}_b{batch}"
            fn = lambda lib=lib, xs=xs: lib.run(*xs)  # noqa: E731
            run_case(tag, meta, xs, fn, ref, lib.float_onnx, args, so)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        return rss_child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=sorted(MODELS), default="deit_tiny")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--inner", type=int, default=3, help="calls per contender per round")
    ap.add_argument(
        "--gap-ms",
        type=float,
        default=300.0,
        help="idle ms before each contender's turn (lets the previous one's spinning threads "
        "stop; see interleave)",
    )
    ap.add_argument(
        "--turn-warmup",
        type=int,
        default=1,
        help="untimed calls opening each contender's turn (after the gap; see interleave)",
    )
    ap.add_argument("--threads", type=int, default=None, help="default: CPUs of this process")
    ap.add_argument("--mcpu", default=None, help="LLVM CPU to compile for (default: host)")
    ap.add_argument("--check", action="store_true", help="local: also compare to the reference")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--prepare", metavar="DIR", help="compile and write artifacts, no timing")
    ap.add_argument("--run", metavar="DIR", help="time a --prepare'd DIR (no TVM compiler)")
    ap.add_argument(
        "--kernels", action="store_true", help="--prepare: also the kernel manifest (kernels.py)"
    )
    ap.add_argument("--only", nargs="*", help="--run: only these cases (e.g. deit_small_b1)")
    ap.add_argument("--json", help="--run: write the results here")
    args = ap.parse_args()
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0))
    import torch

    torch.set_num_threads(args.threads)
    if args.prepare:
        prepare(args)
    elif args.run:
        run_prepared(args)
    else:
        run_local(args)


if __name__ == "__main__":
    main()
