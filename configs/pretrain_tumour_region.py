"""MoCo v3 pretraining of the demo's tumour-region network (configs/demo_cpu.py: a per-voxel
MLP pooled inside the tumour mask and on two shells around it, ``model.encoder='none'``) on a
prepared dataset of its recipe, labelled or not; the export loads into configs/demo_cpu.py
with ``--config.model.pretrained=WORKDIR/encoder``. MoCo's CNN heads (2-layer projector,
predictor without a final BatchNorm) of width 256 to 64, the settings measured in
BENCHMARKS.md ("Self-supervised pretraining", with the demo's inputs of then, 24^3 at 2.5 mm):
1,000 steps of 32, AdamW 1e-3.

  her2jax --mode=pretrain --config=configs/pretrain_tumour_region.py --workdir=runs/pretrain_tr \
      --config.data.data_dir=DATA
"""

import ml_collections

from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("demo_cpu",
                                                  Path(__file__).with_name("demo_cpu.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    config = demo.get_config()
    config.data.test_centers = ()
    config.pretrain = defaults.pretrain_config()
    config.pretrain.update(dim=64, mlp_dim=256, knn_k=10)
    config.train.update(batch_size=32, steps=1000, warmup_steps=100, learning_rate=1e-3,
                        weight_decay=0.1, grad_clip=0.0, layer_decay=1.0, eval_every=200,
                        save_every=200, log_every=20, eval_batch_size=32)
    return config
