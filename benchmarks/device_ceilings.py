"""The two ceilings of the device JAX runs on: a bf16 matrix product's rate and a device copy's
bandwidth (the method's "two numbers", measured rather than taken from the datasheet).

  python benchmarks/device_ceilings.py [--n=8192] [--copy_mib=4096] [--repeat=10] [--smoke]

Prints one JSON line per ceiling: ``matmul_bf16`` (n x n x n on normal random data,
2 n^3 FLOPs per product; TFLOP/s of the median of ``--repeat`` timed products after 3
warm-up ones) and ``copy`` (``x + 1`` over a bfloat16 array of ``--copy_mib`` MiB: bytes read
plus bytes written per second, GB/s). Each timing blocks on the result of every call, so
launch gaps are in it (negligible at these sizes on a GPU). ``bench_train.py`` reports MFU
against the datasheet peak; these lines let BENCHMARKS.md state it against the measured one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time


def _timed(fn, *args, repeat: int) -> float:
    """Median seconds of one call after 3 warm-up calls (compilation included there)."""
    import jax

    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--copy_mib", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="CPU size: n 256, 16 MiB copy")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.copy_mib, args.repeat = 256, 16, 3

    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    common = {"device": f"{device.platform}: {device.device_kind}",
              "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    ka, kb, kc = jax.random.split(jax.random.key(0), 3)
    n = args.n
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    seconds = _timed(jax.jit(jnp.matmul), a, b, repeat=args.repeat)
    print(json.dumps({"name": "matmul_bf16", "n": n, "seconds": seconds,
                      "tflops_per_s": round(2 * n ** 3 / seconds / 1e12, 2), **common}),
          flush=True)
    del a, b

    elements = args.copy_mib * 2 ** 20 // 2
    x = jax.random.normal(kc, (elements,), jnp.bfloat16)
    seconds = _timed(jax.jit(lambda x: x + 1), x, repeat=args.repeat)
    moved = 2 * elements * 2  # read once, written once, 2 bytes each
    print(json.dumps({"name": "copy", "mib": args.copy_mib, "seconds": seconds,
                      "gb_per_s": round(moved / seconds / 1e9, 1), **common}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
