"""The analysis stage on a trained workdir: embeddings, feature-space SHAP, summary.json."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

from her2jax.analysis import numba_cache, stage

REPO = Path(__file__).resolve().parents[1]


def test_analyze_writes_embeddings_shap_and_summary(trained, tmp_path):
    workdir = tmp_path / "run"
    # Not evaluated (the shared workdir may have been by other tests): no report expected.
    shutil.copytree(trained[0], workdir, ignore=shutil.ignore_patterns("eval", "report*"))
    shutil.rmtree(workdir / "features", ignore_errors=True)   # extracted on demand
    summary = stage.analyze(workdir, seed=0, methods=("tsne",), progress=False)
    assert set(summary["features"]) == {"train", "val", "test_CENTER_C"}
    assert (workdir / "features" / "train.npz").exists()
    sil = summary["embeddings"]["silhouette"]
    assert all(v is None or -1 <= v <= 1 for v in sil.values())
    assert isinstance(summary["embeddings"]["domain_shift_warning"], bool)
    for name in ["tsne_class.png", "tsne_center.png", *summary["shap"]["files"]]:
        image = Image.open(workdir / "analysis" / name)
        assert image.width > 100 and image.height > 100, name
    assert len(summary["shap"]["files"]) == 6   # beeswarm + bar for 3 classes
    assert summary["shap"]["explained_cases"] > 0
    assert set(summary["shap"]["mean_abs"]) == {"HER2-zero", "HER2-low", "HER2-positive"}
    image = summary["image_shap"]
    assert summary["image_shap_note"] is None
    assert sorted(c["label"] for c in image["cases"]) == ["HER2-low", "HER2-positive",
                                                          "HER2-zero"]   # one per class
    for case in image["cases"]:
        assert case["split"] == "test_CENTER_C" and case["explained_class"] == case["label"]
        for name in case["files"].values():
            assert (workdir / "analysis" / name).stat().st_size > 0, name
    assert summary["report"] is None   # not evaluated yet: no report.html
    assert not (workdir / "report.html").exists()
    on_disk = json.loads((workdir / "analysis" / "summary.json").read_text())
    assert on_disk == summary


def test_analyze_writes_the_report_of_an_evaluated_workdir(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    result = subprocess.run([sys.executable, "-m", "her2jax.main", f"--workdir={workdir}",
                             "--mode=eval", "--bootstrap=100", "--noprogress"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    result = subprocess.run([sys.executable, "-m", "her2jax.main", f"--workdir={workdir}",
                             "--mode=analyze", "--noprogress", "--shap_per_class=0",
                             "--shap_patients=PHA_0002"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"report: {workdir}/report.html" in result.stdout
    summary = json.loads((workdir / "analysis" / "summary.json").read_text())
    assert [c["patient_id"] for c in summary["image_shap"]["cases"]] == ["PHA_0002"]
    html = (workdir / "report.html").read_text()
    assert "PHA_0002" in html and "fitted on the validation split" in html


def test_analyze_on_a_directory_that_is_not_a_workdir(tmp_path):
    result = subprocess.run([sys.executable, "-m", "her2jax.main", f"--workdir={tmp_path}",
                             "--mode=analyze"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "not a her2jax workdir" in result.stderr


def test_shap_kernels_are_cached_on_disk_but_not_those_keyed_per_process():
    from numba.core.caching import NullCache

    numba_cache.import_cached("shap")
    from shap.maskers import _tabular
    from shap.utils import _masked_model

    assert not isinstance(_tabular._delta_masking._cache, NullCache)
    # Takes shap's link function as an argument: a new cache entry in every process.
    assert isinstance(_masked_model._build_fixed_multi_output._cache, NullCache)
