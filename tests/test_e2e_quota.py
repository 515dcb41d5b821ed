"""End to end: per-device byte quotas with real processes (issue 11: fair shares and quotas).

One broker with `quota: {"office-a": 6MiB, "office-*": 1GiB}` (an exact id and a pattern) and one
node. office-a offers an image larger than its quota: its upload is interrupted at the STORED that
takes it past the quota, and every offer after that is refused, all with `quota_exceeded`, which
the agent reports; meanwhile office-b's snapshot commits and restores identical. The broker is
restarted: office-a's usage is read back from the catalog, so its next offers are refused at once
and nothing more is stored for it.
"""

from __future__ import annotations

from roles.sampleimages import generate_image
from tests.harness import MiB, assert_restores

QUOTA_A = 6 * MiB
QUOTA_B = 1 << 30
TRANSFER_WINDOW = 2 * MiB
CHUNK = MiB
# what one upload may have in flight when the quota is reached (agentside.agent_OFFER's window)
IN_FLIGHT_MAX = max(TRANSFER_WINDOW, 2 * CHUNK + 65536)


def agents_by_device(status: dict) -> dict:
    return {a["device_id"]: a for a in status["agents"]}


def test_a_device_past_its_quota_is_refused_while_another_commits_and_its_usage_survives_a_restart(
        cluster, tmp_path):
    cluster.start_broker(quota={"office-a": "6MiB", "office-*": "1GiB"}, transfer_window="2MiB")
    cluster.start_storage()
    dirs = {d: cluster.dataset_dir(d, "fs") for d in ("office-a", "office-b")}
    generate_image(str(dirs["office-a"] / "s1.img"), 24 * MiB, seed=71, zero_fraction=0.0, text_fraction=0.0)
    digest_b = generate_image(str(dirs["office-b"] / "s1.img"), 16 * MiB, seed=72, zero_fraction=0.3,
                              text_fraction=0.3)
    cfg = {d: cluster.agent_config(d, [{"name": "fs", "path": dirs[d]}]) for d in dirs}

    cluster.start_agent_once(cfg["office-a"])
    rc_b, doc_b, log_b = cluster.run_agent_once(cfg["office-b"])
    assert rc_b == 0, log_b
    (b,) = doc_b["transfers"]
    assert b["state"] == "committed", b
    rc_a, doc_a, log_a = cluster.finish_agent("agent-office-a")
    assert rc_a != 0, log_a
    (a,) = doc_a["transfers"]
    assert a["state"] == "failed" and a["reason"].startswith("quota_exceeded"), a

    status = cluster.status()
    agents = agents_by_device(status)
    used_a = agents["office-a"]["stored_bytes"]
    assert agents["office-a"]["quota_bytes"] == QUOTA_A  # the exact id, not office-*
    assert QUOTA_A < used_a <= QUOTA_A + IN_FLIGHT_MAX, used_a  # stopped at the STORED that passed it
    assert used_a <= a["bytes_sent"]  # what was stored, never more than what was sent
    # office-b's usage is what it sent (zeros and repeats travel as nothing) and its quota the pattern's
    assert (agents["office-b"]["stored_bytes"], agents["office-b"]["quota_bytes"]) == (b["bytes_sent"], QUOTA_B)
    parked = [t for t in status["transfers"] if t["device_id"] == "office-a" and t["state"] == "parked"]
    assert parked and all(t["reason"].startswith("quota_exceeded") for t in parked), status["transfers"]
    # the interruption, then an offer refused for each retry (four attempts in --once)
    assert status["broker"]["errors_by_code"].get("quota_exceeded") == 4, status["broker"]
    assert [(s["device_id"], s["snapshot"]) for s in cluster.catalog()] == [("office-b", "s1")]
    assert_restores(cluster, cfg["office-b"], "fs", "s1", digest_b, tmp_path)

    # the usage survives a restart of the broker: office-a's next offers are refused at once
    cluster.terminate("broker")
    cluster.restart("broker")
    cluster.wait_for(lambda: cluster.node_alive("node-a"), 20, "node-a back on the restarted broker")
    generate_image(str(dirs["office-a"] / "s2.img"), 2 * MiB, seed=73, zero_fraction=0.0, text_fraction=0.0)
    cluster.start_agent(cluster.agent_config("office-a", [{"name": "fs", "path": dirs["office-a"]}],
                                             config_name="office-a-replicating"))

    def refused_again():
        doc = cluster.try_status()
        ours = [t for t in (doc or {}).get("transfers", []) if t["device_id"] == "office-a"]
        return doc if {t["snapshot"] for t in ours if t["state"] == "parked"
                       and t["reason"].startswith("quota_exceeded")} == {"s1", "s2"} else None

    after = cluster.wait_for(refused_again, 30, "office-a's offers refused quota_exceeded after the restart")
    assert agents_by_device(after)["office-a"]["stored_bytes"] == used_a
    assert all(t["bytes_sent"] == 0 for t in after["transfers"] if t["device_id"] == "office-a"), after
    assert [(s["device_id"], s["snapshot"]) for s in cluster.catalog()] == [("office-b", "s1")]
