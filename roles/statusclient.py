"""Client side of the status sockets: the broker's STATUS and LIST, and their
rendering; the running agent's own (`speedsync agent --status`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq

from bus import security
from bus.errors import RemoteProtocolError, RequestError
from schemas import decode, encode, make
from roles.config import AgentConfig
from roles.tables import table
from roles.units import format_bytes


@dataclass(frozen=True)
class OperatorKeys:
    """An operator's key pair and the broker's public key, for a CURVE status socket."""
    key_file: str
    broker_key: str


def ask(endpoint: str, message, timeout_ms: int = 5000, keys: OperatorKeys | None = None):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if keys is not None:
            security.make_client(sock, security.load_keypair(keys.key_file), security.load_public(keys.broker_key))
        sock.connect(endpoint)
        sock.send_multipart(encode(message))
        if not sock.poll(timeout_ms):
            hint = "" if keys else " (a CURVE broker answers only operator keys: --key-file, --broker-key)"
            raise RequestError(f"no answer from {endpoint} within {timeout_ms} ms{hint}", "node_unavailable")
        reply = decode(sock.recv_multipart())
    except RemoteProtocolError as exc:
        raise RequestError(f"bad answer from {endpoint}: {exc}", "internal") from None
    finally:
        sock.close()
    if reply.t == "ERROR":
        raise RequestError(reply["reason"], "internal")
    return reply


def fetch_status(endpoint: str, timeout_ms: int = 5000, keys: OperatorKeys | None = None) -> dict:
    return ask(endpoint, make("STATUS"), timeout_ms, keys)["status"]


def fetch_list(endpoint: str, device_id: str | None = None, timeout_ms: int = 5000,
               keys: OperatorKeys | None = None) -> list:
    fields = {"device_id": device_id} if device_id else {}
    return ask(endpoint, make("LIST", **fields), timeout_ms, keys)["snapshots"]


def render_status(status: dict) -> str:
    b = status["broker"]
    parts = [
        f"broker: rss {format_bytes(b['rss_bytes'])}, dropped {b['dropped_messages']}, "
        f"errors {b['errors_by_code'] or 'none'}",
        "",
        "storage nodes:",
        table(["node", "alive", "free", "used", "load", "credit out/window"],
               [[n["node_id"], "yes" if n["alive"] else "NO", format_bytes(n["free_bytes"]),
                 format_bytes(n["used_bytes"]), n.get("load", 0),
                 f"{format_bytes(n['credit']['outstanding'])}/{format_bytes(n['credit']['window'])}"]
                for n in status["storage"]]),
        "",
        "agents:",
        table(["device", "connected"], [[a["device_id"], "yes" if a["connected"] else "no"]
                                          for a in status["agents"]]),
        "",
        "transfers:",
        table(["transfer", "device", "dataset", "snapshot", "node", "state", "done/total", "sent"],
               [[t["transfer_id"], t["device_id"], t["dataset"], t["snapshot"], t["node_id"],
                 t["state"] + (f" ({t['reason']})" if t.get("reason") else ""),
                 f"{format_bytes(t['bytes_done'])}/{format_bytes(t['bytes_total'])}", format_bytes(t["bytes_sent"])]
                for t in status["transfers"]]),
    ]
    return "\n".join(parts)


def render_list(snapshots: list) -> str:
    return table(["device", "dataset", "snapshot", "node", "size", "blake3"],
                  [[s["device_id"], s["dataset"], s["snapshot"], s["node_id"], format_bytes(s["size"]),
                    s["blake3"][:16]] for s in snapshots])


def status_endpoint(config: AgentConfig) -> str:
    return config.status_bind or f"ipc://{os.path.join(config.state_dir, 'agent.sock')}"


def query_agent_status(config: AgentConfig, timeout_ms: int = 3000) -> dict:
    """`speedsync agent --config F --status`: ask the running agent."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(status_endpoint(config))
        sock.send_multipart(encode(make("STATUS")))
        if not sock.poll(timeout_ms):
            raise RequestError(f"no agent answers at {status_endpoint(config)} (is it running?)", "internal")
        reply = decode(sock.recv_multipart())
    finally:
        sock.close()
    if reply.t != "STATUS_REPLY":
        raise RequestError(reply.get("reason", "unexpected answer"), "internal")
    return dict(reply["status"])
