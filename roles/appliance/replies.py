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
