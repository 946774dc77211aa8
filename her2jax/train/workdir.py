"""The workdir's ``config.json``: the resolved config with provenance, and the restart check.

A workdir belongs to one config and one dataset. Restarting it with anything else would mix
two runs in one set of checkpoints, so it is refused naming what changed (``--force``
accepts the change and records it).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import importlib.metadata
import json
import os
import socket
import subprocess
from pathlib import Path

import jax

from her2jax import fileio
from her2jax.errors import Her2jaxError
from her2jax.jsonfile import read_json

CONFIG_FILE = "config.json"
LOCK_FILE = ".her2jax.lock"
TRAINED_ON_FILE = "trained_on.json"
_PACKAGES = ("her2jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
             "tensorflow-datasets", "grain", "array-record", "numpy", "scikit-learn")


# Config values that are paths: spelled differently (a trailing slash, "a//b", "a/./b") they
# still name the same run.
_PATH_KEYS = (("data", "data_dir"), ("model", "pretrained"))


def _normalised(record: dict) -> dict:
    for section, key in _PATH_KEYS:
        value = (record.get(section) or {}).get(key)
        if isinstance(value, str) and value:
            record[section][key] = os.path.normpath(value)
    return record


def config_dict(config) -> dict:
    """The config as plain JSON values (tuples become lists), its paths normalised."""
    return _normalised(json.loads(config.to_json()))


def provenance(dataset_meta: dict) -> dict:
    """Where the run's inputs and code came from."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "dataset": {k: dataset_meta.get(k) for k in
                    ("name", "listing_hash", "recipe_fingerprint", "cohort", "num_cases")},
        "git_commit": _git_commit(),
        "versions": versions,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "processes": jax.process_count(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _defaults() -> dict:
    """Every config key's default (data, model, train sections), as config.json holds them."""
    import ml_collections

    from her2jax.data import recipes
    from her2jax.models import factory
    from her2jax.train import defaults

    return config_dict(ml_collections.ConfigDict(dict(
        data=recipes.data_config(), model=factory.model_config(),
        train=defaults.train_config())))


def _differences(old, new, prefix="", default=None) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        default = default if isinstance(default, dict) else {}
        for key in sorted(set(old) | set(new)):
            if key not in old and key in default and new.get(key) == default[key]:
                # A key added to her2jax after this run was made, at its default (which is
                # what the run had): not a change.
                continue
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.", default.get(key))
        return out
    return [] if old == new else [f"{prefix[:-1]} {old!r} -> {new!r}"]


def claim(workdir: Path, config, dataset_meta: dict, *, force: bool = False) -> dict:
    """Writes ``config.json``, or checks that a restart uses the same config and dataset.

    Returns:
      The config.json content now in force.

    Raises:
      Her2jaxError: the workdir holds a run with another config or dataset (unless force).
    """
    path = Path(workdir) / CONFIG_FILE
    record = {"config": config_dict(config), "provenance": provenance(dataset_meta)}
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise Her2jaxError(f"unreadable ({e})", file=str(path)) from None
        changed = _differences(_normalised(dict(old.get("config", {}))), record["config"],
                               default=_defaults())
        old_data = old.get("provenance", {}).get("dataset", {})
        for key in ("listing_hash", "recipe_fingerprint"):
            if old_data.get(key) != record["provenance"]["dataset"][key]:
                changed.append(f"dataset {key} {old_data.get(key)!r} -> "
                               f"{record['provenance']['dataset'][key]!r}")
        if changed and not force:
            shown = "; ".join(changed[:5]) + (f"; and {len(changed) - 5} more"
                                              if len(changed) > 5 else "")
            raise Her2jaxError(f"holds a run with another config or dataset ({shown}); use a "
                               "new --workdir, or --force to continue with the change",
                               file=str(Path(workdir)))
        if not changed:
            return old
        record["provenance"]["forced_changes"] = changed
    if jax.process_index() == 0:
        fileio.write_json(path, record)
    return record


def read(workdir: Path) -> dict:
    """config.json of a workdir (what eval / predict / features run with)."""
    return read_json(Path(workdir) / CONFIG_FILE, where=workdir,
                     missing="is not a her2jax workdir (no config.json); train first")


@contextlib.contextmanager
def locked(workdir):
    """Holds the workdir for one training run (process 0 of it).

    An exclusive ``flock`` on ``<workdir>/.her2jax.lock``: the kernel releases it however the
    holder ends (a clean exit, an error, SIGKILL, a crash), so a dead run never leaves a
    stale lock behind, and a second run into the same workdir is refused instead of
    interleaving its checkpoints and metrics.jsonl with the first's. The file keeps the
    holder's pid, host and start time for the message.

    Raises:
      Her2jaxError: another live process holds the workdir.
    """
    if jax.process_index() != 0:
        yield
        return
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise Her2jaxError(f"is in use by a running her2jax training ({holder}); wait for it "
                               "to end or use another --workdir", file=str(workdir)) from None
        since = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        yield
    finally:
        os.close(fd)   # releases the lock


def record_trained_on(workdir, train_ids, val_ids) -> None:
    """``trained_on.json``: the patients whose labels fitted the model (train) or chose its
    checkpoint (val), so that evaluation and prediction can tell when they meet them again.
    Written atomically by process 0."""
    if jax.process_index() != 0:
        return
    fileio.write_json(Path(workdir) / TRAINED_ON_FILE,
                      {"train": sorted(map(str, train_ids)), "val": sorted(map(str, val_ids))},
                      indent=1)


def trained_on(workdir) -> dict[str, set[str]] | None:
    """``{"train": ids, "val": ids}`` of a workdir (None for a workdir trained before the
    record existed)."""
    path = Path(workdir) / TRAINED_ON_FILE
    if not path.exists():
        return None
    record = read_json(path, where=workdir, missing="")
    return {k: set(record.get(k, [])) for k in ("train", "val")}


def check_no_leak(workdir, split_name: str, patient_ids) -> None:
    """Refuses to score a split holding patients the model was trained on (a changed
    data.seed / val_fraction, a dataset rebuilt from another cohort, a centre both trained
    and tested): its metrics would be in-sample. The train split itself is exempt.

    Raises:
      Her2jaxError: naming the split, the count and the first patients.
    """
    record = trained_on(workdir)
    if record is None or split_name == "train":
        return
    leaked = sorted(set(map(str, patient_ids)) & record["train"])
    if leaked:
        shown = ", ".join(leaked[:3]) + (f" and {len(leaked) - 3} more" if len(leaked) > 3
                                         else "")
        raise Her2jaxError(f"split {split_name} holds {len(leaked)} patient(s) the model was "
                           f"trained on ({shown}); scores on them would be in-sample. Evaluate "
                           "with the training run's data settings, or a cohort without them",
                           file=str(Path(workdir) / TRAINED_ON_FILE))
