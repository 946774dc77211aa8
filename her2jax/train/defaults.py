"""The config every run starts from: :func:`default_config` (data, model and train sections;
configs/*.py each call it and change what they need), and the ``train`` section's defaults
(fine-tuning with AdamW, the study's default). Every setting's range is checked by
``her2jax.train.checks`` before a run builds or writes anything.
"""

from __future__ import annotations

import ml_collections


def default_config(recipe: str = "fmbcmri", encoder: str = "vit3d") -> ml_collections.ConfigDict:
    """The full config: ``data`` (the named recipe), ``model`` (the encoder) and ``train``."""
    from her2jax.data import recipes
    from her2jax.models import factory

    return ml_collections.ConfigDict(dict(data=recipes.data_config(recipe),
                                          model=factory.model_config(encoder),
                                          train=train_config()))


def train_config() -> ml_collections.ConfigDict:
    """Every training knob, read by the loop in one place.

    Units: ``steps`` and ``warmup_steps`` count optimizer updates; ``eval_every``,
    ``save_every``, ``log_every`` and ``profile_steps`` count global batches of
    ``batch_size`` (the loop's steps, the number checkpoints and metrics.jsonl carry). They
    are the same thing unless ``grad_accum`` = k > 1, when each update consumes k batches and
    a run has ``steps * k`` of them.
    """
    return ml_collections.ConfigDict(dict(
        protocol="gradient",        # 'gradient' (this loop) or 'pca_lr' (frozen features -> PCA -> LR)
        batch_size=32,              # global batch (all devices and processes)
        steps=2000,
        optimizer="adamw",
        learning_rate=1e-4,
        warmup_steps=100,
        weight_decay=0.05,
        b1=0.9, b2=0.999,
        momentum=0.9, nesterov=False,
        layer_decay=0.75,           # ViT layer-wise lr decay (1.0: off)
        freeze="none",              # 'none' | 'encoder' (linear probe) | 'last_k'
        freeze_keep=0,              # k for 'last_k'
        # Linear probe, then fine-tune (LP-FT): the encoder sits out the first N optimizer
        # updates while the head learns on its (pretrained) features; then all train (0: off).
        freeze_steps=0,
        grad_accum=1,
        grad_clip=1.0,
        label_smoothing=0.0,
        # Exponential moving average of the parameters, per optimizer update (0: off). When
        # on, every evaluation (validation, checkpoint selection, eval / predict / features)
        # uses the average; it warms up as min(ema_decay, (1 + t) / (10 + t)).
        ema_decay=0.0,
        class_weighting="balanced",  # 'balanced' (n / (K n_c)) or 'none'
        augment=dict(flips=True, permute_axes=False, scale=0.1, channel_scale=0.0, shift=0.1,
                     noise=0.05),
        eval_every=100,             # validation (loss, macro AUC) every this many batches
        # Which evaluated step checkpoints/best keeps: 'val_loss' (lowest class-balanced
        # validation cross-entropy: every case counts, so it is far less noisy than an AUC on
        # a small split), 'val_macro_auc' (highest) or 'last' (the final step).
        select_by="val_loss",
        save_every=100,             # latest checkpoint interval in batches (and on SIGTERM)
        keep_latest=2,
        early_stop_patience=0,      # evaluations without improvement of select_by (0: off)
        log_every=10,               # batches
        eval_batch_size=64,
        seed=0,
        profile_steps=(),           # (first, last) batch range to trace with jax.profiler
        pca_components=16,          # 'pca_lr' protocol
    ))


def pretrain_config() -> ml_collections.ConfigDict:
    """The ``pretrain`` section of ``--mode=pretrain`` (``her2jax.train.pretrain``): MoCo v3's
    ViT recipe where it applies to 3D volumes."""
    return ml_collections.ConfigDict(dict(
        dim=256,                    # projector / predictor output
        mlp_dim=4096,               # their hidden width
        temperature=0.2,            # T of the contrastive loss
        momentum=0.99,              # m0 of the cosine momentum schedule (to 1 at the end)
        freeze_patch_embed=True,    # ViT: keep the random patch projection (MoCo v3)
        # Views: crop a box of this share of the volume (aspect ratios per axis in
        # crop_ratio), resample it to the full grid (trilinear); flip each axis with p 1/2;
        # intensity x (1 + U(+-scale)) + U(+-shift); Gaussian blur (sigma in voxels) and noise
        # with their probabilities. Mask channels (the recipe's MASK) move with the crop and
        # flips only.
        crop_scale=(0.3, 1.0),
        crop_ratio=(0.75, 1.333),
        flips=True,
        scale=0.2,
        shift=0.2,
        blur_sigma=(0.1, 1.5),
        blur_prob=0.5,
        noise=0.1,
        noise_prob=0.5,
        knn_k=20,                   # the kNN monitor's neighbours
        # Which query encoder DIR/encoder/ holds: 'last' (the final step's) or 'best_knn' (the
        # monitored step with the highest kNN macro AUC, kept in checkpoints/best; needs
        # labelled validation cases). train.early_stop_patience counts monitor evaluations
        # without a better kNN macro AUC.
        export="last",
    ))
