"""Per-device budgets (roles/controller/budgets.py): each refusal is per device and allocates nothing."""

from types import SimpleNamespace

import pytest

from bus.errors import RequestError
from roles.controller.budgets import DeviceBudgets


def test_uploads_per_device_are_capped_and_other_devices_unaffected():
    budgets = DeviceBudgets(uploads_max=2, query_rate=10, query_burst=5)
    for _ in range(2):
        budgets.admit_upload("evil")
        budgets.upload_started("evil")
    with pytest.raises(RequestError) as exc:
        budgets.admit_upload("evil")
    assert exc.value.code == "over_budget"
    budgets.admit_upload("honest")  # another device is not refused
    budgets.upload_ended("evil")
    budgets.admit_upload("evil")  # one ended: room again
    budgets.upload_ended("evil")
    assert "evil" not in budgets.uploads


def test_query_rate_is_a_token_bucket_per_device():
    budgets = DeviceBudgets(uploads_max=1, query_rate=10, query_burst=5)
    for _ in range(5):
        budgets.admit_query("evil", 0.0)
    with pytest.raises(RequestError) as exc:
        budgets.admit_query("evil", 0.0)
    assert exc.value.code == "rate_limited"
    budgets.admit_query("honest", 0.0)  # its own bucket, full
    budgets.admit_query("evil", 0.1)  # 0.1 s at 10/s: one token back
    with pytest.raises(RequestError):
        budgets.admit_query("evil", 0.1)


def _offer(device, snapshot):
    from roles.controller.transfers import Transfer
    return Transfer(f"p-{device}-{snapshot}", "upload", device, "ds", snapshot, "", b"r", 0)


def test_parked_offers_are_capped_per_device_and_expire():
    from roles.controller.history import History

    history = History(keep=10, parked_per_device=3, parked_ttl=100.0)
    for i in range(10):
        history.park(_offer("evil", f"s{i}"), "no node", now=float(i))
    history.park(_offer("honest", "s0"), "no node", now=9.5)
    evil = [k for k in history.parked if k[0] == "evil"]
    assert [k[2] for k in evil] == ["s7", "s8", "s9"], "the device's oldest give way"
    assert ("honest", "ds", "s0") in history.parked, "another device's entry stays"
    history.expire(107.5)
    assert [k[2] for k in history.parked] == ["s8", "s9", "s0"]
    assert history.next_expiry() == 108.0
    history.expire(1000.0)
    assert not history.parked and not history.parked_by_device and not history.parked_at
