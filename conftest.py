"""Shared pytest set-up. Hypothesis profiles: a quick default for CI, a long one by environment variable.

    COLOFN_HYPOTHESIS_PROFILE=long pytest property_tests
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Hugging Face models are built from configs; never reach the hub

from hypothesis import HealthCheck, settings

settings.register_profile(
    "quick",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("COLOFN_HYPOTHESIS_PROFILE", "quick"))
