"""End to end: a `.changes` sidecar that under-reports is caught (issue 11, item 9).

s2 differs from s1 in two chunks, and its sidecar lists only one of them.
Trusted, the other would keep s1's name in s2's manifest: the cloud would
commit a snapshot that is not the image. The agent reads a sample of the
unchanged chunks (here all of them: `cbt_sample_fraction` 0.99 makes the
test deterministic) and compares them with s1's manifest; the mismatch makes
it warn and read the whole image, so the committed blake3 is the image's and
s2 restores identical. Without the sampled check this test fails: the
restore differs.
"""

from __future__ import annotations

from pathlib import Path

from roles.sampleimages import file_blake3, generate_image, mutate_chunks
from tests.harness import MiB, assert_restores

CHUNKS = 8


def by_key(doc) -> dict:
    return {(t["dataset"], t["snapshot"]): t for t in doc["transfers"]}


def first_snapshot_committed(cluster, dev: str, seed: int, **agent_settings):
    """Starts the cluster and commits s1 of dataset vm; returns its directory and the agent config."""
    cluster.start()
    directory = cluster.dataset_dir(dev, "vm")
    generate_image(str(directory / "s1.img"), CHUNKS * MiB, seed=seed, zero_fraction=0.0, text_fraction=0.0)
    cfg = cluster.agent_config(dev, [{"name": "vm", "path": directory}], **agent_settings)
    rc, _, stderr = cluster.run_agent_once(cfg)
    assert rc == 0, stderr
    return directory, cfg


def test_a_sidecar_that_under_reports_a_change_still_commits_the_true_image(cluster, tmp_path):
    dev = "office-9"
    directory, cfg = first_snapshot_committed(cluster, dev, 91, cbt_sample_fraction=0.99)

    honest = tmp_path / "honest.changes"
    digest = mutate_chunks(str(directory / "s1.img"), str(tmp_path / "s2.img"), [2, 5], seed=92,
                           changes_path=str(honest))
    lines = [line for line in honest.read_text().splitlines() if line.strip()]
    assert len(lines) == 2
    (directory / "s2.changes").write_text(lines[0] + "\n")  # chunk 5's change is not listed
    Path(tmp_path / "s2.img").rename(directory / "s2.img")

    rc, doc, stderr = cluster.run_agent_once(cfg)

    assert rc == 0, stderr
    t = by_key(doc)[("vm", "s2")]
    assert t["state"] == "committed" and t.get("sidecar_lied") is True, t
    assert t["bytes_read"] >= CHUNKS * MiB, t  # the whole image, after the sample
    assert "sidecar under-reports" in stderr and "chunk(s) 5" in stderr, stderr[-3000:]
    assert {s["snapshot"]: s["blake3"] for s in cluster.catalog(dev)}["s2"] == digest == file_blake3(
        str(directory / "s2.img"))
    assert_restores(cluster, cfg, "vm", "s2", digest, tmp_path)


def test_an_honest_sidecar_reads_only_the_changed_chunks_and_the_sample(cluster, tmp_path):
    dev = "office-10"
    directory, cfg = first_snapshot_committed(cluster, dev, 93, cbt_sample_chunks=2)
    digest = mutate_chunks(str(directory / "s1.img"), str(tmp_path / "s2.img"), [3], seed=94,
                           changes_path=str(directory / "s2.changes"))
    Path(tmp_path / "s2.img").rename(directory / "s2.img")

    rc, doc, stderr = cluster.run_agent_once(cfg)

    assert rc == 0, stderr
    t = by_key(doc)[("vm", "s2")]
    assert t["state"] == "committed" and "sidecar_lied" not in t, t
    assert t["chunks_sampled"] == 2 and t["bytes_read"] == 3 * MiB, t
    assert {s["snapshot"]: s["blake3"] for s in cluster.catalog(dev)}["s2"] == digest
    assert_restores(cluster, cfg, "vm", "s2", digest, tmp_path)
