"""Broker-side transfers: the state machine, as one table.

Theory of operation (h11's `_state.py`, Rule 1): every change of a
transfer's `state` happens here, through `advance` (an event from a peer or
from the catalog thread) or `finish` (a final state). An event the table
does not list for the transfer's state is a protocol violation: `advance`
raises `bad_state` naming the type, the state and the peer, and the
controller moves the transfer to `error` on both sides.

Upload:  checking --catalog:checked--> opening --node:OPENED--> active
         active --agent:COMMIT--> committing --node:COMMITTED--> recording
         recording --catalog:recorded--> committed
Restore: checking --catalog:found--> restoring --node:BLOCK(last)--> restored
Copy (a drain's, drain.py; the source node is the sender, the node the target):
         checking --source:IMAGE--> opening --node:OPENED--> active
         active --source:COMMIT--> committing --node:COMMITTED--> recording
         recording --catalog:recorded--> committed
Any non-final state may end aborted, failed, parked or error.

Counting: a transfer the controller holds carries `tally`, the controller's
Counter of live transfers by state. Every move below keeps it right in O(1)
(the old state counted down, the new one up; a final state leaves it), so
status reads `transfers_by_state` without walking the transfers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from bus.errors import RequestError
from roles.counting import decrement
from roles.controller.credit import UploadLedger
from roles.geometry import ImageGeometry

CATALOG, AGENT, NODE, SOURCE = "catalog", "agent", "node", "source"

# (kind, state, sender, event) -> next state
TRANSITIONS = {
    ("upload", "checking", CATALOG, "checked"): "opening",
    ("upload", "opening", NODE, "OPENED"): "active",
    ("upload", "opening", NODE, "ERROR"): "opening",
    ("upload", "active", AGENT, "QUERY"): "active",
    ("upload", "active", AGENT, "CHUNK"): "active",
    ("upload", "active", AGENT, "COMMIT"): "committing",
    ("upload", "active", NODE, "MISSING"): "active",
    ("upload", "active", NODE, "STORED"): "active",
    ("upload", "active", NODE, "ERROR"): "active",
    ("upload", "committing", NODE, "STORED"): "committing",
    ("upload", "committing", NODE, "COMMITTED"): "recording",
    ("upload", "committing", NODE, "ERROR"): "committing",
    ("upload", "recording", CATALOG, "recorded"): "committed",
    ("restore", "checking", CATALOG, "found"): "restoring",
    ("restore", "restoring", AGENT, "CREDIT"): "restoring",
    ("restore", "restoring", NODE, "IMAGE"): "restoring",
    ("restore", "restoring", NODE, "BLOCK"): "restoring",
    ("restore", "restoring", NODE, "BLOCK@last"): "restored",
    ("restore", "restoring", NODE, "IMAGE@empty"): "restored",
    ("restore", "restoring", NODE, "ERROR"): "restoring",
    ("copy", "checking", SOURCE, "IMAGE"): "opening",
    ("copy", "opening", NODE, "OPENED"): "active",
    ("copy", "active", SOURCE, "QUERY"): "active",
    ("copy", "active", SOURCE, "CHUNK"): "active",
    ("copy", "active", SOURCE, "COMMIT"): "committing",
    ("copy", "active", NODE, "MISSING"): "active",
    ("copy", "active", NODE, "STORED"): "active",
    ("copy", "committing", NODE, "STORED"): "committing",
    ("copy", "committing", NODE, "COMMITTED"): "recording",
    ("copy", "recording", CATALOG, "recorded"): "committed",
}
# ABORT from the agent is allowed in every state that is not final.
LIVE_STATES = {"checking", "opening", "active", "committing", "recording", "restoring"}
for _kind, _states in (("upload", ("checking", "opening", "active", "committing", "recording")),
                       ("restore", ("checking", "restoring"))):
    for _state in _states:
        TRANSITIONS[(_kind, _state, AGENT, "ABORT")] = "aborted"

FINAL_STATES = {"committed", "failed", "aborted", "restored", "parked", "resumed", "error"}
# States whose uploads hold a node's attention (the stall watchdog's domain).
WATCHED_STATES = {"opening", "active", "committing"}


@dataclass
class Transfer:
    transfer_id: str
    kind: str  # "upload" | "restore" | "copy"
    device_id: str
    dataset: str
    snapshot: str
    node_id: str
    agent_routing: bytes
    req: int
    image_size: int = 0
    chunk_size: int = 0
    chunk_count: int = 0
    window: int = 0
    state: str = "checking"
    reason: str = ""
    bytes_done: int = 0
    bytes_sent: int = 0
    # chunks of the image the node has answered QUERY slices for (slices come in order): a slice past it is
    # progress, a slice asked again is not (a device cannot keep its upload alive by asking the same names)
    queried_to: int = 0
    ledger: UploadLedger = field(default_factory=UploadLedger)
    started_at: float = 0.0
    taken_at: int | None = None  # the snapshot's time, from its OFFER (None: the catalog uses committed_at)
    last_progress: float = 0.0
    finished_at: float | None = None
    refusal: RequestError | None = None  # placement's answer, kept while the catalog is asked
    source_node: str = ""  # a copy's sender: the node being drained
    image_blake3: bytes | None = None  # a copy's: the catalog's, which the target must match
    tally: Counter | None = field(default=None, repr=False, compare=False)  # live transfers by state

    @property
    def key(self) -> tuple:
        return self.device_id, self.dataset, self.snapshot

    @property
    def geometry(self) -> ImageGeometry:
        return ImageGeometry(self.image_size, self.chunk_size)

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def status(self) -> dict:
        extra = {"source_node_id": self.source_node} if self.kind == "copy" else {}
        return {**extra,
            "transfer_id": self.transfer_id, "kind": self.kind, "device_id": self.device_id,
            "dataset": self.dataset, "snapshot": self.snapshot, "node_id": self.node_id, "state": self.state,
            "reason": self.reason, "bytes_total": self.image_size, "bytes_done": self.bytes_done,
            "bytes_sent": self.bytes_sent, "chunks_received": self.ledger.chunks_received,
            "credit_holding": self.ledger.holding, "in_flight_bytes": self.ledger.in_flight_bytes,
        }


def advance(t: Transfer, sender: str, event: str, peer: str = "") -> str:
    """Move `t` by the table and return its next state; RequestError(bad_state)
    naming type, state and peer if the table has no entry. A final next state
    is returned but not yet assigned: the controller ends the transfer with
    `finish`, which releases what it holds."""
    next_state = TRANSITIONS.get((t.kind, t.state, sender, event))
    if next_state is None:
        who = f"{sender} {peer}".strip()
        raise RequestError(f"{event.split('@')[0]} not allowed for {t.kind} {t.transfer_id} in state {t.state} "
                           f"(from {who})", "bad_state")
    if next_state not in FINAL_STATES:
        _move(t, next_state)
    return next_state


def count_in(t: Transfer, tally: Counter) -> None:
    """`t` is live from now on: counted in `tally` under its state until it finishes."""
    t.tally = tally
    tally[t.state] += 1


def _move(t: Transfer, state: str) -> None:
    tally = t.tally
    if tally is not None:
        decrement(tally, t.state)
        if state in FINAL_STATES:
            t.tally = None
        else:
            tally[state] += 1
    t.state = state



def finish(t: Transfer, state: str, reason: str, now: float) -> None:
    if state not in FINAL_STATES:
        raise ValueError(f"{state} is not a final state")
    _move(t, state)
    t.reason, t.finished_at = reason, now


def parked_entry(t: Transfer, reason: str) -> None:
    """An offer waiting for its node: shown parked until offered again."""
    _move(t, "parked")
    t.reason = reason


def resumed(t: Transfer, now: float) -> None:
    _move(t, "resumed")
    t.finished_at = now
