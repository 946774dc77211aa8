"""The hand-made kinetic baseline of --mode=eval (her2jax.train.baseline) on the shared dataset:
fitted on the run's training split with its labels, cases without features skipped, and an
older dataset without kinetic_features.csv simply without a baseline."""

from __future__ import annotations

import csv
import logging
import shutil

import ml_collections
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from her2jax.data import kinetic_features, pipeline
from her2jax.evaluate import files
from her2jax.train import baseline

from .conftest import small_data_config


def by_hand_macro_auc(table_dir, train: pipeline.Split, test: pipeline.Split, *,
                      balanced: bool) -> float:
    """The baseline written out with scikit-learn alone, from the CSV, for one test split."""
    with open(table_dir / kinetic_features.FILE, newline="") as f:
        rows = {r["patient_id"]: [float(r[k]) for k in kinetic_features.FEATURES]
                for r in csv.DictReader(f)}
    x_train = np.asarray([rows[p] for p in train.patient_ids])
    model = make_pipeline(StandardScaler(), LogisticRegression(
        max_iter=1000, class_weight="balanced" if balanced else None))
    model.fit(x_train, train.labels)
    probs = model.predict_proba(np.asarray([rows[p] for p in test.patient_ids]))
    return float(roc_auc_score(test.labels, probs, multi_class="ovr", average="macro"))


def _config(**data) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict({"data": small_data_config().to_dict(),
                                        "train": {"class_weighting": "balanced"}})
    config.data.update(data)
    return config


@pytest.mark.parametrize("permute", [False, True], ids=["labels", "permuted-labels"])
def test_fitted_on_the_runs_training_split_with_its_labels(dataset, permute):
    config = _config(permute_train_labels=permute)
    splits = pipeline.select_splits(dataset, config.data)
    evaluated = {k: splits[k] for k in ("val", "test_CENTER_C")}
    scored = baseline.fit_and_score(dataset, config, evaluated, n_boot=20)
    train = splits["train"]
    if permute:   # the negative control reaches the baseline too
        plain = pipeline.select_splits(dataset, _config().data)["train"]
        assert train.patient_ids == plain.patient_ids and (train.labels != plain.labels).any()
    assert scored.summary["fitted_on"] == "train" and scored.summary["n_train"] == len(train)
    assert scored.summary["features"] == list(kinetic_features.FEATURES)
    for name, split in evaluated.items():
        auc = scored.metrics[name]["macro_auc"]
        assert auc["value"] == pytest.approx(
            by_hand_macro_auc(dataset.path, train, split, balanced=True), abs=1e-9)
        assert auc["ci_low"] <= auc["value"] <= auc["ci_high"]
        assert scored.metrics[name]["n"] == len(split)
        assert scored.summary["splits"][name] == {"n": len(split), "n_skipped": 0,
                                                  "macro_auc": auc}


def test_cases_without_features_are_skipped_and_counted(dataset, data_dir, tmp_path, caplog):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    moved = pipeline.open_dataset(copy, small_data_config())
    splits = pipeline.select_splits(moved, small_data_config())
    train, test = splits["train"], splits["test_CENTER_C"]
    path = moved.path / kinetic_features.FILE
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    for row in rows:
        if row[0] == train.patient_ids[0]:
            row[1] = "nan"          # an undefined wash-in
        if row[0] == test.patient_ids[0]:
            row[5] = "nan"          # an undefined rim
    rows = [r for r in rows if r[0] != test.patient_ids[1]]   # and a case not in the table
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)

    with caplog.at_level(logging.WARNING):
        scored = baseline.fit_and_score(moved, _config(), {"test_CENTER_C": test}, n_boot=0)
    assert scored.summary["n_train"] == len(train) - 1
    assert scored.summary["n_train_skipped"] == 1
    assert scored.summary["splits"]["test_CENTER_C"]["n_skipped"] == 2
    assert scored.metrics["test_CENTER_C"]["n"] == len(test) - 2
    assert f"1 of {len(train)} training cases" in caplog.text
    assert f"2 of {len(test)} cases of test_CENTER_C" in caplog.text


def test_a_dataset_without_the_file_has_no_baseline_and_stale_files_go(dataset, data_dir,
                                                                        tmp_path, caplog):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    old = pipeline.open_dataset(copy, small_data_config())
    (old.path / kinetic_features.FILE).unlink()
    test = pipeline.select_splits(old, small_data_config())["test_CENTER_C"]
    with caplog.at_level(logging.WARNING):
        scored = baseline.fit_and_score(old, _config(), {"test_CENTER_C": test}, n_boot=0)
    assert scored is None
    lines = [r for r in caplog.records if "baseline" in r.getMessage()]
    assert len(lines) == 1 and kinetic_features.FILE in lines[0].getMessage()

    eval_dir = tmp_path / "eval"   # what an evaluation on the newer dataset left
    files.write_metrics(eval_dir / "test_CENTER_C" / baseline.METRICS_FILE, {"n": 1})
    files.write_metrics(eval_dir / baseline.SUMMARY_FILE, {"n_train": 1})
    baseline.write(eval_dir, scored, ["test_CENTER_C"])
    assert not (eval_dir / "test_CENTER_C" / baseline.METRICS_FILE).exists()
    assert not (eval_dir / baseline.SUMMARY_FILE).exists()


@pytest.mark.parametrize("content", ["patient_id,wash_in\nPHA_0001,0.5\n",
                                     ",".join(kinetic_features.COLUMNS) + "\nPHA_0001,x,1,2,3,4\n"],
                         ids=["wrong header", "not a number"])
def test_a_corrupt_features_file_is_a_warning_naming_it_not_a_failed_eval(
        data_dir, tmp_path, caplog, content):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    broken = pipeline.open_dataset(copy, small_data_config())
    (broken.path / kinetic_features.FILE).write_text(content)
    test = pipeline.select_splits(broken, small_data_config())["test_CENTER_C"]
    with caplog.at_level(logging.WARNING):
        scored = baseline.fit_and_score(broken, _config(), {"test_CENTER_C": test}, n_boot=0)
    assert scored is None
    lines = [r.getMessage() for r in caplog.records if "baseline" in r.getMessage()]
    assert len(lines) == 1 and kinetic_features.FILE in lines[0]
