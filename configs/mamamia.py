"""MAMA-MIA as distributed: clinical_and_imaging_info.xlsx (sheet dataset_info), HER2 as a
binary `her2` column (no IHC / ISH), `dataset` (DUKE, ISPY1, ISPY2, NACT) as the centre;
FM-BCMRI ViT-B/8 on the FM-BCMRI recipe.

  her2jax-prepare --cohort=/data/MAMA-MIA --data_dir=/data/her2jax --config=configs/mamamia.py

Cases with a missing `her2` are kept in the dataset and listed in excluded.csv.
"""

import ml_collections

from her2jax.train import defaults


def get_config() -> ml_collections.ConfigDict:
    config = defaults.default_config("fmbcmri", "vit3d")
    config.data.columns.center = "dataset"
    config.data.columns.ihc = ""
    config.data.columns.ish = ""
    config.data.scheme = "her2_binary"
    config.data.test_centers = ("NACT",)
    return config
