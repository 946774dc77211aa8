"""report.html (analysis.report, her2jax-report) and its figures (analysis.figures): content,
escaping, privacy, self-containment, and rendering in headless Chromium."""

from __future__ import annotations

import base64
import csv
import html
import importlib.metadata
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from her2jax.analysis import figures, report, stage
from her2jax.errors import Her2jaxError
from her2jax.evaluate import files, metrics, tables
from her2jax.labels import CLASS_NAMES
from her2jax.train import inference

REPO = Path(__file__).resolve().parents[1]
THREE = list(CLASS_NAMES["her2_3class"])
BINARY = list(CLASS_NAMES["her2_binary"])
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HOSTILE_VALUE = "Sie<mens> & \"Co\" 'x'"
HOSTILE_PID = "P&<b>\"7'"
IMG_SRC = re.compile(r"<img\b[^>]*\bsrc=\"([^\"]*)\"")


# ---------------------------------------------------------------- figures


def _probs(labels, k, signal=1.5, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(labels), k))
    logits[np.arange(len(labels)), labels] += signal
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def _png(path) -> Image.Image:
    image = Image.open(path)
    image.load()
    assert image.format == "PNG" and image.width > 100 and image.height > 100, path
    assert len(np.unique(np.asarray(image.convert("L")))) > 2, f"{path} is blank"
    return image


def test_roc_matches_sklearn_and_metrics(tmp_path):
    labels = np.random.default_rng(1).integers(0, 3, 60)
    probs = _probs(labels, 3)
    drawn = figures.plot_roc(tmp_path / "roc.png", labels, probs, THREE)
    _png(tmp_path / "roc.png")
    one_hot = labels[:, None] == np.arange(3)[None, :]
    micro = roc_auc_score(one_hot.ravel(), probs.ravel())
    assert f"micro-average (AUC {micro:.3f})" in drawn["legend"]
    assert drawn["auc"]["micro-average"] == pytest.approx(micro, abs=1e-12)
    for c, name in enumerate(THREE):
        assert drawn["auc"][name] == pytest.approx(roc_auc_score(labels == c, probs[:, c]))
    summary = metrics.summarize(labels, probs, THREE, n_boot=0)
    # The macro curve's area (interpolated mean TPR) is exactly the mean per-class AUC.
    assert drawn["auc"]["macro-average"] == pytest.approx(summary["macro_auc"]["value"],
                                                          abs=1e-12)
    pairwise = figures.plot_pairwise_roc(tmp_path / "pairs.png", labels, probs, THREE)
    _png(tmp_path / "pairs.png")
    assert list(pairwise["auc"]) == list(summary["pairwise_auc"])   # zero-low, low-pos, zero-pos
    for name, value in pairwise["auc"].items():
        assert value == pytest.approx(summary["pairwise_auc"][name]["value"], abs=1e-12)


def test_macro_curve_with_vertical_jumps_is_exact():
    # Hand-made curves with vertical pieces at different FPRs: areas 0.875 and 0.5.
    a = (np.array([0.0, 0.0, 0.5, 1.0]), np.array([0.0, 0.5, 1.0, 1.0]))
    b = (np.array([0.0, 0.5, 0.5, 1.0]), np.array([0.0, 0.0, 1.0, 1.0]))
    fpr, tpr = figures.macro_curve([a, b])
    assert np.trapezoid(tpr, fpr) == pytest.approx((0.875 + 0.5) / 2)
    assert np.trapezoid(a[1], a[0]) == pytest.approx(0.875)


def test_roc_with_a_class_absent_and_with_one_class(tmp_path):
    labels = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    probs = _probs(labels, 3, seed=2)
    drawn = figures.plot_roc(tmp_path / "roc.png", labels, probs, THREE)
    _png(tmp_path / "roc.png")
    assert drawn["auc"]["HER2-positive"] is None
    assert "HER2-positive: not in this split (no curve)" in drawn["legend"]
    summary = metrics.summarize(labels, probs, THREE, n_boot=0)
    assert drawn["auc"]["macro-average"] == pytest.approx(summary["macro_auc"]["value"])
    pairwise = figures.plot_pairwise_roc(tmp_path / "pairs.png", labels, probs, THREE)
    _png(tmp_path / "pairs.png")
    assert pairwise["auc"]["HER2-low vs HER2-positive"] is None
    assert pairwise["auc"]["HER2-zero vs HER2-low"] == pytest.approx(
        summary["pairwise_auc"]["HER2-zero vs HER2-low"]["value"])
    assert "HER2-zero vs HER2-positive: no HER2-positive in this split (no curve)" \
        in pairwise["legend"]

    only = figures.plot_roc(tmp_path / "one.png", np.array([1, 1, 1]), probs[:3], THREE)
    _png(tmp_path / "one.png")
    assert all(v is None for v in only["auc"].values())
    assert "HER2-low: the only class in this split (no curve)" in only["legend"]


def test_binary_roc(tmp_path):
    labels = np.array([0, 0, 0, 1, 1, 0, 1, 1, 0, 1])
    probs = _probs(labels, 2, signal=0.8, seed=3)
    drawn = figures.plot_roc(tmp_path / "roc.png", labels, probs, BINARY)
    _png(tmp_path / "roc.png")
    auc = roc_auc_score(labels, probs[:, 1])
    assert drawn["legend"] == [f"HER2-positive vs HER2-negative (AUC {auc:.3f})"]
    summary = metrics.summarize(labels, probs, BINARY, n_boot=0)
    assert drawn["auc"]["micro-average"] == pytest.approx(summary["micro_auc"]["value"])
    assert drawn["auc"]["macro-average"] == pytest.approx(summary["macro_auc"]["value"])
    pairwise = figures.plot_pairwise_roc(tmp_path / "pairs.png", labels, probs, BINARY)
    assert pairwise["auc"] == {"HER2-negative vs HER2-positive": pytest.approx(auc)}
    confusion = figures.plot_confusion(tmp_path / "cm.png", [[3, 2], [0, 5]], BINARY)
    _png(tmp_path / "cm.png")
    assert confusion["annotations"] == [["3\n60%", "2\n40%"], ["0\n0%", "5\n100%"]]


def test_confusion_annotations_are_the_counts(tmp_path):
    confusion = [[7, 2, 1], [0, 0, 0], [3, 4, 13]]
    drawn = figures.plot_confusion(tmp_path / "cm.png", confusion, THREE)
    _png(tmp_path / "cm.png")
    assert [[int(cell.split("\n")[0]) for cell in row] for row in drawn["annotations"]] \
        == confusion
    assert drawn["annotations"][0] == ["7\n70%", "2\n20%", "1\n10%"]
    assert drawn["annotations"][1] == ["0\n-", "0\n-", "0\n-"]     # no HER2-low case
    assert drawn["percent"][2] == pytest.approx([15, 20, 65])
    with pytest.raises(Her2jaxError, match="must be"):
        figures.plot_confusion(tmp_path / "bad.png", [[1, 2]], THREE)


# ---------------------------------------------------------------- the report


def _write_log(path: Path, lines) -> Path:
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n"
                            for line in lines))
    return path


def test_read_curves_of_a_hand_written_log(tmp_path):
    log = _write_log(tmp_path / "metrics.jsonl", [
        {"step": 20, "split": "train", "loss": None, "accuracy": 0.5, "note": "x"},
        {"step": 10, "split": "train", "loss": 1.3, "accuracy": 0.4, "note": "y"},
        '{"step": 30, "split": "train", "loss": NaN, "accuracy": 0.6}\n',
        {"step": 20, "split": "val", "macro_auc": 0.61, "accuracy": 0.5},   # no val loss
        {"step": 30, "split": "train", "loss": 0.9, "accuracy": 0.7},       # step 30 again
        {"step": 30, "split": "val", "macro_auc": None, "loss": 1.05, "accuracy": 0.4},
        '{"step": 40, "split": "tra',                                     # cut by a kill
    ])
    curves = report.read_curves(log)
    assert sorted(curves) == ["train", "val"]
    train, val = curves["train"], curves["val"]
    assert "note" not in train
    np.testing.assert_array_equal(train["step"], [10, 20, 30])
    np.testing.assert_array_equal(train["loss"], [1.3, np.nan, 0.9])   # the last step-30 record
    np.testing.assert_array_equal(train["accuracy"], [0.4, 0.5, 0.7])
    np.testing.assert_array_equal(val["step"], [20, 30])
    np.testing.assert_array_equal(val["macro_auc"], [0.61, np.nan])
    np.testing.assert_array_equal(val["loss"], [np.nan, 1.05])

    drawn = figures.plot_training_curves(tmp_path / "curves.png", curves, num_classes=3,
                                         checkpoint_steps=[30])
    assert drawn["loss"] == ["training loss", "validation loss", "chance: ln 3 = 1.099",
                             "evaluated checkpoint (step 30)"]
    assert drawn["auc"] == ["validation macro AUC", "chance (0.5)",
                            "evaluated checkpoint (step 30)"]
    image = _png(tmp_path / "curves.png")
    assert image.width > image.height > 400      # two panels side by side

    # Without a validation loss, and with every validation AUC undefined (a class missing).
    log = _write_log(tmp_path / "other.jsonl", [
        {"step": 5, "split": "train", "loss": 1.0}, {"step": 5, "split": "val", "macro_auc": None},
        {"step": 10, "split": "train", "loss": 0.8}, {"step": 10, "split": "val", "macro_auc": None}])
    curves = report.read_curves(log)
    assert "loss" not in curves["val"]
    drawn = figures.plot_training_curves(tmp_path / "other.png", curves, num_classes=2)
    assert drawn["loss"] == ["training loss", "chance: ln 2 = 0.693"]
    assert drawn["auc"][0] == "validation macro AUC: undefined at every evaluation"
    _png(tmp_path / "other.png")

    assert report.read_curves(tmp_path / "missing.jsonl") == {}
    assert report.read_curves(_write_log(tmp_path / "empty.jsonl", [])) == {}


def _rewrite_clinical(path: Path, column: str, value: str, rows: int) -> None:
    """Sets ``column`` of the first ``rows`` rows of a predictions.csv (other cells untouched)."""
    with open(path, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    index = table[0].index(column)
    for row in table[1:rows + 1]:
        row[index] = value
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(table)
    files.write_text(path, buffer.getvalue())


def _montage(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    gradient = np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (120, 1))
    Image.fromarray(np.stack([gradient, gradient // 2, np.full_like(gradient, shade)], -1)).save(
        path)


@pytest.fixture(scope="module")
def reported(trained, tmp_path_factory):
    """A trained, evaluated and analysed workdir with a hostile clinical value, image-SHAP cases
    (one with a hostile patient id) and its report: (workdir, page text, shap patient ids)."""
    workdir = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(trained[0], workdir)
    inference.evaluate(workdir, n_boot=50)
    stage.analyze(workdir, methods=("tsne",), progress=False, max_explained=10)

    eval_dir = workdir / "eval"
    config = json.loads((workdir / "config.json").read_text())["config"]
    test_csv = eval_dir / "test_CENTER_C" / "predictions.csv"
    _rewrite_clinical(test_csv, "manufacturer", HOSTILE_VALUE, rows=3)
    frames = {p.parent.name: files.read_predictions(p) for p in eval_dir.glob("*/predictions.csv")}
    tables.write_tables(eval_dir, frames, THREE, config["data"]["columns"]["clinical"], n_boot=50)

    shown = files.read_predictions(test_csv).iloc[0]
    summary = json.loads((workdir / "analysis" / "summary.json").read_text())
    cases = []
    for i, (pid, name) in enumerate([(shown["patient_id"], shown["patient_id"]),
                                     (HOSTILE_PID, "hostile")]):
        _montage(workdir / "analysis" / "shap" / f"{name}_montage.png", shade=60 * i)
        cases.append({"patient_id": pid, "center": "CENTER_C", "split": "test_CENTER_C",
                      "label": "HER2-low", "predicted_class": "HER2-positive",
                      "explained_class": "HER2-low", "probability": 0.4,
                      "fraction_in_tumour": 0.5,
                      "files": {"montage": f"shap/{name}_montage.png",
                                "crop_map": f"shap/{name}_shap_crop.nii.gz"}})
    summary["image_shap"] = {"method": "permutation", "baseline": "zero", "grid": [4, 4, 4],
                             "cases": cases}
    files.write_metrics(workdir / "analysis" / "summary.json", summary)

    path = report.write_report(workdir)
    assert path == workdir / "report.html"
    return workdir, path.read_text(encoding="utf-8"), [c["patient_id"] for c in cases]


def _section(page: str, ident: str) -> str:
    start = page.index(f'<section id="{ident}">')
    end = page.find('<section id="', start + 1)
    return page[start:end if end > 0 else len(page)]


def _expected_images(workdir: Path) -> int:
    """The <img> count the page should have, from the files the stages wrote."""
    splits = [p.parent.name for p in (workdir / "eval").glob("*/metrics.json")]
    calibrated = json.loads((workdir / "eval" / "calibration.json").read_text())["splits"]
    summary = json.loads((workdir / "analysis" / "summary.json").read_text())
    curves = (workdir / "metrics.jsonl").stat().st_size > 0   # the training curves
    return (3 * len(splits) + curves
            + sum(1 for e in calibrated.values() if e.get("reliability_png"))
            + len(summary["embeddings"]["files"]) + len(summary["shap"]["files"])
            + len(summary["image_shap"]["cases"]))


def test_report_shows_the_metrics_as_metrics_json_has_them(reported, tmp_path):
    workdir, page, _ = reported
    splits = sorted(p.parent.name for p in (workdir / "eval").glob("*/metrics.json"))
    assert splits == ["test_CENTER_C", "val"]
    for name in splits:
        summary = files.read_metrics(workdir / "eval" / name / "metrics.json")
        part = page[page.index(f'id="split-{name}"'):]
        part = part[:part.index("</section>")]
        assert f"macro-average AUC {metrics.format_auc(summary['macro_auc'])}" in part
        assert f"micro-average AUC {metrics.format_auc(summary['micro_auc'])}" in part
        for pair, entry in summary["pairwise_auc"].items():
            assert f"<td>{pair} (one-vs-one)</td><td>{metrics.format_auc(entry)}</td>" in part
        assert f"<td>accuracy</td><td class=\"num\">{summary['accuracy']:.3f}</td>" in part
        assert f"{summary['quadratic_weighted_kappa']:.3f}" in part
        for kind in ("roc", "pairwise_roc", "confusion"):
            _png(workdir / "report_files" / f"{name}_{kind}.png")
        # The ROC figure's macro-average is metrics.json's macro AUC.
        y, probs, _ = files.prediction_arrays(files.read_predictions(
            workdir / "eval" / name / "predictions.csv"))
        drawn = figures.plot_roc(tmp_path / f"{name}.png", y, probs, THREE)
        assert drawn["auc"]["macro-average"] == pytest.approx(summary["macro_auc"]["value"])
    for name in THREE:
        assert f">{name}</th>" in _section(page, "cohort")
    assert "<title>her2jax report: run</title>" in page


def test_report_has_every_part(reported):
    workdir, page, _ = reported
    calibration = _section(page, "calibration")
    fitted = json.loads((workdir / "eval" / "calibration.json").read_text())
    assert html.escape(fitted["statement"]) in calibration
    assert f"{fitted['temperature']:.3f}" in calibration
    centres = _section(page, "centres")
    assert "<td>CENTER_C</td>" in centres and "<td>pooled</td>" in centres
    assert "n=3: too small for a CI" in centres        # the small subgroup's note is kept
    embeddings = _section(page, "embeddings")
    summary = json.loads((workdir / "analysis" / "summary.json").read_text())
    by_class = summary["embeddings"]["silhouette"]["by_class"]
    assert f"{by_class:.3f}" in embeddings
    assert ('class="warning"' in embeddings) == summary["embeddings"]["domain_shift_warning"]
    assert "KernelExplainer" in _section(page, "shap-features")
    assert "permutation explainer, baseline zero, grid 4 x 4 x 4" in _section(page, "shap-image")
    assert "not run" not in page
    software = _section(page, "software")
    config = json.loads((workdir / "config.json").read_text())
    assert html.escape(json.dumps(config["config"], indent=2)) in software
    for package in ("jax", "flax", "scikit-learn", "shap", "umap-learn", "grain"):
        recorded = config["provenance"]["versions"].get(package) or "not recorded"
        now = importlib.metadata.version(package)
        assert f"<td>{package}</td><td>{recorded}</td><td>{now}</td>" in software
    assert f"<td>python</td><td>not recorded</td><td>{sys.version.split()[0]}</td>" in software
    assert config["provenance"]["git_commit"] in page


def test_report_is_self_contained(reported):
    workdir, page, _ = reported
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert not re.search(r"<script|<link|<iframe|@import|url\(", page, re.I)
    sources = IMG_SRC.findall(page)
    assert len(sources) == page.count("<img ") == _expected_images(workdir) >= 3 * 2 + 1 + 2 + 8 + 2
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:60]
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        Image.open(io.BytesIO(data)).verify()


def test_report_escapes_and_shows_no_other_patient(reported):
    workdir, page, shap_ids = reported
    escaped = html.escape(HOSTILE_VALUE)
    assert escaped in _section(page, "centres") and "Sie<mens>" not in page
    assert html.escape(HOSTILE_PID) in _section(page, "shap-image") and "<b>\"7" not in page
    every_id = set()
    for npz in (workdir / "features").glob("*.npz"):
        every_id |= set(np.load(npz)["patient_ids"].astype(str))
    for frame in (files.read_predictions(p) for p in (workdir / "eval").glob("*/predictions.csv")):
        every_id |= set(frame["patient_id"])
    assert shap_ids[0] in every_id and len(every_id) > 20
    outside = page.replace(_section(page, "shap-image"), "")
    for pid in every_id:
        assert pid not in outside, f"patient {pid} outside the image-SHAP section"
        assert (pid in page) == (pid in shap_ids), pid


def test_a_bare_workdir_parts_not_run_cohort_without_dataset(reported, tmp_path):
    workdir, _, _ = reported
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(workdir / "config.json", bare)
    for split in ("val", "test_CENTER_C"):
        (bare / "eval" / split).mkdir(parents=True)
        for name in ("metrics.json", "predictions.csv"):
            shutil.copy(workdir / "eval" / split / name, bare / "eval" / split)
    # A subgroup table of a column the config does not name stays off the page.
    files.write_metrics(bare / "eval" / "subgroups.json", {"rows": [
        {"column": "name", "value": "Jane Doe", "n": 3, "macro_auc": None, "micro_auc": None,
         "per_class_auc": None, "note": "n=3: too small for a CI"},
        {"column": "manufacturer", "value": "Philips", "n": 4, "macro_auc": None,
         "micro_auc": None, "per_class_auc": None, "note": "n=4: too small for a CI"}]})
    page = report.write_report(bare, data_dir=str(tmp_path / "moved")).read_text()
    assert "Jane Doe" not in page and "<td>manufacturer</td><td>Philips</td>" in page
    assert "Left out: 1 subgroup row(s) of columns that are not the config&#x27;s" in page
    for ident in ("calibration", "embeddings", "shap-features", "shap-image"):
        assert "<strong>not run</strong>" in _section(page, ident), ident
    assert page.count("<img ") == 6           # ROC, pairwise ROC, confusion of two splits
    assert "No training curves: no metrics.jsonl." in _section(page, "training")
    cohort = _section(page, "cohort")
    assert "not reachable" in cohort
    frame = files.read_predictions(bare / "eval" / "test_CENTER_C" / "predictions.csv")
    counts = [int((frame["label"] == name).sum()) for name in THREE]
    row = "".join(f'<td class="num">{n}</td>' for n in [*counts, sum(counts)])
    assert f"<td>test_CENTER_C</td><td>CENTER_C</td>{row}" in cohort


def test_cohort_from_the_dataset_counts_every_split(reported):
    workdir, page, _ = reported
    cohort = _section(page, "cohort")
    assert "From the prepared dataset" in cohort
    frame = files.read_predictions(workdir / "eval" / "val" / "predictions.csv")
    total = [int((frame["label"] == name).sum()) for name in THREE]
    assert "<td>train</td>" in cohort
    val_rows = re.findall(r"<tr><td>val</td><td>[^<]*</td>((?:<td class=\"num\">\d+</td>)+)",
                          cohort)
    last = [int(n) for n in re.findall(r">(\d+)<", val_rows[-1])]
    assert last == [*total, sum(total)]     # one centre: its row; several: the total row last


def test_report_shows_the_hand_made_baseline_beside_the_model(reported, tmp_path):
    workdir, page, _ = reported
    label = ("hand-made kinetic baseline (5 features + logistic regression, same training "
             "patients)")
    for name in ("val", "test_CENTER_C"):
        written = files.read_metrics(workdir / "eval" / name / "baseline_metrics.json")
        part = page[page.index(f'id="split-{name}"'):]
        part = part[:part.index("</section>")]
        model_line = part.index('<p class="headline">')
        line = part.index(html.escape(
            f"{label}: macro-average AUC {metrics.format_auc(written['macro_auc'])} "
            f"(n = {written['n']})"))
        assert model_line < line < part.index("<table"), "right under the model's headline"
    # Without the file (an older dataset), nothing is shown.
    bare = tmp_path / "run"
    (bare / "eval" / "val").mkdir(parents=True)
    assert report._baseline_line(bare, "val", 10) == ""


def test_report_shows_the_training_curves_and_the_checkpoint_selection(reported, tmp_path):
    workdir, page, _ = reported
    training = _section(page, "training")
    caption = "Training curves (metrics.jsonl): loss by step"
    (src,) = re.findall(r'<figure class="wide"><img src="([^"]*)" alt="' + re.escape(caption),
                          training)
    assert f"<figcaption>{caption}" in training
    data = base64.b64decode(src.split(",", 1)[1], validate=True)
    assert data == (workdir / "report_files" / report.CURVES_FILE).read_bytes()
    image = _png(io.BytesIO(data))
    assert image.width > 600 and image.height > 250 and len(data) > 20_000

    evaluated = {n: files.read_metrics(workdir / "eval" / n / "metrics.json")
                 for n in ("val", "test_CENTER_C")}
    (step,) = {m["step"] for m in evaluated.values()}
    assert step in (6, 12)
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in val] == [6, 12]
    train = json.loads((workdir / "config.json").read_text())["config"]["train"]
    criterion = {"val_loss": "lowest validation loss (class-balanced cross-entropy)",
                 "val_macro_auc": "highest validation macro AUC",
                 None: "highest validation macro AUC"}[train.get("select_by")]
    expected = (f"Evaluated checkpoint: step {step} of 12, chosen by {criterion} over 2 "
                f"evaluations (every 6 steps) on {evaluated['val']['n']} validation cases.")
    assert f'<p class="statement">{html.escape(expected)}' in training

    # The figure marks that step, and shows the validation loss when the log has it.
    drawn = figures.plot_training_curves(tmp_path / "c.png", report.read_curves(
        workdir / "metrics.jsonl"), num_classes=3, checkpoint_steps=[step])
    assert f"evaluated checkpoint (step {step})" in drawn["loss"]
    assert ("validation loss" in drawn["loss"]) == all("loss" in r for r in val)


def _selection_copy(workdir: Path, dest: Path, *, train: dict, checkpoint: str | None = None,
                    step: int | None = None, log: bool = True) -> Path:
    """config.json (train section updated; a None value removes the key), metrics.jsonl and
    the two splits' metrics.json of ``workdir`` (their checkpoint / step replaced)."""
    dest.mkdir()
    record = json.loads((workdir / "config.json").read_text())
    for key, value in train.items():
        record["config"]["train"].pop(key, None)
        if value is not None:
            record["config"]["train"][key] = value
    (dest / "config.json").write_text(json.dumps(record))
    if log:
        shutil.copy(workdir / "metrics.jsonl", dest)
    for split in ("val", "test_CENTER_C"):
        summary = files.read_metrics(workdir / "eval" / split / "metrics.json")
        summary.update({k: v for k, v in (("checkpoint", checkpoint), ("step", step))
                        if v is not None})
        files.write_metrics(dest / "eval" / split / "metrics.json", summary)
    return dest


@pytest.mark.parametrize("select_by, checkpoint, expected", [
    ("val_loss", None, "step 6 of 12, chosen by lowest validation loss (class-balanced "
                       "cross-entropy) over 2 evaluations (every 6 steps) on {n} validation "
                       "cases."),
    ("val_macro_auc", None, "step 6 of 12, chosen by highest validation macro AUC over 2 "
                            "evaluations (every 6 steps) on {n} validation cases."),
    ("last", None, "step 6 of 12, the final step of training (train.select_by='last'): no "
                   "selection, the {n} validation cases were not used to choose it."),
    (None, None, "step 6 of 12, chosen by highest validation macro AUC over 2 evaluations "
                 "(every 6 steps) on {n} validation cases. This run's config.json predates "
                 "train.select_by: such runs kept the highest validation macro AUC."),
    ("val_loss", "latest", "step 6 of 12, the latest checkpoint (eval --checkpoint=latest), "
                           "not checkpoints/best (chosen by lowest validation loss "
                           "(class-balanced cross-entropy) on the {n} validation cases)."),
])
def test_selection_statement_per_select_by(reported, tmp_path, select_by, checkpoint, expected):
    workdir, _, _ = reported
    copy = _selection_copy(workdir, tmp_path / "run", train={"select_by": select_by},
                           checkpoint=checkpoint, step=6)
    training = _section(report.write_report(copy).read_text(), "training")
    n = files.read_metrics(workdir / "eval" / "val" / "metrics.json")["n"]
    assert n > 0
    sentence = "Evaluated checkpoint: " + expected.format(n=n)
    assert f'<p class="statement">{html.escape(sentence)}</p>' in training
    assert training.count("<img ") == 1                  # the curves, from the copied log


def test_selection_statement_of_pca_lr_and_without_a_log(reported, tmp_path):
    workdir, _, _ = reported
    n = files.read_metrics(workdir / "eval" / "val" / "metrics.json")["n"]
    copy = _selection_copy(workdir, tmp_path / "pca", train={"protocol": "pca_lr"},
                           checkpoint="pca_lr.npz", step=0, log=False)
    training = _section(report.write_report(copy).read_text(), "training")
    assert html.escape(
        "No checkpoint selection: the pca_lr protocol fits its classifier once on the training "
        "split (frozen encoder features, PCA, logistic regression), with no training steps; "
        f"the {n} validation cases play no part in choosing it.") in training
    assert "No training curves: the pca_lr protocol takes no training step." in training
    assert "<img " not in training and not (copy / "report_files" / report.CURVES_FILE).exists()

    # A gradient run whose metrics.jsonl is empty: the sentence, no figure, no crash.
    copy = _selection_copy(workdir, tmp_path / "empty", train={"select_by": "val_loss"})
    (copy / "metrics.jsonl").write_text("")
    training = _section(report.write_report(copy).read_text(), "training")
    assert "No training curves: metrics.jsonl holds no record." in training
    assert "the evaluations (every 6 steps) (no validation record in metrics.jsonl" in training
    assert "<img " not in training


@pytest.mark.parametrize("model, expected", [
    (dict(encoder="none", roi_pool=dict(hidden=8, rim_voxels=2)),
     "no encoder: tumour-region pooling (voxel features of width 8 inside the mask and on a "
     "2-voxel rim)"),
    (dict(encoder="resnet3d", resnet=dict(depth=10), roi_pool=dict(hidden=16, rim_voxels=3)),
     "3D ResNet-10 and tumour-region pooling (voxel features of width 16 inside the mask and "
     "on a 3-voxel rim)"),
    (dict(encoder="none", roi_pool=dict(hidden=8, rim_voxels=[2, 4])),
     "no encoder: tumour-region pooling (voxel features of width 8 inside the mask and on "
     "shells of 0-2, 2-4 voxels around it)"),
    (dict(encoder="resnet3d", resnet=dict(depth=18), roi_pool=dict(hidden=0)), "3D ResNet-18"),
])
def test_the_model_line_names_the_tumour_region_branch(model, expected):
    assert report._model_text(dict(model=model, train={})) == expected


def test_the_model_line_says_when_the_parameters_are_a_moving_average():
    model = dict(encoder="resnet3d", resnet=dict(depth=10))
    assert report._model_text(dict(model=model, train=dict(ema_decay=0.99))) == (
        "3D ResNet-10; evaluated with the moving average of its parameters (decay 0.99)")
    assert report._model_text(dict(model=model, train=dict(ema_decay=0.0))) == "3D ResNet-10"


def test_the_model_line_says_when_the_encoder_was_probed_before_fine_tuning():
    model = dict(encoder="vit3d", vit=dict(size="tiny", patch_size=4))
    assert report._model_text(dict(model=model, train=dict(freeze_steps=100))) == (
        "3D ViT (tiny, patch 4); encoder held for the first 100 updates (linear probe, then "
        "fine-tuning)")


def test_write_report_refuses_a_non_workdir_and_an_unevaluated_one(reported, tmp_path):
    with pytest.raises(Her2jaxError, match="not a her2jax workdir"):
        report.write_report(tmp_path)
    shutil.copy(reported[0] / "config.json", tmp_path)
    with pytest.raises(Her2jaxError, match="run --mode=eval first"):
        report.write_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "her2jax.cli.report", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_cli(reported, tmp_path):
    workdir, _, _ = reported
    (workdir / "report.html").unlink()
    result = _cli(workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"wrote {workdir / 'report.html'}"
    assert "<title>her2jax report: run</title>" in (workdir / "report.html").read_text()

    result = _cli(tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"report.py: error: {tmp_path}: is not a her2jax workdir (no config.json); train first"]
    shutil.copy(workdir / "config.json", tmp_path)
    result = _cli(tmp_path, f"--out={tmp_path / 'r.html'}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "run --mode=eval first" in result.stderr and str(tmp_path) in result.stderr
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------- the browser


def _chrome(tmp_path):
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
        "the report's browser test needs Debian's chromium and chromedriver: "
        "apt-get install -y --no-install-recommends chromium chromium-driver (make test does)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[dev]'")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tmp_path / "profile"
    profile.mkdir()
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # An explicit driver path: Selenium Manager (which downloads drivers) is never asked.
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def test_report_renders_in_headless_chromium(reported, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    workdir, page, _ = reported
    driver = _chrome(tmp_path)
    try:
        driver.get((workdir / "report.html").as_uri())
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return document.readyState") == "complete")
        assert driver.execute_script("return document.readyState") == "complete"
        assert driver.title == "her2jax report: run"
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert len(images) == _expected_images(workdir) == page.count("<img ")
        assert all(complete and width > 0 for complete, width in images), images
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
        requested = [json.loads(e["message"])["message"] for e in driver.get_log("performance")]
        urls = {m["params"]["request"]["url"] for m in requested
                if m["method"] == "Network.requestWillBeSent"}
        assert (workdir / "report.html").as_uri() in urls
        # (the browser's own chrome:// new-tab page may load too; nothing may leave the machine)
        remote = [u for u in urls if re.match(r"(https?|wss?|ftp):", u)]
        assert not remote, remote
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    image = _png(shot)
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    assert grey.std() > 10 and len(np.unique(grey)) > 50
