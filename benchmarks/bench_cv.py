"""Cross-validation, the fold ensemble and test-time augmentation, measured on held-out centres.

  python benchmarks/bench_cv.py (--cohort=DIR | --data_dir=DIR) --work=DIR
      [--candidates=demo_2p5mm,resnet_kinetic_mm]
      [--centers_held_out=CENTER_A,CENTER_B,CENTER_C] [--folds=5] [--n_boot=1000]
      [--jsonl=FILE]

``--cohort``: the learning study's cohort, prepared here once per recipe the candidates use
(``--work``/``data_<fingerprint>``, as bench_learning.py does), so candidates of different
recipes (``demo`` at 2 mm, ``resnet_kinetic_mm`` at 2.5 mm) run in one command; or
``--data_dir``: one dataset already prepared with the recipe every candidate uses (the default
two share ``kinetic_mm`` at 24^3 x 2.5 mm). The candidates are ``bench_learning.CANDIDATES``. For each
candidate and held-out centre, one ``--mode=cv`` run (``cv.run``) on the other centres
(``--work``/``<candidate>``/``<centre>``; a finished one is reused), then, on the same
patients:

* out of fold: the pooled out-of-fold macro AUC, and the mean ± SD over folds;
* on the held-out centre: each fold model alone (their mean), the fold ensemble (mean of the
  probabilities), and the hand-made kinetic baseline fitted on every patient of the folds;
* the same with test-time augmentation (``--tta``: the 8 flips of the volume).

One JSON line per centre (and ``--jsonl``), then a Markdown table on stderr. The workdir is
left as a plain ``--mode=cv`` leaves it (without TTA).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def _bench_learning():
    spec = importlib.util.spec_from_file_location("bench_learning",
                                                  REPO / "benchmarks" / "bench_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def candidates() -> dict:
    """bench_learning.CANDIDATES: name -> (config builder, description)."""
    return _bench_learning().CANDIDATES


def dataset_for(name: str, *, cohort: str | None, data_dir: str | None, work: Path) -> str:
    """The dataset candidate ``name`` reads: ``data_dir`` as given, or ``cohort`` prepared
    with the candidate's recipe under ``work`` (once per recipe)."""
    if data_dir:
        return data_dir
    bl = _bench_learning()
    return bl.prepared_dir(Path(cohort), bl.CANDIDATES[name][0](), work)


def _auc(entry) -> dict:
    return {k: entry.get(k) for k in ("value", "ci_low", "ci_high")}


def measure(name: str, data_dir: str, work: Path, center: str, *, folds: int,
            n_boot: int) -> dict:
    import numpy as np

    from her2jax.train import cv

    config = candidates()[name][0]()
    config.data.data_dir = data_dir
    config.data.test_centers = (center,)
    workdir = work / name / center
    started = time.perf_counter()
    cv.run(config, workdir, folds=folds, n_boot=n_boot, progress=False)
    seconds = time.perf_counter() - started
    line = {"bench": "cv", "candidate": name, "held_out": center,
            "folds": folds, "n_boot": n_boot, "cv_seconds": round(seconds, 1)}
    split = f"test_{center}"
    for tta in (True, False):   # without TTA last: the workdir ends as --mode=cv leaves it
        oof = cv.write_oof(workdir, n_boot=n_boot, tta=tta)
        ensemble = cv.evaluate(workdir, n_boot=n_boot, tta=tta)[split]
        members = [m["macro_auc"] for m in ensemble["members"]]
        baseline = json.loads((workdir / "eval" / "baseline.json").read_text())
        key = "tta" if tta else "plain"
        line[key] = {
            "oof": _auc(oof["macro_auc"]), "oof_n": oof["n"],
            "over_folds": oof["over_folds"]["macro_auc"],
            "members": members, "members_mean": float(np.mean(members)),
            "ensemble": _auc(ensemble["macro_auc"]), "n_test": ensemble["n"],
            "tta_views": ensemble["tta_views"],
        }
        line["baseline"] = _auc(baseline["splits"][split]["macro_auc"])
    return line


def _fmt(entry) -> str:
    return (f"{entry['value']:.3f} ({entry['ci_low']:.3f}-{entry['ci_high']:.3f})"
            if entry.get("ci_low") is not None else f"{entry['value']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cohort", help="the cohort, prepared here per candidate's recipe")
    source.add_argument("--data_dir", help="one dataset prepared with every candidate's recipe")
    parser.add_argument("--work", required=True, help="the CV workdirs go here, one per centre")
    parser.add_argument("--candidates", default="demo_2p5mm,resnet_kinetic_mm",
                        help="names from bench_learning.CANDIDATES")
    parser.add_argument("--centers_held_out", default="CENTER_A,CENTER_B,CENTER_C")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--n_boot", type=int, default=1000)
    parser.add_argument("--jsonl", help="also append every line to this file")
    args = parser.parse_args()

    import jax

    from her2jax.train import orbax_quirks

    orbax_quirks.install()
    setup = {"bench": "cv_setup", "cohort": args.cohort, "data_dir": args.data_dir,
             "python": platform.python_version(),
             "jax": jax.__version__, "devices": str(jax.devices()[0].platform),
             "date": time.strftime("%Y-%m-%d")}
    lines = [setup]
    print(json.dumps(setup), flush=True)
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(setup) + "\n")
    for name in [c for c in args.candidates.split(",") if c]:
        data_dir = dataset_for(name, cohort=args.cohort, data_dir=args.data_dir,
                               work=Path(args.work))
        for center in [c for c in args.centers_held_out.split(",") if c]:
            line = measure(name, data_dir, Path(args.work), center, folds=args.folds,
                           n_boot=args.n_boot)
            line["data_dir"] = data_dir
            lines.append(line)
            print(json.dumps(line), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(line) + "\n")
    rows = ["| candidate | held out | out of fold (pooled) | over folds | fold models alone "
            "(mean) | ensemble | ensemble + TTA | fold models + TTA (mean) | hand-made "
            "baseline |", "|---|---|---|---|---|---|---|---|---|"]
    for line in lines[1:]:
        plain, tta = line["plain"], line["tta"]
        rows.append(f"| {line['candidate']} | {line['held_out']} | {_fmt(plain['oof'])} | "
                    f"{plain['over_folds']['mean']:.3f} ± {plain['over_folds']['sd']:.3f} | "
                    f"{plain['members_mean']:.3f} | {_fmt(plain['ensemble'])} | "
                    f"{_fmt(tta['ensemble'])} | {tta['members_mean']:.3f} | "
                    f"{_fmt(line['baseline'])} |")
    print("\n".join(rows), file=sys.stderr)


if __name__ == "__main__":
    _bench_learning().run_main(main)
