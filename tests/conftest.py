"""Shared test settings: hypothesis profile, simulator speed-up, GPU skip marker."""

import sys

import pytest
from hypothesis import HealthCheck, settings

import flashlab

settings.register_profile(
    "flashlab",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("flashlab")

# numba's CUDA simulator runs each thread as a Python thread; a short switch interval makes
# syncthreads barriers several times faster.
sys.setswitchinterval(5e-5)

requires_gpu = pytest.mark.skipif(
    flashlab.device.MODE != "gpu",
    reason="needs a CUDA GPU (none here, e.g. CI); on a GPU machine these run automatically",
)
