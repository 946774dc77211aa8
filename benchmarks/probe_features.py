"""What do an encoder's frozen features encode, and what does the study's protocol make of it?

  python benchmarks/probe_features.py --work=DIR --cohort=COHORT --candidate=vit_tumour_pool
      [--encoder=PRETRAINED_ENCODER_DIR] [--seed=0] [--n_components=16]
      [--centers_held_out=CENTER_A,CENTER_B,CENTER_C] [--jsonl=FILE]

For each held-out centre, the study's protocol (frozen features -> PCA -> logistic regression,
``bench_pretrain.pca_lr_run``) on the candidate's encoder (``bench_learning.CANDIDATES``), from
``--encoder`` or from random initialisation (``model.seed=--seed``); then, on the features the
run saved (``features/train.npz`` and ``features/test_<centre>.npz``) and the hand-made
baseline's five features of the same patients (the prepared dataset's ``kinetic_features.csv``):

* ``encoded``: for each hand-made feature, the R^2 on the held-out centre of a ridge regression
  (standardised features, ridge strength chosen by leave-one-out on the training patients) from
  the frozen features to that feature. Near 1: the features hold it linearly; near 0 or below:
  they do not (or not in a way that carries over to the unseen scanner);
* ``pca_lr``: the protocol's held-out macro AUC as fitted; ``pca_lr_plus``: the same with one
  hand-made feature appended to the PCA components (standardised), feature by feature: how much
  AUC each feature would add;
* ``baseline`` and ``baseline_without``: the hand-made baseline's AUC, and without each feature;
* ``tuned``: two linear readouts with a setting chosen by 5-fold cross-validation on the training
  patients (macro AUC one-vs-rest): ``lr_all``, a logistic regression on all the standardised
  features with its strength C from 1e-4 .. 10; ``pca``, the protocol with its number of
  components from 2, 4, 8, 16, 32 (``pca_k`` the one chosen). Whether another readout of the
  same features than PCA 16 would get more from the labelled cases.

Cases with an undefined hand-made feature are left out of every fit and score here, so the AUCs
can differ in the third digit from those the workdirs' own ``eval/`` report. One JSON line per
centre, then a Markdown table on stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def encoded(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
            test_y: np.ndarray) -> float:
    """R^2 on (test_x, test_y) of a standardised ridge regression fitted on the training pairs
    (its strength from ``RidgeCV``'s leave-one-out over 1e-2 .. 1e4)."""
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    model.fit(train_x, train_y)
    return float(r2_score(test_y, model.predict(test_x)))


def _macro_auc(model, train_x, train_labels, test_x, test_labels, class_names) -> float:
    from her2jax.evaluate import metrics

    model.fit(train_x, train_labels)
    summary = metrics.summarize(test_labels, model.predict_proba(test_x), class_names, n_boot=0)
    return float(summary["macro_auc"]["value"])


def probe(train: dict, test: dict, kinetic: dict, *, n_components: int, seed: int = 0) -> dict:
    """The module's figures for one held-out centre.

    Args:
      train, test: a pca_lr workdir's ``features/<split>.npz`` contents (``features``,
        ``labels``, ``patient_ids``, ``class_names``).
      kinetic: ``kinetic_features.read_table``'s ``{patient_id: [5] float}``.
    """
    from her2jax.data import kinetic_features
    from her2jax.train import baseline, pca_lr

    names = kinetic_features.FEATURES
    class_names = [str(c) for c in train["class_names"]]
    parts = {}
    for split, arrays in (("train", train), ("test", test)):
        hand = kinetic_features.matrix(kinetic, [str(p) for p in arrays["patient_ids"]])
        keep = np.isfinite(hand).all(axis=1)
        parts[split] = (np.asarray(arrays["features"], np.float64)[keep], hand[keep],
                        np.asarray(arrays["labels"])[keep])
    (f_tr, h_tr, y_tr), (f_te, h_te, y_te) = parts["train"], parts["test"]
    k = min(n_components, *f_tr.shape)
    out = {"n_train": int(len(y_tr)), "n_test": int(len(y_te)),
           "features": int(f_tr.shape[1]), "n_components": k,
           "encoded": {n: round(encoded(f_tr, h_tr[:, j], f_te, h_te[:, j]), 3)
                       for j, n in enumerate(names)}}
    protocol = pca_lr.make_sklearn(k, seed=seed, balanced=True)
    out["pca_lr"] = round(_macro_auc(protocol, f_tr, y_tr, f_te, y_te, class_names), 4)
    c_tr, c_te = protocol[:-1].transform(f_tr), protocol[:-1].transform(f_te)   # fitted above
    # The components and one hand-made feature, standardised, into the baseline's classifier.
    out["pca_lr_plus"] = {
        n: round(_macro_auc(baseline.make_sklearn(balanced=True), np.c_[c_tr, h_tr[:, j]],
                            y_tr, np.c_[c_te, h_te[:, j]], y_te, class_names), 4)
        for j, n in enumerate(names)}
    out["baseline"] = round(_macro_auc(baseline.make_sklearn(balanced=True), h_tr, y_tr, h_te,
                                       y_te, class_names), 4)
    out["tuned"] = tuned_readouts(f_tr, y_tr, f_te, y_te, class_names, seed=seed)
    out["baseline_without"] = {
        n: round(_macro_auc(baseline.make_sklearn(balanced=True), np.delete(h_tr, j, axis=1),
                            y_tr, np.delete(h_te, j, axis=1), y_te, class_names), 4)
        for j, n in enumerate(names)}
    return out


def tuned_readouts(train_x, train_labels, test_x, test_labels, class_names, *,
                   seed: int = 0) -> dict:
    """``probe``'s ``tuned`` entry (see the module)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = StratifiedKFold(5, shuffle=True, random_state=seed)

    def lr():
        return LogisticRegression(class_weight="balanced", max_iter=5000)

    lr_all = GridSearchCV(make_pipeline(StandardScaler(), lr()),
                          {"logisticregression__C": list(np.logspace(-4, 1, 11))}, cv=folds,
                          scoring="roc_auc_ovr")
    ks = [k for k in (2, 4, 8, 16, 32) if k <= min(train_x.shape[1], len(train_labels) * 4 // 5)]
    pca = GridSearchCV(make_pipeline(StandardScaler(), PCA(random_state=seed), lr()),
                       {"pca__n_components": ks}, cv=folds, scoring="roc_auc_ovr")
    out = {"lr_all": round(_macro_auc(lr_all, train_x, train_labels, test_x, test_labels,
                                      class_names), 4),
           "pca": round(_macro_auc(pca, train_x, train_labels, test_x, test_labels,
                                   class_names), 4)}
    out["lr_all_c"] = float(lr_all.best_params_["logisticregression__C"])
    out["pca_k"] = int(pca.best_params_["pca__n_components"])
    return out


def probe_workdir(workdir: Path, *, n_components: int) -> dict:
    """:func:`probe` of a finished pca_lr workdir (its one test centre)."""
    import ml_collections

    from her2jax.data import kinetic_features, pipeline

    config = json.loads((workdir / "config.json").read_text())["config"]
    (center,) = config["data"]["test_centers"]
    data = ml_collections.ConfigDict(config["data"])
    dataset = pipeline.open_dataset(data.data_dir, data)
    kinetic = kinetic_features.read_table(dataset.path)
    if kinetic is None:
        raise SystemExit(f"{dataset.path} has no {kinetic_features.FILE}: prepare it again")
    with np.load(workdir / "features" / "train.npz") as train, \
            np.load(workdir / "features" / f"test_{center}.npz") as test:
        return {"held_out": center, **probe(dict(train), dict(test), kinetic,
                                            n_components=n_components,
                                            seed=int(config["model"]["seed"]))}


def _table(lines: list[dict]) -> str:
    from her2jax.data import kinetic_features

    names = kinetic_features.FEATURES
    rows = ["| held out | R² " + " / ".join(names) + " | pca_lr | pca_lr + "
            + " / ".join(names) + " | baseline | baseline without " + " / ".join(names) + " |",
            "|---|---|---|---|---|---|"]
    for line in lines:
        rows.append("| {} | {} | {:.3f} | {} | {:.3f} | {} |".format(
            line["held_out"], " / ".join(f"{line['encoded'][n]:.2f}" for n in names),
            line["pca_lr"], " / ".join(f"{line['pca_lr_plus'][n]:.3f}" for n in names),
            line["baseline"], " / ".join(f"{line['baseline_without'][n]:.3f}" for n in names)))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--cohort", required=True, help="the labelled phantom")
    parser.add_argument("--candidate", default="vit_tumour_pool")
    parser.add_argument("--encoder", default="", help="a pretrained encoder directory "
                        "(pretrain's WORKDIR/encoder); '' = random initialisation")
    parser.add_argument("--seed", type=int, default=0, help="model.seed of random init")
    parser.add_argument("--n_components", type=int, default=16)
    parser.add_argument("--centers_held_out", default="CENTER_A,CENTER_B,CENTER_C")
    parser.add_argument("--jsonl")
    args = parser.parse_args()

    import jax

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_pretrain

    from her2jax.train import orbax_quirks

    orbax_quirks.install()
    bl = bench_pretrain._bench_learning()
    if args.candidate not in bl.CANDIDATES:
        parser.error(f"--candidate: one of {', '.join(bl.CANDIDATES)}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    setup = {"bench": "probe_features_setup", "candidate": args.candidate,
             "encoder": args.encoder, "seed": args.seed, "cohort": args.cohort,
             "python": platform.python_version(), "jax": jax.__version__,
             "date": time.strftime("%Y-%m-%d")}
    lines = []
    print(json.dumps(setup), flush=True)
    for center in [c for c in args.centers_held_out.split(",") if c]:
        _, workdir = bench_pretrain.pca_lr_run(bl, args.candidate, Path(args.cohort), work,
                                               center, args.encoder, 0, seed=args.seed)
        line = {"bench": "probe_features", "candidate": args.candidate,
                "encoder": args.encoder, "seed": args.seed,
                **probe_workdir(workdir, n_components=args.n_components)}
        lines.append(line)
        print(json.dumps(line), flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            for line in (setup, *lines):
                f.write(json.dumps(line) + "\n")
    print(_table(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
