"""MedicalNet ResNet-18 on three phases (pre, first and second post-contrast) of a 64^3
tumour box with a 5 mm margin, z-scored jointly over all phases.

  her2jax-port --source=medicalnet --checkpoint=resnet_18.pth --in_channels=3 --out=weights/r18
  ... --config=configs/resnet18.py --config.model.pretrained=weights/r18
"""

import ml_collections

from her2jax.data import recipes
from her2jax.models import factory
from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = recipes.data_config("multiphase")
    config.data.recipe.shape = (64, 64, 64)
    config.model = factory.model_config("resnet3d")
    config.train = defaults.train_config()
    return config
