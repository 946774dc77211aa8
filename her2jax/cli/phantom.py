"""her2jax-phantom: write the synthetic multi-centre DCE-MRI cohort (the embedded default).

  her2jax-phantom --out=DIR [--patients=120] [--centers=3] [--seed=0] [--shape=128,128,64]
                  [--phases=5]

Writes the MAMA-MIA layout (images/, segmentations/expert/, clinical.csv) described in
``her2jax.data.phantom`` and prints a one-line summary. ``--shape=256,256,96`` is the realistic
size used by benchmarks. An existing phantom in ``--out`` is replaced; any other non-empty
directory is refused.
"""

from __future__ import annotations

import pandas as pd
from absl import flags

from her2jax import cli
from her2jax.data import phantom
from her2jax.errors import Her2jaxError
from her2jax.labels import CLASS_NAMES

_OUT = flags.DEFINE_string("out", None, "Directory to write the cohort into.")
_PATIENTS = flags.DEFINE_integer("patients", 120, "Number of patients, over all centres.")
_CENTERS = flags.DEFINE_integer("centers", 3, "Number of centres (CENTER_A, CENTER_B, ...).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed; the same flags give identical files.")
_SHAPE = flags.DEFINE_string("shape", "128,128,64",
                             "Image array shape X,Y,Z (256,256,96 is realistic).")
_PHASES = flags.DEFINE_integer("phases", 5, "Phases per case: pre-contrast + >= 3 post-contrast.")


def summary(table: pd.DataFrame) -> str:
    """One line: patients per centre and per HER2 class ('undetermined' = no label)."""
    short = {name: name.removeprefix("HER2-") for name in CLASS_NAMES["her2_3class"]}
    parts = []
    for center, rows in table.groupby("center", sort=True):
        counts = rows.her2_class.replace("", "undetermined").map(lambda c: short.get(c, c))
        counts = counts.value_counts()
        order = [*short.values(), "undetermined"]
        detail = " ".join(f"{name}={counts.get(name, 0)}" for name in order if counts.get(name, 0))
        parts.append(f"{center} {len(rows)} ({detail})")
    return f"{len(table)} patients: " + ", ".join(parts)


def _main(argv: list[str]) -> None:
    del argv
    if not _OUT.value:
        raise Her2jaxError("--out is required (the directory to write the cohort into)")
    root = phantom.write_cohort(_OUT.value, patients=_PATIENTS.value, centers=_CENTERS.value,
                                seed=_SEED.value, shape=_SHAPE.value, phases=_PHASES.value)
    table = pd.read_csv(root / "clinical.csv", dtype=str, keep_default_na=False)
    print(f"wrote {root}: {summary(table)}", flush=True)


def main() -> None:
    cli.run(_main)


if __name__ == "__main__":
    main()
