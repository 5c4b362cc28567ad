"""Per-tensor SQNR report: consistent with the outputs, complete, and plotted atomically."""

import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

import intq
from intq.models.vit import VisionTransformer, ViTConfig
from intq.report import sqnr_db, tensor_map

CFG = ViTConfig(
    img_size=8,
    patch_size=2,
    in_chans=1,
    num_classes=10,
    embed_dim=32,
    depth=1,
    num_heads=2,
    mlp_ratio=2.0,
)


def test_sqnr_db_definition():
    x = np.array([3.0, 4.0])
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x + np.array([0.3, 0.4])) == pytest.approx(20.0)


def test_report_matches_the_deployed_output_and_covers_the_graph(tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(CFG).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(4, 1, 8, 8, generator=g) for _ in range(4)]
    lib = intq.compile(model, data[0], calibration=data)
    x = torch.cat(data[:2]).numpy()
    rep = lib.error_report([x[:4], x[4:]])
    tmap = tensor_map(lib.integer_onnx)
    assert [r.name for r in rep.rows if r.name in tmap] == [r.name for r in rep.rows]
    assert {"LayerNormalization", "Softmax", "Gelu", "MatMul"} <= {r.op for r in rep.rows}
    # the output row is exactly the SQNR of the deployed (dequantized) output vs float ONNX
    sess = ort.InferenceSession(
        lib.float_onnx.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    ref = np.concatenate(
        [sess.run(None, {sess.get_inputs()[0].name: b})[0] for b in (x[:4], x[4:])]
    )
    want = sqnr_db(ref, lib.dequantize(lib.run(x)))
    assert rep.output_sqnr_db == pytest.approx(want, rel=1e-5)  # ORT graph opts differ
    assert 10.0 < rep.output_sqnr_db < 80.0
    assert rep.worst(1)[0].sqnr_db == min(r.sqnr_db for r in rep.rows)
    text = rep.to_text()
    assert "<- output" in text and len(text.splitlines()) == len(rep.rows) + 1
    pytest.importorskip("matplotlib")
    png = rep.plot(tmp_path / "sqnr.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sqnr.png"]
