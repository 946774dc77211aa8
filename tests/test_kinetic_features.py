"""The hand-made kinetic features (her2jax.data.kinetic_features) on synthetic NIfTI cases with
known values, their degenerate cases, and the CSV they are stored in."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from her2jax.data import cohort, kinetic_features, nifti
from her2jax.errors import Her2jaxError

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (20, 18, 12)
ZOOMS = (0.8, 0.7, 2.5)
TUMOUR = (4, 4, 3)          # 48 voxels, an even number: a checkerboard splits it in half


def _write_case(tmp_path: Path, corner, *, c0_tumour=200.0) -> tuple[cohort.Case, np.ndarray]:
    """Three phases and a mask as NIfTI files; returns the Case and the mask [X, Y, Z].

    Tumour: C0 = c0_tumour, C1 a 400 / 600 checkerboard (mean 500), C2 = 450. Outside it C0 and
    C1 are 100; C2 is 130 on the shell of voxels 1 or 2 six-connected steps from the tumour and
    170 further out, so only the right shell gives rim_enhancement = 0.3.
    """
    mask = np.zeros(SHAPE, bool)
    box = tuple(slice(c, c + n) for c, n in zip(corner, TUMOUR, strict=True))
    mask[box] = True
    steps = ndimage.distance_transform_cdt(~mask, metric="taxicab")
    shell = (steps >= 1) & (steps <= 2)
    checker = (np.indices(SHAPE).sum(0) % 2).astype(bool)
    c0 = np.where(mask, c0_tumour, 100.0)
    c1 = np.where(mask, np.where(checker, 600.0, 400.0), 100.0)
    c2 = np.where(mask, 450.0, np.where(shell, 130.0, 170.0))
    affine = np.diag([*ZOOMS, 1.0])
    affine[:3, 3] = (-10.0, 5.0, 3.0)
    paths = []
    for k, phase in enumerate((c0, c1, c2)):
        paths.append(tmp_path / f"P1_000{k}.nii.gz")
        nib.save(nib.Nifti1Image(phase.astype(np.float32), affine), paths[-1])
    mask_path = tmp_path / "P1_mask.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), mask_path)
    case = cohort.Case("P1", "CENTER_A", tuple(paths), mask_path, "1+", "", 0, ())
    return case, mask


def _load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "bench_phantom_baseline", ROOT / "benchmarks" / "bench_phantom_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("corner", [(8, 7, 4), (0, 0, 0)], ids=["inside", "at-the-border"])
def test_known_values_of_a_synthetic_case(tmp_path, corner):
    case, _ = _write_case(tmp_path, corner)
    phases, mask, affine = nifti.load_case(case)   # prepare's own loading
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        features = kinetic_features.case_features(phases, mask, affine)
    assert tuple(features) == kinetic_features.FEATURES
    assert features["wash_in"] == 1.5                       # (500 - 200) / 200
    assert features["washout"] == pytest.approx(-0.1, abs=1e-15)   # (450 - 500) / 500
    assert features["rim_enhancement"] == pytest.approx(0.3, abs=1e-15)   # (130 - 100) / 100
    # C1 - C0 is 200 or 400, half each: std 100 over mean 300.
    assert features["heterogeneity"] == pytest.approx(1 / 3, abs=1e-15)
    # NIfTI stores the affine in float32: the voxel sizes are exact to ~1e-8.
    assert features["log_volume_mm3"] == pytest.approx(math.log(48 * 0.8 * 0.7 * 2.5), abs=1e-7)
    # The benchmark reads the files itself and gets the very same values.
    assert _load_benchmark().case_features(list(case.phases), case.mask) == features


def test_degenerate_cases_give_nan_not_errors(tmp_path):
    case, mask = _write_case(tmp_path, (8, 7, 4), c0_tumour=0.0)
    phases, mask, affine = nifti.load_case(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Zero mean tumour signal before contrast: wash-in has no reference.
        zero_c0 = kinetic_features.case_features(phases, mask, affine)
        # A mask filling the image: no shell around it.
        full = kinetic_features.case_features(phases, np.ones(SHAPE, bool), affine)
        one_phase = kinetic_features.case_features(phases[:1], mask, affine)
        empty = kinetic_features.case_features(phases, np.zeros(SHAPE, bool), affine)
    assert math.isnan(zero_c0["wash_in"])
    assert zero_c0["washout"] == pytest.approx(-0.1, abs=1e-15)   # C1 is still a reference
    assert math.isnan(full["rim_enhancement"]) and math.isfinite(full["wash_in"])
    assert [k for k, v in one_phase.items() if math.isfinite(v)] == ["log_volume_mm3"]
    assert all(math.isnan(v) for v in empty.values())


def test_table_round_trips_exactly_and_bad_files_are_named(tmp_path):
    rows = {"P1": dict(zip(kinetic_features.FEATURES, [0.1, -1 / 3, math.nan, 1e-300, 7.0],
                           strict=True)),
            "P2": dict.fromkeys(kinetic_features.FEATURES, 2 / 3)}
    kinetic_features.write_table(tmp_path / kinetic_features.FILE, rows)
    table = kinetic_features.read_table(tmp_path)
    assert list(table) == ["P1", "P2"]
    np.testing.assert_array_equal(table["P1"], [0.1, -1 / 3, math.nan, 1e-300, 7.0])
    x = kinetic_features.matrix(table, ["P2", "P9"])
    assert x.shape == (2, 5) and (x[0] == 2 / 3).all() and np.isnan(x[1]).all()
    assert kinetic_features.read_table(tmp_path / "elsewhere") is None
    (tmp_path / kinetic_features.FILE).write_text("patient_id,wash_in\nP1,0.1\n")
    with pytest.raises(Her2jaxError, match="header"):
        kinetic_features.read_table(tmp_path)
