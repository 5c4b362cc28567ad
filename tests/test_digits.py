"""The spine's accuracy claim, measured as the README's main job measures it: a ViT trained on
scikit-learn's digits, compiled for cpu-int8, exported, reloaded with the runtime only."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import intq
from intq.models.digits import evaluate, load_digits_split, train_digits_vit


@pytest.mark.slow
def test_digits_vit_integer_accuracy_from_reloaded_so(tmp_path):
    split = load_digits_split()
    model = train_digits_vit(split)
    x_train, x_test = np.asarray(split.x_train), np.asarray(split.x_test)
    y_test = np.asarray(split.y_test)
    calib = [x_train[i : i + 64] for i in range(0, len(x_train), 64)]
    lib = intq.compile(model, torch.as_tensor(x_train[:64]), calibration=calib)
    assert intq.check_integer_only(lib.integer_onnx) == []
    path = tmp_path / "digits.so"
    lib.export(path)
    np.save(tmp_path / "x.npy", x_test)
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
    logits = np.load(tmp_path / "y.npy")
    assert np.array_equal(logits, intq.reference_run(lib.integer_onnx, x_test))
    fp32_acc = evaluate(model, split.x_test, split.y_test)
    int_acc = float((logits.argmax(1) == y_test).mean() * 100)
    fp32_pred = model(split.x_test).argmax(1).numpy()
    agreement = float((logits.argmax(1) == fp32_pred).mean() * 100)
    print(f"FP32 {fp32_acc:.2f} %, integer {int_acc:.2f} %, agreement {agreement:.2f} %")
    assert fp32_acc > 95.0
    assert abs(fp32_acc - int_acc) <= 0.5
    assert agreement >= 99.0
