"""Calibration methods: minmax, percentile and the L2-error search, on known distributions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from intq.config import CompileConfig
from intq.errors import CalibrationError, ConfigError
from intq.passes.calibration import calibrate, int8_l2_error, search_range


def _relu_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 1000])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1000])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 9
    return m


def _outlier_batches(n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        out.append(rng.standard_t(2, (4, 1000)).astype(np.float32))  # heavy tails
    return out


def test_search_picks_a_clipped_range_with_lower_error_than_minmax():
    cal = calibrate(_relu_model(), _outlier_batches(), search=True)
    a_mm, a_s = cal.amax("x", "minmax"), cal.amax("x", "search")
    pool = np.abs(np.concatenate([b.ravel() for b in _outlier_batches()]))
    assert a_mm == pytest.approx(float(pool.max()))
    assert a_s < a_mm  # the tail is clipped
    assert int8_l2_error(pool, a_s) < int8_l2_error(pool, a_mm)


def test_search_returns_the_best_candidate():
    rng = np.random.default_rng(3)
    for x in (
        np.abs(rng.normal(size=5000)),
        rng.uniform(0, 1, 5000),
        np.abs(rng.laplace(size=5000)),
    ):
        a = search_range(x, float(x.max()))
        cands = [float(np.percentile(x, p)) for p in (99.9, 99.99, 99.999)] + [float(x.max())]
        assert a in cands
        assert int8_l2_error(x, a) == min(int8_l2_error(x, c) for c in cands)


def test_search_not_computed_is_an_error_not_a_silent_fallback():
    cal = calibrate(_relu_model(), _outlier_batches(1))
    with pytest.raises(CalibrationError, match="search"):
        cal.amax("x", "search")
    with pytest.raises(CalibrationError, match="unknown calibration method"):
        cal.amax("x", "mse")


def test_progress_bar_on_stderr(capsys):
    calibrate(_relu_model(), _outlier_batches(3), progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "calibrating" in err
    calibrate(_relu_model(), _outlier_batches(2), progress=False)
    assert capsys.readouterr().err == ""


def test_config_validates_method():
    assert CompileConfig(calibration="search").calibration == "search"
    with pytest.raises(ConfigError, match="search"):
        CompileConfig(calibration="kl")
