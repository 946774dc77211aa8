"""Fine-tune BreastMR-FM (MONAI ResNet-10 pretrained with SimCLR on MAMA-MIA DCE-MRI) on the
preprocessing it was pretrained with: one phase resampled to 2 mm isotropic, a 128^3 box
(256 mm), z-scored over the whole image (MONAI NormalizeIntensityd).

  her2jax-port --source=breastmrfm --checkpoint=epoch=99-step=46200.ckpt --out=weights/bmrfm
  her2jax-prepare --cohort=DIR --data_dir=DATA --config=configs/breastmrfm.py
  her2jax --config=configs/breastmrfm.py --workdir=runs/bmrfm --mode=train \
      --config.data.data_dir=DATA --config.model.pretrained=weights/bmrfm

Differences from upstream, on purpose: BreastMR-FM centre-crops the whole image to 128^3,
her2jax centres the 128^3 box on the tumour (the box is 256 mm wide, so it holds the breast
either way); its scripts read one "dce" NIfTI per case without saying which phase, so this
config takes the first post-contrast phase (C1; set data.recipe.channels to change it). The
network is MONAI's resnet10 with MONAI's defaults: a 7x7x7 stem of stride 1 (the port records
it; model.resnet.conv1_t_stride must agree), type-B shortcuts with a bias, 512 features.
"""

import ml_collections

from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults.default_config("breastmrfm", "resnet3d")
    config.model.resnet.update(depth=10, shortcut="B", bias_downsample=True, conv1_t_size=7,
                               conv1_t_stride=1, widen_factor=1.0, dilated=False)
    config.train.batch_size = 8
    return config
