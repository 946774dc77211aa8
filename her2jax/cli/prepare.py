"""her2jax-prepare: validate a NIfTI cohort and write the TFDS/ArrayRecord dataset.

  her2jax-prepare --cohort=DIR|manifest.csv --data_dir=DIR [--config=configs/X.py]
                  [--skip_invalid] [--validate_only] [--overwrite] [--workers=N]

The preprocessing recipe and the clinical column names come from the config's ``data``
section (the same file training reads), so training always knows how its data were made.
Without ``--config`` the default data section (FM-BCMRI recipe) is used.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from her2jax import cli
from her2jax.data import prepare, recipes
from her2jax.errors import Her2jaxError

_COHORT = flags.DEFINE_string("cohort", None, "MAMA-MIA-layout cohort directory or manifest CSV.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the dataset is written.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file whose `data` section holds the recipe and column names.",
    lock_config=True)
_SKIP_INVALID = flags.DEFINE_bool(
    "skip_invalid", False, "Write the valid cases; list the invalid ones in rejected.csv.")
_VALIDATE_ONLY = flags.DEFINE_bool(
    "validate_only", False, "Check and preprocess every case, write the reports, build nothing.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a dataset in --data_dir made from another cohort or recipe.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Preprocessing processes (0: one per core).",
                                lower_bound=0)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_REQUIRE_LABELS = flags.DEFINE_bool(
    "require_labels", True, "Refuse a table without a label column (--norequire_labels "
    "prepares an unlabelled cohort, e.g. for --mode=pretrain).")


def _main(argv: list[str]) -> None:
    del argv
    for flag in (_COHORT, _DATA_DIR):
        if not flag.value:
            raise Her2jaxError(f"--{flag.name} is required")
    data_config = _CONFIG.value.data if _CONFIG.value is not None else recipes.data_config()
    result = prepare.prepare(_COHORT.value, _DATA_DIR.value, data_config,
                             skip_invalid=_SKIP_INVALID.value,
                             validate_only=_VALIDATE_ONLY.value, overwrite=_OVERWRITE.value,
                             workers=_WORKERS.value, progress=_PROGRESS.value,
                             require_labels=_REQUIRE_LABELS.value)
    print(result.summary(), flush=True)


def main() -> None:
    cli.run(_main)


if __name__ == "__main__":
    main()
