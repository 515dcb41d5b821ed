"""`no_space` (issue 12, item 6): an offer no node has room for is parked, and offered again when room
appears. Placement's rule, the broker core on a hand-driven clock (the test plays agents and nodes),
and the agent's bookkeeping of a no_space park."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bus.errors import RequestError
from roles.appliance.outcomes import NO_SPACE_MAX_S, PARK_RETRY_S, Outcomes
from roles.controller.nospace import NoSpaceWaits
from roles.controller.placement import choose_node
from schemas import make
from tests.test_unit_stall_watchdog import CHUNK, NODE, Broker

MB = 10**6


def node(node_id, free, used=0, reserved=0):
    return SimpleNamespace(node_id=node_id, free_bytes=free, used_bytes=used, reserved_bytes=reserved, load=0)


def refusal(placed_on, nodes, size) -> str:
    with pytest.raises(RequestError) as exc:
        choose_node(placed_on, {n.node_id: n for n in nodes}, lambda _: 0, size)
    return exc.value.code


def test_placement_refuses_no_space_for_now_and_image_too_large_for_never():
    a, b = node("a", free=100, used=900, reserved=40), node("b", free=50, used=50)
    assert choose_node(None, {"a": a, "b": b}, lambda _: 0, 60) == "a"
    assert refusal(None, [a, b], 61) == "no_space"  # a has 60 not reserved, b 50
    assert refusal(None, [a, b], 1001) == "image_too_large"  # more than a's whole disk
    assert refusal("b", [a, b], 51) == "no_space"  # its dataset is on b: a's room does not count
    assert refusal("b", [a, b], 101) == "image_too_large"  # b's disk is 100
    # within PLACEMENT_BUCKET nodes count as equal, but a node without room is never chosen
    assert choose_node(None, {"a": node("a", 10), "b": node("b", 20)}, {"a": 0, "b": 5}.get, 15) == "b"


def test_wakes_fit_the_room_round_robin_over_devices_and_hold_it_for_a_while():
    waits = NoSpaceWaits(per_device=3)
    for i in range(3):
        waits.park(("greedy", "ds", f"s{i}"), 40, None, b"g")
    waits.park(("modest", "ds", "s0"), 40, None, b"m")
    nodes = {"a": node("a", free=100)}
    woken = waits.wake(nodes, now=0.0)
    assert [(w[1], w[3]) for w in woken] == [("greedy", "s0"), ("modest", "s0")]  # 80 of 100: one each
    assert waits.wake(nodes, now=1.0) == []  # their room is held: nothing promised twice
    nodes["a"].free_bytes = 180
    assert [(w[1], w[3]) for w in waits.wake(nodes, now=2.0)] == [("greedy", "s1"), ("greedy", "s2")]
    waits.park(("greedy", "ds", "s3"), 40, None, b"g")  # a fourth: its oldest gives way
    assert len(waits) == 4 and ("ds", "s0") not in waits.by_device["greedy"]


def test_a_waiting_offer_of_a_placed_dataset_is_woken_only_by_its_node():
    waits = NoSpaceWaits()
    waits.park(("d", "ds", "s1"), 50, "a", b"r")
    assert waits.wake({"a": node("a", 10), "b": node("b", 1000)}, 0.0) == []
    assert waits.wake({"a": node("a", 60), "b": node("b", 1000)}, 0.0) == [(b"r", "d", "ds", "s1")]


def offer(broker, device, dataset, snapshot, chunks, req=1):
    broker.says(("agent", device.encode()), make("OFFER", req=req, dataset=dataset, snapshot=snapshot,
                                                 image_size=chunks * CHUNK, chunk_size=CHUNK, chunk_count=chunks))


def test_the_broker_parks_an_offer_without_room_and_says_room_when_a_node_reports_it(tmp_path):
    broker = Broker(tmp_path, node_window=64 * CHUNK)
    agent = ("agent", b"office-1")
    broker.node_says(make("HEARTBEAT", free_bytes=4 * CHUNK, used_bytes=100 * CHUNK))
    broker.says(agent, make("HELLO", device_id="office-1"))
    offer(broker, "office-1", "fs", "s1", chunks=8)
    (error,) = broker.to(agent, "ERROR")
    assert error["code"] == "no_space" and error["ref"] == "OFFER", error
    assert not broker.to(NODE, "OPEN")
    (parked,) = broker.core.history.parked.values()
    assert parked.state == "parked" and parked.reason.startswith("no_space: "), parked.status()

    broker.node_says(make("HEARTBEAT", free_bytes=6 * CHUNK, used_bytes=100 * CHUNK))
    assert not broker.to(agent, "ROOM"), "room for 6 chunks is not room for 8"
    broker.node_says(make("HEARTBEAT", free_bytes=9 * CHUNK, used_bytes=100 * CHUNK))  # GC freed some
    (room,) = broker.to(agent, "ROOM")
    assert (room["dataset"], room["snapshot"]) == ("fs", "s1")
    broker.node_says(make("HEARTBEAT", free_bytes=10 * CHUNK, used_bytes=100 * CHUNK))
    assert len(broker.to(agent, "ROOM")) == 1, "woken twice for one room"

    offer(broker, "office-1", "fs", "s1", chunks=8, req=2)
    assert broker.to(NODE, "OPEN") and not broker.core.history.parked and not len(broker.core.space_waits)


def test_a_node_that_fills_mid_upload_parks_it_no_space_and_a_new_node_wakes_it(tmp_path):
    broker = Broker(tmp_path, node_window=64 * CHUNK)
    tid = broker.upload("office-1", chunks=8)  # a new dataset: any node may take it again
    broker.node_says(make("ERROR", code="no_space", reason="store failed: No space left on device", ref="CHUNK",
                          transfer_id=tid))
    assert broker.state(tid) == "parked"
    assert len(broker.core.space_waits) == 1
    broker.says(("node", b"node-b"), make("READY", node_id="node-b", window=CHUNK, free_bytes=1 << 30,
                                          used_bytes=0))
    assert broker.to(("agent", b"office-1"), "ROOM")


def test_the_agent_backs_off_a_no_space_park_and_room_ends_the_wait():
    outcomes, key = Outcomes(once=False, park_timeout_s=60), ("fs", "s1")
    delays = []
    for attempt in range(12):
        after = outcomes.settle(key, {}, "parked", "no_space: full", True, now=1000.0 * attempt)
        delays.append(after.at - 1000.0 * attempt)
    assert delays[:3] == [PARK_RETRY_S, 2 * PARK_RETRY_S, 4 * PARK_RETRY_S] and delays[-1] == NO_SPACE_MAX_S
    assert outcomes.attempts.get(key, 0) <= 0, "a no_space park counted as a failed attempt"
    assert outcomes.room(key, now=11_001.0) and outcomes.ready(key, 11_001.0)
    assert not outcomes.room(("fs", "other"), 11_001.0)
    after = outcomes.settle(key, {}, "parked", "node_unavailable: gone", True, now=12_000.0)
    assert after.at - 12_000.0 == PARK_RETRY_S and not outcomes.room(key, 12_000.5)
