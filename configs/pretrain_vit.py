"""MoCo v3 pretraining of the FM-BCMRI-shaped encoder (3D ViT-B/8 on 48^3 crops of one
post-contrast phase), on any prepared dataset, labelled or not (every case of the training
centres is used), from scratch or continuing from a port:

  her2jax --mode=pretrain --config=configs/pretrain_vit.py --workdir=runs/pretrain \
      --config.data.data_dir=DATA [--config.model.pretrained=weights/fmbcmri]

then train or fit with --config.model.pretrained=runs/pretrain/encoder. MoCo v3's ViT recipe:
AdamW, lr 1.5e-4 x batch / 256, weight decay 0.1, T = 0.2, m0 = 0.99 (cosine to 1), projector
3 layers and predictor 2 of width 4096 to 256, the random patch projection frozen, linear
warmup then a half-cycle cosine. FM-BCMRI's own pretraining data and settings are not
published; set train.steps for your cohort (MoCo v3 ran 300 epochs).
"""

import ml_collections

from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults.default_config("fmbcmri", "vit3d")
    config.pretrain = defaults.pretrain_config()
    config.data.val_fraction = 0.2          # the kNN monitor's labelled validation cases
    config.train.update(batch_size=256, steps=20000, warmup_steps=2000,
                        learning_rate=1.5e-4 * 256 / 256, weight_decay=0.1, grad_clip=0.0,
                        layer_decay=1.0, eval_every=1000, save_every=500, log_every=50,
                        eval_batch_size=256)
    config.model.dtype = "bfloat16"
    return config
