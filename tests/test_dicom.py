"""her2jax.data.dicom: DICOM series written here with pydicom (real files: tags, geometry,
vendor naming, one series per phase and multi-volume series, oblique and sagittal planes,
reversed slice order) -> the MAMA-MIA layout, checked against the source volumes, against the
DICOM standard's own pixel-to-patient formula and against dcm2niix; and the refusals."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import (  # noqa: E402
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    generate_uid,
)

from her2jax.data import dicom  # noqa: E402
from her2jax.errors import Her2jaxError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPE = (12, 10, 6)   # columns, rows, slices
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# A sagittal plane tilted 15 degrees: rows run anterior-posterior and a little right-left,
# columns head-foot.
_T = np.deg2rad(15)
OBLIQUE_SAGITTAL = (np.sin(_T), np.cos(_T), 0.0, 0.0, 0.0, -1.0)


def _volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 3000, SHAPE).astype(np.uint16)


def _tm(seconds: float) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{int(h):02d}{int(m):02d}{s:09.6f}"


def write_series(folder: Path, volume: np.ndarray, *, patient="P001", description="ax dyn",
                 orientation=AXIAL, spacing=(0.8, 0.7), slice_step=2.0,
                 origin=(-40.0, -30.0, 10.0), series_time=36000.0, slice_times=None,
                 temporal=None, extra=None, series_uid=None, reverse=False, modality="MR",
                 start_index=0, sop_class=MRImageStorage, syntax=ExplicitVRLittleEndian,
                 instance_descending=False, study="1.2.3.4"):
    """One series of ``volume`` [columns, rows, slices] as single-frame MR images.

    Slice k lies at origin + k * slice_step * normal (LPS mm), its pixel (row r, column c) at
    that + c * spacing[1] * row direction + r * spacing[0] * column direction.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    order = range(volume.shape[2])
    for k in (reversed(order) if reverse else order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = syntax
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = modality, patient
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
        ds.SeriesDescription = description
        ds.Manufacturer, ds.InstitutionName, ds.MagneticFieldStrength = "SIEMENS", "SITE_A", 3
        ds.SeriesTime = _tm(series_time)
        ds.AcquisitionTime = ds.ContentTime = _tm(
            slice_times[k] if slice_times is not None else series_time)
        ds.ContrastBolusStartTime = _tm(36000.0)
        if temporal is not None:
            ds.TemporalPositionIdentifier = temporal
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in
                                   np.asarray(origin) + k * slice_step * normal]
        ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
        ds.SliceThickness = slice_step
        ds.InstanceNumber = start_index + (volume.shape[2] - k if instance_descending
                                           else k + 1)
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].T).astype(np.uint16).tobytes()
        ds.save_as(folder / f"{series_uid[-8:]}_{start_index + k:04d}.dcm",
                   enforce_file_format=True)
    return series_uid


def world_ras(orientation, spacing, slice_step, origin, c, r, k) -> np.ndarray:
    """The DICOM standard's pixel position (C.7.6.2.1.1), in RAS."""
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    lps = (np.asarray(origin) + k * slice_step * np.cross(row, col) + c * spacing[1] * row
           + r * spacing[0] * col)
    return lps * [-1, -1, 1]


def _phases(out: Path, pid: str) -> list[nib.Nifti1Image]:
    return [nib.load(p) for p in sorted((out / "images" / pid).glob("*.nii.gz"))]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _duke_like(root: Path, *, patient="Breast_MRI_001", orientation=AXIAL, reverse_post=True,
               instance_descending=False):
    """Duke's layout: one series per phase, 'ax dyn pre', 'ax dyn 1st pass', ...; phase 2
    stored in reverse slice order. Returns the source volumes."""
    volumes = [_volume(k) for k in range(3)]
    names = ["ax dyn pre", "ax dyn 1st pass", "ax dyn 2nd pass"]
    for k, (volume, name) in enumerate(zip(volumes, names, strict=True)):
        write_series(root / patient / name.replace(" ", "_"), volume, patient=patient,
                     description=name, orientation=orientation, series_time=36000.0 + 90 * k,
                     reverse=reverse_post and k == 2, instance_descending=instance_descending)
    return volumes


def test_one_series_per_phase_round_trip(tmp_path):
    volumes = _duke_like(tmp_path / "dicom")
    (tmp_path / "dicom" / "README.txt").write_text("not DICOM")
    result = dicom.convert(tmp_path / "dicom", tmp_path / "cohort")
    assert result == {"patients": 1, "phases": {"Breast_MRI_001": 3}, "skipped_files": 1,
                      "masks": 0, "rejected": 0}
    assert not (tmp_path / "cohort" / dicom.REJECTED).exists()
    assert (tmp_path / "cohort" / "qc" / "Breast_MRI_001.png").stat().st_size > 1000
    images = _phases(tmp_path / "cohort", "Breast_MRI_001")
    assert [p.name for p in sorted((tmp_path / "cohort/images/Breast_MRI_001").iterdir())] == [
        f"Breast_MRI_001_{k:04d}.nii.gz" for k in range(3)]
    for image, volume in zip(images, volumes, strict=True):
        np.testing.assert_array_equal(np.asarray(image.dataobj), volume)   # reversed file order too
        for c, r, k in ((0, 0, 0), (11, 0, 0), (0, 9, 5), (7, 3, 2)):
            np.testing.assert_allclose(image.affine @ [c, r, k, 1],
                                       [*world_ras(AXIAL, (0.8, 0.7), 2.0, (-40, -30, 10),
                                                   c, r, k), 1], atol=1e-5)
    manifest = _rows(tmp_path / "cohort" / dicom.MANIFEST)
    assert [m["series_description"] for m in manifest] == ["ax dyn pre", "ax dyn 1st pass",
                                                           "ax dyn 2nd pass"]
    assert [m["time_after_injection_s"] for m in manifest] == ["0", "90", "180"]
    assert {m["slices"] for m in manifest} == {"6"} and manifest[0]["shape"] == "12x10x6"
    assert "pre-contrast" in manifest[0]["identified_by"]
    clinical = _rows(tmp_path / "cohort" / "clinical.csv")
    assert clinical == [dict(patient_id="Breast_MRI_001", center="SITE_A",
                             manufacturer="SIEMENS", field_strength="3",
                             acquisition_times="0;90;180", ihc_score="", ish_result="",
                             her2="", her2_class="")]


@pytest.mark.parametrize("vendor", ["GE ContentTime", "Philips TriggerTime",
                                    "TemporalPositionIdentifier"])
def test_a_multi_volume_series_is_split_into_its_phases(tmp_path, vendor):
    """I-SPY2's layout: one series, every phase at every position; an oblique sagittal plane;
    slice times that also vary within a phase (each slice acquired a little later)."""
    volumes = [_volume(10 + k) for k in range(4)]
    uid = generate_uid()
    for k, volume in enumerate(volumes):
        slice_times = [36000.0 + 80 * k + 0.5 * s for s in range(SHAPE[2])]
        extra, temporal = {}, None
        if vendor == "Philips TriggerTime":
            extra = {"TriggerTime": 80_000.0 * k}
        if vendor == "TemporalPositionIdentifier":
            temporal = k + 1
        # Files interleaved across phases, as a scanner's export numbers them.
        write_series(tmp_path / "dicom" / "ispy", volume, patient="ISPY2_1",
                     description="Ph1/sag VIBRANT", orientation=OBLIQUE_SAGITTAL,
                     slice_times=slice_times, extra=extra, temporal=temporal,
                     series_uid=uid, start_index=100 * k)
    dicom.convert(tmp_path / "dicom", tmp_path / "cohort", min_phases=4)
    images = _phases(tmp_path / "cohort", "ISPY2_1")
    assert len(images) == 4
    for image, volume in zip(images, volumes, strict=True):
        np.testing.assert_array_equal(np.asarray(image.dataobj), volume)
        np.testing.assert_allclose(
            image.affine @ [5, 4, 3, 1],
            [*world_ras(OBLIQUE_SAGITTAL, (0.8, 0.7), 2.0, (-40, -30, 10), 5, 4, 3), 1],
            atol=1e-5)
    manifest = _rows(tmp_path / "cohort" / dicom.MANIFEST)
    # Philips' TriggerTime counts from the series' start: its phases get times of day too.
    assert [m["time_after_injection_s"] for m in manifest] == ["0", "80", "160", "240"]
    how = {m["identified_by"] for m in manifest}
    expected = {"GE ContentTime": "rank in ContentTime per slice position",
                "Philips TriggerTime": "rank in TriggerTime per slice position",
                "TemporalPositionIdentifier": "TemporalPositionIdentifier"}[vendor]
    assert how == {expected}


def test_volumes_match_dcm2niix(tmp_path):
    """dcm2niix, the converter users trust, reads the same voxels at the same places."""
    dcm2niix = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    if not Path(dcm2niix).exists():
        pytest.skip("dcm2niix is not installed")
    for orientation, name in ((AXIAL, "axial"), (OBLIQUE_SAGITTAL, "oblique")):
        root = tmp_path / name
        volume = _volume(7)
        write_series(root / "dicom" / "P", volume, patient="P", description="ax dyn pre",
                     orientation=orientation, reverse=True)
        write_series(root / "dicom" / "P2", _volume(8), patient="P",
                     description="ax dyn 1st pass", orientation=orientation,
                     series_time=36090.0)
        dicom.convert(root / "dicom", root / "cohort", min_phases=2)
        ours = nib.load(root / "cohort/images/P/P_0000.nii.gz")
        (root / "ref").mkdir()
        subprocess.run([dcm2niix, "-z", "y", "-b", "n", "-f", "%s", "-o", str(root / "ref"),
                        str(root / "dicom" / "P")], check=True, capture_output=True)
        theirs = nib.load(next((root / "ref").glob("*.nii.gz")))
        # Both in world space: the same affine up to axis order and flips, the same voxels.
        ours_c, theirs_c = nib.as_closest_canonical(ours), nib.as_closest_canonical(theirs)
        np.testing.assert_allclose(ours_c.affine, theirs_c.affine, atol=1e-3)
        np.testing.assert_array_equal(np.asarray(ours_c.get_fdata()),
                                      np.asarray(theirs_c.get_fdata()))


def test_a_multi_volume_series_matches_dcm2niix_volume_by_volume(tmp_path):
    """dcm2niix writes I-SPY2's multi-volume series as one 4D file; each of its volumes is
    one of our phases, in the same order, at the same place."""
    dcm2niix = shutil.which("dcm2niix") or str(Path(sys.executable).parent / "dcm2niix")
    if not Path(dcm2niix).exists():
        pytest.skip("dcm2niix is not installed")
    uid = generate_uid()
    for k in range(4):
        write_series(tmp_path / "dicom" / "s", _volume(20 + k), patient="X",
                     description="Ph1/sag VIBRANT", orientation=OBLIQUE_SAGITTAL,
                     slice_times=[36000.0 + 80 * k + 0.5 * s for s in range(SHAPE[2])],
                     temporal=k + 1, series_uid=uid, start_index=100 * k)
    dicom.convert(tmp_path / "dicom", tmp_path / "cohort", min_phases=4)
    (tmp_path / "ref").mkdir()
    subprocess.run([dcm2niix, "-z", "y", "-b", "n", "-f", "%s", "-o", str(tmp_path / "ref"),
                    str(tmp_path / "dicom" / "s")], check=True, capture_output=True)
    theirs = nib.as_closest_canonical(nib.load(next((tmp_path / "ref").glob("*.nii.gz"))))
    assert theirs.shape[3] == 4
    for k, ours in enumerate(_phases(tmp_path / "cohort", "X")):
        ours = nib.as_closest_canonical(ours)
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-3)
        np.testing.assert_array_equal(np.asarray(ours.get_fdata()),
                                      theirs.get_fdata()[..., k])


# ---------------------------------------------------------------- tumour masks


def _write_boxes(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows, columns=list(dicom.BOX_COLUMNS)).to_excel(path, index=False)
    return path


@pytest.mark.parametrize("instance_descending", [False, True])
def test_duke_boxes_become_masks_where_the_box_is(tmp_path, instance_descending):
    """Rows and columns are the DICOM image's (1-based), slices count in InstanceNumber
    order, whichever way the InstanceNumbers run along the positions."""
    _duke_like(tmp_path / "dicom", instance_descending=instance_descending)
    boxes = _write_boxes(tmp_path / "Annotation_Boxes.xlsx", [
        {"Patient ID": "Breast_MRI_001", "Start Row": 2, "End Row": 4, "Start Column": 3,
         "End Column": 7, "Start Slice": 1, "End Slice": 2},
        {"Patient ID": "Breast_MRI_999", "Start Row": 1, "End Row": 1, "Start Column": 1,
         "End Column": 1, "Start Slice": 1, "End Slice": 1}])     # not downloaded: ignored
    result = dicom.convert(tmp_path / "dicom", tmp_path / "cohort", boxes=boxes)
    assert result["masks"] == 1
    mask_image = nib.load(tmp_path / "cohort/segmentations/expert/Breast_MRI_001.nii.gz")
    mask = np.asarray(mask_image.dataobj)
    pre = nib.load(tmp_path / "cohort/images/Breast_MRI_001/Breast_MRI_001_0000.nii.gz")
    assert mask.shape == pre.shape and np.allclose(mask_image.affine, pre.affine)
    assert mask.sum() == 3 * 5 * 2
    # Where the box is, from the files themselves: the slices numbered 1 and 2.
    files = [pydicom.dcmread(p) for p in (tmp_path / "dicom/Breast_MRI_001/ax_dyn_pre").iterdir()]
    wanted_z = sorted(float(ds.ImagePositionPatient[2]) for ds in files
                      if int(ds.InstanceNumber) in (1, 2))
    voxels = np.argwhere(mask)
    world = (mask_image.affine @ np.c_[voxels, np.ones(len(voxels))].T).T
    assert sorted(set(np.round(world[:, 2], 3))) == pytest.approx(wanted_z)
    assert set(voxels[:, 0]) == {2, 3, 4, 5, 6} and set(voxels[:, 1]) == {1, 2, 3}
    for (c, r, _), xyz in zip(voxels, world, strict=True):
        ds = next(d for d in files if abs(float(d.ImagePositionPatient[2]) - xyz[2]) < 1e-3)
        np.testing.assert_allclose(xyz[:3], world_ras(
            AXIAL, (0.8, 0.7), 2.0, [float(v) for v in ds.ImagePositionPatient], c, r, 0),
            atol=1e-4)
    assert (tmp_path / "cohort" / "qc" / "Breast_MRI_001.png").exists()


def test_masks_given_as_nifti_are_checked_against_the_grid(tmp_path):
    _duke_like(tmp_path / "dicom")
    first = tmp_path / "first"
    dicom.convert(tmp_path / "dicom", first)
    pre = nib.load(first / "images/Breast_MRI_001/Breast_MRI_001_0000.nii.gz")
    (tmp_path / "masks").mkdir()
    mask = np.zeros(pre.shape, np.uint8)
    mask[4:8, 3:6, 2:4] = 1
    nib.Nifti1Image(mask, pre.affine).to_filename(tmp_path / "masks/Breast_MRI_001.nii.gz")
    dicom.convert(tmp_path / "dicom", tmp_path / "cohort", masks=tmp_path / "masks")
    copied = nib.load(tmp_path / "cohort/segmentations/expert/Breast_MRI_001.nii.gz")
    np.testing.assert_array_equal(np.asarray(copied.dataobj), mask)
    shifted = pre.affine.copy()
    shifted[0, 3] += 5
    nib.Nifti1Image(mask, shifted).to_filename(tmp_path / "masks/Breast_MRI_001.nii.gz")
    with pytest.raises(Her2jaxError, match="does not match the DICOM phases"):
        dicom.convert(tmp_path / "dicom", tmp_path / "again", masks=tmp_path / "masks")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("row, message", [
    ({"Start Row": 2, "End Row": 40}, "is not inside the pre-contrast image (10 rows"),
    ({"Start Slice": 0}, "slices 0-2 is not inside"),
    ({"End Column": "x"}, "is not six whole numbers"),
])
def test_bad_boxes_are_refused(tmp_path, row, message):
    _duke_like(tmp_path / "dicom")
    box = {"Patient ID": "Breast_MRI_001", "Start Row": 2, "End Row": 4, "Start Column": 3,
           "End Column": 7, "Start Slice": 1, "End Slice": 2, **row}
    boxes = _write_boxes(tmp_path / "boxes.xlsx", [box])
    with pytest.raises(Her2jaxError, match=message.replace("(", r"\(")):
        dicom.convert(tmp_path / "dicom", tmp_path / "cohort", boxes=boxes)
    assert not (tmp_path / "cohort").exists()


# ---------------------------------------------------------------- refusals


def _missing_slice(root):
    _duke_like(root)
    victim = sorted((root / "Breast_MRI_001" / "ax_dyn_1st_pass").iterdir())[3]
    victim.unlink()


def _duplicated_slice(root):
    _duke_like(root)
    folder = root / "Breast_MRI_001" / "ax_dyn_1st_pass"
    source = sorted(folder.iterdir())[2]
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(folder / "copy.dcm", enforce_file_format=True)


def _edit_pre_slice(root, index: int, **tags):
    """A Duke-like patient whose pre-contrast slice file ``index`` gets ``tags``."""
    _duke_like(root)
    path = sorted((root / "Breast_MRI_001" / "ax_dyn_pre").iterdir())[index]
    ds = pydicom.dcmread(path)
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


def _two_orientations(root):
    _edit_pre_slice(root, 1, ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 0.0, -1.0])


def _uneven_spacing(root):
    _edit_pre_slice(root, 5, ImagePositionPatient=[-40.0, -30.0, 10.0 + 5 * 2.0 + 0.6])


def _off_the_line(root):
    _edit_pre_slice(root, 3, ImagePositionPatient=[-39.0, -30.0, 16.0])


def _other_geometry(root):
    write_series(root / "p" / "pre", _volume(0), patient="P", description="ax dyn pre")
    write_series(root / "p" / "post", _volume(1), patient="P", description="ax dyn 1st pass",
                 series_time=36090.0, spacing=(0.9, 0.7))
    write_series(root / "p" / "post2", _volume(2), patient="P",
                 description="ax dyn 2nd pass", series_time=36180.0)


def _non_mr(root):
    _duke_like(root)
    write_series(root / "ct", _volume(3)[:, :, :2], patient="Breast_MRI_001",
                 description="scout", modality="CT", sop_class=CTImageStorage)


def _report(root):
    _duke_like(root)
    write_series(root / "sr", _volume(3)[:, :, :2], patient="Breast_MRI_001",
                 description="report", modality="SR", sop_class="1.2.840.10008.5.1.4.1.1.88.11")


def _spectroscopy(root):
    _duke_like(root)
    write_series(root / "mrs", _volume(3)[:, :, :2], patient="Breast_MRI_001",
                 description="svs", sop_class="1.2.840.10008.5.1.4.1.1.4.2")


def _two_visits(root):
    _duke_like(root)
    for k in range(3):
        write_series(root / "later" / str(k), _volume(k), patient="Breast_MRI_001",
                     description=f"ax dyn {k}", series_time=36030.0 + 90 * k, study="1.2.3.5")


def _pre_acquired_later(root):
    write_series(root / "p" / "a", _volume(0), patient="P", description="ax dyn 1st pass")
    write_series(root / "p" / "b", _volume(1), patient="P", description="ax dyn pre",
                 series_time=36090.0)
    write_series(root / "p" / "c", _volume(2), patient="P", description="ax dyn 2nd pass",
                 series_time=36180.0)


def _same_time(root):
    write_series(root / "p" / "a", _volume(0), patient="P", description="ax dyn pre")
    write_series(root / "p" / "b", _volume(1), patient="P", description="ax dyn 1st pass")
    write_series(root / "p" / "c", _volume(2), patient="P", description="ax dyn 2nd pass",
                 series_time=36180.0)


def _too_few_phases(root):
    write_series(root / "p" / "a", _volume(0), patient="P", description="ax dyn pre")
    write_series(root / "p" / "b", _volume(1), patient="P", description="ax dyn 1st pass",
                 series_time=36090.0)
    write_series(root / "p" / "t2", _volume(2), patient="P", description="ax t2 tse")


def _compressed(root):
    _duke_like(root)
    folder = root / "Breast_MRI_001" / "ax_dyn_pre"
    path = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
    ds.save_as(path, enforce_file_format=True)


def _truncated(root):
    _duke_like(root)
    path = sorted((root / "Breast_MRI_001" / "ax_dyn_pre").iterdir())[0]
    path.write_bytes(path.read_bytes()[:-50])


def _phase_overlap(root):
    uid = generate_uid()
    for k in range(3):
        write_series(root / "s", _volume(k), patient="P", description="dyn",
                     slice_times=[36000.0 + 2 * k + 1.0 * s for s in range(SHAPE[2])],
                     series_uid=uid, start_index=100 * k)


@pytest.mark.parametrize("make, message, names", [
    (_missing_slice, "1 missing slice(s) between 14.00 and 18.00 mm", "ax_dyn_1st_pass"),
    (_duplicated_slice, "duplicated slice at 14.00 mm", "copy.dcm"),
    (_two_orientations, "slices of two orientations in one series", "ax dyn pre"),
    (_uneven_spacing, "inconsistent slice spacing", "ax dyn pre"),
    (_other_geometry, "phases of different geometry", "patient P"),
    (_off_the_line, "slice 3 lies 1 mm off the line through the others", "ax dyn pre"),
    (_non_mr, "is a CT object", ".dcm"),
    (_report, "is a SR object", ".dcm"),
    (_two_visits, "DCE series from 2 studies (visits)", "patient Breast_MRI_001"),
    (_spectroscopy, "is not an MR image (SOP class 1.2.840.10008.5.1.4.1.1.4.2)", ".dcm"),
    (_pre_acquired_later, "named pre-contrast but 'ax dyn 1st pass' was acquired before it",
     "patient P"),
    (_same_time, "acquired at the same time: the phase order is ambiguous", "patient P"),
    (_too_few_phases, "2 DCE phase(s) found", "3 needed"),
    (_compressed, "transfer syntax JPEG 2000 Image Compression (Lossless Only)", ".dcm"),
    (_phase_overlap, "phases 0 and 1 overlap in ContentTime", "phase order is ambiguous"),
    (_truncated, "pixel data cannot be read", "a truncated or damaged file?"),
])
def test_refusals_are_one_line_and_write_nothing(tmp_path, make, message, names):
    make(tmp_path / "dicom")
    with pytest.raises(Her2jaxError) as caught:
        dicom.convert(tmp_path / "dicom", tmp_path / "cohort")
    text = str(caught.value)
    assert "\n" not in text and message in text and names in text, text
    assert not (tmp_path / "cohort").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dicom"]     # no temporary left behind


def test_the_cli_writes_a_cohort_and_refuses_in_one_line(tmp_path):
    _duke_like(tmp_path / "dicom")
    run = subprocess.run([sys.executable, "-m", "her2jax.cli.dicom",
                          f"--dicom={tmp_path / 'dicom'}", f"--out={tmp_path / 'cohort'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "1 patient" in run.stdout and (tmp_path / "cohort" / dicom.MANIFEST).exists()
    again = subprocess.run([sys.executable, "-m", "her2jax.cli.dicom",
                            f"--dicom={tmp_path / 'dicom'}", f"--out={tmp_path / 'cohort'}"],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert again.returncode == 2
    lines = [x for x in again.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "exists and is not empty" in lines[0], again.stderr


def test_the_recipe_sets_how_many_phases_a_patient_needs(tmp_path):
    """Two phases: enough for the demo's kinetic maps (PE, PEL), not for FM-BCMRI's C2."""
    write_series(tmp_path / "dicom" / "a", _volume(0), patient="P", description="ax dyn pre")
    write_series(tmp_path / "dicom" / "b", _volume(1), patient="P",
                 description="ax dyn 1st pass", series_time=36090.0)
    command = [sys.executable, "-m", "her2jax.cli.dicom", f"--dicom={tmp_path / 'dicom'}"]
    refused = subprocess.run([*command, f"--out={tmp_path / 'c1'}"], capture_output=True,
                             text=True, cwd=REPO, timeout=120)
    assert refused.returncode == 2
    assert "2 DCE phase(s) found" in refused.stderr and "3 needed (recipe fmbcmri ('C2',))" \
        in refused.stderr, refused.stderr
    kept = subprocess.run([*command, f"--out={tmp_path / 'c2'}", "--config=configs/demo_cpu.py"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert len(list((tmp_path / "c2" / "images" / "P").iterdir())) == 2


@pytest.mark.parametrize("names", [
    ("ax dyn pre", "Ph1/ax dyn", "Ph2/ax dyn", "Ph3/ax dyn"),                 # Duke, GE
    ("t1_fl3d_tra_dynVIEWS_spair", "t1_fl3d_tra_dynVIEWS_spair 1st pass",
     "t1_fl3d_tra_dynVIEWS_spair 2nd pass", "t1_fl3d_tra_dynVIEWS_spair 3rd pass"),  # Siemens
    ("S0 3D FGRE", "S1 3D FGRE", "S2 3D FGRE", "S3 3D FGRE"),                  # I-SPY1
])
def test_vendor_names_select_and_order_the_phases(tmp_path, names):
    """Other series (a T2, a localiser) are left out; the phases follow the times, and the
    names' phase numbers agree with them. Written in shuffled order."""
    for k in (2, 0, 3, 1):
        write_series(tmp_path / "dicom" / f"s{k}", _volume(k), patient="P",
                     description=names[k], series_time=36000.0 + 75 * k)
    write_series(tmp_path / "dicom" / "t2", _volume(9), patient="P",
                 description="ax t2 tse", series_time=35000.0)
    write_series(tmp_path / "dicom" / "loc", _volume(8)[:, :, :3], patient="P",
                 description="localizer", series_time=34000.0)
    dicom.convert(tmp_path / "dicom", tmp_path / "cohort")
    manifest = _rows(tmp_path / "cohort" / dicom.MANIFEST)
    assert [m["series_description"] for m in manifest] == list(names)
    for k, image in enumerate(_phases(tmp_path / "cohort", "P")):
        np.testing.assert_array_equal(np.asarray(image.dataobj), _volume(k))


def test_skip_invalid_writes_the_good_patients_and_lists_the_others(tmp_path):
    root = tmp_path / "dicom"
    _duke_like(root, patient="Breast_MRI_001")
    _duke_like(root, patient="Breast_MRI_002")
    _missing_slice(root)                       # Breast_MRI_001 loses a slice
    write_series(root / "ct", _volume(3)[:, :, :2], patient="Breast_MRI_002",
                 description="scout", modality="CT", sop_class=CTImageStorage)
    boxes = _write_boxes(tmp_path / "boxes.xlsx", [
        {"Patient ID": "Breast_MRI_002", "Start Row": 2, "End Row": 4, "Start Column": 3,
         "End Column": 7, "Start Slice": 1, "End Slice": 2}])
    with pytest.raises(Her2jaxError):
        dicom.convert(root, tmp_path / "strict", boxes=boxes)
    result = dicom.convert(root, tmp_path / "cohort", boxes=boxes, skip_invalid=True)
    assert result["patients"] == 1 and result["rejected"] == 3 and result["masks"] == 1
    assert sorted(p.name for p in (tmp_path / "cohort" / "images").iterdir()) == [
        "Breast_MRI_002"]
    assert [r["patient_id"] for r in _rows(tmp_path / "cohort" / "clinical.csv")] == [
        "Breast_MRI_002"]
    rejected = _rows(tmp_path / "cohort" / dicom.REJECTED)
    reasons = {(r["patient_id"], r["reason"].split(":")[0]) for r in rejected}
    assert ("Breast_MRI_002", "is a CT object (SOP class 1.2.840.10008.5.1.4.1.1.2), not an "
            "MR image") in {(r["patient_id"], r["reason"]) for r in rejected}
    assert ("Breast_MRI_001", "series 'ax dyn 1st pass'") in reasons
    assert all(r["file"] for r in rejected)


def test_rescale_slope_and_intercept_are_applied(tmp_path):
    """Stored values x RescaleSlope + RescaleIntercept; whole numbers are kept as int16,
    others as float32."""
    for k, (slope, intercept) in enumerate(((1, 0), (0.5, 10.25), (2, -100))):
        write_series(tmp_path / "dicom" / f"s{k}", _volume(k), patient="P",
                     description=f"ax dyn {k}", series_time=36000.0 + 60 * k,
                     extra={"RescaleSlope": slope, "RescaleIntercept": intercept})
    dicom.convert(tmp_path / "dicom", tmp_path / "cohort")
    images = _phases(tmp_path / "cohort", "P")
    assert [i.get_data_dtype() for i in images] == [np.int16, np.float32, np.int16]
    for k, (image, (slope, intercept)) in enumerate(zip(images, ((1, 0), (0.5, 10.25),
                                                                 (2, -100)), strict=True)):
        np.testing.assert_allclose(image.get_fdata(),
                                   _volume(k).astype(np.float64) * slope + intercept)


def test_a_bad_series_regex_is_one_line(tmp_path):
    _duke_like(tmp_path / "dicom")
    with pytest.raises(Her2jaxError, match="--series_regex '\\(dyn' is not a regular"):
        dicom.convert(tmp_path / "dicom", tmp_path / "cohort", series_regex="(dyn")
    assert not (tmp_path / "cohort").exists()


def test_a_malformed_header_value_is_one_line(tmp_path):
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    _duke_like(tmp_path / "dicom")
    path = sorted((tmp_path / "dicom" / "Breast_MRI_001" / "ax_dyn_pre").iterdir())[2]
    ds = pydicom.dcmread(path)
    # Bytes a damaged exporter might write (pydicom refuses to make such a value itself).
    tag = Tag("InstanceNumber")
    ds._dict[tag] = RawDataElement(tag, "IS", 2, b"x7", 0, False, True)
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(Her2jaxError, match="has a malformed header value") as caught:
        dicom.convert(tmp_path / "dicom", tmp_path / "cohort")
    assert "ax_dyn_pre" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("pid, reason", [("", "it is empty"),
                                         ("../P1", "is not a plain name")])
def test_a_patient_id_that_cannot_name_files_is_refused(tmp_path, pid, reason):
    """The rule her2jax-prepare applies to patient ids (files are named after them)."""
    write_series(tmp_path / "dicom" / "a", _volume(0), patient=pid, description="ax dyn pre")
    with pytest.raises(Her2jaxError, match=f"has no usable PatientID \\(.*{reason}"):
        dicom.convert(tmp_path / "dicom", tmp_path / "cohort")
    assert not (tmp_path / "cohort").exists()
