"""Volumes per second from ArrayRecord through the grain training pipeline.

  python benchmarks/bench_loader.py [--examples=512] [--batch=64] [--shape=48] [--channels=3]

Writes a synthetic her2_dce_mri dataset (float16 crops, bytes encoding) to a temporary
directory, then reads global training batches with 0, 1 and 2 grain workers exactly as
training does (permutation from (seed, step), random access, batching). Prints one JSON line
per worker count, with the CPU time the process tree spent. The target is >= 500
volumes/s per core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from her2jax.data import pipeline, tfds_builder


def build_synthetic(root: Path, examples: int, shape: int, channels: int) -> Path:
    rng = np.random.default_rng(0)

    def load(i: int):
        return lambda: {
            "image": rng.standard_normal((shape, shape, shape, channels)).astype(np.float16),
            "mask": np.zeros((shape,) * 3, np.uint8),
            "patient_id": f"P{i:05d}", "center": "A", "ihc": "1+", "ish": "", "her2": 0,
            "clinical": "{}", "recipe": "{}",
            "box": np.zeros((3, 2), np.int32), "crop_affine": np.eye(4),
            "source_shape": np.zeros(3, np.int32), "source_affine": np.eye(4),
        }

    return tfds_builder.build(
        root, config_name="bench", description="loader benchmark", shape=(shape,) * 3,
        num_channels=channels,
        examples=[tfds_builder.Example(f"P{i:05d}", "A", load(i)) for i in range(examples)])


def _tree_cpu_seconds() -> float:
    """User + system CPU time of this process and its live children (grain workers)."""
    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shape", type=int, default=48)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="timed batches per run")
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        version_dir = build_synthetic(Path(tmp), args.examples, args.shape, args.channels)
        build_s = time.perf_counter() - t0
        dataset = pipeline.Dataset(
            version_dir, {"image_shape": [args.shape] * 3 + [args.channels]}, ())
        split = pipeline.Split(
            name="train", tfds_splits=("A",),
            keys=np.stack([np.zeros(args.examples, np.int64), np.arange(args.examples)], 1),
            labels=np.zeros(args.examples, np.int32),
            patient_ids=tuple(f"P{i:05d}" for i in range(args.examples)),
            centers=("A",) * args.examples, class_names=("a", "b"))
        for workers in (int(w) for w in args.workers.split(",")):
            batches = pipeline.train_batches(
                dataset, split, global_batch_size=args.batch, seed=0, start_step=0,
                stop_step=args.steps + 3, worker_count=workers, prefetch=4)
            for _ in range(3):  # warm-up: worker start, file open, first prefetch
                next(batches)
            cpu0 = _tree_cpu_seconds()
            t0 = time.perf_counter()
            n = sum(len(next(batches)["image"]) for _ in range(args.steps))
            seconds = time.perf_counter() - t0
            cpu = _tree_cpu_seconds() - cpu0
            print(json.dumps({
                "bench": "loader", "workers": workers, "batch": args.batch,
                "volume": [args.shape] * 3 + [args.channels], "dtype": "float16",
                "volumes_per_s": round(n / seconds, 1),
                "volumes_per_s_per_worker": round(n / seconds / max(workers, 1), 1),
                # CPU seconds of this process and its grain workers: volumes per core-second.
                "cpu_s": round(cpu, 2), "volumes_per_cpu_s": round(n / cpu, 1),
                "mb_per_s": round(n * args.shape ** 3 * args.channels * 2 / seconds / 1e6, 1),
                "build_s": round(build_s, 2), "cores": os.cpu_count(),
                "python": platform.python_version(),
            }), flush=True)


if __name__ == "__main__":
    main()
