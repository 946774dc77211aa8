"""The MoCo v3 pretraining step on this machine's devices, and what its two views cost.

  python benchmarks/bench_views.py [--configs=pretrain_tumour_region,pretrain_tiny]
      [--batch=N] [--steps=20] [--repeat=5] [--jsonl=FILE]

For each config file (``configs/<name>.py``), at its recipe's shape and channels and its
global batch: the engine's whole pretraining step (``pretrain.make_pretrain_step``: two views,
the momentum and query networks, the loss, AdamW) and the views alone (``pretrain.two_views``
of the same batch, jitted), each timed as the median over ``--repeat`` runs of ``--steps``
calls after a compiling warm-up. The batch is random volumes (a binary MASK channel where the
recipe has one); the views and the step do not depend on the values' distribution.

One JSON line per config (``step_ms``, ``volumes_per_s``, ``views_ms``, ``views_share``; the
her2jax imported, its commit when it is a git checkout), then a Markdown table on stderr.
Run it from two checkouts (``PYTHONPATH=OTHER_CHECKOUT``) to compare a change.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_config(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _commit(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _median_ms(run, steps: int, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run(steps)
        times.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(times)


def measure(name: str, *, batch: int | None, steps: int, repeat: int) -> dict:
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import her2jax
    from her2jax.data import pipeline
    from her2jax.train import pretrain
    from her2jax.train import step as step_lib

    config = load_config(name)
    batch = batch or int(config.train.batch_size)
    channels = tuple(config.data.recipe.channels)
    shape = (batch, *config.data.recipe.shape, len(channels))
    mesh = step_lib.make_mesh()
    rng = np.random.default_rng(0)
    image = rng.standard_normal(shape).astype(np.float16)
    for c in step_lib.mask_channels(channels):
        image[..., c] = rng.random(shape[:-1]) > 0.7
    host = {"image": image, "index": np.arange(batch, dtype=np.int32)}
    device_batch = pipeline.to_global(host, mesh)

    query = pretrain.build_query(config, bn_axis_name=step_lib.AXIS)
    optimizer = pretrain.make_optimizer(config, nnx.state(query, nnx.Param),
                                        total_steps=int(config.train.steps))
    graphdef, state = pretrain.create_state(query, optimizer, 0)
    views = pretrain.Views.from_config(config.pretrain, channels)
    p = config.pretrain
    step = pretrain.make_pretrain_step(graphdef, optimizer, mesh, views=views,
                                       temperature=float(p.temperature),
                                       base_momentum=float(p.momentum),
                                       total_steps=int(config.train.steps))
    carry = {"state": jax.device_put(state, NamedSharding(mesh, P()))}

    def run_steps(n):
        for _ in range(n):
            carry["state"], metrics = step(carry["state"], device_batch)
        jax.block_until_ready((carry["state"], metrics))

    keys = jax.random.split(jax.random.key(0), batch)
    make_views = jax.jit(lambda x, k: pretrain.two_views(x, k, views))
    image_only = jax.device_put(image)

    def run_views(n):
        for _ in range(n):
            out = make_views(image_only, keys)
        jax.block_until_ready(out)

    run_steps(2)
    run_views(2)
    step_ms = _median_ms(run_steps, steps, repeat)
    views_ms = _median_ms(run_views, steps, repeat)
    return dict(bench="views", config=name, batch=batch, shape=list(shape[1:]),
                channels=list(channels), steps=steps, repeat=repeat,
                step_ms=round(step_ms, 2), volumes_per_s=round(batch / step_ms * 1e3, 1),
                views_ms=round(views_ms, 2), views_share=round(views_ms / step_ms, 3),
                devices=jax.device_count(), device=jax.devices()[0].device_kind,
                her2jax=str(Path(her2jax.__file__).resolve().parents[1]),
                her2jax_commit=_commit(Path(her2jax.__file__).resolve().parents[1]),
                jax=jax.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="pretrain_tumour_region,pretrain_tiny")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch (default: each config's train.batch_size)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--jsonl", help="also append every line to this file")
    args = parser.parse_args()
    names = [n for n in args.configs.split(",") if n]
    missing = [n for n in names if not (REPO / "configs" / f"{n}.py").is_file()]
    if missing:
        parser.error(f"no configs/{missing[0]}.py")
    rows = []
    for name in names:
        row = measure(name, batch=args.batch, steps=args.steps, repeat=args.repeat)
        rows.append(row)
        text = json.dumps(row)
        print(text, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(text + "\n")
    print("| config | batch | shape | step ms | volumes/s | views ms | views' share |\n"
          "|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(f"| {r['config']} | {r['batch']} | {'x'.join(map(str, r['shape']))} | "
              f"{r['step_ms']} | {r['volumes_per_s']} | {r['views_ms']} | "
              f"{r['views_share']:.0%} |", file=sys.stderr)


if __name__ == "__main__":
    main()
