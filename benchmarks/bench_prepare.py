"""Cases per second per core of her2jax-prepare on realistic phantom cases.

  python benchmarks/bench_prepare.py [--cases=16] [--shape=256,256,96] [--phases=4]
                                      [--workers=1,2] [--recipe=fmbcmri]

Writes a phantom cohort (4 phases of 256x256x96 voxels by default, .nii.gz as a scanner
export would be), then runs the whole prepare (read + check NIfTI, preprocess, TFDS build,
index, reports, atomic move) once per worker count into a fresh data_dir. Prints one JSON
line per run. The target is >= 1 case/s per core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import nibabel
import numpy as np

from her2jax.data import phantom, prepare, recipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--shape", default="256,256,96")
    parser.add_argument("--phases", type=int, default=4)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--recipe", default="fmbcmri")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cohort = phantom.write_cohort(Path(tmp) / "cohort", patients=args.cases, centers=2,
                                      seed=0, shape=shape, phases=args.phases)
        phantom_s = time.perf_counter() - t0
        nbytes = sum(p.stat().st_size for p in cohort.rglob("*.nii.gz"))
        config = recipes.data_config(args.recipe)
        for workers in (int(w) for w in args.workers.split(",")):
            t0 = time.perf_counter()
            result = prepare.prepare(cohort, Path(tmp) / f"data{workers}", config,
                                     workers=workers, progress=False)
            seconds = time.perf_counter() - t0
            print(json.dumps({
                "bench": "prepare", "recipe": args.recipe, "workers": workers,
                "cases": result.num_cases, "volume": list(shape), "phases": args.phases,
                "seconds": round(seconds, 2),
                "cases_per_s": round(result.num_cases / seconds, 2),
                "cases_per_s_per_core": round(result.num_cases / seconds / workers, 2),
                "input_mb": round(nbytes / 1e6, 1), "phantom_write_s": round(phantom_s, 1),
                "cores": os.cpu_count(), "python": platform.python_version(),
                "numpy": np.__version__, "nibabel": nibabel.__version__,
            }), flush=True)


if __name__ == "__main__":
    main()
