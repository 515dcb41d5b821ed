"""Per-device byte quotas: which quota a device has (roles/quotarules.py), the accounting and its
checks (roles/controller/quota.py), and the catalog table that keeps usage across restarts, with the
migration of a catalog written before it (roles/controller/catalog.py). The rule enforced on the
three real cores is in tests/test_unit_cores.py; with real processes in tests/test_e2e_quota.py."""

from __future__ import annotations

import sqlite3

import pytest

from bus.errors import RequestError
from roles import config as cfg
from roles.controller import catalog
from roles.controller.catalog import CatalogStore, CatalogVersionError
from roles.controller.quota import SAVE_INTERVAL_S, DeviceQuotas
from roles.quotarules import parse_quota
from schemas import make
from tests.test_unit_stall_watchdog import CHUNK, NODE, Broker  # the Controller driven by hand

GiB, TiB = 1 << 30, 1 << 40


# --- which quota -----------------------------------------------------------------------------------


def test_an_exact_id_wins_then_the_longest_pattern_then_unlimited():
    rules = parse_quota({"*": "10TiB", "office-*": "500GiB", "office-7": "1TiB", "office-1?": "2GiB",
                         "vip-[0-9]": None, "vip-*": "none", "lab-[!x]*": "5GiB"})
    assert rules.limit_for("office-7") == TiB  # exact, although two patterns match
    assert rules.limit_for("office-12") == 2 * GiB  # office-1? (9 chars) beats office-* (8)
    assert rules.limit_for("office-123") == 500 * GiB  # office-1? matches one character only
    assert rules.limit_for("home-3") == 10 * TiB
    assert rules.limit_for("vip-3") is None and rules.limit_for("vip-x") is None  # `none` beats `*`
    assert rules.limit_for("lab-a1") == 5 * GiB and rules.limit_for("lab-x1") == 10 * TiB
    assert parse_quota({"office-*": "1GiB"}).limit_for("home-1") is None  # no match: unlimited
    assert not parse_quota(None) and parse_quota(None).limit_for("any") is None  # no key: unlimited


def test_patterns_of_equal_length_keep_the_files_order():
    assert parse_quota({"a*-1": "1GiB", "*b-1": "2GiB"}).limit_for("ab-1") == GiB
    assert parse_quota({"*b-1": "2GiB", "a*-1": "1GiB"}).limit_for("ab-1") == 2 * GiB


def test_matching_is_case_sensitive_as_ids_are():
    assert parse_quota({"Office-*": "1GiB"}).limit_for("office-1") is None


@pytest.mark.parametrize("entry,says", [
    ({"office/*": "1GiB"}, "'/'"),
    ({"office-[ab": "1GiB"}, "without its ]"),
    ({"office-[]": "1GiB"}, "empty"),
    ({"office-[a/]": "1GiB"}, "inside [...]"),
    ({"../x": "1GiB"}, "neither a device id"),
    ({"office-1": "lots"}, "not a size"),
    ({"office-1": "-1GiB"}, "not a size"),
    ({"office-1": True}, "boolean"),
    ({7: "1GiB"}, "quote it"),
    (["office-*"], "mapping"),
])
def test_bad_entries_are_refused_naming_the_entry(entry, says):
    with pytest.raises(ValueError) as info:
        parse_quota(entry)
    assert says in str(info.value)


@pytest.mark.parametrize("text", ['quota: {"office/*": 1GiB}\n', 'quota: {office-1: lots}\n', "quota: 5GiB\n"])
def test_a_bad_quota_in_broker_yaml_names_the_key_and_the_file(tmp_path, text):
    path = tmp_path / "broker.yaml"
    path.write_text("insecure: true\n" + text)
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(cfg.BrokerConfig, path)
    assert "'quota'" in str(info.value) and str(path) in str(info.value)


def test_quota_in_broker_yaml_loads_and_no_key_is_unlimited(tmp_path):
    path = tmp_path / "broker.yaml"
    path.write_text('insecure: true\nquota: {"office-7": 1TiB, "office-*": 500GiB}\n')
    rules = cfg.load(cfg.BrokerConfig, path).quota
    assert rules.limit_for("office-7") == TiB and rules.limit_for("office-8") == 500 * GiB
    path.write_text("insecure: true\n")
    assert cfg.load(cfg.BrokerConfig, path).quota.limit_for("office-7") is None


# --- the accounting --------------------------------------------------------------------------------


def test_offers_are_refused_at_the_quota_and_stored_bytes_say_when_it_is_passed():
    quotas = DeviceQuotas(parse_quota({"evil": 100, "*": 1000}))
    quotas.admit_offer("evil")
    assert quotas.stored("evil", 60) is False
    assert quotas.stored("evil", 40) is False  # at the quota: not past it, this upload goes on...
    with pytest.raises(RequestError) as exc:
        quotas.admit_offer("evil")  # ...but no new one starts
    assert exc.value.code == "quota_exceeded" and "at its quota of 100" in exc.value.reason
    assert quotas.stored("evil", 1) is True and quotas.over("evil")
    assert "101 bytes, past its quota" in quotas.exceeded("evil").reason
    # another device's own quota, untouched by evil's
    quotas.admit_offer("honest")
    assert quotas.stored("honest", 500) is False and not quotas.over("honest")
    assert quotas.figures("evil") == {"stored_bytes": 101, "quota_bytes": 100}
    assert quotas.figures("new") == {"stored_bytes": 0, "quota_bytes": 1000}


def test_usage_is_counted_without_a_quota_too():
    quotas = DeviceQuotas(parse_quota(None))
    assert quotas.stored("office-1", 5 * TiB) is False
    quotas.admit_offer("office-1")
    assert quotas.figures("office-1") == {"stored_bytes": 5 * TiB, "quota_bytes": None}


def test_usage_loaded_at_start_counts_at_once():
    quotas = DeviceQuotas(parse_quota({"office-1": 100}), usage={"office-1": 100})
    with pytest.raises(RequestError):
        quotas.admit_offer("office-1")


def test_saves_are_at_most_one_a_second_and_only_of_devices_that_changed():
    quotas = DeviceQuotas(parse_quota(None), usage={"idle": 7})
    assert quotas.due_save(0.0) is None and quotas.next_deadline() is None  # nothing changed
    quotas.stored("a", 10)
    assert quotas.next_deadline() == 0.0
    assert quotas.due_save(0.0) == {"a": 10}
    quotas.stored("a", 5)
    quotas.stored("b", 1)
    assert quotas.due_save(0.5) is None  # one save is being written
    quotas.saved(None)
    assert quotas.next_deadline() == SAVE_INTERVAL_S
    assert quotas.due_save(0.5) is None  # a second has not passed
    assert quotas.due_save(SAVE_INTERVAL_S) == {"a": 15, "b": 1}  # absolute values
    quotas.saved(OSError("disk full"))  # failed: saved again next time
    quotas.stored("c", 2)
    assert quotas.unsaved() == {"a": 15, "b": 1, "c": 2}
    assert quotas.due_save(2 * SAVE_INTERVAL_S) == {"a": 15, "b": 1, "c": 2}
    assert quotas.unsaved() == {"a": 15, "b": 1, "c": 2}  # being written is not yet saved


# --- the catalog ------------------------------------------------------------------------------------

OLD_SCHEMA = catalog.SCHEMA  # version 0: snapshots and placements, no user_version


def old_catalog(directory) -> None:
    """A catalog as brokers wrote it before quotas: version 0, one committed snapshot."""
    directory.mkdir(parents=True)
    db = sqlite3.connect(directory / "catalog.sqlite3", isolation_level=None)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO snapshots VALUES ('office-1', 'fs', 's1', 'node-a', 4096, 1, ?, 1.0)", (b"\x01" * 32,))
    db.execute("INSERT INTO placements VALUES ('office-1', 'fs', 'node-a')")
    db.close()


def test_a_catalog_from_before_quotas_is_migrated_in_place_and_keeps_its_rows(tmp_path):
    old_catalog(tmp_path / "broker")
    store = CatalogStore(str(tmp_path / "broker"))
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == catalog.SCHEMA_VERSION
    assert store.lookup("office-1", "fs", "s1")["size"] == 4096
    assert store.placements() == [("office-1", "fs", "node-a")]
    assert store.usage() == {}  # what it stored before was never counted: it starts at 0
    store.save_usage({"office-1": 123, "office-2": 5})
    store.save_usage({"office-1": 200})
    store.close()
    again = CatalogStore(str(tmp_path / "broker"))  # opened again: no migration runs twice
    assert again.usage() == {"office-1": 200, "office-2": 5}
    assert again.db.execute("PRAGMA user_version").fetchone()[0] == catalog.SCHEMA_VERSION
    again.close()


def test_a_migration_that_fails_leaves_the_old_version_and_is_applied_next_time(tmp_path):
    old_catalog(tmp_path / "broker")
    db = sqlite3.connect(tmp_path / "broker" / "catalog.sqlite3", isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        catalog.migrate(db, "test", {1: [*catalog.MIGRATIONS[1], "THIS IS NOT SQL"]})
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    assert not db.execute("SELECT name FROM sqlite_master WHERE name='device_usage'").fetchall()
    db.close()
    store = CatalogStore(str(tmp_path / "broker"))
    assert store.usage() == {} and store.lookup("office-1", "fs", "s1") is not None
    store.close()


def test_a_catalog_newer_than_the_broker_is_refused(tmp_path):
    CatalogStore(str(tmp_path / "broker")).close()
    db = sqlite3.connect(tmp_path / "broker" / "catalog.sqlite3")
    db.execute(f"PRAGMA user_version = {catalog.SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(CatalogVersionError) as info:
        CatalogStore(str(tmp_path / "broker"))
    assert "newer than this broker" in str(info.value)


# --- the rule on the Controller (the test plays the agents and the node) ------------------------------


def test_a_stored_past_the_quota_parks_the_uploads_still_sending_not_one_committing_nor_others(tmp_path):
    broker = Broker(tmp_path, node_window=64 * CHUNK, quota=parse_quota({"office-1": 3 * CHUNK // 2}))
    agent = ("agent", b"office-1")
    broker.says(agent, make("HELLO", device_id="office-1"))
    tids = {}
    for req, dataset in enumerate(("fs", "db"), start=1):
        broker.says(agent, make("OFFER", req=req, dataset=dataset, snapshot="s1", image_size=2 * CHUNK,
                                chunk_size=CHUNK, chunk_count=2))
        tids[dataset] = broker.to(NODE, "OPEN")[-1]["transfer_id"]
        broker.node_says(make("OPENED", transfer_id=tids[dataset]))
    other = broker.upload("office-2", chunks=4)
    names = {"fs": [b"\x01" * 32, b"\x02" * 32], "db": [b"\x03" * 32, b"\x04" * 32]}
    for dataset, tid in tids.items():
        broker.says(agent, make("QUERY", transfer_id=tid, start=0, hashes=names[dataset]))
        broker.node_says(make("MISSING", transfer_id=tid, start=0, count=2, missing=[0, 1]))
    for name in names["fs"]:  # fs sends everything and commits; db has credit and is still sending
        broker.says(agent, make("CHUNK", payload=[bytes(CHUNK)], transfer_id=tids["fs"], hash=name, raw_len=CHUNK,
                                codec="raw"))
    broker.says(agent, make("COMMIT", transfer_id=tids["fs"], image_blake3=None))
    fs = broker.core.transfers[tids["fs"]]
    for name in names["fs"]:
        broker.node_says(make("STORED", transfer_id=tids["fs"], hash=name, raw_len=CHUNK, wire_len=CHUNK))
    assert broker.core.quotas.usage["office-1"] == 2 * CHUNK  # past 1.5 chunks
    assert fs.state == "committing", "an upload that sent everything was interrupted"
    assert broker.state(tids["db"]) == "parked"
    errors = broker.to(agent, "ERROR")
    assert [(e["code"], e["transfer_id"]) for e in errors] == [("quota_exceeded", tids["db"])]
    assert tids["db"] in {m["transfer_id"] for m in broker.to(NODE, "ABORT")}
    assert broker.core.credit.nodes["node-a"].held.get("office-1", 0) == 0  # db's credit went back
    # office-2 is not affected: its upload is granted credit as before
    broker.slice_answered("office-2", other, 0, missing=[0])
    assert broker.to(("agent", b"office-2"), "CREDIT") and not broker.to(("agent", b"office-2"), "ERROR")
    # the next OFFER of office-1 is refused before anything is opened on the node
    opens = len(broker.to(NODE, "OPEN"))
    broker.says(agent, make("OFFER", req=9, dataset="logs", snapshot="s1", image_size=CHUNK, chunk_size=CHUNK,
                            chunk_count=1))
    assert broker.to(agent, "ERROR")[-1]["code"] == "quota_exceeded" and len(broker.to(NODE, "OPEN")) == opens
    assert broker.core.history.parked[("office-1", "logs", "s1")].reason.startswith("quota_exceeded")
    # and the commit goes through
    broker.node_says(make("COMMITTED", transfer_id=tids["fs"], device_id="office-1", dataset="fs", snapshot="s1",
                          image_size=2 * CHUNK, chunk_count=2, image_blake3=b"\x05" * 32))
    broker.at(broker.now + 0.01)
    assert broker.state(tids["fs"]) == "committed"
