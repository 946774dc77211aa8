"""her2jax: the engine.

  her2jax --config=configs/X.py --workdir=DIR --mode=train
  her2jax --workdir=DIR --mode=eval [--splits=val,test_CENTER_C] [--checkpoint=best|latest]
  her2jax --workdir=DIR --mode=features [--splits=...]
  her2jax --workdir=DIR --mode=predict --cohort=NIFTI_COHORT [--out=DIR] [--skip_invalid]
  her2jax --workdir=DIR --mode=analyze     (t-SNE / UMAP, feature- and image-space SHAP ->
                                            DIR/analysis, then DIR/report.html)
  her2jax --config=configs/X.py --workdir=DIR --mode=cv [--folds=5] [--cv=kfold|centers]
      [--fold=K]                            (cross-validation of the training centres: one
                                            workdir per fold, out-of-fold predictions in
                                            DIR/cv/, the fold ensemble on the test centres)

  her2jax --config=configs/pretrain_*.py --workdir=DIR --mode=pretrain
                                           (MoCo v3 self-supervised pretraining of the
                                            encoder on any prepared dataset -> DIR/encoder,
                                            for --config.model.pretrained=)

eval, predict and features on a cross-validation workdir use the fold ensemble (the mean of
the fold models' probabilities); ``--tta`` averages every prediction over the flips the
training augmentation drew.

With ``train.protocol='pca_lr'`` (configs/fmbcmri_pca_lr.py) train fits the study's protocol
(frozen encoder features -> PCA -> logistic regression) instead of gradient training.

train runs (or resumes) the config's training in DIR; the other modes use DIR's own
config.json and checkpoints, so a workdir is all they need (``--data_dir`` says where the
prepared dataset is on this machine, when it moved).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from her2jax import cli, distributed
from her2jax.errors import Her2jaxError

MODES = ("train", "eval", "features", "predict", "analyze", "cv", "pretrain")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (train mode).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory.")
_MODE = flags.DEFINE_enum("mode", "train", list(MODES), "What to do.")
_SPLITS = flags.DEFINE_list("splits", [], "Splits to evaluate (default: val and every test "
                            "centre); a centre name evaluates that whole centre.")
_CHECKPOINT = flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                                "Which checkpoint eval / features restore.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Prepared dataset location (overrides the "
                                "config's data.data_dir).")
_FORCE = flags.DEFINE_bool("force", False, "Continue a workdir whose config or dataset changed.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_COHORT = flags.DEFINE_string("cohort", None, "NIfTI cohort to predict (MAMA-MIA layout or "
                              "manifest CSV; labels optional).")
_OUT = flags.DEFINE_string("out", None, "predict: output folder (default "
                           "WORKDIR/predict/<cohort name>).")
_SKIP_INVALID = flags.DEFINE_bool("skip_invalid", False, "predict: leave invalid cases out "
                                  "(listed in rejected.csv) instead of stopping.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 2000, "Bootstrap resamples for the CIs.",
                                  lower_bound=0)
_SHAP_PATIENTS = flags.DEFINE_list("shap_patients", [], "analyze: image-space SHAP for these "
                                   "patients (default: the most confident per class).")
_SHAP_PER_CLASS = flags.DEFINE_integer("shap_per_class", 1, "analyze: image-space SHAP for this "
                                       "many top-confident test cases per class (0: none).",
                                       lower_bound=0)
_FOLDS = flags.DEFINE_integer("folds", None, "cv: how many folds (default 5 for kfold, one "
                              "per training centre for centers; a rerun keeps the first run's).",
                              lower_bound=2)
_CV = flags.DEFINE_enum("cv", None, ["kfold", "centers"], "cv: patient-level stratified k-fold "
                        "(default) or whole training centres per fold.")
_FOLD = flags.DEFINE_integer("fold", None, "cv: train only this fold (e.g. one SLURM array "
                             "task each; a later --mode=cv without it aggregates).",
                             lower_bound=0)
_TTA = flags.DEFINE_bool("tta", False, "eval / predict / features / cv: average over the flips "
                         "of the volume the training augmentation drew (8 views).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port "
                                   "of process 0 (with --num_processes and --process_id; SLURM, "
                                   "Open MPI and TPU pods are detected without them).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many.",
                                      lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's "
                                   "index, from 0.", lower_bound=0)
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout_s", distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
                                  "Multi-process runs: seconds without a peer's heartbeat before "
                                  "the survivors abort.", lower_bound=1)


def _main(argv: list[str]) -> None:
    del argv
    if not _WORKDIR.value:
        raise Her2jaxError("--workdir is required")
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           heartbeat_timeout_s=_HEARTBEAT.value)
    # The engine loads only now (~2.5 s): a bad flag or launch is refused without it.
    from her2jax.train import cv, inference, loop, pca_lr, predict

    on_cv = _MODE.value != "cv" and cv.is_cv(_WORKDIR.value)
    if _MODE.value == "cv":
        _cross_validate(cv)
    elif _MODE.value == "pretrain":
        _pretrain()
    elif on_cv and _MODE.value in ("train", "analyze"):
        raise Her2jaxError(f"is a cross-validation workdir; --mode={_MODE.value} works on one "
                           "of its fold_<k> workdirs, --mode=cv on it", file=_WORKDIR.value)
    elif _MODE.value == "train":
        config = _config_from_flags("to train")
        if config.train.protocol == "pca_lr":
            for name, summary in pca_lr.fit(config, _WORKDIR.value, force=_FORCE.value,
                                            n_boot=_BOOTSTRAP.value,
                                            progress=_PROGRESS.value).items():
                _print_summary(name, summary)
            print(f"predictions and metrics in {_WORKDIR.value}/eval/")
            return
        result = loop.train(config, _WORKDIR.value, force=_FORCE.value,
                            progress=_PROGRESS.value)
        best = "n/a" if result.best_metric is None else f"{result.best_metric:.3f}"
        chosen = {"val_loss": f"lowest validation loss {best}",
                  "val_macro_auc": f"best validation macro AUC {best}",
                  "last": "the last step"}[result.select_by]
        print(f"{result.stopped.replace('_', ' ')} at step {result.steps}; checkpoints/best: "
              f"step {result.best_step}, {chosen}; checkpoints in {_WORKDIR.value}/checkpoints")
        if result.stopped in ("preempted", "interrupted"):
            print(f"step {result.steps} is saved; run the same command to resume there")
    elif _MODE.value == "eval":
        if on_cv:
            results = cv.evaluate(_WORKDIR.value, splits=_SPLITS.value, which=_CHECKPOINT.value,
                                  data_dir=_DATA_DIR.value, n_boot=_BOOTSTRAP.value,
                                  progress=_PROGRESS.value, tta=_TTA.value)
        elif pca_lr.is_pca_lr(_WORKDIR.value):
            results = pca_lr.evaluate(_WORKDIR.value, splits=_SPLITS.value,
                                      data_dir=_DATA_DIR.value, n_boot=_BOOTSTRAP.value,
                                      progress=_PROGRESS.value, tta=_TTA.value)
        else:
            results = inference.evaluate(_WORKDIR.value, splits=_SPLITS.value,
                                         which=_CHECKPOINT.value, data_dir=_DATA_DIR.value,
                                         n_boot=_BOOTSTRAP.value, progress=_PROGRESS.value,
                                         tta=_TTA.value)
        for name, summary in results.items():
            _print_summary(name, summary)
        print(f"predictions and metrics in {_WORKDIR.value}/eval/")
    elif _MODE.value == "analyze":
        from her2jax.analysis import stage  # umap / shap load only here

        if distributed.process_count() > 1:
            raise Her2jaxError("--mode=analyze runs as a single process; start it without "
                               "the multi-process launcher")

        summary = stage.analyze(_WORKDIR.value, data_dir=_DATA_DIR.value,
                                which=_CHECKPOINT.value, progress=_PROGRESS.value,
                                image_patients=_SHAP_PATIENTS.value,
                                image_per_class=_SHAP_PER_CLASS.value)
        sil = summary["embeddings"]["silhouette"]
        print(f"silhouette by class {sil['by_class']}, by centre {sil['by_center']}"
              + ("; WARNING: features cluster by centre (domain shift)"
                 if summary["embeddings"]["domain_shift_warning"] else ""))
        print(f"analysis in {_WORKDIR.value}/analysis/ (summary.json, embeddings, SHAP plots, "
              "shap/ NIfTI heatmaps)")
        if summary.get("report"):
            print(f"report: {_WORKDIR.value}/{summary['report']}")
    elif _MODE.value == "predict":
        if not _COHORT.value:
            raise Her2jaxError("--cohort is required to predict")
        if _OUT.value is not None:
            predict.check_out_folder(_OUT.value)   # before any model loads
        ensemble = (cv.load_ensemble(_WORKDIR.value, which=_CHECKPOINT.value, tta=_TTA.value)[0]
                    if on_cv else None)
        path = predict.predict_cohort(_WORKDIR.value, _COHORT.value, out=_OUT.value,
                                      which=_CHECKPOINT.value, skip_invalid=_SKIP_INVALID.value,
                                      n_boot=_BOOTSTRAP.value, tta=_TTA.value,
                                      predictor=ensemble)
        print(f"wrote {path}")
    elif _MODE.value == "features":
        extract = cv.extract_features if on_cv else inference.extract_features
        for name, path in extract(_WORKDIR.value, splits=_SPLITS.value, which=_CHECKPOINT.value,
                                  data_dir=_DATA_DIR.value, tta=_TTA.value).items():
            print(f"{name}: {path}")


def _config_from_flags(purpose: str):
    """--config, with --data_dir as its data.data_dir when given."""
    if _CONFIG.value is None:
        raise Her2jaxError(f"--config is required {purpose}")
    config = _CONFIG.value
    if _DATA_DIR.value:
        with config.unlocked():
            config.data.data_dir = _DATA_DIR.value
    return config


def _pretrain() -> None:
    """--mode=pretrain: MoCo v3 on the config's dataset, then DIR/encoder."""
    from her2jax.train import pretrain

    result = pretrain.run(_config_from_flags("to pretrain"), _WORKDIR.value,
                          force=_FORCE.value, progress=_PROGRESS.value)
    if result["stopped"] not in ("done", "early_stop"):
        print(f"{result['stopped']} at step {result['steps']}; it is saved; run the same "
              "command to resume there")
        return
    knn = result["knn_macro_auc"]
    stopped = " (stopped early: the kNN monitor stopped rising)" if (
        result["stopped"] == "early_stop") else ""
    exported = ("" if result["exported_step"] == result["steps"] else
                f"; the encoder is step {result['exported_step']}'s, the best kNN macro AUC")
    print(f"pretrained {result['steps']} steps{stopped}; contrastive loss "
          f"{result['loss']:.3f}" + ("" if knn is None else f"; kNN macro AUC {knn:.3f}")
          + f"{exported}; encoder in {result['encoder']} (use --config.model.pretrained="
            f"{result['encoder']})")


def _cross_validate(cv) -> None:
    """--mode=cv: the folds not yet done (or --fold), then the out-of-fold files and the
    ensemble's evaluation once every fold is done."""
    from her2jax.train import inference

    config = _config_from_flags("for --mode=cv (the same config on a rerun)")
    result = cv.run(config, _WORKDIR.value, folds=_FOLDS.value, scheme=_CV.value,
                    only_fold=_FOLD.value, force=_FORCE.value, n_boot=_BOOTSTRAP.value,
                    progress=_PROGRESS.value, tta=_TTA.value)
    if result["stopped"]:
        at = result["at"]
        print(f"{result['stopped']} in fold {at['fold']} at step {at['step']}; it is saved; run "
              "the same command to resume there")
        return
    remaining = sorted(set(range(result["folds"])) - set(result["done"]))
    if remaining:
        print(f"folds done: {', '.join(map(str, result['done'])) or 'none'} of "
              f"{result['folds']}; still to train: {', '.join(map(str, remaining))} (run "
              "--mode=cv without --fold to train them and aggregate)")
        return
    oof = result["oof"]
    sd = oof["over_folds"]["macro_auc"]
    spread = ("" if sd["mean"] is None else f"; over folds {sd['mean']:.3f} ± "
              + ("n/a" if sd["sd"] is None else f"{sd['sd']:.3f}"))
    print(f"out of fold (n={oof['n']}, {result['folds']} folds): "
          f"{inference.summary_line(oof)}{spread}")
    for name, summary in result["ensemble"].items():
        print(f"ensemble {name} (n={summary['n']}): {inference.summary_line(summary)}")
    print(f"per fold: {_WORKDIR.value}/cv/per_fold.md; out-of-fold predictions and metrics in "
          f"{_WORKDIR.value}/cv/" + (f"; ensemble in {_WORKDIR.value}/eval/"
                                      if result["ensemble"] else ""))


def _print_summary(name: str, summary: dict) -> None:
    from her2jax.train import inference

    print(f"{name} (n={summary['n']}): {inference.summary_line(summary)}")


def main() -> None:
    from her2jax.train import orbax_quirks

    orbax_quirks.install()   # before any checkpoint is read or written
    cli.run(_main)


if __name__ == "__main__":
    main()
