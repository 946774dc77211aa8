"""Reading and validating cohorts: MAMA-MIA layout (CSV / real-style XLSX) and manifests."""

from __future__ import annotations

import csv
import os
import pathlib
import string
import tempfile

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from her2jax.data import cohort as cohort_lib
from her2jax.data import nifti
from her2jax.data.cohort import Case, read_cohort
from her2jax.data.recipes import data_config
from her2jax.errors import Her2jaxError

SHAPE = (8, 8, 4)
COLUMNS = data_config().columns
HEADER = ["patient_id", "center", "ihc_score", "ish_result", "her2", "manufacturer"]


# ----------------------------------------------------------------------------- helpers

def write_nifti(path, data) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), path)
    return path


def write_images(root, pid, n_phases=3, *, mask=True, skip=()):
    """MAMA-MIA files of one patient: images/<pid>/<pid>_000k.nii.gz and the expert mask."""
    rng = np.random.default_rng(len(pid))
    for k in range(n_phases):
        if k not in skip:
            write_nifti(root / "images" / pid / f"{pid}_{k:04d}.nii.gz",
                        rng.normal(100, 5, SHAPE).astype(np.float32))
    if mask:
        m = np.zeros(SHAPE, np.uint8)
        m[2:5, 2:5, 1:3] = 1
        write_nifti(root / "segmentations" / "expert" / f"{pid}.nii.gz", m)


def write_csv(path, header, rows, **kwargs) -> pathlib.Path:
    path = pathlib.Path(path)
    with open(path, "w", newline="", encoding=kwargs.pop("encoding", "utf-8")) as f:
        writer = csv.writer(f, **kwargs)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def mamamia(tmp_path):
    """A MAMA-MIA layout with clinical.csv: 4 patients in 2 centres, one unlabellable."""
    root = tmp_path / "cohort"
    rows = [
        ["P1", "A", "IHC 2+", "amplified", "", "GE"],
        ["P2", "A", "0", "", "", "Siemens"],
        ["P3", "B", "2+", "", "", "GE"],          # 2+ without ISH: valid, not labellable
        ["P4", "B", "3", "", "1.0", ""],
    ]
    for pid, *_ in rows:
        write_images(root, pid)
    write_csv(root / "clinical.csv", HEADER, rows)
    return root


def reasons(result):
    return {r.patient_id: r for r in result.rejected}


def assert_rejected(result, pid, *parts, file=None):
    """The patient is rejected (not a case) and the one-line error names it and the parts."""
    assert pid not in {c.patient_id for c in result.cases}
    rejection = reasons(result)[pid]
    text = str(rejection.error())
    assert "\n" not in text
    if pid:
        assert f"patient {pid}" in text
    if file is not None:
        assert rejection.file == file and file in text
    for part in parts:
        assert part in text, text
    return rejection


def expect_table_error(path, *parts, **kwargs):
    with pytest.raises(Her2jaxError) as info:
        read_cohort(path, kwargs.pop("columns", COLUMNS), **kwargs)
    text = str(info.value)
    assert "\n" not in text
    for part in parts:
        assert part in text, text
    return info.value


# ----------------------------------------------------------------------------- MAMA-MIA

def test_mamamia_with_clinical_csv(mamamia):
    result = read_cohort(mamamia, COLUMNS)
    assert result.source == "mamamia"
    assert result.table == mamamia / "clinical.csv"
    assert result.rejected == [] and result.unlisted == []
    assert [c.patient_id for c in result.cases] == ["P1", "P2", "P3", "P4"]
    p1, p2, p3, p4 = result.cases
    assert p1.phases == tuple(mamamia / "images" / "P1" / f"P1_000{k}.nii.gz" for k in range(3))
    assert all(p.is_absolute() for p in p1.phases) and p1.mask.is_absolute()
    assert p1.mask == mamamia / "segmentations" / "expert" / "P1.nii.gz"
    assert (p1.center, p1.ihc, p1.ish, p1.her2) == ("A", "2+", "positive", -1)
    assert (p2.ihc, p2.ish, p2.her2) == ("0", "", -1)
    assert (p3.ihc, p3.ish) == ("2+", "")                  # kept: labels are derived later
    assert (p4.center, p4.ihc, p4.her2) == ("B", "3+", 1)
    assert p1.clinical == (("manufacturer", "GE"),)
    assert p4.clinical == (("manufacturer", ""),)
    # The files are what the loader reads.
    phases, mask, _ = nifti.load_case(p1)
    assert phases.shape == (3, *SHAPE) and mask.sum() == 18


def test_more_than_ten_phases_keep_acquisition_order(tmp_path):
    write_images(tmp_path, "P1", n_phases=12)
    write_csv(tmp_path / "clinical.csv", ["patient_id", "center", "her2"], [["P1", "A", "0"]])
    (case,) = read_cohort(tmp_path, COLUMNS).cases
    assert [p.name for p in case.phases] == [f"P1_{k:04d}.nii.gz" for k in range(12)]


def test_columns_match_case_insensitively_and_trimmed(tmp_path):
    write_images(tmp_path, "P1")
    write_csv(tmp_path / "clinical.csv", [" Patient_ID ", "SITE", "IHC_Score", "Manufacturer"],
              [["P1", "X", "1+", "Philips"]])
    (case,) = read_cohort(tmp_path, COLUMNS).cases
    assert (case.center, case.ihc, case.clinical) == ("X", "1+", (("manufacturer", "Philips"),))


def test_columns_config_as_plain_mapping(tmp_path):
    write_images(tmp_path, "P1")
    write_csv(tmp_path / "clinical.csv", ["ID", "Hospital", "HER2 status"], [["P1", "H", "pos"]])
    columns = dict(patient_id="ID", center="hospital", ihc="", ish="", her2="her2 status",
                   clinical=())
    (case,) = read_cohort(tmp_path, columns).cases
    assert (case.patient_id, case.center, case.her2, case.clinical) == ("P1", "H", 1, ())


@pytest.mark.parametrize("override, key, named", [
    ({"clinical": 3}, "data.columns.clinical", "must be a list of column names, got 3 (int)"),
    ({"clinical": (3,)}, "data.columns.clinical", "3 (int) is not a name"),   # the CLI's form
    ({"clinical": ("manufacturer", None)}, "data.columns.clinical", "None (NoneType)"),
    ({"clinical": {"a": 1}}, "data.columns.clinical", "got {'a': 1} (dict)"),
    ({"patient_id": 5}, "data.columns.patient_id", "must be a column name"),
    ({"her2": ["her2"]}, "data.columns.her2", "got ['her2'] (list)"),
    ({"centre": "site"}, "data.columns.centre", "unknown key"),
], ids=["int clinical", "int in clinical", "None in clinical", "dict clinical",
        "int patient_id", "list her2", "unknown key"])
def test_columns_of_the_wrong_type_are_named(mamamia, override, key, named):
    columns = {**COLUMNS.to_dict(), **override}
    error = expect_table_error(mamamia, named, columns=columns)
    assert error.key == key and f"key '{key}'" in str(error)


def test_columns_that_are_well_typed_pass(mamamia):
    # One clinical name as text, None for a label column, '' for a missing one: all fine.
    columns = {**COLUMNS.to_dict(), "clinical": "manufacturer", "ish": None, "her2": ""}
    result = read_cohort(mamamia, columns)
    assert [c.clinical for c in result.cases][0] == (("manufacturer", "GE"),)


def write_mamamia_xlsx(path, rows, sheet="dataset_info", extra_sheet=True):
    """A clinical table with MAMA-MIA's real column names (a subset of its 49)."""
    frame = pd.DataFrame(rows, columns=[
        "patient_id", "dataset", "age", "menopause", "her2", "hr", "er", "pr", "tumor_subtype",
        "num_phases", "field_strength", "manufacturer", "pixel_spacing", "slice_thickness"])
    with pd.ExcelWriter(path, engine="openpyxl") as writer:
        frame.to_excel(writer, sheet_name=sheet, index=False)
        if extra_sheet:
            pd.DataFrame({"note": ["data dictionary"]}).to_excel(writer, sheet_name="readme",
                                                                 index=False)
    return path


XLSX_ROWS = [
    ["DUKE_001", "DUKE", 45.0, "pre", 1.0, 0.0, 0.0, 0.0, "her2_enriched", 4, 1.5,
     "GE", "[0.7, 0.7]", 1.1],
    ["ISPY1_1002", "ISPY1", 51.0, "post", 0.0, 1.0, 1.0, 1.0, "luminal", 3, 3.0,
     "SIEMENS", "[0.8, 0.8]", 1.5],
    ["NACT_03", "NACT", np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, np.nan, 3, 1.5,
     "GE", "[0.7, 0.7]", 2.0],
]


def test_mamamia_with_real_style_xlsx(tmp_path):
    for row in XLSX_ROWS:
        write_images(tmp_path, row[0])
    write_mamamia_xlsx(tmp_path / "clinical_and_imaging_info.xlsx", XLSX_ROWS)
    result = read_cohort(tmp_path, COLUMNS)
    assert result.source == "mamamia" and result.rejected == []
    assert result.table.name == "clinical_and_imaging_info.xlsx"
    duke, ispy, nact = result.cases
    assert (duke.patient_id, duke.center, duke.her2, duke.ihc, duke.ish) == (
        "DUKE_001", "DUKE", 1, "", "")
    assert (ispy.center, ispy.her2) == ("ISPY1", 0)
    assert (nact.center, nact.her2) == ("NACT", -1)    # her2 NaN: valid, unlabellable
    assert duke.clinical == (("manufacturer", "GE"), ("field_strength", "1.5"), ("hr", "0"),
                             ("er", "0"), ("pr", "0"), ("tumor_subtype", "her2_enriched"))
    assert dict(ispy.clinical)["field_strength"] == "3"
    assert dict(nact.clinical)["tumor_subtype"] == ""
    # The same table given directly as the path.
    direct = read_cohort(tmp_path / "clinical_and_imaging_info.xlsx", COLUMNS)
    assert direct.cases == result.cases


def test_clinical_csv_wins_over_xlsx(tmp_path):
    write_images(tmp_path, "DUKE_001")
    write_mamamia_xlsx(tmp_path / "clinical_and_imaging_info.xlsx", XLSX_ROWS[:1])
    write_csv(tmp_path / "clinical.csv", ["patient_id", "center", "ihc_score"],
              [["DUKE_001", "DUKE", "1+"]])
    result = read_cohort(tmp_path, COLUMNS)
    assert result.table.name == "clinical.csv"
    assert (result.cases[0].ihc, result.cases[0].her2) == ("1+", -1)


def test_xlsx_without_the_sheet(tmp_path):
    path = write_mamamia_xlsx(tmp_path / "clinical_and_imaging_info.xlsx", XLSX_ROWS,
                              sheet="Sheet1", extra_sheet=False)
    err = expect_table_error(tmp_path, "no sheet 'dataset_info'", "Sheet1")
    assert err.file == str(path)
    (tmp_path / "images").mkdir()
    assert read_cohort(tmp_path, COLUMNS, clinical_sheet="Sheet1").rejected


def test_xlsx_empty_and_corrupt(tmp_path):
    path = tmp_path / "clinical_and_imaging_info.xlsx"
    with pd.ExcelWriter(path, engine="openpyxl") as writer:
        pd.DataFrame().to_excel(writer, sheet_name="dataset_info", index=False)
    expect_table_error(tmp_path, "empty table", str(path))
    path.write_bytes(b"patient_id,center\nP1,A\n")
    expect_table_error(tmp_path, "not a readable .xlsx", str(path))


# ----------------------------------------------------------------------------- manifest

def write_manifest_cohort(root, patients=("M1", "M2"), n_phases=2, subdir="scans"):
    rows = []
    for i, pid in enumerate(patients):
        paths = []
        for k in range(n_phases):
            rel = f"{subdir}/{pid}/ph{k}.nii.gz"
            write_nifti(root / rel, np.full(SHAPE, k, np.float32))
            paths.append(rel)
        m = np.zeros(SHAPE, np.uint8)
        m[1:3, 1:3, 1:3] = 1
        write_nifti(root / f"{subdir}/{pid}/seg.nii.gz", m)
        rows.append([pid, f"C{i % 2}", *paths, f"{subdir}/{pid}/seg.nii.gz", "1+", "", ""])
    header = ["patient_id", "center", *[f"phase_{k}" for k in range(n_phases)], "mask",
              "ihc_score", "ish_result", "her2"]
    return write_csv(root / "manifest.csv", header, rows)


@pytest.mark.parametrize("as_file", [False, True])
def test_manifest_with_relative_paths(tmp_path, as_file):
    manifest = write_manifest_cohort(tmp_path)
    result = read_cohort(manifest if as_file else tmp_path, COLUMNS)
    assert (result.source, result.root, result.table) == ("manifest", tmp_path, manifest)
    assert [c.patient_id for c in result.cases] == ["M1", "M2"] and not result.rejected
    m1 = result.cases[0]
    assert m1.phases == (tmp_path / "scans/M1/ph0.nii.gz", tmp_path / "scans/M1/ph1.nii.gz")
    assert m1.mask == tmp_path / "scans/M1/seg.nii.gz"
    assert (m1.center, m1.ihc, m1.clinical) == ("C0", "1+", ())
    phases, _, _ = nifti.load_case(m1)
    assert phases[1].mean() == 1.0


def test_manifest_rows_with_fewer_phases_and_gaps(tmp_path):
    write_manifest_cohort(tmp_path, patients=("M1",), n_phases=3)
    rows = list(csv.reader(open(tmp_path / "manifest.csv")))
    rows.append(["M2", "C0", "scans/M1/ph0.nii.gz", "scans/M1/ph1.nii.gz", "",
                 "scans/M1/seg.nii.gz", "0", "", ""])
    rows.append(["M3", "C0", "scans/M1/ph0.nii.gz", "", "scans/M1/ph2.nii.gz",
                 "scans/M1/seg.nii.gz", "0", "", ""])
    rows.append(["M4", "C0", "", "", "", "scans/M1/seg.nii.gz", "0", "", ""])
    rows.append(["M5", "C0", "scans/M1/ph0.nii.gz", "", "", "", "0", "", ""])
    write_csv(tmp_path / "manifest.csv", rows[0], rows[1:])
    result = read_cohort(tmp_path, COLUMNS)
    cases = {c.patient_id: c for c in result.cases}
    assert len(cases["M1"].phases) == 3 and len(cases["M2"].phases) == 2
    assert_rejected(result, "M3", "phase_1 is empty but a later phase is given",
                    file="manifest.csv")
    assert_rejected(result, "M4", "phase_0 is empty")
    assert_rejected(result, "M5", "mask is empty")


@pytest.mark.parametrize("header, message", [
    (["patient_id", "center", "phase_0", "her2"], "missing required column(s): mask"),
    (["patient_id", "center", "mask", "her2"], "phase_0"),
    (["patient_id", "center", "phase_0", "phase_2", "mask", "her2"], "phase_1"),
])
def test_manifest_column_errors(tmp_path, header, message):
    write_csv(tmp_path / "manifest.csv", header, [["P1"] + [""] * (len(header) - 1)])
    expect_table_error(tmp_path, message, "manifest.csv")


# ----------------------------------------------------------------------------- table errors

def test_cohort_path_missing_or_not_a_cohort(tmp_path):
    expect_table_error(tmp_path / "nowhere", "cohort not found", "nowhere")
    expect_table_error(tmp_path / "nowhere.csv", "cohort not found")
    (tmp_path / "images").mkdir()
    expect_table_error(tmp_path, "not a cohort folder", "clinical.csv")
    (tmp_path / "notes.txt").write_text("x")
    expect_table_error(tmp_path / "notes.txt", "a cohort is a folder")


def test_non_utf8_csv(tmp_path):
    path = write_csv(tmp_path / "clinical.csv", HEADER, [["P1", "Hôpital", "0", "", "", ""]],
                     encoding="latin-1")
    err = expect_table_error(tmp_path, "not UTF-8", "0xf4")
    assert err.file == str(path)


def test_utf8_bom_is_fine(tmp_path):
    write_images(tmp_path, "P1")
    write_csv(tmp_path / "clinical.csv", HEADER, [["P1", "Hôpital", "0", "", "", ""]],
              encoding="utf-8-sig")
    assert read_cohort(tmp_path, COLUMNS).cases[0].center == "Hôpital"


@pytest.mark.parametrize("delimiter, name", [(";", "';'"), ("\t", "tab")])
def test_wrong_delimiter(tmp_path, delimiter, name):
    write_csv(tmp_path / "clinical.csv", HEADER, [["P1", "A", "0", "", "", ""]],
              delimiter=delimiter)
    expect_table_error(tmp_path, "expected comma-separated", name, "clinical.csv")


def test_duplicate_column_names(tmp_path):
    write_csv(tmp_path / "clinical.csv", ["patient_id", "center", "her2", "HER2 "],
              [["P1", "A", "1", "0"]])
    expect_table_error(tmp_path, "duplicate column names", "'HER2' (columns 3 and 4)",
                       "clinical.csv")


def test_missing_required_columns_are_named(tmp_path):
    write_csv(tmp_path / "clinical.csv", ["id", "hospital", "notes"], [["P1", "A", ""]])
    err = expect_table_error(tmp_path, "'patient_id'", "'center'", "'dataset'",
                             "a label column: 'ihc_score' or 'her2'", "id, hospital, notes")
    assert err.file == str(tmp_path / "clinical.csv")


def test_label_columns_may_be_partly_absent(tmp_path):
    """her2 alone (MAMA-MIA) or ihc alone is enough; neither is an error."""
    write_images(tmp_path, "P1")
    write_csv(tmp_path / "clinical.csv", ["patient_id", "center", "ihc_score"],
              [["P1", "A", "2+"]])
    assert read_cohort(tmp_path, COLUMNS).cases[0].ihc == "2+"
    write_csv(tmp_path / "clinical.csv", ["patient_id", "center", "ish_result"],
              [["P1", "A", "positive"]])
    expect_table_error(tmp_path, "a label column")


@pytest.mark.parametrize("content", ["", "\n\n", "patient_id,center,her2\n",
                                     "patient_id,center,her2\n,,\n"])
def test_empty_table(tmp_path, content):
    (tmp_path / "clinical.csv").write_text(content)
    expect_table_error(tmp_path, "empty table", "clinical.csv")


def test_ragged_row(tmp_path):
    (tmp_path / "clinical.csv").write_text("patient_id,center,her2\nP1,A,1\nP2,B\n")
    expect_table_error(tmp_path, "row 3 has 2 fields but the header has 3")


# ----------------------------------------------------------------------------- rejections

def test_case_level_rejections(tmp_path):
    root = tmp_path
    rows = [
        ["OK", "A", "1+", "", "", ""],
        ["GAP", "A", "0", "", "", ""],          # phase 1 file missing
        ["NOFOLDER", "A", "0", "", "", ""],     # no images at all
        ["NOMASK", "A", "0", "", "", ""],
        ["BADIHC", "A", "4+", "", "", ""],
        ["BADISH", "A", "2+", "equivocal", "", ""],
        ["BADHER2", "A", "", "", "maybe", ""],
        ["DUP", "A", "0", "", "", ""],
        ["DUP", "A", "0", "", "", ""],
        ["TWOCENTRES", "A", "0", "", "", ""],
        ["TWOCENTRES", "B", "0", "", "", ""],
        ["", "A", "0", "", "", ""],
        ["NOCENTRE", "", "0", "", "", ""],
        ["../evil", "A", "0", "", "", ""],
        ["CONFLICT", "A", "3+", "", "0", ""],
    ]
    for pid in ["OK", "NOMASK", "BADIHC", "BADISH", "BADHER2", "DUP", "TWOCENTRES",
                "NOCENTRE", "CONFLICT"]:
        write_images(root, pid, mask=pid != "NOMASK")
    write_images(root, "GAP", n_phases=3, skip=(1,))
    write_images(root, "UNLISTED")
    write_csv(root / "clinical.csv", HEADER, rows)

    result = read_cohort(root, COLUMNS)
    assert [c.patient_id for c in result.cases] == ["OK"]
    assert result.unlisted == ["UNLISTED"]
    assert_rejected(result, "GAP", "missing phase file", "phase 1 of 0..2",
                    file="images/GAP/GAP_0001.nii.gz")
    assert_rejected(result, "NOFOLDER", "missing phase file", "no folder images/NOFOLDER",
                    file="images/NOFOLDER/NOFOLDER_0000.nii.gz")
    assert_rejected(result, "NOMASK", "missing mask file",
                    file="segmentations/expert/NOMASK.nii.gz")
    assert_rejected(result, "BADIHC", "row 6", "unknown IHC score '4+'", file="clinical.csv")
    assert_rejected(result, "BADISH", "unknown ISH result 'equivocal'", file="clinical.csv")
    assert_rejected(result, "BADHER2", "unknown binary her2 value 'maybe'", file="clinical.csv")
    assert_rejected(result, "DUP", "duplicate patient_id (rows 9, 10)", file="clinical.csv")
    assert_rejected(result, "TWOCENTRES", "2 centres: 'A' and 'B'", "rows 11, 12")
    assert_rejected(result, "", "row 13: empty patient_id", file="clinical.csv")
    assert_rejected(result, "NOCENTRE", "empty center")
    assert_rejected(result, "../evil", "not a plain name")
    assert_rejected(result, "CONFLICT", "her2 0 contradicts IHC 3+")
    # One rejection per patient, sorted.
    ids = [r.patient_id for r in result.rejected]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 12
    assert str(reasons(result)[""].error()).startswith("clinical.csv: row 13")


def test_two_files_for_one_phase_or_mask(tmp_path):
    write_images(tmp_path, "P1")
    write_images(tmp_path, "P2")
    write_nifti(tmp_path / "images/P1/P1_0001.nii", np.zeros(SHAPE, np.float32))
    write_nifti(tmp_path / "segmentations/expert/P2.nii", np.zeros(SHAPE, np.uint8))
    write_csv(tmp_path / "clinical.csv", ["patient_id", "center", "her2"],
              [["P1", "A", "1"], ["P2", "A", "0"]])
    result = read_cohort(tmp_path, COLUMNS)
    assert_rejected(result, "P1", "two files for phase 1", "P1_0001.nii, P1_0001.nii.gz")
    assert_rejected(result, "P2", "two mask files")


def test_symlink_loops_are_rejected_not_hung(tmp_path):
    write_images(tmp_path, "P1", n_phases=2)
    loop = tmp_path / "images/P1/P1_0002.nii.gz"
    loop.symlink_to(tmp_path / "images/P1/loop_b")
    (tmp_path / "images/P1/loop_b").symlink_to(loop)
    write_csv(tmp_path / "clinical.csv", ["patient_id", "center", "her2"], [["P1", "A", "1"]])
    assert_rejected(read_cohort(tmp_path, COLUMNS), "P1", "symlink loop",
                    file="images/P1/P1_0002.nii.gz")

    man = tmp_path / "m"
    write_manifest_cohort(man, patients=("M1",))
    (man / "x.nii.gz").symlink_to(man / "x.nii.gz")
    rows = list(csv.reader(open(man / "manifest.csv")))
    rows[1][3] = "x.nii.gz"
    write_csv(man / "manifest.csv", rows[0], rows[1:])
    assert_rejected(read_cohort(man, COLUMNS), "M1", "symlink loop", "phase_1",
                    file="x.nii.gz")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_paths_escaping_the_root(tmp_path, kind):
    outside = write_nifti(tmp_path / "elsewhere" / "img.nii.gz", np.zeros(SHAPE, np.float32))
    root = tmp_path / "cohort"
    write_manifest_cohort(root, patients=("M1",))
    if kind == "dotdot":
        cell = "../elsewhere/img.nii.gz"
    elif kind == "absolute":
        cell = str(outside)
    else:
        (root / "link.nii.gz").symlink_to(outside)
        cell = "link.nii.gz"
    rows = list(csv.reader(open(root / "manifest.csv")))
    rows[1][2] = cell
    write_csv(root / "manifest.csv", rows[0], rows[1:])

    refused = read_cohort(root, COLUMNS)
    assert not refused.cases
    assert_rejected(refused, "M1", "outside the cohort root" if kind == "symlink"
                    else "leaves the cohort root", "allow_outside_root")

    allowed = read_cohort(root, COLUMNS, allow_outside_root=True)
    assert not allowed.rejected
    assert os.path.realpath(allowed.cases[0].phases[0]) == os.path.realpath(outside)


# ----------------------------------------------------------------------------- listing hash

def test_listing_hash_is_stable_and_tracks_files_and_rows(mamamia):
    columns = COLUMNS
    first = cohort_lib.cohort_listing_hash(read_cohort(mamamia, columns))
    assert first == cohort_lib.cohort_listing_hash(read_cohort(mamamia, columns))
    assert len(first) == 64 and int(first, 16) >= 0

    path = mamamia / "images/P2/P2_0001.nii.gz"
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    touched = cohort_lib.cohort_listing_hash(read_cohort(mamamia, columns))
    assert touched != first

    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cohort_lib.cohort_listing_hash(read_cohort(mamamia, columns)) == first

    rows = list(csv.reader(open(mamamia / "clinical.csv")))
    rows[2][5] = "Philips"                         # P2's manufacturer
    write_csv(mamamia / "clinical.csv", rows[0], rows[1:])
    assert cohort_lib.cohort_listing_hash(read_cohort(mamamia, columns)) != first

    rows[2][5] = "Siemens"
    rows[3][3] = "negative"                        # P3's ISH
    write_csv(mamamia / "clinical.csv", rows[0], rows[1:])
    assert cohort_lib.cohort_listing_hash(read_cohort(mamamia, columns)) != first


def test_listing_hash_names_a_vanished_file(mamamia):
    result = read_cohort(mamamia, COLUMNS)
    result.cases[0].mask.unlink()
    with pytest.raises(Her2jaxError, match="patient P1") as info:
        cohort_lib.cohort_listing_hash(result)
    assert "P1.nii.gz" in str(info.value)


# ----------------------------------------------------------------------------- properties

PID = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=10)
ROW = st.tuples(st.sampled_from(["A", "B", "centre 3"]), st.integers(1, 4),
                st.sampled_from(["", "0", "1+", "2+", "3+", "IHC 2+"]),
                st.sampled_from(["", "positive", "negative", "amplified"]),
                st.sampled_from(["", "1", "0", "1.0"]))


def _consistent(ihc, ish, her2) -> bool:
    from her2jax import labels

    derived, _ = labels.binary(labels.normalize_ihc(ihc), labels.normalize_ish(ish), -1)
    recorded = labels.normalize_her2(her2)
    return recorded == -1 or derived is None or derived == recorded


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(PID, ROW, min_size=1, max_size=6))
def test_random_valid_manifests_round_trip(patients):
    from her2jax import labels

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        n_max = max(n for _, n, *_ in patients.values())
        rows = []
        for pid, (center, n, ihc, ish, her2) in patients.items():
            cells = []
            for k in range(n_max):
                if k < n:
                    rel = f"d/{pid}/p{k}.nii.gz"
                    (root / rel).parent.mkdir(parents=True, exist_ok=True)
                    (root / rel).write_bytes(b"x")        # reading a cohort opens no image
                    cells.append(rel)
                else:
                    cells.append("")
            (root / f"d/{pid}/mask.nii.gz").write_bytes(b"m")
            rows.append([pid, center, *cells, f"d/{pid}/mask.nii.gz", ihc, ish, her2])
        header = ["patient_id", "center", *[f"phase_{k}" for k in range(n_max)], "mask",
                  "ihc_score", "ish_result", "her2"]
        write_csv(root / "manifest.csv", header, rows)
        result = read_cohort(root, COLUMNS)
        expected = {}
        for pid, (center, n, ihc, ish, her2) in patients.items():
            if _consistent(ihc, ish, her2):
                expected[pid] = Case(
                    pid, center, tuple(root / f"d/{pid}/p{k}.nii.gz" for k in range(n)),
                    root / f"d/{pid}/mask.nii.gz", labels.normalize_ihc(ihc),
                    labels.normalize_ish(ish), labels.normalize_her2(her2), ())
        assert result.cases == [expected[p] for p in sorted(expected)]
        assert {r.patient_id for r in result.rejected} == set(patients) - set(expected)


SEGMENT = st.sampled_from(["a", "b", "..", "."])


@settings(max_examples=40, deadline=None)
@given(st.lists(SEGMENT, min_size=0, max_size=6))
def test_dotdot_paths_are_refused_iff_they_leave_the_root(segments):
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp) / "root"
        root.mkdir()
        cell = "/".join([*segments, "img.nii.gz"])
        depth, escapes = 0, False
        for s in segments:
            depth += {"..": -1, ".": 0}.get(s, 1)
            escapes |= depth < 0
        # Lexical normalisation: "a/../.." leaves the root even if "a" does not exist.
        target = pathlib.Path(os.path.normpath(root / cell))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
        (root / "mask.nii.gz").write_bytes(b"m")
        write_csv(root / "manifest.csv", ["patient_id", "center", "phase_0", "mask", "her2"],
                  [["P1", "A", cell, "mask.nii.gz", "1"]])
        result = read_cohort(root, COLUMNS)
        if escapes:
            assert not result.cases
            assert "leaves the cohort root" in result.rejected[0].reason
        else:
            assert result.cases[0].phases == (target,) and not result.rejected
