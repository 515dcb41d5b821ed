"""End to end on loopback: the agent's order of work, catch-up, endpoint failover, changed-block tracking.

The real broker, storage workers and agent (tests/harness.py). What needs a
shaped link (rates, yield, pre-emption against a long upload, weights) is in
tests/test_e2e_link.py; this file checks what the agent decides and what
reaches the cloud: the order snapshots are committed in (the catalog's
`committed_at`, with one transfer at a time), which snapshots travel at all,
which broker gets them, and how many bytes the agent read.
"""

from __future__ import annotations

import os
import shutil
import signal

import blake3

from roles.sampleimages import file_blake3, generate_image, mutate_chunks
from roles.statusclient import ask
from schemas import make
from tests.harness import Cluster, MiB, assert_restores, chunk_names, free_ports, uploads_of


def commit_order(cluster, device_id: str) -> list[tuple[str, str]]:
    """(dataset, snapshot) of a device's catalog in the order they were committed."""
    return [(s["dataset"], s["snapshot"]) for s in sorted(cluster.catalog(device_id), key=lambda s: s["committed_at"])]


def by_key(doc: dict) -> dict:
    return {(t["dataset"], t["snapshot"]): t for t in doc["transfers"]}


def agent_status(cluster, device_id: str) -> dict | None:
    """The running agent's own status (its default status socket, ipc in its state_dir), None if silent."""
    endpoint = f"ipc://{cluster.root / 'var' / device_id / 'agent.sock'}"
    try:
        return dict(ask(endpoint, make("STATUS"), 2000)["status"])
    except Exception:  # not started yet, or gone
        return None


def publish(directory, snapshot: str, make_image) -> str:
    """Create <snapshot>.img as writers do (another name, then rename); returns its blake3."""
    staging = directory / f".{snapshot}.staging"
    digest = make_image(str(staging))
    os.rename(staging, directory / f"{snapshot}.img")
    return digest


def interrupt_an_upload(cluster, device_id: str, cfg, image) -> str:
    """Write a 16 MiB image, start a daemon agent with `cfg` (which should limit its rate) and SIGKILL it once
    4 MiB of the upload are stored. Returns the image's blake3."""
    digest = generate_image(str(image), 16 * MiB, seed=9, zero_fraction=0.0, text_fraction=0.0)
    dataset = image.parent.name
    cluster.start_agent(cfg)
    cluster.wait_for(lambda: sum(t["bytes_done"] for t in cluster.transfers(device_id) if t["dataset"] == dataset)
                     >= 4 * MiB, 30, f"{dataset} under way")
    cluster.kill9(cfg.stem)
    return digest


def test_work_goes_by_priority_then_action_then_age(cluster, tmp_path):
    """One transfer at a time; within a priority, resume before incremental before full, whatever the ids say;
    then older ids first. The interrupted upload resumes without resending what the cloud holds."""
    cluster.start()
    dev = "office-1"
    d = {name: cluster.dataset_dir(dev, name) for name in ("p1full", "p2inc", "p2full", "p2full_b", "p3inc",
                                                            "p3res")}
    priority = {"p1full": 1, "p2inc": 2, "p2full": 2, "p2full_b": 2, "p3inc": 3, "p3res": 3}

    def config(names, **overrides):
        return cluster.agent_config(dev, [{"name": n, "path": d[n], "priority": priority[n]} for n in names],
                                    **overrides)

    # history: p2inc and p3inc have a committed snapshot each
    for seed, name in enumerate(("p2inc", "p3inc")):
        generate_image(str(d[name] / "s1.img"), 2 * MiB, seed=seed)
    rc, _, stderr = cluster.run_agent_once(config(["p2inc", "p3inc"]))
    assert rc == 0, stderr
    # an upload of p3res interrupted (SIGKILL) half-way: the journal says "resume"
    res_digest = interrupt_an_upload(cluster, dev, config(["p3res"], limit="16Mbit"), d["p3res"] / "s9.img")
    cluster.wait_for(lambda: not any(a["connected"] for a in cluster.status()["agents"]), 30,
                     "the broker to notice the killed agent is gone")
    random = dict(zero_fraction=0.0, text_fraction=0.0)
    # now pending: ids chosen so that age alone would give another order
    for name, snapshot, seed in (("p1full", "s5", 11), ("p2inc", "s2", 12), ("p2full", "s1", 13),
                                 ("p2full_b", "s0", 14), ("p3inc", "s2", 15)):
        generate_image(str(d[name] / f"{snapshot}.img"), 2 * MiB, seed=seed, **random)

    rc, doc, stderr = cluster.run_agent_once(config(list(d), max_active_transfers=1))

    assert rc == 0, stderr
    order = commit_order(cluster, dev)[2:]  # after the two history snapshots
    assert order == [("p1full", "s5"),                        # priority 1 first, though a full upload
                     ("p2inc", "s2"),                         # priority 2: the incremental before the fulls
                     ("p2full_b", "s0"), ("p2full", "s1"),    # then the fulls, oldest id first
                     ("p3res", "s9"),                         # priority 3: the resumed upload first
                     ("p3inc", "s2")], order
    resumed = by_key(doc)[("p3res", "s9")]
    assert resumed["state"] == "committed" and resumed["chunks_sent"] < resumed["chunks_total"], \
        f"the interrupted upload was sent again from the start: {resumed}"
    assert_restores(cluster, config(list(d)), "p3res", "s9", res_digest, tmp_path)


def test_an_agent_restarted_at_once_after_a_crash_resumes_on_its_first_attempt(cluster, tmp_path):
    """kill -9 of the agent mid-upload, then at once (as a service manager would) `agent --once`: the upload
    resumes from what the cloud holds and commits, without a failed attempt in between."""
    cluster.start()
    dev = "office-8"
    directory = cluster.dataset_dir(dev, "fs")
    datasets = [{"name": "fs", "path": directory}]
    digest = interrupt_an_upload(cluster, dev, cluster.agent_config(dev, datasets, limit="16Mbit"),
                                 directory / "s1.img")

    rc, doc, stderr = cluster.run_agent_once(cluster.agent_config(dev, datasets))

    assert rc == 0, stderr
    t = by_key(doc)[("fs", "s1")]
    assert t["state"] == "committed" and t["chunks_sent"] < t["chunks_total"], t
    attempts = [(u["transfer_id"], u["state"], u.get("reason")) for u in uploads_of(cluster.status(), dev, "fs", "s1")]
    assert not [a for a in attempts if a[1] == "failed"], f"attempts at the broker: {attempts}"
    assert_restores(cluster, cluster.agent_config(dev, datasets), "fs", "s1", digest, tmp_path)


def test_a_configured_action_order_puts_full_uploads_before_incrementals(cluster):
    cluster.start()
    dev = "office-2"
    inc, full = cluster.dataset_dir(dev, "inc"), cluster.dataset_dir(dev, "full")
    generate_image(str(inc / "s1.img"), 2 * MiB, seed=1)
    datasets = [{"name": "inc", "path": inc, "priority": 2}, {"name": "full", "path": full, "priority": 2}]
    rc, _, stderr = cluster.run_agent_once(cluster.agent_config(dev, datasets))
    assert rc == 0, stderr
    generate_image(str(inc / "s2.img"), 2 * MiB, seed=2)
    generate_image(str(full / "s3.img"), 2 * MiB, seed=3)

    rc, _, stderr = cluster.run_agent_once(cluster.agent_config(
        dev, datasets, max_active_transfers=1, action_order=["full", "incremental", "resume", "verify"]))

    assert rc == 0, stderr
    assert commit_order(cluster, dev) == [("inc", "s1"), ("full", "s3"), ("inc", "s2")]


def test_catch_up_latest_replicates_only_the_newest_of_5_behind(cluster, tmp_path):
    """Two datasets fall 5 snapshots behind: `latest` sends only the newest, `all` every one, oldest first."""
    cluster.start()
    dev = "office-3"
    dirs = {policy: cluster.dataset_dir(dev, policy) for policy in ("latest", "all")}
    datasets = [{"name": p, "path": dirs[p], "catch_up": p} for p in dirs]
    cfg = cluster.agent_config(dev, datasets)
    for i, directory in enumerate(dirs.values()):
        generate_image(str(directory / "s1.img"), 16 * MiB, seed=30 + i)
    rc, _, stderr = cluster.run_agent_once(cfg)
    assert rc == 0, stderr
    digests = {}
    for policy, directory in dirs.items():
        for n in range(2, 7):  # s2..s6, each with chunk 1 and one other changed from the one before
            digests[policy, f"s{n}"] = publish(directory, f"s{n}", lambda out, n=n, directory=directory: mutate_chunks(
                str(directory / f"s{n - 1}.img"), out, [1, n + 4], seed=n))

    rc, doc, stderr = cluster.run_agent_once(cfg)

    assert rc == 0, stderr
    got = by_key(doc)
    assert {k: t["state"] for k, t in got.items() if k[0] == "latest"} == \
        {("latest", "s2"): "skipped", ("latest", "s3"): "skipped", ("latest", "s4"): "skipped",
         ("latest", "s5"): "skipped", ("latest", "s6"): "committed"}, doc
    # what travels for `latest` is what differs from s1, for `all` every step's changes
    before, after = chunk_names(dirs["latest"] / "s1.img"), chunk_names(dirs["latest"] / "s6.img")
    changed = sum(a != b for a, b in zip(before, after))
    assert got[("latest", "s6")]["chunks_sent"] == changed == 6, got[("latest", "s6")]
    assert sum(t["chunks_sent"] for k, t in got.items() if k[0] == "all") == 2 * 5, doc
    order = commit_order(cluster, dev)
    assert [s for ds, s in order if ds == "latest"] == ["s1", "s6"]
    assert [s for ds, s in order if ds == "all"] == ["s1", "s2", "s3", "s4", "s5", "s6"]
    listed = {(s["dataset"], s["snapshot"]): s["blake3"] for s in cluster.catalog(dev)}
    assert listed[("latest", "s6")] == digests["latest", "s6"]
    assert_restores(cluster, cfg, "latest", "s6", digests["latest", "s6"], tmp_path)
    # skipped means settled: the next run has nothing to do
    rc, doc, stderr = cluster.run_agent_once(cfg)
    assert (rc, doc) == (0, {"transfers": []}), stderr


def _second_stack(tmp_path) -> Cluster:
    return Cluster(tmp_path / "stack-b")


def test_with_the_first_endpoint_unreachable_the_agent_uses_the_second_and_completes(cluster, tmp_path):
    cluster.start()
    dev = "office-4"
    directory = cluster.dataset_dir(dev, "fs")
    digest = generate_image(str(directory / "s1.img"), 16 * MiB, seed=40)
    (nobody,) = free_ports(1)  # nothing listens there
    cfg = cluster.agent_config(dev, [{"name": "fs", "path": directory}],
                               brokers=[f"tcp://127.0.0.1:{nobody}", cluster.frontend])

    rc, doc, stderr = cluster.run_agent_once(cfg, timeout_s=60)

    assert rc == 0, stderr
    assert by_key(doc)[("fs", "s1")]["state"] == "committed"
    assert {s["snapshot"]: s["blake3"] for s in cluster.catalog(dev)} == {"s1": digest}


def test_restore_uses_an_answering_endpoint_when_the_first_is_unreachable(cluster, tmp_path):
    """The same agent config, first endpoint down: `restore` must reach the broker that answers."""
    cluster.start()
    dev = "office-5"
    directory = cluster.dataset_dir(dev, "fs")
    digest = generate_image(str(directory / "s1.img"), 8 * MiB, seed=50)
    (nobody,) = free_ports(1)
    cfg = cluster.agent_config(dev, [{"name": "fs", "path": directory}],
                               brokers=[f"tcp://127.0.0.1:{nobody}", cluster.frontend], connect_timeout_ms=10000)
    rc, _, stderr = cluster.run_agent_once(cfg, timeout_s=60)
    assert rc == 0, stderr

    assert_restores(cluster, cfg, "fs", "s1", digest, tmp_path)


def test_when_the_broker_in_use_stops_answering_the_agent_moves_to_the_other_and_completes(cluster, tmp_path):
    """Two broker stacks; the one the agent uses is frozen (SIGSTOP: its connection stays open, it just goes
    silent) mid-transfer; the agent moves to the other stack and the snapshot is committed there."""
    stacks = [cluster.start(nodes=("node-a",)), _second_stack(tmp_path)]
    try:
        stacks[1].start(nodes=("node-b",))
        dev = "office-6"
        directory = cluster.dataset_dir(dev, "fs")
        digest = generate_image(str(directory / "s1.img"), 40 * MiB, seed=60, zero_fraction=0.0, text_fraction=0.0)
        cfg = cluster.agent_config(dev, [{"name": "fs", "path": directory}], limit="64Mbit",
                                   brokers=[s.frontend for s in stacks])
        cluster.start_agent_once(cfg)

        def in_use():
            doc = agent_status(cluster, dev)
            return doc and doc["connected"] and doc["broker"]

        first = cluster.wait_for(in_use, 30, "the agent connected")
        victim = next(s for s in stacks if s.frontend == first)
        survivor = next(s for s in stacks if s is not victim)
        victim.wait_for(lambda: sum(t["bytes_sent"] for t in victim.transfers(dev)) >= 8 * MiB, 60,
                        "the upload under way")
        victim.procs["broker"].send_signal(signal.SIGSTOP)
        try:
            rc, doc, log = cluster.finish_agent(cfg.stem, timeout_s=120)
        finally:
            victim.procs["broker"].send_signal(signal.SIGCONT)

        assert rc == 0, log
        assert by_key(doc)[("fs", "s1")]["state"] == "committed", doc
        assert {s["snapshot"]: s["blake3"] for s in survivor.catalog(dev)} == {"s1": digest}
        assert "silent; reconnecting" in log, "the agent did not notice the silence"
    finally:
        stacks[1].stop()


def test_a_changes_sidecar_of_1_percent_reads_at_most_2_percent_of_a_1gib_image(cluster, tmp_path):
    """s2 differs from s1 in ranges listed by s2.changes (1% of the image, some crossing chunk boundaries):
    only chunks touching them are read; s2 restores identical."""
    cluster.start()
    dev = "office-7"
    directory = cluster.dataset_dir(dev, "vm")
    size = 1024 * MiB
    generate_image(str(directory / "s1.img"), size, seed=70)
    cfg = cluster.agent_config(dev, [{"name": "vm", "path": directory}])
    rc, doc, stderr = cluster.run_agent_once(cfg, timeout_s=300)
    assert rc == 0, stderr
    assert by_key(doc)[("vm", "s1")]["bytes_read"] == size

    # 1% of the image in ranges as a hypervisor lists them: whole chunks, runs across a chunk boundary,
    # scattered 4 KiB pages within one chunk, and the image's tail
    ranges = [(i * MiB, MiB) for i in (3, 100, 257, 400, 611, 802, 999)]              # 7 MiB
    ranges += [(i * MiB + MiB // 2, MiB) for i in (150, 700)]                         # 2 MiB over 4 chunks
    ranges += [(500 * MiB + k * 16384, 4096) for k in range(64)]                      # 256 KiB in one chunk
    listed = sum(n for _, n in ranges)
    ranges.append((size - (size // 100 - listed), size // 100 - listed))              # the rest, at the end
    touched = {i for off, n in ranges for i in range(off // MiB, (off + n - 1) // MiB + 1)}
    staging = tmp_path / "s2.img"
    shutil.copyfile(directory / "s1.img", staging)
    with open(staging, "r+b") as f:
        for k, (off, n) in enumerate(ranges):
            f.seek(off)
            f.write(blake3.blake3(f"change {k}".encode()).digest(length=n))
    (directory / "s2.changes").write_text("".join(f"{off} {n}\n" for off, n in ranges))
    os.rename(staging, directory / "s2.img")
    digest = file_blake3(str(directory / "s2.img"))

    rc, doc, stderr = cluster.run_agent_once(cfg, timeout_s=300)

    assert rc == 0, stderr
    t = by_key(doc)[("vm", "s2")]
    assert sum(n for _, n in ranges) == size // 100
    assert t["state"] == "committed"
    assert t["bytes_read"] <= 0.02 * size, f"read {t['bytes_read']} bytes of {size}: {t}"
    # plus the few unchanged chunks read to check the sidecar (cbt_sample_chunks / cbt_sample_fraction)
    assert t["chunks_sampled"] == 4, t
    assert t["bytes_read"] == (len(touched) + t["chunks_sampled"]) * MiB, t
    assert t["chunks_sent"] == len(touched), t
    assert {s["snapshot"]: s["blake3"] for s in cluster.catalog(dev)}["s2"] == digest
    assert_restores(cluster, cfg, "vm", "s2", digest, tmp_path)
