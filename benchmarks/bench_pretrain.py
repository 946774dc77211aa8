"""Does MoCo v3 pretraining on other patients help on an unseen centre? One run, one phantom.

  python benchmarks/bench_pretrain.py --work=DIR [--cohort=DIR] [--unlabelled=DIR]
      [--candidate=vit_kinetic_mm] [--pretrain_steps=1000] [--pretrain_batch=32]
      [--centers_held_out=CENTER_A,CENTER_B,CENTER_C] [--random_seeds=0] [--n_boot=1000]
      [--jsonl=FILE]
      [--pretrain_override=pretrain.scale=0.0 ...] [--finetune_override=train.freeze_steps=100 ...]

1. Pretrain (``pretrain.run``) the candidate's encoder (``bench_learning.CANDIDATES``; default
   the tiny ViT/4 on the demo's inputs) on a second phantom cohort of other patients
   (``--unlabelled``, default phantom seed 3: its labels are never read), every centre.
2. On the labelled cohort (``--cohort``, default the learning study's phantom, seed 1), every
   centre held out in turn, the same encoder from random initialisation and from the
   pretrained one, on the same patients and splits:
   * the study's protocol: the frozen encoder's features -> PCA 16 -> logistic regression
     (``train.protocol='pca_lr'``); random initialisation with each of ``--random_seeds``
     (``model.seed``; the first is the one paired with the pretrained encoder), so that the
     pretrained encoder is compared with the spread of random ones, not with one draw;
   * fine-tuning: the candidate's training (``bench_learning.run_one``), changed for both
     initialisations alike by ``--finetune_override`` (e.g. ``train.freeze_steps``: a linear
     probe first, then fine-tuning);
   * the hand-made kinetic baseline of the same training patients;
   and the paired bootstrap difference pretrained - random (``her2jax-compare``'s method).

One JSON line per centre, then a Markdown table on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench_learning():
    spec = importlib.util.spec_from_file_location("bench_learning",
                                                  REPO / "benchmarks" / "bench_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _auc(entry) -> dict:
    return {k: None if entry[k] is None else round(entry[k], 4)
            for k in ("value", "ci_low", "ci_high")}


def pretrain_encoder(bl, candidate: str, unlabelled: Path, work: Path, *, steps: int,
                     batch: int, overrides: dict | None = None) -> tuple[str, dict]:
    """Pretrains the candidate's encoder on ``unlabelled`` (the pretraining config changed by
    ``overrides``, dotted keys -> values); (encoder dir, summary)."""
    from her2jax.train import defaults, pretrain

    config = bl.CANDIDATES[candidate][0]()
    config.data.data_dir = bl.prepared_dir(unlabelled, config, work / "unlabelled",
                                           require_labels=False)
    config.data.test_centers = ()
    config.data.worker_count = 0
    with config.unlocked():
        config.pretrain = defaults.pretrain_config()
    # Heads a few times wider than the tiny ViT's 48 features (MoCo v3: 4096 after 768); the
    # learning rate of configs/pretrain_tiny.py (a tiny model and a short run: MoCo v3's
    # 1.5e-4 x batch / 256 is ViT-B's for 300 epochs).
    config.pretrain.update(dim=64, mlp_dim=256, knn_k=10)
    config.train.update(batch_size=batch, steps=steps, warmup_steps=max(steps // 10, 1),
                        learning_rate=1e-3, weight_decay=0.1,
                        grad_clip=0.0, layer_decay=1.0, eval_every=max(steps // 5, 1),
                        save_every=max(steps // 5, 1), log_every=max(steps // 50, 1),
                        eval_batch_size=32)
    bl.apply_overrides(config, overrides or {})
    # Its own workdir per setting: a finished run in the same folder would be reused.
    name = f"pretrain-{candidate}-s{steps}-b{batch}"
    if overrides:
        digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()
        name += f"-{digest[:8]}"
    t0 = time.perf_counter()
    result = pretrain.run(config, work / name, progress=False)
    return result["encoder"], {"steps": result["steps"], "loss": result["loss"],
                               "knn_macro_auc": result["knn_macro_auc"],
                               "seconds": round(time.perf_counter() - t0, 1),
                               "learning_rate": config.train.learning_rate, "batch": batch,
                               "overrides": overrides or {}}


def pca_lr_run(bl, candidate: str, cohort: Path, work: Path, center: str, encoder: str,
               n_boot: int, seed: int = 0) -> tuple[dict, Path]:
    """The study's protocol on the candidate's frozen encoder (``encoder`` '' = random init
    drawn with ``seed``)."""
    import tempfile

    from her2jax.train import pca_lr

    config = bl.CANDIDATES[candidate][0]()
    config.data.data_dir = bl.prepared_dir(cohort, config, work)
    config.data.test_centers = (center,)
    config.data.worker_count = 0
    config.train.protocol = "pca_lr"
    config.model.pretrained = encoder
    config.model.seed = seed
    workdir = Path(tempfile.mkdtemp(dir=work, prefix=f"pca_lr-{center}-"))
    summaries = pca_lr.fit(config, workdir, n_boot=n_boot)
    return _auc(summaries[f"test_{center}"]["macro_auc"]), workdir


def paired(a: Path, b: Path, split: str, n_boot: int) -> dict:
    from her2jax.evaluate import compare

    result = compare.compare_files(a / "eval" / split / "predictions.csv",
                                   b / "eval" / split / "predictions.csv", n_boot=n_boot)
    diff = result["difference"]
    return {"value": round(diff["value"], 4), "ci_low": round(diff["ci_low"], 4),
            "ci_high": round(diff["ci_high"], 4), "p": result.get("p_value")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True)
    parser.add_argument("--cohort", help="the labelled phantom (default: written, seed 1)")
    parser.add_argument("--unlabelled", help="the pretraining phantom (default: written, "
                        "seed 3)")
    parser.add_argument("--candidate", default="vit_kinetic_mm")
    parser.add_argument("--pretrain_steps", type=int, default=1000)
    parser.add_argument("--pretrain_batch", type=int, default=32)
    parser.add_argument("--centers_held_out", default="CENTER_A,CENTER_B,CENTER_C")
    parser.add_argument("--random_seeds", default="0", help="model.seed of each random "
                        "initialisation for pca_lr (comma-separated; the first is paired)")
    parser.add_argument("--n_boot", type=int, default=1000)
    parser.add_argument("--jsonl")
    parser.add_argument("--pretrain_override", action="append", default=[],
                        metavar="KEY=JSON", help="a change to the pretraining config, e.g. "
                        "pretrain.crop_scale=[0.8,1.0] (repeatable)")
    parser.add_argument("--finetune_override", action="append", default=[],
                        metavar="KEY=JSON", help="a change to the fine-tuning config of both "
                        "initialisations, e.g. train.freeze_steps=100 (repeatable)")
    args = parser.parse_args()
    try:
        overrides, finetune = ({k: json.loads(v) for k, v in (o.split("=", 1) for o in given)}
                               for given in (args.pretrain_override, args.finetune_override))
    except ValueError as e:
        parser.error(f"--pretrain_override and --finetune_override take KEY=JSON ({e})")
    try:
        random_seeds = [int(x) for x in args.random_seeds.split(",") if x]
    except ValueError:
        parser.error(f"--random_seeds takes integers, got {args.random_seeds!r}")
    if not random_seeds:
        parser.error("--random_seeds needs at least one seed")

    import jax

    from her2jax.data import phantom
    from her2jax.train import orbax_quirks

    orbax_quirks.install()
    bl = _bench_learning()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cohorts = {}
    for name, given, seed in (("labelled", args.cohort, 1), ("unlabelled", args.unlabelled, 3)):
        path = Path(given) if given else work / f"cohort_seed{seed}"
        if not given and not path.exists():
            phantom.write_cohort(path, patients=300, centers=3, seed=seed, shape=(96, 96, 48))
        cohorts[name] = path
    encoder, pretrained = pretrain_encoder(bl, args.candidate, cohorts["unlabelled"], work,
                                           steps=args.pretrain_steps, batch=args.pretrain_batch,
                                           overrides=overrides)
    lines = [{"bench": "pretrain_setup", "candidate": args.candidate,
              "cohorts": {k: str(v) for k, v in cohorts.items()}, "pretraining": pretrained,
              "finetune_overrides": finetune, "random_seeds": random_seeds,
              "python": platform.python_version(), "jax": jax.__version__,
              "date": time.strftime("%Y-%m-%d")}]
    print(json.dumps(lines[0]), flush=True)
    for center in [c for c in args.centers_held_out.split(",") if c]:
        split = f"test_{center}"
        line = {"bench": "pretrain", "candidate": args.candidate, "held_out": center}
        runs = {}
        if len(random_seeds) > 1:
            line["pca_lr_random_seeds"] = {
                str(seed): pca_lr_run(bl, args.candidate, cohorts["labelled"], work, center,
                                      "", args.n_boot, seed=seed)[0]
                for seed in random_seeds[1:]}
        for variant, path in (("random", ""), ("pretrained", encoder)):
            auc, runs[("pca_lr", variant)] = pca_lr_run(bl, args.candidate, cohorts["labelled"],
                                                        work, center, path, args.n_boot,
                                                        seed=random_seeds[0])
            line[f"pca_lr_{variant}"] = auc
            tuned = bl.run_one(args.candidate, cohorts["labelled"], work, center,
                               permute=False, steps=None, seed=0, n_boot=args.n_boot,
                               overrides={**finetune, "model.pretrained": path})
            runs[("tuned", variant)] = Path(tuned["workdir"])
            line[f"tuned_{variant}"] = tuned["model"]
            line["baseline"] = tuned["baseline"]
        for protocol in ("pca_lr", "tuned"):
            line[f"{protocol}_difference"] = paired(runs[(protocol, "random")],
                                                    runs[(protocol, "pretrained")], split,
                                                    args.n_boot)
        lines.append(line)
        print(json.dumps(line), flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)

    def fmt(e):
        return f"{e['value']:.3f} ({e['ci_low']:.3f}-{e['ci_high']:.3f})"

    rows = ["| held out | pca_lr random | pca_lr pretrained | difference | fine-tuned random | "
            "fine-tuned pretrained | difference | hand-made baseline |",
            "|---|---|---|---|---|---|---|---|"]
    for x in lines[1:]:
        rows.append(f"| {x['held_out']} | {fmt(x['pca_lr_random'])} | "
                    f"{fmt(x['pca_lr_pretrained'])} | {fmt(x['pca_lr_difference'])} | "
                    f"{fmt(x['tuned_random'])} | {fmt(x['tuned_pretrained'])} | "
                    f"{fmt(x['tuned_difference'])} | {fmt(x['baseline'])} |")
    for x in lines[1:]:
        if "pca_lr_random_seeds" in x:
            values = [x["pca_lr_random"]["value"]] + [
                v["value"] for v in x["pca_lr_random_seeds"].values()]
            rows.append(f"{x['held_out']}: pca_lr random init over {len(values)} seeds "
                        f"{min(values):.3f}-{max(values):.3f}, mean "
                        f"{sum(values) / len(values):.3f}")
    print("\n".join(rows), file=sys.stderr)


if __name__ == "__main__":
    _bench_learning().run_main(main)
