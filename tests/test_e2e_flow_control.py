"""End to end: a slow storage worker slows its senders, not the broker's memory.

Four agents (four devices, four processes) push incompressible images at
once to one worker whose disk is slowed by config (`fault_write_rate`). The
broker's resident memory is sampled from /proc throughout; credit-based flow
control must keep its growth within a bound that does not depend on how much
data flows. Everything commits and restores intact.
"""

from __future__ import annotations

from roles.sampleimages import file_blake3, generate_image
from tests.harness import MiB

AGENTS = 4
IMAGE_SIZE = 256 * MiB
SLOW_DISK = "100MB"  # the four images take >= 10 s to store: most of the data waits on the agents
SLOW_DISK_BYTES_PER_S = 100 * 10**6
MAX_BROKER_GROWTH = 64 * MiB


def test_slow_worker_keeps_broker_memory_bounded_and_loses_nothing(cluster, tmp_path):
    cluster.start(fault_write_rate=SLOW_DISK)
    devices = [f"office-{i}" for i in range(AGENTS)]
    digests, configs = {}, {}
    for i, device in enumerate(devices):
        directory = cluster.dataset_dir(device, "fileserver")
        digests[device] = generate_image(str(directory / "s1.img"), IMAGE_SIZE, seed=1000 + i,
                                         zero_fraction=0.0, text_fraction=0.0)
        configs[device] = cluster.agent_config(device, [{"name": "fileserver", "path": directory}])

    with cluster.rss_sampler("broker") as idle:
        cluster.wait_for(lambda: len(idle.samples) >= 10, 10, "idle memory samples")
    idle_rss = max(idle.samples)
    with cluster.rss_sampler("broker") as busy:
        for device in devices:
            cluster.start_agent_once(configs[device])
        results = {device: cluster.finish_agent(f"agent-{device}", timeout_s=300) for device in devices}

    for device, (rc, doc, log) in results.items():
        assert rc == 0, f"{device}: {log}"
        (t,) = doc["transfers"]
        assert t["state"] == "committed" and t["chunks_sent"] == IMAGE_SIZE // MiB, t
    # The disk really was the bottleneck, so data had every chance to pile up.
    slowest = max(doc["transfers"][0]["seconds"] for _, doc, _ in results.values())
    assert slowest >= 0.8 * AGENTS * IMAGE_SIZE / SLOW_DISK_BYTES_PER_S
    growth = busy.peak - idle_rss
    assert len(busy.samples) > 20
    assert growth <= MAX_BROKER_GROWTH, (
        f"broker RSS grew by {growth / MiB:.1f} MiB (idle {idle_rss / MiB:.1f} MiB, "
        f"peak {busy.peak / MiB:.1f} MiB) while {AGENTS * IMAGE_SIZE / MiB:.0f} MiB flowed")
    status = cluster.status()
    assert status["broker"]["dropped_messages"] == 0
    assert {s["device_id"]: s["blake3"] for s in cluster.catalog()} == digests
    for device in devices:
        out = tmp_path / f"{device}.restored"
        result = cluster.restore(configs[device], "fileserver", "s1", out)
        assert result.rc == 0, str(result)
        assert file_blake3(str(out)) == digests[device], f"{device}: restored bytes differ"
        out.unlink()
