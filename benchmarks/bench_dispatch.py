"""Host time per training-step call spent on the train state's pytree, not on the device.

  python benchmarks/bench_dispatch.py [--configs=vit_b8_b128,resnet18_b32] [--calls=30]

``jit`` flattens its arguments and rebuilds its results on the host at every call; when that
takes longer than the device's step, the device waits for Python. This measures it for the
real ``TrainState`` of a benchmark configuration (``bench_train.make_config``: parameters
drawn on the host, the config's optimizer) three ways, each a JSON line:

  optimizer      the state as her2jax builds it (one optimizer; layer-wise decay as per-leaf
                 learning-rate scales)
  grouped        the same optimizer written the textbook way, one optax group per layer
                 scale through ``optax.partition`` (what her2jax did before 2026-11-27)
  flat_list      the state's leaves as one flat list (the floor: C++ flattening only)

Fields: ``state_nodes`` (pytree nodes), ``flatten_ms`` / ``unflatten_ms``
(``jax.tree.flatten`` / ``unflatten`` of the state, or of the list), ``call_ms`` (host time
per call of a jitted, donated step that only increments ``step``: flatten + dispatch +
rebuild, with the device doing next to nothing; median over ``--calls``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def grouped_optimizer(config, params):
    """Layer-wise decay as one optax AdamW per layer scale (``optax.partition``)."""
    import jax
    import optax

    from her2jax.train import optim

    t = config.train
    schedule = optim.learning_rate_schedule(t, t.steps)
    ids = optim.layer_ids(params)
    num_layers = max(jax.tree.leaves(ids))
    mask = optim.weight_decay_mask(params)
    groups = {}
    for layer in sorted(set(jax.tree.leaves(ids))):
        scale = t.layer_decay ** (num_layers - layer)
        groups[f"layer{layer}"] = optax.adamw(
            lambda step, scale=scale: schedule(step) * scale, b1=t.b1, b2=t.b2,
            weight_decay=t.weight_decay, mask=mask)
    labels = jax.tree.map(lambda layer: f"layer{layer}", ids)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), optax.partition(groups, labels))


def measure(name: str, calls: int) -> list[dict]:
    import bench_train
    import jax
    from flax import nnx

    from her2jax.train import optim
    from her2jax.train import state as state_lib

    config = bench_train.make_config(name, accelerator=False, dtype="float32")
    lines = []
    for kind in ("optimizer", "grouped", "flat_list"):
        model = bench_train.host_initialised_model(config)
        params = nnx.state(model, nnx.Param)
        tx = (grouped_optimizer(config, params) if kind == "grouped" else
              optim.make_optimizer(config.train, params, total_steps=config.train.steps))
        _, state = state_lib.create(model, tx, 0)
        leaves, treedef = jax.tree.flatten(state)
        tree = list(leaves) if kind == "flat_list" else state
        tree_leaves, tree_def = jax.tree.flatten(tree)
        flatten_ms = _median_ms(lambda tree=tree: jax.tree.flatten(tree), calls)
        unflatten_ms = _median_ms(
            lambda d=tree_def, x=tree_leaves: jax.tree.unflatten(d, x), calls)
        if kind == "flat_list":
            step = jax.jit(lambda xs: [xs[0] + 1, *xs[1:]], donate_argnums=0)
            carry = [list(leaves)]
        else:
            step = jax.jit(lambda s: s.replace(step=s.step + 1), donate_argnums=0)
            carry = [state]
        # The step field leads the state's leaves in both forms.
        carry[0] = step(carry[0])
        jax.block_until_ready(carry[0])

        def call(step=step, carry=carry):
            carry[0] = step(carry[0])

        call_ms = _median_ms(call, calls)
        jax.block_until_ready(carry[0])
        nodes = len(leaves) if kind == "flat_list" else treedef.num_nodes
        lines.append({
            "name": f"{name}/{kind}", "config": name, "state": kind, "state_leaves": len(leaves),
            "state_nodes": nodes, "layer_decay": config.train.layer_decay,
            "flatten_ms": round(flatten_ms, 3), "unflatten_ms": round(unflatten_ms, 3),
            "call_ms": round(call_ms, 3), "calls": calls,
            "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")})
        print(json.dumps(lines[-1]), flush=True)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="vit_b8_b128,resnet18_b32")
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args(argv)
    import jax

    jax.config.update("jax_platforms", "cpu")  # the host's side is what is measured
    for name in args.configs.split(","):
        measure(name, args.calls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
