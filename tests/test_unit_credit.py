"""Credit accounting in bytes: the broker's per-transfer bookkeeping and the pools."""

import random

import pytest

from bus.credit import CreditPool, SendCredit
from bus.errors import RequestError
from roles.controller.transfers import Transfer

MiB = 1 << 20


def upload(window=8 * MiB, chunks=64):
    return Transfer("t-1", "upload", "dev", "ds", "s1", "node-a", b"r", 1, image_size=chunks * MiB,
                    chunk_size=MiB, chunk_count=chunks, window=window, state="active")


def test_send_credit_never_goes_negative():
    credit = SendCredit(100)
    assert credit.try_spend(60)
    assert not credit.try_spend(60)
    assert credit.available == 40


def test_pool_grants_at_most_its_window_and_clamps_bad_returns():
    pool = CreditPool(10)
    assert pool.take(7) == 7
    assert pool.take(7) == 3
    assert pool.take(1) == 0
    pool.release(1000)
    assert pool.outstanding == 0


def test_no_credit_is_wanted_beyond_demand():
    t = upload()
    assert t.credit_wanted() == 0
    t.on_missing(0, 16, [0, 1])
    assert t.credit_wanted() == 2 * MiB
    assert t.bytes_done == 14 * MiB


def test_sending_beyond_credit_is_refused():
    t = upload()
    t.on_missing(0, 16, [0])
    t.holding = 1000
    with pytest.raises(RequestError) as info:
        t.on_chunk_sent(b"a" * 32, 5000, MiB)
    assert info.value.code == "credit_exceeded"


def test_random_schedule_keeps_node_outstanding_within_window():
    """Several uploads share one node's pool; whatever the order of events,
    holding + in flight summed over uploads equals the pool's outstanding and
    never exceeds the window, and every chunk is eventually sent."""
    rng = random.Random(7)
    pool = CreditPool(6 * MiB)
    uploads = [upload(window=4 * MiB, chunks=32) for _ in range(3)]
    for i, t in enumerate(uploads):
        t.transfer_id = f"t-{i}"
        t.on_missing(0, 32, list(range(32)))
    to_send = {t.transfer_id: list(range(32)) for t in uploads}
    sent_total = 0
    for _ in range(20000):
        t = rng.choice(uploads)
        action = rng.random()
        if action < 0.4:
            wanted = t.credit_wanted()
            if wanted and pool.free >= min(wanted, MiB + 1024):
                t.holding += pool.take(wanted)
        elif action < 0.75 and to_send[t.transfer_id]:
            wire = rng.randint(MiB // 4, MiB)
            if wire <= t.holding:
                index = to_send[t.transfer_id].pop(0)
                t.on_chunk_sent(index.to_bytes(32, "big"), wire, MiB)
                sent_total += 1
        elif t.in_flight:
            name = rng.choice(list(t.in_flight))
            pool.release(t.on_chunk_done(name, stored=True))
        assert sum(u.holding + u.in_flight_bytes for u in uploads) == pool.outstanding <= pool.window
        if sent_total == 96 and not any(u.in_flight for u in uploads):
            break
    assert sent_total == 96
    assert all(u.bytes_done == 32 * MiB for u in uploads)
    for u in uploads:
        pool.release(u.release_all())
    assert pool.outstanding == 0
