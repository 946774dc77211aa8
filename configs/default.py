"""Default: fine-tune the FM-BCMRI ViT-B/8 on the FM-BCMRI recipe (one channel, second
post-contrast phase, tight tumour box -> 48^3, per-crop z-score), three-class HER2 scheme.

  her2jax-prepare --cohort=DIR --data_dir=DATA --config=configs/default.py
  her2jax-port --source=fmbcmri --checkpoint=breast_MR_checkpoint.pth.tar --out=weights/fmbcmri
  her2jax --config=configs/default.py --workdir=runs/vitb --mode=train \
      --config.data.data_dir=DATA --config.model.pretrained=weights/fmbcmri \
      --config.data.test_centers="('CENTER_C',)"
"""

import ml_collections

from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults.default_config("fmbcmri", "vit3d")
    return config
