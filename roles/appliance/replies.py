"""What the agent makes of the cloud's refusals, and its answer on the status socket."""

from __future__ import annotations

from bus.effects import Send
from bus.errors import RequestError
from roles.appliance.status import agent_status
from schemas import error_message, make

# Refusals that say "not now" rather than "never": the upload is parked and
# offered again without counting as a failed attempt.
PARKING_CODES = {"node_unavailable", "no_storage", "stalled", "storage_error"}


def answer_status(core, peer, msg, now: float, wall_now: float) -> Send:
    """STATUS gets the agent's status document; anything else an ERROR."""
    if msg.t != "STATUS":
        return Send(peer, error_message(RequestError(f"{msg.t} is not a status request", "unknown_type")))
    return Send(peer, make("STATUS_REPLY", status=agent_status(core, now, wall_now)))


def apply_reply(upload, msg, wire, now: float) -> None:
    """Hand the cloud's reply about `upload` to it (ACCEPT's bookkeeping is the core's)."""
    if msg.t == "ACCEPT":
        upload.on_accept(msg["transfer_id"], msg["committed"])
    elif msg.t == "MISSING":
        upload.on_missing(msg["start"], msg["missing"])
    elif msg.t == "CREDIT":
        upload.on_credit(msg["bytes"])
    elif msg.t == "STORED":
        upload.on_stored(msg["hash"], msg["raw_len"], msg["wire_len"])
        wire.acknowledged(msg["wire_len"], now)
    elif msg.t == "COMMITTED":
        upload.on_committed(msg["image_blake3"])
    elif msg.t == "ERROR" and msg["code"] in PARKING_CODES:
        upload.park(f"{msg['code']}: {msg['reason']}")
    elif msg.t == "ERROR":
        upload.fail(f"{msg['code']}: {msg['reason']}")
