"""Shared fixtures: `cluster` (a harness.Cluster in tmp_path, plain TCP),
`secure_cluster` (the same with CurveZMQ on every socket), both stopped at
teardown, and `zctx` (a zmq context for raw sockets, destroyed at teardown).

When a test using a cluster fails, the tail of every process's log is
attached to the report ("speedsync logs" section).
"""

from __future__ import annotations

import pytest
import zmq

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
def zctx():
    """A zmq context for raw sockets in a test; teardown closes any socket a failed test left open."""
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _cluster(request, tmp_path, **options):
    c = Cluster(tmp_path, **options)
    request.node._speedsync_cluster = c
    try:
        yield c
        dead = c.dead_processes()
        assert not dead, f"a role process exited during the test: {dead}"
    finally:
        c.stop()
    if not getattr(request.node, "_speedsync_failed", False):
        c.remove_data()


@pytest.fixture
def cluster(request, tmp_path):
    """A Cluster not yet started: call `.start()` (broker + node-a) or start roles one by one.

    At teardown every process is stopped; a broker or worker that died during
    the test fails it (one ended by `kill9` is not counted); a passed test's
    images and stores are deleted (logs stay).
    """
    yield from _cluster(request, tmp_path)


@pytest.fixture
def secure_cluster(request, tmp_path):
    """Like `cluster`, with CurveZMQ on every socket (keys from `keygen`, listed by `enroll`)."""
    yield from _cluster(request, tmp_path, secure=True)


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server (tests/pgserver.py) for the session, removed at its end; missing binaries
    skip the tests that use it, or fail them under CI=true (tests/needs.py)."""
    from tests import pgserver
    from tests.needs import unavailable
    reason = pgserver.why_unavailable()
    if reason:
        unavailable("PostgreSQL", reason)
    server = pgserver.PgServer()
    try:
        yield server.start()
    finally:
        server.remove()


@pytest.fixture
def pg_url(pg_server):
    """The catalog_url of a new, empty database on the session's PostgreSQL server."""
    if not pg_server._accepts():  # a test that stopped it and failed before restarting
        pg_server.start()
    return pg_server.create_database()
