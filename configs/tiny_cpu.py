"""A tiny ViT/8 on 32^3 FM-BCMRI crops (one z-scored phase, tight box resized), trained from
scratch, centre C held out: the smallest model of the ViT family, what most tests train. It was
the demo until 2026-12-03; the learning study (BENCHMARKS.md, "Learning") shows it does not
transfer to an unseen centre, which configs/demo_cpu.py does.

  her2jax --config=configs/tiny_cpu.py --workdir=DIR --config.data.data_dir=DATA
"""

import ml_collections

from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults.default_config("fmbcmri", "vit3d")
    config.data.recipe.shape = (32, 32, 32)
    config.data.test_centers = ("CENTER_C",)
    config.data.worker_count = 0
    config.model.vit.size = "tiny"
    config.train.batch_size = 16
    config.train.steps = 300
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 20
    config.train.layer_decay = 1.0
    config.train.eval_every = 50
    config.train.save_every = 50
    config.train.eval_batch_size = 32
    return config
