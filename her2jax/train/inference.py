"""Inference on a trained workdir: restoring its model, predicting splits, and the eval and
features modes' files.

Used by the training loop (validation), eval, features, predict, the pca_lr protocol and the
analysis stage. Nothing here trains: ``loop.py`` is the loop.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from her2jax import fileio
from her2jax import labels as labels_lib
from her2jax.data import pipeline
from her2jax.errors import Her2jaxError
from her2jax.evaluate import calibration, decision, files, metrics, tables
from her2jax.models import factory
from her2jax.train import baseline, checkpoint, optim
from her2jax.train import state as state_lib
from her2jax.train import step as step_lib
from her2jax.train import workdir as workdir_lib


def gather(x: jax.Array) -> np.ndarray:
    """A global array (sharded over processes) as one host numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def predict_split(predict, state, dataset: pipeline.Dataset, split: pipeline.Split, mesh,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, K], features [N, F]) for every example of ``split``, in split order, from
    ``predict`` (``step.make_predict``) with ``state``'s parameters."""
    def fn(image):
        p, f = predict(state.params, state.rest, image)
        return gather(p), gather(f)

    return predict_with(fn, dataset, split, mesh, batch_size)


def predict_with(fn, dataset: pipeline.Dataset, split: pipeline.Split, mesh,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, K], features [N, F]) for every example of ``split``, in split order, from
    ``fn(global image batch) -> (probs, features)`` as host arrays (a :class:`Predictor`'s)."""
    probs, features = [], []
    for host in pipeline.eval_batches(dataset, split, global_batch_size=batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count()):
        batch = pipeline.to_global(host, mesh)
        p, f = fn(batch["image"])
        valid = gather(batch["valid"])
        probs.append(np.asarray(p)[valid])
        features.append(np.asarray(f)[valid])
    if not probs:
        return np.zeros((0, len(split.class_names)), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(probs), np.concatenate(features)


@dataclasses.dataclass
class Predictor:
    """A trained model as one function of a global image batch, whatever made it: a workdir's
    network (:func:`load_predictor`), a pca_lr workdir's encoder and classifier, or a
    cross-validation's fold ensemble (``cv.load_ensemble``).

    Attributes:
      config: the run's config (the recipe, columns and scheme predict reads).
      mesh: the mesh ``fn``'s inputs live on.
      fn: ``fn(image [B, D, H, W, C] global) -> (probs [B, K], features [B, F])``, host numpy
        arrays on every process.
      info: what metrics.json records about the model (step, checkpoint, tta, members).
      trained_on: the patients whose labels fitted it (None: not recorded).
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    fn: object
    info: dict
    trained_on: set[str] | None = None

    def predict_split(self, dataset, split) -> tuple[np.ndarray, np.ndarray]:
        return predict_with(self.fn, dataset, split, self.mesh, eval_batch_size(self.config))


def load_predictor(workdir, *, which: str = "best", data_dir: str | None = None,
                   tta: bool = False) -> Predictor:
    """A trained workdir's model (gradient or pca_lr) as a :class:`Predictor`; with ``tta``,
    averaged over the flips its training augmentation drew (``step.tta_views``)."""
    from her2jax.train import pca_lr  # pca_lr imports this module

    workdir = Path(workdir)
    record = workdir_lib.trained_on(workdir)
    seen = None if record is None else record["train"]
    if pca_lr.is_pca_lr(workdir):
        fitted = pca_lr.load(workdir, data_dir=data_dir)
        views = tta_views(fitted.config, tta)
        predict = step_lib.make_predict(fitted.graphdef, views)

        def fn(image):
            _, f = predict(fitted.weights.params, fitted.weights.rest, image)
            f = gather(f)
            return fitted.classifier.predict_proba(f), f

        return Predictor(fitted.config, fitted.mesh, fn,
                         {"step": 0, "checkpoint": pca_lr.MODEL_FILE, "tta_views": len(views)},
                         seen)
    trained = load_trained(workdir, which=which, data_dir=data_dir)
    views = tta_views(trained.config, tta)
    predict = step_lib.make_predict(trained.graphdef, views)

    def fn(image):
        p, f = predict(trained.state.params, trained.state.rest, image)
        return gather(p), gather(f)

    return Predictor(trained.config, trained.mesh, fn,
                     {"step": trained.step, "checkpoint": which, "tta_views": len(views)}, seen)


def tta_views(config, tta: bool) -> tuple[tuple[int, ...], ...]:
    """The flips to average over: all those of ``step.tta_views`` with ``tta``, else the
    image as it is."""
    return step_lib.tta_views(config.train.augment) if tta else ((),)


def evaluate_split(predict, state, dataset, split, mesh, batch_size, *, n_boot: int) -> dict:
    """metrics.summarize of the state's predictions on a labelled split, plus ``loss``: its
    class-balanced cross-entropy (``metrics.balanced_log_loss``)."""
    probs, _ = predict_split(predict, state, dataset, split, mesh, batch_size)
    summary = metrics.summarize(split.labels, probs, split.class_names, n_boot=n_boot)
    summary["loss"] = metrics.balanced_log_loss(split.labels, probs)
    return summary


@dataclasses.dataclass
class Trained:
    """A workdir's model, restored: what eval, features and predict need."""

    config: ml_collections.ConfigDict
    graphdef: nnx.GraphDef
    state: state_lib.TrainState
    mesh: jax.sharding.Mesh
    step: int


def load_trained(workdir, *, which: str = "best", data_dir: str | None = None,
                 step: int | None = None) -> Trained:
    """Restores ``checkpoints/<which>`` of a workdir into the current mesh.

    Args:
      workdir: a trained workdir (config.json + checkpoints).
      which: 'best' or 'latest'.
      data_dir: where the prepared dataset is now (default: the config's).
      step: a step kept in ``which`` (default: its best, or latest, step).
    """
    workdir = Path(workdir)
    record = workdir_lib.read(workdir)
    config = ml_collections.ConfigDict(record["config"])
    config.model.pretrained = ""   # the checkpoint holds the trained encoder
    if data_dir:
        config.data.data_dir = data_dir
    mesh = step_lib.make_mesh()
    model = nnx.eval_shape(lambda: factory.build_model(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = state_lib.split_model(model)
    optimizer = optim.make_optimizer(config.train, params, total_steps=config.train.steps)
    abstract = state_lib.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32), params=params, rest=rest,
        opt_state=jax.eval_shape(optimizer.init, params),
        rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        ema=params if config.train.get("ema_decay", 0.0) > 0 else None)
    target = checkpoint.abstract_like(abstract, NamedSharding(mesh, P()))
    checkpoints = checkpoint.Checkpoints(workdir, save_every=1)
    try:
        if step is not None:
            state = checkpoints.restore_step(step, target, which)
        elif which == "best":
            state = checkpoints.restore_best(target)
        elif which == "latest":
            state = checkpoints.restore_latest(target)
            if state is None:
                raise Her2jaxError("has no checkpoint to restore", file=str(workdir))
        else:
            raise Her2jaxError(f"unknown checkpoint {which!r} (expected best or latest)",
                               key="checkpoint")
    finally:
        checkpoints.close()
    # With an EMA the averaged parameters are the trained model.
    return Trained(config, graphdef, state_lib.for_inference(state), mesh,
                   int(jax.device_get(state.step)))


def evaluate(workdir, *, splits=(), which: str = "best", data_dir: str | None = None,
             n_boot: int = 2000, progress: bool = False, tta: bool = False) -> dict[str, dict]:
    """Writes ``eval/<split>/predictions.csv`` and ``metrics.json`` for the named splits
    (default: val and every test centre), with ``tta`` averaged over the training flips.
    Returns the summaries."""
    workdir = Path(workdir)
    predictor = load_predictor(workdir, which=which, data_dir=data_dir, tta=tta)
    dataset = pipeline.open_dataset(predictor.config.data.data_dir, predictor.config.data)
    outputs = {}
    named = eval_splits(dataset, predictor.config.data, splits)
    for name, split in named.items():
        workdir_lib.check_no_leak(workdir, name, split.patient_ids)
    for name, split in named.items():
        probs, _ = predictor.predict_split(dataset, split)
        summary = metrics.summarize(split.labels, probs, split.class_names, n_boot=n_boot,
                                    progress=name if progress else None)
        summary.update(predictor.info)
        outputs[name] = (split, probs, summary)
    with fileio.new_folders_removed_on_error(workdir / "eval"):
        write_eval(workdir, dataset, predictor.config, outputs, n_boot=n_boot)
    return {name: summary for name, (_, _, summary) in outputs.items()}


def eval_splits(dataset: pipeline.Dataset, data_config, names=()) -> dict[str, pipeline.Split]:
    """``pipeline.named_splits`` plus ``val`` whenever the run has a non-empty one: calibration
    and thresholds are fitted on it (``evaluate.decision``), whichever splits were asked for."""
    named = pipeline.named_splits(dataset, data_config, names)
    if "val" not in named:
        val = pipeline.select_splits(dataset, data_config).get("val")
        if val is not None and len(val):
            named = {"val": val, **named}
    return named


def write_eval(workdir: Path, dataset: pipeline.Dataset, config,
               outputs: dict[str, tuple], *, n_boot: int,
               calibrate_on: str = decision.FITTED_ON,
               baseline_train: pipeline.Split | None = None) -> None:
    """The eval files (process 0): ``eval/<split>/{predictions.csv,metrics.json}`` for each
    (split, probs [N, K], summary) of ``outputs``, the hand-made kinetic baseline on the same
    splits (``eval/baseline.json``, ``eval/<split>/baseline_metrics.json``; see
    :mod:`her2jax.train.baseline`), the validation-fitted calibration
    (``eval/calibration.json``, ``eval/<split>/{predictions_calibrated.csv,reliability.png}``),
    then ``eval/summary.txt`` and the pooled per-centre / subgroup tables of the test splits.

    ``calibrate_on`` names the output the calibration is fitted on (a fold ensemble's: the
    pooled out-of-fold predictions); ``baseline_train`` the split the baseline is fitted on
    (default: the config's ``train``)."""
    if jax.process_index() != 0:
        return
    eval_dir = Path(workdir) / "eval"
    clinical = config.data.columns.clinical
    for name, (split, probs, summary) in outputs.items():
        _write_predictions(eval_dir / name / "predictions.csv", dataset, split, probs, clinical)
        files.write_metrics(eval_dir / name / "metrics.json", summary)
    scored = baseline.fit_and_score(dataset, config, {n: o[0] for n, o in outputs.items()},
                                    n_boot=n_boot, train=baseline_train)
    baseline.write(eval_dir, scored, outputs)
    fitted = _write_calibration(eval_dir, dataset, outputs, clinical, calibrate_on)
    frames = {name: files.read_predictions(eval_dir / name / "predictions.csv")
              for name in outputs}
    tables.write_tables(eval_dir, frames, class_names(config), clinical, n_boot=n_boot)
    lines = [f"{name} (n={s['n']}): {summary_line(s)}\n" for name, (_, _, s) in outputs.items()]
    lines.append(f"calibration: {fitted['statement']}\n")
    files.write_text(eval_dir / "summary.txt", "".join(lines))


def _write_predictions(path: Path, dataset: pipeline.Dataset, split: pipeline.Split,
                       probs: np.ndarray, clinical) -> None:
    files.write_predictions(path, patient_ids=split.patient_ids, centers=split.centers,
                            labels=split.labels, probs=probs, class_names=split.class_names,
                            clinical=pipeline.clinical_columns(dataset, split, clinical))


def _write_calibration(eval_dir: Path, dataset: pipeline.Dataset, outputs: dict[str, tuple],
                       clinical, fitted_on: str = decision.FITTED_ON) -> dict:
    """Fits temperature (and binary thresholds) on ``fitted_on`` (val), applies them to every
    split of ``outputs`` and writes ``eval/calibration.json``; returns its content."""
    val = outputs.get(fitted_on)
    if val is None or not len(val[0]):
        fitted = decision.not_fitted(f"no {fitted_on} split was evaluated")
    else:
        fitted = decision.fit(val[0].labels, val[1], val[0].class_names, fitted_on=fitted_on)
        fitted["splits"] = {}
        for name, (split, probs, _) in outputs.items():
            entry, calibrated = decision.apply(fitted, split.labels, probs)
            _write_predictions(eval_dir / name / "predictions_calibrated.csv", dataset, split,
                               calibrated, clinical)
            calibration.plot_reliability(eval_dir / name / "reliability.png", split.labels,
                                         calibrated, split.class_names)
            entry["reliability_png"] = f"eval/{name}/reliability.png"
            fitted["splits"][name] = entry
    files.write_metrics(eval_dir / "calibration.json", fitted)
    return fitted


def summary_line(summary: dict) -> str:
    """The study's style: ``macro-average AUC 0.833 (95% CI 0.818–0.847), micro-...``."""
    return (f"macro-average AUC {metrics.format_auc(summary['macro_auc'])}, "
            f"micro-average AUC {metrics.format_auc(summary['micro_auc'])}")


def extract_features(workdir, *, splits=(), which: str = "best",
                     data_dir: str | None = None, tta: bool = False) -> dict[str, Path]:
    """Writes ``features/<split>.npz`` (features, probs, labels, patient_ids, centers)."""
    workdir = Path(workdir)
    predictor = load_predictor(workdir, which=which, data_dir=data_dir, tta=tta)
    return write_features(workdir, predictor, splits=splits)


def write_features(workdir: Path, predictor: Predictor, *, splits=()) -> dict[str, Path]:
    """``features/<split>.npz`` of ``predictor`` in ``workdir`` for the named splits."""
    config = predictor.config
    dataset = pipeline.open_dataset(config.data.data_dir, config.data)
    written = {}
    with fileio.new_folders_removed_on_error(workdir / "features"):
        for name, split in pipeline.named_splits(dataset, config.data, splits).items():
            probs, features = predictor.predict_split(dataset, split)
            path = workdir / "features" / f"{name}.npz"
            if jax.process_index() == 0:
                atomic_savez(path, dict(features=features, probs=probs, labels=split.labels,
                                        patient_ids=np.asarray(split.patient_ids),
                                        centers=np.asarray(split.centers),
                                        class_names=np.asarray(split.class_names)))
            written[name] = path
    return written


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez``, atomically (``fileio.atomic_write``): a reader (or a rerun after a kill)
    sees the old file or the complete new one, never a torn one."""
    fileio.atomic_write(path, lambda f: np.savez(f, **arrays))


def eval_batch_size(config) -> int:
    """train.eval_batch_size rounded to a multiple of the device count."""
    n = jax.device_count()
    return max(config.train.eval_batch_size // n, 1) * n


def class_names(config) -> tuple[str, ...]:
    return labels_lib.CLASS_NAMES[config.data.scheme]
