"""End to end on a real shaped office link: bandwidth, yield, pre-emption, weights, failover.

Each test builds the link of tests/netns.py (namespaces office, router and
cloud; the router's uplink limited by tbf to 100 Mbit/s with a 50 ms
buffer), runs the real broker and storage worker in the cloud namespace and
the agent in the office one, and measures with the functions bench/link.py
prints (so the bench's figures are these tests' figures). Rates are
compared with the link's nominal 100 Mbit/s; what the link carried is read
from the shaped interface's own counters every 100 ms.

These tests assert rates: on this link they are the acceptance criteria of
the client-side management issue, with its tolerances, over its windows.

Needs root (CI runs as root); where namespaces cannot be created the tests
skip, naming the reason, unless SPEEDSYNC_REQUIRE_NETNS=1 or CI=true (as CI
runs) makes that a failure: CI must not skip them. `make test` installs
iproute2 where `ip` or `tc` is missing and it runs as root.
"""

from __future__ import annotations

import os
import shutil

import pytest

from roles.sampleimages import MiB, file_blake3
from bench.link import (DEVICE, measure_goodput, measure_limit, measure_preemption, measure_weights, measure_yield,
                        random_image)
from tests.needs import unavailable
from tests.netns import (NETNS_DIR, PREFIX, LinkCluster, LinkMeter, LinkUnavailable, ShapedLink, remove_stale,
                         why_unavailable)

pytestmark = pytest.mark.serial  # rates on the link: alone, after the rest (Makefile)

MBIT = 1_000_000 / 8


def _unavailable(reason: str):
    unavailable("the shaped link", reason, "SPEEDSYNC_REQUIRE_NETNS")


@pytest.fixture
def link():
    """A fresh ShapedLink (unique names: pid and a counter), removed afterwards, also when the test fails."""
    reason = why_unavailable()
    if reason:
        _unavailable(reason)
    shaped = ShapedLink()
    try:
        shaped.up()
    except LinkUnavailable as exc:
        _unavailable(str(exc))
    try:
        yield shaped
    finally:
        shaped.down()
    assert not shaped.exists(), f"namespaces {shaped.names} still exist after down()"


@pytest.fixture
def meter(link):
    with LinkMeter(link) as m:
        yield m


class Clusters:
    """The LinkClusters of one test (a second broker stack for failover), stopped together."""

    def __init__(self, link: ShapedLink, root):
        self.link = link
        self.root = root
        self.all: list[LinkCluster] = []

    def new(self, name: str = "a") -> LinkCluster:
        cluster = LinkCluster(self.root / name, self.link)
        self.all.append(cluster)
        return cluster

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"===== cluster {c.root.name} =====\n{c.log_tails(lines)}" for c in self.all)

    def dead_processes(self) -> dict:
        return {f"{c.root.name}/{name}": code for c in self.all for name, code in c.dead_processes().items()}


@pytest.fixture
def clusters(request, link, tmp_path):
    """Make clusters with `.new(name)`; all are stopped before the link goes down. A role that died during the
    test fails it; logs are attached to a failure's report; a passed test's data is deleted."""
    group = Clusters(link, tmp_path)
    request.node._speedsync_cluster = group  # tests/conftest.py attaches its log_tails() on failure
    try:
        yield group
        dead = group.dead_processes()
        assert not dead, f"a role process exited during the test: {dead}"
    finally:
        for cluster in group.all:
            cluster.stop()
    if not getattr(request.node, "_speedsync_failed", False):
        for cluster in group.all:
            cluster.remove_data()


def mbit(rate: float) -> str:
    return f"{rate / MBIT:.1f} Mbit/s"


def test_the_link_is_removed_and_stale_links_of_crashed_runs_are_cleaned():
    reason = why_unavailable()
    if reason:
        _unavailable(reason)
    # a namespace left by a run whose process is gone (pid 2**22 + 1 is above any pid_max)
    stale = f"{PREFIX}-{2 ** 22 + 1}-1-office"
    if os.system(f"ip netns add {stale}") != 0:
        _unavailable("`ip netns add` failed")
    shaped = ShapedLink()
    try:
        assert stale in remove_stale() and not os.path.exists(os.path.join(NETNS_DIR, stale))
        shaped.up()
        assert all(os.path.exists(os.path.join(NETNS_DIR, n)) for n in shaped.names.values())
        assert "tbf" in shaped.qdisc() and "rate 100Mbit" in shaped.qdisc()
    finally:
        shaped.down()
        os.system(f"ip netns del {stale} 2>/dev/null")
    assert not shaped.exists()


def test_unlimited_goodput_is_at_least_90_percent_of_the_link(clusters, meter, link):
    """An incompressible 192 MiB image, no limit: the chunk payload the broker received over 10 s of the running
    upload, against the link's nominal rate (TCP/IP headers alone cost 4.4% of it: one bulk TCP flow gets 95.6%)."""
    cluster = clusters.new().start()

    f = measure_goodput(cluster, meter, size=192 * MiB, window_s=10.0)

    assert f["state"] == "committed" and f["listed"] == f["blake3"], f
    # the shaper passed its rate: the link itself was full (a diagnostic for the goodput figure below, the
    # requirement; one bulk TCP flow fills it to 97-99%, a stall of the agent's loop costs a point or two)
    assert f["frames"] >= 0.95 * link.rate_bytes, f"the link carried only {mbit(f['frames'])}"
    assert f["goodput"] >= 0.90 * link.rate_bytes, \
        f"goodput {mbit(f['goodput'])} over {f['window_s']:.1f} s is under 90% of {mbit(link.rate_bytes)}: {f}"


def test_a_40mbit_limit_holds_and_a_schedule_window_and_sighup_apply_within_2s(clusters, meter):
    """The limit holds on what the link carries: the Ethernet frames counted by the shaped interface itself
    (tc), headers and all, as the office's router sees them. Then SIGHUP with 20Mbit, then a schedule window
    of 10Mbit opening."""
    cluster = clusters.new().start()

    f = measure_limit(cluster, meter, window_s=20.0, limit_mbit=40, hup_mbit=20, window_mbit=10)

    limit = f["limit"]
    assert abs(f["frames"] - limit) <= 0.05 * limit, \
        f"frames {mbit(f['frames'])} over {f['window_s']:.0f} s with limit: 40Mbit (TCP payload {mbit(f['rate'])})"
    assert f["worst_100ms"] <= 1.25 * limit, f"a 100 ms interval carried {mbit(f['worst_100ms'])}"
    assert f["set_by"] == "limit", f
    for phase, new_limit, set_by in (("hup", f["hup_limit"], "limit"), ("window", f["window_limit"], "schedule")):
        p = f[phase]
        assert p["switch_s"] is not None and p["switch_s"] <= 2.0, f"{phase}: not applied within 2 s: {p}"
        # from 2 s on, the new limit holds: on average and in every 100 ms
        assert abs(p["rate_after"] - new_limit) <= 0.10 * new_limit, f"{phase}: {mbit(p['rate_after'])}: {p}"
        assert p["worst_100ms_after"] <= 1.25 * new_limit, f"{phase}: {p}"
        assert p["set_by"].startswith(set_by), f"{phase}: status says set_by {p['set_by']!r}"


def test_yield_leaves_a_bulk_flow_70_percent_and_takes_85_percent_back_within_10s(clusters, meter, link):
    """`limit: yield` uploads; a bulk CUBIC flow from the office runs 10 s: its goodput over its whole life is
    its share; once it stops, the agent must have 85% of the link over some 2 s within 10 s (a share is a
    rate over time: a momentary peak does not count). On this link an agent without a limit leaves such a
    flow about 40%, so the first figure is the agent's yielding, not the flow's strength."""
    cluster = clusters.new().start()

    f = measure_yield(cluster, link, meter, flow_s=10.0, take_back=0.85, within_s=10.0, hold_s=2.0)

    assert f["flow_share"] >= 0.70, \
        f"the competing flow got {f['flow_share']:.1%} of the link (the agent {f['agent_share_during']:.1%}): {f}"
    assert f["take_back_s"] is not None, \
        (f"the agent did not hold 85% of the link over any {f['hold_s']:.0f} s within {f['within_s']:.0f} s after "
         f"the flow stopped; its share second by second: {f['seconds_after']}: {f}")
    # what the agent's status showed before the flow: the path's base delay, and the link it had learned
    assert f["base_delay_ms"] is not None and f["base_delay_ms"] < 5.0, f
    assert 0.8 * link.rate_bytes <= f["peak_delivery"] <= link.rate_bytes, f


def test_an_urgent_incremental_commits_within_15s_while_a_1gib_full_upload_runs(clusters, tmp_path):
    """max_active_transfers: 1, so the priority-1 incremental can only start by pre-empting the full upload."""
    cluster = clusters.new().start()

    f = measure_preemption(cluster, tmp_path, full_size=1024 * MiB, urgent_size=16 * MiB, changed=8)

    assert f["listed"] == f["digest"], f
    assert f["commit_s"] <= 15.0, f"the urgent incremental took {f['commit_s']:.1f} s: {f}"
    assert f["ran_side_by_side"], f"the full upload was not running beside the incremental: {f}"
    assert not f["big_committed"] and f["big_done_fraction"] is not None and f["big_done_fraction"] < 0.5, \
        f"the full upload was not still far from its end: {f}"


def test_weights_3_to_1_share_the_link_3_to_1(clusters, meter, link):
    """Two datasets of one priority, weights 3 and 1, uploading side by side without a limit: the payload the
    broker received for each over 10 s (both running from start to end of the window)."""
    cluster = clusters.new().start()

    f = measure_weights(cluster, meter, weights=(3, 1), window_s=10.0)

    assert f["sum"] >= 0.85 * link.rate_bytes, f"together they had only {mbit(f['sum'])}: {f}"
    assert abs(f["ratio"] - 3.0) <= 0.10 * 3.0, \
        f"weights 3:1 delivered {mbit(f['rates']['heavy'])} : {mbit(f['rates']['light'])} = {f['ratio']:.2f}: {f}"


def test_the_agent_skips_a_silent_endpoint_and_fails_over_when_its_broker_dies(clusters, link, tmp_path):
    """brokers: [an address nobody answers, stack A, stack B]: the agent uses A or B; the one in use is killed
    (SIGKILL) mid-transfer; the agent moves to the other and the snapshot is committed there."""
    stacks = [clusters.new("a").start(nodes=("node-a",)), clusters.new("b").start(nodes=("node-b",))]
    a = stacks[0]
    directory = a.dataset_dir(DEVICE, "fs")
    digest = random_image(directory / "s1.img", 64 * MiB, seed=21)
    silent = f"tcp://{link.nobody_ip}:5550"  # routed, never answered: no refusal, only silence
    cfg = a.agent_config(DEVICE, [{"name": "fs", "path": directory}], brokers=[silent, *(s.frontend for s in stacks)])
    a.start_agent_once(cfg)

    def in_use():
        doc = a.agent_status(DEVICE)
        return doc and doc["connected"] and doc["broker"]

    first = a.wait_for(in_use, 30, "the agent connected to a broker")
    assert first != silent
    victim = next(s for s in stacks if s.frontend == first)
    survivor = next(s for s in stacks if s is not victim)
    victim.wait_for(lambda: victim.upload_bytes_sent(DEVICE, "fs") >= 16 * MiB, 60, "the upload under way")
    victim.kill9("broker")

    rc, doc, log = a.finish_agent(cfg.stem, timeout_s=120)

    assert rc == 0, log
    assert [(t["snapshot"], t["state"]) for t in doc["transfers"]] == [("s1", "committed")], doc
    listed = {s["snapshot"]: s["blake3"] for s in survivor.catalog(DEVICE)}
    assert listed == {"s1": digest}, f"the surviving broker lists {listed}"
    out = tmp_path / "restored.img"
    restore_cfg = survivor.agent_config(DEVICE, [{"name": "fs", "path": directory}], brokers=[survivor.frontend],
                                        state_dir=str(tmp_path / "restore-state"))
    result = survivor.restore(restore_cfg, "fs", "s1", out)
    assert result.rc == 0, str(result)
    assert file_blake3(str(out)) == digest
    shutil.rmtree(directory)
