"""her2jax-dicom: DICOM DCE-MRI series -> a cohort in the MAMA-MIA layout.

  her2jax-dicom --dicom=DIR --out=COHORT [--boxes=Annotation_Boxes.xlsx] [--masks=DIR]
                [--config=configs/X.py] [--series_regex=REGEX] [--min_phases=N] [--noqc]
                [--skip_invalid]

Groups the files under ``--dicom`` into patients and series, identifies each patient's DCE
phases (series descriptions, temporal tags, times), orders the slices by
``ImagePositionPatient``, builds the affine from the DICOM geometry and writes
``images/<pid>/<pid>_000k.nii.gz``, tumour masks from Duke's boxes or a mask folder
(``segmentations/expert/<pid>.nii.gz``), a QC montage per patient (``qc/<pid>.png``), a
``clinical.csv`` stub (fill the HER2 columns) and ``dicom_manifest.csv`` (see
``her2jax.data.dicom``). Any problem (a missing or duplicated
slice, mixed orientations, phases on different grids, too few phases, an ambiguous phase
order, a non-MR object, a compressed syntax it cannot decode) is one line naming the patient
or file, exit 2, and nothing written. Then: ``her2jax-prepare --cohort=COHORT ...``.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from her2jax import cli
from her2jax.data import dicom, preprocess, recipes
from her2jax.errors import Her2jaxError

_DICOM = flags.DEFINE_string("dicom", None, "Folder of DICOM files (any depth).")
_OUT = flags.DEFINE_string("out", None, "New folder for the cohort (must not exist or be "
                           "empty).")
_SERIES = flags.DEFINE_string("series_regex", dicom.DEFAULT_SERIES_REGEX,
                              "Case-insensitive regex on SeriesDescription that selects the "
                              "dynamic (DCE) series.")
_BOXES = flags.DEFINE_string("boxes", None, "Duke's Annotation_Boxes.xlsx (or a CSV with its "
                             "columns): box masks on the pre-contrast grid.")
_MASKS = flags.DEFINE_string("masks", None, "Folder of <pid>.nii.gz tumour masks on the "
                             "phases' grid.")
_QC = flags.DEFINE_boolean("qc", True, "Write qc/<pid>.png (--noqc: none).")
_SKIP_INVALID = flags.DEFINE_boolean(
    "skip_invalid", False, "Write the patients that pass; list the others (and refused "
    "files) with the reason in dicom_rejected.csv.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The config the cohort will be prepared with: a patient with fewer DCE "
    "phases than its recipe needs is refused (default: the FM-BCMRI recipe).",
    lock_config=True)
_MIN_PHASES = flags.DEFINE_integer("min_phases", None, "Fewer DCE phases than this (the "
                                   "pre-contrast one included) are refused (default: what the "
                                   "--config recipe needs).", lower_bound=1)


def _main(argv: list[str]) -> None:
    del argv
    if not _DICOM.value or not _OUT.value:
        raise Her2jaxError("--dicom and --out are required")
    data_config = _CONFIG.value.data if _CONFIG.value is not None else recipes.data_config()
    min_phases = _MIN_PHASES.value
    needed_by = "--min_phases"
    if min_phases is None:
        min_phases = preprocess.required_phases(data_config.recipe)
        needed_by = (f"recipe {data_config.recipe.get('name', '')} "
                     f"{tuple(data_config.recipe.channels)}").replace("  ", " ")
    result = dicom.convert(_DICOM.value, _OUT.value, series_regex=_SERIES.value,
                           min_phases=min_phases, needed_by=needed_by, boxes=_BOXES.value,
                           masks=_MASKS.value, qc=_QC.value,
                           skip_invalid=_SKIP_INVALID.value)
    counts = sorted(set(result["phases"].values()))
    plural = "s" if result["patients"] != 1 else ""
    print(f"wrote {_OUT.value}: {result['patients']} patient{plural}, "
          f"{'/'.join(map(str, counts))} phases each, {result['masks']} tumour mask(s); "
          f"{result['skipped_files']} non-DICOM file(s) skipped"
          + (f"; {result['rejected']} refused (dicom_rejected.csv)" if result["rejected"]
             else "")
          + "; next: fill the HER2 columns of clinical.csv", flush=True)


def main() -> None:
    cli.run(_main)


if __name__ == "__main__":
    main()
