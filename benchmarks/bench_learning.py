"""The learning study: does the engine learn what the phantom holds, on centres it never saw?

  python benchmarks/bench_learning.py [--patients=300] [--centers=3] [--phantom_seed=1]
      [--shape=96,96,48] [--candidates=demo,resnet_kinetic_mm] [--control=demo]
      [--permutations=3] [--steps=N] [--seeds=0] [--n_boot=1000] [--jsonl=FILE] [--cohort=DIR]
      [--centers_held_out=CENTER_B] [--override=train.learning_rate=3e-4 ...]

One phantom cohort (written once, or ``--cohort``), every centre held out in turn. For each
candidate (a recipe + encoder + training recipe, below) and held-out centre, one training run on
the other centres (a stratified quarter of them validates and chooses the checkpoint), then, in
the same run and on the same patients:

* the model's macro AUC on the held-out centre (95% bootstrap CI);
* ``pca_lr``: the study's protocol on the trained encoder's features (StandardScaler -> PCA 16
  -> logistic regression, fitted on the training split's features);
* the hand-made kinetic baseline (five tumour features + logistic regression, fitted on the
  same training split; ``eval/<split>/baseline_metrics.json`` of the run).

Each candidate trains for its config's own ``train.steps`` unless ``--steps`` is given.

The permuted-label control (``data.permute_train_labels``: training and validation labels
shuffled, so the checkpoint choice sees no real label either; the test centre untouched) runs for the ``--control`` candidates on every held-out centre, once per
permutation (``data.seed`` = 0, 1, ... ``--permutations`` - 1: each draws another permutation
and another validation quarter); the baseline of the same run is then fitted on the permuted
labels too. One permutation of ~140 labels is a noisy control (its held-out AUC swings by
~0.1), so the summary reports the mean over permutations per centre.

``--seeds=0,1,2,3,4`` trains every real-label candidate once per training seed (initialisation,
batch order, augmentation; the data, splits and baseline stay the same): the summary's model
AUC per centre is then the mean over seeds, what one training run reaches in expectation, and
it adds the seeds' ensemble (the mean of their predicted probabilities per patient) with its
own goal checks. The control runs with the first seed.

One JSON line per run, then one summary line per candidate (mean over the held-out centres)
and, on stderr, a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str):
    """``configs/<name>.py``'s get_config()."""
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _demo_2p5mm():
    """The demo until 2026-12-06: configs/demo_cpu.py on 24^3 at 2.5 mm, shells 0-5 and 5-10
    mm. The other candidates below were measured on these inputs and keep them."""
    config = load_config("demo_cpu")
    config.data.recipe.update(shape=(24, 24, 24), spacing_mm=2.5)
    config.model.roi_pool.rim_voxels = (2, 4)
    return config


def _resnet_kinetic_mm():
    """The demo from 2026-12-03 to 2026-12-05: ResNet-10 (width 0.5, 3x3x3 stride-2 stem) on
    the demo's inputs of then (24^3 at 2.5 mm), AdamW 1e-3 for 300 steps."""
    from her2jax.models import factory

    config = _demo_2p5mm()
    config.data.recipe.channels = ("PE", "PEL", "MASK")   # the demo's inputs
    config.model = factory.model_config("resnet3d")
    config.model.resnet.update(depth=10, widen_factor=0.5, shortcut="B", bias_downsample=False,
                               conv1_t_size=3, conv1_t_stride=2)
    config.train.update(steps=300, learning_rate=1e-3, eval_every=50, save_every=50)
    config.train.augment.channel_scale = 0.0   # the demo's contrast augmentation is newer
    return config


def _resnet_intensity_aug():
    config = _resnet_kinetic_mm()
    config.train.augment.update(scale=0.1, shift=0.1, noise=0.05, channel_scale=0.25)
    return config


def _vit_kinetic_mm():
    config = _resnet_kinetic_mm()
    tiny = load_config("tiny_cpu")
    config.model = tiny.model
    config.model.vit.patch_size = 4          # 24^3 / 4^3 = 216 tokens, as FM-BCMRI's 48^3 / 8^3
    return config


def _vit_tumour_pool():
    config = _vit_kinetic_mm()
    config.model.vit.pool = "tumour"         # patch tokens averaged inside the mask and its rim
    return config


def _vit_tumour_shells():
    config = _vit_tumour_pool()
    config.model.vit.rim_voxels = (2, 4)     # shells 0-5 and 5-10 mm at 2.5 mm, as the demo's
    return config


def _vit_tumour_spread():
    config = _vit_tumour_pool()
    config.model.vit.spread = True           # and the tokens' spread inside the tumour
    return config


def _vit_tumour_p2():
    config = _vit_tumour_pool()
    config.model.vit.patch_size = 2          # 12^3 = 1,728 tokens of 5 mm: finer than the
    return config                            # phantom's 6 mm internal texture


def _vit_tumour_p2_spread():
    config = _vit_tumour_p2()
    config.model.vit.spread = True
    return config


def _resnet_with_region():
    config = _resnet_kinetic_mm()
    config.model.roi_pool.update(hidden=16, standardize=True)
    return config


def _demo_all_phases():
    """The demo on the enhancement of every post-contrast phase (the whole curve, not only
    its first and last point), at 2.5 mm; measured 2026-12-05, not adopted (BENCHMARKS.md)."""
    config = _demo_2p5mm()
    config.data.recipe.channels = ("PE", "PE2", "PE3", "PEL", "MASK")
    return config


def _tiny_vit_fmbcmri():
    config = load_config("tiny_cpu")         # the demo until 2026-12-03
    config.data.val_fraction = 0.25
    return config


# name -> (config builder, what it tests)
CANDIDATES = {
    "demo": (lambda: load_config("demo_cpu"),
             "configs/demo_cpu.py: tumour-region network (per-voxel MLP of width 8 pooled inside "
             "the mask and on two shells around it, log volumes; no CNN) on kinetic_mm (PE, "
             "PEL, MASK) 30^3 @ 2 mm, shells 0-4 and 4-10 mm, flips + axis permutations + "
             "per-channel contrast 0.25, AdamW 1e-2, 1,000 steps"),
    "demo_2p5mm": (_demo_2p5mm, "the demo until 2026-12-06: the same on 24^3 @ 2.5 mm, shells "
                   "0-5 and 5-10 mm"),
    "demo_all_phases": (_demo_all_phases, "demo on the enhancement of all four post-contrast "
                        "phases (PE, PE2, PE3, PEL, MASK)"),
    "resnet_kinetic_mm": (_resnet_kinetic_mm, "ResNet-10 w0.5 on the demo's inputs, AdamW 1e-3, "
                          "300 steps (the demo until 2026-12-05)"),
    "resnet_intensity_aug": (_resnet_intensity_aug, "resnet_kinetic_mm plus intensity scale 0.1, "
                             "shift 0.1, noise 0.05 and per-channel contrast 0.25"),
    "resnet_with_region": (_resnet_with_region, "resnet_kinetic_mm with the tumour-region branch "
                           "(width 16, standardised) beside it"),
    "vit_kinetic_mm": (_vit_kinetic_mm, "tiny ViT (patch 4) on the demo's inputs, 300 steps"),
    "vit_tumour_pool": (_vit_tumour_pool, "vit_kinetic_mm read out by its patch tokens "
                        "averaged inside the tumour mask and on a 2-voxel rim, not by CLS"),
    "vit_tumour_shells": (_vit_tumour_shells, "vit_tumour_pool with two shells, 0-2 and 2-4 "
                          "voxels outside the mask"),
    "vit_tumour_spread": (_vit_tumour_spread, "vit_tumour_pool plus the patch tokens' standard "
                          "deviation inside the tumour (its heterogeneity)"),
    "vit_tumour_p2": (_vit_tumour_p2, "vit_tumour_pool with patches of 2 voxels (5 mm, 1,728 "
                      "tokens) instead of 4"),
    "vit_tumour_p2_spread": (_vit_tumour_p2_spread, "vit_tumour_p2 with the tokens' spread "
                             "inside the tumour"),
    "tiny_vit_fmbcmri": (_tiny_vit_fmbcmri, "configs/tiny_cpu.py, the demo until 2026-12-03: "
                         "tiny ViT/8 on one z-scored phase, tumour box resized to 32^3"),
}


def prepared_dir(cohort: Path, config, root: Path, *, require_labels: bool = True) -> str:
    """A dataset of ``config``'s recipe (prepared once per recipe fingerprint; a cohort
    without label columns needs ``require_labels=False``)."""
    from her2jax.data import prepare, preprocess

    data_dir = root / f"data_{preprocess.recipe_fingerprint(config.data.recipe)}"
    if not data_dir.is_dir():
        prepare.prepare(cohort, data_dir, config.data, workers=0, progress=False,
                        require_labels=require_labels)
    return str(data_dir)


def _auc(entry: dict) -> dict:
    return {k: None if entry[k] is None else round(entry[k], 4)
            for k in ("value", "ci_low", "ci_high")}


def pca_lr_on_features(workdir: Path, test_split: str, n_boot: int) -> dict:
    """The study's protocol on the trained encoder: fitted on the training split's features,
    scored on the held-out split."""
    import ml_collections
    import numpy as np

    from her2jax.evaluate import metrics
    from her2jax.train import inference, pca_lr
    from her2jax.train import workdir as workdir_lib

    config = ml_collections.ConfigDict(workdir_lib.read(workdir)["config"])
    written = inference.extract_features(workdir, splits=["train", test_split])
    train, test = (np.load(written[s]) for s in ("train", test_split))
    k = min(config.train.pca_components, train["features"].shape[0],
            train["features"].shape[1])
    model = pca_lr.make_sklearn(k, seed=config.train.seed,
                                balanced=config.train.class_weighting == "balanced")
    model.fit(train["features"], train["labels"])
    probs = np.zeros((len(test["labels"]), len(test["class_names"])))
    probs[:, model.classes_] = model.predict_proba(test["features"])
    summary = metrics.summarize(test["labels"], probs, list(test["class_names"]),
                                n_boot=n_boot)
    return _auc(summary["macro_auc"])


def apply_overrides(config, overrides: dict) -> None:
    """``{"train.learning_rate": 3e-4, ...}``: dotted keys into the config, values as given."""
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = tuple(value) if isinstance(value, list) else value


def run_one(name: str, cohort: Path, root: Path, center: str, *, permute: bool,
            steps: int | None, seed: int, n_boot: int, overrides: dict | None = None,
            data_seed: int = 0) -> dict:
    """Trains candidate ``name`` (with ``overrides``) with ``center`` held out; the held-out
    results. ``steps`` None keeps the candidate's own ``train.steps``; ``data_seed`` draws the
    validation quarter (and, with ``permute``, the permutation)."""
    from her2jax.train import inference, loop

    config = CANDIDATES[name][0]()
    apply_overrides(config, overrides or {})
    config.data.data_dir = prepared_dir(cohort, config, root)
    config.data.test_centers = (center,)
    config.data.permute_train_labels = permute
    config.data.seed = data_seed
    config.data.worker_count = 0
    if steps is not None:
        config.train.steps = steps
        config.train.warmup_steps = min(config.train.warmup_steps, steps // 4)
        config.train.eval_every = config.train.save_every = max(steps // 6, 1)
    config.train.seed = config.model.seed = seed
    workdir = Path(tempfile.mkdtemp(dir=root, prefix=f"{name}-{center}-"))
    t0 = time.perf_counter()
    result = loop.train(config, workdir, progress=False)
    train_s = time.perf_counter() - t0
    split = f"test_{center}"
    summaries = inference.evaluate(workdir, splits=[split], n_boot=n_boot)
    baseline = json.loads((workdir / "eval" / split / "baseline_metrics.json").read_text())
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final_loss = [r["loss"] for r in records if r["split"] == "train"][-1]
    return dict(
        bench="learning", candidate=name, overrides=overrides or {}, held_out=center,
        permuted_labels=permute, data_seed=data_seed, seed=seed,
        n_test=summaries[split]["n"], model=_auc(summaries[split]["macro_auc"]),
        pca_lr=pca_lr_on_features(workdir, split, n_boot),
        baseline=_auc(baseline["macro_auc"]),
        val_macro_auc=round(summaries["val"]["macro_auc"]["value"], 4),
        best_step=result.best_step, select_by=result.select_by, steps=result.steps,
        final_train_loss=round(final_loss, 4), train_s=round(train_s, 1),
        total_s=round(time.perf_counter() - t0, 1), workdir=str(workdir))


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4)


def _per_center(group: list[dict], key: str) -> dict[str, float]:
    """Held-out AUC per centre, averaged over the group's runs of that centre (several
    permutations for the control)."""
    centers = dict.fromkeys(r["held_out"] for r in group)
    return {c: _mean(r[key]["value"] for r in group if r["held_out"] == c) for c in centers}


def seed_ensemble(workdirs: list[str], split: str, n_boot: int) -> dict:
    """Macro AUC (95% CI) of the mean predicted probabilities of several runs on ``split``
    (their ``eval/<split>/predictions.csv``, the same patients)."""
    import numpy as np

    from her2jax.evaluate import files, metrics

    frames = [files.read_predictions(Path(w) / "eval" / split / "predictions.csv")
              .sort_values("patient_id") for w in workdirs]
    ids = frames[0].patient_id.to_numpy()
    if any(not np.array_equal(f.patient_id.to_numpy(), ids) for f in frames):
        raise ValueError(f"the runs scored different patients on {split}: {workdirs}")
    arrays = [files.prediction_arrays(f) for f in frames]
    labels, _, names = arrays[0]
    probs = np.mean([a[1] for a in arrays], axis=0)
    return _auc(metrics.summarize(labels, probs, names, n_boot=n_boot)["macro_auc"])


def summarize(rows: list[dict], n_boot: int = 1000) -> list[dict]:
    """Per candidate and label condition: held-out macro AUC per centre (the mean over
    permutations for the control, over training seeds for real labels) and over centres, for
    the model, pca_lr and the baseline; the goal checks: real labels, every centre >= baseline
    - 0.03 and mean >= baseline mean; permuted labels, every centre's mean <= 0.60. With
    several training seeds (rows carrying ``workdir``), the seeds' ensemble per centre and its
    goal checks too."""
    out = []
    for (name, permute) in dict.fromkeys((r["candidate"], r["permuted_labels"]) for r in rows):
        group = [r for r in rows if r["candidate"] == name and r["permuted_labels"] == permute]
        model, base = _per_center(group, "model"), _per_center(group, "baseline")
        line = dict(
            bench="learning_summary", candidate=name, permuted_labels=permute,
            centers=list(model), runs=len(group), model=model, baseline=base,
            model_mean=_mean(model.values()),
            pca_lr_mean=_mean(_per_center(group, "pca_lr").values()),
            baseline_mean=_mean(base.values()),
            train_s_mean=_mean(r["train_s"] for r in group))
        if permute:
            line["every_center_at_most_0_60"] = all(v <= 0.60 for v in model.values())
        else:
            line["every_center_within_0_03"] = all(model[c] >= base[c] - 0.03 for c in model)
            line["mean_at_least_baseline"] = line["model_mean"] >= line["baseline_mean"]
            seeds = sorted({r.get("seed", 0) for r in group})
            if len(seeds) > 1 and all("workdir" in r for r in group):
                ensemble = {c: seed_ensemble([r["workdir"] for r in group if r["held_out"] == c],
                                             f"test_{c}", n_boot) for c in model}
                line.update(
                    seeds=seeds, ensemble=ensemble,
                    ensemble_mean=_mean(e["value"] for e in ensemble.values()),
                    ensemble_every_center_within_0_03=all(
                        ensemble[c]["value"] >= base[c] - 0.03 for c in model))
                line["ensemble_mean_at_least_baseline"] = (line["ensemble_mean"]
                                                           >= line["baseline_mean"])
        out.append(line)
    return out


def markdown(rows: list[dict]) -> str:
    def auc(e):
        return f"{e['value']:.3f} ({e['ci_low']:.3f}-{e['ci_high']:.3f})"

    lines = ["| candidate | labels | held out | model | pca_lr on its features | "
             "hand-made baseline | train s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        labels = (f"permuted #{r.get('data_seed', 0)}" if r["permuted_labels"]
                  else f"real, seed {r['seed']}" if r.get("seed", 0) else "real")
        lines.append(f"| {r['candidate']} | {labels} | "
                     f"{r['held_out']} | {auc(r['model'])} | {auc(r['pca_lr'])} | "
                     f"{auc(r['baseline'])} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=300)
    parser.add_argument("--centers", type=int, default=3)
    parser.add_argument("--phantom_seed", type=int, default=1)
    parser.add_argument("--shape", default="96,96,48")
    parser.add_argument("--cohort", help="an existing cohort instead of a new phantom")
    parser.add_argument("--candidates", default="demo,resnet_kinetic_mm")
    parser.add_argument("--control", default="demo",
                        help="candidates also trained on permuted labels")
    parser.add_argument("--permutations", type=int, default=3,
                        help="permuted-label runs per control candidate and centre")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps for every candidate (default: each its own)")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated training seeds for the real-label runs (the "
                             "control uses the first)")
    parser.add_argument("--n_boot", type=int, default=1000)
    parser.add_argument("--jsonl", help="also append every line to this file")
    parser.add_argument("--work", help="keep datasets and workdirs here (default: a temp dir)")
    parser.add_argument("--centers_held_out", default="",
                        help="comma-separated centres to hold out (default: every centre)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                        help="applied to every candidate's config, e.g. "
                             "train.learning_rate=3e-4 (repeatable)")
    args = parser.parse_args()
    names = [n for n in args.candidates.split(",") if n]
    controls = [n for n in args.control.split(",") if n]
    unknown = sorted(set(names + controls) - set(CANDIDATES))
    if unknown:
        parser.error(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}")
    try:
        overrides = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.override)}
    except ValueError as e:
        parser.error(f"--override takes KEY=JSON ({e})")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds needs distinct seeds, got {args.seeds!r}")

    import jax

    from her2jax.data import phantom

    def emit(line: dict) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(text + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work) if args.work else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        cohort = Path(args.cohort) if args.cohort else root / "cohort"
        if not args.cohort and not (cohort / "clinical.csv").is_file():
            phantom.write_cohort(cohort, patients=args.patients, centers=args.centers,
                                 seed=args.phantom_seed, shape=args.shape)
        centers = ([c for c in args.centers_held_out.split(",") if c] or
                   [phantom.center_name(k) for k in range(args.centers)])
        # A given cohort is described by its own table, not by the phantom flags (unused).
        with open(cohort / "clinical.csv", newline="") as f:
            patients = sum(1 for _ in csv.DictReader(f))
        emit(dict(bench="learning_setup", cohort=args.cohort or "phantom",
                  patients=patients, centers=centers,
                  phantom_seed=None if args.cohort else args.phantom_seed,
                  shape=None if args.cohort else args.shape, steps=args.steps, seeds=seeds, n_boot=args.n_boot,
                  permutations=args.permutations if controls else 0,
                  overrides=overrides,
                  candidates={n: CANDIDATES[n][1] for n in names}, jax=jax.__version__,
                  python=platform.python_version(), date=time.strftime("%Y-%m-%d")))
        rows = []
        jobs = ([(n, False, 0, s) for n in names for s in seeds] +
                [(n, True, k, seeds[0]) for n in controls for k in range(args.permutations)])
        for name, permute, data_seed, seed in jobs:
            for center in centers:
                row = run_one(name, cohort, root, center, permute=permute, steps=args.steps,
                              seed=seed, n_boot=args.n_boot, overrides=overrides,
                              data_seed=data_seed)
                rows.append(row)
                emit(row)
        for line in summarize(rows, n_boot=args.n_boot):
            emit(line)
        print(markdown(rows), file=sys.stderr)



def run_main(main) -> None:
    """Runs a benchmark's ``main``; a Her2jaxError (a bad cohort, dataset or override) ends
    it with one line and exit code 2, as the console scripts do."""
    from her2jax.errors import Her2jaxError

    try:
        main()
    except Her2jaxError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run_main(main)
