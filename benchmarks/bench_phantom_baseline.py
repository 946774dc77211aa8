"""How hard is the phantom? A hand-made kinetic-feature baseline, leave one centre out.

  python benchmarks/bench_phantom_baseline.py [--patients=240] [--centers=3] [--seed=0]
      [--shape=128,128,64] [--phases=5] [--cohort=DIR] [--ceiling] [--voxel_washout]

Generates a phantom cohort (or reads ``--cohort``), computes five hand-made features of the
tumour per case straight from the NIfTI files (wash-in, washout, log volume, enhancement
heterogeneity, peritumoral rim enhancement: ``her2jax.data.kinetic_features``, the very values
her2jax-prepare stores in ``kinetic_features.csv``), then for each centre trains a standardised
logistic regression on the other centres and scores the held-out one. Prints one JSON line per
held-out centre with the macro one-vs-rest AUC over its labelled 3-class cases, then a summary
line. The phantom is calibrated so that this lands between 0.70 and 0.95: learnable, not
trivial (real studies report external 3-class AUCs of 0.71-0.86).

``--ceiling`` also scores, on the same patients and rotations, a logistic regression on the
phantom's own latent tumour parameters (``LATENT``: the size, margin irregularity, wash-in and
washout rates, heterogeneity, necrosis and oedema width / strength each case was drawn with,
regenerated from the phantom's seed): what a model that recovered every class signal of the
images could reach, the ceiling against which the baseline's and the engine's AUCs are read.
Its lines carry ``features="latent"``.

``--voxel_washout`` also scores the baseline's five features plus one per-voxel washout
estimate (``VOXEL_WASHOUT``, from each tumour voxel's own enhancement curve, where the
voxel's amplitude cancels): the median rate ln(E_1 / E_last) / (t_last - t_1) and the share of
voxels that wash out, each in turn (lines with ``features="baseline+<name>"``).

The functions are imported by tests/test_phantom.py, which checks the band on a small cohort.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from her2jax.data import kinetic_features, phantom
from her2jax.labels import CLASS_NAMES

CLASSES = CLASS_NAMES["her2_3class"]
FEATURES = kinetic_features.FEATURES


def case_features(phase_paths: list[Path], mask_path: Path) -> dict[str, float]:
    """``FEATURES`` of one case read from its NIfTI files
    (:func:`her2jax.data.kinetic_features.case_features`, the values her2jax-prepare stores).

    Args:
      phase_paths: the case's NIfTI phases in order, pre-contrast first.
      mask_path: its tumour mask (non-zero = tumour), on the same grid.
    """
    mask_image = nib.load(mask_path)
    phases = np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in phase_paths])
    return kinetic_features.case_features(phases, np.asarray(mask_image.dataobj),
                                          mask_image.affine)


VOXEL_WASHOUT = ("voxel_washout_rate", "voxel_washout_share")


def voxel_washout(phases: np.ndarray, mask: np.ndarray, times) -> dict[str, float]:
    """``VOXEL_WASHOUT`` of one case: over the tumour voxels enhancing > 10 % at the first
    post-contrast phase and > 5 % at the last (E_k = (C_k - C0) / C0), the median of
    ln(E_1 / E_last) / (t_last - t_1) in 1/s, and the share with E_last < E_1. NaN when no
    voxel qualifies or the case has fewer than three phases."""
    out = dict.fromkeys(VOXEL_WASHOUT, float("nan"))
    if len(phases) < 3:
        return out
    v = phases[:, np.asarray(mask) != 0].astype(np.float64)
    enhancement = (v[1:] - v[0]) / np.maximum(v[0], 1e-3)
    first, last = enhancement[0], enhancement[-1]
    keep = (first > 0.10) & (last > 0.05)
    if keep.any():
        rate = np.log(first[keep] / last[keep]) / (float(times[-1]) - float(times[1]))
        out.update(voxel_washout_rate=float(np.median(rate)),
                   voxel_washout_share=float(np.mean(last[keep] < first[keep])))
    return out


def cohort_voxel_washout(root: Path) -> pd.DataFrame:
    """``VOXEL_WASHOUT`` for every case of a phantom cohort (times from clinical.csv's
    ``acquisition_times``): patient_id plus the two columns."""
    root = Path(root)
    table = pd.read_csv(root / "clinical.csv", dtype=str, keep_default_na=False)
    rows = []
    for row in table.itertuples():
        paths = sorted((root / "images" / row.patient_id).glob(f"{row.patient_id}_*.nii.gz"))
        phases = np.stack([np.asarray(nib.load(p).dataobj, dtype=np.float32) for p in paths])
        mask = np.asarray(nib.load(root / "segmentations" / "expert"
                                   / f"{row.patient_id}.nii.gz").dataobj)
        times = [float(t) for t in row.acquisition_times.split(";")]
        rows.append(dict(patient_id=row.patient_id, **voxel_washout(phases, mask, times)))
    return pd.DataFrame(rows)


def cohort_features(root: Path) -> pd.DataFrame:
    """``FEATURES`` for every case of a phantom (MAMA-MIA layout) cohort.

    Returns:
      One row per patient: patient_id, center, her2_class ('' when undetermined), FEATURES.
    """
    root = Path(root)
    table = pd.read_csv(root / "clinical.csv", dtype=str, keep_default_na=False)
    rows = []
    for row in table.itertuples():
        phases = sorted((root / "images" / row.patient_id).glob(f"{row.patient_id}_*.nii.gz"))
        mask = root / "segmentations" / "expert" / f"{row.patient_id}.nii.gz"
        rows.append(dict(patient_id=row.patient_id, center=row.center,
                         her2_class=row.her2_class, **case_features(phases, mask)))
    return pd.DataFrame(rows)


# The phantom's latent tumour parameters (phantom._Tumour), on a log scale where they are
# drawn log-normally.
LATENT = ("log_diameter", "log_irregularity", "log_wash_in", "washout", "log_heterogeneity",
          "necrosis", "log_edema_width", "log_edema_enhancement")


def latent_parameters(root: Path) -> pd.DataFrame:
    """``LATENT`` for every case of a phantom cohort, regenerated from its phantom.json (the
    first draws of each case's random stream, as phantom._render makes them).

    Returns:
      One row per patient: patient_id, center, her2_class ('' when undetermined), LATENT.
    """
    params = json.loads((Path(root) / phantom.MARKER).read_text())
    table = pd.read_csv(Path(root) / "clinical.csv", dtype=str, keep_default_na=False)
    recorded = dict(zip(table.patient_id, table.her2_class, strict=True))
    rows = []
    for case in phantom._draw_cases(params["patients"], params["centers"], params["seed"]):
        rng = np.random.default_rng([params["seed"], 1, case.center, case.number])
        t = phantom._draw_tumour(rng, case.true_class)
        rows.append(dict(
            patient_id=case.patient_id, center=phantom.center_name(case.center),
            her2_class=recorded[case.patient_id], log_diameter=np.log(t.diameter_mm),
            log_irregularity=np.log(t.irregularity), log_wash_in=np.log(t.wash_in),
            washout=t.washout, log_heterogeneity=np.log(t.heterogeneity),
            necrosis=t.necrosis, log_edema_width=np.log(t.edema_width),
            log_edema_enhancement=np.log(t.edema_enhancement)))
    return pd.DataFrame(rows)


def leave_center_out(features: pd.DataFrame, columns=FEATURES) -> list[dict]:
    """Trains on all centres but one and scores the held-out one, for every centre.

    Args:
      features: ``cohort_features`` (or ``latent_parameters``) output; cases with an empty
        her2_class, or with a feature that could not be computed (NaN), are left out.
      columns: the feature columns to fit on.

    Returns:
      One dict per held-out centre: center, n_train, n_test, macro_auc (one-vs-rest, macro
      average over the three classes) and per_class_auc.
    """
    labelled = features[features.her2_class.isin(CLASSES)
                        & np.isfinite(features[list(columns)].to_numpy()).all(axis=1)]
    x = labelled[list(columns)].to_numpy()
    y = labelled.her2_class.map(CLASSES.index).to_numpy()
    results = []
    for center in sorted(labelled.center.unique()):
        test = (labelled.center == center).to_numpy()
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(x[~test], y[~test])
        prob = model.predict_proba(x[test])
        per_class = {name: float(roc_auc_score(y[test] == k, prob[:, k]))
                     for k, name in enumerate(CLASSES)}
        results.append(dict(
            center=center, n_train=int((~test).sum()), n_test=int(test.sum()),
            macro_auc=float(roc_auc_score(y[test], prob, multi_class="ovr", average="macro")),
            per_class_auc=per_class))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=240)
    parser.add_argument("--centers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", default="128,128,64")
    parser.add_argument("--phases", type=int, default=5)
    parser.add_argument("--cohort", help="an existing cohort to read instead of generating one")
    parser.add_argument("--ceiling", action="store_true",
                        help="also fit the phantom's latent tumour parameters (the ceiling)")
    parser.add_argument("--voxel_washout", action="store_true",
                        help="also fit the five features plus each per-voxel washout estimate")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        generate_s = 0.0
        root = Path(args.cohort) if args.cohort else None
        if root is None:
            t0 = time.perf_counter()
            root = phantom.write_cohort(Path(tmp) / "cohort", patients=args.patients,
                                        centers=args.centers, seed=args.seed, shape=args.shape,
                                        phases=args.phases)
            generate_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        features = cohort_features(root)
        features_s = time.perf_counter() - t0
        latent = latent_parameters(root) if args.ceiling else None
        voxel = cohort_voxel_washout(root) if args.voxel_washout else None
    results = leave_center_out(features)
    for r in results:
        print(json.dumps(dict(bench="phantom_baseline", held_out=r.pop("center"), **r)))
    if latent is not None:
        for r in leave_center_out(latent, LATENT):
            print(json.dumps(dict(bench="phantom_baseline", features="latent",
                                  held_out=r.pop("center"), **r)))
    if voxel is not None:
        merged = features.merge(voxel, on="patient_id")
        for name in VOXEL_WASHOUT:
            for r in leave_center_out(merged, (*FEATURES, name)):
                print(json.dumps(dict(bench="phantom_baseline", features=f"baseline+{name}",
                                      held_out=r.pop("center"), **r)))
    aucs = [r["macro_auc"] for r in results]
    print(json.dumps(dict(
        bench="phantom_baseline_summary", cohort=args.cohort or "generated",
        patients=len(features), centers=len(results), seed=args.seed, shape=args.shape,
        phases=args.phases, labelled=int(features.her2_class.isin(CLASSES).sum()),
        mean_macro_auc=float(np.mean(aucs)), min_macro_auc=float(np.min(aucs)),
        max_macro_auc=float(np.max(aucs)), generate_s=round(generate_s, 1),
        generate_s_per_case=round(generate_s / len(features), 3) if generate_s else None,
        features_s=round(features_s, 1), cpus=len(os.sched_getaffinity(0)),
        python=platform.python_version(), numpy=np.__version__)))


if __name__ == "__main__":
    main()
