"""FM-BCMRI's linear probe: the pretrained ViT-B/8 frozen, the head trained with SGD
(lr 0.1, momentum 0.9, batch 8, no weight decay), as in the FM-BCMRI repository.

  her2jax --config=configs/linear_probe.py --workdir=runs/probe \
      --config.data.data_dir=DATA --config.model.pretrained=weights/fmbcmri
"""

import ml_collections

from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults.default_config("fmbcmri", "vit3d")
    config.train.freeze = "encoder"
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.1
    config.train.momentum = 0.9
    config.train.weight_decay = 0.0
    config.train.layer_decay = 1.0
    config.train.batch_size = 8
    config.train.warmup_steps = 0
    config.train.grad_clip = 0.0
    return config
