"""End to end: a storage node attached to two brokers (issue 14, part 2; DESIGN.md "Several brokers").

One node lists both brokers' backends. Each broker is told half the node's window, so what both grant
together never exceeds it: sampled from both brokers' status while each pushes an upload to the node
(which writes slowly, so credit stays out). Each upload commits through its own broker and restores
identical, and a restart of one broker leaves the node serving the other.
"""

from __future__ import annotations

import threading

import pytest

from roles.sampleimages import generate_image
from tests.conftest import _cluster
from tests.harness import MiB, assert_restores

WINDOW = 8 * MiB


@pytest.fixture
def other(request, tmp_path):
    """A second broker, with its own ports, data and logs."""
    yield from _cluster(request, tmp_path / "other")


def node_entry(cluster, node_id: str = "node-a") -> dict | None:
    doc = cluster.try_status()
    entries = [n for n in (doc or {}).get("storage", ()) if n["node_id"] == node_id and n["alive"]]
    return entries[0] if entries else None


def test_a_node_shares_its_window_between_two_brokers_and_serves_both(cluster, other, tmp_path):
    cluster.start_broker()
    other.start_broker()
    cluster.start_storage("node-a", broker=[cluster.backend, other.backend], window=WINDOW,
                          fault_write_rate=6 * MiB)
    other.wait_for(lambda: node_entry(other) is not None, 20, "node-a registered with the second broker")
    for c in (cluster, other):
        assert node_entry(c)["credit"]["window"] == WINDOW // 2

    agents, digests = {}, {}
    for c, device in ((cluster, "office-1"), (other, "office-2")):
        directory = c.dataset_dir(device, "fs")
        digests[device] = generate_image(str(directory / "s1.img"), 24 * MiB, seed=len(device) + ord(device[-1]),
                                         zero_fraction=0.0, text_fraction=0.0)
        agents[device] = (c, c.agent_config(device, [{"name": "fs", "path": directory}]))

    samples: list = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            out = [(node_entry(c) or {"credit": {"outstanding": 0}})["credit"]["outstanding"] for c in (cluster, other)]
            samples.append(out)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for c, cfg in agents.values():
            c.start_agent_once(cfg)
        for device, (c, cfg) in agents.items():
            rc, doc, log = c.finish_agent(cfg.stem)
            assert rc == 0, log
            assert [t["state"] for t in doc["transfers"]] == ["committed"], doc
    finally:
        done.set()
        sampler.join(timeout=30)
    assert samples and all(a <= WINDOW // 2 and b <= WINDOW // 2 for a, b in samples), samples
    assert max(a + b for a, b in samples) <= WINDOW
    assert any(a > 0 and b > 0 for a, b in samples), f"both brokers never held credit at once: {samples}"
    for device, (c, cfg) in agents.items():
        assert [r["node_id"] for r in c.catalog(device)] == ["node-a"]
        assert_restores(c, cfg, "fs", "s1", digests[device], tmp_path)

    # one broker restarts: the node registers with it again and serves the other throughout
    cluster.kill9("broker")
    c, cfg = agents["office-2"]
    assert_restores(c, cfg, "fs", "s1", digests["office-2"], tmp_path)
    cluster.restart("broker")
    cluster.wait_for(lambda: node_entry(cluster) is not None, 30, "node-a back with the restarted broker")
    assert_restores(cluster, agents["office-1"][1], "fs", "s1", digests["office-1"], tmp_path)
