"""MoCo v3 pretraining at test size on a CPU: a tiny ViT/8 on 24^3 crops of one phase, heads of
width 64 to 32, 200 steps of 16. What the tests and the CPU benchmark run; the recipe is
configs/pretrain_vit.py's.

  her2jax --mode=pretrain --config=configs/pretrain_tiny.py --workdir=runs/pretrain_tiny \
      --config.data.data_dir=DATA
"""

import ml_collections

from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults.default_config("fmbcmri", "vit3d")
    config.pretrain = defaults.pretrain_config()
    config.pretrain.update(dim=32, mlp_dim=64, knn_k=5)
    config.data.recipe.shape = (24, 24, 24)
    config.data.worker_count = 0
    config.model.vit.size = "tiny"
    config.train.update(batch_size=16, steps=200, warmup_steps=20, learning_rate=1e-3,
                        weight_decay=0.1, grad_clip=0.0, layer_decay=1.0, eval_every=50,
                        save_every=50, log_every=10, eval_batch_size=16)
    return config
