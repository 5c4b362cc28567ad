"""The runtime-only bundle runs an artifact with its own tvm (no compiler library) and intq."""

import os
import subprocess
import sys

import numpy as np
import torch

import intq
from intq.codegen.bundle import make_bundle


def test_bundle_runs_artifact_without_compiler(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    lib = intq.compile(model.eval(), torch.randn(3, 8), [torch.randn(3, 8) for _ in range(4)])
    so = tmp_path / "m.so"
    lib.export(so)
    out = make_bundle(str(tmp_path / "bundle"), [str(so)])
    site = os.path.join(out, "site")
    assert not os.path.exists(os.path.join(site, "tvm", "lib", "libtvm_compiler.so"))
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, runpy; sys.path.insert(0, sys.argv[1]); import tvm, intq; "
        "assert tvm.__file__.startswith(sys.argv[1]) and intq.__file__.startswith(sys.argv[1]); "
        "sys.argv = ['intq.runtime'] + sys.argv[2:]; runpy.run_module('intq.runtime', "
        "run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            site,
            os.path.join(out, "m.so"),
            "--input",
            str(tmp_path / "x.npy"),
            "--output",
            str(tmp_path / "y.npy"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "compiler library loaded: False" in res.stdout
    assert np.array_equal(np.load(tmp_path / "y.npy"), lib.run(x))
