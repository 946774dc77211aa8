"""The study's protocol: the pretrained FM-BCMRI ViT-B/8 frozen, its CLS features reduced by
PCA to 16 components, a scikit-learn LogisticRegression on those (multinomial, balanced class
weights). No gradient step: train.protocol='pca_lr' (her2jax.train.pca_lr).

  her2jax-prepare --cohort=DIR --data_dir=DATA --config=configs/fmbcmri_pca_lr.py
  her2jax-port --source=fmbcmri --checkpoint=breast_MR_checkpoint.pth.tar --out=weights/fmbcmri
  her2jax --config=configs/fmbcmri_pca_lr.py --workdir=runs/pca_lr --mode=train \
      --config.data.data_dir=DATA --config.model.pretrained=weights/fmbcmri \
      --config.data.test_centers="('CENTER_C',)"
  her2jax --workdir=runs/pca_lr --mode=eval

The workdir keeps the encoder it used (encoder/) and the fitted classifier (pca_lr.npz), so
eval needs neither the port nor the checkpoint again. Without --config.model.pretrained the
features come from a randomly initialised encoder: a baseline, not the study's protocol.
"""

import ml_collections

from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults.default_config("fmbcmri", "vit3d")
    config.train.protocol = "pca_lr"
    config.train.pca_components = 16
    return config
