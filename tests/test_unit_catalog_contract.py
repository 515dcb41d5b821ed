"""The catalog's method contract (roles/controller/catalog.py SqlCatalog), the same assertions on
both engines: the embedded SQLite and a real PostgreSQL (tests/pgserver.py; missing, these skip,
or fail under CI=true). Placements and the first-placement race, record/lookup/list paging,
prune/pruning/pruned, usage, drains. What only PostgreSQL has (the retention lock two brokers
share, reconnecting after the server restarts, schema_version) is at the end.
The SQLite-only migrations are in test_unit_retention.py and test_unit_drain.py."""

from __future__ import annotations

import threading

import pytest

from bus.errors import RequestError
from roles.controller.catalog import CatalogStore, open_read_only, prune_plan, unavailable_reason
from roles.retention import parse_retention

BLAKE = b"\x01" * 32


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request, tmp_path):
    """A function opening one more store on the test's one catalog (another broker, or a restarted one)."""
    stores = []
    if request.param == "sqlite":
        def make():
            stores.append(CatalogStore(str(tmp_path / "broker")))
            return stores[-1]
        make.url = ""
    else:
        from roles.controller.catalogpg import PgCatalogStore
        url = request.getfixturevalue("pg_url")

        def make():
            stores.append(PgCatalogStore(url))
            return stores[-1]
        make.url = url
    make.dir = str(tmp_path / "broker")
    yield make
    for store in stores:
        store.close()


def raw(store, sql: str) -> None:
    """A statement both engines run, straight on the store's database (what another writer did)."""
    store._execute(sql)


def test_record_lookup_and_list_in_key_order_one_page_at_a_time(opener):
    store = opener()
    rows = [(device, "fs", f"s{i}", "node-a", 4096 * (i + 1), i + 1, bytes([i]) * 32, 1000.0 + i)
            for device in ("office-2", "office-1") for i in range(5)]
    committed_at = store.record_many(rows)
    entry = store.lookup("office-1", "fs", "s3")
    assert entry == {"device_id": "office-1", "dataset": "fs", "snapshot": "s3", "node_id": "node-a",
                     "size": 4096 * 4, "chunk_count": 4, "blake3": (bytes([3]) * 32).hex(),
                     "committed_at": committed_at, "taken_at": 1003.0}
    assert store.lookup("office-1", "fs", "nope") is None
    keys, after = [], None
    while True:
        page, after = store.list(after=after, limit=3)
        assert len(page) <= 3
        keys += [(r["device_id"], r["snapshot"]) for r in page]
        if after is None:
            break
    assert keys == sorted((d, f"s{i}") for d in ("office-1", "office-2") for i in range(5))
    page, after = store.list(device_id="office-2", dataset="fs", limit=10)
    assert [r["snapshot"] for r in page] == [f"s{i}" for i in range(5)] and after is None
    assert store.list(device_id="office-3")[0] == []
    store.record_many([("office-1", "fs", "s3", "node-b", 1, 1, BLAKE)])  # recorded again: replaced
    assert store.lookup("office-1", "fs", "s3")["node_id"] == "node-b"
    newest = dict(((d, s), at) for d, s, at in store.newest_commits())
    assert set(newest) == {("office-1", "fs"), ("office-2", "fs")}
    store.probe()


def test_the_first_placement_wins_and_every_store_reads_back_the_winner(opener):
    one, other = opener(), opener()
    assert one.check_offer("office-1", "fs", "s1", "node-a") == (None, "node-a")
    assert other.check_offer("office-1", "fs", "s2", "node-b") == (None, "node-a")  # placed already
    assert one.check_offer("office-1", "fs", "s1", None) == (None, None)  # refused offers place nothing
    one.record_many([("office-1", "fs", "s1", "node-a", 4096, 1, BLAKE, 5.0)])
    existing, placed_on = other.check_offer("office-1", "fs", "s1", "node-b")
    assert existing["node_id"] == "node-a" and placed_on == "node-a"  # committed: the agent is told so
    assert other.placements() == [("office-1", "fs", "node-a")]


def test_two_stores_racing_to_place_the_same_datasets_agree_on_one_winner_each(opener):
    stores, datasets = (opener(), opener()), [f"ds{i}" for i in range(20)]
    start, seen = threading.Barrier(2), [{}, {}]

    def offer(i):
        start.wait()
        for dataset in datasets:
            seen[i][dataset] = stores[i].check_offer("office-1", dataset, "s1", f"node-{i}")[1]

    threads = [threading.Thread(target=offer, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen[0] == seen[1] and len(seen[0]) == len(datasets)
    placed = {(d, s): n for d, s, n in stores[0].placements()}
    assert placed == {("office-1", dataset): seen[0][dataset] for dataset in datasets}


def test_prune_moves_rows_to_pruning_until_the_node_confirms_and_blocks_their_offer(opener):
    store = opener()
    store.record_many([("office-1", "fs", s, "node-a", 4096, 1, BLAKE, 1000.0 + 3600 * i)
                       for i, s in enumerate(("s1", "s2", "s3"))])
    policy = parse_retention({"keep_last": 1})
    reader = open_read_only(opener.dir, opener.url)  # what `speedsync prune --dry-run` reads beside the broker
    try:
        assert [r[2] for r in prune_plan(reader, policy)] == ["s1", "s2"]
    finally:
        reader.close()
    # s2 is being restored: protected; s1 leaves the catalog and waits in `pruning` for its node
    assert store.prune(policy, frozenset({("office-1", "fs", "s2")})) == [("office-1", "fs", "s1", "node-a")]
    assert [r["snapshot"] for r in store.list()[0]] == ["s2", "s3"]
    with pytest.raises(RequestError) as info:  # its manifest is still on the node: a new upload would be lost
        store.check_offer("office-1", "fs", "s1", "node-a")
    assert info.value.code == "pruned"
    store = opener()  # a restart before the node answered: the entry is still there
    assert store.prune(policy, frozenset()) == [("office-1", "fs", "s1", "node-a"), ("office-1", "fs", "s2", "node-a")]
    store.pruned([("office-1", "fs", "s1", "node-a"), ("office-1", "fs", "s2", "node-a")])
    assert store.pruning() == [] and [r["snapshot"] for r in store.list()[0]] == ["s3"]
    assert store.prune(policy, frozenset()) == []  # converged
    assert store.check_offer("office-1", "fs", "s1", "node-a") == (None, "node-a")  # removed: may come anew


def test_usage_is_saved_as_absolute_values(opener):
    store = opener()
    assert store.usage() == {}
    store.save_usage({"office-1": 5 << 40, "office-2": 7})  # past 32 bits
    store.save_usage({"office-1": 6 << 40})
    assert opener().usage() == {"office-1": 6 << 40, "office-2": 7}


def drain_catalog(store):
    store.record_many([("office-1", "fs", s, "node-a", 4096, 1, BLAKE, t) for s, t in (("s1", 10), ("s2", 20))])
    store.record_many([("office-1", "sql", "s1", "node-b", 4096, 1, BLAKE, 10)])
    for device, dataset, node in (("office-1", "fs", "node-a"), ("office-1", "sql", "node-b"),
                                  ("office-2", "new", "node-a")):
        store.check_offer(device, dataset, "s9", node)  # records the placement, as an OFFER does
    return store


def test_a_drain_is_read_back_from_the_catalog_and_each_switch_is_one_step(opener):
    store = drain_catalog(opener())
    assert store.start_drain("node-a") == ("draining", 2)
    assert store.start_drain("node-a") == ("draining", 2)  # asked again: the same drain
    assert store.datasets_to_move("node-a") == [("office-1", "fs", "node-a"), ("office-2", "new", "node-a")]

    store.move_placement("office-1", "fs", "node-b")  # step 1: its next snapshots go to node-b
    # still to move: its snapshots on node-a, now placed on node-b (a restarted broker takes it from here)
    assert store.datasets_to_move("node-a") == [("office-1", "fs", "node-b"), ("office-2", "new", "node-a")]
    assert [r[0] for r in store.snapshots_on("office-1", "fs", "node-a")] == ["s1", "s2"]
    assert ("office-1", "fs", "node-b") in store.placements()

    assert store.switch_node("office-1", "fs", "s1", "node-a", "node-b") == "node-a"
    assert store.switch_node("office-1", "fs", "s1", "node-a", "node-b") == "node-a"  # twice: no harm
    assert store.lookup("office-1", "fs", "s1")["node_id"] == "node-b"
    assert store.pruning() == [("office-1", "fs", "s1", "node-a")]
    assert [r[0] for r in store.snapshots_on("office-1", "fs", "node-a")] == ["s2"]

    # s2 pruned by retention while its copy ran: the copy on node-b is the one to remove
    raw(store, "DELETE FROM snapshots WHERE snapshot='s2'")
    assert store.switch_node("office-1", "fs", "s2", "node-a", "node-b") == "node-b"
    assert store.datasets_to_move("node-a") == [("office-2", "new", "node-a")]

    store.drain_done("node-a")
    assert store.drains() == [("node-a", "drained", 2)]
    assert store.start_drain("node-a") == ("draining", 1)  # drained, drained again: what came since
    assert store.end_drain("node-a") and store.drains() == [] and not store.end_drain("node-a")


def test_one_snapshot_may_wait_for_removal_from_two_nodes(opener):
    store = drain_catalog(opener())
    store.switch_node("office-1", "fs", "s1", "node-a", "node-b")
    raw(store, "INSERT INTO pruning VALUES ('office-1', 'fs', 's1', 'node-b', 0)")
    assert store.pruning() == [("office-1", "fs", "s1", "node-a"), ("office-1", "fs", "s1", "node-b")]
    store.pruned([("office-1", "fs", "s1", "node-b")])
    assert store.pruning() == [("office-1", "fs", "s1", "node-a")]


# --- PostgreSQL only: what brokers sharing one catalog rely on ------------------------------------

def test_a_retention_run_is_held_by_one_broker_at_a_time(pg_url):
    from roles.controller.catalogpg import PgCatalogStore
    one, other = PgCatalogStore(pg_url), PgCatalogStore(pg_url)
    one.record_many([("office-1", "fs", s, "node-a", 4096, 1, BLAKE, 1000.0 + i) for i, s in enumerate(("s1", "s2"))])
    policy = parse_retention({"keep_last": 1})
    with one._transaction():
        assert one._maintenance_lock()  # `one` is in its run
        assert other.prune(policy, frozenset()) is None  # skipped: nothing changed
        assert len(other.list()[0]) == 2
    assert other.prune(policy, frozenset()) == [("office-1", "fs", "s1", "node-a")]
    one.close()
    other.close()


def test_a_store_survives_its_server_restarting_and_is_unavailable_meanwhile(pg_server, pg_url):
    from roles.controller.catalogpg import PgCatalogStore
    store = PgCatalogStore(pg_url)
    store.record_many([("office-1", "fs", "s1", "node-a", 4096, 1, BLAKE)])
    pg_server.stop()
    try:
        with pytest.raises(Exception) as info:
            store.record_many([("office-1", "fs", "s2", "node-a", 4096, 1, BLAKE)])
        assert unavailable_reason(info.value) is not None, info.value  # held and tried again, not a bug
        with pytest.raises(Exception) as info:
            store.probe()
        assert unavailable_reason(info.value) is not None
    finally:
        pg_server.start()
    store.record_many([("office-1", "fs", "s2", "node-a", 4096, 1, BLAKE)])  # a new connection, by itself
    assert [r["snapshot"] for r in store.list()[0]] == ["s1", "s2"]
    store.close()


def test_the_schema_version_is_kept_and_a_newer_catalog_is_refused(pg_url):
    import psycopg

    from roles.controller.catalog import CatalogVersionError
    from roles.controller.catalogpg import SCHEMA_VERSION, PgCatalogStore
    PgCatalogStore(pg_url).close()
    PgCatalogStore(pg_url).close()  # opened again: nothing to apply
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        conn.execute("UPDATE schema_version SET version = version + 1")
    with pytest.raises(CatalogVersionError, match="newer than this broker"):
        PgCatalogStore(pg_url)
    with pytest.raises(CatalogVersionError, match="start the broker once"):
        open_read_only("", pg_url)


# --- the controller uses what the catalog decided ------------------------------------------------

class Broker:
    """A controller on `store` with node-a and node-b attached, `favourite` the one with more room (its
    choice for a new dataset)."""
    NODES = {"node-a": ("node", b"n-a"), "node-b": ("node", b"n-b")}
    AGENT = ("agent", b"a-1")

    def __init__(self, store, favourite: str, data_dir: str):
        from bus.clock import FakeClock
        from roles.config import BrokerConfig
        from roles.controller.catalog import CatalogIndex
        from roles.controller.core import Controller
        self.clock, self.store = FakeClock(), store
        self.controller = Controller(BrokerConfig(insecure=True, data_dir=data_dir), store, CatalogIndex())
        for node_id, peer in self.NODES.items():
            free = 4 << 40 if node_id == favourite else 1 << 40
            self.feed(peer, "READY", node_id=node_id, window=1 << 30, free_bytes=free, used_bytes=0)
        self.feed(self.AGENT, "HELLO", device_id="office-1")

    def feed(self, peer, t: str, **fields) -> list:
        from schemas import decode, encode, make
        frames = encode(make(t, **fields))
        return self.controller.received(peer, decode(frames), frames, self.clock.now())

    def offer(self):
        from bus.effects import Submit
        out = self.feed(self.AGENT, "OFFER", req=1, dataset="fs", snapshot="s1", image_size=1 << 20,
                        chunk_size=1 << 20, chunk_count=1)
        (check,) = [e for e in out if isinstance(e, Submit)]
        return check

    def checked(self, check) -> str:
        """The node the broker opens the upload on, once the catalog answered `check`."""
        from bus.effects import Send
        out = self.controller.completed(check.key, check.fn(*check.args), None, self.clock.now())
        (opened,) = [e for e in out if isinstance(e, Send) and e.message.t == "OPEN"]
        return {peer: node for node, peer in self.NODES.items()}[opened.to]


def test_brokers_offering_a_new_dataset_at_once_open_it_on_the_node_that_won_the_placement(opener, tmp_path):
    first, second = (Broker(opener(), favourite, str(tmp_path / favourite)) for favourite in ("node-a", "node-b"))
    checks = [first.offer(), second.offer()]  # both before either reached the catalog
    assert [c.args[3] for c in checks] == ["node-a", "node-b"]  # each chose its own
    assert first.checked(checks[0]) == "node-a"
    assert second.checked(checks[1]) == "node-a"  # the catalog's winner, not its choice
    nodes = second.controller.registry.nodes_by_id
    assert nodes["node-a"].reserved_bytes == 1 << 20 and nodes["node-b"].reserved_bytes == 0
    assert second.controller.placement.node_for("office-1", "fs") == "node-a"
    assert second.controller.placement.datasets_on("node-b") == 0
