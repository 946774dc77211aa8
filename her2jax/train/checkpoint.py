"""Orbax checkpoints for training: ``latest`` (interval + preemption) and ``best`` (by metric).

Layout under ``workdir/checkpoints``::

    latest/<step>/{state,config}   the newest ``keep_latest`` steps, to resume from
    best/<step>/{state,config}     the step with the highest validation metric, to evaluate
    corrupt/<manager>-<step>-<time> unreadable steps moved aside by ``restore_latest``

Two managers, because one manager with ``best_fn`` deletes the latest step when it is not
the best one. Each step holds the ``TrainState`` (params, rest, opt_state, step, rng, and ema and momentum,
empty unless used; orbax saves its ``nnx.State`` fields and typed PRNG keys as they are) and
the config as JSON.

Decisions (DESIGN.md):

- The data position is the step, so nothing else is needed to resume.
- Never save a non-finite state: ``save_*`` check the state (one device-side boolean per
  part, fetched once) before writing, and raise ``Her2jaxError`` instead.
- orbax still lists a corrupt newest step as ``latest_step()`` and refuses to save that step
  again, so ``restore_latest`` moves an unreadable step out of the manager's directory before
  falling back to the previous one.
- A checkpoint of her2jax before 2026-12-05 lacks ema and momentum: it is restored with both
  None (``_stored_layout``), not taken for corrupt.
- Restore into an abstract target built for the current mesh (``abstract_like``): a state
  saved on 8 devices restores onto 2.
- On the CPU backend, replicated arrays are saved from one whole shard, not in orbax's
  replica-parallel slices (``_whole_shards_on_cpu``: the slices only cost compilations there).
- All processes agree on a preemption save (``reached_preemption``, which the loop must call
  at every step through ``save_latest``).
- A save that cannot be written (disk full, read-only or vanished folder) is a user error:
  ``Her2jaxError`` naming the manager's folder, the step and the operating system's reason.
  orbax writes in the background, so the failure of step N surfaces at the next save or at
  ``wait_until_finished`` / ``close``; the step it belongs to is remembered until then. The
  unfinished step only ever existed as orbax's ``<step>.orbax-checkpoint-tmp`` folder, which
  no restore lists, so the earlier steps remain the ones to resume from. orbax's own noise
  about the abandoned writes (logged tracebacks, unraisable errors, unawaited coroutines)
  is silenced, so that the command line prints the one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from her2jax import treepaths
from her2jax.errors import Her2jaxError
from her2jax.train import orbax_quirks
from her2jax.train.state import TrainState

MANAGERS = ("latest", "best")
_METRIC = "metric"          # the key of the best manager's metrics dict
_PARTS = ("params", "opt_state", "rest")


# --------------------------------------------------------------------------- pure helpers

def abstract_like(state: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """The restore target for ``state``: its pytree with ``jax.ShapeDtypeStruct`` leaves.

    Args:
      state: a pytree of arrays or of ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``),
        such as a ``TrainState``; its structure (``nnx.State`` fields, Variable types) is kept.
      sharding: the sharding every leaf gets, e.g. ``NamedSharding(mesh, P())`` for a state
        replicated over the current mesh; default: each leaf's own ``.sharding``.

    Returns:
      The same pytree with ``ShapeDtypeStruct(shape, dtype, sharding=...)`` leaves; orbax
      restores each array with that sharding, whatever mesh the checkpoint was saved from.
    """
    def leaf(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding if sharding is not None
                                    else getattr(x, "sharding", None))
    return jax.tree.map(leaf, state)


def _all_finite(tree: Any) -> jax.Array:
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


@functools.lru_cache(maxsize=8)
def _finite_flags_fn(out_sharding: NamedSharding | None):
    # Replicated output, so that every process can read it from its own shard.
    return jax.jit(lambda *parts: jnp.stack([_all_finite(p) for p in parts]),
                   out_shardings=out_sharding)


def _replicated_sharding(tree: Any) -> NamedSharding | None:
    for x in jax.tree.leaves(tree):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    return None


def check_finite(state: TrainState, step: int) -> None:
    """Raises ``Her2jaxError`` if a float in ``state``'s params, opt_state or rest is NaN/Inf.

    The check runs on the device (one boolean per part) and is fetched once, so it costs one
    small transfer; the loop calls it (through ``save_*``) only when it is about to save.

    Args:
      state: the ``TrainState`` about to be saved.
      step: the step it belongs to (for the message).

    Raises:
      Her2jaxError: "training diverged: non-finite <parts> at step N; ..." with ``key`` the
        first non-finite part (``params``, ``opt_state`` or ``rest``).
    """
    parts = [getattr(state, name) for name in _PARTS]
    flags = _finite_flags_fn(_replicated_sharding(parts))(*parts)
    finite = np.asarray(flags.addressable_data(0))
    bad = [name for name, ok in zip(_PARTS, finite, strict=True) if not ok]
    if bad:
        raise Her2jaxError(f"training diverged: non-finite {' and '.join(bad)} at step "
                           f"{int(step)}; the last good checkpoint is intact (lower the "
                           "learning rate or check the data, then resume)", key=bad[0])


def _stored_shape(x) -> tuple[int, ...]:
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):   # saved as its raw key data
        return tuple(jax.eval_shape(jax.random.key_data,
                                    jax.ShapeDtypeStruct(x.shape, x.dtype)).shape)
    return tuple(x.shape)


def _mismatches(saved_metadata: Any, abstract_state: Any) -> list[str]:
    """How the leaves on disk differ from the target (names and shapes), at most a few."""
    saved = {treepaths.dotted(p): tuple(getattr(m, "shape", ()) or ())
             for p, m in jax.tree_util.tree_leaves_with_path(saved_metadata)}
    wanted = {treepaths.dotted(p): _stored_shape(x)
              for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
    problems = [f"missing {n}" for n in sorted(wanted.keys() - saved.keys())]
    problems += [f"unexpected {n}" for n in sorted(saved.keys() - wanted.keys())]
    problems += [f"{n} has shape {saved[n]}, the model expects {wanted[n]}"
                 for n in sorted(wanted.keys() & saved.keys()) if saved[n] != wanted[n]]
    return problems


# TrainState's optional parts: None in runs without them. her2jax before 2026-12-05 had no
# such fields, so its checkpoints hold neither key, where today's hold both (as empty nodes).
_OPTIONAL = ("ema", "momentum")


def _stored_layout(metadata: Any, abstract_state: Any) -> tuple[Any, Any]:
    """(the restore target in the layout ``metadata`` was saved with, a function turning the
    restored tree into the caller's type).

    A checkpoint written before ``TrainState`` gained its optional parts holds the other
    five fields only; orbax refuses a target with keys the checkpoint lacks, even empty ones.
    The target then leaves out the optional parts that are None in ``abstract_state`` and
    absent on disk, and they are None again in the state returned. Any other difference in
    layout is kept as it is, for ``_mismatches`` and orbax to report.
    """
    if not isinstance(abstract_state, TrainState):
        return abstract_state, lambda restored: restored
    try:
        stored = set(metadata.keys())
    except (AttributeError, TypeError):
        return abstract_state, lambda restored: restored
    absent = [name for name in _OPTIONAL
              if getattr(abstract_state, name) is None and name not in stored]
    if not absent:
        return abstract_state, lambda restored: restored
    target = {f.name: getattr(abstract_state, f.name)
              for f in dataclasses.fields(abstract_state) if f.name not in absent}
    return target, lambda restored: TrainState(**restored)


def _stored_tree(metadata: Any) -> Any:
    """The tree of ``ShapeDtypeStruct`` s a step's state metadata describes, as saved."""
    tree = getattr(metadata, "tree", metadata)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)


def _layout_difference(metadata: Any, target: Any) -> str:
    """The top-level parts on disk against the ones ``target`` expects, in words."""
    try:
        stored = sorted(metadata.keys())
    except (AttributeError, TypeError):
        return "unknown layout on disk"
    if dataclasses.is_dataclass(target):
        wanted = sorted(f.name for f in dataclasses.fields(target))
    elif isinstance(target, dict):
        wanted = sorted(target)
    else:
        wanted = []
    return f"parts {', '.join(stored)} on disk; expected {', '.join(wanted) or 'another tree'}"


def _item_handlers() -> dict:
    # Named up front: a manager that only learns its handlers from a save (the default)
    # reads no metadata of steps written by an earlier process ("Item 'state' was found
    # in the checkpoint, but could not be restored"), which would pass for a corrupt step.
    return {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}


def _barriers(manager: str) -> ocp.options.MultiprocessingOptions:
    # Both managers save the same step at an eval step; orbax names its cross-process barriers
    # by step, so without a prefix per manager the second save finds "barrier ... already
    # ongoing" and a multi-process run hangs until orbax's barrier timeout (seen: 1 run in 6).
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=manager)


class _Unreadable(Exception):
    """A step whose files cannot be read back (as opposed to one that does not fit)."""


# --------------------------------------------------------------------------- managers

class Checkpoints:
    """The training run's two checkpoint managers (see the module docstring).

    Args:
      workdir: the run's directory; checkpoints go to ``workdir/checkpoints``.
      save_every: ``save_latest`` saves at multiples of this step count.
      keep_latest: how many of the newest steps ``latest`` keeps.
      async_save: write in a background thread (the arrays are copied to the host first, so
        the caller may donate or overwrite them as soon as ``save_*`` returns).
    """

    def __init__(self, workdir, *, save_every: int, keep_latest: int = 2,
                 async_save: bool = True):
        if save_every < 1 or keep_latest < 1:
            raise Her2jaxError(f"save_every ({save_every}) and keep_latest ({keep_latest}) "
                               "must be at least 1", key="save_every")
        # orbax wants absolute paths (a relative --workdir fails deep inside tensorstore).
        self.root = epath.Path(os.path.abspath(workdir)) / "checkpoints"
        self.save_every = int(save_every)
        self._closed = False
        self._barriers = 0
        self._best_metric: float | None = None
        # The step each manager may still be writing in the background (for error messages).
        self._writing: dict[str, int | None] = dict.fromkeys(MANAGERS)
        # Set once every process agreed to save for a preemption (multi-process runs).
        self.preempted = False
        orbax_quirks.install()           # idempotent: also for library callers
        orbax_quirks.whole_shards_on_cpu()
        try:
            self._latest, self._best = self._managers(keep_latest, async_save)
        except OSError as e:
            raise Her2jaxError(f"cannot create the checkpoint folders: {orbax_quirks.os_reason(e) or e}",
                               file=str(self.root)) from e

    def _managers(self, keep_latest: int, async_save: bool):
        latest = ocp.CheckpointManager(
            self.root / "latest", item_handlers=_item_handlers(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep_latest, save_interval_steps=self.save_every,
                enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
                create=True, multiprocessing_options=_barriers("latest")))
        best = ocp.CheckpointManager(
            self.root / "best", item_handlers=_item_handlers(),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda metrics: metrics[_METRIC], best_mode="max",
                enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
                create=True, multiprocessing_options=_barriers("best")))
        return latest, best

    # ---------------------------------------------------------------- queries

    def latest_step(self) -> int | None:
        """The newest step in ``latest`` (None before the first save)."""
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        """The step kept in ``best`` (None before the first ``save_best``)."""
        return self._best.best_step()

    def best_metric(self) -> float | None:
        """The metric of the step kept in ``best`` (None before the first ``save_best``)."""
        if self._best_metric is None:
            # Read from disk once (a resumed run); afterwards ``save_best`` keeps it, because
            # orbax writes the metrics file in the background with the step.
            step = self._best.best_step()
            metrics = (self._best.metrics(step) if step is not None else None) or {}
            if _METRIC in metrics:
                self._best_metric = float(metrics[_METRIC])
        return self._best_metric

    def reached_preemption(self, step: int) -> bool:
        """True once all processes have agreed to save at ``step`` because of a preemption
        notice (JAX's preemption sync service; False where it is not running)."""
        return self._latest.reached_preemption(int(step))

    # ---------------------------------------------------------------- save

    def save_latest(self, step: int, state: TrainState, *, config: dict,
                    force: bool = False) -> bool:
        """Saves ``state`` to ``latest`` if ``step`` is due; call it at every step.

        Due means ``step % save_every == 0``, ``force`` (e.g. the last step), or a preemption
        sync point at ``step``; a step already saved (or older than the newest) is not saved
        again.

        Args:
          step: the state's step (a Python int, so that no device value is fetched).
          state: the ``TrainState``.
          config: the run's config as a JSON-serialisable dict, stored beside the state.
          force: save even off the interval.

        Returns:
          Whether a save was started (it may still be writing: see ``wait_until_finished``).

        Raises:
          Her2jaxError: the state holds NaN/Inf (nothing is written), or this save or the
            previous one of ``latest`` cannot be written (disk full, read-only folder).
        """
        step = int(step)
        # Every step, on every process: the preemption sync protocol needs each step reported.
        preempted = self.reached_preemption(step)
        self.preempted = self.preempted or preempted
        if not (force or preempted or step % self.save_every == 0):
            return False
        latest = self._latest.latest_step()
        if latest is not None and step <= latest:
            if step < latest:
                logging.warning("not saving step %d: checkpoints/latest already has step %d",
                                step, latest)
            return False
        check_finite(state, step)
        if preempted:
            logging.warning("saving step %d because of a preemption notice", step)
        return self._save("latest", step, args=self._save_args(state, config), force=True)

    def save_best(self, step: int, state: TrainState, *, config: dict, metric: float) -> bool:
        """Saves ``state`` to ``best`` if ``metric`` beats the kept one (higher is better).

        Args:
          step: the state's step.
          state: the ``TrainState``.
          config: the run's config as a JSON-serialisable dict.
          metric: the validation metric (e.g. macro AUC); NaN is never best.

        Returns:
          Whether ``state`` is now the best checkpoint.

        Raises:
          Her2jaxError: the state holds NaN/Inf (nothing is written), or this save or the
            previous one of ``best`` cannot be written.
        """
        step, metric = int(step), float(metric)
        if not math.isfinite(metric):
            logging.warning("not keeping step %d as best: its metric is %s", step, metric)
            return False
        best = self.best_metric()
        if best is not None and metric <= best:
            return False
        check_finite(state, step)
        if step in self._best.all_steps():       # a better result for a step saved before
            self._wait("best")
            self._best.delete(step)
        saved = self._save("best", step, args=self._save_args(state, config),
                           metrics={_METRIC: metric}, force=True)
        if saved:
            self._best_metric = metric
        return saved

    def _save(self, which: str, step: int, **kwargs) -> bool:
        """``manager.save`` with write failures (of this step, or of the previous one still
        being written) raised as ``Her2jaxError``."""
        self._wait(which)   # so that the previous step's failure is reported as its own
        manager = self._manager(which)
        try:
            saved = manager.save(step, **kwargs)
        except Exception as e:
            with contextlib.suppress(Exception):   # whatever part of it was started
                manager.wait_until_finished()
            user_error = self._write_error(which, step, e)
            if user_error is None:
                raise
            raise user_error from e
        if saved:
            self._writing[which] = step
        return saved

    def _wait(self, which: str) -> None:
        """Waits for ``which``'s background save; its failure becomes a ``Her2jaxError``."""
        step, self._writing[which] = self._writing[which], None   # orbax raises a failure once
        try:
            self._manager(which).wait_until_finished()
        except Exception as e:
            user_error = self._write_error(which, step, e)
            if user_error is None:
                raise
            raise user_error from e

    def _write_error(self, which: str, step: int | None,
                     error: Exception) -> Her2jaxError | None:
        """For a save of ``step`` that failed with ``error``: a ``Her2jaxError`` naming the
        folder, the step and the reason when the operating system refused the write (disk
        full, read-only), else None (a bug, to be raised as it is).

        orbax's writes of that save still running are waited for first, then the unfinished
        step's temporary folder is removed (single-process runs), so that the disk space it
        took is free again for the run's last log lines. Best effort: a write orbax abandoned
        may still add a few files after that; orbax removes the folder at the next start, and
        no restore lists it meanwhile.
        """
        reason = orbax_quirks.os_reason(error)
        if reason is None:
            return None
        orbax_quirks.join_background_threads()
        directory = Path(str(self._manager(which).directory))
        if step is not None and jax.process_count() == 1:
            for unfinished in directory.glob(f"{step}{orbax_quirks.TMP_SUFFIX}*"):
                shutil.rmtree(unfinished, ignore_errors=True)
        what = "a checkpoint" if step is None else f"checkpoint step {step}"
        return Her2jaxError(f"cannot write {what}: {reason} (the earlier steps are intact)",
                            file=str(directory))

    @staticmethod
    def _save_args(state: TrainState, config: dict) -> ocp.args.Composite:
        json.dumps(config)   # fails here, not in the background writer, if not JSON
        return ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  config=ocp.args.JsonSave(config))

    # ---------------------------------------------------------------- restore

    def restore_latest(self, abstract_state: Any) -> TrainState | None:
        """The newest readable state in ``latest``, or None to start afresh.

        An unreadable step (missing or truncated files, bad metadata) is moved to
        ``checkpoints/corrupt/`` with a warning, and the previous step is tried.

        Args:
          abstract_state: the target from ``abstract_like`` (shapes, dtypes and the current
            mesh's shardings).

        Returns:
          The restored ``TrainState`` (same pytree types as the target), or None when no
          readable step is left (a warning says so if some were moved aside).

        Raises:
          Her2jaxError: the newest step was written for another model (names or shapes
            differ); nothing is moved.
          ValueError (or orbax's own error): the step reads into host arrays but not into
            this target, e.g. shardings missing or not dividing the shapes; a bug, nothing
            is moved.
        """
        moved = []
        while (step := self._latest.latest_step()) is not None:
            try:
                return self._restore(self._latest, step, abstract_state)
            except _Unreadable as e:
                moved.append(self._move_aside("latest", step, str(e)))
        if moved:
            logging.warning("no readable checkpoint left in %s (moved aside: %s); training "
                            "starts from scratch", self._latest.directory, ", ".join(moved))
        return None

    def restore_best(self, abstract_state: Any) -> TrainState:
        """The state kept in ``best`` (see ``restore_latest`` for ``abstract_state``).

        Raises:
          Her2jaxError: there is no best checkpoint, it is unreadable, or it was written for
            another model.
        """
        step = self._best.best_step()
        if step is None:
            raise Her2jaxError("no best checkpoint: the run has not been validated yet "
                               "(train with validation centres first)",
                               file=self._best.directory)
        try:
            return self._restore(self._best, step, abstract_state)
        except _Unreadable as e:
            raise Her2jaxError(f"best checkpoint step {step} is unreadable: {e}",
                               file=self._best.directory) from e

    def restore_step(self, step: int, abstract_state: Any, which: str = "latest") -> TrainState:
        """A given step of ``which`` (e.g. to compare runs step by step).

        Raises:
          Her2jaxError: no such step, it is unreadable, or it was written for another model.
        """
        manager = self._manager(which)
        if step not in manager.all_steps():
            raise Her2jaxError(f"no checkpoint at step {step} in {which} (kept: "
                               f"{sorted(manager.all_steps())})", file=manager.directory)
        try:
            return self._restore(manager, int(step), abstract_state)
        except _Unreadable as e:
            raise Her2jaxError(f"{which} checkpoint step {step} is unreadable: {e}",
                               file=manager.directory) from e

    def restored_config(self, which: str = "latest", step: int | None = None) -> dict:
        """The config saved beside a state.

        Args:
          which: ``'latest'`` or ``'best'``.
          step: a step of that manager; default its latest (or best) step.

        Raises:
          Her2jaxError: unknown ``which``, no such step, or an unreadable config.
        """
        manager = self._manager(which)
        if step is None:
            step = manager.latest_step() if which == "latest" else manager.best_step()
        if step is None or step not in manager.all_steps():
            raise Her2jaxError(f"no checkpoint{'' if step is None else f' at step {step}'} "
                               f"in {which}", file=manager.directory)
        try:
            return manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
        except Exception as e:  # noqa: BLE001 -- any read failure is the file's fault
            raise Her2jaxError(f"the config of {which} step {step} is unreadable: "
                               f"{type(e).__name__}: {e}", file=manager.directory) from e

    def _manager(self, which: str) -> ocp.CheckpointManager:
        if which not in MANAGERS:
            raise Her2jaxError(f"unknown checkpoint manager {which!r} (expected "
                               f"{' or '.join(MANAGERS)})", key="which")
        return self._latest if which == "latest" else self._best

    def _restore(self, manager: ocp.CheckpointManager, step: int,
                 abstract_state: Any) -> TrainState:
        """Restores ``step``; ``_Unreadable`` if its files fail, Her2jaxError if it does not fit."""
        try:
            metadata = manager.item_metadata(step).state
        except Exception as e:  # noqa: BLE001
            raise _Unreadable(f"metadata: {type(e).__name__}: {e}") from e
        if metadata is None:
            raise _Unreadable("no state metadata")
        problems = _mismatches(metadata, abstract_state)
        if problems:
            shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more"
                                               if len(problems) > 3 else "")
            if all("opt_state" in problem for problem in problems):
                # Same model, another optimizer state: a change of optimizer, freezing or
                # layer-wise decay, or her2jax before layer-wise decay became one optimizer.
                raise Her2jaxError(
                    f"checkpoint step {step} was written with another optimizer state layout "
                    "(another optimizer, freezing or layer_decay, or, with layer_decay < 1, a "
                    f"her2jax older than 2026-11-27): {shown} (use a new workdir or the "
                    "run's config)", file=manager.directory)
            raise Her2jaxError(f"checkpoint step {step} was written for another model: "
                               f"{shown} (use a new workdir or the run's config)",
                               file=manager.directory)
        missing = [treepaths.dotted(p) for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)
                   if getattr(x, "sharding", None) is None]
        if missing:
            raise ValueError(f"the restore target has no sharding for {missing[0]} (and "
                             f"{len(missing) - 1} more leaves): build it with abstract_like")
        target, as_caller = _stored_layout(metadata, abstract_state)
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))
        except Exception as e:  # noqa: BLE001
            if self._reads_on_host(manager, step, target):
                raise   # the files are fine: the target (e.g. its shardings) is wrong, a bug
            if self._reads_on_host(manager, step, _stored_tree(metadata)):
                # Readable in the layout it was written with: another her2jax's state, not a
                # corrupt one, so it stays where it is.
                raise Her2jaxError(
                    f"checkpoint step {step} holds a state laid out otherwise than this "
                    f"her2jax's ({_layout_difference(metadata, target)}); it is intact and "
                    "was left in place (read it with the her2jax that wrote it, or use a new "
                    "workdir)", file=manager.directory) from e
            raise _Unreadable(f"{type(e).__name__}: {e}") from e
        return as_caller(restored.state)

    @staticmethod
    def _reads_on_host(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> bool:
        """Whether ``step`` reads into plain host arrays: tells a corrupt step from a bad
        restore target before a step is moved aside (costs a read, on the failure path only)."""
        host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host),
                             abstract_state)
        try:
            manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(plain)))
        except Exception:  # noqa: BLE001
            return False
        return True

    def _move_aside(self, which: str, step: int, reason: str) -> str:
        """Moves an unreadable step out of the manager so that it is neither listed nor
        blocks a new save of the same step; returns where it went."""
        manager = self._manager(which)
        source = manager.directory / str(step)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%f")
        target = self.root / "corrupt" / f"{which}-{step}-{stamp}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
        self._barriers += 1
        ocp.multihost.sync_global_processes(
            f"her2jax_checkpoint_move_aside_{which}_{step}_{self._barriers}")
        manager.reload()
        reason = " ".join(reason.split())[:500]   # tensorstore errors carry whole specs
        logging.warning("checkpoint %s step %d is unreadable (%s); moved it to %s and falling "
                        "back to the previous step", which, step, reason, target)
        return str(target)

    # ---------------------------------------------------------------- lifetime

    def wait_until_finished(self) -> None:
        """Blocks until background saves are written.

        Raises:
          Her2jaxError: a background save could not be written (disk full, read-only).
        """
        errors = []
        for which in MANAGERS:   # both, so that nothing is still being written afterwards
            try:
                self._wait(which)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        for later in errors[1:]:
            logging.info("also: %s", later)
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Waits for background saves and releases the managers; safe to call twice.

        Raises:
          Her2jaxError: as ``wait_until_finished`` (the managers are released all the same).
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.wait_until_finished()
        finally:
            self._latest.close()
            self._best.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if error is None:
            self.close()
            return
        # Already failing: still wait for the background writes (a step started before the
        # failure is finished, not left half-written), but keep the first error.
        try:
            self.close()
        except Exception as late:  # noqa: BLE001
            logging.warning("while stopping after an error, checkpoints: %s", late)
