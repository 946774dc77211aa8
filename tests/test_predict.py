"""--mode=predict: a raw NIfTI cohort -> predictions.csv with only a trained workdir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from her2jax import labels
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files
from her2jax.train import inference
from her2jax.train.predict import predict_cohort

from .test_prepare import copy_cohort, read_csv, write_csv

PROBS = ["prob_HER2-zero", "prob_HER2-low", "prob_HER2-positive"]


@pytest.fixture(scope="module")
def predicted(trained, phantom_cohort) -> Path:
    workdir, _ = trained
    return predict_cohort(workdir, phantom_cohort, n_boot=50)


def _probs(path: Path) -> dict[str, np.ndarray]:
    frame = files.read_predictions(path)
    return dict(zip(frame["patient_id"], frame[PROBS].to_numpy(), strict=True))


def test_predict_matches_eval_of_the_prepared_test_centre(trained, predicted,
                                                          phantom_cohort):
    workdir, _ = trained
    assert predicted == workdir / "predict" / phantom_cohort.name / "predictions.csv"
    inference.evaluate(workdir, splits=["test_CENTER_C"], n_boot=0)
    evaluated = _probs(workdir / "eval" / "test_CENTER_C" / "predictions.csv")
    ours = _probs(predicted)
    assert len(evaluated) >= 8
    for pid, probs in evaluated.items():
        np.testing.assert_allclose(ours[pid], probs, atol=1e-6, rtol=0, err_msg=pid)


def test_predictions_list_every_cohort_patient(predicted, phantom_cohort):
    rows = read_csv(phantom_cohort / "clinical.csv")
    frame = files.read_predictions(predicted)
    assert list(frame.columns[:6]) == ["patient_id", "center", "label", *PROBS]
    assert "manufacturer" in frame.columns
    assert sorted(frame["patient_id"]) == sorted(r["patient_id"] for r in rows)
    truth = {r["patient_id"]: labels.three_class(r["ihc_score"], r["ish_result"])[0]
             for r in rows}
    names = labels.CLASS_NAMES["her2_3class"]
    expected = {pid: "" if k is None else names[k] for pid, k in truth.items()}
    assert dict(zip(frame["patient_id"], frame["label"], strict=True)) == expected
    assert "" in set(frame["label"])   # the phantom's IHC 2+ cases without ISH
    np.testing.assert_allclose(frame[PROBS].to_numpy().sum(1), 1.0, atol=1e-5)
    summary = json.loads((predicted.parent / "metrics.json").read_text())
    # The cohort holds the patients the model trained on: predicted, but left out of the
    # metrics and named (issue 16).
    trained_on = set(json.loads((predicted.parents[2] / "trained_on.json").read_text())["train"])
    assert trained_on and summary["trained_on"] == sorted(trained_on)
    assert summary["n_trained_on"] == len(trained_on)
    assert summary["n"] == sum(k is not None for pid, k in truth.items() if pid not in trained_on)
    assert summary["n_unlabelled"] == sum(k is None for k in truth.values())
    assert not (predicted.parent / "rejected.csv").exists()


def test_a_moved_workdir_is_all_predict_needs(trained, predicted, phantom_cohort,
                                              tmp_path):
    workdir, _ = trained
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(workdir, moved, ignore=shutil.ignore_patterns("predict", "eval"))
    record = json.loads((moved / "config.json").read_text())
    record["config"]["data"]["data_dir"] = str(tmp_path / "no-dataset-here")
    (moved / "config.json").write_text(json.dumps(record))
    path = predict_cohort(moved, phantom_cohort, n_boot=0)
    assert path == moved / "predict" / phantom_cohort.name / "predictions.csv"
    ours, before = _probs(path), _probs(predicted)
    assert ours.keys() == before.keys()
    for pid, probs in before.items():
        np.testing.assert_allclose(ours[pid], probs, atol=1e-7, rtol=0, err_msg=pid)


def test_a_broken_case_stops_predict_unless_skipped(trained, predicted,
                                                    phantom_cohort, tmp_path):
    workdir, _ = trained
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort", per_center=2)
    pids = [r["patient_id"] for r in read_csv(cohort / "clinical.csv")]
    broken = pids[1]
    phase = cohort / "images" / broken / f"{broken}_0001.nii.gz"
    phase.write_bytes(phase.read_bytes()[:1000])

    out = tmp_path / "out"
    with pytest.raises(Her2jaxError) as error:
        predict_cohort(workdir, cohort, out=out)
    message = str(error.value)
    assert "\n" not in message and broken in message and phase.name in message, message
    assert "--skip_invalid" in message
    assert not out.exists()

    path = predict_cohort(workdir, cohort, out=out, skip_invalid=True, n_boot=0)
    assert path == out / "predictions.csv"
    ours, before = _probs(path), _probs(predicted)
    assert sorted(ours) == sorted(set(pids) - {broken})
    for pid, probs in ours.items():
        np.testing.assert_allclose(probs, before[pid], atol=1e-6, rtol=0, err_msg=pid)
    rejected = read_csv(out / "rejected.csv")
    assert [r["patient_id"] for r in rejected] == [broken]
    assert phase.name in rejected[0]["file"] and rejected[0]["reason"]


def test_a_cohort_without_any_label_column_is_predicted(trained, phantom_cohort, tmp_path):
    workdir, _ = trained
    cohort = copy_cohort(phantom_cohort, tmp_path / "new", per_center=1)
    rows = [{k: v for k, v in r.items() if k not in ("ihc_score", "ish_result", "her2",
                                                      "her2_class")}
            for r in read_csv(cohort / "clinical.csv")]
    write_csv(cohort / "clinical.csv", rows)
    path = predict_cohort(workdir, cohort, n_boot=0)
    frame = files.read_predictions(path)
    assert len(frame) == 3 and (frame["label"] == "").all()
    assert not (path.parent / "metrics.json").exists()
