"""The phantom demo on a 2-core CPU, and the engine's best configuration in the learning study
(BENCHMARKS.md, "Learning"): a small 3D ResNet-10 trained from scratch on scanner-independent
inputs at physical scale, centre C held out for testing.

* Inputs (recipe ``kinetic_mm`` at 2.5 mm): percent enhancement at the first and the last
  post-contrast phase (wash-in, washout, the peritumoral rim) and the tumour mask (size, shape)
  on a 60 mm box. Ratios and a mask mean the same on every scanner; z-scored intensities do not.
* Augmentation: the 48 axis symmetries of the cube (flips and axis permutations: tumour
  orientation and slice direction carry no class); no intensity augmentation, which cost
  held-out AUC in the study (``demo_intensity_aug``).
* Selection: the lowest class-balanced validation loss over 6 evaluations on a stratified
  quarter of the training centres.

  her2jax --config=configs/demo_cpu.py --workdir=runs/demo/run --config.data.data_dir=runs/demo/data
"""

import ml_collections

from her2jax.data import recipes
from her2jax.models import factory
from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.data = recipes.data_config("kinetic_mm")
    config.data.recipe.shape = (24, 24, 24)
    config.data.recipe.spacing_mm = 2.5
    config.data.test_centers = ("CENTER_C",)
    config.data.val_fraction = 0.25
    config.data.worker_count = 0
    config.model = factory.model_config("resnet3d")
    config.model.resnet.update(depth=10, widen_factor=0.5, shortcut="B", bias_downsample=False,
                               conv1_t_size=3, conv1_t_stride=2)
    config.train = defaults.train_config()
    config.train.batch_size = 16
    config.train.steps = 300
    config.train.learning_rate = 1e-3
    config.train.warmup_steps = 20
    config.train.layer_decay = 1.0
    config.train.augment.update(flips=True, permute_axes=True, scale=0.0, channel_scale=0.0,
                                shift=0.0, noise=0.0)
    config.train.eval_every = 50
    config.train.save_every = 50
    config.train.eval_batch_size = 32
    return config
