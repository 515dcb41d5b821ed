"""The `speedsync` command line (DESIGN.md "Command line").

Exit codes: 0 success, 1 runtime failure (one-line reason on stderr),
2 usage or configuration error (naming the key and file).
"""

from __future__ import annotations

import argparse
import json
import sys

from bus.errors import SpeedSyncError
from bus.security import KeyFileError
from roles import config as cfg
from roles.logs import setup_logging

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speedsync", description="Replicate backup snapshots to a cloud storage pool.")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("broker", help="run the cloud controller")
    b.add_argument("--config", required=True)
    s = sub.add_parser("storage", help="run a storage worker")
    s.add_argument("--config", required=True)
    s.add_argument("--scrub", action="store_true",
                   help="verify every stored chunk and manifest, quarantine damage, report, exit")
    s.add_argument("--json", action="store_true", help="with --scrub: print the report as JSON")
    a = sub.add_parser("agent", help="run an appliance agent")
    a.add_argument("--config", required=True)
    a.add_argument("--once", action="store_true", help="replicate what is pending now, then exit")
    a.add_argument("--json", action="store_true", help="with --once or --status: print JSON")
    a.add_argument("--status", action="store_true", help="ask the running agent for its queues, transfers and limit")
    for name in ("status", "list", "drain", "undrain"):
        what = {"drain": "move every dataset off a storage node (an admin key)",
                "undrain": "let a drained or draining node take new datasets again (an admin key)"}
        s = sub.add_parser(name, help=what.get(name, f"ask the broker's status socket ({name})"))
        s.add_argument("--broker", required=True, help="the broker's status endpoint, e.g. tcp://127.0.0.1:5552")
        s.add_argument("--json", action="store_true")
        s.add_argument("--timeout-ms", type=int, default=5000)
        s.add_argument("--key-file", help="the operator's key pair (NAME.key_secret), when the broker uses CURVE")
        s.add_argument("--broker-key", help="the broker's public key (broker.key), when the broker uses CURVE")
        if name in ("drain", "undrain"):
            s.add_argument("node", help="the storage node's node_id")
            continue
        s.add_argument("--device", help="only this device's " + ("agents and transfers (the summary stays global)"
                                                                 if name == "status" else "snapshots"))
        if name == "list":
            s.add_argument("--dataset", help="only this dataset's snapshots")
        else:
            s.add_argument("--watch", action="store_true", help="redraw the status until Ctrl-C")
            s.add_argument("--interval", type=float, default=2.0, help="with --watch: seconds between redraws")
    pr = sub.add_parser("prune", help="show what the broker's retention policy would remove now")
    pr.add_argument("--config", required=True, help="the broker's config (retention, data_dir)")
    pr.add_argument("--dry-run", action="store_true", help="required: the broker itself prunes, every "
                    "prune_interval_ms; this only shows what it would remove")
    pr.add_argument("--json", action="store_true")
    r = sub.add_parser("restore", help="rebuild an image from the cloud, verified")
    r.add_argument("--config", required=True, help="the agent's config (device identity, brokers)")
    r.add_argument("--dataset", required=True)
    r.add_argument("--snapshot", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--json", action="store_true")
    k = sub.add_parser("keygen", help="write a CurveZMQ key pair NAME.key and NAME.key_secret")
    k.add_argument("--out", required=True, help="directory to write into")
    k.add_argument("--name", required=True, help="device_id, node_id, 'broker' or an operator's name")
    d = sub.add_parser("demo", help="run an embedded local cluster that replicates, restores and verifies")
    d.add_argument("--workdir", help="keep the demo's files here (default: a temporary directory)")
    d.add_argument("--size", default="64MiB", help="size of each generated full image")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except cfg.ConfigError as exc:
        print(f"speedsync: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyFileError as exc:
        print(f"speedsync {args.command}: key error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SpeedSyncError as exc:
        print(f"speedsync {args.command}: {exc.code}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except OSError as exc:
        print(f"speedsync {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _scrub(conf, as_json: bool) -> int:
    from roles.storenode.scrub import scrub
    report = scrub(conf.data_dir)
    if as_json:
        print(json.dumps(report.as_dict()))
    else:
        print(f"scrubbed {conf.node_id}: {report.chunks_checked} chunks, {report.manifests_checked} manifests, "
              f"{report.problems} problem(s)")
        for c in report.damaged_chunks:
            print(f"  damaged chunk {c['chunk']}: {c['reason']} (moved to {c['quarantined_to']})")
        for m in report.damaged_manifests:
            print(f"  damaged manifest {m['path']}: {m['reason']}")
        for a in report.affected_snapshots:
            print(f"  snapshot {a['device_id']}/{a['dataset']}/{a['snapshot']} lacks {len(a['chunks'])} chunk(s): "
                  "restore will fail until they are uploaded again")
    if report.problems:
        print(f"speedsync storage --scrub: {report.problems} problem(s) found", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _prune_dry_run(conf, as_json: bool) -> int:
    from roles.controller.catalog import open_read_only, prune_plan
    from roles.retention import describe
    reader = open_read_only(conf.data_dir, conf.catalog_url)
    try:
        plan = prune_plan(reader, conf.retention) if conf.retention else []
    finally:
        reader.close()
    rows = [{"device_id": d, "dataset": ds, "snapshot": s, "node_id": n, "taken_at": at} for d, ds, s, n, at in plan]
    if as_json:
        print(json.dumps({"retention": bool(conf.retention), "prune": rows}))
        return EXIT_OK
    if not conf.retention:
        print("no retention in the config: every snapshot is kept")
        return EXIT_OK
    from roles import render
    print(f"retention {describe(conf.retention.default)}; {len(conf.retention.overrides)} override(s); "
          f"{len(rows)} snapshot(s) would be pruned now (those being uploaded or restored excepted)")
    if rows:
        render.show(render.prune_view(rows))
    return EXIT_OK


def _print(doc, as_json: bool, view) -> None:
    """JSON, or the document's tables (rich on a terminal, plain text otherwise)."""
    if as_json:
        print(json.dumps(doc))
    else:
        from roles import render
        render.show(view(doc))


def _run(args) -> int:
    if args.command == "broker":
        from roles.broker import run_broker
        conf = cfg.load(cfg.BrokerConfig, args.config)
        setup_logging(conf.log_level, conf.log_json, "broker")
        return run_broker(conf)
    if args.command == "prune":
        if not args.dry_run:
            print("speedsync prune: the broker applies retention itself, at start and every prune_interval_ms; "
                  "--dry-run shows what it would remove now", file=sys.stderr)
            return EXIT_USAGE
        return _prune_dry_run(cfg.load(cfg.BrokerConfig, args.config), args.json)
    if args.command == "storage":
        from roles.storage import run_storage
        conf = cfg.load(cfg.StorageConfig, args.config)
        setup_logging(conf.log_level, conf.log_json, conf.node_id)
        if args.scrub:
            return _scrub(conf, args.json)
        return run_storage(conf)
    if args.command == "agent":
        from roles.agent import run_agent
        if args.json and not (args.once or args.status):
            print("speedsync agent: --json needs --once or --status", file=sys.stderr)
            return EXIT_USAGE
        conf = cfg.load(cfg.AgentConfig, args.config)
        setup_logging(conf.log_level, conf.log_json, conf.device_id)
        if args.status:
            from roles.statusclient import query_agent_status
            from roles import render
            doc = query_agent_status(conf)
            _print(doc, args.json, render.agent_view)
            return EXIT_OK
        return run_agent(conf, once=args.once, as_json=args.json, config_path=args.config)
    if args.command in ("status", "list", "drain", "undrain"):
        from roles import statusclient
        keys = None
        if args.key_file or args.broker_key:
            if not (args.key_file and args.broker_key):
                print("speedsync: --key-file and --broker-key go together", file=sys.stderr)
                return EXIT_USAGE
            keys = statusclient.OperatorKeys(args.key_file, args.broker_key)
        from roles import render
        if args.command in ("drain", "undrain"):
            doc = statusclient.drain(args.broker, args.node, args.command == "undrain", args.timeout_ms, keys)
            _print(doc, args.json, render.drain_view)
            return EXIT_OK
        if args.command == "status":
            def fetch():
                return statusclient.fetch_status(args.broker, args.timeout_ms, keys, args.device)
            if args.watch:
                if args.json or args.interval <= 0:
                    print("speedsync status: --watch takes no --json, and --interval > 0", file=sys.stderr)
                    return EXIT_USAGE
                return render.watch(fetch, args.broker, args.interval)
            doc = fetch()
            _print(doc, args.json, render.status_view)
        else:
            doc = statusclient.fetch_list(args.broker, args.device, args.timeout_ms, keys, args.dataset)
            _print(doc, args.json, render.list_view)
        return EXIT_OK
    if args.command == "restore":
        from roles.restore import restore
        conf = cfg.load(cfg.AgentConfig, args.config)
        setup_logging(conf.log_level, conf.log_json, conf.device_id)
        result = restore(conf, args.dataset, args.snapshot, args.out)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"restored {args.dataset}/{args.snapshot} to {args.out}: {result['bytes']} bytes, "
                  f"blake3 {result['blake3']} verified")
        return EXIT_OK
    if args.command == "keygen":
        from bus.security import create_keypair
        from schemas import is_valid_id
        if not is_valid_id(args.name):
            print(f"speedsync keygen: {args.name!r} is not a valid id", file=sys.stderr)
            return EXIT_USAGE
        public, secret = create_keypair(args.out, args.name)
        print(f"wrote {public} (public: give it to the broker) and {secret} (secret: keep it here)")
        return EXIT_OK
    if args.command == "demo":
        from roles.demo import run_demo
        return run_demo(args.workdir, args.size)
    return EXIT_USAGE
