"""Cross-validation (``--mode=cv``): fold properties, splits.json rules, out-of-fold coverage,
the fold ensemble, test-time augmentation, resume after SIGKILL mid-fold, pca_lr folds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from her2jax.data import pipeline
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files
from her2jax.models import factory
from her2jax.train import cv, inference, logger
from her2jax.train import step as step_lib

from .conftest import kill_at_first_checkpoint, run_her2jax
from .test_factory import load_config

REPO = Path(__file__).resolve().parents[1]
# tiny_cpu at the shared dataset's crops; 40 steps so that a kill lands mid-fold.
CV_ARGS = ("--config=configs/tiny_cpu.py", "--config.data.recipe.shape=24,24,24",
           "--config.train.batch_size=8", "--config.train.steps=40",
           "--config.train.warmup_steps=2", "--config.train.eval_every=20",
           "--config.train.save_every=10", "--config.train.log_every=5",
           "--config.train.eval_batch_size=8", "--folds=3", "--bootstrap=50", "--noprogress")


def _her2jax(workdir: Path, data_dir: Path, *extra: str, args=CV_ARGS, **kwargs):
    return run_her2jax("cv", workdir, data_dir, args, *extra, **kwargs)


@pytest.fixture(scope="module")
def cv_run(data_dir, tmp_path_factory):
    """A 3-fold cross-validation through the CLI, uninterrupted (read-only for tests)."""
    workdir = tmp_path_factory.mktemp("cv") / "run"
    result = _her2jax(workdir, data_dir)
    return workdir, result.stdout


def _pool(data_dir) -> pipeline.Split:
    config = load_config("tiny_cpu")
    config.data.recipe.shape = (24, 24, 24)
    dataset = pipeline.open_dataset(data_dir, config.data)
    return pipeline.training_pool(dataset, config.data)


# ---------------------------------------------------------------- the folds


def _synthetic_pool(labels, centers) -> pipeline.Split:
    n = len(labels)
    return pipeline.Split(name="train", tfds_splits=("a",), keys=np.zeros((n, 2), np.int64),
                          labels=np.asarray(labels, np.int32),
                          patient_ids=tuple(f"P{i:04d}" for i in range(n)),
                          centers=tuple(centers), class_names=("a", "b", "c"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=st.lists(st.integers(0, 2), min_size=6, max_size=80), folds=st.integers(2, 6),
       seed=st.integers(0, 2 ** 31))
def test_kfold_folds_are_patient_level_stratified_and_seeded(labels, folds, seed):
    folds = min(folds, len(labels))
    pool = _synthetic_pool(labels, ["A"] * len(labels))
    made = cv.make_folds(pool, folds=folds, scheme="kfold", seed=seed)
    assert made == cv.make_folds(pool, folds=folds, scheme="kfold", seed=seed)
    assert len(made) == folds
    every = set(pool.patient_ids)
    held = [pid for fold in made for pid in fold["val"]]
    assert sorted(held) == sorted(every)                      # each patient held out once
    for fold in made:
        assert set(fold["train"]) == every - set(fold["val"])  # and trains everywhere else
    label_of = dict(zip(pool.patient_ids, pool.labels, strict=True))
    sizes = [len(f["val"]) for f in made]
    assert max(sizes) - min(sizes) <= 1
    for c in set(labels):
        per_fold = [sum(label_of[p] == c for p in f["val"]) for f in made]
        assert max(per_fold) - min(per_fold) <= 1             # stratified
    # The folds validate as a user-written splits.json would.
    assert cv.validate_splits(made, pool, "splits.json") == made


@settings(max_examples=40, deadline=None)
@given(centers=st.lists(st.sampled_from("ABCDE"), min_size=4, max_size=60),
       data=st.data())
def test_centre_folds_keep_each_centre_whole(centers, data):
    names = sorted(set(centers))
    if len(names) < 2:
        with pytest.raises(Her2jaxError, match="--cv=centers"):
            cv.make_folds(_synthetic_pool([0] * len(centers), centers), folds=2,
                          scheme="centers", seed=0)
        return
    folds = data.draw(st.integers(2, len(names)))
    pool = _synthetic_pool([i % 3 for i in range(len(centers))], centers)
    made = cv.make_folds(pool, folds=folds, scheme="centers", seed=0)
    centre_of = dict(zip(pool.patient_ids, pool.centers, strict=True))
    fold_of_centre = {}
    for k, fold in enumerate(made):
        assert fold["val"], "a fold holds out no patient"
        for pid in fold["val"]:
            assert fold_of_centre.setdefault(centre_of[pid], k) == k
    assert sorted(fold_of_centre) == names
    if folds == len(names):   # leave-one-centre-out
        assert all(len({centre_of[p] for p in f["val"]}) == 1 for f in made)


def _bad_splits(ids):
    a, b, c = ids[: len(ids) // 3], ids[len(ids) // 3: 2 * len(ids) // 3], ids[2 * len(ids) // 3:]
    return {
        "not a list": ({"val": a}, "JSON list of at least two folds"),
        "one fold": ([{"val": ids}], "at least two folds"),
        "no val": ([{"train": a}, {"val": ids}], 'fold 0 is not an object with a "val"'),
        "twice": ([{"val": a + b[:1]}, {"val": b}, {"val": c}], "exactly one fold"),
        "unknown": ([{"val": a + ["NOBODY"]}, {"val": b}, {"val": c}],
                    "patient NOBODY: .*not a labelled patient of the training centres"),
        "missing": ([{"val": a}, {"val": b}, {"val": c[1:]}], "in no fold's"),
        "empty": ([{"val": a}, {"val": b + c}, {"val": []}], "holds out no patient"),
        "train overlaps val": ([{"train": b + c + a[:1], "val": a}, {"val": b}, {"val": c}],
                               'in both "train" and "val"'),
        "train incomplete": ([{"train": b + c[1:], "val": a}, {"val": b}, {"val": c}],
                             'in neither "train" nor "val"'),
        "not strings": ([{"val": [1, 2]}, {"val": ids}], "list of patient ids"),
    }


@pytest.mark.parametrize("case", list(_bad_splits([f"P{i}" for i in range(9)])))
def test_bad_splits_files_are_refused(case):
    ids = [f"P{i:04d}" for i in range(12)]
    raw, message = _bad_splits(ids)[case]
    pool = _synthetic_pool([i % 3 for i in range(12)], ["A"] * 12)
    with pytest.raises(Her2jaxError, match=message) as error:
        cv.validate_splits(raw, pool, "/x/splits.json")
    assert "/x/splits.json" in str(error.value) and "\n" not in str(error.value)


def test_a_bad_splits_file_is_one_line_and_nothing_is_trained(data_dir, tmp_path):
    workdir = tmp_path / "cv"
    workdir.mkdir()
    ids = list(_pool(data_dir).patient_ids)
    (workdir / cv.SPLITS_FILE).write_text(json.dumps([{"val": ids[:5]}, {"val": ids[4:]}]))
    result = _her2jax(workdir, data_dir, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "splits.json" in last and "exactly one fold" in last and "Traceback" not in \
        result.stderr
    assert not list(workdir.glob("fold_*"))
    (workdir / cv.SPLITS_FILE).write_text("[{")
    result = _her2jax(workdir, data_dir, check=False)
    assert result.returncode == 2 and "is not valid JSON" in result.stderr


# ---------------------------------------------------------------- a cross-validation


def test_out_of_fold_predictions_cover_every_patient_once_by_a_model_that_never_saw_it(
        cv_run, data_dir):
    workdir, stdout = cv_run
    assert "out of fold (n=" in stdout and "ensemble test_CENTER_C" in stdout
    splits = json.loads((workdir / cv.SPLITS_FILE).read_text())
    assert json.loads((workdir / cv.CV_FILE).read_text()) == {"scheme": "kfold", "folds": 3,
                                                               "seed": 0}
    pool = _pool(data_dir)
    oof = files.read_predictions(workdir / "cv" / cv.OOF_FILE)
    assert sorted(oof["patient_id"]) == sorted(pool.patient_ids)
    for k, fold in enumerate(splits):
        mine = set(oof.loc[oof["fold"].astype(str) == str(k), "patient_id"])
        assert mine == set(fold["val"])
        seen = json.loads((cv.fold_dir(workdir, k) / "trained_on.json").read_text())
        assert not mine & (set(seen["train"]) | set(seen["val"]))
        assert set(seen["train"]) | set(seen["val"]) == set(fold["train"])
    # The pooled metrics are those of the file, with both kinds of interval and the folds'
    # mean and SD.
    pooled = json.loads((workdir / "cv" / "metrics.json").read_text())
    labels, probs, names = files.prediction_arrays(oof)
    from her2jax.evaluate import metrics

    again = metrics.summarize(labels, probs, names, n_boot=50)
    assert pooled["macro_auc"]["value"] == pytest.approx(again["macro_auc"]["value"])
    assert pooled["macro_auc"]["ci_low"] <= pooled["macro_auc"]["value"]
    assert pooled["per_class_auc_delong"]
    per_fold = json.loads((workdir / "cv" / "per_fold.json").read_text())
    values = [r["macro_auc"]["value"] for r in per_fold["rows"]]
    assert pooled["over_folds"]["macro_auc"]["mean"] == pytest.approx(np.mean(values))
    assert pooled["over_folds"]["macro_auc"]["sd"] == pytest.approx(np.std(values, ddof=1))
    assert "| mean ± SD |" in (workdir / "cv" / "per_fold.md").read_text()


def test_each_fold_is_a_normal_workdir(cv_run, tmp_path):
    workdir, _ = cv_run
    fold = tmp_path / "fold_1"
    shutil.copytree(cv.fold_dir(workdir, 1), fold)
    results = inference.evaluate(fold, n_boot=0)
    assert set(results) == {"val", pipeline.OOF, "test_CENTER_C"}
    oof = files.read_predictions(workdir / "cv" / cv.OOF_FILE)
    mine = oof[oof["fold"].astype(str) == "1"].set_index("patient_id")
    again = files.read_predictions(fold / "eval" / pipeline.OOF / "predictions.csv")
    again = again.set_index("patient_id").loc[mine.index]
    cols = [c for c in oof.columns if c.startswith("prob_")]
    np.testing.assert_allclose(again[cols].to_numpy(), mine[cols].to_numpy(), rtol=1e-6)


def test_the_ensemble_is_the_mean_of_the_fold_models(cv_run, data_dir):
    workdir, _ = cv_run
    ensemble = files.read_predictions(workdir / "eval" / "test_CENTER_C" / "predictions.csv")
    cols = [c for c in ensemble.columns if c.startswith("prob_")]
    folds = []
    for k in range(3):
        predictor = inference.load_predictor(cv.fold_dir(workdir, k))
        dataset = pipeline.open_dataset(data_dir, predictor.config.data)
        split = pipeline.select_splits(dataset, predictor.config.data)["test_CENTER_C"]
        assert list(split.patient_ids) == list(ensemble["patient_id"])
        folds.append(predictor.predict_split(dataset, split)[0])
    np.testing.assert_allclose(ensemble[cols].to_numpy(), np.mean(folds, axis=0), rtol=1e-5,
                               atol=1e-7)
    summary = json.loads((workdir / "eval" / "test_CENTER_C" / "metrics.json").read_text())
    assert summary["ensemble"]["members"] == 3 and len(summary["members"]) == 3
    calibration = json.loads((workdir / "eval" / "calibration.json").read_text())
    assert calibration["fitted_on"] == pipeline.OOF
    assert "out-of-fold" in calibration["statement"]
    baseline = json.loads((workdir / "eval" / "baseline.json").read_text())
    assert baseline["fitted_on"] == cv.ALL_FOLDS
    assert baseline["n_train"] + baseline["n_train_skipped"] == len(_pool(data_dir))
    assert list(baseline["splits"]) == ["test_CENTER_C"]   # oof would be in-sample for it


def test_eval_predict_and_features_on_a_cv_workdir_use_the_ensemble(cv_run, phantom_cohort,
                                                                    tmp_path):
    """predict on a raw NIfTI cohort equals the ensemble's eval of the same patients."""
    workdir, _ = cv_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    base = [sys.executable, "-m", "her2jax.main", f"--workdir={run}", "--bootstrap=20",
            "--noprogress"]
    ensemble, cols = _predict_equals_the_ensembles_eval(run, phantom_cohort, tmp_path / "pred")
    metrics_json = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    # Every patient of the training centres fitted some fold: out of the metrics.
    assert metrics_json["n_trained_on"] == len(_pool_of(run))
    result = subprocess.run([*base, "--mode=features"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    member = inference.load_predictor(cv.fold_dir(run, 0))
    dataset = pipeline.open_dataset(member.config.data.data_dir, member.config.data)
    split = pipeline.select_splits(dataset, member.config.data)["test_CENTER_C"]
    width = member.predict_split(dataset, split)[1].shape[1]
    with np.load(run / "features" / "test_CENTER_C.npz") as z:
        assert z["features"].shape == (len(split), 3 * width)   # the members', side by side
        np.testing.assert_allclose(z["probs"], ensemble[cols].to_numpy(), atol=1e-5)
    # --tta: the ensemble averaged over the 8 flips too, and metrics.json says so.
    result = subprocess.run([*base, "--mode=eval", "--tta"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((run / "eval" / "test_CENTER_C" / "metrics.json").read_text())
    assert summary["tta_views"] == 8 and summary["ensemble"]["members"] == 3
    # A split holding cross-validation patients is in-sample for the ensemble.
    result = subprocess.run([*base, "--mode=eval", "--splits=val"], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "the fold models trained on" in result.stderr
    result = subprocess.run([*base, "--mode=train"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2 and "is a cross-validation workdir" in result.stderr


def _predict_equals_the_ensembles_eval(workdir: Path, cohort: Path, out: Path):
    """--mode=predict of the raw NIfTI cohort with a CV workdir: its probabilities equal the
    ensemble's eval of the same (test-centre) patients. Returns (that eval, prob columns)."""
    result = subprocess.run([sys.executable, "-m", "her2jax.main", "--mode=predict",
                             f"--workdir={workdir}", f"--cohort={cohort}", f"--out={out}",
                             "--bootstrap=20"], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    predicted = files.read_predictions(out / "predictions.csv").set_index("patient_id")
    ensemble = files.read_predictions(workdir / "eval" / "test_CENTER_C" / "predictions.csv")
    cols = [c for c in ensemble.columns if c.startswith("prob_")]
    np.testing.assert_allclose(predicted.loc[ensemble["patient_id"], cols].to_numpy(),
                               ensemble[cols].to_numpy(), atol=1e-5)
    return ensemble, cols


def _pool_of(run: Path) -> list[str]:
    return [p for fold in json.loads((run / cv.SPLITS_FILE).read_text()) for p in fold["val"]]


def test_compare_works_on_ensemble_predictions(cv_run, tmp_path):
    workdir, _ = cv_run
    fold = tmp_path / "fold_0"
    shutil.copytree(cv.fold_dir(workdir, 0), fold)
    inference.evaluate(fold, splits=["test_CENTER_C"], n_boot=0)
    result = subprocess.run([sys.executable, "-m", "her2jax.cli.compare",
                             str(fold / "eval" / "test_CENTER_C" / "predictions.csv"),
                             str(workdir / "eval" / "test_CENTER_C" / "predictions.csv"),
                             "--bootstrap=50", "--noprogress"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "difference" in result.stdout


def test_a_user_written_splits_file_is_used_as_given(cv_run, data_dir, tmp_path):
    workdir, _ = cv_run
    ids = sorted(_pool(data_dir).patient_ids)
    mine = [{"train": ids[len(ids) // 2:], "val": ids[: len(ids) // 2]},
            {"val": ids[len(ids) // 2:]}]
    run = tmp_path / "cv"
    run.mkdir()
    (run / cv.SPLITS_FILE).write_text(json.dumps(mine))
    args = tuple(a for a in CV_ARGS if a != "--folds=3") + ("--config.train.steps=6",
                                                            "--config.train.eval_every=6")
    result = _her2jax(run, data_dir, args=args)
    assert "out of fold" in result.stdout
    assert json.loads((run / cv.CV_FILE).read_text())["scheme"] == "file"
    assert json.loads((run / cv.SPLITS_FILE).read_text()) == mine   # untouched
    held = json.loads((cv.fold_dir(run, 1) / "config.json").read_text())
    assert sorted(held["config"]["data"]["cv_holdout"]) == ids[len(ids) // 2:]
    # Another fold count on the same workdir is refused, naming the flag.
    result = _her2jax(run, data_dir, "--folds=4", args=args, check=False)
    assert result.returncode == 2 and "--folds=4 would change it" in result.stderr


def test_a_killed_cross_validation_resumes_at_its_fold_and_step(cv_run, data_dir, tmp_path):
    reference, _ = cv_run
    workdir = tmp_path / "cv"
    process = _her2jax(workdir, data_dir, wait=False)
    killed_at = kill_at_first_checkpoint(
        process, cv.fold_dir(workdir, 1) / "checkpoints" / "latest")
    assert cv.is_done(workdir, 0) and not cv.is_done(workdir, 1)
    assert killed_at < 40
    fold0 = (cv.fold_dir(workdir, 0) / "metrics.jsonl").read_text()

    _her2jax(workdir, data_dir)
    assert (cv.fold_dir(workdir, 0) / "metrics.jsonl").read_text() == fold0   # not retrained
    steps = [r["step"] for r in logger.read_metrics(cv.fold_dir(workdir, 1))
             if r["split"] == "train"]
    assert steps == [r["step"] for r in logger.read_metrics(cv.fold_dir(reference, 1))
                     if r["split"] == "train"]
    for k in range(3):
        a = inference.load_trained(cv.fold_dir(reference, k), which="latest").state.params
        b = inference.load_trained(cv.fold_dir(workdir, k), which="latest").state.params
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert (workdir / "cv" / cv.OOF_FILE).read_text() == \
        (reference / "cv" / cv.OOF_FILE).read_text()


def test_one_fold_at_a_time_then_aggregate(cv_run, data_dir, tmp_path):
    """The SLURM-array way: each task trains --fold=k; a last --mode=cv aggregates."""
    workdir = tmp_path / "cv"
    args = tuple(a for a in CV_ARGS if a != "--folds=3") + (
        "--folds=2", "--cv=centers", "--config.train.steps=6", "--config.train.eval_every=6",
        "--config.train.batch_size=4")   # one centre trains each fold: ~7 cases
    result = _her2jax(workdir, data_dir, "--fold=1", args=args, devices=4)
    assert "still to train: 0" in result.stdout and cv.is_done(workdir, 1)
    assert not (workdir / "cv").exists()
    splits = json.loads((workdir / cv.SPLITS_FILE).read_text())
    assert [{p[:3] for p in fold["val"]} for fold in splits] in ([{"PHA"}, {"PHB"}],
                                                                 [{"PHB"}, {"PHA"}])
    result = _her2jax(workdir, data_dir, "--fold=2", args=args, check=False, devices=4)
    assert result.returncode == 2 and "has folds 0 to 1" in result.stderr
    _her2jax(workdir, data_dir, args=args, devices=4)
    assert (workdir / "cv" / cv.OOF_FILE).exists()


def test_pca_lr_cross_validates_the_same_way(data_dir, phantom_cohort, tmp_path):
    workdir = tmp_path / "cv"
    args = ("--config=configs/fmbcmri_pca_lr.py", "--config.data.recipe.shape=24,24,24",
            "--config.model.vit.size=tiny", "--config.model.pretrained=",
            "--config.train.pca_components=4", "--config.train.eval_batch_size=8",
            "--config.data.worker_count=0", "--config.data.test_centers=('CENTER_C',)",
            "--folds=2", "--bootstrap=20", "--noprogress")
    result = _her2jax(workdir, data_dir, args=args)
    assert "out of fold" in result.stdout and "ensemble test_CENTER_C" in result.stdout
    oof = files.read_predictions(workdir / "cv" / cv.OOF_FILE)
    assert sorted(oof["patient_id"]) == sorted(_pool(data_dir).patient_ids)
    from her2jax.train import pca_lr

    for k in range(2):
        assert pca_lr.is_pca_lr(cv.fold_dir(workdir, k))
        assert (cv.fold_dir(workdir, k) / pca_lr.MODEL_FILE).exists()
    # predict works on pca_lr models (here their ensemble), as eval does.
    _predict_equals_the_ensembles_eval(workdir, phantom_cohort, tmp_path / "pred")


# ---------------------------------------------------------------- test-time augmentation


def test_tta_averages_the_model_over_the_eight_flips():
    config = load_config("tiny_cpu")
    config.data.recipe.shape = (16, 16, 16)
    config.model.vit.patch_size = 8
    model = factory.build_model(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    image = jax.random.normal(jax.random.key(1), (2, 16, 16, 16, 1))
    plain = step_lib.make_predict(graphdef)
    views = step_lib.tta_views(config.train.augment)
    assert len(views) == 8 and views[0] == ()
    probs, features = step_lib.make_predict(graphdef, views)(params, rest, image)
    each = [plain(params, rest, jnp.flip(image, axes) if axes else image) for axes in views]
    np.testing.assert_allclose(probs, np.mean([p for p, _ in each], axis=0), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(features, np.mean([f for _, f in each], axis=0), rtol=1e-4,
                               atol=1e-5)
    # Without TTA the predictions are the plain ones, and a model that never saw a flip
    # refuses to average over them.
    np.testing.assert_array_equal(step_lib.make_predict(graphdef, ((),))(params, rest, image)[0],
                                  each[0][0])
    config.train.augment.flips = False
    with pytest.raises(Her2jaxError, match="train.augment.flips=False"):
        step_lib.tta_views(config.train.augment)


def test_the_report_of_a_cv_workdir_shows_its_folds_and_ensemble(cv_run, tmp_path):
    from her2jax.analysis import report

    workdir, _ = cv_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run)
    page = report.write_report(run).read_text()
    per_fold = json.loads((run / "cv" / "per_fold.json").read_text())
    assert '<section id="cross-validation"><h2>Cross-validation</h2>' in page
    assert "patient-level stratified k-fold" in page and "mean ± SD" in page
    for row in per_fold["rows"]:
        done = json.loads((cv.fold_dir(run, row["fold"]) / cv.DONE_FILE).read_text())
        assert f"step {done['best_step']} of 40" in page
    assert "<figcaption>fold 0: training loss" in page
    assert "fold ensemble of 3 models (mean of the fold models&#x27; probabilities)" in page
    assert "The fold models alone: macro AUC" in page
    assert "out of fold: each fold&#x27;s model on the patients it did not see" in page
    assert "pooled out-of-fold predictions of the cross-validation" in page   # calibration
    assert "fold 2 (held out)" in page and "Training and checkpoint selection" not in page
