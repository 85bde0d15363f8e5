"""Test-wide settings: the same Ray auth mode and no telemetry for every test (see ../shared/PLATFORM.md), and
the local Ray cluster fixture of the Ray Train and Tune tests."""
import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster with this machine's 2 CPUs, for one test module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
