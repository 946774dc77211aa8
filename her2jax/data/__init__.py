"""Data layer: phantom cohort, cohort reading, preprocessing, TFDS dataset, grain pipeline."""
