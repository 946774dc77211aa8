"""The synthetic phantom cohort: layout, labels, geometry, reproducibility, difficulty, CLI."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from her2jax.data import phantom
from her2jax.errors import Her2jaxError
from her2jax.labels import CLASS_NAMES, three_class

ROOT = Path(__file__).resolve().parents[1]
CLASSES = CLASS_NAMES["her2_3class"]
PHASES = 5  # write_cohort's default, used by the conftest cohort


def _load_benchmark():
    path = ROOT / "benchmarks" / "bench_phantom_baseline.py"
    spec = importlib.util.spec_from_file_location("bench_phantom_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_benchmark()


def _table(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "clinical.csv", dtype=str, keep_default_na=False)


def _arrays(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.asarray(nib.load(p).dataobj)
            for p in sorted(root.rglob("*.nii.gz"))}


@pytest.fixture(scope="module")
def baseline_features(tmp_path_factory):
    """Baseline features of a 90-patient cohort: large enough for a leave-centre-out AUC."""
    root = phantom.write_cohort(tmp_path_factory.mktemp("phantom90"), patients=90, centers=3,
                                seed=0, shape=(48, 48, 24))
    return bench.cohort_features(root)


# --- layout and clinical table ------------------------------------------------------------

def test_layout_and_clinical_columns(phantom_cohort):
    table = _table(phantom_cohort)
    assert tuple(table.columns) == phantom.CLINICAL_COLUMNS
    assert len(table) == 36 and table.patient_id.is_unique
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", pid) for pid in table.patient_id)
    assert sorted(table.center.unique()) == ["CENTER_A", "CENTER_B", "CENTER_C"]
    for pid in table.patient_id:
        images = sorted(p.name for p in (phantom_cohort / "images" / pid).iterdir())
        assert images == [f"{pid}_{k:04d}.nii.gz" for k in range(PHASES)]
        assert (phantom_cohort / "segmentations" / "expert" / f"{pid}.nii.gz").is_file()
    assert (phantom_cohort / phantom.MARKER).is_file()
    assert not list(phantom_cohort.glob("*.partial"))


def test_clinical_values_follow_asco_cap(phantom_cohort):
    table = _table(phantom_cohort)
    assert set(table.ihc_score) <= {"0", "1+", "2+", "3+"}
    assert set(table.ish_result) <= {"", "positive", "negative"}
    assert set(table.her2) <= {"", "0", "1"}
    for row in table.itertuples():
        label, _ = three_class(row.ihc_score, row.ish_result)
        assert row.her2_class == ("" if label is None else CLASSES[label]), row
        assert row.her2 == ("" if label is None else str(int(label == 2))), row
        times = [float(t) for t in row.acquisition_times.split(";")]
        assert len(times) == PHASES and times[0] == 0 and np.all(np.diff(times) > 0)
        assert row.manufacturer and float(row.field_strength) in (1.5, 3.0)
    # A couple of realistic unlabellable cases: IHC 2+ whose ISH never arrived.
    undetermined = table[table.her2_class == ""]
    assert len(undetermined) >= 1
    assert (undetermined.ihc_score == "2+").all() and (undetermined.ish_result == "").all()


def test_clinical_table_matches_written_cohort(phantom_cohort):
    expected = phantom.clinical_table(patients=36, centers=3, seed=0)
    written = _table(phantom_cohort)
    expected = expected.astype(str).sort_values("patient_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(written, expected)


def test_class_mix_on_a_large_cohort():
    table = phantom.clinical_table(patients=3000, centers=5, seed=7)
    labelled = table[table.her2_class != ""]
    shares = labelled.her2_class.value_counts(normalize=True)
    for name, share in zip(CLASSES, phantom.CLASS_MIX, strict=True):
        assert abs(shares[name] - share) < 0.03, shares
    assert 0.02 < (table.her2_class == "").mean() < 0.08
    assert labelled.groupby("center").her2_class.nunique().eq(3).all()  # every centre: all classes
    low = labelled[labelled.her2_class == "HER2-low"]
    assert set(low.ihc_score) == {"1+", "2+"} and (low[low.ihc_score == "2+"].ish_result
                                                   == "negative").all()
    assert 0.2 < (table.ish_result == "").mean() < 0.9  # ISH mostly missing outside IHC 2+


# --- images --------------------------------------------------------------------------------

def test_images_and_masks_share_grid(phantom_cohort):
    for pid in _table(phantom_cohort).patient_id:
        mask = nib.load(phantom_cohort / "segmentations" / "expert" / f"{pid}.nii.gz")
        data = np.asarray(mask.dataobj)
        assert mask.get_data_dtype() == np.uint8 and set(np.unique(data)) == {0, 1}
        assert mask.shape == (48, 48, 24)
        for k in range(PHASES):
            image = nib.load(phantom_cohort / "images" / pid / f"{pid}_{k:04d}.nii.gz")
            assert image.shape == mask.shape
            np.testing.assert_allclose(image.affine, mask.affine)
            assert image.get_data_dtype() in (np.int16, np.float32)


def test_centres_differ_in_orientation(phantom_cohort):
    codes = {}
    for row in _table(phantom_cohort).itertuples():
        pid = row.patient_id
        image = nib.load(phantom_cohort / "images" / pid / f"{pid}_0000.nii.gz")
        codes.setdefault(row.center, set()).add(nib.aff2axcodes(image.affine))
    assert all(len(c) == 1 for c in codes.values())  # one protocol per centre
    distinct = set().union(*codes.values())
    assert len(distinct) >= 2
    # At least one centre stores its axes in another order (not left-right first), so
    # canonical reorientation matters beyond flips.
    assert any(axes[0] not in "RL" for axes in distinct)


def test_tumour_enhances_inside_its_mask(phantom_cohort):
    # The mask must sit on the enhancing tumour in the images' own voxel grid: moved by half
    # the field of view along any axis (a flip or permutation gone wrong), it lands on tissue
    # that barely enhances.
    for pid in _table(phantom_cohort).patient_id:
        c0, c1 = (np.asarray(nib.load(phantom_cohort / "images" / pid / f"{pid}_{k:04d}.nii.gz")
                             .dataobj, dtype=np.float32) for k in (0, 1))
        mask = np.asarray(nib.load(phantom_cohort / "segmentations" / "expert" /
                                   f"{pid}.nii.gz").dataobj) > 0
        subtraction = c1 - c0
        inside = subtraction[mask].mean()
        assert inside > 0.25 * c0[mask].mean(), pid  # percent enhancement over 25 %
        for axis, n in enumerate(mask.shape):
            moved = subtraction[np.roll(mask, n // 2, axis)].mean()
            assert inside > 3 * abs(moved), (pid, axis)


def test_same_seed_same_arrays_other_seed_other_arrays(tmp_path):
    kwargs = dict(patients=4, centers=2, shape=(24, 24, 16), phases=4)
    first = phantom.write_cohort(tmp_path / "a", seed=5, **kwargs)
    again = phantom.write_cohort(tmp_path / "b", seed=5, **kwargs)
    other = phantom.write_cohort(tmp_path / "c", seed=6, **kwargs)
    a, b, c = _arrays(first), _arrays(again), _arrays(other)
    assert len(a) == 4 * 5 and a.keys() == b.keys() == c.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert a[key].dtype == b[key].dtype
    assert (first / "clinical.csv").read_bytes() == (again / "clinical.csv").read_bytes()
    assert any(not np.array_equal(a[key], c[key]) for key in a)


# --- the output directory ------------------------------------------------------------------

def test_refuses_a_foreign_directory_and_replaces_a_phantom(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(Her2jaxError, match="no phantom"):
        phantom.write_cohort(foreign, patients=3, centers=3, seed=0, shape=(16, 16, 16))
    assert (foreign / "notes.txt").read_text() == "mine"

    root = phantom.write_cohort(tmp_path / "p", patients=6, centers=3, seed=0,
                                shape=(16, 16, 16))
    phantom.write_cohort(root, patients=3, centers=3, seed=1, shape=(16, 16, 16))
    assert len(_table(root)) == 3
    assert len(list((root / "images").iterdir())) == 3  # no stale patients from the first run


def test_a_crash_leaves_no_clinical_table(tmp_path, monkeypatch):
    render = phantom._render

    def failing(case, *args):
        if case.number == 2:
            raise RuntimeError("simulated crash")
        return render(case, *args)

    monkeypatch.setattr(phantom, "_render", failing)
    with pytest.raises(RuntimeError):
        phantom.write_cohort(tmp_path / "p", patients=6, centers=3, seed=0, shape=(16, 16, 16))
    assert not (tmp_path / "p" / "clinical.csv").exists()


@pytest.mark.parametrize("kwargs, key", [
    (dict(patients=2, centers=3), "patients"),
    (dict(centers=0), "centers"),
    (dict(phases=3), "phases"),
    (dict(shape=(48, 48)), "shape"),
    (dict(shape="48,48,x"), "shape"),
    (dict(shape=(48, 48, 8)), "shape"),
])
def test_bad_arguments_raise_user_errors(tmp_path, kwargs, key):
    args = dict(patients=6, centers=3, seed=0, shape=(16, 16, 16))
    args.update(kwargs)
    with pytest.raises(Her2jaxError) as error:
        phantom.write_cohort(tmp_path / "p", **args)
    assert error.value.key == key
    assert not (tmp_path / "p").exists()  # nothing written before the arguments are checked


# --- biology and difficulty ----------------------------------------------------------------

def test_enhancement_and_size_differ_by_class_on_average(baseline_features):
    means = baseline_features[baseline_features.her2_class != ""].groupby("her2_class").mean(
        numeric_only=True)
    zero, low, positive = (means.loc[name] for name in CLASSES)
    assert positive.washout < low.washout < zero.washout  # positive washes out
    assert zero.log_volume_mm3 < low.log_volume_mm3 < positive.log_volume_mm3
    assert zero.rim_enhancement < positive.rim_enhancement  # peritumoral oedema


def test_baseline_is_learnable_but_not_trivial(baseline_features):
    results = bench.leave_center_out(baseline_features)
    assert [r["center"] for r in results] == ["CENTER_A", "CENTER_B", "CENTER_C"]
    mean_auc = np.mean([r["macro_auc"] for r in results])
    assert 0.65 <= mean_auc <= 0.97, results
    for r in results:  # no single class is perfectly separable
        assert max(r["per_class_auc"].values()) < 0.99, r


def test_the_ceiling_regenerates_the_tumours_the_images_show(phantom_cohort):
    """bench_phantom_baseline --ceiling fits the phantom's latent tumour parameters, redrawn
    from its seed: they must be the ones the images were rendered with (a changed draw order
    in the phantom would silently fit other numbers)."""
    latent = bench.latent_parameters(phantom_cohort).set_index("patient_id")
    seen = bench.cohort_features(phantom_cohort).set_index("patient_id")
    assert list(latent.index.sort_values()) == list(seen.index.sort_values())
    assert (latent.loc[seen.index, "her2_class"] == seen["her2_class"]).all()
    # Size: the drawn diameter against the mask's volume (elongation and the margin's
    # irregularity blur it a little); washout: the drawn rate against the measured washout.
    size = np.corrcoef(latent.loc[seen.index, "log_diameter"], seen["log_volume_mm3"])[0, 1]
    washout = np.corrcoef(latent.loc[seen.index, "washout"], seen["washout"])[0, 1]
    assert size > 0.9 and abs(washout) > 0.5, (size, washout)


# --- command line --------------------------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "her2jax.cli.phantom", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_cli_writes_a_cohort(tmp_path):
    result = _cli(f"--out={tmp_path / 'c'}", "--patients=6", "--centers=2", "--shape=16,16,16",
                  "--phases=4", "--seed=3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "6 patients" in lines[0] and "CENTER_B 3" in lines[0]
    table = _table(tmp_path / "c")
    assert len(table) == 6 and set(table.center) == {"CENTER_A", "CENTER_B"}
    assert len(list((tmp_path / "c" / "images" / table.patient_id[0]).iterdir())) == 4


@pytest.mark.parametrize("args", [
    [],                                   # --out missing
    ["--patients=2", "--centers=3"],
    ["--phases=3"],
    ["--shape=64,64"],
    ["--patients=many"],
    ["--unknown_flag=1"],
    ["positional"],
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, args):
    out = [] if not args else [f"--out={tmp_path / 'c'}"]
    result = _cli(*out, *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in result.stderr


def test_cli_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = _cli(f"--out={tmp_path}", "--patients=3", "--shape=16,16,16")
    assert result.returncode == 2 and "phantom" in result.stderr
    assert result.stderr.count("\n") == 1


def test_the_per_voxel_washout_estimate_recovers_beta_whatever_each_voxels_amplitude():
    """bench_phantom_baseline --voxel_washout: on curves S0 (1 + A (1 - e^(-alpha t))
    e^(-beta t)) with a fast wash-in the per-voxel rate is beta, whatever A of each voxel;
    voxels that barely enhance are left out; a persistent curve does not wash out."""
    rng = np.random.default_rng(0)
    times = [0.0, 90.0, 180.0, 270.0, 360.0]
    beta, alpha = 0.002, 0.2
    amplitude = rng.uniform(0.5, 3.0, (6, 6, 4))
    amplitude[0] = 0.01                       # a slab that does not enhance: left out
    s0 = rng.uniform(200, 400, (6, 6, 4))
    phases = np.stack([s0 * (1 + amplitude * (1 - np.exp(-alpha * t)) * np.exp(-beta * t))
                       for t in times]).astype(np.float32)
    mask = np.ones((6, 6, 4), np.uint8)
    out = bench.voxel_washout(phases, mask, times)
    assert out["voxel_washout_rate"] == pytest.approx(beta, rel=1e-3)
    assert out["voxel_washout_share"] == 1.0
    flat = np.stack([s0 * (1 + amplitude * (1 - np.exp(-alpha * t))) for t in times])
    out = bench.voxel_washout(flat.astype(np.float32), mask, times)
    assert out["voxel_washout_rate"] == pytest.approx(0.0, abs=1e-6)
    assert out["voxel_washout_share"] < 0.5
    assert np.isnan(bench.voxel_washout(phases[:2], mask, times[:2])["voxel_washout_rate"])
