"""Shared fixtures: one phantom cohort and one prepared dataset per test run."""

from __future__ import annotations

import os

# Several fake CPU devices so sharding code runs as on a multi-device host; must be set
# before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

# Small enough for 2 CPU cores, large enough for three centres, all classes and a few
# unlabellable cases.
PHANTOM = dict(patients=36, centers=3, seed=0, shape=(48, 48, 24))


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory):
    """A tiny phantom cohort in the MAMA-MIA layout (read-only for tests: copy to modify)."""
    from her2jax.data import phantom

    return phantom.write_cohort(tmp_path_factory.mktemp("phantom"), **PHANTOM)
