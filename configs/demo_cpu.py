"""The phantom demo on a 2-core CPU: a tiny ViT/8 on 32^3 FM-BCMRI crops trained from
scratch, centre C held out for testing.

  her2jax --config=configs/demo_cpu.py --workdir=runs/demo/run --config.data.data_dir=runs/demo/data
"""

import ml_collections

from her2jax.data import recipes
from her2jax.models import factory
from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = recipes.data_config("fmbcmri")
    config.data.recipe.shape = (32, 32, 32)
    config.data.test_centers = ("CENTER_C",)
    config.data.worker_count = 0
    config.model = factory.model_config("vit3d")
    config.model.vit.size = "tiny"
    config.train = defaults.train_config()
    config.train.batch_size = 16
    config.train.steps = 300
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 20
    config.train.layer_decay = 1.0
    config.train.eval_every = 50
    config.train.save_every = 50
    config.train.eval_batch_size = 32
    return config
