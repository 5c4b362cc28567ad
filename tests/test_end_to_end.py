"""intq.compile end to end on ViTs: compiled run == reference, integer-only (graph and TIR),
export + runtime-only reload in a fresh process, typed errors on bad input."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import intq
from intq.codegen import compat
from intq.errors import InputSignatureError, UnsupportedOpError
from intq.models.vit import VisionTransformer, ViTConfig, deit_tiny

TINY = ViTConfig(
    img_size=8,
    patch_size=2,
    in_chans=1,
    num_classes=10,
    embed_dim=32,
    depth=2,
    num_heads=2,
    mlp_ratio=2.0,
)


def calib(shape, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = VisionTransformer(TINY).eval()
    lib = intq.compile(model, torch.randn(4, 1, 8, 8), calibration=calib((4, 1, 8, 8)))
    return model, lib


def test_run_equals_reference_any_batch(tiny):
    _, lib = tiny
    for n in (4, 7, 1):
        x = np.random.default_rng(n).standard_normal((n, 1, 8, 8)).astype(np.float32)
        y = lib.run(x)
        assert y.dtype == np.int32 and y.shape == (n, 10)
        assert np.array_equal(y, intq.reference_run(lib.integer_onnx, x))


def test_dequantized_output_tracks_float_model(tiny):
    model, lib = tiny
    x = calib((4, 1, 8, 8), n=1, seed=5)[0]
    ref = model(x).detach().numpy()
    got = lib.dequantize(lib.run(x))
    cos = (ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)
    assert cos > 0.98


def test_integer_only_graph_and_tir(tiny):
    _, lib = tiny
    assert intq.check_integer_only(lib.integer_onnx) == []
    ops = {n.op_type for n in lib.integer_onnx.graph.node}
    assert {"IntMatMul", "IntConv", "IntLayerNorm", "IntSoftmax", "IntGELU", "IntAdd"} <= ops
    assert lib._build.tir_floats == []
    # the scan itself must see floats where they are: the float model lowered by TVM
    lowered = compat.lower(_float_relax(), compat.cpu_target())
    assert compat.find_float_in_tir(lowered)


def _float_relax():
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.exp(x)))
        bb.emit_func_output(y)
    return bb.get()


def test_export_reload_in_runtime_only_process(tiny, tmp_path):
    _, lib = tiny
    path = tmp_path / "tiny.so"
    lib.export(path)
    x = np.random.default_rng(3).standard_normal((9, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "intq.runtime",
            str(path),
            "--input",
            str(tmp_path / "x.npy"),
            "--output",
            str(tmp_path / "y.npy"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "compiler library loaded: False" in out
    assert np.array_equal(np.load(tmp_path / "y.npy"), lib.run(x))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_export_leaves_no_file(tiny, tmp_path, monkeypatch):
    _, lib = tiny
    path = tmp_path / "model.so"

    def broken(self_path, *a, **k):
        with open(self_path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(
        type(lib._build.executable),
        "export_library",
        lambda self, p, *a, **k: broken(p),
        raising=True,
    )
    with pytest.raises(KeyboardInterrupt):
        lib.export(path)
    assert list(tmp_path.iterdir()) == []


def test_bad_inputs_get_typed_errors(tiny):
    _, lib = tiny
    with pytest.raises(InputSignatureError, match=r"input_0|x.*float32\[4, 1, 8, 8\]"):
        lib.run(np.zeros((4, 1, 8, 8), np.int64))
    with pytest.raises(InputSignatureError, match="shape"):
        lib.run(np.zeros((4, 1, 9, 8), np.float32))
    with pytest.raises(InputSignatureError, match="expected 1 input"):
        lib.run(np.zeros((4, 1, 8, 8), np.float32), np.zeros(3))
    for bad in (np.nan, np.inf, -np.inf):  # anywhere in the batch, not only the first sample
        x = np.zeros((4, 1, 8, 8), np.float32)
        x[3, 0, 5, 2] = bad
        with pytest.raises(InputSignatureError, match="NaN or infinity"):
            lib.run(x)
    finite = np.full((4, 1, 8, 8), np.finfo(np.float32).max, np.float32)
    assert lib.run(finite).shape[0] == 4  # the largest finite values are accepted


def test_unsupported_op_fails_at_compile_time_naming_op_and_node():
    class Weird(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            return torch.sin(self.fc(x))

    with pytest.raises(UnsupportedOpError) as e:
        intq.compile(Weird().eval(), torch.randn(2, 8), calibration=calib((2, 8)))
    assert "Sin" in str(e.value) and "node" in str(e.value)


def test_unknown_target_is_rejected():
    with pytest.raises(intq.errors.ConfigError, match="target"):
        intq.compile(torch.nn.Linear(2, 2), torch.randn(1, 2), [torch.randn(1, 2)], target="gpu")


@pytest.mark.slow
def test_deit_tiny_224_bit_exact():
    torch.manual_seed(0)
    model = deit_tiny().eval()
    lib = intq.compile(model, torch.randn(2, 3, 224, 224), calibration=calib((2, 3, 224, 224), n=3))
    assert intq.check_integer_only(lib.integer_onnx) == []
    assert lib._build.tir_floats == []
    x = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
    assert np.array_equal(lib.run(x), intq.reference_run(lib.integer_onnx, x))


def test_float_inputs_reach_the_graph_as_float32_bits():
    """The graph quantizes its float inputs itself (QuantizeFloatBits): the host hands it the
    float32 bit patterns, into reused int32 buffers; a float64 input is rounded to float32
    first, as the float model's own input would be."""
    from intq import boundary

    x64 = np.random.default_rng(0).standard_normal((3, 8))
    spec = boundary.InputSpec("x", (3, 8), "float32", "int32", 0.25, bits=True)
    out = np.full((3, 8), 7, np.int32)
    (got,) = boundary.quantize_inputs([spec], [x64], [out])
    assert got is out and np.array_equal(got.view(np.float32), x64.astype(np.float32))
    legacy = boundary.InputSpec("x", (3, 8), "float32", "int8", 0.25)
    with pytest.raises(InputSignatureError, match="recompile"):
        boundary.quantize_inputs([legacy], [x64])


def test_device_tensor_shares_aligned_buffer():
    """The Executor writes each call's input into one aligned numpy buffer that its TVM tensor
    shares (zero copy), so the VM sees every call's values."""
    q = compat.aligned_empty((3, 5), "int8")
    q[...] = 1
    t = compat.to_device_tensor(q, zero_copy=True)
    q[...] = np.arange(15, dtype=np.int8).reshape(3, 5)
    assert np.array_equal(t.numpy(), q)


def test_input_calibrated_all_zeros_compiles():
    """An input that is all zeros in calibration gets the smallest step whose reciprocal is
    still a dyadic multiplier (2^-30), so the in-graph quantizer builds; bit-exact."""

    class M(torch.nn.Module):
        def forward(self, x, y):
            return torch.relu(x + y)

    rng = np.random.default_rng(0)
    pair = lambda: (  # noqa: E731
        torch.from_numpy(rng.standard_normal((2, 8)).astype(np.float32)),
        torch.zeros(2, 8),
    )
    lib = intq.compile(M().eval(), pair(), calibration=[pair(), pair()])
    x, y = (t.numpy() for t in pair())
    assert np.array_equal(lib.run(x, y), intq.reference_run(lib.integer_onnx, x, y))


def test_conv_whose_requantize_is_per_tensor_feeds_a_residual_add():
    """A one-channel conv (its per-channel Requantize compacts to one multiplier) read by a
    residual Add: the conv's epilogue applies the Requantize and the Add reads that result."""

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

        def forward(self, x):
            return self.conv(x) + torch.relu(x)

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
    cal = [torch.from_numpy(rng.standard_normal((1, 1, 8, 8)).astype(np.float32)) for _ in range(2)]
    lib = intq.compile(M().eval(), torch.from_numpy(x), calibration=cal)
    assert np.array_equal(lib.run(x), intq.reference_run(lib.integer_onnx, x))
