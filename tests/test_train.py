"""The training loop end to end on the shared phantom dataset: outputs, eval-only, restart
rules, exact resume after SIGKILL, resume on another device count, no TensorFlow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from her2jax.data import pipeline
from her2jax.errors import Her2jaxError
from her2jax.evaluate import calibration, files, metrics
from her2jax.train import inference, logger, loop
from her2jax.train import step as step_lib

from .test_factory import load_config

REPO = Path(__file__).resolve().parents[1]


def small_config(data_dir: Path, **train):
    """tiny_cpu at the shared dataset's 24^3 crops, a handful of steps."""
    config = load_config("tiny_cpu")
    config.data.data_dir = str(data_dir)
    config.data.recipe.shape = (24, 24, 24)
    config.train.update({**dict(batch_size=8, steps=12, warmup_steps=2, eval_every=6,
                                save_every=6, log_every=3, eval_batch_size=8), **train})
    return config


def test_training_writes_its_workdir(trained, prepared):
    workdir, result = trained
    assert result.steps == 12 and result.stopped == "done"
    record = json.loads((workdir / "config.json").read_text())
    meta = json.loads((prepared.dataset_dir / "her2jax.json").read_text())
    assert record["provenance"]["dataset"]["listing_hash"] == meta["listing_hash"]
    assert record["provenance"]["versions"]["jax"] == jax.__version__
    assert record["config"]["train"]["steps"] == 12
    records = logger.read_metrics(workdir)
    assert [r["step"] for r in records if r["split"] == "train"] == [3, 6, 9, 12]
    assert [r["step"] for r in records if r["split"] == "val"] == [6, 12]
    assert all(np.isfinite(r["loss"]) and r["volumes_per_s"] > 0
               for r in records if r["split"] == "train")
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir()
                  if p.name.isdigit()) == ["12", "6"]
    assert result.best_step in (6, 12)


def test_eval_reproduces_the_validation_metric_of_the_best_step(trained):
    workdir, result = trained
    val = {r["step"]: r for r in logger.read_metrics(workdir) if r["split"] == "val"}
    # The default selection keeps the lowest validation loss of the evaluations.
    assert result.select_by == "val_loss"
    assert result.best_step == min(val, key=lambda step: val[step]["loss"])
    assert result.best_metric == pytest.approx(val[result.best_step]["loss"], abs=1e-9)
    summaries = inference.evaluate(workdir, splits=["val", "test_CENTER_C"], n_boot=200)
    assert summaries["val"]["macro_auc"]["value"] == pytest.approx(
        val[result.best_step]["macro_auc"], abs=1e-9)
    test = summaries["test_CENTER_C"]
    low, value, high = (test["macro_auc"][k] for k in ("ci_low", "value", "ci_high"))
    assert low <= value <= high
    frame = files.read_predictions(workdir / "eval" / "test_CENTER_C" / "predictions.csv")
    assert list(frame.columns[:6]) == ["patient_id", "center", "label", "prob_HER2-zero",
                                       "prob_HER2-low", "prob_HER2-positive"]
    assert "manufacturer" in frame.columns and set(frame["center"]) == {"CENTER_C"}
    assert len(frame) == test["n"]
    probs = frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    rows = json.loads((workdir / "eval" / "per_center.json").read_text())["rows"]
    assert [r["group"] for r in rows] == ["CENTER_C", "pooled"]
    assert rows[1]["n"] == test["n"]
    assert rows[1]["macro_auc"]["value"] == pytest.approx(value, abs=1e-12)
    summary_txt = (workdir / "eval" / "summary.txt").read_text()
    assert f"test_CENTER_C (n={test['n']}): macro-average AUC {value:.3f} (95% CI" in summary_txt
    assert (workdir / "eval" / "subgroups.md").read_text().count("manufacturer = ") >= 1
    metrics_json = json.loads((workdir / "eval" / "val" / "metrics.json").read_text())
    assert {"n", "micro_auc", "macro_auc", "per_class_auc", "pairwise_auc",
            "confusion_matrix", "class_names"} <= set(metrics_json)



def test_eval_fits_calibration_on_val_and_applies_it_to_the_test_split(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    shutil.rmtree(workdir / "eval", ignore_errors=True)
    summaries = inference.evaluate(workdir, splits=["test_CENTER_C"], n_boot=0)
    assert set(summaries) == {"val", "test_CENTER_C"}   # val joins: calibration is fitted there
    record = json.loads((workdir / "eval" / "calibration.json").read_text())
    val_labels, val_probs, _ = files.prediction_arrays(
        files.read_predictions(workdir / "eval" / "val" / "predictions.csv"))
    assert record["fitted_on"] == "val" and record["n_val"] == len(val_labels)
    assert record["temperature"] == pytest.approx(
        calibration.fit_temperature(val_labels, val_probs), rel=1e-4)
    assert set(record["splits"]) == {"val", "test_CENTER_C"}
    raw = files.read_predictions(workdir / "eval" / "test_CENTER_C" / "predictions.csv")
    cal = files.read_predictions(
        workdir / "eval" / "test_CENTER_C" / "predictions_calibrated.csv")
    prob_columns = [c for c in raw.columns if c.startswith("prob_")]
    np.testing.assert_allclose(
        cal[prob_columns].to_numpy(),
        calibration.apply_temperature(raw[prob_columns].to_numpy(), record["temperature"]),
        atol=1e-6)
    assert (cal[prob_columns].to_numpy().argmax(1) == raw[prob_columns].to_numpy().argmax(1)).all()
    assert Image.open(workdir / record["splits"]["test_CENTER_C"]["reliability_png"]).width > 100
    summary_txt = (workdir / "eval" / "summary.txt").read_text()
    assert "fitted on the validation split" in summary_txt

def test_eval_writes_the_hand_made_baseline_of_the_same_training_patients(trained, tmp_path):
    import ml_collections

    from her2jax.cli import summary
    from her2jax.data import pipeline

    from .test_baseline import by_hand_macro_auc

    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    shutil.rmtree(workdir / "eval", ignore_errors=True)
    model = inference.evaluate(workdir, splits=["test_CENTER_C"], n_boot=50)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text())["config"])
    dataset = pipeline.open_dataset(config.data.data_dir, config.data)
    splits = pipeline.select_splits(dataset, config.data)
    record = json.loads((workdir / "eval" / "baseline.json").read_text())
    assert record["fitted_on"] == "train" and record["n_train"] == len(splits["train"])
    assert set(record["splits"]) == {"val", "test_CENTER_C"}
    lines = summary.held_out_lines(workdir)
    for name in ("val", "test_CENTER_C"):
        written = files.read_metrics(workdir / "eval" / name / "baseline_metrics.json")
        # metrics.json's format (less what it says about the model: checkpoint, step, TTA).
        assert set(written) == set(files.read_metrics(workdir / "eval" / name / "metrics.json")) - {
            "step", "checkpoint", "tta_views"}
        assert written["n"] == model[name]["n"]
        assert written["bootstrap"]["n_boot"] == 50
        assert written["macro_auc"]["value"] == pytest.approx(by_hand_macro_auc(
            dataset.path, splits["train"], splits[name],
            balanced=config.train.class_weighting == "balanced"), abs=1e-9)
        assert record["splits"][name]["macro_auc"] == written["macro_auc"]
    test, base = model["test_CENTER_C"]["macro_auc"], record["splits"]["test_CENTER_C"]["macro_auc"]
    assert lines[0].startswith("training loss ") and lines[0].endswith("chance ln 3 = 1.10")
    assert lines[1:] == [f"held-out CENTER_C: model macro AUC {test['value']:.2f} "
                         f"({test['ci_low']:.2f}-{test['ci_high']:.2f}) | hand-made baseline "
                         f"{base['value']:.2f} ({base['ci_low']:.2f}-{base['ci_high']:.2f})"]


def test_eval_refuses_a_split_holding_patients_the_model_trained_on(trained, tmp_path):
    """Issue 16: with another data.seed in config.json the validation split draws other
    patients, some of whom trained the model; eval scored them without a word."""
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir, ignore=shutil.ignore_patterns("eval", "predict"))
    trained_on = json.loads((workdir / "trained_on.json").read_text())
    assert trained_on["train"] and trained_on["val"]
    assert not set(trained_on["train"]) & set(trained_on["val"])
    record = json.loads((workdir / "config.json").read_text())
    seed = record["config"]["data"]["seed"]
    record["config"]["data"]["seed"] = 12345
    (workdir / "config.json").write_text(json.dumps(record))
    with pytest.raises(Her2jaxError, match=r"split val holds \d+ patient\(s\) the model was "
                                           r"trained on .*in-sample") as error:
        inference.evaluate(workdir, splits=["val"], n_boot=0)
    assert "trained_on.json" in str(error.value) and not (workdir / "eval").exists()
    # The held-out centre never met the model: it is evaluated as before.
    record["config"]["data"]["seed"] = seed
    (workdir / "config.json").write_text(json.dumps(record))
    assert inference.evaluate(workdir, splits=["test_CENTER_C"], n_boot=0)["test_CENTER_C"]["n"] > 0


def test_features_mode_writes_embeddings(trained):
    workdir, _ = trained
    paths = inference.extract_features(workdir, splits=["CENTER_A"])
    with np.load(paths["CENTER_A"]) as npz:
        assert npz["features"].shape == (len(npz["labels"]), 48)
        assert set(npz["centers"].tolist()) == {"CENTER_A"}
        np.testing.assert_allclose(npz["probs"].sum(1), 1.0, atol=1e-5)


def test_a_workdir_refuses_another_config_unless_forced(trained, data_dir, tmp_path):
    workdir, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    with pytest.raises(Her2jaxError, match=r"train\.learning_rate 0\.001 -> 0\.002"):
        loop.train(small_config(data_dir, learning_rate=2e-3), copy, progress=False)
    result = loop.train(small_config(data_dir, learning_rate=2e-3), copy, force=True,
                        progress=False)
    assert result.steps == 12   # already complete: nothing more to do
    assert "forced_changes" in json.loads((copy / "config.json").read_text())["provenance"]


def test_a_workdir_made_before_a_config_key_existed_resumes(trained, data_dir, tmp_path):
    """A key added to her2jax later (train.ema_decay, model.resnet.dilated, ...) is absent from
    an older run's config.json: at its default it is no change; set otherwise it is one."""
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    record = json.loads((copy / "config.json").read_text())
    del record["config"]["train"]["ema_decay"], record["config"]["model"]["resnet"]["dilated"]
    del record["config"]["model"]["vit"]["num_heads"]
    (copy / "config.json").write_text(json.dumps(record))
    assert loop.train(small_config(data_dir), copy, progress=False).steps == 12
    assert "forced_changes" not in json.loads((copy / "config.json").read_text())["provenance"]
    with pytest.raises(Her2jaxError, match=r"train\.ema_decay None -> 0\.9"):
        loop.train(small_config(data_dir, ema_decay=0.9), copy, progress=False)


def test_bad_training_settings_fail_before_the_workdir_is_touched(data_dir, tmp_path):
    with pytest.raises(Her2jaxError, match="train.batch_size"):
        loop.train(small_config(data_dir, batch_size=6), tmp_path / "a", progress=False)
    with pytest.raises(Her2jaxError, match="train.warmup_steps"):
        loop.train(small_config(data_dir, warmup_steps=50), tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "config.json").exists()


@pytest.mark.parametrize("key, value, named", [
    ("train.eval_every", 0, "an integer >= 1"),
    ("train.log_every", 0, "an integer >= 1"),
    ("train.eval_batch_size", 0, "an integer >= 1"),
    ("train.save_every", 0, "an integer >= 1"),
    ("train.label_smoothing", 1.5, "a number in [0, 1)"),
    ("train.early_stop_patience", -1, "an integer >= 0"),
    ("train.profile_steps", (5, 2), "(first, last) with 0 <= first <= last < 12"),
    ("train.profile_steps", (0, 12), "last < 12"),
    ("train.class_weighting", "inverse", "'balanced' or 'none'"),
    ("train.augment.noise", -0.1, "a number >= 0"),
    ("data.seed", -1, "an integer in [0, 2^32)"),
    ("data.val_fraction", 1.0, "a number in [0, 1)"),
    ("data.recipe.name", "no_such_recipe", "unknown recipe 'no_such_recipe'; expected one of"),
    ("data.test_centers", "CENTER_C", "a tuple of centre names, e.g. ('CENTER_C',)"),
])
def test_every_setting_out_of_range_is_refused_before_the_workdir(key, value, named, data_dir,
                                                                   tmp_path):
    """Issue 16: these crashed (ZeroDivisionError, ValueError, RuntimeError), ran a nonsense
    run, or wrote config.json before failing (so the corrected rerun was refused)."""
    config = small_config(data_dir)
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    with node.ignore_type():
        node[leaf] = value
    with pytest.raises(Her2jaxError) as error:
        loop.train(config, tmp_path / "run", progress=False)
    assert f"key '{key}'" in str(error.value) and named in str(error.value), str(error.value)
    assert not (tmp_path / "run").exists()


def test_a_corrected_rerun_after_a_refused_setting_trains(data_dir, tmp_path):
    with pytest.raises(Her2jaxError, match="train.eval_every"):
        loop.train(small_config(data_dir, eval_every=0), tmp_path / "run", progress=False)
    result = loop.train(small_config(data_dir, steps=2, eval_every=2, save_every=2,
                                     warmup_steps=0), tmp_path / "run", progress=False)
    assert result.steps == 2
    # The same data_dir spelled with a trailing slash (or "a/./b") is the same run.
    for spelling in (f"{data_dir}/", f"{data_dir.parent}/./{data_dir.name}"):
        config = small_config(data_dir, steps=2, eval_every=2, save_every=2, warmup_steps=0)
        config.data.data_dir = spelling
        assert loop.train(config, tmp_path / "run", progress=False).steps == 2
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["config"]["data"]["data_dir"] == str(data_dir)
    assert "forced_changes" not in record["provenance"]


# ---------------------------------------------------------------- real processes

RESUME_ARGS = ["--config=configs/tiny_cpu.py", "--config.data.recipe.shape=(24,24,24)",
               "--config.train.steps=160", "--config.train.save_every=40",
               "--config.train.eval_every=80", "--config.train.batch_size=8",
               "--config.train.warmup_steps=10", "--config.train.eval_batch_size=8",
               "--noprogress"]


# Resets SIGHUP and SIGINT to their defaults, then becomes the engine (exec keeps them): the
# signals the tests send start at their defaults whatever this test run inherited (CI under
# nohup ignores SIGHUP; a shell's `&` ignores SIGINT). A preexec_fn would do it after a fork
# of this multithreaded (JAX) process, which Python warns may deadlock.
_WITH_DEFAULT_SIGNALS = ("import os, signal, sys; "
                         "[signal.signal(s, signal.SIG_DFL) for s in (signal.SIGHUP, "
                         "signal.SIGINT)]; os.execv(sys.executable, [sys.executable, "
                         "*sys.argv[1:]])")


def _her2jax(workdir: Path, data_dir: Path, *extra: str, env=None, wait=True):
    command = [sys.executable, "-m", "her2jax.main", f"--workdir={workdir}", *RESUME_ARGS,
               f"--config.data.data_dir={data_dir}", *extra]
    if not wait:
        return subprocess.Popen([sys.executable, "-c", _WITH_DEFAULT_SIGNALS, *command[1:]],
                                cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _final_params(workdir: Path):
    return jax.device_get(inference.load_trained(workdir, which="latest").state.params)


def _kill_after_first_checkpoint(workdir: Path, data_dir: Path,
                                 sig: int = signal.SIGKILL) -> int:
    """Starts a run and SIGKILLs it as soon as its first checkpoint is complete."""
    process = _her2jax(workdir, data_dir, wait=False)
    latest = workdir / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if latest.exists() and any(p.name.isdigit() for p in latest.iterdir()):
            break
        time.sleep(0.01)
    process.send_signal(sig)
    started = time.monotonic()
    process.wait(timeout=120)
    if sig != signal.SIGKILL:                    # a checkpoint, then a clean exit within 30 s
        assert process.returncode == 0, process.stderr.read()[-2000:]
        assert time.monotonic() - started < 30
        stdout = process.stdout.read()
        word = "interrupted" if sig == signal.SIGINT else "preempted"
        assert f"{word} at step" in stdout and "run the same command to resume" in stdout
        assert "Traceback" not in process.stderr.read()
    else:
        assert process.returncode == -signal.SIGKILL, "the run ended before it was killed"
    process.stdout.close()
    process.stderr.close()
    done = max(int(p.name) for p in latest.iterdir() if p.name.isdigit())
    assert done < 160
    return done


def test_resume_after_sigkill_is_bitwise_exact(straight, data_dir, tmp_path):
    workdir = tmp_path / "run"
    killed_at = _kill_after_first_checkpoint(workdir, data_dir)
    _her2jax(workdir, data_dir)
    resumed_steps = [r["step"] for r in logger.read_metrics(workdir) if r["split"] == "train"]
    assert max(resumed_steps) == 160 and killed_at < 160
    # Steps logged after the checkpoint by the killed run were dropped: each step once.
    assert resumed_steps == [r["step"] for r in logger.read_metrics(straight)
                             if r["split"] == "train"]
    for a, b in zip(jax.tree.leaves(_final_params(straight)),
                    jax.tree.leaves(_final_params(workdir)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_checkpoint_from_8_devices_resumes_on_2(straight, data_dir, tmp_path):
    workdir = tmp_path / "run"
    _kill_after_first_checkpoint(workdir, data_dir)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    _her2jax(workdir, data_dir, env=env)
    record = json.loads((workdir / "config.json").read_text())
    assert record["provenance"]["devices"].startswith("8 x")   # the run that claimed it
    for a, b in zip(jax.tree.leaves(_final_params(straight)),
                    jax.tree.leaves(_final_params(workdir)), strict=True):
        # Same examples, different reduction order: AdamW amplifies float noise a little.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-3, rtol=2e-2)


def test_a_relative_workdir_works(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = loop.train(small_config(data_dir, steps=4, eval_every=4, save_every=4),
                        "runs/relative", progress=False)
    assert result.steps == 4
    assert (tmp_path / "runs" / "relative" / "checkpoints" / "latest" / "4").is_dir()


def test_eval_on_a_directory_that_is_not_a_workdir(tmp_path):
    with pytest.raises(Her2jaxError, match="not a her2jax workdir"):
        inference.evaluate(tmp_path)
    result = subprocess.run([sys.executable, "-m", "her2jax.main", f"--workdir={tmp_path}",
                             "--mode=eval"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "not a her2jax workdir" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "Ctrl-C", "SIGHUP"])
def test_sigterm_or_ctrl_c_saves_and_stops_then_the_run_continues_exactly(sig, straight,
                                                                         data_dir, tmp_path):
    workdir = tmp_path / "run"
    stopped_at = _kill_after_first_checkpoint(workdir, data_dir, sig)
    assert stopped_at < 160   # the step it was at when the signal came, saved off-interval
    _her2jax(workdir, data_dir)
    assert max(r["step"] for r in logger.read_metrics(workdir) if r["split"] == "train") == 160
    for a, b in zip(jax.tree.leaves(_final_params(straight)),
                    jax.tree.leaves(_final_params(workdir)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_early_stopping_and_gradient_accumulation(data_dir, tmp_path):
    # lr 0: the validation AUC never improves after the first evaluation.
    config = small_config(data_dir, learning_rate=0.0, eval_every=2, save_every=2,
                          keep_latest=10, early_stop_patience=2, warmup_steps=0)
    result = loop.train(config, tmp_path / "a", progress=False)
    assert result.stopped == "early_stop" and result.steps == 6 and result.best_step == 2
    assert (tmp_path / "a" / "checkpoints" / "latest" / "6").is_dir()
    shutil.copytree(tmp_path / "a", tmp_path / "resumed")
    # Run again: it stopped early, so it stays stopped (it used to train on to step 12).
    again = loop.train(config, tmp_path / "a", progress=False)
    assert again.stopped == "early_stop" and again.steps == 6 and again.best_step == 2
    assert max(r["step"] for r in logger.read_metrics(tmp_path / "a")) == 6
    assert not (tmp_path / "a" / "checkpoints" / "latest" / "8").exists()
    # Resumed from step 4 (one validation without a better one behind it): it stops where the
    # uninterrupted run stopped, at 6 (the count used to restart at 0: it stopped at 8).
    for path in (tmp_path / "resumed" / "checkpoints" / "latest").iterdir():
        if path.name.isdigit() and int(path.name) > 4:
            shutil.rmtree(path)
    resumed = loop.train(config, tmp_path / "resumed", progress=False)
    assert resumed.stopped == "early_stop" and resumed.steps == 6 and resumed.best_step == 2
    assert loop.evaluations_since_best(4, 2, 2, 12) == 1       # the validation at 4
    assert loop.evaluations_since_best(12, 6, 4, 14) == 2      # at 8 and 12
    assert loop.evaluations_since_best(14, 12, 4, 14) == 1     # at the last step, 14
    assert loop.evaluations_since_best(5, None, 2, 12) == 0    # no validation kept yet
    accumulated = loop.train(small_config(data_dir, steps=3, grad_accum=2, eval_every=6,
                                          save_every=6, warmup_steps=1), tmp_path / "b",
                             progress=False)
    assert accumulated.steps == 6   # 3 optimizer updates of 2 batches each


def test_checkpoint_selection_follows_select_by(data_dir, tmp_path):
    last = loop.train(small_config(data_dir, steps=4, eval_every=2, save_every=4,
                                   select_by="last"), tmp_path / "last", progress=False)
    assert last.best_step == 4 and last.best_metric == 4 and last.select_by == "last"
    auc = loop.train(small_config(data_dir, steps=4, eval_every=2, save_every=4,
                                  select_by="val_macro_auc"), tmp_path / "auc", progress=False)
    val = {r["step"]: r["macro_auc"] for r in logger.read_metrics(tmp_path / "auc")
           if r["split"] == "val"}
    assert auc.best_metric == pytest.approx(max(val.values()), abs=1e-9)
    assert val[auc.best_step] == pytest.approx(auc.best_metric, abs=1e-9)
    with pytest.raises(Her2jaxError, match="train.select_by"):
        loop.train(small_config(data_dir, select_by="val_auc"), tmp_path / "bad", progress=False)
    config = small_config(data_dir)
    config.train.augment.channel_scale = 1.5
    with pytest.raises(Her2jaxError, match="train.augment.channel_scale"):
        loop.train(config, tmp_path / "bad", progress=False)
    config = small_config(data_dir)
    config.data.recipe.shape = (24, 24, 16)
    config.train.augment.permute_axes = True
    with pytest.raises(Her2jaxError, match="cubic crop"):
        loop.train(config, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def _val_loss_of_eval(workdir: Path) -> float:
    """The class-balanced loss of eval's val predictions (what the loop logs as val loss)."""
    frame = files.read_predictions(workdir / "eval" / "val" / "predictions.csv")
    columns = [c for c in frame.columns if c.startswith("prob_")]
    labels = frame["label"].map({c.removeprefix("prob_"): k for k, c in enumerate(columns)})
    return metrics.balanced_log_loss(labels.to_numpy(), frame[columns].to_numpy())


def test_with_an_ema_every_evaluation_uses_the_averaged_parameters(data_dir, tmp_path):
    runs = {}
    for name, ema in (("ema", 0.9), ("plain", 0.0)):
        result = loop.train(small_config(data_dir, steps=8, eval_every=4, save_every=4,
                                         select_by="last", learning_rate=1e-2,
                                         ema_decay=ema), tmp_path / name, progress=False)
        assert result.best_step == 8
        inference.evaluate(tmp_path / name, splits=["val"], n_boot=0)
        logged = [r["loss"] for r in logger.read_metrics(tmp_path / name)
                  if r["split"] == "val" and r["step"] == 8]
        # eval restores what the loop measured at step 8 (with an EMA: the average, both).
        assert _val_loss_of_eval(tmp_path / name) == pytest.approx(logged[0], abs=1e-5)
        runs[name] = logged[0]
    assert inference.load_trained(tmp_path / "ema").state.ema is not None   # kept in checkpoints
    assert inference.load_trained(tmp_path / "plain").state.ema is None
    # Same 8 steps: the average is other parameters than the last ones.
    assert abs(runs["ema"] - runs["plain"]) > 1e-4
    for bad in (1.0, -0.1):
        with pytest.raises(Her2jaxError, match="train.ema_decay"):
            loop.train(small_config(data_dir, ema_decay=bad), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_balanced_log_loss_weighs_every_class_alike():
    from her2jax.evaluate import metrics

    labels = np.array([0, 0, 0, 1])
    probs = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.1, 0.9]])
    expected = (np.log(2) + -np.log(0.9)) / 2   # class 0's mean, class 1's mean, averaged
    assert metrics.balanced_log_loss(labels, probs) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(metrics.balanced_log_loss(np.zeros(0, int), np.zeros((0, 2))))


def test_profiler_traces_the_requested_steps(data_dir, tmp_path):
    loop.train(small_config(data_dir, steps=4, eval_every=4, save_every=4,
                            profile_steps=(1, 2)), tmp_path / "run", progress=False)
    assert list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))


@pytest.mark.parametrize("args, named", [
    (["--config.train.nonexistent=1"], "nonexistent"),
    (["--config.train.steps=many"], "steps"),
    (["--mode=dance"], "mode"),
])
def test_bad_engine_flags_are_one_line_errors(args, named, tmp_path):
    result = subprocess.run([sys.executable, "-m", "her2jax.main", f"--workdir={tmp_path / 'w'}",
                             "--config=configs/tiny_cpu.py", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and named in lines[0], result.stderr
    assert not (tmp_path / "w").exists()


def test_linear_probe_trains_only_the_head(data_dir, tmp_path):
    config = small_config(data_dir, steps=4, eval_every=4, save_every=4)
    probe = load_config("linear_probe")
    for key in ("freeze", "optimizer", "learning_rate", "momentum", "weight_decay",
                "layer_decay", "warmup_steps", "grad_clip"):
        config.train[key] = probe.train[key]
    loop.train(config, tmp_path / "run", progress=False)
    start = inference.load_trained(tmp_path / "run", which="latest")
    fresh = jax.device_get(state_params_at_init(config))
    trained_params = jax.device_get(start.state.params)
    assert np.array_equal(np.asarray(fresh["encoder"]["norm"]["scale"][...]),
                          np.asarray(trained_params["encoder"]["norm"]["scale"][...]))
    assert not np.array_equal(np.asarray(fresh["head"]["fc"]["kernel"][...]),
                              np.asarray(trained_params["head"]["fc"]["kernel"][...]))


def state_params_at_init(config):
    from flax import nnx

    from her2jax.models import factory

    return nnx.state(factory.build_model(config), nnx.Param)


def test_a_second_training_into_a_held_workdir_is_refused_until_the_holder_dies(data_dir,
                                                                                tmp_path):
    """Issue 16: two trainings into one workdir both ran and interleaved metrics.jsonl. The
    lock is an flock held by a real process; SIGKILL releases it (no stale lock)."""
    workdir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from her2jax.train import workdir; "
         f"ctx = workdir.locked({str(workdir)!r}); ctx.__enter__(); print('held', flush=True); "
         "time.sleep(600)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Her2jaxError, match=rf"in use by a running her2jax training "
                                               rf"\(pid {holder.pid} on "):
            loop.train(small_config(data_dir, steps=2, eval_every=2, save_every=2,
                                    warmup_steps=0), workdir, progress=False)
        assert not (workdir / "config.json").exists()
        result = subprocess.run([sys.executable, "-m", "her2jax.main", f"--workdir={workdir}",
                                 *RESUME_ARGS, f"--config.data.data_dir={data_dir}"],
                                cwd=REPO, capture_output=True, text=True, timeout=300)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and "in use" in lines[0], lines
    finally:
        holder.kill()
        holder.wait(timeout=60)
    # The holder died without releasing anything by hand: the workdir is free.
    result = loop.train(small_config(data_dir, steps=2, eval_every=2, save_every=2,
                                     warmup_steps=0), workdir, progress=False)
    assert result.steps == 2


def test_build_training_is_the_setup_the_loop_trains_with(data_dir):
    """One training setup (issue 17): class weights n / (K n_c) of the training labels, the
    state replicated on the mesh, an EMA only when asked for, and a step that trains."""
    np.testing.assert_allclose(loop.class_weights(np.array([0, 0, 0, 1]), 3),
                               [4 / 9, 4 / 3, 0.0], rtol=1e-6)
    config = small_config(data_dir, ema_decay=0.5)
    mesh = step_lib.make_mesh()
    labels = np.array([0, 1, 1, 2, 2, 2, 0, 1])
    training = loop.build_training(config, mesh, labels)
    assert training.state.ema is not None and int(training.state.step) == 0
    leaf = jax.tree.leaves(training.state.params)[0]
    assert leaf.sharding.is_fully_replicated
    assert len(leaf.sharding.device_set) == mesh.devices.size
    shape = (*config.data.recipe.shape, len(config.data.recipe.channels))
    batch = {"image": np.zeros((8, *shape), np.float16), "label": labels.astype(np.int32),
             "index": np.arange(8, dtype=np.int32), "valid": np.ones(8, bool)}
    state, metrics = training.train_step(training.state, pipeline.to_global(batch, mesh))
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    assert loop.build_training(small_config(data_dir), mesh, labels).state.ema is None
