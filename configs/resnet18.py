"""MedicalNet ResNet-18 (Tencent Med3D, the `medicalnet` port source) on three phases (pre,
first and second post-contrast) of a 64^3 tumour box with a 5 mm margin, z-scored jointly over
all phases.

  her2jax-port --source=medicalnet --checkpoint=resnet_18.pth --in_channels=3 --out=weights/r18
  ... --config=configs/resnet18.py --config.model.pretrained=weights/r18

The network is the one MedicalNet's weights were trained in (Tencent's models/resnet.py): a
7x7x7 stride-2 stem, parameter-free type-A shortcuts, layers 3 and 4 at stride 1 dilated by 2
and 4 (model.resnet.dilated). MONAI's resnet18(pretrained=True) loads the same weights into
its undilated network; for that, port with --source=monai-resnet --conv1_t_stride=2 and set
--config.model.resnet.dilated=False.
"""

import ml_collections

from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults.default_config("multiphase", "resnet3d")
    config.data.recipe.shape = (64, 64, 64)
    config.model.resnet.dilated = True
    return config
