"""``report.html``: one self-contained page with everything a workdir holds about its run.

``write_report(workdir)`` reads what train, eval and analyze wrote and renders it:

1. run summary (model, evaluated checkpoint and step, dates, training log);
1b. training: how the evaluated checkpoint was chosen (``train.select_by``, the validation
   cases, the step) and the training curves of ``metrics.jsonl`` (:func:`read_curves`);
2. cohort: patients per split, centre and class (from the prepared dataset; from the evaluated
   splits' predictions.csv when the dataset is not reachable);
3. results per evaluated split: the study's headline AUCs with 95% CIs (beside them the
   hand-made kinetic baseline's macro AUC, when eval wrote ``baseline_metrics.json``),
   per-class and pairwise AUCs, accuracy / balanced accuracy / macro F1 / QWK / Brier / ECE,
   ROC curves and the confusion matrix (figures drawn by :mod:`figures` into
   ``WORKDIR/report_files/``);
4. calibration (``eval/calibration.json``), per-centre and subgroup tables;
5. embeddings, feature-space SHAP and image-space SHAP (``analysis/summary.json``);
6. the config and software versions.

Every part but the evaluation is optional: a part that was not run says so. The page needs no
network and no JavaScript: images are embedded as ``data:image/png;base64`` URIs and the CSS
is inline. Every string read from a file is HTML-escaped. Patient data on the page are limited
to the patient ids of the image-SHAP cases and the values of the config's clinical columns
(subgroup tables); predictions are summarised, never listed.
"""

from __future__ import annotations

import base64
import datetime
import html
import importlib.metadata
import json
import math
import platform
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from her2jax import fileio
from her2jax.analysis import embeddings, figures
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files, metrics

REPORT_FILE = "report.html"
FIGURES_DIR = "report_files"
# The packages whose versions the page lists (besides Python), as installed now; config.json's
# provenance has those of the training run.
PACKAGES = ("her2jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
            "scikit-learn", "shap", "umap-learn", "nibabel", "tensorflow-datasets", "grain",
            "array-record")
EMBEDDING_FILES = ("tsne_class.png", "tsne_center.png", "umap_class.png", "umap_center.png")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NOT_RUN = "not run"


def esc(value) -> str:
    """Any value as HTML-escaped text (quotes too, so it is safe in attributes)."""
    return html.escape(str(value), quote=True)


def _number(value, digits: int = 3) -> str:
    if value is None or isinstance(value, bool):
        return "n/a"
    try:
        value = float(value)
    except (TypeError, ValueError):
        return esc(value)
    return f"{value:.{digits}f}" if math.isfinite(value) else "n/a"


def _ci(entry: dict | None) -> str:
    """``0.818–0.847`` of an AUC entry, or n/a."""
    if not entry:
        return "n/a"
    low, high = entry.get("ci_low"), entry.get("ci_high")
    if any(x is None or not math.isfinite(x) for x in (low, high)):
        return "n/a"
    return f"{low:.3f}\u2013{high:.3f}"


def _auc(entry: dict | None) -> str:
    return metrics.format_auc(entry) if entry else "n/a"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _table(header: Sequence[str] | None, rows: Iterable[Sequence], *,
           numeric: Iterable[int] = ()) -> str:
    """An HTML table of escaped text; ``numeric`` columns are right-aligned. Without a header
    the first column labels the rows (a key / value table)."""
    numeric = set(numeric)

    def cells(row, tag):
        out = []
        for i, cell in enumerate(row):
            t = "th" if header is None and i == 0 else tag
            klass = ' class="num"' if i in numeric else ""
            out.append(f"<{t}{klass}>{esc(cell)}</{t}>")
        return "".join(out)

    head = f"<thead><tr>{cells(header, 'th')}</tr></thead>" if header is not None else ""
    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    klass = "" if header is not None else ' class="kv"'
    return f'<div class="tablewrap"><table{klass}>{head}<tbody>{body}</tbody></table></div>'


def _note(text: str, kind: str = "note") -> str:
    return f'<p class="{kind}">{esc(text)}</p>'


def _not_run(what: str, how: str) -> str:
    return f'<p class="notrun"><strong>{NOT_RUN}</strong>: {esc(what)} ({esc(how)}).</p>'


class _Images:
    """Embeds PNG files as data URIs; refuses files outside the workdir and non-PNGs."""

    def __init__(self, workdir: Path):
        self.root = workdir.resolve()

    def figure(self, path: Path, caption: str, *, wide: bool = False) -> str:
        try:
            resolved = Path(path).resolve()
            if not resolved.is_relative_to(self.root):
                raise ValueError("outside the workdir")
            data = resolved.read_bytes()
            if not data.startswith(_PNG_SIGNATURE):
                raise ValueError("not a PNG file")
        except (OSError, ValueError) as e:
            reason = "missing" if isinstance(e, FileNotFoundError) else str(e)
            return _note(f"figure {Path(path).name}: {reason}", "missing")
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        klass = ' class="wide"' if wide else ""
        return (f'<figure{klass}><img src="{uri}" alt="{esc(caption)}">'
                f"<figcaption>{esc(caption)}</figcaption></figure>")


def _gallery(items: Iterable[str]) -> str:
    return f'<div class="gallery">{"".join(items)}</div>'


# ---------------------------------------------------------------- inputs


def _eval_splits(workdir: Path) -> list[str]:
    """The evaluated splits (folders of eval/ with a metrics.json): val, the test splits, others."""
    names = [p.parent.name for p in (workdir / "eval").glob("*/metrics.json")]

    def order(name: str) -> tuple[int, str]:
        return (0 if name == "val" else 1 if name.startswith("test") else 2, name)

    return sorted(names, key=order)


def _optional_json(path: Path) -> tuple[dict | None, str | None]:
    """(content, None), (None, None) when absent, or (None, why it is unreadable)."""
    if not path.exists():
        return None, None
    try:
        return files.read_metrics(path), None
    except Her2jaxError as e:
        return None, str(e)


def _versions_now() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------- sections


def _model_text(config: dict) -> str:
    model, train = config.get("model", {}), config.get("train", {})
    encoder = model.get("encoder", "?")
    if encoder == "vit3d":
        vit = model.get("vit", {})
        text = f"3D ViT ({vit.get('size', '?')}, patch {vit.get('patch_size', '?')})"
    elif encoder == "resnet3d":
        text = f"3D ResNet-{model.get('resnet', {}).get('depth', '?')}"
    elif encoder == "none":
        text = "no encoder"
    else:
        text = str(encoder)
    roi = model.get("roi_pool", {})
    if roi.get("hidden"):
        edges = roi.get("rim_voxels", "?")
        edges = list(edges) if isinstance(edges, list | tuple) else [edges]
        if len(edges) == 1:
            where = f"a {edges[0]}-voxel rim"
        else:
            where = "shells of " + ", ".join(f"{a}-{b}" for a, b in
                                             zip([0, *edges[:-1]], edges, strict=True))
            where += " voxels around it"
        text += (f"{' and' if encoder != 'none' else ':'} tumour-region pooling (voxel "
                 f"features of width {roi['hidden']} inside the mask and on {where})")
    head = model.get("head", {})
    if head.get("hidden"):
        text += f", head with {head['hidden']} hidden units"
    if train.get("freeze_steps"):
        text += (f"; encoder held for the first {train['freeze_steps']} updates (linear probe, "
                 "then fine-tuning)")
    if train.get("ema_decay"):
        text += f"; evaluated with the moving average of its parameters (decay {train['ema_decay']})"
    if train.get("protocol"):
        text += f"; protocol {train['protocol']}"
    if model.get("pretrained"):
        text += f"; initialised from {model['pretrained']}"
    return text


def _training_log(workdir: Path) -> list[tuple[str, str]]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return [("training log", "none (no metrics.jsonl)")]
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill; the others still count
    train = [r for r in records if r.get("split") == "train" and "step" in r]
    val = [r for r in records if r.get("split") == "val"
           and isinstance(r.get("macro_auc"), int | float) and math.isfinite(r["macro_auc"])]
    rows = []
    if train:
        last = train[-1]
        rows.append(("last logged training step",
                     f"{last['step']} (loss {_number(last.get('loss'), 4)})"))
    if val:
        best = max(val, key=lambda r: r["macro_auc"])
        rows.append(("best validation macro AUC during training",
                     f"{_number(best['macro_auc'])} at step {best.get('step', '?')} "
                     f"({len(val)} validations)"))
    return rows or [("training log", "empty")]


def _checkpoint_text(summary: dict) -> str:
    """What made a split's predictions: the checkpoint and step, or the fold ensemble; and
    test-time augmentation when used."""
    ensemble = summary.get("ensemble")
    if ensemble:
        steps = ", ".join(str(x) for x in ensemble.get("steps") or []) or "?"
        text = (f"fold ensemble of {ensemble.get('members', '?')} models "
                f"({ensemble.get('combine', '?')}), {summary.get('checkpoint', '?')} "
                f"checkpoints at steps {steps}")
    elif "folds" in summary:
        text = (f"out of fold: each fold's model on the patients it did not see "
                f"({summary.get('folds')} folds, {summary.get('scheme', '?')})")
    else:
        text = f"{summary.get('checkpoint', '?')} checkpoint, step {summary.get('step', '?')}"
    views = summary.get("tta_views") or 1
    return text + (f"; test-time augmentation over {views} flips" if views > 1 else "")


def _summary_section(workdir: Path, record: dict, evaluated: dict[str, dict]) -> str:
    config, provenance = record.get("config", {}), record.get("provenance", {})
    data = config.get("data", {})
    dataset = provenance.get("dataset") or {}
    checkpoints = sorted({_checkpoint_text(m) for m in evaluated.values()})
    rows = [
        ("workdir", str(workdir.resolve())),
        ("model", _model_text(config)),
        ("task", f"{data.get('scheme', '?')}: "
                 + ", ".join(next(iter(evaluated.values())).get("class_names", []))),
        ("evaluated", "; ".join(checkpoints) + f" ({', '.join(evaluated)})"),
        ("run started", provenance.get("created") or "unknown"),
        ("report written",
         datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")),
        ("git commit", provenance.get("git_commit") or "unknown"),
        ("dataset", f"{dataset.get('name') or '?'} ({dataset.get('num_cases') or '?'} cases, "
                    f"listing hash {str(dataset.get('listing_hash') or '?')[:12]})"),
        ("devices", f"{provenance.get('devices', '?')}, "
                    f"{provenance.get('processes', '?')} process(es)"),
        *_training_log(workdir),
    ]
    return _table(None, rows)


# ---------------------------------------------------------------- training curves, selection

CURVES_FILE = "training_curves.png"
# train.select_by -> how the sentence names the criterion of checkpoints/best.
SELECTION_CRITERIA = {
    "val_loss": "lowest validation loss (class-balanced cross-entropy)",
    "val_macro_auc": "highest validation macro AUC",
}
# What chose checkpoints/best in runs whose config.json predates train.select_by.
LEGACY_SELECT_BY = "val_macro_auc"
PCA_LR = "pca_lr"


def _float_or_nan(value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value) if math.isfinite(value) else math.nan


def read_curves(path) -> dict[str, dict[str, np.ndarray]]:
    """A run's curves from its ``metrics.jsonl``: ``{split: {"step": [R] int64, name: [R]
    float64}}``, one row per logged step, in step order.

    Every value that is a number (or null) in all of a split's records becomes a column, NaN
    where a record lacks it or holds no finite value (the logger writes NaN / Inf as null),
    so a key only some records carry (a validation ``loss`` added to a run halfway) still
    lines up with the steps. A step logged twice keeps its last record (the logger drops a
    resumed run's records after its checkpoint, so this happens only in logs written before
    that rule). Lines that are not a whole JSON record (cut by a kill) are skipped.

    Args:
      path: the metrics.jsonl file.

    Returns:
      The curves; ``{}`` when the file is missing or holds no record.
    """
    by_split: dict[str, dict[int, dict]] = {}
    for record in files.read_log(path):
        step, split = record.get("step"), record.get("split")
        if isinstance(step, int) and not isinstance(step, bool) and isinstance(split, str):
            by_split.setdefault(split, {})[step] = record
    curves = {}
    for split, records in by_split.items():
        steps = sorted(records)
        names = dict.fromkeys(k for s in steps for k in records[s] if k not in ("step", "split"))
        columns = {"step": np.asarray(steps, dtype=np.int64)}
        for name in names:
            values = [records[s].get(name) for s in steps]
            if all(v is None or (isinstance(v, int | float) and not isinstance(v, bool))
                   for v in values):
                columns[name] = np.asarray([_float_or_nan(v) for v in values], dtype=np.float64)
        curves[split] = columns
    return curves


def _evaluated_steps(evaluated: dict[str, dict]) -> list[int]:
    return sorted({m["step"] for m in evaluated.values()
                   if isinstance(m.get("step"), int) and not isinstance(m.get("step"), bool)})


def selection_statement(config: dict, evaluated: dict[str, dict],
                        curves: dict[str, dict[str, np.ndarray]]) -> str:
    """One sentence saying which checkpoint was evaluated and how it was chosen.

    Args:
      config: config.json's ``config`` (``train.select_by``, ``train.steps``,
        ``train.eval_every``, ``train.protocol``).
      evaluated: ``{split: metrics.json}`` (their ``step`` and ``checkpoint``; val's ``n``).
      curves: :func:`read_curves` of the run (counts the validations and the logged steps).

    Returns:
      E.g. "Evaluated checkpoint: step 300 of 300, chosen by lowest validation loss
      (class-balanced cross-entropy) over 6 evaluations (every 50 steps) on 57 validation
      cases."
    """
    train = config.get("train") or {}
    n_val = (evaluated.get("val") or {}).get("n")
    cases = (f"{n_val} validation cases" if n_val is not None
             else "the validation cases (val not evaluated: their number is unknown)")
    if train.get("protocol") == PCA_LR:
        return ("No checkpoint selection: the pca_lr protocol fits its classifier once on the "
                "training split (frozen encoder features, PCA, logistic regression), with no "
                f"training steps; the {cases} play no part in choosing it.")
    steps = _evaluated_steps(evaluated)
    step_text = "step " + (" and ".join(map(str, steps)) if steps else "unknown")
    # The loop's steps count global batches: train.steps updates of grad_accum batches each.
    total = (train["steps"] * (train.get("grad_accum") or 1)
             if isinstance(train.get("steps"), int) else None)
    logged = (curves.get("train") or {}).get("step")
    if total is not None:
        step_text += f" of {total}"
        if logged is not None and len(logged) and logged[-1] < total:
            step_text += f" (training logged up to step {logged[-1]})"
    if len(steps) > 1:
        step_text += " (the splits were evaluated from different checkpoints)"
    select_by = train.get("select_by")
    legacy = select_by is None
    if legacy:
        select_by = LEGACY_SELECT_BY
    legacy_text = (" This run's config.json predates train.select_by: such runs kept the "
                   "highest validation macro AUC." if legacy else "")
    criterion = SELECTION_CRITERIA.get(select_by, f"train.select_by={select_by!r}")
    if {m.get("checkpoint") for m in evaluated.values()} == {"latest"}:
        best = ("the final step (train.select_by='last')" if select_by == "last"
                else f"chosen by {criterion} on the {cases}")
        return (f"Evaluated checkpoint: {step_text}, the latest checkpoint (eval "
                f"--checkpoint=latest), not checkpoints/best ({best}).{legacy_text}")
    if select_by == "last":
        return (f"Evaluated checkpoint: {step_text}, the final step of training "
                f"(train.select_by='last'): no selection, the {cases} were not used to "
                "choose it.")
    n_evals = len((curves.get("val") or {}).get("step", []))
    every = train.get("eval_every")
    every_text = f" (every {every} steps)" if every else ""
    evaluations = (f"{n_evals} evaluation{'s' if n_evals != 1 else ''}{every_text}" if n_evals
                   else f"the evaluations{every_text} (no validation record in metrics.jsonl "
                        "to count them)")
    return (f"Evaluated checkpoint: {step_text}, chosen by {criterion} over {evaluations} on "
            f"{cases}.{legacy_text}")


def _training_section(workdir: Path, record: dict, evaluated: dict[str, dict],
                      images: _Images) -> str:
    """The selection sentence and the training curves (none for pca_lr or without a log)."""
    config = record.get("config") or {}
    curves = read_curves(workdir / "metrics.jsonl")
    parts = [f'<p class="statement">{esc(selection_statement(config, evaluated, curves))}</p>']
    if not curves:
        why = ("the pca_lr protocol takes no training step"
               if (config.get("train") or {}).get("protocol") == PCA_LR
               else "metrics.jsonl holds no record" if (workdir / "metrics.jsonl").exists()
               else "no metrics.jsonl")
        return "".join(parts) + _note(f"No training curves: {why}.")
    from her2jax.labels import CLASS_NAMES

    class_names = (next(iter(evaluated.values())).get("class_names")
                   or CLASS_NAMES.get((config.get("data") or {}).get("scheme")) or ())
    k = max(len(class_names), 2)
    path = workdir / FIGURES_DIR / CURVES_FILE
    figures.plot_training_curves(path, curves, num_classes=k,
                                 checkpoint_steps=_evaluated_steps(evaluated))
    caption = (f"Training curves (metrics.jsonl): loss by step, the training loss being that "
               f"of the logged step's batch (dashed: ln {k}, the loss of a uniform prediction), "
               "and validation macro AUC by step (dashed: 0.5); dash-dot: the evaluated "
               "checkpoint.")
    parts.append(images.figure(path, caption, wide=True))
    return "".join(parts)


CV_WORDS = {"kfold": "patient-level stratified k-fold of the training centres",
            "centers": "whole training centres per fold",
            "file": "the folds of a user-written splits.json"}


def _cv_section(workdir: Path, record: dict, images: _Images) -> str:
    """A cross-validation workdir's folds: how they were made and chosen, each fold's
    out-of-fold metrics with the mean ± SD and the pooled row, and each fold's curves."""
    from her2jax.labels import CLASS_NAMES

    settings, error = _optional_json(workdir / "cv.json")
    per_fold, error2 = _optional_json(workdir / "cv" / "per_fold.json")
    if settings is None or per_fold is None:
        return _not_run(error or error2 or "no cv/per_fold.json", "run --mode=cv to finish it")
    config = record.get("config") or {}
    train = config.get("train") or {}
    data = config.get("data") or {}
    criterion = SELECTION_CRITERIA.get(train.get("select_by", LEGACY_SELECT_BY), "?")
    parts = [f'<p class="statement">{esc(settings.get("folds"))} folds: '
             f'{esc(CV_WORDS.get(settings.get("scheme"), settings.get("scheme")))}'
             + (f" (seed {esc(settings.get('seed'))})" if settings.get("seed") is not None
                else "")
             + ", listed in splits.json. Each fold is a workdir (fold_&lt;k&gt;/) trained on the "
             "other folds' patients; "
             + (esc("the pca_lr protocol fits each fold's PCA and regression on them. ")
                if train.get("protocol") == PCA_LR else
                esc(f"its checkpoint is the {criterion} over evaluations every "
                    f"{train.get('eval_every', '?')} steps on a stratified "
                    f"{data.get('val_fraction', '?')} of them. "))
             + "Below, each fold's model on the patients it held out (out of fold), the mean "
             "± SD over folds, and all folds' held-out patients pooled.</p>"]
    over = per_fold.get("over_folds") or {}
    body = []
    for row in per_fold.get("rows") or []:
        done, _ = _optional_json(workdir / f"fold_{row['fold']}" / "cv_done.json")
        chosen = "" if not done else (f"step {done.get('best_step', '?')} of "
                                      f"{done.get('steps', '?')}" if "steps" in done
                                      else done.get("protocol", ""))
        body.append((row["fold"], row["n"], chosen, _auc(row.get("macro_auc")),
                     _auc(row.get("micro_auc")), _number(row.get("accuracy")),
                     _number(row.get("loss"))))
    body.append(("mean ± SD", sum(r["n"] for r in per_fold.get("rows") or []), "",
                 *(f"{_number((over.get(k) or {}).get('mean'))} ± "
                   f"{_number((over.get(k) or {}).get('sd'))}"
                   for k in ("macro_auc", "micro_auc", "accuracy", "loss"))))
    pooled, _ = _optional_json(workdir / "cv" / "metrics.json")
    if pooled:
        body.append(("pooled", pooled.get("n", "?"), "", _auc(pooled.get("macro_auc")),
                     _auc(pooled.get("micro_auc")), _number(pooled.get("accuracy")),
                     _number(pooled.get("loss"))))
    parts.append(_table(["fold", "held out", "checkpoint", "macro AUC (95% CI)",
                         "micro AUC (95% CI)", "accuracy", "loss"], body,
                        numeric=range(1, 2)))
    k = max(len(CLASS_NAMES.get(data.get("scheme"), ())), 2)
    shown = []
    for row in per_fold.get("rows") or []:
        curves = read_curves(workdir / f"fold_{row['fold']}" / "metrics.jsonl")
        if not curves:
            continue
        path = workdir / FIGURES_DIR / f"fold_{row['fold']}_{CURVES_FILE}"
        figures.plot_training_curves(path, curves, num_classes=k)
        shown.append(images.figure(path, f"fold {row['fold']}: training loss and validation "
                                         "macro AUC by step"))
    if shown:
        parts.append(_gallery(shown))
    return "".join(parts)


def _cohort_from_dataset(config: dict, data_dir: str | None) -> tuple[list[tuple], str]:
    """(rows (split, centre, {class: n}), source text) from the prepared dataset."""
    import ml_collections

    from her2jax import labels as labels_lib
    from her2jax.data import pipeline

    data_config = ml_collections.ConfigDict(config["data"])
    where = data_dir or data_config.data_dir
    dataset = pipeline.open_dataset(where, data_config)
    splits = pipeline.select_splits(dataset, data_config)
    rows = []
    for name, split in splits.items():
        for centre in sorted(set(split.centers)):
            in_centre = np.asarray(split.centers) == centre
            counts = {cls: int(np.sum(split.labels[in_centre] == c))
                      for c, cls in enumerate(split.class_names)}
            rows.append((name, centre, counts))
    unlabelled = sum(labels_lib.derive_label(data_config.scheme, r["ihc"], r["ish"],
                                             r["her2"])[0] is None for r in dataset.index)
    source = (f"From the prepared dataset at {where}: {len(dataset.index)} cases, "
              f"{unlabelled} without a {data_config.scheme} label (left out of the labelled "
              "splits).")
    if data_config.get("permute_train_labels", False):
        source += (" The training and validation labels of this run were permuted (a "
                   "negative control).")
    return rows, source


def _cohort_from_predictions(frames: dict, class_names: Sequence[str]) -> list[tuple]:
    rows = []
    for name, frame in frames.items():
        labelled = frame[frame["label"] != ""]
        for centre in sorted(set(labelled["center"])):
            in_centre = labelled[labelled["center"] == centre]
            rows.append((name, centre, {cls: int(np.sum(in_centre["label"] == cls))
                                        for cls in class_names}))
    return rows


def _cohort_section(record: dict, data_dir: str | None, frames: dict,
                    class_names: Sequence[str]) -> str:
    try:
        rows, source = _cohort_from_dataset(record["config"], data_dir)
    except (Her2jaxError, OSError, KeyError) as e:
        rows = _cohort_from_predictions(frames, class_names)
        source = (f"The prepared dataset is not reachable ({e}); counts of the labelled cases "
                  "in the evaluated splits' predictions.csv (the training split is not shown). "
                  "Pass --data_dir to count from the dataset.")
    return _note(source) + _cohort_table(rows, class_names)


def _cohort_table(rows: list[tuple], class_names: Sequence[str]) -> str:
    body = []
    for split in dict.fromkeys(row[0] for row in rows):   # splits in order of appearance
        mine = [(centre, counts) for name, centre, counts in rows if name == split]
        body += [(split, centre, *counts.values(), sum(counts.values()))
                 for centre, counts in mine]
        if len(mine) > 1:
            total = {cls: sum(counts[cls] for _, counts in mine) for cls in mine[0][1]}
            body.append((split, "all centres", *total.values(), sum(total.values())))
    return _table(["split", "centre", *class_names, "total"], body, numeric=range(2, 99))


def _auc_table(summary: dict) -> str:
    delong = summary.get("per_class_auc_delong") or {}
    rows = [("micro-average", _auc(summary.get("micro_auc")), ""),
            ("macro-average", _auc(summary.get("macro_auc")), "")]
    for name, entry in (summary.get("per_class_auc") or {}).items():
        rows.append((f"{name} vs rest", _auc(entry), _ci(delong.get(name))))
    for name, entry in (summary.get("pairwise_auc") or {}).items():
        rows.append((f"{name} (one-vs-one)", _auc(entry), ""))
    return _table(["AUC", "value (95% CI, bootstrap)", "DeLong 95% CI"], rows)


def _other_metrics(summary: dict) -> str:
    rows = [("accuracy", _number(summary.get("accuracy"))),
            ("balanced accuracy", _number(summary.get("balanced_accuracy"))),
            ("macro F1", _number(summary.get("macro_f1"))),
            ("quadratic weighted kappa", _number(summary.get("quadratic_weighted_kappa"))),
            ("Brier score", _number(summary.get("brier"))),
            ("ECE (10 bins)", _number(summary.get("ece")))]
    return _table(["metric", "value"], rows, numeric=range(1, 99))


def _binary_table(binary: dict) -> str:
    rows = []
    for key, label in (("youden", "Youden"), ("at_sensitivity", "at sensitivity")):
        point = binary.get(key) or {}
        if key == "at_sensitivity" and point.get("target") is not None:
            label = f"at sensitivity >= {point['target']:g}"
        rows.append((label, _number(point.get("threshold")), _number(point.get("sensitivity")),
                     _number(point.get("specificity"))))
    return (_table(["operating point", "threshold", "sensitivity", "specificity"], rows,
                   numeric=range(1, 99))
            + _note("These thresholds are fitted on this split itself (optimistic); the "
                    "calibration section has the thresholds fitted on val."))


BASELINE_LABEL = ("hand-made kinetic baseline (5 features + logistic regression, same "
                  "training patients)")
BASELINE_FILE = "baseline_metrics.json"   # her2jax.train.baseline.METRICS_FILE


def _baseline_line(workdir: Path, name: str, model_n) -> str:
    """The hand-made kinetic baseline's macro AUC on a split, to read beside the model's
    headline; empty when eval wrote no ``eval/<name>/baseline_metrics.json``."""
    baseline, error = _optional_json(workdir / "eval" / name / BASELINE_FILE)
    if error:
        return _note(f"{BASELINE_LABEL}: {error}", "missing")
    if baseline is None:
        return ""
    n = baseline.get("n", "?")
    fewer = (f", {model_n - n} case(s) without defined features left out"
             if isinstance(n, int) and isinstance(model_n, int) and n < model_n else "")
    return ('<p class="baseline">'
            + esc(f"{BASELINE_LABEL}: macro-average AUC {_auc(baseline.get('macro_auc'))} "
                  f"(n = {n}{fewer})") + "</p>")


def _split_section(workdir: Path, name: str, summary: dict, frame, images: _Images) -> str:
    class_names = summary.get("class_names") or []
    counts = summary.get("class_counts") or {}
    parts = [f'<section class="split" id="split-{esc(_slug(name))}"><h3>{esc(name)}</h3>',
             '<p class="headline">'
             + esc(f"macro-average AUC {_auc(summary.get('macro_auc'))}, "
                   f"micro-average AUC {_auc(summary.get('micro_auc'))}") + "</p>",
             _baseline_line(workdir, name, summary.get("n")),
             _note(f"n = {summary.get('n', '?')} labelled cases ("
                   + ", ".join(f"{k} {v}" for k, v in counts.items())
                   + f"); {_checkpoint_text(summary)}.")]
    members = [m.get("macro_auc") for m in summary.get("members") or []]
    if members:
        alone = [m for m in members if m is not None]
        parts.append(_note("The fold models alone: macro AUC " + ", ".join(
            _number(m) for m in members) + (f" (mean {_number(float(np.mean(alone)))})"
                                            if alone else "") + "."))
    boot = summary.get("bootstrap") or {}
    ci_text = (f"95% CIs: {boot.get('method', 'stratified')} bootstrap, "
               f"{boot.get('n_boot', '?')} resamples, seed {boot.get('seed', '?')}"
               + (f" ({boot['note']})" if boot.get("note") else "")
               + "; DeLong intervals are normal intervals on the AUC scale.")
    parts.append('<div class="cols">' + _auc_table(summary) + _other_metrics(summary)
                 + "</div>" + _note(ci_text))
    if summary.get("binary"):
        parts.append(_binary_table(summary["binary"]))
    out_dir = workdir / FIGURES_DIR
    confusion = summary.get("confusion_matrix")
    shown = []
    if frame is not None:
        y, probs, _ = files.prediction_arrays(frame)
        keep = y >= 0
        roc = out_dir / f"{name}_roc.png"
        pairwise = out_dir / f"{name}_pairwise_roc.png"
        figures.plot_roc(roc, y[keep], probs[keep], class_names)
        figures.plot_pairwise_roc(pairwise, y[keep], probs[keep], class_names)
        shown += [images.figure(roc, f"{name}: ROC one-vs-rest with micro- and macro-average"),
                  images.figure(pairwise, f"{name}: pairwise (one-vs-one) ROC")]
    else:
        shown.append(_note(f"ROC curves: no eval/{name}/predictions.csv", "missing"))
    if confusion is not None:
        path = out_dir / f"{name}_confusion.png"
        figures.plot_confusion(path, confusion, class_names)
        shown.append(images.figure(path, f"{name}: confusion matrix (rows true, columns "
                                         "predicted by argmax)"))
    parts.append(_gallery(shown) + "</section>")
    return "".join(parts)


def _calibration_section(workdir: Path, images: _Images) -> str:
    fitted, error = _optional_json(workdir / "eval" / "calibration.json")
    if fitted is None:
        return _not_run("no eval/calibration.json" if error is None else error,
                        "run --mode=eval again with this version")
    parts = [f'<p class="statement">{esc(fitted.get("statement", ""))}</p>']
    rows = [("fitted on", fitted.get("fitted_on") or "nothing"),
            ("validation cases", fitted.get("n_val", "?")),
            ("temperature T", _number(fitted.get("temperature")))]
    threshold = fitted.get("threshold")
    if threshold:
        rows += [("Youden threshold (val)", _number(threshold.get("youden"))),
                 (f"threshold reaching sensitivity {threshold.get('target_sensitivity', '?')} "
                  "(val)", _number(threshold.get("at_sensitivity")))]
    parts.append(_table(None, rows))
    splits = fitted.get("splits") or {}
    if splits:
        header = ["split", "n", "ECE", "ECE calibrated", "Brier", "Brier calibrated"]
        binary = any(e.get("at_val_thresholds") for e in splits.values())
        if binary:
            header += ["Youden sens. / spec.", "high-sens. sens. / spec."]
        body = []
        for name, entry in splits.items():
            row = [name, entry.get("n", ""), _number(entry.get("ece")),
                   _number(entry.get("ece_calibrated")), _number(entry.get("brier")),
                   _number(entry.get("brier_calibrated"))]
            if binary:
                points = entry.get("at_val_thresholds") or {}
                for key in ("youden", "at_sensitivity"):
                    p = points.get(key) or {}
                    row.append(f"{_number(p.get('sensitivity'))} / "
                               f"{_number(p.get('specificity'))}")
            body.append(row)
        parts.append(_table(header, body, numeric=range(1, 99)))
        parts.append(_gallery(
            images.figure(workdir / e["reliability_png"],
                          f"{name}: reliability after temperature scaling")
            for name, e in splits.items() if e.get("reliability_png")))
    return "".join(parts)


def _group_rows(rows: list[dict], class_names: Sequence[str], *, subgroup: bool) -> str:
    def short(entry):  # the "(95% CI ...)" of the header is not repeated in every cell
        return _auc(entry).replace(" (95% CI ", " (")

    header = (["column", "value"] if subgroup else ["centre"]) + [
        "n", "macro AUC (95% CI)", "micro AUC (95% CI)",
        *(f"{c} AUC" for c in class_names), "note"]
    body = []
    for row in rows:
        per_class = row.get("per_class_auc") or {}
        group = [row.get("column", ""), row.get("value", "")] if subgroup else [row.get("group")]
        body.append([*group, row.get("n", ""), short(row.get("macro_auc")),
                     short(row.get("micro_auc")),
                     *(_number((per_class.get(c) or {}).get("value")) for c in class_names),
                     row.get("note") or ""])
    first = 2 if subgroup else 1   # n, then the AUC columns
    per_class = range(first + 3, first + 3 + len(class_names))
    return _table(header, body, numeric=[first, *per_class])


def _centres_section(workdir: Path, class_names: Sequence[str], clinical: Sequence[str]) -> str:
    """Per-centre and subgroup tables; subgroups only of the config's clinical columns (the
    only patient data besides ids the page may show)."""
    parts = ['<h3 id="per-centre">Per centre (external test splits pooled)</h3>']
    centre, error = _optional_json(workdir / "eval" / "per_center.json")
    if centre is None:
        parts.append(_not_run(error or "no eval/per_center.json",
                              "it is written by --mode=eval when a test split is evaluated"))
    else:
        parts.append(_group_rows(centre.get("rows", []), class_names, subgroup=False))
    parts.append('<h3 id="subgroups">Subgroups (clinical columns, test splits pooled)</h3>')
    groups, error = _optional_json(workdir / "eval" / "subgroups.json")
    if groups is None:
        parts.append(_not_run(error or "no eval/subgroups.json",
                              "written by --mode=eval when the predictions carry clinical "
                              "columns"))
    else:
        rows = groups.get("rows", [])
        allowed = [row for row in rows if row.get("column") in set(clinical)]
        parts.append(_group_rows(allowed, class_names, subgroup=True))
        if len(allowed) < len(rows):
            parts.append(_note(f"Left out: {len(rows) - len(allowed)} subgroup row(s) of "
                               "columns that are not the config's clinical columns.", "missing"))
    parts.append(_note("Groups with fewer than 10 labelled cases, or a single class, get no "
                       "AUC; the note says why."))
    return "".join(parts)


def _embeddings_section(workdir: Path, summary: dict | None, images: _Images) -> str:
    part = (summary or {}).get("embeddings")
    if not part:
        return _not_run("no embeddings in analysis/summary.json", "run --mode=analyze")
    parts = []
    if part.get("domain_shift_warning"):
        parts.append('<div class="warning"><strong>Domain shift.</strong> The encoder features '
                     "cluster by acquisition centre more than by HER2 class (silhouette by "
                     f"centre above {embeddings.DOMAIN_SHIFT_SILHOUETTE} and above the "
                     "silhouette by class): the model may have learnt the scanner or site "
                     "rather than the biology.</div>")
    sil = part.get("silhouette") or {}
    parts.append(_table(["silhouette of the standardised features", "value"],
                        [("by HER2 class (labelled cases)", _number(sil.get("by_class"))),
                         ("by centre", _number(sil.get("by_center"))),
                         ("cases", part.get("n", "?"))], numeric=range(1, 99)))
    if part.get("embedding_skipped"):
        parts.append(_note(f"Embeddings not drawn: {part['embedding_skipped']}"))
    names = part.get("files")
    if names is None:  # older summaries did not list their files
        names = [n for n in EMBEDDING_FILES if (workdir / "analysis" / n).exists()]
    parts.append(_gallery(images.figure(workdir / "analysis" / n, n) for n in names))
    return "".join(parts)


def _feature_shap_section(workdir: Path, summary: dict | None, images: _Images) -> str:
    part = (summary or {}).get("shap")
    if not part:
        return _not_run("no feature-space SHAP in analysis/summary.json", "run --mode=analyze")
    parts = [_note(f"{part.get('protocol', '')}; {part.get('explained_cases', '?')} held-out "
                   "cases explained.")]
    components = part.get("components") or []
    variance = part.get("explained_variance_ratio") or []
    mean_abs = part.get("mean_abs") or {}
    body = []
    for i, component in enumerate(components):
        body.append([component, _number(variance[i] if i < len(variance) else None),
                     *(_number(v[i] if i < len(v) else None) for v in mean_abs.values())])
    parts.append('<details><summary>Components: explained variance and mean |SHAP| per class'
                 "</summary>"
                 + _table(["component", "explained variance",
                           *(f"mean |SHAP| {c}" for c in mean_abs)], body, numeric=range(1, 99))
                 + "</details>")
    parts.append(_gallery(images.figure(workdir / "analysis" / n, Path(n).stem)
                          for n in part.get("files", [])))
    return "".join(parts)


def _image_shap_section(workdir: Path, summary: dict | None, images: _Images) -> str:
    part = (summary or {}).get("image_shap")
    if not part:
        note = (summary or {}).get("image_shap_note")
        return (_note(f"Image-space SHAP {note}.") if note else
                _not_run("no image-space SHAP in analysis/summary.json", "run --mode=analyze"))
    grid = part.get("grid")
    grid = " x ".join(map(str, grid)) if isinstance(grid, list) else grid
    parts = [_note(f"Shapley values of supervoxel blocks: {part.get('method', '?')} explainer, "
                   f"baseline {part.get('baseline', '?')}, grid {grid or '?'}"
                   + (f", {part['max_evals']} model evaluations per case"
                      if part.get("max_evals") else "") + ".")]
    cards = []
    for case in part.get("cases", []):
        probability = case.get("probability")
        caption = (f"patient {case.get('patient_id', '?')} ({case.get('center', '?')}, "
                   f"{case.get('split', '?')}): true {case.get('label') or 'unknown'}"
                   + (f", predicted {case['predicted_class']}" if case.get("predicted_class")
                      else "")
                   + f"; SHAP for {case.get('explained_class', '?')}, p = {_number(probability)}"
                   + (f"; {100 * case['fraction_in_tumour']:.0f}% of |attribution| inside the "
                      "tumour mask" if isinstance(case.get("fraction_in_tumour"), int | float)
                      else ""))
        case_files = case.get("files") or {}
        montage = case_files.get("montage")
        figure = (images.figure(workdir / "analysis" / montage, caption, wide=True) if montage
                  else _note(f"{caption}: no montage", "missing"))
        maps = [f"{k}: {v}" for k, v in case_files.items() if k != "montage" and v]
        cards.append(figure + (_note("maps (analysis/): " + "; ".join(maps)) if maps else ""))
    parts.append("".join(cards) or _note("no case explained"))
    return "".join(parts)


def _software_section(record: dict) -> str:
    recorded = (record.get("provenance") or {}).get("versions") or {}
    now = _versions_now()
    names = ["python", *PACKAGES, *sorted(set(recorded) - set(PACKAGES) - {"python"})]
    body = [(n, recorded.get(n) or ("n/a" if n in recorded else "not recorded"),
             now.get(n) or "not installed") for n in names]
    provenance = {k: v for k, v in (record.get("provenance") or {}).items() if k != "versions"}
    return (_table(["package", "training run (config.json)", "this report"], body)
            + "<h3>Provenance</h3><pre>" + esc(json.dumps(provenance, indent=2)) + "</pre>"
            + "<h3>Config</h3><pre>" + esc(json.dumps(record.get("config"), indent=2))
            + "</pre>")


_CSS = """
:root { --ink: #1d2733; --muted: #5b6775; --line: #d5dbe3; --band: #f3f5f8; --accent: #2a5d9f; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color: var(--ink); background: #fff; }
header { background: #20344f; color: #fff; padding: 1.2rem 2rem; }
header h1 { margin: 0; font-size: 1.5rem; font-weight: 600; }
header p { margin: .3rem 0 0; color: #c9d6e6; font-size: .9rem; word-break: break-all; }
.layout { display: flex; align-items: flex-start; max-width: 1400px; margin: 0 auto; }
nav { position: sticky; top: 0; flex: 0 0 230px; padding: 1.2rem 1rem; font-size: .9rem;
      max-height: 100vh; overflow-y: auto; border-right: 1px solid var(--line); }
nav h2 { font-size: .8rem; text-transform: uppercase; letter-spacing: .06em; color: var(--muted);
         margin: 0 0 .5rem; }
nav ol { margin: 0; padding-left: 1.2rem; } nav ol ol { padding-left: 1rem; }
nav a { color: var(--accent); text-decoration: none; } nav a:hover { text-decoration: underline; }
main { flex: 1; min-width: 0; padding: .5rem 2rem 3rem; }
h2 { border-bottom: 2px solid var(--line); padding-bottom: .25rem; margin-top: 2rem;
     font-size: 1.3rem; }
h3 { font-size: 1.1rem; margin: 1.4rem 0 .4rem; }
section.split { border-left: 3px solid var(--line); padding-left: 1rem; margin: 1rem 0 2rem; }
.headline { font-size: 1.05rem; font-weight: 600; margin: .2rem 0; }
.baseline { margin: .1rem 0 .3rem; color: var(--muted); }
.note { color: var(--muted); font-size: .88rem; margin: .3rem 0 .6rem; }
.missing { color: #8a5a00; font-size: .88rem; }
.notrun { color: var(--muted); font-style: italic; }
.statement { background: var(--band); border-left: 4px solid var(--accent); padding: .6rem .9rem; }
.warning { background: #fff4e5; border: 2px solid #e08a00; border-radius: 4px;
           padding: .7rem 1rem; margin: .8rem 0; }
table { border-collapse: collapse; margin: .5rem 1.5rem .8rem 0; font-size: .88rem; }
caption { text-align: left; color: var(--muted); padding-bottom: .2rem; }
.tablewrap { max-width: 100%; overflow-x: auto; }
th, td { border-bottom: 1px solid var(--line); padding: .28rem .65rem; text-align: left;
         vertical-align: top; white-space: nowrap; }
th { white-space: normal; }
td:last-child { white-space: normal; min-width: 8em; }
table.kv td { white-space: normal; overflow-wrap: anywhere; }
th { background: var(--band); font-weight: 600; }
tbody tr:nth-child(even) td { background: #fafbfc; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.cols { display: flex; flex-wrap: wrap; align-items: flex-start; }
.gallery { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
figure { margin: .5rem 0; border: 1px solid var(--line); border-radius: 4px; padding: .5rem;
         background: #fff; }
figure img { display: block; max-width: 440px; height: auto; }
figure.wide img { max-width: 100%; }
figcaption { font-size: .82rem; color: var(--muted); max-width: 440px; margin-top: .3rem; }
figure.wide figcaption { max-width: none; }
details summary { cursor: pointer; color: var(--accent); margin: .4rem 0; }
pre { background: var(--band); border: 1px solid var(--line); padding: .8rem; font-size: .8rem;
      overflow: auto; max-height: 36rem; }
"""


def write_report(workdir, *, data_dir: str | None = None, out=None) -> Path:
    """Writes ``WORKDIR/report.html`` (or ``out``) and the figures in ``WORKDIR/report_files``.

    Args:
      workdir: a workdir evaluated with ``--mode=eval`` (analysis parts are optional).
      data_dir: where the prepared dataset is now (for the cohort table; default the config's).
      out: the HTML file to write instead of ``WORKDIR/report.html``.

    Returns:
      The path of the written page.

    Raises:
      Her2jaxError: ``workdir`` is not a workdir, has no evaluation yet, or an evaluation file
        is unreadable. Nothing is written then.
    """
    # A report that cannot be finished (a full disk) leaves no report_files/ it created.
    with fileio.new_folders_removed_on_error(Path(workdir) / FIGURES_DIR):
        return _write_report(Path(workdir), data_dir=data_dir, out=out)


def _write_report(workdir: Path, *, data_dir: str | None, out) -> Path:
    from her2jax.train import workdir as workdir_lib

    record = workdir_lib.read(workdir)
    names = _eval_splits(workdir)
    if not names:
        raise Her2jaxError("has no evaluation (no eval/<split>/metrics.json); run --mode=eval "
                           "first", file=str(workdir))
    evaluated = {n: files.read_metrics(workdir / "eval" / n / "metrics.json") for n in names}
    frames = {n: files.read_predictions(workdir / "eval" / n / "predictions.csv")
              for n in names if (workdir / "eval" / n / "predictions.csv").exists()}
    class_names = next(iter(evaluated.values())).get("class_names") or []
    summary, summary_error = _optional_json(workdir / "analysis" / "summary.json")
    images = _Images(workdir)
    clinical = ((record.get("config") or {}).get("data") or {}).get("columns", {}).get(
        "clinical") or []

    is_cv = (workdir / "cv.json").is_file()
    if is_cv:
        training = ("cross-validation", "Cross-validation", _cv_section(workdir, record, images))
        oof = workdir / "cv" / "oof_predictions.csv"
        counted = dict(frames)
        if oof.exists():
            folds = files.read_predictions(oof)
            counted = {**{f"fold {k} (held out)": part for k, part in
                          folds.groupby(folds["fold"].astype(str), sort=True)},
                       **{n: f for n, f in frames.items() if n.startswith("test")}}
        cohort = _note("Patients per fold (each held out by one fold, trained on by the "
                       "others) and per test centre, from the evaluation's predictions.") + \
            _cohort_table(_cohort_from_predictions(counted, class_names), class_names)
    else:
        training = ("training", "Training and checkpoint selection",
                    _training_section(workdir, record, evaluated, images))
        cohort = _cohort_section(record, data_dir, frames, class_names)
    sections = [
        ("summary", "Run summary", _summary_section(workdir, record, evaluated)),
        training,
        ("cohort", "Cohort", cohort),
        ("results", "Results per split",
         "".join(_split_section(workdir, n, evaluated[n], frames.get(n), images)
                 for n in names)),
        ("calibration", "Calibration", _calibration_section(workdir, images)),
        ("centres", "Per-centre and subgroup results",
         _centres_section(workdir, class_names, clinical)),
        ("embeddings", "Embeddings (t-SNE / UMAP)",
         _embeddings_section(workdir, summary, images)),
        ("shap-features", "Feature-space SHAP",
         _feature_shap_section(workdir, summary, images)),
        ("shap-image", "Image-space SHAP", _image_shap_section(workdir, summary, images)),
        ("software", "Software and configuration", _software_section(record)),
    ]
    if summary_error:
        note = _note(f"analysis/summary.json is unreadable: {summary_error}", "missing")
        sections = [(i, t, note + b) if i.startswith(("embeddings", "shap")) else (i, t, b)
                    for i, t, b in sections]
    toc = []
    for ident, title, _ in sections:
        sub = ""
        if ident == "results":
            sub = "<ol>" + "".join(f'<li><a href="#split-{esc(_slug(n))}">{esc(n)}</a></li>'
                                   for n in names) + "</ol>"
        toc.append(f'<li><a href="#{ident}">{esc(title)}</a>{sub}</li>')
    body = "".join(f'<section id="{ident}"><h2>{esc(title)}</h2>{content}</section>'
                   for ident, title, content in sections)
    title = f"her2jax report: {workdir.resolve().name}"
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p>HER2 status (" + esc(", ".join(class_names))
            + f") from breast DCE-MRI &middot; {esc(workdir.resolve())}</p></header>"
            f'<div class="layout"><nav><h2>Contents</h2><ol>{"".join(toc)}</ol></nav>'
            f"<main>{body}</main></div></body></html>\n")
    path = Path(out) if out else workdir / REPORT_FILE
    files.write_text(path, page)
    return path
