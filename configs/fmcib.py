"""Fine-tune the FMCIB foundation model (Pai et al. 2024: MONAI ResNet-50, widen 2, 4096
features, pretrained with SimCLR on CT lesions) on its input: a 50^3 box at 1 mm isotropic
centred on the tumour, one channel.

  her2jax-port --source=fmcib --checkpoint=model_weights.torch --out=weights/fmcib
  her2jax-prepare --cohort=DIR --data_dir=DATA --config=configs/fmcib.py
  her2jax --config=configs/fmcib.py --workdir=runs/fmcib --mode=train \
      --config.data.data_dir=DATA --config.model.pretrained=weights/fmcib

FMCIB saw CT in Hounsfield units rescaled to [0, 1]; MRI has no such scale, so the crop is
z-scored (FM-BCMRI's normalisation). The first post-contrast phase (C1) is taken; a
multi-channel recipe inflates the stem with her2jax-port --in_channels. The network is
monai resnet50(widen_factor=2, conv1_t_stride=2, feed_forward=False): MONAI's undilated
ResNet with a stride-2 stem (the port records it; the model section must agree).
"""

import ml_collections

from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults.default_config("fmcib", "resnet3d")
    config.model.resnet.update(depth=50, shortcut="B", bias_downsample=True, conv1_t_size=7,
                               conv1_t_stride=2, widen_factor=2.0, dilated=False)
    config.train.batch_size = 16
    return config
