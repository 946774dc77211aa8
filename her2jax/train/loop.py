"""The training loop and the modes that use a trained workdir (eval, features, predict).

``train`` reads top to bottom: mesh -> data -> model, optimizer, state -> workdir claim ->
restore -> step functions -> loop. Resume order:

1. build the initial state (shapes, shardings) exactly as a fresh run would;
2. restore ``checkpoints/latest`` into it (an abstract target with the current mesh, so a
   run saved on 8 devices resumes on 2);
3. the restored ``step`` is the data position: the input pipeline starts at that global
   batch, so the resumed run sees exactly the examples an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from her2jax import labels as labels_lib
from her2jax.data import pipeline
from her2jax.errors import Her2jaxError
from her2jax.evaluate import calibration, decision, files, metrics, tables
from her2jax.models import factory
from her2jax.train import baseline, checkpoint, checks, optim
from her2jax.train import logger as logger_lib
from her2jax.train import state as state_lib
from her2jax.train import step as step_lib
from her2jax.train import workdir as workdir_lib


@dataclasses.dataclass
class TrainResult:
    """How a training run ended.

    Attributes:
      steps: global batches consumed (the final state's step).
      best_metric: the kept step's value of ``select_by`` (validation loss, macro AUC, or
        the step for 'last'; None if never evaluated).
      best_step: the step checkpoints/best keeps.
      stopped: 'done', 'early_stop', 'preempted' (SIGTERM) or 'interrupted' (Ctrl-C).
      select_by: ``train.select_by``, what chose ``best_step``.
    """

    steps: int
    best_metric: float | None
    best_step: int | None
    stopped: str
    select_by: str


SELECT_BY = checks.SELECT_BY


def selection_score(select_by: str, step: int, summary: dict) -> float:
    """The score ``checkpoints/best`` maximises: minus the validation loss, the validation
    macro AUC (NaN when undefined: never best), or the step (so the last step wins)."""
    if select_by == "val_loss":
        return -summary["loss"]
    if select_by == "val_macro_auc":
        value = summary["macro_auc"]["value"]
        return float("nan") if value is None else value
    return float(step)


def _selected_value(select_by: str, score: float | None) -> float | None:
    """``selection_score`` back in the metric's own terms (a loss is positive)."""
    if score is None:
        return None
    return -score if select_by == "val_loss" else score


def make_mesh() -> jax.sharding.Mesh:
    """One ``data`` axis over every device of every process.

    Auto axis types: shardings stay out of the array types (jax >= 0.9 defaults make_mesh to
    Explicit, under which e.g. the ViT's replicated CLS token and a data-sharded batch
    cannot be concatenated); shard_map and jit place the computation.
    """
    return jax.make_mesh((jax.device_count(),), (step_lib.AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,))


def class_weights(split: pipeline.Split, scheme: str) -> np.ndarray:
    """[K] 'balanced' loss weights n / (K n_c) (classes absent from the split get 0)."""
    k = len(split.class_names)
    counts = np.bincount(split.labels, minlength=k).astype(np.float64)
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, len(split) / (k * counts), 0.0)
    return weights.astype(np.float32)


def _check_batch(batch_size: int, key: str) -> None:
    if batch_size % jax.device_count():
        raise Her2jaxError(f"{batch_size} is not divisible by the {jax.device_count()} devices",
                           key=key)


def _optimizer(config, params):
    return optim.make_optimizer(config.train, params, total_steps=config.train.steps)


class _Preemption:
    """SIGTERM (preemption) or a first Ctrl-C (SIGINT) sets a flag; the loop saves at the next
    step and stops, so either can be resumed exactly. A second Ctrl-C interrupts at once
    (KeyboardInterrupt: the checkpoint in progress is finished on the way out).

    With several processes a SIGTERM reaches one or some of them; JAX's preemption service
    (which catches SIGTERM itself) agrees on a step at which every process saves and stops, so
    no Python handler is installed then (Ctrl-C there is a KeyboardInterrupt).
    """

    def __init__(self):
        self.requested = False
        self.interrupted = False
        self._previous: dict[int, object] = {}
        self._shared = jax.process_count() > 1

    def __enter__(self):
        def handler(signum, frame):
            del frame
            self.requested = True
            if signum == signal.SIGINT:
                self.interrupted = True
                signal.signal(signal.SIGINT, signal.default_int_handler)
                logging.warning("Ctrl-C: saving a checkpoint at the next step, then stopping "
                                "(Ctrl-C again to stop at once)")

        if self._shared:
            return self
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[signum] = signal.signal(signum, handler)
            except ValueError:   # not the main thread (e.g. some test runners): no handler
                pass
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def train(config: ml_collections.ConfigDict, workdir, *, force: bool = False,
          progress: bool = True) -> TrainResult:
    """Trains (or resumes) the run in ``workdir``.

    Args:
      config: the full config (data, model, train).
      workdir: the run's directory.
      force: accept a config / dataset change against the workdir's config.json.
      progress: show a progress bar (process 0).
    """
    workdir = Path(workdir)
    tc = config.train
    # 0. Every setting's range, before anything is built or written.
    checks.check_run_config(config)
    # 1. Mesh.
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    _check_batch(tc.batch_size, "train.batch_size")
    _check_batch(tc.eval_batch_size, "train.eval_batch_size")
    select_by = tc.get("select_by", "val_macro_auc")   # workdirs older than the key
    ema_decay = tc.get("ema_decay", 0.0)

    # 2. Data: the split is chosen now, from the config.
    dataset = pipeline.open_dataset(config.data.data_dir, config.data)
    splits = pipeline.select_splits(dataset, config.data)
    train_split, val_split = splits["train"], splits["val"]
    logging.info("splits: %s", pipeline.describe(splits))
    total = tc.steps * tc.grad_accum

    # 3. Model, optimizer and the initial state (a bad setting fails here, before the
    # workdir is touched).
    model = factory.build_model(config, bn_axis_name=step_lib.AXIS)
    optimizer = _optimizer(config, nnx.state(model, nnx.Param))
    graphdef, state = state_lib.create(model, optimizer, tc.seed, ema=ema_decay > 0)
    del model
    state = jax.device_put(state, replicated)

    # Everything opened from here on is closed however the run ends (done, early stop,
    # preemption, divergence, a full disk): a save started before an error is finished, so
    # no step is left half-written, and the logs are flushed.
    with contextlib.ExitStack() as stack:
        # 4. The workdir belongs to this run (no second training into it) and to this config
        # and dataset.
        try:
            stack.enter_context(workdir_lib.locked(workdir))
            run_config = workdir_lib.claim(workdir, config, dataset.meta,
                                           force=force)["config"]
            workdir_lib.record_trained_on(workdir, train_split.patient_ids,
                                          val_split.patient_ids)
        except OSError as e:
            raise _cannot_write(workdir, workdir_lib.CONFIG_FILE, e) from e

        # 5. Restore the latest checkpoint; its step is the data position.
        checkpoints = stack.enter_context(checkpoint.Checkpoints(
            workdir, save_every=tc.save_every, keep_latest=tc.keep_latest))
        restored = checkpoints.restore_latest(checkpoint.abstract_like(state))
        if restored is not None:
            state = restored
        start = int(jax.device_get(state.step))
        if start:
            logging.info("resuming at step %d", start)

        # 6. The jitted steps.
        weights = (class_weights(train_split, config.data.scheme)
                   if tc.class_weighting == "balanced" else None)
        train_step = step_lib.make_train_step(
            graphdef, optimizer, mesh, num_classes=len(train_split.class_names),
            augment_config=step_lib.Augment.from_config(tc.augment, config.data.recipe.channels),
            class_weights=weights,
            label_smoothing=tc.label_smoothing, ema_decay=ema_decay, grad_accum=tc.grad_accum)
        predict = step_lib.make_predict(graphdef)

        # 7. The loop.
        log = stack.enter_context(_RunLog(workdir, resume_step=start))
        batches = pipeline.device_batches(pipeline.train_batches(
            dataset, train_split, global_batch_size=tc.batch_size, seed=tc.seed,
            start_step=start, stop_step=total, process_index=jax.process_index(),
            process_count=jax.process_count(), worker_count=config.data.worker_count,
            prefetch=config.data.prefetch), mesh, ahead=config.data.get("device_prefetch", 2))
        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                   disable=not progress or jax.process_index() != 0)
        stack.callback(bar.close)
        stopped, since_best, window = "done", 0, (time.perf_counter(), start)
        profile = tuple(tc.profile_steps)
        preemption = stack.enter_context(_Preemption())
        for step in range(start, total):
            if profile and step == profile[0] and jax.process_index() == 0:
                jax.profiler.start_trace(str(workdir / "profile"))
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = next(batches)
                state, step_metrics = train_step(state, batch)
            if profile and step == profile[-1] and jax.process_index() == 0:
                jax.profiler.stop_trace()
            done = step + 1

            if done % tc.log_every == 0 or done == total:
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                if not np.isfinite(values["loss"]):
                    raise Her2jaxError(f"training diverged: loss is {values['loss']} at step "
                                       f"{done}; the last good checkpoint is intact",
                                       key="train")
                now = time.perf_counter()
                values["volumes_per_s"] = ((done - window[1]) * tc.batch_size
                                           / max(now - window[0], 1e-9))
                window = (now, done)
                log.write(done, "train", values)
                bar.set_postfix(loss=f"{values['loss']:.3f}",
                                vol_s=f"{values['volumes_per_s']:.0f}")
            bar.update()

            if done % tc.eval_every == 0 or done == total:
                summary = evaluate_split(predict, state_lib.for_inference(state), dataset,
                                         val_split, mesh, tc.eval_batch_size, n_boot=0)
                # None (undefined, e.g. a class missing from val) is logged as NaN; a real 0.0
                # stays 0.0 (``x or nan`` would turn an accuracy of 0 into NaN).
                macro, micro, accuracy = (float("nan") if v is None else v for v in (
                    summary["macro_auc"]["value"], summary["micro_auc"]["value"],
                    summary["accuracy"]))
                log.write(done, "val", {"loss": summary["loss"], "macro_auc": macro,
                                        "micro_auc": micro, "accuracy": accuracy})
                previous = checkpoints.best_metric()
                if checkpoints.save_best(done, state, config=run_config,
                                         metric=selection_score(select_by, done, summary)):
                    since_best = 0
                elif previous is not None:
                    since_best += 1
                if tc.early_stop_patience and since_best >= tc.early_stop_patience:
                    stopped = "early_stop"
            checkpoints.save_latest(done, state, config=run_config,
                                    force=done == total or stopped != "done"
                                    or preemption.requested)
            if preemption.requested or checkpoints.preempted:
                stopped = "interrupted" if preemption.interrupted else "preempted"
            if stopped != "done":
                break
        checkpoints.wait_until_finished()
        return TrainResult(int(jax.device_get(state.step)),
                           _selected_value(select_by, checkpoints.best_metric()),
                           checkpoints.best_step(), stopped, select_by)


def _cannot_write(workdir: Path, what: str, error: OSError) -> Her2jaxError:
    """A full disk or read-only workdir as a one-line error naming the folder and reason."""
    reason = checkpoint.os_reason(error) or str(error)
    return Her2jaxError(f"cannot write {what}: {reason}", file=str(workdir))


class _RunLog:
    """The run's ``MetricsLogger`` (metrics.jsonl, tensorboard/) as a context manager, with a
    full disk or read-only workdir raised as ``Her2jaxError`` instead of an ``OSError``."""

    _WHAT = "the run's logs (metrics.jsonl, tensorboard/)"

    def __init__(self, workdir: Path, *, resume_step: int):
        self._workdir = workdir
        try:
            self._log = logger_lib.MetricsLogger(workdir, resume_step=resume_step)
        except OSError as e:
            raise _cannot_write(workdir, self._WHAT, e) from e

    def write(self, step: int, split: str, values: dict) -> None:
        try:
            self._log.write(step, split, values)
        except OSError as e:
            raise _cannot_write(self._workdir, self._WHAT, e) from e

    def __enter__(self) -> _RunLog:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            self._log.close()
        except OSError as e:
            if error is None:
                raise _cannot_write(self._workdir, self._WHAT, e) from e
            # Most likely the first error's cause again (a full disk): not worth a second line.
            logging.info("while stopping after an error, closing the logs: %s", e)


def gather(x: jax.Array) -> np.ndarray:
    """A global array (sharded over processes) as one host numpy array on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def predict_split(predict, state, dataset: pipeline.Dataset, split: pipeline.Split, mesh,
                  batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(probs [N, K], features [N, F]) for every example of ``split``, in split order."""
    probs, features = [], []
    for host in pipeline.eval_batches(dataset, split, global_batch_size=batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count()):
        batch = pipeline.to_global(host, mesh)
        p, f = predict(state.params, state.rest, batch["image"])
        valid = gather(batch["valid"])
        probs.append(gather(p)[valid])
        features.append(gather(f)[valid])
    if not probs:
        return np.zeros((0, len(split.class_names)), np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(probs), np.concatenate(features)


def evaluate_split(predict, state, dataset, split, mesh, batch_size, *, n_boot: int) -> dict:
    """metrics.summarize of the state's predictions on a labelled split, plus ``loss``: its
    class-balanced cross-entropy (``metrics.balanced_log_loss``)."""
    probs, _ = predict_split(predict, state, dataset, split, mesh, batch_size)
    summary = metrics.summarize(split.labels, probs, split.class_names, n_boot=n_boot)
    summary["loss"] = metrics.balanced_log_loss(split.labels, probs)
    return summary


# ---------------------------------------------------------------- trained-workdir modes


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
    mesh = make_mesh()
    model = nnx.eval_shape(lambda: factory.build_model(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = state_lib.split_model(model)
    optimizer = _optimizer(config, params)
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
             n_boot: int = 2000, progress: bool = False) -> dict[str, dict]:
    """Writes ``eval/<split>/predictions.csv`` and ``metrics.json`` for the named splits
    (default: val and every test centre). Returns the summaries."""
    workdir = Path(workdir)
    trained = load_trained(workdir, which=which, data_dir=data_dir)
    dataset = pipeline.open_dataset(trained.config.data.data_dir, trained.config.data)
    predict = step_lib.make_predict(trained.graphdef)
    batch_size = eval_batch_size(trained.config)
    outputs = {}
    named = eval_splits(dataset, trained.config.data, splits)
    for name, split in named.items():
        workdir_lib.check_no_leak(workdir, name, split.patient_ids)
    for name, split in named.items():
        probs, _ = predict_split(predict, trained.state, dataset, split, trained.mesh,
                                 batch_size)
        summary = metrics.summarize(split.labels, probs, split.class_names, n_boot=n_boot,
                                    progress=name if progress else None)
        summary.update(step=trained.step, checkpoint=which)
        outputs[name] = (split, probs, summary)
    with files.new_folders_removed_on_error(workdir / "eval"):
        write_eval(workdir, dataset, trained.config, outputs, n_boot=n_boot)
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
               outputs: dict[str, tuple], *, n_boot: int) -> None:
    """The eval files (process 0): ``eval/<split>/{predictions.csv,metrics.json}`` for each
    (split, probs [N, K], summary) of ``outputs``, the hand-made kinetic baseline on the same
    splits (``eval/baseline.json``, ``eval/<split>/baseline_metrics.json``; see
    :mod:`her2jax.train.baseline`), the validation-fitted calibration
    (``eval/calibration.json``, ``eval/<split>/{predictions_calibrated.csv,reliability.png}``),
    then ``eval/summary.txt`` and the pooled per-centre / subgroup tables of the test splits."""
    if jax.process_index() != 0:
        return
    eval_dir = Path(workdir) / "eval"
    clinical = config.data.columns.clinical
    for name, (split, probs, summary) in outputs.items():
        _write_predictions(eval_dir / name / "predictions.csv", dataset, split, probs, clinical)
        files.write_metrics(eval_dir / name / "metrics.json", summary)
    scored = baseline.fit_and_score(dataset, config, {n: o[0] for n, o in outputs.items()},
                                    n_boot=n_boot)
    baseline.write(eval_dir, scored, outputs)
    fitted = _write_calibration(eval_dir, dataset, outputs, clinical)
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
                       clinical) -> dict:
    """Fits temperature (and binary thresholds) on val, applies them to every split of
    ``outputs`` and writes ``eval/calibration.json``; returns its content."""
    val = outputs.get(decision.FITTED_ON)
    if val is None or not len(val[0]):
        fitted = decision.not_fitted("no validation split was evaluated")
    else:
        fitted = decision.fit(val[0].labels, val[1], val[0].class_names)
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
                     data_dir: str | None = None) -> dict[str, Path]:
    """Writes ``features/<split>.npz`` (features, probs, labels, patient_ids, centers)."""
    workdir = Path(workdir)
    trained = load_trained(workdir, which=which, data_dir=data_dir)
    dataset = pipeline.open_dataset(trained.config.data.data_dir, trained.config.data)
    predict = step_lib.make_predict(trained.graphdef)
    written = {}
    with files.new_folders_removed_on_error(workdir / "features"):
        for name, split in pipeline.named_splits(dataset, trained.config.data, splits).items():
            probs, features = predict_split(predict, trained.state, dataset, split,
                                            trained.mesh, eval_batch_size(trained.config))
            path = workdir / "features" / f"{name}.npz"
            if jax.process_index() == 0:
                atomic_savez(path, dict(features=features, probs=probs, labels=split.labels,
                                        patient_ids=np.asarray(split.patient_ids),
                                        centers=np.asarray(split.centers),
                                        class_names=np.asarray(split.class_names)))
            written[name] = path
    return written


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` into a temporary file beside ``path``, then one rename: a reader (or a
    rerun after a kill) sees the old file or the complete new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, files.file_mode())   # mkstemp's 0600 -> what the umask allows
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def eval_batch_size(config) -> int:
    """train.eval_batch_size rounded to a multiple of the device count."""
    n = jax.device_count()
    return max(config.train.eval_batch_size // n, 1) * n


def class_names(config) -> tuple[str, ...]:
    return labels_lib.CLASS_NAMES[config.data.scheme]
