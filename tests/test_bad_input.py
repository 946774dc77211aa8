"""Bad input through the real console scripts, one case at a time.

Every case runs ``python -m <console script>`` as a user would and asserts the contract of
RELIABILITY.md: exit code 2, stderr exactly one line ``<prog>: error: ...`` naming the thing
(patient / file / key) and the reason, no traceback, and nothing half-written: the output
folder, dataset or file is not created, or is left exactly as it was.

Cohorts are tiny copies of the shared phantom (one patient per centre); ``--mode=predict`` and
``--mode=eval`` cases use the one trained workdir of ``tests/test_train.py``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from her2jax.evaluate import files

from .test_nifti import _gzip_stream, _header_bytes
from .test_prepare import copy_cohort, read_csv, write_csv

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["HER2-zero", "HER2-low", "HER2-positive"]


# ---------------------------------------------------------------- running and checking


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def assert_refused(result: subprocess.CompletedProcess, *named: str) -> None:
    """Exit 2, one stderr line ``<prog>: error: ...`` naming every part, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr[-3000:])
    prog = result.args[2].rsplit(".", 1)[1] + ".py"     # python -m her2jax.cli.<prog>
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    for part in named:
        assert part in lines[0], f"{part!r} not in {lines[0]!r}"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of everything under root (empty when absent)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


# ---------------------------------------------------------------- broken NIfTI files


def _first_patient(cohort: Path) -> str:
    return read_csv(cohort / "clinical.csv")[0]["patient_id"]


def _phase(cohort: Path, pid: str, k: int = 1) -> Path:
    return cohort / "images" / pid / f"{pid}_{k:04d}.nii.gz"


def _mask(cohort: Path, pid: str) -> Path:
    return cohort / "segmentations" / "expert" / f"{pid}.nii.gz"


def _header_only(path: Path, shape) -> Path:
    """A small file whose header declares ``shape`` (float32)."""
    path.write_bytes(_gzip_stream([_header_bytes(shape), bytes(4096)]))
    return path


def absurd_dimensions(cohort, pid):
    path = _header_only(_phase(cohort, pid), (4000, 4000, 4000))   # 256 GB declared, 4 KB file
    return path.name, ["more than the limit", "(4000, 4000, 4000)"]


def gzip_bomb_extension(cohort, pid):
    # The extension flag set and one extension declaring ~2 GB, then 64 MiB of zeros that
    # compress to a ~65 KB file: nibabel alone would inflate and read it all.
    head = (_header_bytes((8, 8, 4), vox_offset=368)[:348] + b"\x01\x00\x00\x00"
            + struct.pack("<ii", 2_000_000_000, 0))
    path = _phase(cohort, pid)
    path.write_bytes(_gzip_stream([head, *([bytes(1 << 20)] * 64)]))
    return path.name, ["invalid NIfTI header or extensions"]


def _rewrite(path: Path, data: np.ndarray, affine=None) -> None:
    nib.save(nib.Nifti1Image(data, nib.load(path).affine if affine is None else affine), path)


def non_finite_voxels(cohort, pid):
    path = _phase(cohort, pid, 2)
    data = np.asarray(nib.load(path).dataobj, np.float32).copy()
    data[1, 2, 3], data[4, 5, 6] = np.nan, np.inf
    _rewrite(path, data)
    return path.name, ["2 voxels are NaN or Inf"]


def zero_size_image(cohort, pid):
    path = _header_only(_phase(cohort, pid), (48, 0, 24))
    return path.name, ["absurd dimensions", "(48, 0, 24)"]


def empty_file(cohort, pid):
    path = _phase(cohort, pid)
    path.write_bytes(b"")
    return path.name, ["not gzip-compressed"]


def image_2d(cohort, pid):
    path = _phase(cohort, pid)
    _rewrite(path, np.ones((48, 48), np.float32))
    return path.name, ["2D", "expected a 3D volume"]


def image_5d(cohort, pid):
    path = _phase(cohort, pid)
    _rewrite(path, np.ones((48, 48, 24, 2, 3), np.float32))
    return path.name, ["5D", "expected a 3D volume"]


def singular_orientation(cohort, pid):
    path = _phase(cohort, pid)
    image = nib.Nifti1Image(np.ones((48, 48, 24), np.float32), np.eye(4))
    flat = np.eye(4)
    flat[2, :3] = [1.0, 1.0, 0.0]       # the third axis lies in the plane of the first two
    image.header.set_sform(flat, code=1)
    image.header.set_qform(None, code=0)
    # nibabel rebuilds the header from the image's affine on save: write the bytes ourselves.
    path.write_bytes(_gzip_stream([image.header.binaryblock + bytes(4),
                                   np.ones((48, 48, 24), np.float32).tobytes(order="F")]))
    return path.name, ["affine is singular"]


def mask_other_labels(cohort, pid):
    path = _mask(cohort, pid)
    mask = np.asarray(nib.load(path).dataobj).astype(np.uint8)
    mask[0, 0, 0], mask[0, 0, 1] = 2, 7
    _rewrite(path, mask)
    return path.name, ["mask has labels {0, 1, 2, 7}; expected 0/1"]


def symlink_loop(cohort, pid):
    path = _phase(cohort, pid, 2)
    other = path.with_name("loop.nii.gz")
    path.unlink()
    path.symlink_to(other)
    other.symlink_to(path)
    return path.name, ["symlink loop"]


# ---------------------------------------------------------------- broken tables


def _table_text(cohort: Path) -> str:
    return (cohort / "clinical.csv").read_text(encoding="utf-8")


def non_utf8_csv(cohort, pid):
    rows = read_csv(cohort / "clinical.csv")
    rows[0]["manufacturer"] = "Hôpital Siemens"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    (cohort / "clinical.csv").write_bytes(buffer.getvalue().encode("latin-1"))
    return "clinical.csv", ["not UTF-8", "byte 0xf4"]


def semicolon_csv(cohort, pid):
    text = _table_text(cohort).replace(",", ";")
    (cohort / "clinical.csv").write_text(text, encoding="utf-8")
    return "clinical.csv", ["expected comma-separated", "';'"]


def duplicate_columns(cohort, pid):
    lines = _table_text(cohort).splitlines()
    lines = [lines[0] + ",Center"] + [line + ",CENTER_X" for line in lines[1:]]
    (cohort / "clinical.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return "clinical.csv", ["duplicate column names", "'Center' (columns 2 and 10)"]


def _manifest(cohort: Path, rows: list[tuple[str, str, list[str]]]) -> None:
    """manifest.csv beside a copied cohort's images: rows of (patient, centre, phase paths),
    the mask from the patient's own folder. The MAMA-MIA table is removed."""
    header = ["patient_id", "center", *(f"phase_{k}" for k in range(5)), "mask", "ihc_score",
              "ish_result", "her2"]
    table = [dict(zip(header, [pid, center, *phases,
                               f"segmentations/expert/{pid}.nii.gz", "0", "", "0"],
                          strict=True)) for pid, center, phases in rows]
    (cohort / "clinical.csv").unlink()
    write_csv(cohort / "manifest.csv", table)


def _phase_cells(pid: str) -> list[str]:
    return [f"images/{pid}/{pid}_{k:04d}.nii.gz" for k in range(5)]


def manifest_escaping_root(cohort, pid):
    outside = cohort.parent / "elsewhere"
    outside.mkdir()
    shutil.copy(_phase(cohort, pid, 0), outside / "scan.nii.gz")
    cells = _phase_cells(pid)
    cells[0] = "../elsewhere/scan.nii.gz"
    _manifest(cohort, [(pid, "CENTER_A", cells)])
    return cells[0], ["leaves the cohort root", "allow_outside_root"]


def patient_in_two_centres(cohort, pid):
    # Leakage: one patient listed for two centres could land in training and in testing.
    # prepare refuses it, so pipeline's split-overlap check never sees such a dataset.
    _manifest(cohort, [(pid, "CENTER_A", _phase_cells(pid)),
                       (pid, "CENTER_C", _phase_cells(pid))])
    return "manifest.csv", ["2 centres: 'CENTER_A' and 'CENTER_C'"]


PREPARE_CASES: dict[str, Callable] = {
    "absurd dimensions": absurd_dimensions,
    "gzip bomb (huge header extension)": gzip_bomb_extension,
    "non-finite voxels": non_finite_voxels,
    "zero-size image": zero_size_image,
    "empty file": empty_file,
    "2D image": image_2d,
    "5D image": image_5d,
    "singular orientation matrix": singular_orientation,
    "mask labels other than 0-1": mask_other_labels,
    "symlink loop": symlink_loop,
    "manifest path escaping the root": manifest_escaping_root,
    "patient in two centres (leakage)": patient_in_two_centres,
    "non-UTF-8 CSV": non_utf8_csv,
    "semicolon-delimited CSV": semicolon_csv,
    "duplicate columns": duplicate_columns,
}
TABLE_CASES = {"non-UTF-8 CSV", "semicolon-delimited CSV", "duplicate columns"}


@pytest.fixture
def small_cohort(phantom_cohort, tmp_path) -> tuple[Path, str]:
    """A writable copy of the phantom with one patient per centre, and its first patient."""
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort", per_center=1)
    return cohort, _first_patient(cohort)


@pytest.mark.parametrize("case", list(PREPARE_CASES))
def test_prepare_refuses(case, small_cohort, tmp_path):
    cohort, pid = small_cohort
    named_file, reasons = PREPARE_CASES[case](cohort, pid)
    data = tmp_path / "data"
    manifest = cohort / "manifest.csv"
    result = _cli("her2jax.cli.prepare", f"--cohort={manifest if manifest.exists() else cohort}",
                  f"--data_dir={data}", "--noprogress", "--workers=1")
    named = [named_file, *reasons]
    if case not in TABLE_CASES:
        named.append(f"patient {pid}")
    assert_refused(result, *named)
    assert not data.exists(), "no dataset, report, temporary folder or empty --data_dir left"


def test_prepare_takes_an_outside_path_when_allowed(small_cohort, tmp_path):
    cohort, pid = small_cohort
    manifest_escaping_root(cohort, pid)
    result = _cli("her2jax.cli.prepare", f"--cohort={cohort / 'manifest.csv'}",
                  f"--data_dir={tmp_path / 'd'}", "--noprogress", "--workers=1", "--validate_only",
                  "--config=configs/tiny_cpu.py", "--config.data.allow_outside_root=True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_csv(tmp_path / "d" / "validation" / "rejected.csv") == []


@pytest.mark.parametrize("override, named", [
    ("--config.data.recipe.no_such_knob=3", ["--config.data.recipe.no_such_knob",
                                              "the config has no key 'no_such_knob'"]),
    ("--config.data.val_fraction=a_fifth", ["val_fraction", "a_fifth"]),
    ("--config.data.columns.clinical=3", ["key 'data.columns.clinical'",
                                          "must be a list of column names", "3 (int)"]),
], ids=["nonexistent key", "wrong type", "clinical columns not a list of names"])
def test_prepare_refuses_bad_config_overrides(override, named, phantom_cohort, tmp_path):
    result = _cli("her2jax.cli.prepare", f"--cohort={phantom_cohort}",
                  f"--data_dir={tmp_path / 'data'}", "--config=configs/tiny_cpu.py", override)
    assert_refused(result, *named)
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- the engine on a workdir


PREDICT_CASES = ["absurd dimensions", "gzip bomb (huge header extension)", "symlink loop",
                 "mask labels other than 0-1"]


@pytest.mark.parametrize("case", PREDICT_CASES)
def test_predict_refuses(case, trained, small_cohort, tmp_path):
    workdir, _ = trained
    cohort, pid = small_cohort
    named_file, reasons = PREPARE_CASES[case](cohort, pid)
    before = snapshot(workdir)
    out = tmp_path / "predictions"
    result = _cli("her2jax.main", f"--workdir={workdir}", "--mode=predict", f"--cohort={cohort}",
                  f"--out={out}")
    assert_refused(result, f"patient {pid}", named_file, *reasons, "--skip_invalid")
    assert not out.exists() and snapshot(workdir) == before


@pytest.mark.parametrize("where", ["the file itself", "a folder under a file"])
def test_predict_refuses_an_out_folder_that_is_a_file(where, trained, phantom_cohort, tmp_path):
    workdir, _ = trained
    existing = tmp_path / "predictions.csv"
    existing.write_text("keep me\n")
    out = existing if where == "the file itself" else existing / "run1"
    before = snapshot(workdir)
    result = _cli("her2jax.main", f"--workdir={workdir}", "--mode=predict",
                  f"--cohort={phantom_cohort}", f"--out={out}")
    assert_refused(result, str(out), "--out names the folder")
    assert existing.read_text() == "keep me\n" and snapshot(workdir) == before


def test_eval_refuses_a_checkpoint_of_another_architecture(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir, ignore=shutil.ignore_patterns("eval", "predict"))
    record = json.loads((workdir / "config.json").read_text())
    assert record["config"]["model"]["vit"]["size"] == "tiny"
    record["config"]["model"]["vit"]["size"] = "small"    # wider and deeper than the checkpoint
    (workdir / "config.json").write_text(json.dumps(record))
    before = snapshot(workdir)
    result = _cli("her2jax.main", f"--workdir={workdir}", "--mode=eval", "--noprogress")
    assert_refused(result, "checkpoints/best", "written for another model")
    assert snapshot(workdir) == before


def test_engine_refuses_a_config_override_of_the_wrong_type(data_dir, tmp_path):
    workdir = tmp_path / "run"
    result = _cli("her2jax.main", f"--workdir={workdir}", "--config=configs/tiny_cpu.py",
                  f"--config.data.data_dir={data_dir}", "--config.model.vit.patch_size=eight")
    assert_refused(result, "patch_size", "eight")
    assert not workdir.exists()


@pytest.mark.parametrize("how, named", [
    ("syntax error", ["config file", "bad.py, line 1: invalid syntax", "def get_config(:"]),
    ("missing file", ["config file", "missing.py: No such file or directory"]),
    ("':' argument", ["--config=configs/tiny_cpu.py:foo", "the config file failed to load",
                      "get_config() takes 0 positional arguments"]),
])
def test_engine_refuses_a_config_file_it_cannot_load(how, named, tmp_path):
    config = {"syntax error": tmp_path / "bad.py", "missing file": tmp_path / "missing.py",
              "':' argument": "configs/tiny_cpu.py:foo"}[how]
    (tmp_path / "bad.py").write_text("def get_config(:\n    pass\n")
    workdir = tmp_path / "run"
    result = _cli("her2jax.main", f"--workdir={workdir}", f"--config={config}")
    assert_refused(result, *named)
    assert "Traceback" not in result.stderr and not workdir.exists()


def test_engine_refuses_a_model_with_nothing_to_feed_the_head(data_dir, tmp_path):
    workdir = tmp_path / "run"
    result = _cli("her2jax.main", f"--workdir={workdir}", "--config=configs/tiny_cpu.py",
                  f"--config.data.data_dir={data_dir}", "--config.data.recipe.shape=(24,24,24)",
                  "--config.model.encoder=none")
    assert_refused(result, "model.encoder", "roi_pool.hidden > 0")
    assert not workdir.exists()


# ---------------------------------------------------------------- her2jax-port


class _Payload:
    """Unpickling it runs ``touch marker``, as a malicious checkpoint would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A .safetensors file (8-byte header length, JSON header, raw little-endian data)."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array, "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def test_port_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pth"
    checkpoint.write_bytes(pickle.dumps({"state_dict": {"w": [1.0]}, "x": _Payload(marker)},
                                        protocol=2))
    out = tmp_path / "port"
    result = _cli("her2jax.cli.port", "--source=medicalnet", f"--checkpoint={checkpoint}",
                  f"--out={out}")
    assert_refused(result, "evil.pth", "system", "allow-list")
    assert not marker.exists(), "the payload ran"
    assert not out.exists() and not list(tmp_path.glob(".port.tmp-*"))
    # The payload is live: plain pickle would have run it.
    pickle.loads(checkpoint.read_bytes())
    assert marker.exists()


def test_port_refuses_a_checkpoint_of_another_architecture(tmp_path):
    # A 2D ViT (patch_embed is a Conv2d kernel): FM-BCMRI's key names, the wrong model.
    rng = np.random.default_rng(0)
    checkpoint = _safetensors(tmp_path / "vit2d.safetensors", {
        "cls_token": rng.standard_normal((1, 1, 64)),
        "patch_embed.proj.weight": rng.standard_normal((64, 3, 16, 16)),
        "blocks.0.attn.qkv.weight": rng.standard_normal((192, 64)),
        "blocks.0.mlp.fc1.weight": rng.standard_normal((256, 64)),
    })
    out = tmp_path / "port"
    result = _cli("her2jax.cli.port", "--source=fmbcmri", f"--checkpoint={checkpoint}",
                  f"--out={out}")
    assert_refused(result, "vit2d.safetensors", "(64, 3, 16, 16)", "cubic Conv3d kernel")
    assert not out.exists() and not list(tmp_path.glob(".port.tmp-*"))


# ---------------------------------------------------------------- prediction files


def _good_predictions(path: Path) -> Path:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=12)
    files.write_predictions(path, patient_ids=[f"P{i:02d}" for i in range(12)],
                            centers=["CENTER_C"] * 12, labels=np.arange(12) % 3, probs=probs,
                            class_names=CLASSES)
    return path


def _edit(good: Path, bad: Path, how: str) -> list[str]:
    """Writes a broken copy of ``good`` to ``bad``; returns what the error must name."""
    rows = list(csv.reader(good.open(newline="")))
    header = rows[0]
    if how == "missing column":
        drop = header.index("label")
        rows = [row[:drop] + row[drop + 1:] for row in rows]
        named = ["'label'", "missing column"]
    elif how == "probabilities not summing to 1":
        for row in rows[1:]:
            row[3:6] = [repr(float(x) / 2) for x in row[3:6]]
        named = ["row 2 (patient P00)", "sum to 0.5, not 1", "pass probabilities, not logits"]
    elif how == "logits":
        for row in rows[1:]:
            row[3:6] = [repr(float(np.log(float(x)))) for x in row[3:6]]
        named = ["row 2 (patient P00)", "not a probability in [0, 1]",
                 "key 'prob_HER2-zero'", "pass probabilities, not logits"]
    elif how == "NaN probability":
        rows[5][4] = "nan"
        named = ["row 6 (patient P04)", "NaN is not a probability", "key 'prob_HER2-low'"]
    elif how == "unknown label":
        rows[2][2] = "HER2-ultralow"
        named = ["'HER2-ultralow'", "not classes", "key 'label'"]
    elif how == "duplicate columns":
        rows = [row + [row[1]] for row in rows]
        named = ["duplicate columns", "'center'"]
    elif how == "latin-1 encoded":
        rows[1][1] = "Hôpital"
        with bad.open("w", newline="", encoding="latin-1") as f:
            csv.writer(f).writerows(rows)
        return ["not UTF-8", "byte 0xf4"]
    else:
        raise AssertionError(how)
    with bad.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return named


PREDICTION_PROBLEMS = ["missing column", "probabilities not summing to 1", "logits",
                       "NaN probability", "unknown label", "duplicate columns", "latin-1 encoded"]


@pytest.mark.parametrize("how", PREDICTION_PROBLEMS)
def test_compare_refuses_a_bad_predictions_file(how, tmp_path):
    good = _good_predictions(tmp_path / "a" / "predictions.csv")
    bad = tmp_path / "b" / "predictions.csv"
    bad.parent.mkdir()
    named = _edit(good, bad, how)
    out = tmp_path / "comparison.json"
    result = _cli("her2jax.cli.compare", str(good), str(bad), "--bootstrap=20", "--noprogress",
                  f"--out={out}")
    assert_refused(result, str(bad), *named)
    assert not out.exists()


def test_report_refuses_an_evaluation_with_a_bad_predictions_file(trained, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(trained[0] / "config.json", workdir)
    split = workdir / "eval" / "test_CENTER_C"
    good = _good_predictions(tmp_path / "good.csv")
    split.mkdir(parents=True)
    named = _edit(good, split / "predictions.csv", "duplicate columns")
    files.write_metrics(split / "metrics.json", {"n": 12, "class_names": CLASSES})
    before = snapshot(workdir)
    result = _cli("her2jax.cli.report", str(workdir))
    assert_refused(result, str(split / "predictions.csv"), *named)
    assert snapshot(workdir) == before, "no report.html, no report_files/"


# ---------------------------------------------------------------- Ctrl-C


def test_ctrl_c_during_prepare_is_one_line_and_leaves_nothing(phantom_cohort, tmp_path):
    """Issue 16: Ctrl-C in her2jax-prepare printed a KeyboardInterrupt traceback (and one per
    worker). SIGINT goes to the whole process group, as a terminal sends it, once the workers
    are preprocessing: one line, exit 130, no temporary folder, no dataset."""
    import signal
    import time

    rows = read_csv(phantom_cohort / "clinical.csv")
    manifest = []
    for repeat in range(12):   # 432 cases: long enough to be interrupted half-way
        for row in rows:
            pid = row["patient_id"]
            phases = sorted((phantom_cohort / "images" / pid).glob("*.nii.gz"))
            manifest.append({"patient_id": f"R{repeat:02d}_{pid}", "center": row["center"],
                             **{f"phase_{k}": str(p) for k, p in enumerate(phases)},
                             "mask": str(phantom_cohort / "segmentations" / "expert"
                                         / f"{pid}.nii.gz"),
                             "ihc_score": row["ihc_score"], "ish_result": row["ish_result"]})
    write_csv(tmp_path / "manifest.csv", manifest)
    data = tmp_path / "data"
    process = subprocess.Popen(
        [sys.executable, "-m", "her2jax.cli.prepare", f"--cohort={tmp_path / 'manifest.csv'}",
         f"--data_dir={data}", "--config=configs/tiny_cpu.py", "--workers=2", "--noprogress",
         "--config.data.allow_outside_root=True"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if any(p.is_file() for p in data.glob(".her2jax-prepare-*/spool/**/*")):
            break
        time.sleep(0.02)
    assert process.poll() is None, "prepare ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines() == [
        "prepare.py: interrupted (Ctrl-C); nothing half-written was kept"], stderr[-3000:]
    assert not list(data.glob(".her2jax-prepare-*")) and not (data / "her2_dce_mri").exists()


def test_a_patient_id_too_long_for_the_file_names_made_from_it_is_refused(small_cohort,
                                                                          tmp_path):
    """Issue 16: a 236-character id was prepared, then image SHAP failed with 'File name too
    long' (<id>_shap_original.nii.gz is 256 bytes). Ids are capped at 128 bytes where a
    cohort is read (prepare and predict alike)."""
    cohort, pid = small_cohort
    long_id = "P" * 236
    folder = cohort / "images" / pid
    for phase in sorted(folder.glob("*.nii.gz")):
        phase.rename(folder / phase.name.replace(pid, long_id))
    folder.rename(cohort / "images" / long_id)
    masks = cohort / "segmentations" / "expert"
    (masks / f"{pid}.nii.gz").rename(masks / f"{long_id}.nii.gz")
    rows = read_csv(cohort / "clinical.csv")
    for row in rows:
        row["patient_id"] = long_id if row["patient_id"] == pid else row["patient_id"]
    write_csv(cohort / "clinical.csv", rows)
    result = _cli("her2jax.cli.prepare", f"--cohort={cohort}", f"--data_dir={tmp_path / 'd'}",
                  "--config=configs/tiny_cpu.py", "--noprogress")
    assert_refused(result, "236 bytes long", "ids of up to 128 bytes")
    assert not (tmp_path / "d").exists()


# ---------------------------------------------------------------- a full disk


_FULL_DISK = '''
import errno, os
_replace = os.replace
def _full(src, dst, *args, **kwargs):
    if os.environ["HER2JAX_TEST_FULL"] in os.fspath(dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(dst))
    return _replace(src, dst, *args, **kwargs)
os.replace = _full
'''


@pytest.mark.parametrize("mode", ["predict", "features", "eval"])
def test_a_full_disk_is_one_line_and_leaves_no_folder_behind(mode, trained, phantom_cohort,
                                                             tmp_path):
    """Issue 16: a full disk during predict --out, features and eval was an OSError traceback,
    and the folders they had begun stayed behind. The fault is injected where every writer
    lands its file (the rename of a complete temporary file), in the real console script."""
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir, ignore=shutil.ignore_patterns("eval", "predict",
                                                                       "features"))
    fault = tmp_path / "fault"
    fault.mkdir()
    (fault / "sitecustomize.py").write_text(_FULL_DISK)
    out = tmp_path / "predictions" / "run1"
    target = {"predict": str(out.parent), "features": str(workdir / "features"),
              "eval": str(workdir / "eval")}[mode]
    env = {**os.environ, "PYTHONPATH": f"{fault}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HER2JAX_TEST_FULL": target}
    # The held-out centre only: no training patient (predict would name them on stderr).
    cohort = copy_cohort(phantom_cohort, tmp_path / "cohort", per_center=3)
    write_csv(cohort / "clinical.csv", [r for r in read_csv(cohort / "clinical.csv")
                                        if r["center"] == "CENTER_C"])
    args = {"predict": [f"--cohort={cohort}", f"--out={out}"], "features": [],
            "eval": ["--bootstrap=50"]}[mode]
    before = snapshot(workdir)
    result = subprocess.run([sys.executable, "-m", "her2jax.main", f"--workdir={workdir}",
                             f"--mode={mode}", "--noprogress", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert_refused(result, "cannot write", "No space left on device", target)
    assert not Path(target).exists() and snapshot(workdir) == before


def _full_disk_env(tmp_path: Path, target: Path) -> dict:
    fault = tmp_path / "fault"
    fault.mkdir(exist_ok=True)
    (fault / "sitecustomize.py").write_text(_FULL_DISK)
    return {**os.environ, "PYTHONPATH": f"{fault}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "HER2JAX_TEST_FULL": str(target)}


def test_a_full_disk_during_prepare_leaves_no_data_dir(small_cohort, tmp_path):
    cohort, _ = small_cohort
    data = tmp_path / "data"
    result = subprocess.run([sys.executable, "-m", "her2jax.cli.prepare", f"--cohort={cohort}",
                             f"--data_dir={data}", "--config=configs/tiny_cpu.py",
                             "--noprogress"], cwd=REPO, env=_full_disk_env(tmp_path, data),
                            capture_output=True, text=True, timeout=300)
    assert_refused(result, "cannot write", "No space left on device", str(data))
    assert not data.exists()


def test_a_full_disk_during_the_report_leaves_no_report_behind(trained, tmp_path):
    from her2jax.train import inference

    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir, ignore=shutil.ignore_patterns(
        "eval", "predict", "features", "analysis", "report*"))
    inference.evaluate(workdir, splits=["test_CENTER_C"], n_boot=20)
    before = snapshot(workdir)
    result = subprocess.run([sys.executable, "-m", "her2jax.cli.report", str(workdir)],
                            cwd=REPO, env=_full_disk_env(tmp_path, workdir / "report"),
                            capture_output=True, text=True, timeout=300)
    assert_refused(result, "cannot write", "No space left on device", str(workdir / "report"))
    assert snapshot(workdir) == before, "no report.html, no report_files/"
