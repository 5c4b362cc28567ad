"""The one module that touches version-sensitive TVM API (apache-tvm 0.27 / apache-tvm-ffi 0.1.14).

Everything else in intq should go through these helpers, so a TVM upgrade is a one-file change.
Facts this module relies on (see codegen/TVM-NOTES.md):

* TIR lives in ``tvm.tirx``, schedules in ``tvm.s_tir``; there is no ``tirx.stmt_functor``: IR walks
  use ``tvm_ffi.structural_walk`` (reflection-based, visits every node of any IR object).
* Targets are built from dicts; ``tvm.runtime.tensor`` replaced ``tvm.nd.array``.
* The runtime thread pool defaults to ``hardware_concurrency() / 2`` threads on x86 (1 on a
  2-vCPU VM) and its size is fixed when the calling OS thread first creates it.
* The compiler library is ``libtvm_compiler.so`` (~259 MB); ``TVM_USE_RUNTIME_LIB=1`` before
  ``import tvm`` loads only ``libtvm_runtime.so``.

Importing this module does not import the compiler parts of TVM eagerly beyond ``import tvm``;
it works (for the runtime-side helpers) in a ``TVM_USE_RUNTIME_LIB=1`` process.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tvm

if TYPE_CHECKING:  # pragma: no cover
    from tvm.ir import IRModule
    from tvm.runtime import Device, Executable, Tensor
    from tvm.target import Target
    from tvm.tirx import PrimFunc

__all__ = [
    "ALIGNMENT",
    "build",
    "compiler_loaded",
    "cpu_target",
    "cuda_target",
    "export_library",
    "find_float_in_tir",
    "host_cpu_flags",
    "host_has_avx2",
    "host_has_avx512",
    "host_has_vnni",
    "import_tvmscript_module",
    "install_cuda_jit_nvcc",
    "iter_tir_functions",
    "load_cuda_runtime",
    "load_executable",
    "lower",
    "mark_scheduled",
    "num_threads",
    "set_num_threads",
    "to_device_tensor",
    "to_numpy",
    "virtual_machine",
]


def import_tvmscript_module(name: str) -> Any:
    """Import a TVM module that parses TVMScript functions at import (e.g.
    ``tvm.s_tir.tensor_intrin.cuda``, hundreds of them) with a cheap ``inspect.stack``.

    TVM's ``T.prim_func`` calls ``inspect.stack()``, which looks up every frame's source file;
    for frames without one (the import machinery's) that lookup scans all of ``sys.modules``
    each time. With torch loaded this one import took 60-120 s on the 2-core machine. The
    parser uses the frames (for closure variables) and a line of context only to detect
    functions defined in a class body, which these modules have none of; so while they import,
    the stack's entries carry the frames without file lookups or context lines."""
    import importlib
    import inspect
    import sys

    def cheap_stack(context: int = 1) -> list:
        out, frame = [], sys._getframe(1)
        while frame is not None:
            code = frame.f_code
            out.append(
                inspect.FrameInfo(frame, code.co_filename, frame.f_lineno, code.co_name, None, None)
            )
            frame = frame.f_back
        return out

    original = inspect.stack
    inspect.stack = cheap_stack
    try:
        return importlib.import_module(name)
    finally:
        inspect.stack = original


#: Byte alignment TVM kernels assume for every buffer (``kAllocAlignment``).
ALIGNMENT = 64


# --------------------------------------------------------------------------------------------
# Host CPU detection and targets
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def host_cpu_flags() -> frozenset[str]:
    """CPU feature flags of this machine as the kernel reports them (``/proc/cpuinfo``).

    These are what the (possibly virtualised) CPU really exposes; LLVM's ``mcpu`` name alone can
    imply features a hypervisor masks. Empty on non-Linux hosts.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def host_has_vnni() -> bool:
    """True if the host has an int8 dot-product instruction (``vpdpbusd``: AVX512-VNNI or
    AVX-VNNI)."""
    flags = host_cpu_flags()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def host_has_avx512() -> bool:
    """True if the host has AVX-512 F+BW (512-bit integer ops, ``vpmaddwd zmm``)."""
    flags = host_cpu_flags()
    return "avx512f" in flags and "avx512bw" in flags


def host_has_avx2() -> bool:
    """True if the host has AVX2 (256-bit integer ops, ``vpmaddwd ymm``)."""
    return "avx2" in host_cpu_flags()


# /proc/cpuinfo flag -> LLVM feature name, for features that matter to our kernels. If LLVM's host
# CPU model implies one of these but the kernel does not report it, the target disables it.
_CPUINFO_TO_LLVM = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512dq": "avx512dq",
    "avx512vl": "avx512vl",
    "avx512_vnni": "avx512vnni",
    "avx512_vbmi": "avx512vbmi",
    "avx_vnni": "avxvnni",
    "amx_int8": "amx-int8",
    "amx_tile": "amx-tile",
}


def host_llvm_cpu() -> str:
    """LLVM's name for the host CPU (e.g. ``znver3``, ``sapphirerapids``)."""
    return str(tvm.target.codegen.llvm_get_system_cpu())


def cpu_target(host: bool = True, num_cores: int | None = None, mcpu: str | None = None) -> Target:
    """An LLVM CPU target.

    host=True: ``mcpu`` = the host CPU as LLVM detects it, with any feature the kernel does not
    report (``/proc/cpuinfo``) disabled through ``mattr``; the binary then needs a CPU at least
    as capable. mcpu: an explicit LLVM CPU name instead (overrides host).
    host=False: portable x86-64-v2 (SSE4.2, no AVX), runs on any recent x86.
    num_cores feeds the target's ``num-cores`` (schedules may read it); default: CPUs this process
    may run on. It does not set the runtime thread count: see :func:`set_num_threads`.
    """
    if num_cores is None:
        num_cores = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        )
    cfg: dict[str, Any] = {"kind": "llvm", "num-cores": int(num_cores or 1)}
    if mcpu is not None:  # an explicit CPU (cross-compiling): its full LLVM feature set
        cfg["mcpu"] = mcpu
    elif host:
        cfg["mcpu"] = host_llvm_cpu()
        flags = host_cpu_flags()
        if flags:
            implied = tvm.target.codegen.llvm_get_cpu_features(
                tvm.target.Target({"kind": "llvm", "mcpu": cfg["mcpu"]})
            )
            off = [
                f"-{llvm}"
                for flag, llvm in _CPUINFO_TO_LLVM.items()
                if llvm in implied and flag not in flags
            ]
            if off:
                cfg["mattr"] = off
    else:
        cfg["mcpu"] = "x86-64-v2"
    target = tvm.target.Target(cfg)
    if tvm.target.codegen.target_has_features("avx512f", target):
        # LLVM tunes AVX-512 CPUs (Skylake-SP on) to auto-vectorize at 256 bits; the row kernels
        # (LayerNorm, Softmax, requantize, add) are left to its vectorizer, so let it use zmm
        cfg["mattr"] = [*cfg.get("mattr", []), "-prefer-256-bit"]
        target = tvm.target.Target(cfg)
    return target


def cuda_target(arch: str = "sm_90", host: Target | None = None) -> Target:
    """A CUDA target for ``arch`` (e.g. ``sm_90`` for H100) with an LLVM host target.

    Building needs no GPU and no CUDA toolkit: TVM 0.27 stores the kernels as CUDA C in the
    module and compiles them when the module is *loaded* (NVRTC via ``cuda-python``, or nvcc with
    ``TVM_CUDA_COMPILE_MODE=nvcc``); see :func:`install_cuda_jit_nvcc` for runtime-only
    processes. ``host`` defaults to a portable CPU target.
    """
    host = host if host is not None else cpu_target(host=False)
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host=host)


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def aligned_empty(shape: Sequence[int], dtype: Any, alignment: int = ALIGNMENT) -> np.ndarray:
    """An uninitialised C-contiguous array whose data pointer is ``alignment``-byte aligned
    (what TVM needs to share numpy memory, ``to_device_tensor(zero_copy=True)``)."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    raw = np.empty(nbytes + alignment, dtype=np.uint8)
    off = (-raw.ctypes.data) % alignment
    return raw[off : off + nbytes].view(dt).reshape(tuple(shape))


def _aligned_copy(arr: np.ndarray, alignment: int = ALIGNMENT) -> np.ndarray:
    """C-contiguous copy of ``arr`` whose data pointer is ``alignment``-byte aligned."""
    out = aligned_empty(arr.shape, arr.dtype, alignment)
    np.copyto(out, arr)
    return out


def is_cpu(device: Device) -> bool:
    return device.dlpack_device_type() == tvm.cpu().dlpack_device_type()


def to_device_tensor(
    array: np.ndarray, device: Device | None = None, zero_copy: bool = False
) -> Tensor:
    """A TVM tensor holding ``array`` on ``device`` (default CPU).

    Default: copies into a fresh TVM allocation (always 64-byte aligned). ``zero_copy=True`` (CPU
    only) shares numpy's memory through DLPack instead; TVM refuses (or, through implicit
    conversions, crashes on) memory that is not 64-byte aligned, so an unaligned or non-contiguous
    array is first copied to an aligned buffer. Never pass raw numpy arrays to a VM function.
    """
    device = device if device is not None else tvm.cpu()
    arr = np.asarray(array)
    if zero_copy and is_cpu(device):
        if not arr.flags.c_contiguous or arr.ctypes.data % ALIGNMENT:
            arr = _aligned_copy(np.ascontiguousarray(arr))
        return tvm.runtime.from_dlpack(arr)
    return tvm.runtime.tensor(np.ascontiguousarray(arr), device)


def to_numpy(value: Any) -> Any:
    """numpy view of a VM result: a Tensor becomes an ndarray, a tuple/Array a tuple, recursively;
    strings and scalars are returned as Python values."""
    if hasattr(value, "numpy"):
        return value.numpy()
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "Array":
        return tuple(to_numpy(v) for v in value)
    return value


# --------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------


def mark_scheduled(func: PrimFunc) -> PrimFunc:
    """Tag a hand-scheduled PrimFunc so default schedulers (dlight, ``DefaultGPUSchedule``)
    leave it alone."""
    return func.with_attr("tirx.is_scheduled", True)


def lower(mod: IRModule, target: Target, pipeline: Any = None) -> IRModule:
    """The module exactly as ``tvm.compile`` hands it to codegen: the Relax pipeline that
    :func:`build` would run (``"default"``: LegalizeOps + VM lowering on CPU; the target's own
    pipeline, with dlight, on GPU). Use it to inspect / :func:`find_float_in_tir` the kernels."""
    from tvm import relax  # compiler-only

    if pipeline is not None:
        pass
    elif "gpu" in target.keys:
        pipeline = relax.get_default_pipeline(target)
    else:
        pipeline = relax.get_pipeline("default")
    with target:
        return pipeline(mod)


def build(mod: IRModule, target: Target, *, lowered: bool = False) -> Executable:
    """Compile a Relax IRModule (with any hand-scheduled PrimFuncs in it) to a VM executable.

    ``tvm.compile(mod, target, relax_pipeline="default", tir_pipeline="default")``. On CPU the
    "default" Relax pipeline legalizes ops and lowers to the VM without fusing, so the PrimFuncs
    we put in the module are exactly the kernels that get built. For CUDA targets the target's own
    pipeline runs (LegalizeOps, FuseOps/FuseTIR, dlight default schedules for unscheduled
    PrimFuncs).
    """
    # CUDA kernels are compiled when the module is loaded (also in this process, e.g. by
    # virtual_machine); without cuda-python the stock NVRTC path fails, so default to nvcc.
    if target.kind.name == "cuda" and "TVM_CUDA_COMPILE_MODE" not in os.environ:
        try:
            import cuda.bindings  # noqa: F401  (NVRTC path)
        except ImportError:
            os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"
    # lowered=True: `mod` already went through :func:`lower`; skip the Relax pipeline.
    return tvm.compile(mod, target=target, relax_pipeline=None if lowered else "default")


def export_library(executable: Executable, path: str | os.PathLike[str]) -> str:
    """Write ``executable`` as a shared library at ``path`` atomically (temp file in the same
    directory, then ``os.replace``), so a reader never sees a half-written ``.so``. Needs a host C
    compiler (``cc``/``gcc``) to link. Returns the path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp.so", dir=directory
    )
    os.close(fd)
    try:
        # The suffix must stay ".so": export_library picks the linker from the file extension.
        executable.export_library(tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# --------------------------------------------------------------------------------------------
# Runtime
# --------------------------------------------------------------------------------------------


def compiler_loaded() -> bool:
    """True if this process has mapped TVM's compiler library (``libtvm_compiler.so``, formerly
    ``libtvm.so``); False in a ``TVM_USE_RUNTIME_LIB=1`` process. Reads ``/proc/self/maps``."""
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
            maps = f.read()
    except OSError:
        from tvm import base

        return "tvm_compiler" in base._LOADED_LIBS
    return "libtvm_compiler.so" in maps or "/libtvm.so" in maps


def load_cuda_runtime() -> bool:
    """Register TVM's CUDA runtime (``libtvm_runtime_cuda.so``) in a runtime-only process.

    ``import tvm`` loads device backends only when the compiler is loaded; with
    ``TVM_USE_RUNTIME_LIB=1`` loading a CUDA ``.so`` fails with "a loader of that name is not
    registered ... ffi.Module.load_from_bytes.cuda" until this runs. The library links
    ``libcudart.so.13``: if the dynamic loader cannot find it, it is preloaded from ``CUDA_HOME``
    or /usr/local/cuda. Returns True if the CUDA runtime is registered.
    """
    import ctypes
    import glob

    from tvm import base, libinfo
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" in base._LOADED_LIBS:
        return True

    def _load() -> None:
        base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            "tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=libinfo.package_lib_paths()
        )

    try:
        _load()
        return True
    except (OSError, RuntimeError):
        pass
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    for root in filter(None, roots):
        for lib in sorted(glob.glob(os.path.join(root, "lib*", "libcudart.so.*"))):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                _load()
                return True
            except OSError:
                continue
    return False


def nvcc_fatbin(code: str, arch: str, nvcc: str = "nvcc", ptx: bool = False) -> bytes:
    """Compile CUDA C ``code`` with nvcc to a fatbin holding the SASS for ``arch`` (``sm_90`` or
    ``90``), and with ``ptx`` its PTX too (so newer GPUs can JIT it). Raises FileNotFoundError
    without nvcc and RuntimeError, carrying nvcc's message, when nvcc rejects the code."""
    import subprocess

    num = arch.replace("sm_", "")
    code_arg = f"[sm_{num},compute_{num}]" if ptx else f"sm_{num}"
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.cu"), os.path.join(tmp, "k.fatbin")
        with open(src, "w") as f:
            f.write(code)
        cmd = [nvcc, "--fatbin", "-O3", "-w", "--expt-relaxed-constexpr"]
        cmd += ["-gencode", f"arch=compute_{num},code={code_arg}", "-o", out, src]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout or "")[-3000:]
            raise RuntimeError(f"nvcc failed (exit {proc.returncode}) for sm_{num}:\n{tail}")
        with open(out, "rb") as f:
            return f.read()


def install_cuda_jit_nvcc(nvcc: str = "nvcc") -> None:
    """Make CUDA modules loadable in a runtime-only process on a machine with ``nvcc``.

    TVM 0.27 stores CUDA kernels in the exported .so as CUDA C source (format "cuda") and compiles
    them when the module is loaded, through the Python callback ``tvm_callback_cuda_compile``. The
    stock callback (tvm.support.nvcc) needs ``Target.current``, which does not exist with
    ``TVM_USE_RUNTIME_LIB=1``, and NVRTC needs ``cuda-python``. This replacement runs
    `nvcc_fatbin` for the current GPU's architecture (device 0). Load time: ~1-3 s per module.
    """
    import tvm_ffi

    @tvm_ffi.register_global_func("tvm_callback_cuda_compile", override=True)
    def _compile(code: str) -> bytearray:
        arch = tvm.cuda(0).compute_version.replace(".", "")
        return bytearray(nvcc_fatbin(code, arch, nvcc))


def load_executable(path: str | os.PathLike[str]) -> tvm.runtime.Module:
    """Load an exported ``.so`` (works in a runtime-only process); requests AMX permission
    where the host has AMX (:func:`enable_amx`), since its kernels may run without a VM."""
    enable_amx()
    return tvm.runtime.load_module(os.fspath(path))


_ARCH_REQ_XCOMP_PERM = 0x1023  # arch_prctl request (Linux >= 5.16, x86-64)
_XFEATURE_XTILEDATA = 18  # the AMX tile data state component
_SYS_ARCH_PRCTL = 158  # x86-64 syscall number


@functools.lru_cache(maxsize=1)
def enable_amx() -> bool:
    """Ask Linux for this process's permission to use AMX tile state (every thread, once per
    process); True when granted. Without it an AMX instruction (cpu-int8 kernels built for a
    target with amx-int8) kills the process with SIGILL. False on a host without AMX."""
    if "amx_tile" not in host_cpu_flags():
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    args = (ctypes.c_long(v) for v in (_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA))
    return libc.syscall(*args) == 0


def virtual_machine(executable: Any, device: Device | None = None) -> Any:
    """A Relax VM over a built ``Executable`` or a loaded module. Call ``vm["main"](*tensors)``.
    Requests AMX permission first where the host has AMX (see :func:`enable_amx`)."""
    from tvm.runtime.vm import VirtualMachine

    enable_amx()
    return VirtualMachine(executable, device if device is not None else tvm.cpu())


def set_num_threads(n: int, bind: bool = True) -> int:
    """Use ``n`` threads in the TVM runtime's CPU thread pool; returns the count now in effect.

    Sets ``TVM_NUM_THREADS`` (read whenever a pool is created and by every parallel launch) and
    calls ``runtime.config_threadpool``. Call it before the first kernel runs: a pool (one per
    OS thread that launches kernels) cannot grow past the size it was created with, only shrink.
    ``bind=False`` sets ``TVM_BIND_THREADS=0`` so workers are not pinned to cores (pinning
    happens when a pool is created).
    """
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    os.environ["TVM_NUM_THREADS"] = str(n)
    if not bind:
        os.environ["TVM_BIND_THREADS"] = "0"
    config = tvm.get_global_func("runtime.config_threadpool")
    # mode 1 = kBig (all cores equal on x86), nthreads = n, no explicit CPU list (the list form
    # would pin every worker to the listed CPUs and override TVM_NUM_THREADS with its length).
    config(1, n)
    return num_threads()


def num_threads() -> int:
    """Threads the calling OS thread's TVM pool uses. Creates the pool if this thread has none
    yet, fixing its maximum size: call :func:`set_num_threads` first."""
    return int(tvm.runtime.num_threads())


# --------------------------------------------------------------------------------------------
# IR inspection
# --------------------------------------------------------------------------------------------


def iter_tir_functions(mod: IRModule) -> Iterator[tuple[str, PrimFunc]]:
    """(name, PrimFunc) for every TIR function in ``mod``, sorted by name."""
    from tvm.tirx import PrimFunc

    items = [(gv.name_hint, f) for gv, f in mod.functions_items() if isinstance(f, PrimFunc)]
    yield from sorted(items, key=lambda t: t[0])


def _is_float_dtype(dtype: Any) -> bool:
    s = str(dtype)
    return "float" in s  # float16/32/64, bfloat16, float8_*, float4_*, and vector forms (float32x8)


def _node_dtypes(node: Any) -> list[str]:
    """dtypes a node carries: its own ``dtype`` (Var, Buffer types, PrimType) and the dtype of its
    ``ty`` when that is a PrimType (every PrimExpr in 0.27: Cast, FloatImm, loads, arithmetic)."""
    out = []
    for attr in ("dtype", "ty"):
        try:
            val = getattr(node, attr)
        except Exception:  # reflected objects raise on attributes they do not have
            continue
        if attr == "ty":
            try:
                val = val.dtype if type(val).__name__ == "PrimType" else None
            except Exception:
                val = None
        if val is not None and not callable(val):
            out.append(str(val))
    return out


def find_float_in_tir(mod: IRModule, include_relax: bool = False) -> list[str]:
    """Every floating-point dtype in the TIR functions of ``mod``, as ``"func: NodeType dtype"``
    lines (deduplicated, sorted). Empty list means the kernels are float-free.

    Walks each PrimFunc completely with ``tvm_ffi.structural_walk`` (params, buffers, vars, casts,
    constants, loads/stores, allocations, block annotations...) and reports every node whose dtype
    (``node.dtype`` or ``node.ty.dtype``) is a float type, e.g. ``"f: Cast float32"``,
    ``"f: FloatImm float32 0.5"``, ``"h: BufferType bfloat16"``. ``include_relax=True`` also
    scans Relax functions (constants, tensor types, calls).
    """
    import tvm_ffi
    from tvm.relax import Function as RelaxFunction

    found: set[str] = set()
    targets: list[tuple[str, Any]] = list(iter_tir_functions(mod))
    if include_relax:
        targets += [
            (gv.name_hint, f) for gv, f in mod.functions_items() if isinstance(f, RelaxFunction)
        ]

    for name, func in targets:

        def visit(node: Any, _name: str = name) -> None:
            kind = type(node).__name__
            for dtype in _node_dtypes(node):
                if _is_float_dtype(dtype):
                    extra = f" {node.value}" if kind == "FloatImm" else ""
                    found.add(f"{_name}: {kind} {dtype}{extra}")

        tvm_ffi.structural_walk(func, visit)
    return sorted(found)


def _module_tree(mod: Any) -> Iterator[Any]:
    yield mod
    for sub in getattr(mod, "imports", ()):
        yield from _module_tree(sub)


def loaded_buffer(expr: Any) -> Any:
    """The buffer a TIR load expression reads (0.27 names the node TensorLoad, its buffer
    `source`; earlier releases BufferLoad / `buffer`), or None when `expr` is not a load."""
    if is_node(expr, "TensorLoad"):
        return expr.source
    if is_node(expr, "BufferLoad"):
        return expr.buffer
    return None


def region_buffer(region: Any) -> Any:
    """The buffer of a block's read / write region (0.27: TensorRegion.source; earlier
    releases: BufferRegion.buffer)."""
    return region.source if hasattr(region, "source") else region.buffer


def is_node(obj: Any, kind: str) -> bool:
    """Whether a TIR node is of class `kind` ("BufferLoad", "BufferStore", ...): by its class
    name, since 0.27 exposes some node classes only as constructor functions
    (tvm.tirx.BufferLoad is a function, not a type)."""
    return any(cls.__name__ == kind for cls in type(obj).__mro__)


def device_source(executable: Any) -> str:
    """Generated device code (CUDA C) of every CUDA module in a built executable, concatenated;
    "" when there is none (CPU builds)."""
    root = getattr(executable, "mod", executable)
    parts = []
    for m in _module_tree(root):
        if str(getattr(m, "kind", "")) == "cuda":
            try:
                parts.append(str(m.inspect_source("cuda")))
            except Exception:  # noqa: BLE001 - a module without kept source
                parts.append(str(m.inspect_source()))
    return "\n".join(parts)


def has_cuda_module(module: Any) -> bool:
    """True if a built executable or loaded artifact contains a CUDA device module."""
    root = getattr(module, "mod", module)
    return any(str(getattr(m, "kind", "")) == "cuda" for m in _module_tree(root))
