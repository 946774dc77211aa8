"""Cross-validation: ``her2jax --mode=cv``, out-of-fold predictions and the fold ensemble.

A CV workdir ``DIR`` holds:

* ``config.json``: the base config, as any workdir's (a rerun with another config or dataset
  is refused unless ``--force``);
* ``cv.json``: how the folds were made: ``{"scheme": "kfold" | "centers" | "file", "folds",
  "seed"}``;
* ``splits.json``: the folds in nnU-Net's ``splits_final.json`` layout, a list with one
  ``{"train": [patient ids], "val": [patient ids]}`` per fold, where ``val`` is the fold's
  held-out patients. Written once and reused; a file the user put there first is used as
  given, after :func:`validate_splits`;
* ``fold_<k>/``: a normal workdir (every mode works on it) trained on fold k's ``train``
  patients (of which a stratified ``data.val_fraction`` chooses the checkpoint, as in any
  run), whose config names fold k's ``val`` patients as ``data.cv_holdout``: its split
  ``oof``. ``fold_<k>/cv_done.json`` marks a finished fold;
* ``cv/oof_predictions.csv`` (every patient of the training centres, predicted by the fold
  model that did not see it; column ``fold``), ``cv/metrics.json`` (pooled, with bootstrap and
  DeLong CIs, plus the mean and SD over folds), ``cv/per_fold.{json,md}``;
* ``eval/<split>/``: the fold ensemble on the held-out (test) centres, calibrated on the
  pooled out-of-fold predictions (``eval/calibration.json``), with the hand-made baseline
  fitted on every patient of the training centres.

The ensemble averages the fold models' *probabilities* (as nnU-Net averages softmax outputs):
the mean of probabilities is itself a probability forecast, the mixture of the members, so it
stays as calibrated as they are and a single over-confident member cannot dominate it, while
averaging logits is a geometric mean that sharpens the forecast the more the members agree.
Its features are the members' concatenated (each model has its own feature space).

Folds run one after another on all devices. A killed CV resumes at the fold (and, through
the fold's own checkpoints, the step) it reached; a fold trained elsewhere (``--fold=k``, e.g.
one SLURM array task per fold) counts as done, and ``--mode=cv`` without ``--fold`` finishes
what is missing and aggregates.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging

from her2jax import fileio
from her2jax.data import pipeline
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files, metrics
from her2jax.jsonfile import read_json
from her2jax.train import inference
from her2jax.train import workdir as workdir_lib

SPLITS_FILE = "splits.json"
CV_FILE = "cv.json"
CV_DIR = "cv"
DONE_FILE = "cv_done.json"
OOF_FILE = "oof_predictions.csv"
SCHEMES = ("kfold", "centers")
DEFAULT_FOLDS = 5
COMBINE = "mean of the fold models' probabilities"
ALL_FOLDS = "all_folds"   # the baseline's training split: every patient of the folds


def is_cv(workdir) -> bool:
    """Whether ``workdir`` is a cross-validation workdir (it has ``cv.json``)."""
    return (Path(workdir) / CV_FILE).is_file()


def fold_dir(workdir, k: int) -> Path:
    return Path(workdir) / f"fold_{k}"


# ---------------------------------------------------------------- the folds


def make_folds(pool: pipeline.Split, *, folds: int, scheme: str, seed: int) -> list[dict]:
    """The folds of the training centres' patients, in ``splits.json``'s layout.

    Args:
      pool: every labelled patient of the training centres (``pipeline.training_pool``).
      folds: how many.
      scheme: 'kfold': patient-level, stratified by class (each class dealt round the folds
        in a seeded random order, so fold sizes differ by at most one and class shares by at
        most one patient); 'centers': whole centres per fold (leave-one-centre-out when
        ``folds`` equals the number of training centres; fewer folds group centres, the
        largest first, each into the fold with the fewest patients).
      seed: the kfold shuffle's seed.

    Returns:
      ``[{"train": sorted ids, "val": sorted ids}, ...]``, one entry per fold.
    """
    ids = np.asarray(pool.patient_ids)
    if scheme == "kfold":
        if not 2 <= folds <= len(ids):
            raise Her2jaxError(f"--folds={folds}: k-fold needs 2 to {len(ids)} folds (the "
                               f"training centres hold {len(ids)} labelled patients)",
                               key="folds")
        rng = np.random.default_rng(seed)
        fold_of = np.empty(len(ids), np.int64)
        dealt = 0
        for c in np.unique(pool.labels):
            members = rng.permutation(np.flatnonzero(pool.labels == c))
            fold_of[members] = (dealt + np.arange(len(members))) % folds
            dealt += len(members)
    elif scheme == "centers":
        centers = np.asarray(pool.centers)
        names = sorted(set(pool.centers))
        if not 2 <= folds <= len(names):
            raise Her2jaxError(f"--folds={folds}: --cv=centers keeps each centre in one fold, "
                               f"so it needs 2 to {len(names)} folds (the training centres are "
                               f"{', '.join(names)})", key="folds")
        sizes = {name: int((centers == name).sum()) for name in names}
        load, fold_of_centre = [0] * folds, {}
        for name in sorted(names, key=lambda n: (-sizes[n], n)):
            k = int(np.argmin(load))
            fold_of_centre[name] = k
            load[k] += sizes[name]
        fold_of = np.array([fold_of_centre[c] for c in centers], np.int64)
    else:
        raise Her2jaxError(f"unknown cross-validation {scheme!r} (expected "
                           f"{' or '.join(SCHEMES)})", key="cv")
    return [{"train": sorted(ids[fold_of != k].tolist()), "val": sorted(ids[fold_of == k].tolist())}
            for k in range(folds)]


def validate_splits(raw, pool: pipeline.Split, path) -> list[dict]:
    """A ``splits.json`` checked against the training centres' patients: a list of at least
    two folds, each ``{"val": ids}`` (``"train"`` optional: when present it must be every
    other patient); every patient in exactly one fold's ``val``; no unknown id.

    Returns:
      The folds with ``train`` filled in, ids sorted.

    Raises:
      Her2jaxError: one line naming the file, the fold and the patient.
    """
    path = str(path)
    if not isinstance(raw, list) or len(raw) < 2:
        raise Her2jaxError("must be a JSON list of at least two folds, each "
                           '{"train": [patient ids], "val": [patient ids]} (nnU-Net\'s '
                           "splits_final.json layout)", file=path)
    known = set(pool.patient_ids)
    owner: dict[str, int] = {}
    out = []
    for k, fold in enumerate(raw):
        if not isinstance(fold, dict) or "val" not in fold:
            raise Her2jaxError(f"fold {k} is not an object with a \"val\" list", file=path)
        lists = {}
        for key in ("train", "val"):
            value = fold.get(key)
            if value is None:
                continue
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise Her2jaxError(f"fold {k}: \"{key}\" must be a list of patient ids (strings)",
                                   file=path)
            repeated = sorted({x for x in value if value.count(x) > 1})
            if repeated:
                raise Her2jaxError(f"fold {k}: listed twice in \"{key}\"", patient=repeated[0],
                                   file=path)
            unknown = sorted(set(value) - known)
            if unknown:
                raise Her2jaxError(f"fold {k}: not a labelled patient of the training centres "
                                   f"({len(unknown)} such id(s) in \"{key}\")",
                                   patient=unknown[0], file=path)
            lists[key] = set(value)
        val = lists["val"]
        if not val:
            raise Her2jaxError(f"fold {k} holds out no patient (\"val\" is empty)", file=path)
        for pid in sorted(val):
            if pid in owner:
                raise Her2jaxError(f"in the \"val\" of folds {owner[pid]} and {k}; every "
                                   "patient is held out by exactly one fold", patient=pid,
                                   file=path)
            owner[pid] = k
        train = known - val
        if "train" in lists and lists["train"] != train:
            both = sorted(lists["train"] & val)
            if both:
                raise Her2jaxError(f"fold {k}: in both \"train\" and \"val\"", patient=both[0],
                                   file=path)
            missing = sorted(train - lists["train"])
            raise Her2jaxError(f"fold {k}: in neither \"train\" nor \"val\"", patient=missing[0],
                               file=path)
        out.append({"train": sorted(train), "val": sorted(val)})
    missing = sorted(known - set(owner))
    if missing:
        raise Her2jaxError(f"in no fold's \"val\" ({len(missing)} patient(s) of the training "
                           "centres are never held out)", patient=missing[0], file=path)
    return out


def read_splits(workdir, pool: pipeline.Split) -> list[dict]:
    path = Path(workdir) / SPLITS_FILE
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise Her2jaxError(f"is not valid JSON ({e.msg} at line {e.lineno})",
                           file=str(path)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise Her2jaxError(f"unreadable ({e})", file=str(path)) from None
    return validate_splits(raw, pool, path)


def fold_config(config, k: int, fold: dict) -> ml_collections.ConfigDict:
    """The base config for fold ``k``: its held-out patients as ``data.cv_holdout``."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.data.cv_fold = k
        config.data.cv_holdout = tuple(fold["val"])
    return config


# ---------------------------------------------------------------- the run


def _settings(workdir: Path, folds: int | None, scheme: str | None, seed: int) -> dict:
    """cv.json's content now in force: the stored one (flags must agree with it), a
    user-written splits.json's, or the flags' (defaults kfold, 5 folds)."""
    path = workdir / CV_FILE
    if path.exists():
        stored = read_json(path, where=workdir, missing="")
        for name, given in (("folds", folds), ("scheme", scheme)):
            if given is not None and given != stored.get(name):
                flag = "--folds" if name == "folds" else "--cv"
                raise Her2jaxError(f"holds a cross-validation with {name} {stored.get(name)!r}; "
                                   f"{flag}={given} would change it (use a new --workdir)",
                                   file=str(workdir))
        return stored
    if (workdir / SPLITS_FILE).exists():
        return {"scheme": "file", "folds": None, "seed": None}
    return {"scheme": scheme or "kfold", "folds": folds, "seed": seed}


def prepare(config, workdir, *, folds: int | None = None, scheme: str | None = None,
            force: bool = False) -> tuple[list[dict], dict]:
    """Claims the CV workdir for ``config`` and fixes its folds (``splits.json``, ``cv.json``),
    or reads them back on a rerun. Returns (folds, cv.json)."""
    workdir = Path(workdir)
    from her2jax.train import checks

    checks.check_run_config(config)
    dataset = pipeline.open_dataset(config.data.data_dir, config.data)
    pool = pipeline.training_pool(dataset, config.data)
    if config.data.get("cv_holdout", ()):
        raise Her2jaxError("is set by --mode=cv for each fold; leave it empty in the config",
                           key="data.cv_holdout")
    with workdir_lib.locked(workdir):
        settings = _settings(workdir, folds, scheme, int(config.data.seed))
        workdir_lib.claim(workdir, config, dataset.meta, force=force)
        if (workdir / SPLITS_FILE).exists():
            splits = read_splits(workdir, pool)
        else:
            n = settings["folds"]
            if n is None:
                n = (len(set(pool.centers)) if settings["scheme"] == "centers"
                     else DEFAULT_FOLDS)
            splits = make_folds(pool, folds=n, scheme=settings["scheme"],
                                seed=settings["seed"])
            if jax.process_index() == 0:
                fileio.write_json(workdir / SPLITS_FILE, splits, indent=1)
        if settings["folds"] is not None and settings["folds"] != len(splits):
            raise Her2jaxError(f"holds {len(splits)} folds where the cross-validation started "
                               f"with {settings['folds']} ({CV_FILE}); it changed after the "
                               "folds were trained (use a new --workdir)",
                               file=str(workdir / SPLITS_FILE))
        settings["folds"] = len(splits)
        if jax.process_index() == 0 and not (workdir / CV_FILE).exists():
            fileio.write_json(workdir / CV_FILE, settings)
    return splits, settings


def is_done(workdir, k: int) -> bool:
    return (fold_dir(workdir, k) / DONE_FILE).is_file()


def run(config, workdir, *, folds: int | None = None, scheme: str | None = None,
        only_fold: int | None = None, force: bool = False, n_boot: int = 2000,
        progress: bool = True, tta: bool = False) -> dict:
    """Trains every fold not yet done (or only ``only_fold``), then, once all are done,
    writes the out-of-fold files and the ensemble's evaluation.

    Returns:
      ``{"folds", "done": [k...], "stopped": None | "preempted" | "interrupted",
      "oof": cv/metrics.json content or None, "ensemble": {split: summary}}``.
    """
    from her2jax.train import loop, pca_lr

    workdir = Path(workdir)
    splits, settings = prepare(config, workdir, folds=folds, scheme=scheme, force=force)
    _sync("her2jax_cv_prepared")   # splits.json and cv.json written (process 0) before use
    todo = range(len(splits)) if only_fold is None else [only_fold]
    if only_fold is not None and not 0 <= only_fold < len(splits):
        raise Her2jaxError(f"--fold={only_fold}: this cross-validation has folds 0 to "
                           f"{len(splits) - 1}", file=str(workdir))
    result = {"folds": len(splits), "done": [], "stopped": None, "oof": None, "ensemble": {}}
    for k in todo:
        if is_done(workdir, k):
            continue
        logging.info("cross-validation fold %d of %d: %d patients held out", k,
                     len(splits), len(splits[k]["val"]))
        conf = fold_config(config, k, splits[k])
        if config.train.protocol == pca_lr.PROTOCOL:
            pca_lr.fit(conf, fold_dir(workdir, k), force=force, n_boot=0, progress=False)
            done = {"protocol": pca_lr.PROTOCOL}
        else:
            trained = loop.train(conf, fold_dir(workdir, k), force=force, progress=progress)
            if trained.stopped in ("preempted", "interrupted"):
                result["stopped"] = trained.stopped
                result["at"] = {"fold": k, "step": trained.steps}
                return result
            done = {"stopped": trained.stopped, "steps": trained.steps,
                    "best_step": trained.best_step, "select_by": trained.select_by}
        if jax.process_index() == 0:
            fileio.write_json(fold_dir(workdir, k) / DONE_FILE, done)
        _sync(f"her2jax_cv_fold_{k}_done")   # every process sees the marker before reading it
    result["done"] = [k for k in range(len(splits)) if is_done(workdir, k)]
    if len(result["done"]) < len(splits):
        return result
    result["oof"] = write_oof(workdir, n_boot=n_boot, tta=tta)
    _sync("her2jax_cv_oof_written")
    if config.data.test_centers:
        result["ensemble"] = evaluate(workdir, n_boot=n_boot, tta=tta)
    return result


def _sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------- out of fold


def _base_config(workdir, data_dir: str | None) -> ml_collections.ConfigDict:
    """The CV workdir's base config (``data_dir``: where the dataset is now)."""
    config = ml_collections.ConfigDict(workdir_lib.read(Path(workdir))["config"])
    if data_dir:
        config.data.data_dir = data_dir
    return config


def _folds_done(workdir) -> list[dict]:
    workdir = Path(workdir)
    settings = read_json(workdir / CV_FILE, where=workdir, missing="")
    missing = [k for k in range(settings["folds"]) if not is_done(workdir, k)]
    if missing:
        raise Her2jaxError(f"fold(s) {', '.join(map(str, missing))} of {settings['folds']} are "
                           "not trained yet; run --mode=cv on it to finish them",
                           file=str(workdir))
    return settings


def write_oof(workdir, *, data_dir: str | None = None, n_boot: int = 2000,
              tta: bool = False) -> dict:
    """Predicts each fold's held-out patients with that fold's model and writes
    ``cv/oof_predictions.csv``, ``cv/metrics.json`` and ``cv/per_fold.{json,md}``.

    Returns:
      cv/metrics.json's content.
    """
    workdir = Path(workdir)
    settings = _folds_done(workdir)
    config = _base_config(workdir, data_dir)
    dataset = pipeline.open_dataset(config.data.data_dir, config.data)
    class_names = inference.class_names(config)
    clinical_names = list(config.data.columns.clinical)
    parts, rows = [], []
    for k in range(settings["folds"]):
        predictor = inference.load_predictor(fold_dir(workdir, k), data_dir=data_dir, tta=tta)
        split = pipeline.select_splits(dataset, predictor.config.data)[pipeline.OOF]
        probs, _ = predictor.predict_split(dataset, split)
        clinical = pipeline.clinical_columns(dataset, split, clinical_names)
        parts.append((k, split, probs, clinical))
        summary = metrics.summarize(split.labels, probs, class_names, n_boot=n_boot)
        summary["loss"] = metrics.balanced_log_loss(split.labels, probs)
        rows.append(_fold_row(k, summary))
    labels = np.concatenate([s.labels for _, s, _, _ in parts])
    probs = np.concatenate([p for _, _, p, _ in parts])
    info = {"scheme": settings["scheme"], "folds": settings["folds"],
            "tta_views": len(inference.tta_views(config, tta))}
    pooled = metrics.summarize(labels, probs, class_names, n_boot=n_boot)
    pooled.update(info, loss=metrics.balanced_log_loss(labels, probs),
                  over_folds=_mean_sd(rows))
    if jax.process_index() == 0:
        out = workdir / CV_DIR
        with fileio.new_folders_removed_on_error(out):
            columns = {"fold": [str(k) for k, s, _, _ in parts for _ in s.patient_ids]}
            for name in clinical_names:
                if all(name in c for _, _, _, c in parts):
                    columns[name] = [v for _, _, _, c in parts for v in c[name]]
            files.write_predictions(
                out / OOF_FILE, patient_ids=[p for _, s, _, _ in parts for p in s.patient_ids],
                centers=[c for _, s, _, _ in parts for c in s.centers], labels=labels,
                probs=probs, class_names=class_names, clinical=columns)
            files.write_metrics(out / "metrics.json", pooled)
            files.write_metrics(out / "per_fold.json", {**info, "rows": rows,
                                                        "over_folds": pooled["over_folds"]})
            files.write_text(out / "per_fold.md", _per_fold_markdown(rows, pooled))
    return pooled


_ROW_METRICS = ("macro_auc", "micro_auc", "accuracy", "balanced_accuracy", "loss")


def _fold_row(k: int, summary: dict) -> dict:
    return {"fold": k, "n": summary["n"], "class_counts": summary["class_counts"],
            "macro_auc": summary["macro_auc"], "micro_auc": summary["micro_auc"],
            "accuracy": summary["accuracy"], "balanced_accuracy": summary["balanced_accuracy"],
            "loss": summary["loss"]}


def _value(entry):
    return entry.get("value") if isinstance(entry, dict) else entry


def _mean_sd(rows: list[dict]) -> dict:
    """Mean and SD (n - 1) over the folds of each metric (folds where it is undefined left
    out; ``n`` says how many counted)."""
    out = {}
    for name in _ROW_METRICS:
        values = [v for v in (_value(r[name]) for r in rows) if v is not None]
        out[name] = {"mean": float(np.mean(values)) if values else None,
                     "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                     "n": len(values)}
    return out


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _per_fold_markdown(rows: list[dict], pooled: dict) -> str:
    """per_fold.md: one row per fold, the mean ± SD over folds, and the pooled row."""
    def auc(entry) -> str:
        return metrics.format_auc(entry).replace(" (95% CI ", " (") if entry else "n/a"

    lines = ["| fold | n | macro AUC (95% CI) | micro AUC (95% CI) | accuracy | "
             "balanced accuracy | loss |", "|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['fold']} | {r['n']} | {auc(r['macro_auc'])} | {auc(r['micro_auc'])} "
                     f"| {_fmt(r['accuracy'])} | {_fmt(r['balanced_accuracy'])} "
                     f"| {_fmt(r['loss'])} |")
    sd = pooled["over_folds"]
    cells = [f"{_fmt(sd[key]['mean'])} ± {_fmt(sd[key]['sd'])}" for key in _ROW_METRICS]
    lines.append(f"| mean ± SD | {sum(r['n'] for r in rows)} | " + " | ".join(cells) + " |")
    lines.append(f"| pooled | {pooled['n']} | {auc(pooled['macro_auc'])} | "
                 f"{auc(pooled['micro_auc'])} | {_fmt(pooled['accuracy'])} | "
                 f"{_fmt(pooled['balanced_accuracy'])} | {_fmt(pooled['loss'])} |")
    return "\n".join(lines) + "\n"


def read_oof(workdir, dataset: pipeline.Dataset, config) -> tuple[pipeline.Split, np.ndarray]:
    """The pooled out-of-fold predictions as (a split of the training pool in the file's
    order, probs [N, K])."""
    path = Path(workdir) / CV_DIR / OOF_FILE
    if not path.exists():
        raise Her2jaxError("has no out-of-fold predictions yet; run --mode=cv on it first",
                           file=str(path))
    frame = files.read_predictions(path)
    pool = pipeline.training_pool(dataset, config.data)
    row_of = {pid: i for i, pid in enumerate(pool.patient_ids)}
    ids = [str(p) for p in frame["patient_id"]]
    unknown = [p for p in ids if p not in row_of]
    if unknown or len(ids) != len(pool):
        raise Her2jaxError("does not match the training centres' patients of the dataset "
                           "(run --mode=cv again to rewrite it)", file=str(path))
    rows = np.array([row_of[p] for p in ids], np.int64)
    split = pipeline.subset(pool, rows, pipeline.OOF)
    _, probs, _ = files.prediction_arrays(frame)
    return split, np.asarray(probs, np.float64)


# ---------------------------------------------------------------- the ensemble


def load_ensemble(workdir, *, which: str = "best", data_dir: str | None = None,
                  tta: bool = False) -> tuple[inference.Predictor, list[inference.Predictor]]:
    """The fold models of a CV workdir as one :class:`inference.Predictor` (the mean of their
    probabilities, their features concatenated; ``trained_on`` is every patient whose label
    any of them used, to train or to choose a checkpoint), and the members themselves."""
    workdir = Path(workdir)
    settings = _folds_done(workdir)
    config = _base_config(workdir, data_dir)
    members = [inference.load_predictor(fold_dir(workdir, k), which=which, data_dir=data_dir,
                                        tta=tta) for k in range(settings["folds"])]

    def fn(image):
        outputs = [m.fn(image) for m in members]
        probs = np.mean([np.asarray(p, np.float64) for p, _ in outputs], axis=0)
        return probs, np.concatenate([np.asarray(f) for _, f in outputs], axis=1)

    # A patient of the folds fitted some members' weights or chose their checkpoints.
    seen = set()
    for k in range(settings["folds"]):
        record = workdir_lib.trained_on(fold_dir(workdir, k)) or {}
        seen |= record.get("train", set()) | record.get("val", set())
    info = {"checkpoint": which, "tta_views": members[0].info["tta_views"],
            "ensemble": {"members": len(members), "combine": COMBINE,
                         "steps": [m.info["step"] for m in members]}}
    return inference.Predictor(config, members[0].mesh, fn, info, seen), members


def evaluate(workdir, *, splits=(), which: str = "best", data_dir: str | None = None,
             n_boot: int = 2000, progress: bool = False, tta: bool = False) -> dict[str, dict]:
    """The fold ensemble on the named splits (default: every test centre): ``eval/<split>/``
    as a workdir's eval writes it, each ``metrics.json`` with the members' own macro AUCs; the
    calibration is fitted on the pooled out-of-fold predictions and the hand-made baseline on
    every patient of the training centres. Splits holding a patient any fold trained on are
    refused (in-sample)."""
    workdir = Path(workdir)
    ensemble, members = load_ensemble(workdir, which=which, data_dir=data_dir, tta=tta)
    config = ensemble.config
    dataset = pipeline.open_dataset(config.data.data_dir, config.data)
    named = pipeline.named_splits(dataset, config.data, splits or _test_split_names(dataset,
                                                                                    config))
    for name, split in named.items():
        leaked = sorted(set(split.patient_ids) & ensemble.trained_on)
        if leaked:
            raise Her2jaxError(f"split {name} holds {len(leaked)} patient(s) the fold models "
                               f"trained on ({', '.join(leaked[:3])}); the ensemble is scored "
                               "on centres outside the cross-validation, its folds out of "
                               "fold in cv/", file=str(workdir))
    if not named:
        raise Her2jaxError("has no test centre to evaluate the ensemble on (data.test_centers "
                           "is empty); name centres with --splits", file=str(workdir))
    # The calibration is fitted on cv/'s out-of-fold predictions, as --mode=cv made them
    # (with its --tta or without).
    oof_split, oof_probs = read_oof(workdir, dataset, config)
    oof_summary = metrics.summarize(oof_split.labels, oof_probs, oof_split.class_names,
                                    n_boot=n_boot)
    made = files.read_metrics(Path(workdir) / CV_DIR / "metrics.json")
    oof_summary.update({k: made.get(k) for k in ("scheme", "folds", "tta_views")})
    outputs = {pipeline.OOF: (oof_split, oof_probs, oof_summary)}
    for name, split in named.items():
        member_probs = [m.predict_split(dataset, split)[0] for m in members]
        probs = np.mean(member_probs, axis=0)
        summary = metrics.summarize(split.labels, probs, split.class_names, n_boot=n_boot,
                                    progress=name if progress else None)
        summary.update(ensemble.info)
        summary["members"] = [
            {"fold": k, "macro_auc": metrics.summarize(split.labels, p, split.class_names,
                                                       n_boot=0)["macro_auc"]["value"]}
            for k, p in enumerate(member_probs)]
        outputs[name] = (split, probs, summary)
    with fileio.new_folders_removed_on_error(workdir / "eval"):
        inference.write_eval(workdir, dataset, config, outputs, n_boot=n_boot,
                             calibrate_on=pipeline.OOF,
                             baseline_train=dataclasses.replace(
                                 pipeline.training_pool(dataset, config.data), name=ALL_FOLDS))
    return {name: summary for name, (_, _, summary) in outputs.items()
            if name != pipeline.OOF}


def _test_split_names(dataset: pipeline.Dataset, config) -> list[str]:
    return [name for name in pipeline.select_splits(dataset, config.data)
            if name.startswith("test")]


def extract_features(workdir, *, splits=(), which: str = "best", data_dir: str | None = None,
                     tta: bool = False) -> dict[str, Path]:
    """``features/<split>.npz`` of the fold ensemble (the members' features concatenated,
    the ensemble's probabilities)."""
    ensemble, _ = load_ensemble(workdir, which=which, data_dir=data_dir, tta=tta)
    return inference.write_features(Path(workdir), ensemble, splits=splits)
