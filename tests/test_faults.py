"""Faults with real processes and real files: SIGKILL in the middle of an asynchronous
checkpoint write and in the middle of validation, SIGTERM, a diverging loss, a full and a
read-only disk, a prepare run killed midway.

Kill points inside a training process are placed by a test-only ``sitecustomize.py`` put
first on ``PYTHONPATH`` (see ``_fault_env``): it wraps ``Checkpoints.save_latest`` or
``inference.evaluate_split`` when ``her2jax.train.loop`` is imported, writes what it saw at the
kill to a JSON report, and SIGKILLs its own process. Runs resume on the same topology (8 CPU
devices, as the straight run), so resumed parameters must be bitwise those of the run that
was never interrupted (``straight`` in tests/conftest.py).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from her2jax.data import prepare, recipes, tfds_builder
from her2jax.errors import Her2jaxError
from her2jax.train import checkpoint, inference, logger, loop
from her2jax.train import step as step_lib
from her2jax.train import workdir as workdir_lib

from .test_checkpoint import make_state
from .test_prepare import copy_cohort
from .test_train import REPO, RESUME_ARGS, _final_params, _her2jax, small_config

TMP_SUFFIX = ".orbax-checkpoint-tmp"   # orbax's folder for a step still being written

# The fault hook: ``HER2JAX_FAULT=<point>:<step>:<report.json>`` with point ``save`` (SIGKILL
# once save_latest(step) has started orbax's background write and its temporary folder holds
# files; the commit that would rename it is held back, so the kill never comes too late) or ``validate``
# (SIGKILL once validation at ``step`` has computed its first batch of predictions).
SITECUSTOMIZE = '''
"""Test-only fault injection for tests/test_faults.py (never installed outside a test)."""
import asyncio
import importlib.abc
import importlib.util
import json
import os
import signal
import sys
import time


def _die(report, seen):
    with open(report, "w") as f:
        json.dump(seen, f)
    os.kill(os.getpid(), signal.SIGKILL)


def _listing(folder):
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _files_in(folder):
    return sum(len(files) for _, _, files in os.walk(folder))


def _settled(listing, keep=2):
    """No step of ``listing`` is being written, and no more than ``keep`` are kept."""
    return (not any(name.endswith(".orbax-checkpoint-tmp") for name in listing)
            and sum(name.isdigit() for name in listing) <= keep)


def _hold_commit(at):
    """Never commit step ``at`` of ``latest``: its temporary folder is not renamed until the
    process is killed, however fast the background write is."""
    from orbax.checkpoint._src.path import atomicity

    for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
        def finalize(self, _finalize=cls.finalize):
            final = self.get_final()
            if final.name == str(at) and final.parent.name == "latest":
                return asyncio.Event().wait()
            return _finalize(self)

        cls.finalize = finalize


def _install(loop):
    from her2jax.train import checkpoint, inference   # loop has imported both

    point, at, report = os.environ["HER2JAX_FAULT"].split(":", 2)
    at = int(at)
    if point == "save":
        _hold_commit(at)
        save_latest = checkpoint.Checkpoints.save_latest

        def save_then_die(self, step, state, **kwargs):
            started = save_latest(self, step, state, **kwargs)
            if started and int(step) == at:
                latest = str(self.root / "latest")
                tmp = os.path.join(latest, f"{at}.orbax-checkpoint-tmp")
                # orbax creates the folder on its background thread: wait until it holds
                # files (the commit that would rename it is held, so it cannot finish first).
                deadline = time.monotonic() + 300
                while _files_in(tmp) == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                _die(report, {"latest": _listing(latest), "files_in_tmp": _files_in(tmp)})
            return started

        checkpoint.Checkpoints.save_latest = save_then_die
    elif point == "validate":
        evaluate_split = inference.evaluate_split

        def evaluate_then_die(predict, state, dataset, split, mesh, batch_size, **kwargs):
            if int(state.step) != at:
                return evaluate_split(predict, state, dataset, split, mesh, batch_size,
                                      **kwargs)

            def predict_then_die(*args):
                out = predict(*args)
                for x in out:
                    x.block_until_ready()
                latest = os.path.join(os.environ["HER2JAX_FAULT_WORKDIR"], "checkpoints",
                                      "latest")
                # The previous step's save may still be committing on orbax's background
                # thread (and pruning the step before it): the kill is meant for validation,
                # so it waits for that to settle.
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline and not _settled(_listing(latest)):
                    time.sleep(0.01)
                _die(report, {"examples": len(split), "batch_size": batch_size,
                              "latest": _listing(latest)})
                return out

            return evaluate_split(predict_then_die, state, dataset, split, mesh, batch_size,
                                  **kwargs)

        inference.evaluate_split = evaluate_then_die
    else:
        raise ValueError(f"unknown fault point {point!r}")


class _PatchLoop(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "her2jax.train.loop":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            _install(module)

        spec.loader.exec_module = exec_then_patch
        return spec


if os.environ.get("HER2JAX_FAULT"):
    sys.meta_path.insert(0, _PatchLoop())
'''


def _fault_env(root: Path, point: str, step: int, workdir: Path) -> tuple[dict, Path]:
    """(env, report): the environment of a training process that kills itself at ``point``
    of ``step``, and where it writes what it saw at that moment."""
    hook = root / "fault_hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    report = root / f"fault-{point}-{step}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]),
           "HER2JAX_FAULT": f"{point}:{step}:{report}", "HER2JAX_FAULT_WORKDIR": str(workdir)}
    return env, report


def _run_until_killed(workdir: Path, data_dir: Path, env: dict) -> None:
    process = _her2jax(workdir, data_dir, env=env, wait=False)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == -signal.SIGKILL, f"not killed: {stderr[-3000:]}"


def _steps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _logged_steps(workdir: Path) -> dict[str, list[int]]:
    records = logger.read_metrics(workdir)
    return {split: [r["step"] for r in records if r["split"] == split]
            for split in ("train", "val")}


def _assert_bitwise_equal(a: Path, b: Path) -> None:
    for x, y in zip(jax.tree.leaves(_final_params(a)), jax.tree.leaves(_final_params(b)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------- SIGKILL and SIGTERM


def test_sigkill_mid_checkpoint_write_then_mid_validation_resumes_bitwise(
        straight, data_dir, tmp_path):
    """One run killed twice (two processes' worth of startup saved), then completed."""
    workdir = tmp_path / "run"
    latest = workdir / "checkpoints" / "latest"

    # 1. SIGKILL right after save_latest(80) returned, while orbax's background thread
    # writes step 80: at the kill and after it, step 80 is orbax's temporary folder (with
    # files in it), never renamed into a step; step 40 is complete.
    env, report = _fault_env(tmp_path, "save", 80, workdir)
    _run_until_killed(workdir, data_dir, env)
    seen = json.loads(report.read_text())
    assert seen["latest"] == ["40", f"80{TMP_SUFFIX}"] and seen["files_in_tmp"] > 0, seen
    assert _steps(latest) == ["40", f"80{TMP_SUFFIX}"]

    # 2. The restart resumes from 40 (the torn step is cleaned up, not restored) and is
    # SIGKILLed inside validation at step 160, its predictions computed but not yet scored:
    # nothing of step 160 is logged as validated or saved.
    env, report = _fault_env(tmp_path, "validate", 160, workdir)
    _run_until_killed(workdir, data_dir, env)
    seen = json.loads(report.read_text())
    assert set(seen["latest"]) == {"80", "120"} and seen["examples"] > 0, seen
    assert _logged_steps(workdir)["val"] == [80]
    assert set(_steps(latest)) == {"80", "120"}

    # 3. The second restart resumes from 120 and finishes.
    resumed = _her2jax(workdir, data_dir)
    assert "done at step 160" in resumed.stdout
    assert set(_steps(latest)) == {"120", "160"}
    assert not list((workdir / "checkpoints").rglob(f"*{TMP_SUFFIX}*"))
    assert _logged_steps(workdir) == _logged_steps(straight)   # each step once
    _assert_bitwise_equal(straight, workdir)


def _poisoned(monkeypatch, at: int, poison) -> None:
    """Makes the training step call ``poison(state, metrics)`` from step ``at`` on."""
    make_train_step = step_lib.make_train_step

    def make(*args, **kwargs):
        train_step = make_train_step(*args, **kwargs)

        def step(state, batch):
            state, metrics = train_step(state, batch)
            if int(state.step) >= at:
                state, metrics = poison(state, metrics)
            return state, metrics

        return step

    monkeypatch.setattr(step_lib, "make_train_step", make)


def test_sigterm_saves_the_step_it_stops_at(data_dir, tmp_path, monkeypatch):
    def sigterm(state, metrics):   # a real signal to this process, inside step 8
        os.kill(os.getpid(), signal.SIGTERM)
        return state, metrics

    _poisoned(monkeypatch, 8, sigterm)
    workdir = tmp_path / "run"
    result = loop.train(small_config(data_dir), workdir, progress=False)
    # What the command line prints as "preempted at step 8": saved off the interval of 6.
    assert (result.stopped, result.steps) == ("preempted", 8)
    assert _steps(workdir / "checkpoints" / "latest") == ["6", "8"]
    assert inference.load_trained(workdir, which="latest").step == 8


# ---------------------------------------------------------------- a diverging loss


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        data_dir, tmp_path, monkeypatch):
    def diverge(state, metrics):   # the update of step 7 blows up, and all after it
        return (state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params)),
                {**metrics, "loss": metrics["loss"] * jnp.nan})

    _poisoned(monkeypatch, 7, diverge)
    workdir = tmp_path / "run"
    # Logged (and checked) every 3 steps, saved every 6: step 9 is the first check after it.
    with pytest.raises(Her2jaxError, match=r"training diverged: loss is nan at step 9; the last "
                                           r"good checkpoint is intact"):
        loop.train(small_config(data_dir), workdir, progress=False)
    # At once (no waiting here): step 6's background save was finished, not left half-written.
    assert _steps(workdir / "checkpoints" / "latest") == ["6"]
    assert _steps(workdir / "checkpoints" / "best") == ["6"]
    assert _logged_steps(workdir) == {"train": [3, 6], "val": [6]}
    restored = inference.load_trained(workdir, which="latest")
    assert restored.step == 6
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state.params))


# ---------------------------------------------------------------- a full or read-only disk


def _pages(folder: Path) -> int:
    """Bytes ``folder``'s files take on a tmpfs (whole 4 KiB pages)."""
    return sum(math.ceil(p.stat().st_size / 4096) * 4096 for p in folder.rglob("*")
               if p.is_file())


DISK_ARGS = ["--config.train.steps=8", "--config.train.save_every=4",
             "--config.train.eval_every=8", "--config.train.warmup_steps=2"]


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_a_full_disk_then_a_read_only_one_are_clear_errors_and_step_4_survives(
        straight, data_dir, tmpfs):
    # Room for the run's small files and one checkpoint and a half: step 4 fits, step 8
    # (latest and best, three checkpoints in all) does not.
    checkpoint_bytes = max(_pages(p) for p in (straight / "checkpoints").glob("*/*")
                           if p.name.isdigit())
    mount = tmpfs(64 * 1024 + int(1.5 * checkpoint_bytes))
    workdir = mount / "run"
    full = subprocess.run(
        [sys.executable, "-m", "her2jax.main", f"--workdir={workdir}", *RESUME_ARGS,
         f"--config.data.data_dir={data_dir}", *DISK_ARGS],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    line = _one_line_error(full)
    assert re.fullmatch(rf"main\.py: error: {re.escape(str(workdir))}/checkpoints/(latest|best):"
                        r" cannot write checkpoint step 8: No space left on device \(the "
                        r"earlier steps are intact\)", line), line
    # Step 4 is the only complete step. (Step 8's temporary folder is removed to free the
    # disk, but a write orbax abandoned may recreate some of it: seen in 2 runs of 6.)
    assert [s for s in _steps(workdir / "checkpoints" / "latest") if s.isdigit()] == ["4"]
    assert [s for s in _steps(workdir / "checkpoints" / "best") if s.isdigit()] == []
    assert _logged_steps(workdir)["val"] == [8]   # the logs were written up to the failure

    # The same workdir read-only (remounted while no process has a file open): resuming it
    # stops at its first write, the run's lock, before anything is restored or logged.
    # (In-process: the command line's one-line form of a Her2jaxError is shown above.)
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
    config = ml_collections.ConfigDict(workdir_lib.read(workdir)["config"])
    with pytest.raises(Her2jaxError) as error:
        loop.train(config, workdir, progress=False)
    assert str(error.value) == (f"{workdir}: cannot write its lock .her2jax.lock: Read-only "
                                "file system")
    assert inference.load_trained(workdir, which="latest").step == 4   # read-only: still restores


def test_a_background_write_failure_surfaces_at_the_next_save_naming_its_step(
        tmp_path, tmpfs):
    state = make_state(0)
    with checkpoint.Checkpoints(tmp_path / "measure", save_every=1) as measure:
        measure.save_latest(1, state, config={})
    one = _pages(tmp_path / "measure" / "checkpoints" / "latest" / "1")

    mount = tmpfs(64 * 1024 + int(1.5 * one))   # step 1 fits, step 2 does not
    ckpts = checkpoint.Checkpoints(mount / "run", save_every=1)
    assert ckpts.save_latest(1, state.replace(step=1), config={})
    ckpts.wait_until_finished()
    # orbax writes the arrays in the background: starting step 2 succeeds...
    assert ckpts.save_latest(2, state.replace(step=2), config={})
    # ...and its failure is raised by the next save, as step 2's, not step 3's.
    with pytest.raises(Her2jaxError) as error:
        ckpts.save_latest(3, state.replace(step=3), config={})
    assert str(error.value) == (f"{mount / 'run' / 'checkpoints' / 'latest'}: cannot write "
                                "checkpoint step 2: No space left on device (the earlier "
                                "steps are intact)")
    ckpts.close()   # the failure was raised once; nothing left to raise
    assert ckpts.latest_step() == 1
    restored = checkpoint.Checkpoints(mount / "run", save_every=1)
    assert int(restored.restore_latest(checkpoint.abstract_like(state)).step) == 1
    restored.close()


def test_a_read_only_workdir_fails_before_training(data_dir, tmpfs):
    mount = tmpfs(1024 * 1024, "ro")
    with pytest.raises(Her2jaxError, match=re.escape(
            f"{mount / 'run'}: cannot write its lock .her2jax.lock: Read-only file system")):
        loop.train(small_config(data_dir), mount / "run", progress=False)
    with pytest.raises(Her2jaxError, match=re.escape(
            f"{mount / 'w' / 'checkpoints'}: cannot create the checkpoint folders: Read-only "
            "file system")):
        checkpoint.Checkpoints(mount / "w", save_every=1)


def test_a_failed_features_write_leaves_the_previous_file(straight, tmp_path,
                                                          monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(straight, workdir)
    path = inference.extract_features(workdir, splits=["CENTER_A"], which="latest")["CENTER_A"]
    before = path.read_bytes()

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        inference.extract_features(workdir, splits=["CENTER_A"], which="latest")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["CENTER_A.npz"]


# ---------------------------------------------------------------- a killed prepare


def test_a_prepare_killed_midway_leaves_no_dataset_and_a_rerun_completes(
        phantom_cohort, tmp_path):
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort", per_center=4)
    out_dir = tmp_path / "data"
    process = subprocess.Popen(
        [sys.executable, "-m", "her2jax.cli.prepare", f"--cohort={cohort}",
         f"--data_dir={out_dir}", "--workers=1", "--noprogress"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    spooled: list[Path] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not spooled:
        spooled = list(out_dir.glob(".her2jax-prepare-*/spool/*.npz"))
        time.sleep(0.01)
    process.kill()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"finished before the kill: {stderr[-2000:]}"
    # Killed while preprocessing: some cases, not all, were in its hidden spool.
    leftovers = list(out_dir.glob(".her2jax-prepare-*"))
    assert len(leftovers) == 1 and 0 < len(list(leftovers[0].glob("spool/*.npz"))) < 12
    assert tfds_builder.find_datasets(out_dir) == []
    assert not (out_dir / tfds_builder.DATASET_NAME).exists()   # nothing half-visible

    result = prepare.prepare(cohort, out_dir, recipes.data_config(), workers=1,
                             progress=False)
    assert not result.reused and result.num_cases == 12
    assert tfds_builder.find_datasets(out_dir) == [result.dataset_dir]
    assert not list(out_dir.glob(".her2jax-prepare-*"))
