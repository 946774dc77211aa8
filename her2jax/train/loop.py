"""The training loop (the modes that use a trained workdir live in ``inference.py``).

``train`` reads top to bottom: checks -> mesh -> data -> ``build_training`` (model, optimizer,
state, step functions) -> workdir lock and claim -> restore -> loop. Resume order:

1. build the initial state (shapes, shardings) exactly as a fresh run would;
2. restore ``checkpoints/latest`` into it (an abstract target with the current mesh, so a
   run saved on 8 devices resumes on 2);
3. the restored ``step`` is the data position: the input pipeline starts at that global
   batch, so the resumed run sees exactly the examples an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from her2jax import labels as labels_lib
from her2jax.data import pipeline
from her2jax.errors import Her2jaxError
from her2jax.models import factory
from her2jax.train import checkpoint, checks, inference, optim, orbax_quirks
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


def class_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[K] 'balanced' loss weights n / (K n_c) of the training labels (classes absent from
    them get 0)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    with np.errstate(divide="ignore"):
        weights = np.where(counts > 0, len(labels) / (num_classes * counts), 0.0)
    return weights.astype(np.float32)


@dataclasses.dataclass
class Training:
    """What a gradient run needs, built once from its config (:func:`build_training`).

    Attributes:
      graphdef: the model's graph definition.
      state: the initial ``TrainState``, replicated on the mesh.
      optimizer: the optax transformation of ``state.opt_state``.
      train_step: ``jit(shard_map(step))`` (``step.make_train_step``).
      predict: the evaluation function (``step.make_predict``).
    """

    graphdef: nnx.GraphDef
    state: state_lib.TrainState
    optimizer: Any
    train_step: Any
    predict: Any


def build_training(config, mesh, train_labels: np.ndarray, *, model=None) -> Training:
    """The model, optimizer, initial state and jitted steps of ``config`` on ``mesh``: the one
    training setup the loop and the benchmarks use (a bad setting fails here, before anything
    is written). Nothing is compiled until the steps are first called.

    Args:
      config: the full config.
      mesh: from ``step.make_mesh``.
      train_labels: the training split's labels (for 'balanced' class weights).
      model: a model built elsewhere (e.g. with host-drawn parameters); default
        ``factory.build_model(config)``.
    """
    tc = config.train
    ema_decay = tc.get("ema_decay", 0.0)
    num_classes = len(labels_lib.CLASS_NAMES[config.data.scheme])
    if model is None:
        model = factory.build_model(config, bn_axis_name=step_lib.AXIS)
    optimizer = optim.make_optimizer(tc, nnx.state(model, nnx.Param), total_steps=tc.steps)
    graphdef, state = state_lib.create(model, optimizer, tc.seed, ema=ema_decay > 0)
    state = jax.device_put(state, NamedSharding(mesh, P()))
    weights = (class_weights(train_labels, num_classes)
               if tc.class_weighting == "balanced" else None)
    train_step = step_lib.make_train_step(
        graphdef, optimizer, mesh, num_classes=num_classes,
        augment_config=step_lib.Augment.from_config(tc.augment, config.data.recipe.channels),
        class_weights=weights, label_smoothing=tc.label_smoothing, ema_decay=ema_decay,
        grad_accum=tc.grad_accum)
    return Training(graphdef, state, optimizer, train_step, step_lib.make_predict(graphdef))


@dataclasses.dataclass
class Run:
    """What every mode that fits on a workdir opens first (:func:`open_run`)."""

    mesh: jax.sharding.Mesh
    dataset: pipeline.Dataset
    splits: dict[str, pipeline.Split]


def open_run(config) -> Run:
    """Checks every setting's range (``checks``), then the mesh, the prepared dataset and the
    splits the config chooses: the opening the training loop and the pca_lr protocol share.
    Nothing is written."""
    checks.check_run_config(config)
    mesh = step_lib.make_mesh()
    dataset = pipeline.open_dataset(config.data.data_dir, config.data)
    splits = pipeline.select_splits(dataset, config.data)
    logging.info("splits: %s", pipeline.describe(splits))
    return Run(mesh, dataset, splits)


def check_batch(batch_size: int, key: str) -> None:
    if batch_size % jax.device_count():
        raise Her2jaxError(f"{batch_size} is not divisible by the {jax.device_count()} devices",
                           key=key)


class Preemption:
    """SIGTERM (preemption), SIGHUP (the terminal or SSH session that started the run went
    away) or a first Ctrl-C (SIGINT) sets a flag; the loop saves at the next step and stops,
    so any of them can be resumed exactly. A second Ctrl-C interrupts at once
    (KeyboardInterrupt: the checkpoint in progress is finished on the way out). A SIGHUP the
    process ignores (started under ``nohup``) stays ignored.

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
            elif signum == signal.SIGHUP:
                logging.warning("hang-up (SIGHUP): saving a checkpoint at the next step, then "
                                "stopping")

        if self._shared:
            return self
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            if signum == signal.SIGHUP and signal.getsignal(signum) is not signal.SIG_DFL:
                continue   # nohup (ignored) or the caller's own handler: leave it
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
    # 1-2. Every setting's range, the mesh, the data: the split is chosen now, from the
    # config (before anything is built or written).
    check_batch(tc.batch_size, "train.batch_size")
    check_batch(tc.eval_batch_size, "train.eval_batch_size")
    run = open_run(config)
    mesh, dataset = run.mesh, run.dataset
    train_split, val_split = run.splits["train"], run.splits["val"]
    select_by = tc.get("select_by", "val_macro_auc")   # workdirs older than the key
    total = tc.steps * tc.grad_accum

    # 3. Model, optimizer, the initial state and the jitted steps (a bad setting fails here,
    # before the workdir is touched).
    training = build_training(config, mesh, train_split.labels)
    state, train_step, predict = training.state, training.train_step, training.predict

    # Everything opened from here on is closed however the run ends (done, early stop,
    # preemption, divergence, a full disk): a save started before an error is finished, so
    # no step is left half-written, and the logs are flushed.
    with contextlib.ExitStack() as stack:
        # 4. The workdir belongs to this run (no second training into it) and to this config
        # and dataset.
        run_config = hold_workdir(stack, workdir, config, dataset.meta, force=force)
        try:
            workdir_lib.record_trained_on(workdir, train_split.patient_ids,
                                          val_split.patient_ids)
        except OSError as e:
            raise cannot_write(workdir, workdir_lib.TRAINED_ON_FILE, e) from e

        # 5. Restore the latest checkpoint; its step is the data position.
        checkpoints, state, start = open_checkpoints(stack, workdir, tc, state)

        # 6. The loop.
        log = stack.enter_context(RunLog(workdir, resume_step=start))
        batches = pipeline.device_batches(pipeline.train_batches(
            dataset, train_split, global_batch_size=tc.batch_size, seed=tc.seed,
            start_step=start, stop_step=total, process_index=jax.process_index(),
            process_count=jax.process_count(), worker_count=config.data.worker_count,
            prefetch=config.data.prefetch), mesh, ahead=config.data.get("device_prefetch", 2))
        bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                   disable=not progress or jax.process_index() != 0)
        stack.callback(bar.close)
        # Early stopping resumes where it was: the validations since the kept best step that
        # did not beat it (a run that stopped early stays stopped).
        since_best = evaluations_since_best(start, checkpoints.best_step(), tc.eval_every,
                                            total)
        stopped, window = "done", (time.perf_counter(), start)
        if tc.early_stop_patience and since_best >= tc.early_stop_patience:
            stopped = "early_stop"
            logging.info("stopped early at step %d before (%d validations without a better "
                         "one than step %d): nothing to resume", start, since_best,
                         checkpoints.best_step())
        profile = tuple(tc.profile_steps)
        preemption = stack.enter_context(Preemption())
        for step in range(start, total if stopped == "done" else start):
            if profile and step == profile[0] and jax.process_index() == 0:
                jax.profiler.start_trace(str(workdir / "profile"))
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                batch = next(batches)
                state, step_metrics = train_step(state, batch)
            if profile and step == profile[-1] and jax.process_index() == 0:
                jax.profiler.stop_trace()
            done = step + 1

            if done % tc.log_every == 0 or done == total:
                values, window = log_step(log, done, step_metrics, window, tc.batch_size)
                bar.set_postfix(loss=f"{values['loss']:.3f}",
                                vol_s=f"{values['volumes_per_s']:.0f}")
            bar.update()

            if done % tc.eval_every == 0 or done == total:
                summary = inference.evaluate_split(predict, state_lib.for_inference(state), dataset,
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


def evaluations_since_best(step: int, best_step: int | None, eval_every: int,
                           total: int) -> int:
    """How many validations after ``best_step`` up to ``step`` (the loop validates at every
    multiple of ``eval_every`` and at ``total``) did not beat it: the early-stopping count a
    run resumed at ``step`` continues from (0 before the first validation)."""
    if best_step is None:
        return 0
    return sum(1 for done in range(best_step + 1, step + 1)
               if done % eval_every == 0 or done == total)


def log_step(log: RunLog, done: int, step_metrics, window: tuple[float, int],
             batch_size: int, *, what: str = "training") -> tuple[dict, tuple[float, int]]:
    """A logged step: its metrics on the host, the NaN guard (a non-finite loss stops the run;
    the last checkpoint is intact), the volumes per second since the last logged step
    (``window`` = (time, step) then), written to the run's logs. Returns (values, the new
    window)."""
    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    if not np.isfinite(values["loss"]):
        raise Her2jaxError(f"{what} diverged: loss is {values['loss']} at step {done}; the "
                           "last good checkpoint is intact", key="train")
    now = time.perf_counter()
    values["volumes_per_s"] = (done - window[1]) * batch_size / max(now - window[0], 1e-9)
    log.write(done, "train", values)
    return values, (now, done)


def hold_workdir(stack: contextlib.ExitStack, workdir: Path, config, dataset_meta: dict, *,
                 force: bool) -> dict:
    """Locks ``workdir`` for this run until ``stack`` closes (no second run into it) and
    claims it for ``config`` and the dataset (``workdir.claim``). Returns the config.json
    config in force."""
    try:
        stack.enter_context(workdir_lib.locked(workdir))
    except OSError as e:
        raise cannot_write(workdir, f"its lock {workdir_lib.LOCK_FILE}", e) from e
    try:
        return workdir_lib.claim(workdir, config, dataset_meta, force=force)["config"]
    except OSError as e:
        raise cannot_write(workdir, workdir_lib.CONFIG_FILE, e) from e


def open_checkpoints(stack: contextlib.ExitStack, workdir: Path, train_config, state):
    """(the run's ``Checkpoints``, closed with ``stack``; the state restored from
    ``checkpoints/latest``, or ``state`` itself on a fresh run; its step)."""
    checkpoints = stack.enter_context(checkpoint.Checkpoints(
        workdir, save_every=train_config.save_every, keep_latest=train_config.keep_latest))
    restored = checkpoints.restore_latest(checkpoint.abstract_like(state))
    if restored is not None:
        state = restored
    start = int(jax.device_get(state.step))
    if start:
        logging.info("resuming at step %d", start)
    return checkpoints, state, start


def cannot_write(workdir: Path, what: str, error: OSError) -> Her2jaxError:
    """A full disk or read-only workdir as a one-line error naming the folder and reason."""
    reason = orbax_quirks.os_reason(error) or str(error)
    return Her2jaxError(f"cannot write {what}: {reason}", file=str(workdir))


class RunLog:
    """The run's ``MetricsLogger`` (metrics.jsonl, tensorboard/) as a context manager, with a
    full disk or read-only workdir raised as ``Her2jaxError`` instead of an ``OSError``."""

    _WHAT = "the run's logs (metrics.jsonl, tensorboard/)"

    def __init__(self, workdir: Path, *, resume_step: int):
        self._workdir = workdir
        try:
            self._log = logger_lib.MetricsLogger(workdir, resume_step=resume_step)
        except OSError as e:
            raise cannot_write(workdir, self._WHAT, e) from e

    def write(self, step: int, split: str, values: dict) -> None:
        try:
            self._log.write(step, split, values)
        except OSError as e:
            raise cannot_write(self._workdir, self._WHAT, e) from e

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            self._log.close()
        except OSError as e:
            if error is None:
                raise cannot_write(self._workdir, self._WHAT, e) from e
            # Most likely the first error's cause again (a full disk): not worth a second line.
            logging.info("while stopping after an error, closing the logs: %s", e)
