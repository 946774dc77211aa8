"""her2jax-compare: paired bootstrap of two models' macro-average AUC on the same patients.

  her2jax-compare A/predictions.csv B/predictions.csv [--bootstrap=2000] [--seed=0]
                  [--out=comparison.json] [--noprogress]
  (or --a=A.csv --b=B.csv)

Prints one line, e.g. ``macro-average AUC A 0.812 (95% CI 0.780–0.843), B 0.845 (...);
difference +0.033 (95% CI 0.004–0.061), p = 0.030``, and writes the result as JSON with
``--out``. Two files that do not hold the same patients, classes and labels are refused
(exit 2). The method is documented in ``her2jax.evaluate.compare``.
"""

from __future__ import annotations

from absl import flags

from her2jax import cli
from her2jax.errors import Her2jaxError
from her2jax.evaluate import compare, files

_A = flags.DEFINE_string("a", None, "predictions.csv of model A (the reference).")
_B = flags.DEFINE_string("b", None, "predictions.csv of model B (difference = B - A).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 2000, "Bootstrap resamples.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")
_OUT = flags.DEFINE_string("out", None, "Write the comparison as JSON here.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def _main(argv: list[str]) -> None:
    given = argv[1:]
    if given and (_A.value or _B.value):
        raise Her2jaxError("give the two files either as arguments or as --a / --b, not both")
    path_a, path_b = given if len(given) == 2 else (_A.value, _B.value)
    if len(given) == 1 or not (path_a and path_b):
        raise Her2jaxError("two predictions.csv files are needed: her2jax-compare A.csv B.csv")
    result = compare.compare_files(path_a, path_b, n_boot=_BOOTSTRAP.value,
                                   seed=_SEED.value, progress=_PROGRESS.value)
    print(compare.format_comparison(result), flush=True)
    if _OUT.value:
        files.write_metrics(_OUT.value, result)


def main() -> None:
    cli.run(_main, positional=2)


if __name__ == "__main__":
    main()
