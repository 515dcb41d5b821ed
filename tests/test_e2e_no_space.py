"""End to end, real broker, storage node and agent: an offer no node has room for (issue 12, item 6).

The node's data_dir is a small tmpfs mounted for the test, partly taken by a
file that is not the store's: the image would fit the disk (so not
`image_too_large`) but not the room left. The offer is parked `no_space` and
shown so in status; the agent does not give up. Once the file is deleted the
node's next heartbeat reports the room, the broker says ROOM, the agent offers
it again at once and the snapshot commits and restores identical.

Mounting needs root (CI runs as root); without it the test skips, naming why
(tests/needs.py).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from roles.sampleimages import generate_image
from tests.harness import MiB, assert_restores, uploads_of
from tests.needs import unavailable

TMPFS_SIZE = 32 * MiB
FILLER = 16 * MiB
IMAGE = 20 * MiB  # more than the 16 MiB left, less than the disk


@pytest.fixture
def node_tmpfs(tmp_path_factory):
    """Request it before `cluster`, so that the node is stopped before it is unmounted."""
    if os.geteuid() != 0:
        unavailable("a small filesystem (tmpfs)", "mounting a tmpfs needs root", "SPEEDSYNC_REQUIRE_ROOT")
    path = tmp_path_factory.mktemp("node-tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        unavailable("a small filesystem (tmpfs)", f"mount -t tmpfs: {mounted.stderr.strip()}",
                    "SPEEDSYNC_REQUIRE_ROOT")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def test_an_offer_no_node_has_room_for_parks_no_space_and_commits_once_space_is_freed(node_tmpfs, cluster,
                                                                                    tmp_path):
    filler = node_tmpfs / "other-files"
    with open(filler, "wb") as f:
        f.write(os.urandom(FILLER))
    cluster.start_broker()
    cluster.start_storage("node-a", data_dir=str(node_tmpfs / "store"))
    directory = cluster.dataset_dir("office-1", "fileserver")
    digest = generate_image(str(directory / "s1.img"), IMAGE, seed=120, zero_fraction=0.0, text_fraction=0.0)
    cfg = cluster.agent_config("office-1", [{"name": "fileserver", "path": directory}])
    agent = cluster.start_agent_once(cfg)

    def parked_no_space():
        status = cluster.try_status() or {"transfers": []}
        return [t for t in uploads_of(status, "office-1", "fileserver", "s1")
                if t["state"] == "parked" and t["reason"].startswith("no_space: ")]

    (parked,) = cluster.wait_for(lambda: parked_no_space()[:1], 20, "the offer parked no_space")
    assert parked["bytes_total"] == IMAGE, parked
    attempts = uploads_of(cluster.status(), "office-1", "fileserver", "s1")
    assert not [a for a in attempts if a["state"] in ("failed", "committed", "active")], attempts
    assert not cluster.catalog()
    assert agent.poll() is None, "the agent gave up on a cloud without room"

    filler.unlink()  # room appears: the node's next heartbeat says so

    rc, doc, log = cluster.finish_agent("agent-office-1", timeout_s=60)
    assert rc == 0, log
    (t,) = doc["transfers"]
    assert t["state"] == "committed", t
    assert "the cloud has room; offering it again" in log, "committed without ROOM"
    (entry,) = cluster.catalog()
    assert entry["blake3"] == digest and entry["node_id"] == "node-a"
    assert_restores(cluster, cfg, "fileserver", "s1", digest, tmp_path)
