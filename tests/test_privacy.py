"""What her2jax writes: no identifying text, no network needed, no access for "other" users.

One end-to-end run through the console scripts (her2jax-phantom -> her2jax-prepare ->
her2jax --mode=train / eval / predict / analyze -> her2jax-report) on a phantom cohort whose
NIfTI headers and clinical table carry a name and a date of birth, every command started under
umask 022 and inside a network namespace with no usable interface (``unshare -n``) where this
machine allows it. Three properties of that run are tested:

* privacy: no file written (read as bytes, gzip / zip members and dataset records decoded)
  contains the name or the date of birth: outputs carry patient_id and the mapped columns only;
* isolation: every step succeeds without network and writes its outputs;
* permissions: nothing created has a permission bit for "other" users, and predictions,
  reports and NIfTI maps are group-readable (0o640), whatever the caller's umask.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from .test_prepare import read_csv, write_csv

REPO = Path(__file__).resolve().parents[1]
NAME, HEADER_NAME, BIRTH_DATE = "Jane Doe", "DOE^JANE", "19600101"
NEEDLES = tuple(s.encode() for s in (NAME, HEADER_NAME, BIRTH_DATE))
# Two fake devices and a 4-step run: the properties do not depend on the model's quality.
ENGINE = ["--config=configs/tiny_cpu.py", "--config.data.recipe.shape=(24,24,24)",
          "--config.train.steps=4", "--config.train.save_every=4", "--config.train.eval_every=4",
          "--config.train.batch_size=4", "--config.train.warmup_steps=1",
          "--config.train.eval_batch_size=8", "--noprogress"]


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=60)
    return probe.returncode == 0


NO_NETWORK = ["unshare", "-n"] if _unshare_works() else []


def _identify(cohort: Path) -> None:
    """Writes the name and date of birth into every NIfTI header (descrip, db_name, aux_file, a
    comment extension) and two unmapped columns of the clinical table."""
    for path in sorted(cohort.rglob("*.nii.gz")):
        image = nib.load(path)
        image = nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header)
        image.header["descrip"] = f"{HEADER_NAME} {BIRTH_DATE}".encode()
        image.header["db_name"] = HEADER_NAME.encode()
        image.header["aux_file"] = f"{HEADER_NAME} {BIRTH_DATE}".encode()
        image.header.extensions.append(
            nib.nifti1.Nifti1Extension("comment", f"patient {NAME}, born {BIRTH_DATE}".encode()))
        nib.save(image, path)   # in place: the file keeps the mode her2jax-phantom gave it
    rows = read_csv(cohort / "clinical.csv")
    write_csv(cohort / "clinical.csv", [{**row, "patient_name": NAME, "birth_date": BIRTH_DATE}
                                        for row in rows])


def _modes(root: Path) -> dict[str, int]:
    """{relative path: permission bits} of root and everything under it."""
    return {str(p.relative_to(root.parent)): p.lstat().st_mode & 0o777
            for p in [root, *sorted(root.rglob("*"))]}


class Run:
    """The end-to-end run: its folders, each command's result, the modes seen after each."""

    def __init__(self, root: Path):
        self.root = root
        self.cohort, self.data, self.workdir = root / "cohort", root / "data", root / "run"
        self.predicted = root / "predicted"
        self.results: dict[str, subprocess.CompletedProcess] = {}
        self.cohort_modes: dict[str, int] = {}
        self.env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

    def __call__(self, name: str, module: str, *args: str) -> None:
        command = [*NO_NETWORK, sys.executable, "-m", module, *args]
        result = subprocess.run(command, cwd=REPO, env=self.env, capture_output=True, text=True,
                                timeout=900, umask=0o022)
        self.results[name] = result
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    run = Run(tmp_path_factory.mktemp("privacy"))
    run("phantom", "her2jax.cli.phantom", f"--out={run.cohort}", "--patients=24",
        "--centers=3", "--shape=32,32,16", "--seed=3")
    run.cohort_modes = _modes(run.cohort)   # before _identify rewrites the files
    _identify(run.cohort)
    run("prepare", "her2jax.cli.prepare", f"--cohort={run.cohort}", f"--data_dir={run.data}",
        "--config=configs/tiny_cpu.py", "--config.data.recipe.shape=(24,24,24)", "--workers=1",
        "--noprogress")
    run("train", "her2jax.main", f"--workdir={run.workdir}", *ENGINE,
        f"--config.data.data_dir={run.data}")
    run("eval", "her2jax.main", f"--workdir={run.workdir}", "--mode=eval", "--bootstrap=50",
        "--noprogress")
    run("predict", "her2jax.main", f"--workdir={run.workdir}", "--mode=predict",
        f"--cohort={run.cohort}", f"--out={run.predicted}", "--bootstrap=0")
    test_patient = next(r["patient_id"] for r in read_csv(run.cohort / "clinical.csv")
                        if r["center"] == "CENTER_C" and r["her2_class"])
    run("analyze", "her2jax.main", f"--workdir={run.workdir}", "--mode=analyze", "--noprogress",
        "--shap_per_class=0", f"--shap_patients={test_patient}")
    (run.workdir / "report.html").unlink()
    run("report", "her2jax.cli.report", str(run.workdir))
    return run


# ---------------------------------------------------------------- privacy


def _readable(path: Path) -> Iterator[bytes]:
    """The file's bytes, and what a reader would see inside gzip or zip (npz) containers."""
    data = path.read_bytes()
    yield data
    if data[:2] == b"\x1f\x8b":
        yield gzip.decompress(data)
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            for member in archive.namelist():
                yield archive.read(member)


def _records(dataset_dir: Path) -> Iterator[tuple[str, bytes]]:
    """Every bytes and string feature of every stored example (decoded from the shards)."""
    from her2jax.data import tfds_builder

    meta = json.loads((dataset_dir / tfds_builder.META_FILE).read_text())
    for split in meta["splits"]:
        source = tfds_builder.data_source(dataset_dir, split)
        for position in range(len(source)):
            for key, value in source[position].items():
                if isinstance(value, bytes):
                    yield f"{split}[{position}].{key}", value


def _leaks(root: Path) -> list[str]:
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        for form in _readable(path):
            found += [f"{path.relative_to(root)}: {n.decode()}" for n in NEEDLES if n in form]
    return sorted(set(found))


def test_the_identifying_text_is_in_the_input_and_the_scanner_sees_it(run):
    leaks = _leaks(run.cohort)
    for needle in (HEADER_NAME, BIRTH_DATE, NAME):   # inside the gzip: the scanner inflates it
        assert any(".nii.gz: " in leak and leak.endswith(needle) for leak in leaks), needle
    assert f"clinical.csv: {NAME}" in leaks and f"clinical.csv: {BIRTH_DATE}" in leaks
    image = nib.load(next(run.cohort.rglob("*_0001.nii.gz")))
    assert image.header["descrip"].item().startswith(HEADER_NAME.encode())
    assert NAME.encode() in image.header.extensions[0].get_content()


def test_no_output_holds_names_dates_of_birth_or_header_text(run):
    outputs = [run.data, run.workdir, run.predicted]
    assert list(run.workdir.glob("checkpoints/*/*/*")), "the checkpoints are scanned too"
    assert list((run.workdir / "analysis" / "shap").glob("*.nii.gz")), "and the NIfTI maps"
    for folder in outputs:
        assert _leaks(folder) == [], folder
    (dataset_dir,) = (p.parent for p in run.data.rglob("her2jax.json"))
    records = list(_records(dataset_dir))
    assert any(key.endswith(".clinical") for key, _ in records)
    assert [key for key, value in records if any(n in value for n in NEEDLES)] == []
    # Only patient_id and the mapped clinical columns are carried into predictions.
    header = (run.predicted / "predictions.csv").read_text().splitlines()[0].split(",")
    assert "patient_name" not in header and "birth_date" not in header
    assert "manufacturer" in header
    stdout = "".join(r.stdout + r.stderr for r in run.results.values())
    assert not any(n.decode() in stdout for n in NEEDLES)


# ---------------------------------------------------------------- isolation


PROBE = """
import errno, socket
print(*(name for _, name in socket.if_nameindex()))
for host in ("127.0.0.1", "192.0.2.1"):   # loopback, and a documentation-only address
    try:
        socket.create_connection((host, 9), timeout=5).close()
        print("connected")
    except OSError as e:
        print(errno.errorcode.get(e.errno, e))
"""


@pytest.mark.skipif(not NO_NETWORK, reason="unshare -n needs root or user namespaces")
def test_no_step_needs_the_network(run):
    # What the steps saw: a loopback interface that is down, so not even 127.0.0.1 answers.
    probe = subprocess.run([*NO_NETWORK, sys.executable, "-c", PROBE], capture_output=True,
                           text=True, timeout=60)
    assert probe.stdout.split() == ["lo", "ENETUNREACH", "ENETUNREACH"], probe.stderr
    assert "wrote 24 cases" in run.results["prepare"].stdout
    assert "done at step 4" in run.results["train"].stdout
    assert (run.workdir / "checkpoints" / "latest" / "4").is_dir()
    assert (run.workdir / "eval" / "test_CENTER_C" / "metrics.json").is_file()
    assert len(read_csv(run.predicted / "predictions.csv")) == 24
    summary = json.loads((run.workdir / "analysis" / "summary.json").read_text())
    assert summary["image_shap"]["cases"] and list((run.workdir / "features").glob("*.npz"))
    assert (run.workdir / "report.html").stat().st_size > 10_000


# ---------------------------------------------------------------- permissions


def test_nothing_created_is_open_to_other_users(run):
    modes = dict(run.cohort_modes)
    for folder in (run.data, run.workdir, run.predicted):
        modes.update(_modes(folder))
    assert len(modes) > 100
    assert {path: oct(mode) for path, mode in modes.items() if mode & 0o007} == {}
    folders = {path: oct(mode) for path, mode in modes.items() if (run.root / path).is_dir()}
    assert {path: mode for path, mode in folders.items() if mode != "0o750"} == {}


def test_predictions_reports_and_maps_are_group_readable(run):
    shared = [run.workdir / "report.html", run.predicted / "predictions.csv",
              run.workdir / "eval" / "test_CENTER_C" / "predictions.csv",
              run.workdir / "eval" / "test_CENTER_C" / "metrics.json",
              *(run.workdir / "analysis").glob("*.png"),
              *(run.workdir / "analysis" / "shap").glob("*.nii.gz")]
    assert len(shared) > 6
    assert {str(p.relative_to(run.root)): oct(p.stat().st_mode & 0o777) for p in shared
            if p.stat().st_mode & 0o777 != 0o640} == {}
