"""One Ray session (with Serve, no proxies) shared by every test of the session.

Starting Ray costs 4-7 s here, so test modules that need it import ``ray_session`` from
this module instead of calling ray.init themselves.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    # Loopback only, no usage reporting, no dashboard: tests must not reach out or listen.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024,
             log_to_driver=False)
    serve.start(proxy_location="Disabled")
    try:
        yield ray
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
