"""``brainage export --format onnx|torchscript`` and ``brainage predict`` on the exported file.

Parity (issue 16.3): on a model with the demo's network and input shape (48x56x48, cnn_demo's
CNN, random weights spread so ages differ by years), ONNX Runtime and TorchScript give the
PyTorch ages within 0.01 y, on random volumes and on real preprocessed scans through
``brainage predict``. Damaged exports are one-line errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from brainage_hpc.cli import main
from brainage_hpc.evaluation.predict import load_model, predict_batch
from tests import predict_fixtures
from tests.predict_fixtures import DEMO_PARAMS, make_model_bundle, make_run_dir, make_scans

pytestmark = pytest.mark.slow
synth_subjects = predict_fixtures.synth_subjects

DEMO_SHAPE = (48, 56, 48)
FINGERPRINT = {"pipeline": "skullstripped", "config": {"shape": list(DEMO_SHAPE)}, "versions": {"nibabel": "5"},
               "template_sha256": None}

def _calibration(run: Path) -> dict:
    """A calibration.json (contract 7) for the run's weights: bias, conformal and OOD fitted on made-up numbers."""
    from brainage_hpc.evaluation.calibration import fit_calibration
    from brainage_hpc.evaluation.exported import model_digest

    rng = np.random.default_rng(0)
    age = rng.uniform(22, 37, 12)
    lm = load_model(run, "cpu")
    n_feat = predict_batch(lm, torch.zeros(1, 1, *DEMO_SHAPE), torch.zeros(1))["features"].shape[1]
    return json.loads(json.dumps(fit_calibration(age, 0.8 * age + 6 + rng.normal(0, 2, 12), rng.normal(size=(200, n_feat)),
                                                 rng.normal(size=(12, n_feat)), model={"digest": model_digest(lm.model)})))


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory) -> dict[str, Path]:
    """A demo-shaped regression run (with calibration.json) and its ONNX and TorchScript exports."""
    root = tmp_path_factory.mktemp("export")
    run = make_run_dir(root / "run", shape=DEMO_SHAPE, voxel_mm=3.0, params=DEMO_PARAMS, spread=40.0, seed=1)
    calibration = _calibration(run)
    (run / "calibration.json").write_text(json.dumps(calibration))
    out = {"run": run, "calibration": calibration}
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.ts")):
        assert main(["export", "--run-dir", str(run), "--format", fmt, "--out", str(root / name)]) == 0
        out[fmt] = root / name
    return out


def test_onnx_and_torchscript_match_pytorch_within_0_01_years(demo_like, synth_subjects, tmp_path, capsys):
    """Ages within 0.01 y; the calibrated columns (intervals, OOD score from the exported features) agree too."""
    ref = load_model(demo_like["run"], "cpu")
    image = torch.randn(6, 1, *DEMO_SHAPE, generator=torch.Generator().manual_seed(0))
    sex = torch.tensor([0.0, 1.0] * 3)
    expected = predict_batch(ref, image, sex)["pred_age"]
    assert np.ptp(expected) > 1.0  # the ages differ by years, so parity means something
    for fmt in ("onnx", "torchscript"):
        got = predict_batch(load_model(demo_like[fmt]), image, sex)["pred_age"]
        assert np.max(np.abs(got - expected)) <= 0.01, fmt

    scans = make_scans(tmp_path / "in", 4, synth_subjects)
    ages = {}
    for name, ckpt in (("torch", demo_like["run"]), ("onnx", demo_like["onnx"]), ("torchscript", demo_like["torchscript"])):
        out = tmp_path / f"{name}.csv"
        assert main(["predict", "--checkpoint", str(ckpt), "--input", *map(str, scans), "--out", str(out),
                     "--workers", "0", "--no-progress", "--no-report"]) == 0
        ages[name] = pd.read_csv(out)[["pred_age", "age_lower", "age_upper", "ood_score"]].to_numpy()
    assert np.max(np.abs(ages["onnx"] - ages["torch"])) <= 0.01
    assert np.max(np.abs(ages["torchscript"] - ages["torch"])) <= 0.01


def test_exports_carry_shape_preprocessing_fingerprint_and_calibration(demo_like, tmp_path):
    import onnx

    meta = json.loads({p.key: p.value for p in onnx.load(str(demo_like["onnx"])).metadata_props}["brainage"])
    assert meta["input"]["image"] == ["batch", 1, *DEMO_SHAPE] and meta["outputs"] == ["pred_age", "features"]
    assert meta["preprocess"]["voxel_mm"] == 3.0 and meta["calibration"] == demo_like["calibration"]
    lm = load_model(demo_like["torchscript"])
    assert lm.calibration == demo_like["calibration"] and lm.shape == DEMO_SHAPE

    bundle = make_model_bundle(tmp_path / "fp" / "model.pt", extra={"fingerprint": FINGERPRINT})
    assert main(["export", "--run-dir", str(bundle), "--format", "onnx", "--out", str(tmp_path / "fp.onnx")]) == 0
    assert load_model(tmp_path / "fp.onnx").fingerprint == FINGERPRINT

    assert main(["export", "--run-dir", str(demo_like["run"]), "--out", str(tmp_path / "model.pt")]) == 0
    assert load_model(tmp_path / "model.pt").calibration == demo_like["calibration"]


def test_classifier_export_keeps_probabilities(tmp_path):
    bundle = make_model_bundle(tmp_path / "clf" / "model.pt", task="classify4", spread=20.0)
    assert main(["export", "--run-dir", str(bundle), "--format", "onnx", "--out", str(tmp_path / "clf.onnx")]) == 0
    image = torch.randn(3, 1, *predict_fixtures.SHAPE, generator=torch.Generator().manual_seed(2))
    sex = torch.tensor([0.0, 1.0, 1.0])
    a = predict_batch(load_model(bundle, "cpu"), image, sex)
    b = predict_batch(load_model(tmp_path / "clf.onnx"), image, sex)
    assert np.abs(a["probs"] - b["probs"]).max() <= 1e-4 and (a["bin4_pred"] == b["bin4_pred"]).all()


def _damaged(src: Path, dst: Path, how: str) -> Path:
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "flipped weights":
        start = len(data) // 2  # inside the weights: the graph's digest no longer matches
        for i in range(start, start + 64):
            data[i] ^= 0x01
    elif how == "empty":
        data = bytearray()
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("how", ["truncated", "flipped weights", "empty"])
def test_damaged_exports_are_one_line_errors(demo_like, tmp_path, capsys, fmt, how):
    bad = _damaged(demo_like[fmt], tmp_path / demo_like[fmt].name, how)
    (tmp_path / "x.nii.gz").write_bytes(b"")
    rc = main(["predict", "--checkpoint", str(bad), "--input", str(tmp_path / "x.nii.gz"), "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith(f"brainage predict: error: {bad}: ") and "\n" not in err and "Traceback" not in err, err


def test_onnx_without_brainage_metadata_is_refused(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    (tmp_path / "x.nii.gz").write_bytes(b"")
    assert main(["predict", "--checkpoint", str(tmp_path / "other.onnx"), "--input", str(tmp_path / "x.nii.gz")]) == 2
    assert "no brainage metadata" in capsys.readouterr().err
