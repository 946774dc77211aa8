"""Named preprocessing recipes and the ``data`` section every config (and prepare) starts from.

A recipe says how a case's DCE-MRI phases become one fixed-size multi-channel crop:

* ``channels``: tokens, each one channel of the crop, in order:
  ``C<k>`` phase k's intensity (C0 = pre-contrast, C2 = second post-contrast);
  ``SUB<k>`` subtraction Ck - C0; ``PE`` percent enhancement (C1 - C0) / C0 at the first
  post-contrast phase, ``PE<k>`` at phase k, ``PEL`` at the last phase; ``SER`` signal
  enhancement ratio (C1 - C0) / (Clast - C0); ``MASK`` the tumour mask (0 / 1).
* ``shape``: the crop's output grid (D, H, W) in canonical (RAS) voxel order.
* ``margin_mm``: margin added on every side of the tumour's bounding box before resizing.
* ``spacing_mm``: 0 resizes the (margin-padded) tumour box to ``shape`` (FM-BCMRI); > 0
  instead resamples a box of ``shape * spacing_mm`` millimetres centred on the tumour to
  that isotropic spacing, keeping physical scale. The box is cropped before resampling.
* ``normalize``: ``crop`` z-scores every channel over its crop, ``(x - mean) / (std + 1e-8)``
  (FM-BCMRI); ``joint`` z-scores the intensity channels with one mean / std over all phases of
  the whole image (MAMA-MIA's advice) and derived channels (SUB, PE, SER) over the crop;
  ``ratio`` z-scores intensities (C, SUB) over the crop and keeps the dimensionless channels
  (PE, PEL, SER, MASK) as they are, so that they mean the same on every scanner;
  ``none`` keeps raw values.
* ``mask_only``: zero everything outside the tumour mask (FM-BCMRI's ROI option).
* ``largest_component``: keep only the mask's largest 26-connected component.
"""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

_BASE = dict(
    name="fmbcmri",
    channels=("C2",),
    shape=(48, 48, 48),
    margin_mm=0.0,
    spacing_mm=0.0,
    normalize="crop",
    mask_only=False,
    largest_component=True,
)

RECIPES = {
    # FM-BCMRI's own preprocessing: what its pretrained weights saw.
    "fmbcmri": {},
    "fmbcmri_subtraction": dict(channels=("SUB2",)),
    "multiphase": dict(channels=("C0", "C1", "C2"), normalize="joint", margin_mm=5.0),
    "kinetic": dict(channels=("C1", "SUB1", "PE", "SER"), margin_mm=5.0),
    # Scanner-independent inputs at physical scale: relative enhancement early and late (wash-in,
    # washout, the peritumoral rim) and the tumour mask (size, shape) on a 64 mm box at 2 mm.
    "kinetic_mm": dict(channels=("PE", "PEL", "MASK"), spacing_mm=2.0, shape=(32, 32, 32),
                       normalize="ratio"),
    "isotropic_1mm": dict(channels=("C0", "C1", "C2"), spacing_mm=1.0, shape=(64, 64, 64),
                          normalize="joint"),
    # What the other public foundation encoders were pretrained on (configs/breastmrfm.py,
    # configs/fmcib.py): BreastMR-FM one DCE volume at 2 mm, 128^3, z-scored over the image;
    # FMCIB a 50 mm cube at 1 mm around the lesion (CT there; z-scored over the crop here).
    "breastmrfm": dict(channels=("C1",), spacing_mm=2.0, shape=(128, 128, 128),
                       normalize="joint"),
    "fmcib": dict(channels=("C1",), spacing_mm=1.0, shape=(50, 50, 50), normalize="crop"),
}


def recipe_config(name: str = "fmbcmri") -> ml_collections.ConfigDict:
    """The named recipe as a ConfigDict (override single fields afterwards)."""
    if name not in RECIPES:
        raise KeyError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return ml_collections.ConfigDict({**_BASE, **RECIPES[name], "name": name})


def data_config(recipe: str = "fmbcmri") -> ml_collections.ConfigDict:
    """The ``data`` section shared by her2jax-prepare and training.

    Column names map the clinical table's headers onto her2jax's fields; an empty string
    marks a field the table does not have. Case-insensitive; ``center`` also accepts the
    aliases ``dataset`` (MAMA-MIA), ``centre`` and ``site``.
    """
    return ml_collections.ConfigDict(dict(
        name="her2_dce_mri",
        data_dir="",                     # where her2jax-prepare wrote the dataset
        recipe=recipe_config(recipe),
        columns=dict(
            patient_id="patient_id",
            center="center",
            ihc="ihc_score",
            ish="ish_result",
            her2="her2",
            # Clinical columns carried into the dataset (and later predictions.csv) for
            # subgroup tables; used when present in the table.
            clinical=("manufacturer", "field_strength", "hr", "er", "pr", "tumor_subtype"),
        ),
        clinical_sheet="dataset_info",   # sheet of an .xlsx clinical table (MAMA-MIA's)
        allow_outside_root=False,        # manifest paths may not leave the cohort folder
        # Which prepared centres train, validate and test is chosen when reading.
        scheme="her2_3class",
        train_centers=(),                # empty: every centre not named in test_centers
        test_centers=(),
        val_fraction=0.2,                # seeded, stratified share of the training centres
        seed=0,
        # Negative control: permute the labels of the training centres (training and
        # validation split, each within itself; test untouched), so that neither the weights
        # nor the checkpoint choice see a real label; a run that still "learns" then is
        # learning something other than the labels.
        permute_train_labels=False,
        # Cross-validation: ``her2jax --mode=cv`` sets these in each fold's config. The
        # patients of ``cv_holdout`` (from the training centres) leave training and
        # validation and form split ``oof``, which the fold's model predicts out of fold.
        cv_fold=-1,
        cv_holdout=(),
        worker_count=2,                  # grain worker processes (0 reads in the main process)
        prefetch=2,                      # batches each worker keeps ready
        device_prefetch=2,               # batches already copied to the devices (training)
    ))


def plain(value):
    """ConfigDict / tuples -> JSON-friendly dicts and lists (for hashing and metadata)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
