"""DICOM DCE-MRI -> the MAMA-MIA layout: series grouped, phases identified, geometry checked.

  her2jax-dicom --dicom=DIR --out=COHORT [--boxes=...] [--masks=DIR] [--skip_invalid] ...

Steps, per patient (``PatientID``):

1. **Read** every file under ``--dicom`` (headers only; pixels later, one volume at a time).
   Files without the DICOM preamble are skipped and counted; a DICOM object that is not an MR
   image (another modality, a structured report, a presentation state: anything without
   pixels or with another SOP class) is refused, naming the file.
2. **Series** (``SeriesInstanceUID``): those whose ``SeriesDescription`` matches
   ``--series_regex`` (default: the DCE names of Duke, I-SPY and the vendors: ``dyn``,
   ``dce``, ``vibrant``, ``thrive``, ``twist``, ``fl3d``, ``pre``, ``post``, ``pass``,
   ``ph<k>``, ``S<k>``) are the dynamic series.
3. **Volumes**: a series whose slice positions repeat holds several phases (I-SPY2's
   multi-volume series). Its slices are told apart by ``TemporalPositionIdentifier``, else by
   the rank of each position's slices in ``TriggerTime`` (Philips), ``ContentTime`` (GE,
   Siemens) or ``AcquisitionTime``; the phases' time ranges must not overlap. A series
   without repeats is one volume.
4. **Phases**: the volumes of one multi-volume series in temporal order, or the single-volume
   series ordered by acquisition time (``AcquisitionTime``, else ``ContentTime``, else
   ``SeriesTime``). The first must be the pre-contrast one (a description saying ``pre`` on a
   later series, ordinals in the descriptions that disagree with the times, or two phases
   at the same time are an ambiguous order: refused).
5. **Geometry** of every volume: slices sorted by ``ImagePositionPatient`` along the slice
   normal (the cross product of the ``ImageOrientationPatient`` axes), so a series stored in
   reverse order reads the same; one orientation, pixel spacing and matrix per series;
   equally spaced positions (a gap is a missing slice, a repeat a duplicated one); every
   phase on the same grid. The affine maps (column, row, slice) indices to RAS millimetres
   (DICOM's LPS with x and y negated), as NIfTI and nibabel expect; pixel values go through
   ``RescaleSlope`` / ``RescaleIntercept``.

Output (written to a temporary sibling, renamed into place: a refusal leaves nothing):
``images/<pid>/<pid>_000k.nii.gz`` (k = phase, 0 pre-contrast),
``segmentations/expert/<pid>.nii.gz`` (a Duke box from ``--boxes``, or a mask from
``--masks``, on the phases' grid), ``qc/<pid>.png`` (each phase's slice through the tumour,
its outline drawn), ``clinical.csv`` (a stub:
patient_id, center = InstitutionName, manufacturer, field_strength, acquisition_times in
seconds after ``ContrastBolusStartTime`` when the files give it, and empty label columns to
fill), and ``dicom_manifest.csv``: per patient and phase the series UID, description, time
after injection (or after the first phase), slice count, voxel spacing and how the phase was
identified. With ``--skip_invalid`` the patients that pass are written and the others (and
refused files) listed with the reason in ``dicom_rejected.csv``. DCE series of two studies
(visits) under one patient are refused: keep one visit per patient.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import re
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from her2jax.data import cohort, phantom
from her2jax.errors import Her2jaxError

DEFAULT_SERIES_REGEX = (r"dyn|dce|vibrant|thrive|twist|fl3d|\bpre\b|pre[-_ ]?contrast|post|pass"
                        r"|\bph\s*\d|\bs\d\b")
MANIFEST = "dicom_manifest.csv"
REJECTED = "dicom_rejected.csv"
MANIFEST_COLUMNS = ("patient_id", "phase", "series_uid", "series_description",
                    "time_after_injection_s", "time_after_first_s", "slices", "spacing_mm",
                    "shape", "identified_by")
# The clinical table of the MAMA-MIA layout as the phantom writes it (prepare's default columns).
CLINICAL_COLUMNS = phantom.CLINICAL_COLUMNS
# MR Image Storage and Enhanced MR Image Storage.
MR_IMAGE_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1")
_PRE = re.compile(r"\bpre\b|pre[-_ ]?contrast|non[-_ ]?contrast|\bph\s*0\b|\bs0\b|ph0/", re.I)
_ORDINAL = re.compile(r"(\d+)\s*(?:st|nd|rd|th)\b|\bph\s*(\d+)|\bpost\s*(\d+)|\bs(\d+)\b"
                      r"|phase\s*(\d+)", re.I)
_TOLERANCE = 1e-3      # relative: orientation cosines, spacings
_SPACING_SPREAD = 0.01  # relative spread of slice spacings accepted as equal


@dataclasses.dataclass
class Slice:
    """One image file's header facts (pixels are read later)."""

    path: Path
    patient: str
    study: str                 # StudyInstanceUID: one visit
    series: str
    description: str
    position: np.ndarray       # ImagePositionPatient (LPS mm)
    orientation: np.ndarray    # ImageOrientationPatient: row then column direction cosines
    spacing: tuple[float, float]   # PixelSpacing: between rows, between columns
    matrix: tuple[int, int]    # Rows, Columns
    times: dict                # tag name -> seconds (times of day) or milliseconds -> s
    temporal_position: int | None
    instance: int | None       # InstanceNumber
    institution: str
    manufacturer: str
    field_strength: str
    bolus_start: float | None  # ContrastBolusStartTime, seconds of the day


@dataclasses.dataclass
class Volume:
    """One phase: its slices in order along the normal, and where it came from."""

    slices: list[Slice]
    series: str
    description: str
    time: float | None          # seconds of the day (or TriggerTime seconds)
    identified_by: str


def _seconds(value) -> float | None:
    """A DICOM TM (HHMMSS.FFFFFF, fields optional) as seconds of the day."""
    text = str(value or "").strip().replace(":", "")
    if not text:
        return None
    try:
        hours, minutes = int(text[0:2]), int(text[2:4] or 0)
        seconds = float(text[4:] or 0)
    except ValueError:
        return None
    return hours * 3600 + minutes * 60 + seconds


def _number_text(value) -> str:
    """A DS value as the shortest decimal ('3' for 3.0), or '' when absent or not a number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{number:g}" if math.isfinite(number) else ""


def _floats(value, n: int, what: str, path: Path) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], np.float64)
    except (TypeError, ValueError):
        out = np.zeros(0)
    if out.shape != (n,) or not np.isfinite(out).all():
        raise Her2jaxError(f"has no valid {what} (needs {n} numbers, got {value!r})",
                           file=str(path))
    return out


@contextlib.contextmanager
def _quiet_validation():
    """pydicom's value checks off while reading: a malformed value raises where it is used
    (one line naming the file) instead of also printing a multi-line warning."""
    import pydicom

    settings = pydicom.config.settings
    before = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode = before


def read_header(path: Path):
    """The file's dataset without pixels, or None when it is not a DICOM file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    except (OSError, EOFError, ValueError) as error:
        raise Her2jaxError(f"cannot be read as DICOM ({error})", file=str(path)) from None


def slice_of(path: Path, ds) -> Slice:
    """The facts of one MR image file; refuses what is not an MR image."""
    modality = str(ds.get("Modality", ""))
    sop_class = str(ds.get("SOPClassUID", ""))
    if modality != "MR":
        raise Her2jaxError(f"is a {modality or 'modality-less'} object (SOP class {sop_class}"
                           "), not an MR image", file=str(path))
    if sop_class not in MR_IMAGE_SOP_CLASSES or "Rows" not in ds:
        raise Her2jaxError(f"is not an MR image (SOP class {sop_class or 'none'}): a report, "
                           "presentation state or other non-image object", file=str(path))
    if sop_class == MR_IMAGE_SOP_CLASSES[1]:
        raise Her2jaxError("is an Enhanced MR (multi-frame) object; export the series as "
                           "classic single-frame MR images", file=str(path))
    try:
        return _facts(path, ds)
    except (TypeError, ValueError, AttributeError) as error:
        raise Her2jaxError(f"has a malformed header value ({error})", file=str(path)) from None


def _facts(path: Path, ds) -> Slice:
    times = {}
    for tag in ("AcquisitionTime", "ContentTime", "SeriesTime"):
        t = _seconds(ds.get(tag))
        if t is not None:
            times[tag] = t
    if ds.get("TriggerTime") not in (None, ""):
        times["TriggerTime"] = float(ds.TriggerTime) / 1000.0
    temporal = ds.get("TemporalPositionIdentifier")
    return Slice(
        path=path, patient=str(ds.get("PatientID", "")).strip(),
        study=str(ds.get("StudyInstanceUID", "")),
        series=str(ds.get("SeriesInstanceUID", "")),
        description=str(ds.get("SeriesDescription", "")).strip(),
        position=_floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", path),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient",
                            path),
        spacing=tuple(_floats(ds.get("PixelSpacing"), 2, "PixelSpacing", path)),
        matrix=(int(ds.Rows), int(ds.Columns)), times=times,
        temporal_position=int(temporal) if temporal not in (None, "") else None,
        instance=int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
        institution=str(ds.get("InstitutionName", "")).strip(),
        manufacturer=str(ds.get("Manufacturer", "")).strip(),
        field_strength=_number_text(ds.get("MagneticFieldStrength")),
        bolus_start=_seconds(ds.get("ContrastBolusStartTime")))


def scan(root: Path, *, skip_invalid: bool = False) -> tuple[list[Slice], int, list[dict]]:
    """Every MR image slice under ``root``, the number of non-DICOM files skipped, and (with
    ``skip_invalid``; otherwise the first one raises) the refused DICOM files as
    ``{"patient_id", "file", "reason"}``."""
    slices, skipped, refused = [], 0, []
    with _quiet_validation():
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
            ds = None
            try:
                ds = read_header(path)
                if ds is None:
                    skipped += 1
                    continue
                slices.append(slice_of(path, ds))
            except Her2jaxError as error:
                if not skip_invalid:
                    raise
                patient = str(ds.get("PatientID", "")).strip() if ds is not None else ""
                refused.append(dict(patient_id=patient, file=str(path), reason=error.reason))
    return slices, skipped, refused


# ---------------------------------------------------------------- geometry


def _normal(orientation: np.ndarray) -> np.ndarray:
    return np.cross(orientation[:3], orientation[3:])


def _order(slices: Sequence[Slice], where: str) -> list[Slice]:
    """The slices of one volume sorted along the normal, after the geometry checks."""
    first = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.orientation, first.orientation, atol=_TOLERANCE):
            raise Her2jaxError(f"{where}: slices of two orientations in one series "
                               f"({first.path.name}: {first.orientation.round(4).tolist()}, "
                               f"{s.path.name}: {s.orientation.round(4).tolist()})",
                               file=str(s.path))
        if s.matrix != first.matrix or not np.allclose(s.spacing, first.spacing,
                                                       rtol=_TOLERANCE):
            raise Her2jaxError(f"{where}: slices of two matrices or pixel spacings in one "
                               f"series ({first.matrix} at {first.spacing} mm, {s.matrix} at "
                               f"{s.spacing} mm)", file=str(s.path))
    normal = _normal(first.orientation)
    ordered = sorted(slices, key=lambda s: float(s.position @ normal))
    depth = np.array([float(s.position @ normal) for s in ordered])
    if len(ordered) < 2:
        raise Her2jaxError(f"{where}: a single slice is not a volume", file=str(first.path))
    steps = np.diff(depth)
    for k, step in enumerate(steps):
        if step < 1e-3:
            raise Her2jaxError(f"{where}: duplicated slice at {depth[k]:.2f} mm along the "
                               f"normal ({ordered[k].path.name} and "
                               f"{ordered[k + 1].path.name})", file=str(ordered[k + 1].path))
    typical = float(np.median(steps))
    for k, step in enumerate(steps):
        if step > 1.5 * typical:
            missing = round(step / typical) - 1
            raise Her2jaxError(f"{where}: {missing} missing slice(s) between "
                               f"{depth[k]:.2f} and {depth[k + 1]:.2f} mm along the normal "
                               f"(spacing {typical:.3g} mm elsewhere)",
                               file=str(ordered[k + 1].path))
    if steps.max() - steps.min() > _SPACING_SPREAD * typical:
        raise Her2jaxError(f"{where}: inconsistent slice spacing ({steps.min():.3g} to "
                           f"{steps.max():.3g} mm)", file=str(first.path))
    # Every slice on the line from the first to the last: an affine describes the stack.
    step = (ordered[-1].position - ordered[0].position) / (len(ordered) - 1)
    for k, s in enumerate(ordered):
        off = float(np.linalg.norm(s.position - (ordered[0].position + k * step)))
        if off > max(0.01 * typical, 1e-2):
            raise Her2jaxError(f"{where}: slice {k} lies {off:.3g} mm off the line through "
                               "the others (a gantry tilt that varies, or slices of two "
                               "stacks): no single affine describes the volume",
                               file=str(s.path))
    return ordered


def affine_of(ordered: Sequence[Slice]) -> np.ndarray:
    """The RAS affine of (column, row, slice) indices of slices sorted along the normal."""
    first = ordered[0]
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    between_rows, between_columns = first.spacing
    step = (ordered[-1].position - first.position) / (len(ordered) - 1)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * between_columns     # along a row: the column index grows
    lps[:3, 1] = col_dir * between_rows        # down a column: the row index grows
    lps[:3, 2] = step
    lps[:3, 3] = first.position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def read_pixels(ordered: Sequence[Slice]) -> np.ndarray:
    """The volume [columns, rows, slices] float32 (rescaled), slices in the given order."""
    with _quiet_validation():
        return np.stack([_plane(s) for s in ordered], axis=-1)


def _plane(s: Slice) -> np.ndarray:
    """One slice's rescaled pixels [columns, rows] float32."""
    import pydicom

    ds = pydicom.dcmread(s.path)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError, ValueError, AttributeError) as error:
        name = getattr(syntax, "name", str(syntax))
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        if syntax is not None and not getattr(syntax, "is_compressed", True):
            raise Her2jaxError(f"pixel data cannot be read ({reason}): a truncated or "
                               "damaged file?", file=str(s.path)) from None
        raise Her2jaxError(f"pixel data in transfer syntax {name} ({syntax}) cannot be "
                           f"decoded here ({reason}); convert the series to an "
                           "uncompressed syntax first (e.g. gdcmconv --raw)",
                           file=str(s.path)) from None
    if pixels.shape != s.matrix:
        raise Her2jaxError(f"holds {pixels.shape} pixels where Rows x Columns say "
                           f"{s.matrix}", file=str(s.path))
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError) as error:
        raise Her2jaxError(f"has a malformed RescaleSlope / RescaleIntercept ({error})",
                           file=str(s.path)) from None
    return (pixels.astype(np.float32) * slope + intercept).T


# ---------------------------------------------------------------- volumes and phases


def _time_tag(slices: Iterable[Slice], order: Sequence[str]) -> str | None:
    slices = list(slices)
    for tag in order:
        if all(tag in s.times for s in slices):
            return tag
    return None


def split_volumes(series: Sequence[Slice], where: str) -> list[Volume]:
    """The volumes of one series in temporal order (one when no position repeats)."""
    first = series[0]
    normal = _normal(first.orientation)
    by_position = defaultdict(list)
    for s in series:
        by_position[round(float(s.position @ normal), 2)].append(s)
    per_position = [len(v) for v in by_position.values()]
    counts = set(per_position)
    time_tag = _time_tag(series, ("AcquisitionTime", "ContentTime", "SeriesTime"))
    if max(set(per_position), key=per_position.count) == 1:
        # One volume (a repeated position in it is a duplicated slice, named by _order).
        times = [s.times[time_tag] for s in series] if time_tag else []
        return [Volume(_order(series, where), first.series, first.description,
                       min(times) if times else None, "one volume per series")]
    if len(counts) != 1:
        raise Her2jaxError(f"{where}: slice positions repeat unevenly ({sorted(counts)} slices "
                           "per position): missing or duplicated slices in a multi-volume "
                           "series", file=str(first.path))
    phases = counts.pop()
    if all(s.temporal_position is not None for s in series):
        groups = defaultdict(list)
        for s in series:
            groups[s.temporal_position].append(s)
        if len(groups) != phases:
            raise Her2jaxError(f"{where}: {len(groups)} TemporalPositionIdentifier values for "
                               f"{phases} slices per position", file=str(first.path))
        ordered_groups = [groups[k] for k in sorted(groups)]
        how = "TemporalPositionIdentifier"
        tag = _time_tag(series, ("TriggerTime", "ContentTime", "AcquisitionTime"))
    else:
        tag = _time_tag(series, ("TriggerTime", "ContentTime", "AcquisitionTime"))
        if tag is None:
            raise Her2jaxError(f"{where}: {phases} slices per position and no "
                               "TemporalPositionIdentifier, TriggerTime, ContentTime or "
                               "AcquisitionTime to tell the phases apart",
                               file=str(first.path))
        ordered_groups = [[] for _ in range(phases)]
        for same_place in by_position.values():
            ranked = sorted(same_place, key=lambda s: s.times[tag])
            if len({s.times[tag] for s in ranked}) != phases:
                raise Her2jaxError(f"{where}: two slices at one position share a {tag}: the "
                                   "phase order is ambiguous", file=str(ranked[0].path))
            for k, s in enumerate(ranked):
                ordered_groups[k].append(s)
        how = f"rank in {tag} per slice position"
    if tag is not None:
        for k in range(phases - 1):
            late = max(s.times[tag] for s in ordered_groups[k])
            early = min(s.times[tag] for s in ordered_groups[k + 1])
            if late >= early:
                raise Her2jaxError(f"{where}: phases {k} and {k + 1} overlap in {tag} "
                                   f"({late:g} >= {early:g} s): the phase order is ambiguous",
                                   file=str(first.path))
    return [Volume(_order(group, f"{where} phase {k}"), first.series, first.description,
                   _clock(series, group, tag), how)
            for k, group in enumerate(ordered_groups)]


def _clock(series: Sequence[Slice], group: Sequence[Slice], tag: str | None) -> float | None:
    """A phase's time of day in seconds: its earliest slice's clock tag, or, for a phase told
    apart by TriggerTime (milliseconds from the series' start), the series' start plus it."""
    if tag is None:
        return None
    if tag != "TriggerTime":
        return min(s.times[tag] for s in group)
    start = _time_tag(series, ("AcquisitionTime", "ContentTime", "SeriesTime"))
    if start is None:
        return None
    return min(s.times[start] for s in series) + min(s.times[tag] for s in group)


def _ordinal(description: str) -> int | None:
    match = _ORDINAL.search(description)
    if not match:
        return None
    return int(next(g for g in match.groups() if g is not None))


def identify_phases(patient: str, slices: Sequence[Slice], *, series_regex: str,
                    min_phases: int, needed_by: str = "--min_phases") -> list[Volume]:
    """The patient's DCE phases, pre-contrast first (see the module docstring)."""
    pattern = re.compile(series_regex, re.I)
    by_series = defaultdict(list)
    for s in slices:
        by_series[s.series].append(s)
    dynamic = {uid: group for uid, group in by_series.items()
               if pattern.search(group[0].description)}
    names = sorted({group[0].description for group in by_series.values()})
    if not dynamic:
        raise Her2jaxError(f"no series matches --series_regex ({len(by_series)} series: "
                           f"{'; '.join(names)[:300]})", patient=patient)
    studies = {group[0].study for group in dynamic.values()}
    if len(studies) > 1:
        raise Her2jaxError(f"DCE series from {len(studies)} studies (visits): keep one visit "
                           "per patient under --dicom", patient=patient)
    volumes = {uid: split_volumes(group, f"series {group[0].description!r}")
               for uid, group in dynamic.items()}
    multi = [uid for uid, v in volumes.items() if len(v) > 1]
    if multi:
        if len(multi) > 1:
            raise Her2jaxError("several multi-volume DCE series ("
                               + "; ".join(volumes[u][0].description for u in multi)
                               + "): the phase order is ambiguous; narrow --series_regex",
                               patient=patient)
        phases = volumes[multi[0]]
    else:
        phases = [v[0] for v in volumes.values()]
        if any(v.time is None for v in phases):
            raise Her2jaxError("a DCE series has no AcquisitionTime, ContentTime or "
                               "SeriesTime: the phase order is unknown", patient=patient)
        phases.sort(key=lambda v: v.time)
        for a, b in zip(phases, phases[1:], strict=False):
            if b.time - a.time < 1e-3:
                raise Her2jaxError(f"series {a.description!r} and {b.description!r} were "
                                   "acquired at the same time: the phase order is ambiguous",
                                   patient=patient)
        pre = [k for k, v in enumerate(phases) if _PRE.search(v.description)]
        if pre and pre != [0]:
            raise Her2jaxError(f"series {phases[pre[-1]].description!r} is named pre-contrast "
                               f"but {phases[0].description!r} was acquired before it: the "
                               "phase order is ambiguous", patient=patient)
        ordinals = [_ordinal(v.description) for v in phases[1:]]
        known = [o for o in ordinals if o is not None]
        if known != sorted(known) or len(set(known)) != len(known):
            raise Her2jaxError("the series' phase numbers ("
                               + ", ".join(f"{v.description!r}" for v in phases)
                               + ") disagree with their acquisition times: the phase order "
                               "is ambiguous", patient=patient)
        for v in phases:
            v.identified_by = ("description says pre-contrast, earliest" if _PRE.search(
                v.description) else "acquisition time order") + " (one series per phase)"
    if len(phases) < min_phases:
        raise Her2jaxError(f"{len(phases)} DCE phase(s) found ({'; '.join(names)[:300]}), "
                           f"{min_phases} needed ({needed_by})", patient=patient)
    reference = phases[0]
    ref_affine = affine_of(reference.slices)
    for k, v in enumerate(phases[1:], start=1):
        same = (len(v.slices) == len(reference.slices)
                and v.slices[0].matrix == reference.slices[0].matrix
                and np.allclose(affine_of(v.slices), ref_affine, atol=1e-3))
        if not same:
            raise Her2jaxError(f"phase {k} ({v.description!r}, {len(v.slices)} slices of "
                               f"{v.slices[0].matrix}) is not on the grid of phase 0 "
                               f"({reference.description!r}, {len(reference.slices)} of "
                               f"{reference.slices[0].matrix}): phases of different geometry",
                               patient=patient)
    return phases


# ---------------------------------------------------------------- tumour masks

BOX_COLUMNS = ("Patient ID", "Start Row", "End Row", "Start Column", "End Column",
               "Start Slice", "End Slice")


def read_boxes(path) -> dict[str, tuple[int, ...]]:
    """Duke's ``Annotation_Boxes.xlsx`` (or a CSV with its columns): {patient: (start row,
    end row, start column, end column, start slice, end slice)}, 1-based and inclusive."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise Her2jaxError("does not exist", file=str(path))
    try:
        table = (pd.read_csv(path, dtype=str) if path.suffix.lower() == ".csv"
                 else pd.read_excel(path, dtype=str))
    except (OSError, ValueError, ImportError) as error:
        raise Her2jaxError(f"cannot be read as a table ({error})", file=str(path)) from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in BOX_COLUMNS if c not in table.columns]
    if missing:
        raise Her2jaxError(f"lacks the column(s) {', '.join(missing)} (Duke's "
                           f"Annotation_Boxes.xlsx has {', '.join(BOX_COLUMNS)})",
                           file=str(path))
    boxes = {}
    for line, row in enumerate(table.itertuples(index=False), start=2):
        values = dict(zip(table.columns, row, strict=True))
        pid = str(values["Patient ID"]).strip()
        try:
            box = tuple(int(float(values[c])) for c in BOX_COLUMNS[1:])
        except (TypeError, ValueError):
            raise Her2jaxError(f"line {line}: the box of {pid} is not six whole numbers",
                               file=str(path)) from None
        if pid in boxes:
            raise Her2jaxError(f"line {line}: a second box for {pid}", file=str(path))
        boxes[pid] = box
    return boxes


def box_mask(pid: str, box: Sequence[int], pre: Volume) -> np.ndarray:
    """A 0/1 mask [columns, rows, slices] of a Duke box on the pre-contrast grid.

    Duke's rows and columns are the DICOM image's (1-based, inclusive); its slices count in
    ``InstanceNumber`` order (1 = the lowest number), which may run against the positions the
    volume is sorted by: each numbered slice is found by its InstanceNumber.
    """
    r0, r1, c0, c1, s0, s1 = box
    rows, columns = pre.slices[0].matrix
    by_instance = sorted(range(len(pre.slices)), key=lambda k: (pre.slices[k].instance is None,
                                                                pre.slices[k].instance))
    if any(s.instance is None for s in pre.slices):
        raise Her2jaxError("a box needs InstanceNumber on every pre-contrast slice",
                           patient=pid)
    n = len(pre.slices)
    if not (1 <= r0 <= r1 <= rows and 1 <= c0 <= c1 <= columns and 1 <= s0 <= s1 <= n):
        raise Her2jaxError(f"box rows {r0}-{r1}, columns {c0}-{c1}, slices {s0}-{s1} is not "
                           f"inside the pre-contrast image ({rows} rows, {columns} columns, "
                           f"{n} slices)", patient=pid)
    mask = np.zeros((columns, rows, n), np.uint8)
    for number in range(s0, s1 + 1):
        mask[c0 - 1:c1, r0 - 1:r1, by_instance[number - 1]] = 1
    return mask


def read_mask(pid: str, path: Path, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """A user's NIfTI tumour mask, checked against the phases' grid."""
    import nibabel as nib

    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for a bad file
        raise Her2jaxError(f"cannot be read as NIfTI ({error})", patient=pid,
                           file=str(path)) from None
    if data.shape != shape or not np.allclose(image.affine, affine, atol=1e-3):
        raise Her2jaxError(f"mask grid {data.shape} does not match the DICOM phases' "
                           f"{shape} (or its affine differs)", patient=pid, file=str(path))
    return (data != 0).astype(np.uint8)


def qc_montage(path: Path, pid: str, phases: Sequence[np.ndarray], mask) -> None:
    """One PNG: each phase's slice through the mask's centre (the middle slice without a
    mask), the mask's outline on it, the phase number and description."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = (int(np.round(np.argwhere(mask).mean(axis=0)[2])) if mask is not None and mask.any()
         else phases[0].shape[2] // 2)
    figure, axes = plt.subplots(1, len(phases), figsize=(2.4 * len(phases), 2.6), dpi=80)
    for i, (ax, volume) in enumerate(zip(np.atleast_1d(axes), phases, strict=True)):
        plane = volume[:, :, k].T
        ax.imshow(plane, cmap="gray", vmin=np.percentile(plane, 1),
                  vmax=np.percentile(plane, 99.5))
        if mask is not None and mask[:, :, k].any():
            ax.contour(mask[:, :, k].T, levels=[0.5], colors="tab:red", linewidths=0.8)
        ax.set_title(f"phase {i}", fontsize=8)
        ax.axis("off")
    figure.suptitle(f"{pid}: slice {k}", fontsize=9)
    figure.savefig(path)
    plt.close(figure)


# ---------------------------------------------------------------- output


def convert(dicom_dir, out, *, series_regex: str = DEFAULT_SERIES_REGEX,
            min_phases: int = 3, needed_by: str = "--min_phases", boxes=None, masks=None,
            qc: bool = True, skip_invalid: bool = False) -> dict:
    """Converts every patient under ``dicom_dir`` into a cohort at ``out`` (see the module
    docstring). Every patient is identified and checked before anything is written.

    Args:
      boxes: Duke's ``Annotation_Boxes.xlsx`` (:func:`read_boxes`): box masks of the patients
        it lists, on the pre-contrast grid.
      masks: a folder of ``<pid>.nii.gz`` tumour masks on the phases' grid.
      qc: write ``qc/<pid>.png`` (:func:`qc_montage`).
      skip_invalid: write the patients that pass and list the others (and any refused file)
        with the reason in ``dicom_rejected.csv``, instead of stopping at the first problem.

    Returns:
      ``{"patients", "phases": {pid: n}, "skipped_files", "masks", "rejected"}``.
    """
    try:
        re.compile(series_regex)
    except re.error as error:
        raise Her2jaxError(f"--series_regex {series_regex!r} is not a regular expression "
                           f"({error})") from None
    root = Path(dicom_dir)
    if not root.is_dir():
        raise Her2jaxError("is not a directory", file=str(root))
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Her2jaxError("exists and is not empty; choose a new --out", file=str(out))
    box_table = read_boxes(boxes) if boxes else {}
    mask_dir = Path(masks) if masks else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise Her2jaxError("is not a directory", file=str(mask_dir))
    slices, skipped, rejected = scan(root, skip_invalid=skip_invalid)
    if not slices:
        raise Her2jaxError(f"holds no MR image ({skipped} non-DICOM files, {len(rejected)} "
                           "refused)", file=str(root))
    by_patient = defaultdict(list)
    for s in slices:
        bad = "it is empty" if not s.patient else cohort.bad_patient_id(s.patient)
        if bad:
            raise Her2jaxError(f"has no usable PatientID ({bad})", file=str(s.path))
        by_patient[s.patient].append(s)

    def refuse(pid: str, error: Her2jaxError) -> None:
        if not skip_invalid:
            raise error
        rejected.append(dict(patient_id=pid, file=error.file or "", reason=error.reason))

    plans = {}
    for pid, group in sorted(by_patient.items()):
        try:
            phases = identify_phases(pid, group, series_regex=series_regex,
                                     min_phases=min_phases, needed_by=needed_by)
            box = box_mask(pid, box_table[pid], phases[0]) if pid in box_table else None
            plans[pid] = (phases, box)
        except Her2jaxError as error:
            refuse(pid, error)
    if not plans:
        raise Her2jaxError(f"no patient could be converted ({len(rejected)} refused; first: "
                           f"{rejected[0]['patient_id']}: {rejected[0]['reason']})",
                           file=str(root))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest, clinical, with_mask = [], [], 0
        for pid, (phases, box) in list(plans.items()):
            try:
                rows, row, has_mask = _write_patient(tmp, pid, phases, box, mask_dir, qc=qc)
            except Her2jaxError as error:
                for made in (tmp / "images" / pid, tmp / "segmentations" / "expert" /
                             f"{pid}.nii.gz", tmp / "qc" / f"{pid}.png"):
                    if made.is_dir():
                        shutil.rmtree(made)
                    elif made.exists():
                        made.unlink()
                del plans[pid]
                refuse(pid, error)
                continue
            manifest += rows
            clinical.append(row)
            with_mask += has_mask
        if not plans:
            raise Her2jaxError(f"no patient could be converted ({len(rejected)} refused)",
                               file=str(root))
        _write_csv(tmp / MANIFEST, MANIFEST_COLUMNS, manifest)
        _write_csv(tmp / "clinical.csv", CLINICAL_COLUMNS, clinical)
        if rejected:
            _write_csv(tmp / REJECTED, ("patient_id", "file", "reason"), rejected)
        if out.exists():
            out.rmdir()          # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"patients": len(plans), "phases": {pid: len(p) for pid, (p, _) in plans.items()},
            "skipped_files": skipped, "masks": with_mask, "rejected": len(rejected)}


def _write_patient(tmp: Path, pid: str, phases: Sequence[Volume], box, mask_dir, *,
                   qc: bool) -> tuple[list[dict], dict, bool]:
    """One patient's images, mask and QC montage under ``tmp``; (manifest rows, clinical
    row, whether a mask was written)."""
    import nibabel as nib

    folder = tmp / "images" / pid
    folder.mkdir(parents=True)
    affine = affine_of(phases[0].slices)
    arrays = []
    for k, volume in enumerate(phases):
        arrays.append(read_pixels(volume.slices))
        nib.Nifti1Image(_compact(arrays[-1]), affine).to_filename(
            folder / f"{pid}_{k:04d}.nii.gz")
    mask = box
    given = mask_dir / f"{pid}.nii.gz" if mask_dir is not None else None
    if given is not None and given.exists():
        if mask is not None:
            raise Her2jaxError(f"has a box and a mask in {mask_dir}: give one", patient=pid)
        mask = read_mask(pid, given, arrays[0].shape, affine)
    if mask is not None:
        masks_out = tmp / "segmentations" / "expert"
        masks_out.mkdir(parents=True, exist_ok=True)
        nib.Nifti1Image(mask, affine).to_filename(masks_out / f"{pid}.nii.gz")
    if qc:
        (tmp / "qc").mkdir(exist_ok=True)
        qc_montage(tmp / "qc" / f"{pid}.png", pid, arrays, mask)
    first = phases[0].slices[0]
    bolus = first.bolus_start
    after_first = [None if v.time is None or phases[0].time is None
                   else v.time - phases[0].time for v in phases]
    after_injection = ([None if v.time is None else max(v.time - bolus, 0.0) for v in phases]
                       if bolus is not None else [None] * len(phases))
    if bolus is not None:
        after_injection[0] = 0.0
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    rows = [dict(patient_id=pid, phase=k, series_uid=volume.series,
                 series_description=volume.description,
                 time_after_injection_s=_fmt(after_injection[k]),
                 time_after_first_s=_fmt(after_first[k]), slices=len(volume.slices),
                 spacing_mm="x".join(f"{v:.4g}" for v in spacing),
                 shape="x".join(str(n) for n in (*volume.slices[0].matrix[::-1],
                                                  len(volume.slices))),
                 identified_by=volume.identified_by)
            for k, volume in enumerate(phases)]
    times = ";".join(_fmt(t) for t in after_injection) if bolus is not None else ""
    row = dict(patient_id=pid, center=first.institution, manufacturer=first.manufacturer,
               field_strength=first.field_strength, acquisition_times=times, ihc_score="",
               ish_result="", her2="", her2_class="")
    return rows, row, mask is not None


def _compact(data: np.ndarray) -> np.ndarray:
    """int16 when every value is a whole number in its range (MR magnitudes usually are: half
    the file of float32), else the float32 values."""
    if data.size and np.array_equal(data, np.round(data)) and data.min() >= -32768 \
            and data.max() <= 32767:
        return data.astype(np.int16)
    return data


def _fmt(value: float | None) -> str:
    return "" if value is None or not math.isfinite(value) else f"{value:g}"


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
