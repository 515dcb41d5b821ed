"""The broker's restore credit (roles/controller/restores.py), on plain numbers and a fake `now`."""

from __future__ import annotations

import pytest

from bus.errors import RequestError
from roles.controller.credit import PIECE_SLACK
from roles.controller.restores import RestoreCredit

MiB = 1 << 20
BLAKE = bytes(range(32))
ENTRY = {"size": 8 * MiB, "chunk_count": 8, "blake3": BLAKE.hex()}


def opened(credit: RestoreCredit, tid="r-1", device="dev", window=2**34, now=0.0):
    ledger = credit.admit(tid, device, window, now)
    credit.found(tid, ENTRY)
    return ledger


def test_the_window_is_capped_whatever_the_agent_asks_and_bytes_in_flight_never_pass_it():
    credit = RestoreCredit(4 * MiB, 10.0, 4)
    assert opened(credit).window == 4 * MiB
    assert credit.image("r-1", 8 * MiB, MiB, 8, BLAKE, 0.0) == 0
    for _ in range(4):
        credit.block("r-1", "node-a", MiB, 1.0)
    assert credit.in_flight("r-1") == 4 * MiB == credit.node_in_flight["node-a"]
    with pytest.raises(RequestError) as exc:
        credit.block("r-1", "node-a", 1, 1.0)
    assert exc.value.code == "credit_exceeded" and credit.in_flight("r-1") == 4 * MiB
    credit.acknowledged("r-1", "node-a", 3 * MiB, 2.0)
    assert credit.in_flight("r-1") == MiB == credit.node_in_flight["node-a"]


def test_an_agent_cannot_acknowledge_more_than_it_received():
    credit = RestoreCredit(4 * MiB, 10.0, 4)
    opened(credit)
    credit.image("r-1", 8 * MiB, MiB, 8, BLAKE, 0.0)
    credit.block("r-1", "node-a", MiB, 1.0)
    with pytest.raises(RequestError) as exc:
        credit.acknowledged("r-1", "node-a", 2**40, 1.0)
    assert exc.value.code == "credit_exceeded" and credit.in_flight("r-1") == MiB


def test_a_window_smaller_than_a_chunk_grows_to_one_chunk_at_image():
    credit = RestoreCredit(64 * 1024, 10.0, 4)
    opened(credit)
    assert credit.image("r-1", 8 * MiB, MiB, 8, BLAKE, 0.0) == MiB + PIECE_SLACK - 64 * 1024
    assert credit.window("r-1") == MiB + PIECE_SLACK


@pytest.mark.parametrize("size, chunk_size, chunks, digest", [
    (8 * MiB, MiB, 7, BLAKE),  # a chunk short
    (7 * MiB, MiB, 7, BLAKE),  # a consistent lie about both
    (8 * MiB + 1, MiB, 8, BLAKE),  # a size that is not the catalog's
    (8 * MiB, 2 * MiB, 8, BLAKE),  # a geometry that cannot be
    (8 * MiB, MiB, 8, bytes(32)),  # another image's blake3
])
def test_an_image_that_is_not_the_catalogs_is_refused(size, chunk_size, chunks, digest):
    credit = RestoreCredit(4 * MiB, 10.0, 4)
    opened(credit)
    with pytest.raises(RequestError) as exc:
        credit.image("r-1", size, chunk_size, chunks, digest, 0.0)
    assert exc.value.code == "catalog_mismatch"


def test_restores_per_device_is_a_budget_and_release_gives_the_slot_back():
    credit = RestoreCredit(4 * MiB, 10.0, 2)
    opened(credit, "r-1")
    opened(credit, "r-2")
    with pytest.raises(RequestError) as exc:
        credit.admit("r-3", "dev", MiB, 0.0)
    assert exc.value.code == "over_budget" and "r-3" not in credit.ledgers
    opened(credit, "r-9", device="other")  # another device is not affected
    credit.image("r-1", 8 * MiB, MiB, 8, BLAKE, 0.0)
    credit.block("r-1", "node-a", MiB, 0.0)
    credit.release("r-1", "node-a", "dev")
    assert "node-a" not in credit.node_in_flight
    opened(credit, "r-3")


def test_a_restore_without_progress_is_due_after_the_idle_timeout_and_progress_postpones_it():
    credit = RestoreCredit(4 * MiB, 10.0, 4)
    opened(credit, "r-1", now=0.0)
    opened(credit, "r-2", now=0.0)
    credit.image("r-2", 8 * MiB, MiB, 8, BLAKE, 5.0)
    assert credit.idle_due(9.9) == []
    assert credit.idle_due(10.0) == ["r-1"]
    assert credit.next_due() == 15.0
    credit.block("r-2", "node-a", MiB, 12.0)
    assert credit.idle_due(15.0) == []
    credit.acknowledged("r-2", "node-a", 0, 20.0)  # acknowledging nothing is not progress
    assert credit.idle_due(22.0) == ["r-2"]
