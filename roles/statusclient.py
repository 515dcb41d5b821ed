"""Client side of the status sockets: the broker's STATUS and LIST (paged), and
the running agent's own (`speedsync agent --status`). Rendering: roles/render.py."""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq

from bus import security
from bus.errors import CODES, RemoteProtocolError, RequestError
from schemas import decode, encode, make
from schemas.limits import max_frame_for
from roles.config import AgentConfig


@dataclass(frozen=True)
class OperatorKeys:
    """An operator's key pair and the broker's public key, for a CURVE status socket."""
    key_file: str
    broker_key: str


def ask(endpoint: str, message, timeout_ms: int = 5000, keys: OperatorKeys | None = None):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_for("operator"))
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
        raise RequestError(reply["reason"], reply["code"] if reply["code"] in CODES else "internal")
    return reply


def fetch_status(endpoint: str, timeout_ms: int = 5000, keys: OperatorKeys | None = None,
                 device_id: str | None = None) -> dict:
    """The broker's status document; `device_id` narrows agents and transfers to one device."""
    fields = {"device_id": device_id} if device_id else {}
    return ask(endpoint, make("STATUS", **fields), timeout_ms, keys)["status"]


def drain(endpoint: str, node_id: str, undrain: bool = False, timeout_ms: int = 5000,
          keys: OperatorKeys | None = None) -> dict:
    """Start (or with `undrain`, end) the drain of a storage node: the broker's DRAIN_REPLY document."""
    fields = {"undrain": True} if undrain else {}
    return ask(endpoint, make("DRAIN", node_id=node_id, **fields), timeout_ms, keys)["drain"]


def fetch_list(endpoint: str, device_id: str | None = None, timeout_ms: int = 5000,
               keys: OperatorKeys | None = None, dataset: str | None = None) -> list:
    """The whole catalog (of one device, one dataset), asked a page at a time: each LIST_REPLY
    says where the next page starts, until one says nothing."""
    fields = {k: v for k, v in (("device_id", device_id), ("dataset", dataset)) if v}
    rows: list = []
    after = None
    while True:
        reply = ask(endpoint, make("LIST", **fields, **({"after": after} if after else {})), timeout_ms, keys)
        rows += reply["snapshots"]
        previous, after = after, reply.get("next")
        if not after:
            return rows
        if previous is not None and tuple(after) <= tuple(previous):
            raise RequestError(f"{endpoint} paged backwards ({previous} then {after})", "internal")


def status_endpoint(config: AgentConfig) -> str:
    return config.status_bind or f"ipc://{os.path.join(config.state_dir, 'agent.sock')}"


def query_agent_status(config: AgentConfig, timeout_ms: int = 3000) -> dict:
    """`speedsync agent --config F --status`: ask the running agent."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_for("operator"))
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
