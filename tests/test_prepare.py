"""her2jax-prepare: the TFDS/ArrayRecord dataset, its reports, versioning and atomicity."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from her2jax.data import cohort as cohort_lib
from her2jax.data import kinetic_features, nifti, prepare, tfds_builder
from her2jax.errors import Her2jaxError

from .conftest import small_data_config, tensorflow_stub

REPO = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def copy_cohort(src: Path, dst: Path, per_center: int = 2) -> Path:
    """A small writable copy of the phantom: the first ``per_center`` patients of each centre."""
    rows, seen = [], {}
    for row in read_csv(src / "clinical.csv"):
        if seen.get(row["center"], 0) < per_center:
            seen[row["center"]] = seen.get(row["center"], 0) + 1
            rows.append(row)
    for row in rows:
        pid = row["patient_id"]
        shutil.copytree(src / "images" / pid, dst / "images" / pid)
        (dst / "segmentations" / "expert").mkdir(parents=True, exist_ok=True)
        shutil.copy(src / "segmentations" / "expert" / f"{pid}.nii.gz",
                    dst / "segmentations" / "expert")
    write_csv(dst / "clinical.csv", rows)
    return dst


def all_datasets(data_dir: Path) -> list[Path]:
    return tfds_builder.find_datasets(data_dir)


# ---------------------------------------------------------------- the dataset itself


def test_dataset_holds_every_case_with_its_raw_labels(prepared, phantom_cohort):
    clinical = {r["patient_id"]: r for r in read_csv(phantom_cohort / "clinical.csv")}
    index = read_csv(prepared.dataset_dir / "index.csv")
    assert sorted(r["patient_id"] for r in index) == sorted(clinical)
    for split in {r["split"] for r in index}:
        ids = [r["patient_id"] for r in index if r["split"] == split]
        assert ids == sorted(ids), "examples are stored in patient-id order"
    meta = json.loads((prepared.dataset_dir / "her2jax.json").read_text())
    per_center = {}
    for r in clinical.values():
        per_center[r["center"]] = per_center.get(r["center"], 0) + 1
    assert {v["center"]: v["num_examples"] for v in meta["splits"].values()} == per_center

    source = tfds_builder.data_source(prepared.dataset_dir, "CENTER_B")
    for position in range(len(source)):
        example = source[position]
        row = clinical[example["patient_id"].decode()]
        assert example["center"].decode() == "CENTER_B" == row["center"]
        assert example["ihc"].decode() == row["ihc_score"]
        assert example["ish"].decode() == row["ish_result"]
        assert example["her2"] == (int(row["her2"]) if row["her2"] else -1)
        clinical_json = json.loads(example["clinical"].decode())
        assert clinical_json["manufacturer"] == row["manufacturer"]
        assert json.loads(example["recipe"].decode())["shape"] == [24, 24, 24]


def test_crops_are_normalised_float16_with_the_tumour_inside(prepared):
    source = tfds_builder.data_source(prepared.dataset_dir, "CENTER_A")
    for position in range(len(source)):
        example = source[position]
        image, mask = example["image"], example["mask"]
        assert image.shape == (24, 24, 24, 1) and image.dtype == np.float16
        assert np.isfinite(image).all()
        x = image.astype(np.float32)
        assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05  # per-crop z-score
        # A tight tumour box resized to the grid: the mask fills much of the crop.
        assert 0.2 < mask.mean() <= 1.0


def test_crop_affine_maps_back_onto_the_source_tumour(prepared, phantom_cohort):
    """Geometry stored with each example maps crop voxels onto the original mask."""
    source = tfds_builder.data_source(prepared.dataset_dir, "CENTER_C")
    for position in range(len(source)):
        example = source[position]
        pid = example["patient_id"].decode()
        mask_img = nib.load(phantom_cohort / "segmentations" / "expert" / f"{pid}.nii.gz")
        np.testing.assert_allclose(example["source_affine"], mask_img.affine, atol=1e-5)
        assert tuple(example["source_shape"]) == mask_img.shape
        source_mask = np.asarray(mask_img.dataobj) > 0
        inside = np.argwhere(example["mask"] > 0)
        world = example["crop_affine"] @ np.c_[inside, np.ones(len(inside))].T
        voxels = np.rint(np.linalg.inv(mask_img.affine) @ world)[:3].astype(int).T
        voxels = np.clip(voxels, 0, np.array(source_mask.shape) - 1)
        hits = source_mask[tuple(voxels.T)].mean()
        assert hits > 0.8, f"{pid}: only {hits:.0%} of the crop's mask lands on the source mask"
        box = example["box"]
        lo, hi = np.argwhere(source_mask).min(0), np.argwhere(source_mask).max(0) + 1
        assert (box[:, 0] <= lo).all() and (box[:, 1] >= hi).all(), "box must hold the tumour"


def test_reports_excluded_rejected_and_montage(prepared, phantom_cohort):
    clinical = read_csv(phantom_cohort / "clinical.csv")
    undetermined = sorted(r["patient_id"] for r in clinical
                          if r["ihc_score"] == "2+" and not r["ish_result"])
    assert undetermined, "the phantom should contain IHC 2+ cases without ISH"
    excluded = read_csv(prepared.dataset_dir / "excluded.csv")
    three = sorted(r["patient_id"] for r in excluded if r["scheme"] == "her2_3class")
    assert three == undetermined
    assert all("ISH" in r["reason"] for r in excluded if r["scheme"] == "her2_3class")
    assert prepared.excluded["her2_3class"] == len(undetermined)
    assert read_csv(prepared.dataset_dir / "rejected.csv") == []
    montage = Image.open(prepared.dataset_dir / "qc_montage.png")
    assert montage.width >= 3 * 64 and montage.height >= 64
    pixels = np.asarray(montage.convert("RGB"))
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 80)
    assert red.sum() > len(clinical) * 20, "every tile should carry a mask outline"


def test_kinetic_features_of_every_case_are_written_beside_the_index(prepared, phantom_cohort):
    path = prepared.dataset_dir / kinetic_features.FILE
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == ["patient_id", *kinetic_features.FEATURES]
    table = kinetic_features.read_table(prepared.dataset_dir)
    index = read_csv(prepared.dataset_dir / "index.csv")
    assert sorted(table) == sorted(r["patient_id"] for r in index)
    assert all(np.isfinite(x).all() for x in table.values())
    # The values are those of the NIfTI files (a case of every centre).
    cases = {c.patient_id: c for c in cohort_lib.read_cohort(
        phantom_cohort, small_data_config().columns).cases}
    for pid in ("PHA_0001", "PHB_0002", "PHC_0003"):
        expected = kinetic_features.case_features(*nifti.load_case(cases[pid]))
        np.testing.assert_array_equal(table[pid], list(expected.values()))
    assert path.stat().st_mode & 0o777 == (prepared.dataset_dir / "index.csv").stat().st_mode & 0o777


def test_prepare_is_deterministic_across_processes(phantom_cohort, prepared, tmp_path):
    """The same cohort and recipe give the same bytes in another process (other worker count,
    other hash seed): TFDS's examples came out with their features in the order of a hash
    table that changes per process until the shards were re-serialized deterministically."""
    code = ("import sys; from her2jax.data import prepare; from tests.conftest import "
            "small_data_config; print(prepare.prepare(sys.argv[1], sys.argv[2], "
            "small_data_config(), workers=2, progress=False).dataset_dir)")
    repo = Path(__file__).resolve().parents[1]
    for hash_seed in ("1", "2"):
        out = tmp_path / f"hash_seed_{hash_seed}"
        result = subprocess.run(
            [sys.executable, "-c", code, str(phantom_cohort), str(out)], cwd=repo,
            env={**os.environ, "PYTHONHASHSEED": hash_seed}, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        again = Path(result.stdout.split()[-1])
        assert again.parent.name == prepared.dataset_dir.parent.name
        shards = sorted(prepared.dataset_dir.glob("*.array_record-*"))
        assert len(shards) == 3
        for shard in shards:
            assert (again / shard.name).read_bytes() == shard.read_bytes(), (hash_seed,
                                                                              shard.name)


# ---------------------------------------------------------------- versioning and atomicity


def test_same_cohort_and_recipe_is_reused_a_changed_recipe_is_refused(phantom_cohort, tmp_path):
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort")
    data_dir = tmp_path / "data"
    first = prepare.prepare(cohort, data_dir, small_data_config(), workers=1, progress=False)
    stamp = (first.dataset_dir / "her2jax.json").stat().st_mtime_ns
    again = prepare.prepare(cohort, data_dir, small_data_config(), workers=1, progress=False)
    assert again.reused and again.dataset_dir == first.dataset_dir
    assert (first.dataset_dir / "her2jax.json").stat().st_mtime_ns == stamp

    changed = small_data_config()
    changed.recipe.margin_mm = 4.0
    with pytest.raises(Her2jaxError, match=r"margin_mm 0\.0 -> 4\.0.*--overwrite"):
        prepare.prepare(cohort, data_dir, changed, workers=1, progress=False)
    assert all_datasets(data_dir) == [first.dataset_dir]

    replaced = prepare.prepare(cohort, data_dir, changed, workers=1, progress=False,
                               overwrite=True)
    assert all_datasets(data_dir) == [replaced.dataset_dir] != [first.dataset_dir]
    assert json.loads((replaced.dataset_dir / "her2jax.json").read_text())[
        "recipe"]["margin_mm"] == 4.0


def test_a_changed_cohort_is_never_served_stale(phantom_cohort, tmp_path):
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort")
    data_dir = tmp_path / "data"
    prepare.prepare(cohort, data_dir, small_data_config(), workers=1, progress=False)
    rows = read_csv(cohort / "clinical.csv")
    rows[0]["ihc_score"] = "3+" if rows[0]["ihc_score"] != "3+" else "0"
    write_csv(cohort / "clinical.csv", rows)
    with pytest.raises(Her2jaxError, match="another version of this cohort"):
        prepare.prepare(cohort, data_dir, small_data_config(), workers=1, progress=False)


def test_a_failed_build_leaves_no_half_dataset(phantom_cohort, tmp_path, monkeypatch):
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort")
    data_dir = tmp_path / "data"
    good = prepare.prepare(cohort, data_dir, small_data_config(), workers=1, progress=False)
    before = sorted(p.relative_to(data_dir) for p in data_dir.rglob("*"))

    def crash(*args, **kwargs):
        real_build(*args, **kwargs)   # the dataset is fully written in the temporary dir...
        raise OSError(28, "No space left on device")   # ...then the disk fills up

    real_build = tfds_builder.build
    monkeypatch.setattr(tfds_builder, "build", crash)
    changed = small_data_config()
    changed.recipe.channels = ("C1",)
    with pytest.raises(OSError):
        prepare.prepare(cohort, data_dir, changed, workers=1, progress=False, overwrite=True)
    assert sorted(p.relative_to(data_dir) for p in data_dir.rglob("*")) == before
    assert all_datasets(data_dir) == [good.dataset_dir]


def test_leftovers_of_a_killed_run_are_invisible_and_cleaned(phantom_cohort, tmp_path,
                                                             monkeypatch):
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort")
    system_tmp = tmp_path / "system-tmp"   # prepare must leave nothing in the system temp dir
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    data_dir = tmp_path / "data"
    # What a prepare killed mid-build leaves: its temporary dir, named after a dead pid.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = data_dir / f".her2jax-prepare-{dead}-abc123" / "her2_dce_mri" / "x" / "1.0.0"
    stale.mkdir(parents=True)
    (stale / "her2jax.json").write_text("{}")
    assert all_datasets(data_dir) == []
    result = prepare.prepare(cohort, data_dir, small_data_config(), workers=1, progress=False)
    assert all_datasets(data_dir) == [result.dataset_dir]
    assert not list(data_dir.glob(".her2jax-prepare-*"))
    assert not list(system_tmp.iterdir())


def test_validate_only_writes_reports_and_builds_nothing(phantom_cohort, tmp_path):
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort")
    (cohort / "images" / "PHB_0001" / "PHB_0001_0002.nii.gz").unlink()
    result = prepare.prepare(cohort, tmp_path / "data", small_data_config(), workers=1,
                             progress=False, validate_only=True)
    assert result.dataset_dir is None and all_datasets(tmp_path / "data") == []
    rejected = read_csv(tmp_path / "data" / "validation" / "rejected.csv")
    assert [r["patient_id"] for r in rejected] == ["PHB_0001"]
    assert "PHB_0001_0002" in rejected[0]["file"] + rejected[0]["reason"]
    assert (tmp_path / "data" / "validation" / "qc_montage.png").stat().st_size > 0
    assert result.num_cases == 5


# ---------------------------------------------------------------- bad input


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def _break(cohort: Path, how: str) -> tuple[str, str]:
    """Breaks one case of ``cohort`` in one way; returns (patient, text the error must name)."""
    pid = "PHA_0002"
    images = cohort / "images" / pid
    phase1 = images / f"{pid}_0001.nii.gz"
    mask = cohort / "segmentations" / "expert" / f"{pid}.nii.gz"
    ref = nib.load(phase1)
    rows = read_csv(cohort / "clinical.csv")
    if how == "missing phase file":
        (images / f"{pid}_0002.nii.gz").unlink()
        return pid, f"{pid}_0002"
    if how == "truncated gzip":
        data = phase1.read_bytes()
        phase1.write_bytes(data[: len(data) // 2])
        return pid, phase1.name
    if how == "not a NIfTI file":
        phase1.write_bytes(gzip.compress(b"patient_id,center\nPHA_0002,CENTER_A\n" * 20))
        return pid, phase1.name
    if how == "absurd dimensions":
        header = nib.Nifti1Header()
        header.set_data_dtype(np.int16)
        header.set_data_shape((30000, 30000, 30000))
        phase1.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 4096))
        return pid, phase1.name
    if how == "phases of different shapes":
        _nifti(phase1, np.zeros((10, 10, 10), np.float32), ref.affine)
        return pid, phase1.name
    if how == "phases with different affines":
        shifted = ref.affine.copy()
        shifted[:3, 3] += 7.0
        _nifti(phase1, np.asarray(ref.dataobj), shifted)
        return pid, phase1.name
    if how == "empty mask":
        _nifti(mask, np.zeros(ref.shape, np.uint8), ref.affine)
        return pid, "empty"
    if how == "mask grid mismatch":
        _nifti(mask, np.ones((8, 8, 8), np.uint8), ref.affine)
        return pid, mask.name
    if how == "NaN voxels":
        data = np.asarray(ref.dataobj, np.float32).copy()
        data[3, 3, 3] = np.nan
        _nifti(phase1, data, ref.affine)
        return pid, phase1.name
    if how == "unknown IHC value":
        next(r for r in rows if r["patient_id"] == pid)["ihc_score"] = "4+"
        write_csv(cohort / "clinical.csv", rows)
        return pid, "4+"
    if how == "duplicate patient_id":
        rows.append(dict(next(r for r in rows if r["patient_id"] == pid)))
        write_csv(cohort / "clinical.csv", rows)
        return pid, "duplicate"
    if how == "patient in two centres":
        rows.append({**next(r for r in rows if r["patient_id"] == pid), "center": "CENTER_B"})
        write_csv(cohort / "clinical.csv", rows)
        return pid, "CENTER_B"
    raise AssertionError(how)


CASE_PROBLEMS = ["missing phase file", "truncated gzip", "not a NIfTI file", "absurd dimensions",
                 "phases of different shapes", "phases with different affines", "empty mask",
                 "mask grid mismatch", "NaN voxels", "unknown IHC value", "duplicate patient_id",
                 "patient in two centres"]


@pytest.mark.parametrize("how", CASE_PROBLEMS)
def test_a_bad_case_stops_prepare_with_one_line_naming_it(phantom_cohort, tmp_path, how):
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort")
    pid, named = _break(cohort, how)
    with pytest.raises(Her2jaxError) as error:
        prepare.prepare(cohort, tmp_path / "data", small_data_config(), workers=1,
                        progress=False)
    message = str(error.value)
    assert "\n" not in message
    assert pid in message and named in message, message
    assert not (tmp_path / "data").exists(), "prepare made data_dir: a failed run removes it"


def test_skip_invalid_writes_the_good_cases_and_lists_the_others(phantom_cohort, tmp_path):
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort", per_center=3)
    broken = {}
    for pid, how in [("PHA_0002", "NaN voxels"), ("PHB_0001", "missing phase file"),
                     ("PHC_0003", "empty mask")]:
        # _break works on PHA_0002; point it at each patient by renaming around it.
        broken[pid] = how
    for pid, how in broken.items():
        _break_patient(cohort, pid, how)
    result = prepare.prepare(cohort, tmp_path / "data", small_data_config(), workers=1,
                             progress=False, skip_invalid=True)
    index = read_csv(result.dataset_dir / "index.csv")
    assert len(index) == 9 - 3
    assert not set(broken) & {r["patient_id"] for r in index}
    rejected = read_csv(result.dataset_dir / "rejected.csv")
    assert sorted(r["patient_id"] for r in rejected) == sorted(broken)
    assert all(r["reason"] for r in rejected)


def _break_patient(cohort: Path, pid: str, how: str) -> None:
    images = cohort / "images" / pid
    phase1 = images / f"{pid}_0001.nii.gz"
    ref = nib.load(phase1)
    if how == "NaN voxels":
        data = np.asarray(ref.dataobj, np.float32).copy()
        data[0, 0, 0] = np.inf
        _nifti(phase1, data, ref.affine)
    elif how == "missing phase file":
        (images / f"{pid}_0003.nii.gz").unlink()
    elif how == "empty mask":
        _nifti(cohort / "segmentations" / "expert" / f"{pid}.nii.gz",
               np.zeros(ref.shape, np.uint8), ref.affine)


def test_missing_clinical_column_is_an_error_naming_it(phantom_cohort, tmp_path):
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort")
    rows = [{k: v for k, v in r.items() if k != "center"} for r in
            read_csv(cohort / "clinical.csv")]
    write_csv(cohort / "clinical.csv", rows)
    with pytest.raises(Her2jaxError, match="center") as error:
        prepare.prepare(cohort, tmp_path / "data", small_data_config(), workers=1,
                        progress=False, skip_invalid=True)
    assert "clinical.csv" in str(error.value)


# ---------------------------------------------------------------- the command line


def _run(*args: str, env=None, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "her2jax.cli.prepare", *args],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_cli_bad_case_exits_2_with_one_line(phantom_cohort, tmp_path):
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort")
    _break(cohort, "NaN voxels")
    result = _run(f"--cohort={cohort}", f"--data_dir={tmp_path / 'data'}", "--noprogress")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("prepare.py: error: "), result.stderr
    assert "PHA_0002" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_cli_refusal_removes_the_folders_it_made_and_only_those(phantom_cohort, tmp_path):
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort")
    _break(cohort, "NaN voxels")
    mine = tmp_path / "mine"                         # a user's folder, with a file in it
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    mtime = (mine / "notes.txt").stat().st_mtime_ns
    empty = tmp_path / "empty"                       # a user's empty folder given as data_dir
    empty.mkdir()
    for data_dir in (mine / "new" / "data", empty):
        result = _run(f"--cohort={cohort}", f"--data_dir={data_dir}", "--noprogress",
                      "--workers=1")
        assert result.returncode == 2 and "PHA_0002" in result.stderr, result.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]   # new/ and new/data are gone
    assert (mine / "notes.txt").read_text() == "keep me"
    assert (mine / "notes.txt").stat().st_mtime_ns == mtime
    assert empty.is_dir() and list(empty.iterdir()) == []


@pytest.mark.parametrize("args, named", [
    (["--config.data.recipe.nonexistent=3"], "nonexistent"),
    (["--config.data.recipe.margin_mm=wide"], "margin_mm"),
    (["--workers=-1"], "workers"),
    (["--no_such_flag"], "no_such_flag"),
])
def test_cli_bad_flags_exit_2_with_one_line(phantom_cohort, tmp_path, args, named):
    result = _run(f"--cohort={phantom_cohort}", f"--data_dir={tmp_path / 'data'}",
                  "--config=configs/default.py", *args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert not (tmp_path / "data").exists()


def test_cli_writes_the_dataset_without_tensorflow(phantom_cohort, tmp_path):
    """A stub `tensorflow` that records any import attempt sits first on the path."""
    env, marker = tensorflow_stub(tmp_path)
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort", per_center=4)
    result = _run(f"--cohort={cohort}", f"--data_dir={tmp_path / 'data'}", "--workers=2",
                  "--config=configs/tiny_cpu.py", env=env)
    assert result.returncode == 0, result.stderr
    assert "wrote 12 cases" in result.stdout
    read = subprocess.run(
        [sys.executable, "-m", "her2jax.cli.inspect_data", f"--data_dir={tmp_path / 'data'}",
         "--config=configs/tiny_cpu.py", "--config.data.test_centers=()", "--batch_size=8"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert read.returncode == 0, read.stderr
    assert "global batch 0: image (8, 32, 32, 32, 1) float16 over 8 device(s)" in read.stdout
    assert not marker.exists(), marker.read_text() if marker.exists() else ""


def test_image_folders_without_a_table_row_are_reported(phantom_cohort, tmp_path):
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort")
    rows = read_csv(cohort / "clinical.csv")
    write_csv(cohort / "clinical.csv", [r for r in rows if r["patient_id"] != "PHC_0002"])
    result = prepare.prepare(cohort, tmp_path / "data", small_data_config(), workers=1,
                             progress=False)
    assert result.num_cases == 5 and result.unlisted == ("PHC_0002",)
    assert "1 image folder(s) without a table row ignored (PHC_0002)" in result.summary()


def test_fast_image_reader_matches_tfds_decoding(prepared):
    """The training hot path parses only the image; it must equal TFDS's full decoding."""
    source = tfds_builder.data_source(prepared.dataset_dir, "CENTER_B")
    meta = json.loads((prepared.dataset_dir / "her2jax.json").read_text())
    reader = tfds_builder.ImageReader(prepared.dataset_dir, "CENTER_B", meta["image_shape"])
    assert len(reader) == len(source)
    positions = [5, 0, 11, 5]
    out = np.full((6, *meta["image_shape"]), np.nan, np.float16)
    reader.read_into(positions, out, rows=[1, 2, 3, 4])
    for row, position in zip([1, 2, 3, 4], positions, strict=True):
        np.testing.assert_array_equal(out[row], source[position]["image"])
    assert np.isnan(out[[0, 5]]).all(), "rows not asked for stay untouched"
    with pytest.raises(Her2jaxError, match="no split 'CENTER_Z'"):
        tfds_builder.ImageReader(prepared.dataset_dir, "CENTER_Z", meta["image_shape"])
