"""Retention rules (roles/retention.py), computed as Proxmox Backup Server computes them: hand-made
cases with their expected answers worked out from PBS's rule (mark_selections), and the config key."""

from __future__ import annotations

import calendar

import pytest

from roles.retention import KeepRules, Snapshot, kept_by_rules, parse_retention, to_prune


def at(stamp: str) -> float:
    """'2026-11-30 10:50' in UTC -> seconds since the epoch."""
    return float(calendar.timegm(__import__("time").strptime(stamp, "%Y-%m-%d %H:%M")))


def snaps(*stamps: str) -> list[Snapshot]:
    return [Snapshot(stamp.replace(" ", "T"), at(stamp)) for stamp in stamps]


def names(*stamps: str) -> set:
    return {stamp.replace(" ", "T") for stamp in stamps}


# Proxmox Backup Server's own cases (proxmox-backup tests/prune.rs: test_prune_hourly, test_prune_simple,
# test_prune_simple2), with their expected answers
def iso(*stamps: str) -> list[Snapshot]:
    return [Snapshot(s, float(calendar.timegm(__import__("time").strptime(s, "%Y-%m-%dT%H:%M:%SZ")))) for s in stamps]


def pbs_removed(listing, **keep) -> list:
    kept = kept_by_rules(listing, KeepRules(**keep))
    return [s.name for s in sorted(listing, key=lambda s: s.taken_at) if s.name not in kept]


def pbs_kept(listing, **keep) -> list:
    kept = kept_by_rules(listing, KeepRules(**keep))
    return [s.name for s in sorted(listing, key=lambda s: s.taken_at) if s.name in kept]


HOURLY = iso("2019-11-15T09:39:15Z", "2019-11-15T10:49:15Z", "2019-11-15T10:59:15Z", "2019-11-15T11:39:15Z",
             "2019-11-15T11:49:15Z", "2019-11-15T11:59:15Z")
SIMPLE = iso("2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z", "2019-12-04T12:59:15Z")
SIMPLE2 = iso("2018-11-15T11:59:15Z", "2019-11-15T11:59:15Z", "2019-11-21T11:59:15Z", "2019-11-22T11:59:15Z",
              "2019-11-29T11:59:15Z", "2019-12-01T11:59:15Z", "2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z",
              "2019-12-04T11:59:15Z")


def test_pbs_prune_hourly():
    assert pbs_removed(HOURLY, keep_hourly=3) == ["2019-11-15T10:49:15Z", "2019-11-15T11:39:15Z",
                                                  "2019-11-15T11:49:15Z"]
    assert pbs_kept(HOURLY, keep_hourly=2) == ["2019-11-15T10:59:15Z", "2019-11-15T11:59:15Z"]


def test_pbs_prune_simple():
    a, b, c, d = (s.name for s in SIMPLE)
    assert pbs_removed(SIMPLE, keep_last=4) == []
    assert pbs_removed(SIMPLE, keep_last=3) == [a]
    assert pbs_removed(SIMPLE, keep_last=2) == [a, b]
    assert pbs_removed(SIMPLE, keep_last=1) == [a, b, c]
    # PBS's compute_prune_info removes all four with keep_last 0; its API refuses to prune with no rule
    # that keeps something, which is what the broker does: nothing is removed
    assert pbs_removed(SIMPLE, keep_last=0) == []
    assert pbs_removed(SIMPLE, keep_last=2, keep_daily=2) == []
    assert pbs_removed(SIMPLE, keep_daily=3) == [c]
    assert pbs_removed(SIMPLE, keep_daily=2) == [a, c]
    for keep in ({"keep_weekly": 5}, {"keep_daily": 1, "keep_weekly": 5}, {"keep_monthly": 6}, {"keep_yearly": 7},
                 {"keep_weekly": 5, "keep_monthly": 6, "keep_yearly": 7}):
        assert pbs_removed(SIMPLE, **keep) == [a, b, c], keep


def test_pbs_prune_simple2():
    assert pbs_kept(SIMPLE2, keep_daily=1) == ["2019-12-04T11:59:15Z"]
    assert pbs_kept(SIMPLE2, keep_last=1, keep_daily=1) == ["2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"]
    assert pbs_kept(SIMPLE2, keep_daily=1, keep_weekly=1) == ["2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"]
    assert pbs_kept(SIMPLE2, keep_daily=1, keep_weekly=1, keep_monthly=1) == [
        "2019-11-22T11:59:15Z", "2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"]
    assert pbs_kept(SIMPLE2, keep_monthly=1, keep_yearly=1) == ["2018-11-15T11:59:15Z", "2019-12-04T11:59:15Z"]


def test_keep_last_keeps_the_newest_n():
    s = snaps("2026-11-30 10:00", "2026-11-30 10:05", "2026-11-30 10:10", "2026-11-30 10:15", "2026-11-30 10:20")
    assert kept_by_rules(s, KeepRules(keep_last=3)) == names("2026-11-30 10:10", "2026-11-30 10:15",
                                                               "2026-11-30 10:20")


def test_a_period_already_held_by_an_earlier_rule_is_skipped_and_does_not_count():
    # keep_last 2 takes 10:50 and 10:40; hour 10 is then held, so hourly passes 10:30 over without
    # counting it, keeps 09:50, removes 09:20 (hour 09 already has its newest), keeps 08:50, and stops
    s = snaps("2026-11-30 10:50", "2026-11-30 10:40", "2026-11-30 10:30", "2026-11-30 09:50", "2026-11-30 09:20",
              "2026-11-30 08:50", "2026-11-30 07:50")
    kept = kept_by_rules(s, KeepRules(keep_last=2, keep_hourly=2))
    assert kept == names("2026-11-30 10:50", "2026-11-30 10:40", "2026-11-30 09:50", "2026-11-30 08:50")
    assert to_prune(s, KeepRules(keep_last=2, keep_hourly=2)) == sorted(
        names("2026-11-30 07:50", "2026-11-30 09:20", "2026-11-30 10:30"))


def test_a_snapshot_removed_within_a_period_is_not_kept_by_a_later_rule():
    # hourly 2 keeps the 30th's 23:00 and 22:00; daily finds the 30th held, keeps the 29th's 23:00, marks
    # the 29th's 22:00 removed (its day already has its newest), keeps the 28th's 23:00
    s = snaps("2026-11-30 23:00", "2026-11-30 22:00", "2026-11-29 23:00", "2026-11-29 22:00", "2026-11-28 23:00")
    assert kept_by_rules(s, KeepRules(keep_hourly=2, keep_daily=2)) == names(
        "2026-11-30 23:00", "2026-11-30 22:00", "2026-11-29 23:00", "2026-11-28 23:00")
    # with daily 1, the 29th's 23:00 is kept and nothing older: a rule stops once it has its periods
    assert kept_by_rules(s, KeepRules(keep_hourly=2, keep_daily=1)) == names(
        "2026-11-30 23:00", "2026-11-30 22:00", "2026-11-29 23:00")


def test_weeks_are_iso_weeks_across_the_new_year():
    # 2021-01-04 is week 2021-01; 2021-01-03 and 2020-12-31 are both week 2020-53; 2020-12-27 is 2020-52
    s = snaps("2021-01-04 12:00", "2021-01-03 12:00", "2020-12-31 12:00", "2020-12-27 12:00")
    assert kept_by_rules(s, KeepRules(keep_weekly=2)) == names("2021-01-04 12:00", "2021-01-03 12:00")
    assert kept_by_rules(s, KeepRules(keep_weekly=3)) == names("2021-01-04 12:00", "2021-01-03 12:00",
                                                                 "2020-12-27 12:00")


def test_months_and_years_keep_the_newest_of_each():
    s = snaps("2026-03-02 00:00", "2026-03-01 00:00", "2026-02-14 00:00", "2025-12-31 23:59", "2025-06-01 00:00",
              "2024-01-01 00:00")
    assert kept_by_rules(s, KeepRules(keep_monthly=2, keep_yearly=3)) == names(
        "2026-03-02 00:00", "2026-02-14 00:00", "2025-12-31 23:59", "2024-01-01 00:00")


def test_periods_are_utc_hours():
    # 23:30 and 00:10 UTC are two days in UTC, whatever the machine's zone
    s = snaps("2026-11-30 00:10", "2026-11-29 23:30", "2026-11-29 23:10")
    assert kept_by_rules(s, KeepRules(keep_daily=5)) == names("2026-11-30 00:10", "2026-11-29 23:30")


def test_rules_that_keep_nothing_keep_everything_and_the_newest_and_protected_are_never_pruned():
    s = snaps("2026-11-30 10:00", "2026-11-30 11:00", "2026-11-30 12:00")
    assert to_prune(s, KeepRules()) == []
    assert to_prune(s, None) == []
    assert to_prune(s, KeepRules(keep_last=1), protected={"2026-11-30T10:00"}) == ["2026-11-30T11:00"]


def test_a_month_of_five_minute_snapshots_keeps_what_the_default_policy_says():
    start = at("2026-11-01 00:00")
    s = [Snapshot(f"s{i:05d}", start + 300 * i) for i in range(30 * 288)]  # Nov 1 to Nov 30 23:55
    kept = kept_by_rules(s, KeepRules(keep_last=3, keep_hourly=24, keep_daily=14, keep_weekly=8, keep_monthly=12))
    # keep_last: 23:55, 23:50, 23:45 of the 30th (hour 23 of the 30th is held); hourly: the xx:55 of the
    # 24 hours before, down to 23:55 of the 29th (so the 29th is held); daily: the 30th and 29th are
    # held, so 23:55 of the 28th down to the 15th; weekly (ISO): weeks 49 (the 30th), 48, 47 and 46 (Nov
    # 9-15, by the 15th) are held, so 23:55 of the 8th (week 45) and of the 1st (week 44), and no more
    # snapshots; monthly: November is held
    last = {s[-1 - k].name for k in range(3)}
    hourly = {s[-1 - 12 * h].name for h in range(1, 25)}
    daily = {s[288 * day - 1].name for day in range(15, 29)}  # the last snapshot of Nov 15 .. Nov 28
    weekly = {s[288 * day - 1].name for day in (8, 1)}
    assert kept == last | hourly | daily | weekly
    assert len(kept) == 3 + 24 + 14 + 2


def test_the_config_key_merges_overrides_over_the_defaults_and_the_first_match_wins():
    policy = parse_retention({"keep_last": 3, "keep_daily": 14, "overrides": [
        {"device": "*", "dataset": "sql*", "keep_last": 288},
        {"device": "lab-*", "keep_daily": 0}]})
    assert policy.rules_for("office-1", "fs") == KeepRules(keep_last=3, keep_daily=14)
    assert policy.rules_for("lab-2", "sql1") == KeepRules(keep_last=288, keep_daily=14)
    assert policy.rules_for("lab-2", "fs") == KeepRules(keep_last=3)
    assert not parse_retention(None)


@pytest.mark.parametrize("value,named", [
    ({"keep_lats": 3}, "keep_lats"), ({"keep_last": -1}, "keep_last"), ({"keep_last": "3"}, "keep_last"),
    ({"keep_last": True}, "keep_last"), ([3], "mapping"), ({"overrides": {"device": "*"}}, "overrides"),
    ({"overrides": [{"device": "../x"}]}, "device"), ({"overrides": [{"dataset": "sql*", "keep": 1}]}, "keep"),
])
def test_a_bad_retention_value_is_refused_naming_what_is_wrong(value, named):
    with pytest.raises(ValueError) as info:
        parse_retention(value)
    assert named in str(info.value)


# --- the catalog's side -----------------------------------------------------------------------------


def test_a_catalog_from_before_taken_at_takes_committed_at_and_prunes_then_converges(tmp_path):
    import sqlite3

    from roles.controller.catalog import SCHEMA, SCHEMA_VERSION, CatalogStore, open_read_only, prune_plan
    from roles.retention import parse_retention

    directory = tmp_path / "broker"
    directory.mkdir()
    db = sqlite3.connect(directory / "catalog.sqlite3", isolation_level=None)  # version 0, three snapshots
    db.executescript(SCHEMA)
    for i, snapshot in enumerate(("s1", "s2", "s3")):
        db.execute("INSERT INTO snapshots VALUES ('office-1', 'fs', ?, 'node-a', 4096, 1, ?, ?)",
                   (snapshot, b"\x01" * 32, 1000.0 + 3600 * i))
    db.close()
    store = CatalogStore(str(directory))
    assert [r["taken_at"] for r in store.list()[0]] == [1000.0, 4600.0, 8200.0]
    policy = parse_retention({"keep_last": 1})
    reader = open_read_only(str(directory))  # what `speedsync prune --dry-run` reads beside the broker
    assert [r[2] for r in prune_plan(reader, policy)] == ["s1", "s2"]
    reader.close()

    # s2 is being restored: protected; s1 leaves the catalog and waits in `pruning` for its node
    assert store.prune(policy, frozenset({("office-1", "fs", "s2")})) == [("office-1", "fs", "s1", "node-a")]
    assert [r["snapshot"] for r in store.list()[0]] == ["s2", "s3"]
    store.close()
    store = CatalogStore(str(directory))  # a crash before the node answered: the entry is still there
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store.prune(policy, frozenset()) == [("office-1", "fs", "s1", "node-a"), ("office-1", "fs", "s2", "node-a")]
    store.pruned([("office-1", "fs", "s1", "node-a"), ("office-1", "fs", "s2", "node-a")])
    assert store.pruning() == [] and [r["snapshot"] for r in store.list()[0]] == ["s3"]
    assert store.prune(policy, frozenset()) == []  # converged: nothing more to do
    store.close()
