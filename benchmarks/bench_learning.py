"""Does the engine learn? Validation macro AUC of the demo model on a phantom, per seed,
against the same runs with permuted training labels (a negative control).

  python benchmarks/bench_learning.py [--seeds=0,1,2,3,4] [--patients=300]

One phantom (2 centres, 48x48x24 voxels), prepared once with the `multiphase` recipe
(pre, first and second post-contrast phases, z-scored jointly: the kinetics stay visible)
at 24^3; validation is a seeded, stratified half of it (>= 140 labelled patients). For each
training seed: the tiny ViT of configs/demo_cpu.py trained 200 steps, best validation macro
AUC; then the same with `data.permute_train_labels`. One JSON line per run and a summary.
tests/test_learning.py runs one seed of this and asserts the threshold recorded in
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "kinetic"   # C1, C1 - C0, percent enhancement, signal enhancement ratio


def demo_config():
    spec = importlib.util.spec_from_file_location("demo_cpu", REPO / "configs" / "demo_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def learning_config(data_dir: Path, seed: int, permute: bool):
    """configs/demo_cpu.py on the learning phantom."""
    from her2jax.data import recipes

    config = demo_config()
    config.data.recipe = recipes.recipe_config(RECIPE)
    config.data.recipe.shape = (24, 24, 24)
    config.data.data_dir = str(data_dir)
    config.data.test_centers = ()
    config.data.val_fraction = 0.5
    config.data.permute_train_labels = permute
    config.train.update(dict(steps=200, batch_size=16, eval_every=25, save_every=200,
                             log_every=25, warmup_steps=20, seed=seed))
    config.model.seed = seed
    return config


def make_dataset(root: Path, patients: int, phantom_seed: int = 0) -> Path:
    """Phantom + prepared dataset; returns the data_dir."""
    from her2jax.data import phantom, prepare

    cohort = phantom.write_cohort(root / "cohort", patients=patients, centers=2,
                                  seed=phantom_seed, shape=(48, 48, 24))
    data_dir = root / "data"
    prepare.prepare(cohort, data_dir, learning_config(data_dir, 0, False).data, workers=0,
                    progress=False)
    return data_dir


def best_val_auc(data_dir: Path, workdir: Path, seed: int, permute: bool) -> float:
    from her2jax.train import loop

    result = loop.train(learning_config(data_dir, seed, permute), workdir, progress=False)
    return float(result.best_metric)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--patients", type=int, default=300)
    args = parser.parse_args()
    real, permuted = [], []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_dataset(Path(tmp), args.patients)
        for seed in (int(s) for s in args.seeds.split(",")):
            for permute, store in ((False, real), (True, permuted)):
                t0 = time.perf_counter()
                auc = best_val_auc(data_dir, Path(tmp) / f"run-{seed}-{permute}", seed, permute)
                store.append(auc)
                print(json.dumps({"bench": "learning", "seed": seed, "permuted_labels": permute,
                                  "best_val_macro_auc": round(auc, 4),
                                  "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    print(json.dumps({"bench": "learning_summary", "patients": args.patients,
                      "real_min": round(min(real), 4), "real_mean": round(sum(real) / len(real), 4),
                      "permuted_max": round(max(permuted), 4),
                      "permuted_mean": round(sum(permuted) / len(permuted), 4)}))


if __name__ == "__main__":
    main()
