"""Shared fixtures. `cluster`: a harness.Cluster in tmp_path, stopped at teardown.

When a test using it fails, the tail of every process's log is attached to
the report ("speedsync logs" section).
"""

from __future__ import annotations

import pytest

from tests.harness import Cluster


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    cluster = getattr(item, "_speedsync_cluster", None)
    if cluster is not None and report.failed:
        item._speedsync_failed = True
        report.sections.append(("speedsync logs", cluster.log_tails()))


@pytest.fixture
def cluster(request, tmp_path):
    """A Cluster not yet started: call `.start()` (broker + node-a) or start roles one by one.

    At teardown every process is stopped; a broker or worker that died during
    the test fails it; a passed test's images and stores are deleted (logs stay).
    """
    c = Cluster(tmp_path)
    request.node._speedsync_cluster = c
    try:
        yield c
        dead = c.dead_processes()
        assert not dead, f"a role process exited during the test: {dead}"
    finally:
        c.stop()
    if not getattr(request.node, "_speedsync_failed", False):
        c.remove_data()
