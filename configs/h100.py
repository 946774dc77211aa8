"""Fine-tune the FM-BCMRI ViT-B/8 on one or more NVIDIA H100 / H200: bfloat16 compute with
cuDNN attention (tokens padded to a multiple of 64), global batch 128, more grain workers.

  her2jax --config=configs/h100.py --workdir=runs/h100 \
      --config.data.data_dir=DATA --config.model.pretrained=weights/fmbcmri
"""

import ml_collections

from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults.default_config("fmbcmri", "vit3d")
    config.data.worker_count = 8
    config.data.prefetch = 4
    config.model.dtype = "bfloat16"
    config.model.vit.attention = "cudnn"
    config.model.vit.attention_pad = 64
    config.train.batch_size = 128
    config.train.eval_batch_size = 256
    config.train.learning_rate = 2e-4
    return config
