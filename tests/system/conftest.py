"""What the system tests share."""

import pytest
import ray


@pytest.fixture(scope="module")
def local_ray():
    """A fresh local Ray of this module's own (address="local": never one already running on the machine)."""
    ray.init(address="local", num_cpus=8, include_dashboard=False)
    yield
    ray.shutdown()
