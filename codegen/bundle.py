"""Runtime-only deployment bundle: what a device needs to run an exported intq artifact.

    python -m intq.codegen.bundle OUT_DIR model.so [more.so ...] [--python 3.12]

OUT_DIR/site holds the `tvm` Python package without its compiler library (libtvm_compiler,
sources, headers), `tvm_ffi` for the device's Python, and intq's runtime modules (numpy-only
boundary code + `intq.runtime`). On the device (numpy installed):

    PYTHONPATH=OUT_DIR/site python3 -m intq.runtime OUT_DIR/model.so --input x.npy --output y.npy

The bundle is built in a temporary directory and renamed into place (no half-written bundle).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence

import tvm
import tvm_ffi

import intq

_TVM_DROP = ("3rdparty", "src", "web", "include", "lib/libtvm_compiler.so", "lib/libtvm.so")
# config.py is pure Python: carried so that model files importing CompileConfig load on a device
_INTQ_FILES = ("__init__.py", "boundary.py", "config.py", "errors.py")


def _ignore_pycache(_dir: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__"]


def _copy_tvm(site: str) -> None:
    src = os.path.dirname(tvm.__file__)
    dst = os.path.join(site, "tvm")
    shutil.copytree(src, dst, ignore=_ignore_pycache)
    for rel in _TVM_DROP:
        p = os.path.join(dst, rel)
        if os.path.isdir(p):
            shutil.rmtree(p)
        elif os.path.exists(p):
            os.remove(p)


def _copy_tvm_ffi(site: str, python: str) -> None:
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if python == here:
        shutil.copytree(
            os.path.dirname(tvm_ffi.__file__), os.path.join(site, "tvm_ffi"), ignore=_ignore_pycache
        )
        return
    version = tvm_ffi.__version__ if hasattr(tvm_ffi, "__version__") else None
    spec = f"apache-tvm-ffi=={version}" if version else "apache-tvm-ffi"
    with tempfile.TemporaryDirectory() as wheels:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                python,
                "--implementation",
                "cp",
                "--platform",
                "manylinux_2_28_x86_64",
                "--platform",
                "manylinux_2_17_x86_64",
                "-d",
                wheels,
                spec,
            ],
            check=True,
        )
        (whl,) = glob.glob(os.path.join(wheels, "*.whl"))
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)


def _copy_intq(site: str) -> None:
    pkg = os.path.dirname(intq.__file__)
    dst = os.path.join(site, "intq")
    os.makedirs(os.path.join(dst, "codegen"))
    for f in _INTQ_FILES:
        shutil.copy2(os.path.join(pkg, f), dst)
    import intq.codegen.compat as compat
    import intq.runtime as rt

    shutil.copytree(
        os.path.dirname(rt.__file__), os.path.join(dst, "runtime"), ignore=_ignore_pycache
    )
    shutil.copy2(compat.__file__, os.path.join(dst, "codegen", "compat.py"))
    with open(os.path.join(dst, "codegen", "__init__.py"), "w") as f:
        f.write('"""Runtime-only subset: compat helpers for loading and running artifacts."""\n')


def make_bundle(out_dir: str, artifacts: Sequence[str] = (), python: str | None = None) -> str:
    """Write the bundle to `out_dir` (must not exist) and return its path."""
    python = python or f"{sys.version_info.major}.{sys.version_info.minor}"
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(f"bundle directory {out_dir!r} already exists")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".bundle-", dir=parent)
    try:
        site = os.path.join(tmp, "site")
        os.makedirs(site)
        _copy_tvm(site)
        _copy_tvm_ffi(site, python)
        _copy_intq(site)
        for a in artifacts:
            shutil.copy2(a, tmp)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m intq.codegen.bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("out_dir")
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--python", default=None, help="device Python version, e.g. 3.12")
    args = ap.parse_args(argv)
    path = make_bundle(args.out_dir, args.artifacts, args.python)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    print(f"wrote {path} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
