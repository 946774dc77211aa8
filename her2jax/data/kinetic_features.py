"""Five hand-made kinetic and shape features of a tumour: the baseline a learnt model must beat.

Computed by ``her2jax-prepare`` for every case it writes, from the arrays it has already
loaded (the source grid, before any crop or resampling), and stored as ``kinetic_features.csv``
beside ``index.csv``. ``--mode=eval`` fits a standardised logistic regression on them over the
run's own training patients (:mod:`her2jax.train.baseline`); ``benchmarks/bench_phantom_baseline.py``
uses the same function to measure how hard the phantom is.

With C0 the pre-contrast phase, C1 the first post-contrast phase, Clast the last one and
``mean_T`` the mean over the tumour mask:

* ``wash_in`` = (mean_T C1 - mean_T C0) / mean_T C0;
* ``washout`` = (mean_T Clast - mean_T C1) / mean_T C1;
* ``log_volume_mm3`` = log(tumour voxels x voxel volume in mm^3);
* ``heterogeneity`` = std / max(|mean|, 1e-6) of the subtraction C1 - C0 inside the tumour;
* ``rim_enhancement`` = (mean_S Clast - mean_S C0) / mean_S C0 over the shell S of voxels
  within ``RIM_VOXELS`` (6-connected steps) outside the mask (peritumoral oedema).

A feature that cannot be computed is NaN, never an error: a relative enhancement whose reference
signal is not positive (e.g. an all-zero C0 in the tumour), an empty shell (a mask that fills
the image), fewer than two phases. The baseline's fit leaves such cases out and says how many.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from her2jax.errors import Her2jaxError

FEATURES = ("wash_in", "washout", "log_volume_mm3", "heterogeneity", "rim_enhancement")
FILE = "kinetic_features.csv"
COLUMNS = ("patient_id", *FEATURES)
RIM_VOXELS = 2
_HETEROGENEITY_EPS = 1e-6


def _mean(volume: np.ndarray, where: np.ndarray) -> float:
    values = volume[where]
    return float(values.mean(dtype=np.float64)) if values.size else math.nan


def _relative(value: float, reference: float) -> float:
    """(value - reference) / reference, or NaN when the reference is not a positive signal."""
    if not (math.isfinite(value) and math.isfinite(reference) and reference > 0):
        return math.nan
    out = (value - reference) / reference
    return out if math.isfinite(out) else math.nan


def case_features(phases: np.ndarray, mask: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """``FEATURES`` of one case.

    Only the tumour's bounding box grown by ``RIM_VOXELS`` is read, so the cost is that of the
    tumour (about a millisecond), not of the image.

    Args:
      phases: [P, X, Y, Z] float, phase 0 pre-contrast, in acquisition order.
      mask: [X, Y, Z] tumour mask (non-zero = tumour) on the same grid.
      affine: [4, 4] voxel-to-world (mm) affine of that grid (its 3 x 3 determinant is the
        voxel volume: the product of the voxel sizes for an unsheared grid).

    Returns:
      ``{feature: float}`` in ``FEATURES`` order, each finite or NaN (see the module docstring).
    """
    mask = np.asarray(mask) != 0
    out = dict.fromkeys(FEATURES, math.nan)
    if not mask.any():
        return out
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(affine, np.float64)[:3, :3])))
    volume = float(np.count_nonzero(mask)) * voxel_mm3
    if volume > 0 and math.isfinite(volume):
        out["log_volume_mm3"] = math.log(volume)
    if len(phases) < 2:
        return out

    # The shell lies within RIM_VOXELS of the mask: a box grown by that much holds it exactly.
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(hit[0]) - RIM_VOXELS, 0),
                         min(int(hit[-1]) + 1 + RIM_VOXELS, mask.shape[axis])))
    box = tuple(box)
    tumour = mask[box]
    c0, c1, last = (np.asarray(phases[k][box], np.float32) for k in (0, 1, len(phases) - 1))

    m0, m1, m_last = (_mean(c, tumour) for c in (c0, c1, last))
    out["wash_in"] = _relative(m1, m0)
    out["washout"] = _relative(m_last, m1)
    subtraction = c1[tumour].astype(np.float64) - c0[tumour].astype(np.float64)
    heterogeneity = float(subtraction.std() / max(abs(subtraction.mean()), _HETEROGENEITY_EPS))
    out["heterogeneity"] = heterogeneity if math.isfinite(heterogeneity) else math.nan
    shell = ndimage.binary_dilation(tumour, iterations=RIM_VOXELS) & ~tumour
    if shell.any():
        out["rim_enhancement"] = _relative(_mean(last, shell), _mean(c0, shell))
    return out


def write_table(path: Path, rows: dict[str, dict[str, float]]) -> None:
    """Writes ``kinetic_features.csv``: patient_id and ``FEATURES`` per row, in the given order.

    Floats are written in Python's shortest round-trip form (``repr``), NaN as ``nan``, so the
    reader gets back exactly the values computed.
    """
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for pid, values in rows.items():
            writer.writerow([pid, *(repr(float(values[k])) for k in FEATURES)])


def read_table(version_dir: Path) -> dict[str, np.ndarray] | None:
    """``kinetic_features.csv`` of a prepared dataset, or None when it has none (datasets
    prepared before the file existed).

    Returns:
      ``{patient_id: [5] float64}`` in ``FEATURES`` order (NaN where undefined).

    Raises:
      Her2jaxError: naming the file: unreadable, its header is not ``COLUMNS``, or a row is
        not a patient id and five numbers.
    """
    path = Path(version_dir) / FILE
    if not path.exists():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if tuple(header or ()) != COLUMNS:
                raise Her2jaxError(f"header {header} is not {list(COLUMNS)}", file=str(path))
            table = {}
            for line, row in enumerate(reader, start=2):
                if len(row) != len(COLUMNS):
                    raise Her2jaxError(f"line {line} has {len(row)} fields, expected "
                                       f"{len(COLUMNS)}", file=str(path))
                table[row[0]] = np.asarray([float(v) for v in row[1:]], np.float64)
            return table
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as e:
        raise Her2jaxError(f"unreadable kinetic features ({e})", file=str(path)) from None


def matrix(table: dict[str, np.ndarray], patient_ids) -> np.ndarray:
    """[N, 5] float64 features of the given patients, in order; NaN rows for patients the
    table does not hold."""
    missing = np.full(len(FEATURES), np.nan)
    return np.stack([table.get(pid, missing) for pid in patient_ids]).reshape(-1, len(FEATURES))
