"""The range of every ``train`` and ``data`` setting a run reads, checked before anything
is built or written.

``check_run_config(config)`` runs first in training (gradient and pca_lr), so a typo is one
line naming the full key (``train.eval_every``), exit 2, and no workdir: a corrected rerun is
not refused as "another config". The optimizer's own fields (learning rate, warmup, decays,
freeze) are checked where they are used, by ``optim.make_optimizer``, which also runs before
the workdir is claimed.
"""

from __future__ import annotations

import math
import numbers

from her2jax.data import preprocess
from her2jax.errors import Her2jaxError

PROTOCOLS = ("gradient", "pca_lr")
SELECT_BY = ("val_loss", "val_macro_auc", "last")
CLASS_WEIGHTING = ("balanced", "none")


def _int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def _need(ok: bool, key: str, text: str, value) -> None:
    if not ok:
        raise Her2jaxError(f"must be {text}, got {value!r}", key=key)


def _section(config, name: str):
    try:
        return config[name]
    except (KeyError, AttributeError):
        raise Her2jaxError("the config has no such section", key=name) from None


def check_data(config) -> None:
    """The ``data`` settings a run reads (the recipe itself: ``preprocess.check_recipe``)."""
    data = _section(config, "data")
    try:
        preprocess.check_recipe(data.recipe)   # the recipe's own rules, as prepare applies them
    except Her2jaxError as e:
        if e.key and e.key.startswith("recipe."):
            e.key = f"data.{e.key}"
        raise
    seed = data.get("seed", 0)
    _need(_int(seed) and 0 <= seed < 2 ** 32, "data.seed", "an integer in [0, 2^32)", seed)
    fraction = data.get("val_fraction", 0.2)
    _need(_real(fraction) and 0 <= fraction < 1, "data.val_fraction", "a number in [0, 1)",
          fraction)
    for key in ("worker_count", "prefetch", "device_prefetch"):
        value = data.get(key, 0)
        _need(_int(value) and value >= 0, f"data.{key}", "an integer >= 0", value)
    for key in ("train_centers", "test_centers"):
        value = data.get(key, ())
        _need(not isinstance(value, str), f"data.{key}",
              f"a tuple of centre names, e.g. ('{value}',)", value)
    holdout = data.get("cv_holdout", ())
    _need(not isinstance(holdout, str), "data.cv_holdout", "a tuple of patient ids", holdout)
    fold = data.get("cv_fold", -1)
    _need(_int(fold) and fold >= -1, "data.cv_fold", "an integer >= -1 (-1: not a fold)", fold)


def check_train(config) -> None:
    """The ``train`` settings the loop reads (the optimizer's: ``optim.make_optimizer``)."""
    train = _section(config, "train")
    protocol = train.get("protocol", "gradient")
    _need(protocol in PROTOCOLS, "train.protocol", " or ".join(map(repr, PROTOCOLS)), protocol)
    positive = ("batch_size", "eval_batch_size", "steps", "eval_every", "save_every",
                "keep_latest", "log_every", "grad_accum")
    for key in positive:
        value = train.get(key, 1)
        _need(_int(value) and value >= 1, f"train.{key}", "an integer >= 1", value)
    for key in ("early_stop_patience", "seed"):
        value = train.get(key, 0)
        _need(_int(value) and value >= 0, f"train.{key}", "an integer >= 0", value)
    _need(train.get("seed", 0) < 2 ** 32, "train.seed", "an integer < 2^32", train.get("seed"))
    components = train.get("pca_components", 16)
    _need(_int(components) and components >= 1, "train.pca_components", "an integer >= 1",
          components)
    for key, low, high in (("label_smoothing", 0.0, 1.0), ("ema_decay", 0.0, 1.0)):
        value = train.get(key, 0.0)
        _need(_real(value) and low <= value < high, f"train.{key}",
              f"a number in [{low:g}, {high:g})", value)
    select_by = train.get("select_by", "val_macro_auc")   # workdirs older than the key
    _need(select_by in SELECT_BY, "train.select_by", " or ".join(map(repr, SELECT_BY)),
          select_by)
    weighting = train.get("class_weighting", "balanced")
    _need(weighting in CLASS_WEIGHTING, "train.class_weighting",
          " or ".join(map(repr, CLASS_WEIGHTING)), weighting)
    _check_augment(config, train)
    _check_profile(train)


def _check_augment(config, train) -> None:
    augment = train.get("augment") or {}
    for key in ("flips", "permute_axes"):
        value = augment.get(key, False)
        _need(isinstance(value, bool), f"train.augment.{key}", "True or False", value)
    for key in ("scale", "shift", "noise"):
        value = augment.get(key, 0.0)
        _need(_real(value) and value >= 0, f"train.augment.{key}", "a number >= 0", value)
    channel_scale = augment.get("channel_scale", 0.0)
    _need(_real(channel_scale) and 0 <= channel_scale < 1, "train.augment.channel_scale",
          "a number in [0, 1)", channel_scale)
    shape = tuple(config.data.recipe.shape)
    if augment.get("permute_axes", False) and len(set(shape)) != 1:
        raise Her2jaxError(f"permuting the axes needs a cubic crop, the recipe's is {shape}",
                           key="train.augment.permute_axes")


def _check_profile(train) -> None:
    profile = tuple(train.get("profile_steps", ()) or ())
    if not profile:
        return
    total = train.steps * train.get("grad_accum", 1)
    ok = (len(profile) == 2 and all(_int(s) for s in profile)
          and 0 <= profile[0] <= profile[1] < total)
    _need(ok, "train.profile_steps",
          f"() or (first, last) with 0 <= first <= last < {total} (the run's batches)",
          profile)


def check_run_config(config) -> None:
    """Every ``data`` and ``train`` range a training run reads; one line naming the key."""
    check_data(config)
    check_train(config)
