"""End to end: a node's credit is shared 1:1 by device, with real processes (issue 11: fair shares).

office-many uploads eight datasets at once and office-one a single one, both to one node whose disk
writes are slowed (`fault_write_rate`) and whose credit window is four chunks, so what each device
gets stored is decided by the credit it is granted. While both are busy, the bytes stored for each
(status `stored_bytes`, what the node acknowledged for the device) grow at the same rate within
20%: a share measured within one run, not a timing. Measured: 0.96 to 1.04; with the scheduler from
before fair shares (first come, first served) 7.7, and with devices served round robin but no per-device cap 1.3
to 1.5. tests/test_unit_credit.py shows the rule on a fake clock.
"""

from __future__ import annotations

import pytest

from roles.sampleimages import generate_image
from tests.harness import MiB

pytestmark = pytest.mark.serial  # shares of a throttled node's time: alone, after the rest (Makefile)

MANY, ONE = "office-many", "office-one"
DATASETS = 8
WINDOW = 4 * MiB  # four 1 MiB chunks in flight on the node: two per device
WRITE_RATE = "12MB"
MEASURED = 24 * MiB  # per device, about 4 s at half of WRITE_RATE


def stored(doc: dict) -> dict:
    return {a["device_id"]: a["stored_bytes"] for a in doc["agents"]}


def uploading(doc: dict, device: str) -> int:
    return sum(1 for t in doc["transfers"] if t["device_id"] == device and t["state"] == "active")


def test_eight_uploads_of_one_device_and_one_of_another_share_a_nodes_credit_one_to_one(cluster):
    cluster.start_broker()
    cluster.start_storage(window=WINDOW, fault_write_rate=WRITE_RATE)
    many = []
    for i in range(DATASETS):
        directory = cluster.dataset_dir(MANY, f"ds{i}")
        generate_image(str(directory / "s1.img"), 16 * MiB, seed=300 + i, zero_fraction=0.0, text_fraction=0.0)
        many.append({"name": f"ds{i}", "path": directory})
    one = cluster.dataset_dir(ONE, "ds0")
    generate_image(str(one / "s1.img"), 96 * MiB, seed=399, zero_fraction=0.0, text_fraction=0.0)
    cluster.start_agent(cluster.agent_config(MANY, many, max_active_transfers=DATASETS))
    cluster.start_agent(cluster.agent_config(ONE, [{"name": "ds0", "path": one}]))

    def both_busy():
        doc = cluster.try_status()
        if doc and uploading(doc, MANY) == DATASETS and uploading(doc, ONE) == 1 and min(
                stored(doc).get(MANY, 0), stored(doc).get(ONE, 0)) >= 2 * MiB:
            return doc
        return None

    start = cluster.wait_for(both_busy, 30, f"{DATASETS} uploads of {MANY} and one of {ONE} storing")

    def measured():
        doc = cluster.try_status()
        if doc and sum(stored(doc).values()) - sum(stored(start).values()) >= 2 * MEASURED:
            return doc
        return None

    end = cluster.wait_for(measured, 40, f"{2 * MEASURED // MiB} MiB more stored", interval_s=0.05)
    assert uploading(end, MANY) >= 1 and uploading(end, ONE) == 1, "a device ran out of work while measured"
    got = {d: stored(end)[d] - stored(start)[d] for d in (MANY, ONE)}
    ratio = got[MANY] / got[ONE]
    print(f"stored while both busy: {MANY} {got[MANY] / MiB:.1f} MiB ({DATASETS} uploads), "
          f"{ONE} {got[ONE] / MiB:.1f} MiB (1 upload): ratio {ratio:.2f}")
    assert abs(ratio - 1) <= 0.2, f"{MANY}:{ONE} = {ratio:.2f}, not 1:1 within 20% ({got})"
