"""The phantom demo on a laptop CPU: a tiny ViT/8 on 32^3 FM-BCMRI crops, centre C held out."""

import ml_collections

from her2jax.data import recipes
from her2jax.models import factory


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = recipes.data_config("fmbcmri")
    config.data.recipe.shape = (32, 32, 32)
    config.data.test_centers = ("CENTER_C",)
    config.data.worker_count = 0
    config.model = factory.model_config("vit3d")
    config.model.vit.size = "tiny"
    return config
