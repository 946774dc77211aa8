"""The phantom demo on a laptop CPU: FM-BCMRI recipe at 32^3, centre C held out for test."""

import ml_collections

from her2jax.data import recipes


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = recipes.data_config("fmbcmri")
    config.data.recipe.shape = (32, 32, 32)
    config.data.test_centers = ("CENTER_C",)
    config.data.worker_count = 0
    return config
