"""``--mode=predict``: a raw NIfTI cohort -> ``predictions.csv``, with nothing but a workdir.

The trained workdir says everything: its ``config.json`` names the preprocessing recipe, the
table's column names and the label scheme, and ``checkpoints/best`` holds the model. No
prepared dataset is needed. Each case goes through ``prepare.crop_case``, the very code
her2jax-prepare runs, so a case gets the same float16 crop (and the same probabilities) here
as in a prepared dataset.

Order of work:

1. restore the workdir's model (a bad workdir fails before the cohort is read);
2. read and validate the cohort with the workdir's column names; labels are optional (a case
   whose label cannot be derived under the scheme gets an empty label), unknown label values
   follow ``cohort.py``'s rules (the case is invalid);
3. crop case after case and predict a global batch as soon as one is full, so memory holds
   one batch of crops, not the cohort. Without ``skip_invalid`` the first invalid case stops
   the run, before anything is written; with it, invalid cases are left out and listed in
   ``rejected.csv``;
4. process 0 writes ``predictions.csv`` (every valid case, patient_id order), ``metrics.json``
   when the labelled cases cover at least two classes, and (with ``skip_invalid``)
   ``rejected.csv``. Every file is written atomically.

Every process reads and crops every case, so all processes agree on which cases are valid
without communicating; each feeds only its own rows of each global batch.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import jax
import numpy as np
from absl import logging

from her2jax import fileio
from her2jax import labels as labels_lib
from her2jax.data import cohort as cohort_lib
from her2jax.data import pipeline, prepare, preprocess
from her2jax.data.recipes import plain
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files, metrics
from her2jax.train import inference

PREDICT_DIR = "predict"
PREDICTIONS_FILE = "predictions.csv"
METRICS_FILE = "metrics.json"
REJECTED_FILE = "rejected.csv"
_REJECTED_COLUMNS = ("patient_id", "file", "reason")


def predict_cohort(workdir, cohort_path, *, out=None, which: str = "best",
                   skip_invalid: bool = False, batch_size: int | None = None,
                   n_boot: int = 2000, tta: bool = False,
                   predictor: inference.Predictor | None = None) -> Path:
    """Predicts every case of a raw cohort with a trained workdir's model.

    Args:
      workdir: a trained workdir (``config.json`` + ``checkpoints/``); nothing else is read
        from the training run (no prepared dataset, no data_dir).
      cohort_path: a MAMA-MIA-layout folder, a manifest CSV or folder, or a clinical
        ``.xlsx`` beside ``images/`` (see ``cohort.read_cohort``), read with the workdir's
        ``data.columns``, ``clinical_sheet`` and ``allow_outside_root``.
      out: the folder to write into (default ``<workdir>/predict/<cohort folder name>``).
      which: the checkpoint, 'best' or 'latest'.
      skip_invalid: predict the valid cases and list the invalid ones in ``rejected.csv``,
        instead of stopping at the first invalid case.
      batch_size: global batch size (default: the config's ``train.eval_batch_size``);
        rounded up to a multiple of the device count.
      n_boot: bootstrap resamples for the confidence intervals in ``metrics.json``.
      tta: average over the flips the training augmentation drew (``step.tta_views``).
      predictor: the model (default: ``inference.load_predictor(workdir, ...)``; a
        cross-validation workdir passes its fold ensemble, ``cv.load_ensemble``).

    Returns:
      The path of ``predictions.csv`` (columns ``patient_id, center, label, prob_<class>...``
      and the configured clinical columns the table has; ``label`` is empty when the case's
      label cannot be derived).

    Raises:
      Her2jaxError: one line naming the workdir, table, patient or file: an unusable
        workdir or cohort, the first invalid case (without ``skip_invalid``; nothing is then
        written), or no valid case at all.
    """
    workdir = Path(workdir)
    if out is not None:
        check_out_folder(out)
    if predictor is None:
        predictor = inference.load_predictor(workdir, which=which, tta=tta)
    data = predictor.config.data
    recipe = plain(data.recipe)
    preprocess.check_recipe(recipe)
    class_names = labels_lib.CLASS_NAMES[data.scheme]
    cohort = cohort_lib.read_cohort(cohort_path, data.columns,
                                    clinical_sheet=data.clinical_sheet,
                                    allow_outside_root=data.allow_outside_root,
                                    require_labels=False)
    if cohort.rejected and not skip_invalid:
        raise _stop(cohort.rejected[0])
    out = Path(out) if out is not None else workdir / PREDICT_DIR / cohort.root.name

    result = _predict_cases(predictor, cohort.cases, recipe,
                            _batch_size(predictor, batch_size, len(cohort.cases)), skip_invalid)
    rejected = sorted(cohort.rejected + result.rejected,
                      key=lambda r: (r.patient_id, r.file, r.reason))
    if not result.cases:
        first = f"; first: {rejected[0].error()}" if rejected else ""
        raise Her2jaxError(f"no valid case to predict ({len(rejected)} rejected{first})",
                           file=str(cohort.table))

    task_labels = np.array([_label(data.scheme, case) for case in result.cases], np.int64)
    # Patients the model was trained on keep their predictions but leave the metrics
    # (in-sample scores would flatter it); metrics.json names them.
    record = predictor.trained_on
    seen = sorted({c.patient_id for c in result.cases} & record) if record else []
    if seen:
        logging.warning("%d of the cohort's patients were in the model's training split (%s); "
                        "they are predicted but left out of metrics.json", len(seen),
                        ", ".join(seen[:3]) + (" ..." if len(seen) > 3 else ""))
    if jax.process_index() == 0:
        with fileio.new_folders_removed_on_error(*_new_ancestors(out)):
            _write(out, result, task_labels, class_names, _clinical_names(data.columns),
                   rejected if skip_invalid else None,
                   summary_extra={**predictor.info,
                                  "cohort": str(cohort.root), "n_trained_on": len(seen),
                                  "trained_on": seen},
                   n_boot=n_boot, left_out=set(seen))
    return out / PREDICTIONS_FILE


@dataclasses.dataclass
class _Predicted:
    cases: list[cohort_lib.Case]      # the valid cases, in cohort (patient_id) order
    probs: np.ndarray                 # [N, K] float32
    rejected: list[cohort_lib.Rejection]


def _batch_size(predictor: inference.Predictor, requested: int | None, num_cases: int) -> int:
    """A global batch: a multiple of the device count, no larger than the cohort needs.

    One batch shape for the whole cohort (the last batch is padded), so the model compiles
    once; a cohort smaller than a batch gets a batch just large enough for it.
    """
    n = jax.device_count()
    size = inference.eval_batch_size(predictor.config) if requested is None else int(requested)
    if size < 1:
        raise Her2jaxError(f"must be positive, got {size}", key="batch_size")
    size = -(-size // n) * n
    return max(min(size, -(-num_cases // n) * n), n)


def _predict_cases(predictor: inference.Predictor, cases, recipe: dict, batch_size: int,
                   skip_invalid: bool) -> _Predicted:
    """Crops the cases one by one and predicts them a global batch at a time."""
    rows = pipeline.process_rows(batch_size, jax.process_index(), jax.process_count())
    needed = preprocess.required_phases(recipe)
    kept, probs, rejected = [], [], []
    pending: list[np.ndarray] = []   # crops [D, H, W, C] float16 of the batch being filled

    def flush():
        n = len(pending)
        images = np.stack(pending + pending[:1] * (batch_size - n))   # padding repeats row 0
        batch = pipeline.to_global({"image": images[rows]}, predictor.mesh)
        p, _ = predictor.fn(batch["image"])
        probs.append(np.asarray(p)[:n])   # rows n.. are padding
        pending.clear()

    for case in cases:
        try:
            crop = prepare.crop_case(case, recipe, needed)
        except Her2jaxError as e:
            rejection = cohort_lib.Rejection(case.patient_id, e.file or "", e.reason)
            if not skip_invalid:
                raise _stop(rejection) from None
            rejected.append(rejection)
            continue
        kept.append(case)
        pending.append(crop.image)
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    k = len(labels_lib.CLASS_NAMES[predictor.config.data.scheme])
    stacked = np.concatenate(probs) if probs else np.zeros((0, k), np.float32)
    return _Predicted(kept, stacked, rejected)


def _stop(rejection: cohort_lib.Rejection) -> Her2jaxError:
    return Her2jaxError(f"{rejection.reason}; fix the case, or pass --skip_invalid to predict "
                        "the others and list it in rejected.csv",
                        patient=rejection.patient_id or None, file=rejection.file or None)


def _label(scheme: str, case: cohort_lib.Case) -> int:
    label, _ = labels_lib.derive_label(scheme, case.ihc, case.ish, case.her2)
    return -1 if label is None else label


def _new_ancestors(out: Path) -> list[Path]:
    """The outermost folder of ``out`` that does not exist yet (the one a failed write must
    remove), or none."""
    missing = [p for p in (out, *out.parents) if not p.exists()]
    return missing[-1:]


def check_out_folder(out) -> None:
    """Refuses an output folder path that is, or lies under, an existing file (before any
    work, so the run does not end in a FileExistsError after predicting)."""
    path = Path(out)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                what = "is a file" if candidate == path else f"lies under the file {candidate}"
                raise Her2jaxError(f"{what}; --out names the folder predictions.csv is written "
                                   "into", file=str(path))
            return


def _clinical_names(columns) -> list[str]:
    names = columns.get("clinical", ()) or ()
    return [names] if isinstance(names, str) else [str(n) for n in names]


def _write(out: Path, result: _Predicted, task_labels: np.ndarray, class_names, clinical_names,
           rejected, *, summary_extra: dict, n_boot: int, left_out: set = frozenset()) -> None:
    """predictions.csv, metrics.json (two classes labelled or more) and rejected.csv.

    A metrics.json or rejected.csv left by an earlier run that this run does not write is
    removed, so the folder never pairs new predictions with old metrics.
    """
    rows = [dict(case.clinical) for case in result.cases]
    present = [n for n in clinical_names if any(n in row for row in rows)]
    files.write_predictions(
        out / PREDICTIONS_FILE, patient_ids=[c.patient_id for c in result.cases],
        centers=[c.center for c in result.cases], labels=task_labels, probs=result.probs,
        class_names=class_names, clinical={n: [row.get(n, "") for row in rows]
                                           for n in present})
    labelled = task_labels >= 0
    scored = labelled & np.array([c.patient_id not in left_out for c in result.cases], bool)
    if len(np.unique(task_labels[scored])) >= 2:
        summary = metrics.summarize(task_labels[scored], result.probs[scored], class_names,
                                    n_boot=n_boot)
        summary.update(summary_extra, n_unlabelled=int((~labelled).sum()))
        files.write_metrics(out / METRICS_FILE, summary)
    else:
        (out / METRICS_FILE).unlink(missing_ok=True)
    if rejected is not None:
        _write_rejected(out / REJECTED_FILE, rejected)
    else:
        (out / REJECTED_FILE).unlink(missing_ok=True)


def _write_rejected(path: Path, rejected) -> None:
    """rejected.csv (patient_id, file, reason), atomically (temporary file + rename)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(_REJECTED_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(dataclasses.asdict(r) for r in rejected)
    fileio.write_text(path, buffer.getvalue())
