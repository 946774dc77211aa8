"""her2jax-prepare's work: validate a cohort, preprocess it on all cores, write the dataset.

Order of work, and why:

1. Read and validate the cohort listing and clinical table (table errors stop here).
2. Preprocess every case in parallel into a spool inside a temporary directory under
   ``data_dir``. A case that fails (unreadable file, NaN voxels, empty mask, ...) becomes a
   rejection; without ``skip_invalid`` the first one stops the run with one line.
   Preprocessing first means the dataset is only built from cases known to be good.
3. Build the TFDS dataset from the spool, read it back to write ``index.csv`` (which also
   proves it readable), and add ``kinetic_features.csv`` (the hand-made baseline's five
   features per case, computed in step 2 from the phases already in memory) and the reports
   (``excluded.csv``, ``rejected.csv``, QC montage).
4. Move it into place with one rename. A killed or failed run leaves only a hidden
   temporary directory (removed by the next run), never a half dataset, and never touches
   an existing dataset unless ``overwrite`` replaces it once the new one is complete. A run
   that fails also removes the folders it created for ``data_dir`` (when they are still
   empty); a folder that existed before is never removed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from her2jax import labels
from her2jax.data import cohort as cohort_lib
from her2jax.data import kinetic_features, nifti, preprocess, qc, tfds_builder
from her2jax.data.recipes import plain
from her2jax.errors import Her2jaxError

VALIDATION_DIR = "validation"
_TMP_PREFIX = ".her2jax-prepare-"
_REJECTED_COLUMNS = ("patient_id", "file", "reason")


@dataclasses.dataclass
class Prepared:
    """What a prepare run did.

    Attributes:
      dataset_dir: the dataset's version directory (None for ``validate_only``).
      report_dir: where excluded.csv, rejected.csv and the QC montage are.
      reused: True when an up-to-date dataset already existed and nothing was built.
      num_cases: examples written (validate_only: cases that passed).
      splits: examples per split (centre).
      rejected: cases left out because their files or table rows are invalid.
      excluded: per scheme, how many good cases have no derivable label.
      unlisted: image folders without a row in the clinical table (ignored).
    """

    dataset_dir: Path | None
    report_dir: Path
    reused: bool
    num_cases: int
    splits: dict[str, int]
    rejected: list[cohort_lib.Rejection]
    excluded: dict[str, int]
    unlisted: tuple[str, ...] = ()

    def summary(self) -> str:
        """One line for the terminal."""
        if self.reused:
            head = f"up to date: {self.dataset_dir} ({self.num_cases} cases)"
        elif self.dataset_dir is None:
            head = f"validated: {self.num_cases} good cases, reports in {self.report_dir}"
        else:
            head = f"wrote {self.num_cases} cases to {self.dataset_dir}"
        parts = [head, "splits " + ", ".join(f"{k}={v}" for k, v in sorted(self.splits.items()))]
        parts += [f"{scheme}: {n} without a label (excluded.csv)"
                  for scheme, n in self.excluded.items() if n]
        if self.rejected:
            parts.append(f"{len(self.rejected)} rejected (rejected.csv)")
        if self.unlisted:
            parts.append(f"{len(self.unlisted)} image folder(s) without a table row ignored "
                         f"({', '.join(self.unlisted[:3])}{', ...' if len(self.unlisted) > 3 else ''})")
        return "; ".join(parts)


def dataset_hash(listing_hash: str, recipe) -> str:
    """Identifies what a dataset is made of: cohort listing, recipe and feature layout."""
    text = json.dumps({"listing": listing_hash, "recipe": preprocess.recipe_fingerprint(recipe),
                       "format": tfds_builder.FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def prepare(cohort_path, data_dir, data_config, *, skip_invalid: bool = False,
            validate_only: bool = False, overwrite: bool = False, workers: int = 0,
            progress: bool = True, require_labels: bool = True) -> Prepared:
    """Validates and preprocesses a cohort and writes the ``her2_dce_mri`` dataset.

    Args:
      cohort_path: MAMA-MIA-layout directory or manifest CSV.
      data_dir: where the dataset (``her2_dce_mri/<recipe>_<hash>/1.0.0``) is written.
      data_config: the config's ``data`` section (recipe, columns, clinical_sheet, ...).
      skip_invalid: write the valid cases and list the others in rejected.csv, instead of
        stopping at the first invalid case.
      validate_only: check and preprocess every case, write the reports to
        ``data_dir/validation``, build nothing.
      overwrite: replace an existing dataset made from another cohort listing or recipe.
      workers: processes for preprocessing (0: one per core).
      progress: show a progress bar.
      require_labels: refuse a table without a label column (False: every case of such a
        table is unlabelled, for self-supervised pretraining and prediction).

    Returns:
      What was done; see :class:`Prepared`.
    """
    recipe = plain(data_config.recipe)
    preprocess.check_recipe(recipe)
    cohort = cohort_lib.read_cohort(cohort_path, data_config.columns,
                                    clinical_sheet=data_config.clinical_sheet,
                                    allow_outside_root=data_config.allow_outside_root,
                                    require_labels=require_labels)
    splits_of = {c.center: tfds_builder.split_name(c.center) for c in cohort.cases}
    _check_split_names(splits_of)

    data_dir = Path(data_dir)
    name = f"{recipe['name']}_{dataset_hash(cohort_lib.cohort_listing_hash(cohort), recipe)}"
    existing = tfds_builder.find_datasets(data_dir)
    final_dir = data_dir / tfds_builder.DATASET_NAME / name
    if not validate_only:
        if final_dir / tfds_builder.FORMAT_VERSION in existing and not overwrite:
            return _reused(final_dir / tfds_builder.FORMAT_VERSION)
        others = [d for d in existing if d.parent != final_dir]
        if others and not overwrite:
            raise Her2jaxError(
                f"already holds a dataset made from {_what_changed(others[0], cohort, recipe)}; "
                "pass --overwrite to replace it, or choose another --data_dir",
                file=str(data_dir))

    created = _missing_folders(data_dir)
    try:
        tmp = _make_tmp(data_dir)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        spool = tmp / "spool"
        spool.mkdir()
        records, rejected = _preprocess_all(cohort, recipe, spool, workers, progress)
        rejected = sorted(cohort.rejected + rejected, key=lambda r: (r.patient_id, r.file))
        if rejected and not (skip_invalid or validate_only):
            more = f" ({len(rejected) - 1} more problems)" if len(rejected) > 1 else ""
            raise Her2jaxError(
                f"{rejected[0].error()}{more}; fix the cohort, or pass --skip_invalid to "
                "leave invalid cases out, or --validate_only to list them all")
        if not records and not validate_only:
            raise Her2jaxError("no valid case to write", file=str(cohort.table))

        if validate_only:
            report_dir = tmp / VALIDATION_DIR
            report_dir.mkdir()
            excluded = _write_reports(report_dir, records, rejected)
            final_reports = data_dir / VALIDATION_DIR
            _replace(report_dir, final_reports, tmp)
            return Prepared(None, final_reports, False, len(records),
                            _count_splits(records, splits_of), rejected, excluded,
                            tuple(cohort.unlisted))

        version_dir = tfds_builder.build(
            tmp, config_name=name,
            description=f"{len(records)} cases from {cohort.root}, recipe {recipe['name']}",
            shape=recipe["shape"], num_channels=len(recipe["channels"]),
            examples=[_example(r, recipe, splits_of[r["center"]]) for r in records])
        _write_index(version_dir, records, splits_of)
        kinetic_features.write_table(version_dir / kinetic_features.FILE,
                                     {r["patient_id"]: r["kinetic"] for r in records})
        excluded = _write_reports(version_dir, records, rejected)
        meta = {
            "name": name,
            "recipe": recipe,
            "recipe_fingerprint": preprocess.recipe_fingerprint(recipe),
            "listing_hash": cohort_lib.cohort_listing_hash(cohort),
            "cohort": str(cohort.root),
            "cohort_source": cohort.source,
            "table": str(cohort.table),
            "num_cases": len(records),
            "image_shape": [*recipe["shape"], len(recipe["channels"])],
            "num_rejected": len(rejected),
            "splits": {s: {"center": c, "num_examples": n} for c, s, n in
                       _split_rows(records, splits_of)},
            "clinical_columns": sorted({k for r in records for k in r["clinical"]}),
        }
        (version_dir / tfds_builder.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for old in existing:   # only reached with overwrite
            _replace(None, old.parent, tmp)
        _replace(version_dir.parent, final_dir, tmp)
        done = final_dir / tfds_builder.FORMAT_VERSION
        return Prepared(done, done, False, len(records), _count_splits(records, splits_of),
                        rejected, excluded, tuple(cohort.unlisted))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_split_names(splits_of: dict[str, str]) -> None:
    seen: dict[str, str] = {}
    for center, split in sorted(splits_of.items()):
        if split in seen:
            raise Her2jaxError(f"centres {seen[split]!r} and {center!r} both map to split "
                               f"name {split!r}; rename one", key="center")
        seen[split] = center


def _reused(version_dir: Path) -> Prepared:
    meta = tfds_builder.read_meta(version_dir)
    splits = {s: v["num_examples"] for s, v in meta["splits"].items()}
    return Prepared(version_dir, version_dir, True, meta["num_cases"], splits, [], {})


def _what_changed(other: Path, cohort, recipe: dict) -> str:
    """Names the difference between an existing dataset and this request."""
    meta = tfds_builder.read_meta(other)
    old = meta.get("recipe", {})
    changed = [f"{k} {old.get(k)!r} -> {recipe.get(k)!r}"
               for k in sorted(set(old) | set(recipe)) if old.get(k) != recipe.get(k)]
    if changed:
        return "another recipe (" + ", ".join(changed) + ")"
    if meta.get("cohort") != str(cohort.root):
        return f"another cohort ({meta.get('cohort')})"
    return "another version of this cohort (files or table rows changed since)"


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first: the folders
    ``mkdir(parents=True)`` would create."""
    missing = []
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Removes the folders (deepest first) while they are empty: what a failed run created,
    never anything someone put there meanwhile."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _make_tmp(data_dir: Path) -> Path:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        for stale in data_dir.glob(_TMP_PREFIX + "*"):
            pid = stale.name[len(_TMP_PREFIX):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", dir=data_dir))
    except OSError as e:
        raise Her2jaxError(f"cannot write here ({e.strerror})", file=str(data_dir)) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace(new: Path | None, dest: Path, tmp: Path) -> None:
    """Puts ``new`` at ``dest`` (or removes ``dest`` when new is None) with renames only."""
    if dest.exists():
        graveyard = Path(tempfile.mkdtemp(prefix="old-", dir=tmp))
        dest.rename(graveyard / dest.name)
    if new is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        new.rename(dest)


def _preprocess_all(cohort, recipe: dict, spool: Path, workers: int, progress: bool):
    needed = preprocess.required_phases(recipe)
    jobs = [(case, recipe, str(spool), needed) for case in cohort.cases]
    workers = min(workers or os.cpu_count() or 1, max(len(jobs), 1))
    bar = tqdm(total=len(jobs), desc="preprocess", unit="case", disable=not progress)
    results = []
    if workers == 1:
        for job in jobs:
            results.append(_preprocess_case(*job))
            bar.update()
    else:
        # spawn, not fork: the parent may already run threads (TFDS, absl, JAX).
        # Workers ignore Ctrl-C: the parent alone stops, drops the queued cases, waits for the
        # few in flight and removes the temporary folder (a worker's KeyboardInterrupt would
        # print a traceback per process). They are started while SIGINT is ignored, so they
        # ignore it from their first instruction (Python installs no KeyboardInterrupt handler
        # in a process that inherits an ignored SIGINT), not only once they have imported.
        ctx = multiprocessing.get_context("spawn")
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx,
                                                      initializer=_ignore_sigint)
        try:
            with _sigint_ignored():
                futures = [pool.submit(_preprocess_case, *job) for job in jobs]
            for _ in concurrent.futures.as_completed(futures):
                bar.update()
            results = [f.result() for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    records = [r for r, _ in results if r is not None]
    rejected = [x for _, x in results if x is not None]
    return records, rejected


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored in this (main) thread for the block: the worker processes the pool
    starts inside it inherit the ignored disposition."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:   # not the main thread: nothing to hand down
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def crop_case(case: cohort_lib.Case, recipe: dict, needed_phases: int) -> preprocess.Crop:
    """Loads, checks and preprocesses one case: the one code path from NIfTI files to the
    network input, shared by prepare and predict so that both see identical crops.

    Args:
      case: a valid case of ``cohort.read_cohort``.
      recipe: the plain preprocessing recipe (``recipes.plain(config.data.recipe)``).
      needed_phases: ``preprocess.required_phases(recipe)``.

    Returns:
      The case's Crop (image [D, H, W, C] float16).

    Raises:
      Her2jaxError: naming the patient (and file): too few phases, or any problem
        ``nifti.load_case`` / ``preprocess.preprocess`` finds.
    """
    phases, mask, affine = _load_case(case, needed_phases)
    return preprocess.preprocess(phases, mask, affine, recipe)


def _load_case(case: cohort_lib.Case, needed_phases: int):
    """``nifti.load_case`` after checking the case has the phases the recipe needs."""
    if len(case.phases) < needed_phases:
        raise Her2jaxError(f"has {len(case.phases)} phases, the recipe needs "
                           f"{needed_phases}", patient=case.patient_id)
    return nifti.load_case(case)


def _preprocess_case(case: cohort_lib.Case, recipe: dict, spool: str, needed_phases: int):
    """Worker: load, check and preprocess one case into the spool, and compute its kinetic
    features on the source grid (the phases are in memory already: ~1 ms more per case).

    Returns:
      (record, None) with the example's metadata, or (None, Rejection).
    """
    try:
        phases, mask, affine = _load_case(case, needed_phases)   # what crop_case does
        crop = preprocess.preprocess(phases, mask, affine, recipe)
    except Her2jaxError as e:
        return None, cohort_lib.Rejection(case.patient_id, e.file or "", e.reason)
    kinetic = kinetic_features.case_features(phases, mask, affine)
    del phases
    spool_file = Path(spool) / f"{hashlib.sha1(case.patient_id.encode()).hexdigest()}.npz"
    np.savez(spool_file, image=crop.image, mask=crop.mask)
    return {
        "patient_id": case.patient_id,
        "center": case.center,
        "ihc": case.ihc,
        "ish": case.ish,
        "her2": int(case.her2),
        "clinical": dict(case.clinical),
        "box": crop.box,
        "crop_affine": crop.crop_affine,
        "source_shape": crop.source_shape,
        "source_affine": crop.source_affine,
        "spool": str(spool_file),
        "kinetic": kinetic,
    }, None


def _example(record: dict, recipe: dict, split: str) -> tfds_builder.Example:
    recipe_json = json.dumps(recipe, sort_keys=True)

    def load() -> dict:
        with np.load(record["spool"]) as arrays:
            image, mask = arrays["image"], arrays["mask"]
        return {
            "image": image, "mask": mask,
            "patient_id": record["patient_id"], "center": record["center"],
            "ihc": record["ihc"], "ish": record["ish"], "her2": record["her2"],
            "clinical": json.dumps(record["clinical"], sort_keys=True),
            "recipe": recipe_json,
            "box": np.asarray(record["box"], np.int32),
            "crop_affine": np.asarray(record["crop_affine"], np.float64),
            "source_shape": np.asarray(record["source_shape"], np.int32),
            "source_affine": np.asarray(record["source_affine"], np.float64),
        }

    return tfds_builder.Example(key=record["patient_id"], split=split, load=load)


def _split_rows(records: Sequence[dict], splits_of: dict[str, str]):
    counts = Counter(r["center"] for r in records)
    return [(c, splits_of[c], n) for c, n in sorted(counts.items())]


def _count_splits(records, splits_of) -> dict[str, int]:
    return {s: n for _, s, n in _split_rows(records, splits_of)}


def _write_index(version_dir: Path, records: Sequence[dict], splits_of: dict[str, str]) -> None:
    """index.csv from the written dataset itself: split, position and raw labels per example."""
    by_id = {r["patient_id"]: r for r in records}
    rows = []
    for center, split, _ in _split_rows(records, splits_of):
        source = tfds_builder.data_source(version_dir, split)
        for position in range(len(source)):
            example = source[position]
            pid = example["patient_id"].decode()
            record = by_id[pid]
            if record["center"] != center:
                raise AssertionError(f"{pid} written to split {split} of centre {center}")
            rows.append({"split": split, "position": position, "patient_id": pid,
                         "center": center, "ihc": record["ihc"], "ish": record["ish"],
                         "her2": record["her2"]})
    if len(rows) != len(records):
        raise AssertionError(f"dataset holds {len(rows)} examples, {len(records)} were written")
    _write_csv(version_dir / tfds_builder.INDEX_FILE, rows,
               ("split", "position", "patient_id", "center", "ihc", "ish", "her2"))


def _write_reports(report_dir: Path, records: Sequence[dict],
                   rejected: Sequence[cohort_lib.Rejection]) -> dict[str, int]:
    """excluded.csv (per scheme), rejected.csv and the QC montage. Returns excluded counts."""
    excluded_rows = []
    for scheme in labels.SCHEMES:
        for r in records:
            label, reason = labels.derive_label(scheme, r["ihc"], r["ish"], r["her2"])
            if label is None:
                excluded_rows.append({"patient_id": r["patient_id"], "center": r["center"],
                                      "scheme": scheme, "reason": reason})
    _write_csv(report_dir / "excluded.csv", excluded_rows,
               ("patient_id", "center", "scheme", "reason"))
    _write_csv(report_dir / "rejected.csv", [dataclasses.asdict(r) for r in rejected],
               _REJECTED_COLUMNS)
    qc.write_montage(report_dir / "qc_montage.png",
                     [(r["patient_id"], r["center"], r["spool"]) for r in records])
    counts = Counter(row["scheme"] for row in excluded_rows)
    return {scheme: counts.get(scheme, 0) for scheme in labels.SCHEMES}


def _write_csv(path: Path, rows: Sequence[Mapping], columns: Sequence[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
