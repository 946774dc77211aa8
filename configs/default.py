"""Default: the FM-BCMRI recipe (one channel, second post-contrast phase, tumour box -> 48^3,
per-crop z-score), three-class HER2 scheme, validation carved from the training centres.

  her2jax-prepare --cohort=DIR --data_dir=DIR --config=configs/default.py
  ... --config.data.recipe.margin_mm=5 --config.data.test_centers="('CENTER_C',)"
"""

import ml_collections

from her2jax.data import recipes


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = recipes.data_config("fmbcmri")
    return config
