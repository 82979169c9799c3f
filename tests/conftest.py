"""Test setup: 8 simulated CPU devices, so every sharding path runs in CI.

XLA reads the flag once, when the backend starts, so it must be set before jax is imported anywhere.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
