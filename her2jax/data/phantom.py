"""Synthetic multi-centre breast DCE-MRI cohort in the MAMA-MIA layout (the embedded default).

The phantom lets the whole chain (prepare, train, evaluate, analyse) run on a fresh machine with
no downloads, and it is hard enough that a model has something to learn:

* **Anatomy**: one breast per case (a unilateral field of view) in front of a curved chest
  wall: air, skin, fat and fibroglandular tissue (smooth random fields, denser in the centre of
  the breast), pectoral muscle and a dark thorax. Fat-suppressed T1 contrast, so fat is grey.
* **Kinetics**: every tissue follows the empirical model
  ``S(t) = S0 * (1 + A * (1 - exp(-alpha * t)) * exp(-beta * t))`` (REFERENCE.md), sampled at
  the centre's acquisition times. Parenchyma enhances mildly and persistently (background
  parenchymal enhancement); the tumour per voxel, with a smooth internal heterogeneity, an
  optional non-enhancing necrotic core, and a peritumoral oedema ring that enhances mildly and
  persistently.
* **Biology by HER2 class** is drawn from *overlapping* distributions (effect sizes in
  ``_CLASS_EFFECTS``): HER2-positive tumours are on average larger, more irregular, wash in
  faster and wash out more, are more heterogeneous and necrotic and carry more oedema;
  HER2-zero tumours are smaller, rounder and persistent; HER2-low lie in between. No single
  feature separates the classes (REFERENCE.md: single-feature AUCs 0.6-0.8 in real studies);
  ``benchmarks/bench_phantom_baseline.py`` measures how separable they are.
* **Centres** differ in field of view and voxel spacing, orientation (RAS, LPS, a sagittal
  acquisition with permuted axes, ...), acquisition times, intensity scale, noise level, a
  smooth multiplicative bias field, manufacturer and field strength (``_CENTERS``: A axial RAS,
  B axial stored as LPS, C sagittal PIR, D axial RAI, E coronal LSA; further centres reuse
  these protocols with other scales, noise and timing).

Patients are ``PH<centre letter>_<number>`` (``PHA_0001``), centres ``CENTER_A``, ``CENTER_B``...
Classes follow ``CLASS_MIX`` in every centre, so each centre can serve as a test set.

Layout written (``acquisition_times`` is seconds after contrast injection of each phase,
``;``-separated, ``0`` for the pre-contrast phase)::

    images/<pid>/<pid>_0000.nii.gz ... <pid>_000{P-1}.nii.gz   int16, phase 0 pre-contrast
    segmentations/expert/<pid>.nii.gz                          uint8 tumour mask (0/1)
    clinical.csv     patient_id, center, manufacturer, field_strength, acquisition_times,
                     ihc_score, ish_result, her2, her2_class
    phantom.json     generation parameters (marks the directory as a phantom)

``clinical.csv`` is written last (through a temporary file and a rename): a directory without it
is an incomplete phantom. The same arguments give byte-identical files (on one machine: the
random fields go through BLAS, whose rounding may differ between CPU types).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from her2jax.errors import Her2jaxError
from her2jax.labels import CLASS_NAMES, three_class

CLINICAL_COLUMNS = ("patient_id", "center", "manufacturer", "field_strength", "acquisition_times",
                    "ihc_score", "ish_result", "her2", "her2_class")
MARKER = "phantom.json"
# HER2-zero / -low / -positive, as in a 361-patient cohort (REFERENCE.md: 17 / 50 / 32 %).
CLASS_MIX = (0.2, 0.5, 0.3)
MIN_PHASES = 4  # pre-contrast + at least three post-contrast phases
MIN_SIDE = 16   # voxels per axis; below that a tumour is a handful of voxels
_WORKERS = 4

_CLASSES = CLASS_NAMES["her2_3class"]
# Share of cases recorded as IHC 2+ with no ISH result: real tables have a few such cases, and
# they must reach the readers as unlabellable (her2 and her2_class empty).
_UNDETERMINED_SHARE = 0.05
# Class shift in units of each parameter's within-class spread: -1 / 0 / +1 times the effect
# for zero / low / positive. Tuned so that a 5-feature logistic regression on hand-made kinetic
# features reaches a leave-centre-out macro AUC of ~0.8 (see bench_phantom_baseline.py).
_CLASS_EFFECTS = dict(size=0.55, irregularity=0.5, wash_in=0.45, washout=0.75,
                      heterogeneity=0.45, necrosis=0.6, edema=0.75)


# --------------------------------------------------------------------------------------------
# Centres
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Center:
    """How one site acquires its images.

    ``axcodes`` names the world direction each array axis points to (nibabel's convention):
    ``RAS`` is canonical, ``LPS`` is the DICOM frame stored as is, ``PIR`` a sagittal
    acquisition whose array axes are (anterior-posterior, superior-inferior, left-right).
    """

    name: str
    manufacturer: str
    field_strength: float
    axcodes: str
    fov_mm: tuple[float, float, float]  # per array axis
    first_post_s: float  # first post-contrast phase, seconds after injection
    interval_s: float    # between post-contrast phases
    intensity_scale: float
    noise: float         # noise sigma as a fraction of the intensity scale
    bias: float          # strength of the multiplicative bias field (log scale)
    table_mm: tuple[float, float, float]  # scanner position of the anatomy (affine offset)

    def acquisition_times(self, phases: int) -> list[float]:
        return [0.0] + [self.first_post_s + k * self.interval_s for k in range(phases - 1)]


_CENTERS = (
    Center("", "Siemens", 3.0, "RAS", (180, 180, 120), 90, 90, 1000, 0.020, 0.15, (12, -40, 35)),
    Center("", "GE", 1.5, "LPS", (200, 200, 130), 75, 75, 2200, 0.035, 0.30, (-20, 15, 60)),
    Center("", "Philips", 3.0, "PIR", (200, 200, 150), 120, 120, 600, 0.030, 0.20, (0, -5, -10)),
    Center("", "Siemens", 1.5, "RAI", (190, 190, 120), 60, 60, 1500, 0.025, 0.25, (5, 20, 0)),
    Center("", "GE", 3.0, "LSA", (200, 140, 180), 100, 100, 1200, 0.040, 0.35, (-8, 0, 22)),
)


def center_name(index: int) -> str:
    """CENTER_A, CENTER_B, ..., CENTER_Z, CENTER_AA, ... for index 0, 1, ..."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("A") + rest) + letters
    return f"CENTER_{letters}"


def center_profile(index: int) -> Center:
    """The acquisition profile of centre ``index``; beyond the five built-in ones, variations."""
    base = _CENTERS[index % len(_CENTERS)]
    rng = np.random.default_rng([0xCE, index])
    if index < len(_CENTERS):
        jitter = {}
    else:  # centre k reuses centre k mod 5's protocol on another scanner
        jitter = dict(intensity_scale=float(np.round(base.intensity_scale * rng.uniform(0.5, 2))),
                      noise=float(np.round(base.noise * rng.uniform(0.7, 1.4), 4)),
                      first_post_s=float(base.first_post_s + rng.choice([-15, 0, 15, 30])))
    return Center(**{**base.__dict__, **jitter, "name": center_name(index)})


def _affine(center: Center, shape: Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Voxel -> scanner mm affine, and each array axis's anatomy coordinates (mm, 1-D).

    The anatomy frame is RAS with the origin on the chest wall under the breast; the field of
    view is centred on it left-right and superior-inferior, and reaches further anteriorly (the
    breast) than posteriorly (the chest).
    """
    world_axis = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    coords = []
    for i, (code, n, fov) in enumerate(zip(center.axcodes, shape, center.fov_mm, strict=True)):
        w, sign = world_axis[code]
        spacing = fov / n
        centre = 0.3 * fov if w == 1 else 0.0  # anterior room for the breast
        first = centre - sign * (n - 1) / 2 * spacing  # anatomy coordinate of voxel 0
        coords.append(first + sign * spacing * np.arange(n, dtype=np.float32))
        affine[w, i] = sign * spacing
        affine[w, 3] = first + center.table_mm[w]
    return affine, coords


# --------------------------------------------------------------------------------------------
# Clinical table
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Case:
    patient_id: str
    center: int        # index into the centre profiles
    number: int        # within the centre, from 1; with the centre, seeds the case's images
    true_class: int    # 0 zero, 1 low, 2 positive: the biology, known even when IHC/ISH are not
    ihc: str
    ish: str


def _split(total: int, shares: Sequence[float], rng: np.random.Generator) -> list[int]:
    """``total`` split by ``shares``: the floors, with the remaining units drawn by fraction."""
    exact = np.asarray(shares) * total
    counts = np.floor(exact).astype(int)
    left = total - counts.sum()
    if left:
        fraction = exact - counts
        extra = rng.choice(len(shares), size=left, replace=False, p=fraction / fraction.sum())
        counts[extra] += 1
    return counts.tolist()


def _draw_cases(patients: int, centers: int, seed: int) -> list[_Case]:
    """Patients, centres (as even as possible), true classes and recorded IHC / ISH."""
    rng = np.random.default_rng([seed, 0])
    per_center = [patients // centers + (k < patients % centers) for k in range(centers)]
    cases = []
    for k, n in enumerate(per_center):
        # Class counts per centre follow CLASS_MIX closely (each centre can be a test set and
        # needs every class), with the remainders drawn at random.
        classes = np.repeat([0, 1, 2], _split(n, CLASS_MIX, rng))
        rng.shuffle(classes)
        for number, cls in enumerate(classes, start=1):
            ihc, ish = _draw_ihc_ish(rng, int(cls))
            cases.append(_Case(f"PH{center_name(k)[7:]}_{number:04d}", k, number, int(cls),
                               ihc, ish))
    # A few IHC 2+ cases whose ISH result never arrived: their category is undetermined (their
    # biology still follows the true class). Tiny cohorts keep every case labelled.
    undetermined = round(_UNDETERMINED_SHARE * patients) if patients >= 10 else 0
    candidates = [i for i, c in enumerate(cases) if c.true_class > 0]
    for i in rng.choice(candidates, size=min(undetermined, len(candidates)), replace=False):
        cases[i] = _Case(**{**cases[i].__dict__, "ihc": "2+", "ish": ""})
    return cases


def _draw_ihc_ish(rng: np.random.Generator, true_class: int) -> tuple[str, str]:
    """Pathology as recorded: ISH is done for IHC 2+, occasionally for other scores."""
    if true_class == 0:
        return "0", ""
    if true_class == 1:  # HER2-low: IHC 1+, or 2+ with a negative ISH
        if rng.random() < 0.6:
            return "1+", "negative" if rng.random() < 0.05 else ""
        return "2+", "negative"
    if rng.random() < 0.75:  # HER2-positive: IHC 3+ (an ISH sometimes confirms), or 2+ / ISH+
        return "3+", "positive" if rng.random() < 0.1 else ""
    return "2+", "positive"


def _clinical_row(case: _Case, phases: int) -> dict:
    center = center_profile(case.center)
    label, _ = three_class(case.ihc, case.ish)  # None for IHC 2+ without ISH
    return dict(
        patient_id=case.patient_id,
        center=center.name,
        manufacturer=center.manufacturer,
        field_strength=center.field_strength,
        acquisition_times=";".join(f"{t:g}" for t in center.acquisition_times(phases)),
        ihc_score=case.ihc,
        ish_result=case.ish,
        her2="" if label is None else str(int(label == 2)),
        her2_class="" if label is None else _CLASSES[label],
    )


def clinical_table(patients: int, centers: int, seed: int, phases: int = 5) -> pd.DataFrame:
    """The clinical table ``write_cohort`` writes for these arguments, without any images.

    Cheap (no volumes), so class-mix statistics can be checked on large cohorts.

    Returns:
      One row per patient with ``CLINICAL_COLUMNS`` (all strings but ``field_strength``).
    """
    _check_counts(patients, centers, phases)
    rows = [_clinical_row(c, phases) for c in _draw_cases(patients, centers, seed)]
    return pd.DataFrame(rows, columns=list(CLINICAL_COLUMNS))


# --------------------------------------------------------------------------------------------
# Biology
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Tumour:
    diameter_mm: float      # equivalent-sphere diameter
    semi_axes: np.ndarray   # relative, product 1 (elongation)
    rotation: np.ndarray    # 3x3, tumour frame -> anatomy frame
    irregularity: float     # amplitude of the low-frequency radial margin noise
    amplitude: float        # A of the kinetic model
    wash_in: float          # alpha, 1/s
    washout: float          # beta, 1/s (0 = persistent)
    heterogeneity: float    # relative spread of A inside the tumour
    necrosis: float         # radius of the non-enhancing core, fraction of the radius
    edema_width: float      # oedema ring width, fraction of the radius
    edema_enhancement: float


def _draw_tumour(rng: np.random.Generator, true_class: int) -> _Tumour:
    shift = true_class - 1  # -1 zero, 0 low, +1 positive

    def z(effect: str) -> float:
        return _CLASS_EFFECTS[effect] * shift + rng.standard_normal()

    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    rotation = q * np.sign(np.diag(r))  # a uniformly random orientation
    semi_axes = np.exp(rng.normal(0, 0.15, 3))
    necrosis_z = z("necrosis")
    return _Tumour(
        diameter_mm=float(np.clip(20 * math.exp(0.3 * z("size")), 8, 45)),
        semi_axes=semi_axes / np.prod(semi_axes) ** (1 / 3),
        rotation=rotation,
        irregularity=float(np.clip(0.12 * math.exp(0.45 * z("irregularity")), 0.02, 0.4)),
        amplitude=float(1.4 * math.exp(rng.normal(0, 0.2))),
        wash_in=float(0.018 * math.exp(0.3 * z("wash_in"))),
        washout=float(max(0.0, 0.0011 + 0.0007 * z("washout"))),
        heterogeneity=float(0.2 * math.exp(0.4 * z("heterogeneity"))),
        # Only the upper tail has a necrotic core (more of the positive tumours).
        necrosis=float(np.clip(0.2 + 0.2 * (necrosis_z - 0.7), 0, 0.6)) if necrosis_z > 0.7
        else 0.0,
        # Extent and strength drawn apart: a wide faint ring or a narrow bright one.
        edema_width=float(np.clip(0.3 * math.exp(0.5 * z("edema")), 0.05, 1.0)),
        edema_enhancement=float(0.25 * math.exp(0.3 * z("edema"))),
    )


def _curve(t: float | np.ndarray, alpha, beta):
    """Relative enhancement shape (1 - exp(-alpha t)) exp(-beta t) of the kinetic model."""
    return (1 - np.exp(-alpha * t)) * np.exp(-beta * t)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _smooth_field(rng: np.random.Generator, shape: Sequence[int],
                  scale_vox: Sequence[float]) -> np.ndarray:
    """A smooth random field with unit variance, correlated over ~``scale_vox`` voxels per axis.

    Separable Gaussian interpolation of i.i.d. normal values on a coarse grid of nodes: three
    small matrix products instead of a full-volume filter, so a 256x256x96 field costs ~50 ms.
    """
    mats = []
    for n, scale in zip(shape, scale_vox, strict=True):
        step = max(float(scale), 1.0)
        nodes = np.arange(-2 * step, n + 2 * step, step)
        w = np.exp(-0.5 * ((np.arange(n)[:, None] - nodes[None, :]) / (0.7 * step)) ** 2)
        w /= np.sqrt((w ** 2).sum(axis=1, keepdims=True))  # unit variance at every voxel
        mats.append(w.astype(np.float32))
    field = rng.standard_normal([m.shape[1] for m in mats], dtype=np.float32)
    field = np.tensordot(field, mats[2], axes=(2, 1))   # (k0, k1, n2)
    field = np.tensordot(mats[1], field, axes=(1, 1))   # (n1, k0, n2)
    return np.tensordot(mats[0], field, axes=(1, 1))    # (n0, n1, n2)


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """0 -> 1 as ``x`` goes from -width/2 to +width/2: a partial-volume edge."""
    return np.clip(x / width + 0.5, 0, 1)


@dataclass(frozen=True)
class _Grid:
    """A centre's voxel grid seen from the anatomy.

    ``x``, ``y``, ``z`` are the anatomy coordinates (mm; right, anterior, superior) of the
    voxels as 1-D arrays shaped to broadcast over the array grid, so geometry costs a few
    full-volume passes whatever the orientation.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray      # 4x4, voxel -> scanner mm
    coords: list            # per array axis, 1-D anatomy coordinate along its world axis
    spacing: np.ndarray     # mm per array axis
    axis_of: list           # array axis holding world axis 0 (x), 1 (y), 2 (z)
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    @classmethod
    def of(cls, center: Center, shape: tuple[int, int, int]) -> _Grid:
        affine, coords = _affine(center, shape)
        axis_of = [next(i for i, c in enumerate(center.axcodes) if c in pair)
                   for pair in ("RL", "AP", "SI")]
        x, y, z = (_along(coords[a], a) for a in axis_of)
        spacing = np.asarray(center.fov_mm, dtype=np.float64) / np.asarray(shape)
        return cls(shape, affine, coords, spacing, axis_of, x, y, z)

    def vox(self, mm: float) -> np.ndarray:
        """A length in voxels along each array axis."""
        return mm / self.spacing

    @property
    def edge(self) -> float:
        """Width (mm) of partial-volume tissue boundaries: one voxel."""
        return float(self.spacing.min())


@dataclass(frozen=True)
class _Anatomy:
    """The breast without the tumour: ``S(t) = base + enh_fgt g_fgt(t) + enh_muscle g_m(t)``."""

    base: np.ndarray          # [X, Y, Z] float32, pre-contrast signal
    enh_fgt: np.ndarray       # [X, Y, Z] float32, parenchymal enhancement amplitude
    enh_muscle: np.ndarray    # [X, Y, Z] float32, chest-wall muscle enhancement amplitude
    scaled_bias: np.ndarray   # [X, Y, Z] float32, intensity scale x bias field
    radii: tuple[float, float, float]  # breast half-ellipsoid semi-axes (mm)


def _anatomy(rng: np.random.Generator, grid: _Grid, center: Center) -> _Anatomy:
    x, y, z, edge = grid.x, grid.y, grid.z, grid.edge
    fov = [center.fov_mm[a] for a in grid.axis_of]
    # Breast: a half-ellipsoid in front of a chest wall that curves backwards laterally.
    rx = rng.uniform(0.34, 0.44) * fov[0]
    ry = rng.uniform(0.28, 0.48) * fov[1]
    rz = rng.uniform(0.36, 0.44) * fov[2]
    depth = y + _WALL_CURVATURE * x ** 2  # mm in front of the chest wall
    r2 = (x / rx) ** 2 + (np.maximum(depth, 0) / ry) ** 2 + (z / rz) ** 2
    r = np.sqrt(r2)
    breast = _ramp((1 - r) * ry, edge) * _ramp(depth, edge)
    skin = breast * _ramp(r - (1 - 2.0 / ry), 2 * edge)
    muscle = _ramp(depth + 14, edge) * _ramp(-depth, edge)
    thorax = _ramp(-depth - 14, edge)

    # Fibroglandular tissue: two octaves of texture, denser deep in the breast, density per case.
    texture = 0.8 * _smooth_field(rng, grid.shape, grid.vox(14))
    texture += 0.5 * _smooth_field(rng, grid.shape, grid.vox(5))
    texture += 1.5 * (1 - r2) - rng.uniform(0.2, 1.6)
    fgt = breast * (1 - skin) * _ramp(texture, 0.8)
    fat = breast * (1 - skin) - fgt
    # Fat-suppressed T1: fat grey, parenchyma and skin brighter, the thorax dark.
    s0 = 0.30 * fat + 0.55 * fgt + 0.5 * skin + 0.45 * muscle + 0.12 * thorax

    scaled_bias = center.intensity_scale * np.exp(
        center.bias * _smooth_field(rng, grid.shape, grid.vox(90)))
    bpe = rng.uniform(0.05, 0.35)  # background parenchymal enhancement: mild, persistent
    return _Anatomy(base=(scaled_bias * s0).astype(np.float32),
                    enh_fgt=(scaled_bias * (0.55 * bpe) * fgt).astype(np.float32),
                    enh_muscle=(scaled_bias * (0.45 * 0.5) * muscle).astype(np.float32),
                    scaled_bias=scaled_bias.astype(np.float32), radii=(rx, ry, rz))


@dataclass(frozen=True)
class _Lesion:
    """The tumour and its oedema on a bounding box ``box`` of the grid (all arrays box-sized)."""

    box: tuple[slice, slice, slice]
    inside: np.ndarray     # tumour fraction per voxel (partial volume at the margin)
    mask: np.ndarray       # uint8, tumour = 1
    s0: np.ndarray         # tumour pre-contrast signal
    amplitude: np.ndarray  # per-voxel A, alpha, beta of the kinetic model
    alpha: np.ndarray
    beta: np.ndarray
    edema: np.ndarray      # oedema enhancement amplitude added to the background


def _lesion(rng: np.random.Generator, tumour: _Tumour, grid: _Grid,
            anatomy: _Anatomy) -> _Lesion:
    # The tumour sits in the breast away from the skin.
    rx, ry, rz = anatomy.radii
    radius = tumour.diameter_mm / 2
    reach = radius * tumour.semi_axes.max() * (1 + 2 * tumour.irregularity + tumour.edema_width)
    centre = np.array([rng.uniform(-0.35, 0.35) * rx, rng.uniform(0.3, 0.55) * ry,
                       rng.uniform(-0.3, 0.3) * rz])
    centre[1] -= _WALL_CURVATURE * centre[0] ** 2
    box = [slice(None)] * 3
    for w, a in enumerate(grid.axis_of):
        near = np.flatnonzero(np.abs(grid.coords[a] - centre[w]) <= reach + grid.spacing[a])
        box[a] = slice(near.min(), near.max() + 1)
    box = tuple(box)

    offsets = np.stack(np.broadcast_arrays(*(c[_crop(c, box)] - c0 for c, c0 in
                                             zip((grid.x, grid.y, grid.z), centre, strict=True))))
    u = np.einsum("ji,j...->i...", tumour.rotation, offsets) / (
        radius * tumour.semi_axes)[:, None, None, None]
    rho = np.sqrt((u ** 2).sum(axis=0)) + 1e-6  # 1 on the (smooth) ellipsoid surface
    margin = np.ones_like(rho)  # where the irregular surface lies along each direction
    for _ in range(6):  # low-frequency radial noise: lobulated, irregular margins
        v = rng.standard_normal(3)
        freq, phase = rng.uniform(1, 3.5), rng.uniform(0, 2 * np.pi)
        cosine = np.einsum("i,i...->...", v / np.linalg.norm(v), u) / rho
        margin += tumour.irregularity / math.sqrt(3) * np.sin(freq * np.pi * cosine + phase)
    depth_mm = (margin - rho) * radius  # > 0 inside the tumour
    inside = _ramp(depth_mm, grid.edge)
    mask = (depth_mm >= 0).astype(np.uint8)
    if not mask.any():  # a tiny tumour on a coarse grid: keep at least its central voxel
        mask[np.unravel_index(np.argmax(depth_mm), depth_mm.shape)] = 1
        inside = np.maximum(inside, mask)

    het = tumour.heterogeneity * _smooth_field(rng, rho.shape, grid.vox(6))
    core = _ramp(tumour.necrosis * margin - rho, 0.15) if tumour.necrosis > 0 else 0.0
    s0 = anatomy.scaled_bias[box] * (0.55 - 0.1 * core) * np.exp(
        0.05 * _smooth_field(rng, rho.shape, grid.vox(4)))
    edema = np.clip(1 - (rho - margin) / tumour.edema_width, 0, 1) * (rho > margin)
    return _Lesion(
        box=box, inside=inside, mask=mask, s0=s0,
        amplitude=np.maximum(tumour.amplitude * (1 + het) * (1 - 0.92 * core), 0.02),
        alpha=tumour.wash_in * np.exp(0.5 * het),
        beta=tumour.washout * np.clip(1 + 1.5 * het, 0.2, None),
        edema=anatomy.base[box] * (tumour.edema_enhancement * edema))


def _render(case: _Case, center: Center, shape: tuple[int, int, int], phases: int, seed: int):
    """One case's images and tumour mask.

    Returns:
      (images: P arrays [X, Y, Z] int16, phase 0 pre-contrast; mask: [X, Y, Z] uint8;
      affine: 4x4 float64, voxel -> scanner mm)
    """
    rng = np.random.default_rng([seed, 1, case.center, case.number])
    tumour = _draw_tumour(rng, case.true_class)
    grid = _Grid.of(center, shape)
    anatomy = _anatomy(rng, grid, center)
    lesion = _lesion(rng, tumour, grid, anatomy)
    box, inside = lesion.box, lesion.inside

    noise = np.float32(center.noise * center.intensity_scale)
    images = []
    img, scratch = np.empty(shape, np.float32), np.empty(shape, np.float32)
    for t in center.acquisition_times(phases):
        # In place: on a 256x256x96 grid a fresh array per operation costs more than the maths.
        np.multiply(anatomy.enh_fgt, np.float32(_curve(t, 0.006, 0.0)), out=img)
        img += anatomy.base
        img += np.multiply(anatomy.enh_muscle, np.float32(_curve(t, 0.02, 0.0005)), out=scratch)
        background = img[box] + lesion.edema * _curve(t, 0.01, 0.0)  # oedema: slow, persistent
        tumour_signal = lesion.s0 * (1 + lesion.amplitude * _curve(t, lesion.alpha, lesion.beta))
        img[box] = (1 - inside) * background + inside * tumour_signal
        img += np.multiply(rng.standard_normal(dtype=np.float32, out=scratch), noise, out=scratch)
        np.abs(img, out=img)  # magnitude images: noise in air is Rician-like, never negative
        img += 0.5  # with the truncation below: round half up (the values are >= 0)
        np.minimum(img, 32767, out=img)
        images.append(img.astype(np.int16))
    mask = np.zeros(shape, np.uint8)
    mask[box] = lesion.mask
    return images, mask, grid.affine


_WALL_CURVATURE = 0.0025  # 1/mm: the chest wall lies 16 mm further back 80 mm to the side


def _along(values: np.ndarray, axis: int) -> np.ndarray:
    """A 1-D array viewed along array axis ``axis`` of a 3-D grid (size 1 on the others)."""
    view = [1, 1, 1]
    view[axis] = -1
    return values.reshape(view)


def _crop(a: np.ndarray, box: tuple[slice, ...]) -> tuple[slice, ...]:
    """The part of ``box`` that applies to a broadcastable array (its size-1 axes stay whole)."""
    return tuple(s if n > 1 else slice(None) for s, n in zip(box, a.shape, strict=True))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def _parse_shape(shape: Sequence[int] | str) -> tuple[int, int, int]:
    """(X, Y, Z) from a sequence or a string such as "128,128,64"; raises if unusable."""
    problem = f"bad shape {shape!r}: expected three sizes of at least {MIN_SIDE} voxels, " \
              "such as 128,128,64"
    try:
        parsed = tuple(int(s) for s in (shape.split(",") if isinstance(shape, str) else shape))
    except (TypeError, ValueError):
        raise Her2jaxError(problem, key="shape") from None
    if len(parsed) != 3 or min(parsed) < MIN_SIDE:
        raise Her2jaxError(problem, key="shape")
    return parsed


def _check_counts(patients: int, centers: int, phases: int) -> None:
    if centers < 1:
        raise Her2jaxError(f"must be at least 1, got {centers}", key="centers")
    if patients < centers:
        raise Her2jaxError(f"{patients} patients for {centers} centres: every centre needs at "
                           "least one patient", key="patients")
    if phases < MIN_PHASES:
        raise Her2jaxError(f"must be at least {MIN_PHASES} (pre-contrast + 3 post-contrast), "
                           f"got {phases}", key="phases")
    if phases > 10:  # MAMA-MIA's <pid>_000<k> names carry one digit
        raise Her2jaxError(f"must be at most 10, got {phases}", key="phases")


def _prepare_dir(root: Path) -> None:
    """Creates ``root``, or empties a previous phantom there; refuses anything else."""
    if root.exists() and not root.is_dir():
        raise Her2jaxError("exists and is not a directory", file=root)
    if root.is_dir() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise Her2jaxError("exists, is not empty and holds no phantom (no phantom.json): "
                               "choose a new or empty directory", file=root)
        # Clinical table first: from here on the directory reads as incomplete.
        (root / "clinical.csv").unlink(missing_ok=True)
        (root / "clinical.csv.partial").unlink(missing_ok=True)
        for sub in ("images", "segmentations"):
            shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)  # scanner coordinates
    image.set_sform(affine, code=1)
    nib.save(image, path)


def write_cohort(out, *, patients: int, centers: int, seed: int,
                 shape: Sequence[int] | str = (128, 128, 64), phases: int = 5) -> Path:
    """Writes a synthetic multi-centre DCE-MRI cohort in the MAMA-MIA layout.

    Args:
      out: directory to write into; created if missing, or a previous phantom (replaced).
      patients: number of cases, split evenly over the centres.
      centers: number of centres (sites), named CENTER_A, CENTER_B, ...
      seed: the same seed (with the same other arguments) gives byte-identical files.
      shape: array shape (X, Y, Z) of every image, or a string "128,128,64".
      phases: number of phases, the pre-contrast one included (at least 4).

    Returns:
      ``Path(out)``, the cohort root.

    Raises:
      Her2jaxError: on bad arguments, or when ``out`` holds something other than a phantom.
    """
    shape = _parse_shape(shape)
    _check_counts(patients, centers, phases)
    root = Path(out)
    _prepare_dir(root)
    params = dict(generator="her2jax.data.phantom", patients=patients, centers=centers, seed=seed,
                  shape=list(shape), phases=phases,
                  acquisition_times="seconds after contrast injection per phase, ';'-separated")
    (root / MARKER).write_text(json.dumps(params, indent=2) + "\n")
    masks = root / "segmentations" / "expert"
    masks.mkdir(parents=True, exist_ok=True)

    def write_case(case: _Case) -> dict:
        images, mask, affine = _render(case, center_profile(case.center), shape, phases, seed)
        folder = root / "images" / case.patient_id
        folder.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(images):
            _save(image, affine, folder / f"{case.patient_id}_{k:04d}.nii.gz")
        _save(mask, affine, masks / f"{case.patient_id}.nii.gz")
        return _clinical_row(case, phases)

    # Threads overlap the gzip compression (half the cost of a realistic case) and the numpy
    # work, both of which release the GIL; every case has its own random stream, so the files
    # do not depend on the order in which the cases finish. Four cases in flight bound memory
    # (~0.4 GB each at 256x256x96).
    pool = ThreadPoolExecutor(max_workers=min(_WORKERS, os.cpu_count() or 1))
    try:
        rows = list(pool.map(write_case, _draw_cases(patients, centers, seed)))
    finally:  # on an error or Ctrl-C, drop the queued cases instead of rendering them all
        pool.shutdown(wait=True, cancel_futures=True)
    table = pd.DataFrame(rows, columns=list(CLINICAL_COLUMNS)).sort_values("patient_id")
    partial = root / "clinical.csv.partial"
    table.to_csv(partial, index=False)
    os.replace(partial, root / "clinical.csv")  # last: its presence means the cohort is complete
    return root
