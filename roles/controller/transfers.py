"""Broker-side transfers: a state table and end-to-end credit accounting.

Theory of operation (DESIGN.md "Wire protocol", credit):
a storage node announces a credit window W (bytes it accepts in flight).
The broker shares it among the uploads placed on that node: an upload is
granted credit only for bytes it actually has to send (`demand`: raw bytes
of chunks the node said are missing and not yet received), up to its own
window, and only from the node's free credit. An agent sends a chunk only
within credit it holds; the broker forwards it and counts it in flight; the
node's STORED (or a refusal) returns it. Hence for every node
    sum(holding + in_flight of its uploads) == node.credit.outstanding <= W
and a slow node slows its senders instead of growing the broker's memory.
Payload bytes on the wire never exceed raw bytes (agents send a chunk raw
when compression does not help), so raw demand bounds wire credit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bus.errors import RequestError

# state -> message types allowed from the agent / the node in that state
AGENT_ALLOWED = {
    "opening": {"ABORT"},
    "active": {"QUERY", "CHUNK", "COMMIT", "ABORT"},
    "committing": {"ABORT"},
    "restoring": {"CREDIT", "ABORT"},
}
NODE_ALLOWED = {
    "opening": {"OPENED", "ERROR"},
    "active": {"MISSING", "STORED", "ERROR"},
    "committing": {"STORED", "COMMITTED", "ERROR"},
    "restoring": {"IMAGE", "BLOCK", "ERROR"},
}
FINAL_STATES = {"committed", "failed", "aborted", "restored", "parked", "resumed"}


@dataclass
class Transfer:
    transfer_id: str
    kind: str  # "upload" | "restore"
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
    state: str = "opening"
    reason: str = ""
    bytes_done: int = 0
    bytes_sent: int = 0
    chunks_received: int = 0
    demand: int = 0
    holding: int = 0
    in_flight: dict = field(default_factory=dict)  # chunk name -> (wire_len, raw_len)
    in_flight_bytes: int = 0
    started_at: float = 0.0
    last_progress: float = 0.0
    finished_at: float | None = None

    # --- the state table ---------------------------------------------------

    def require_from_agent(self, t: str) -> None:
        if t not in AGENT_ALLOWED.get(self.state, ()):
            raise RequestError(f"{t} not allowed for transfer {self.transfer_id} in state {self.state}", "bad_state")

    def require_from_node(self, t: str) -> None:
        if t not in NODE_ALLOWED.get(self.state, ()):
            raise RequestError(f"{t} not allowed for transfer {self.transfer_id} in state {self.state}", "bad_state")

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    # --- sizes -------------------------------------------------------------

    def chunk_len(self, index: int) -> int:
        if index < self.chunk_count - 1:
            return self.chunk_size
        return self.image_size - self.chunk_size * (self.chunk_count - 1)

    def slice_len(self, start: int, count: int) -> int:
        end = min(start + count, self.chunk_count)
        if end <= start:
            return 0
        full = (end - start) * self.chunk_size
        if end == self.chunk_count:
            full -= self.chunk_size - self.chunk_len(self.chunk_count - 1)
        return full

    # --- credit --------------------------------------------------------------

    def on_missing(self, start: int, count: int, missing: list) -> None:
        missing_raw = sum(self.chunk_len(i) for i in missing if 0 <= i < self.chunk_count)
        self.demand += missing_raw
        self.bytes_done += self.slice_len(start, count) - missing_raw

    def credit_wanted(self) -> int:
        """Bytes of credit this upload could use now."""
        if self.state != "active":
            return 0
        room = self.window - self.in_flight_bytes - self.holding
        unsent_demand = self.demand - self.holding
        return max(0, min(room, unsent_demand))

    def on_chunk_sent(self, name: bytes, wire_len: int, raw_len: int, offset: int | None = None,
                      total: int | None = None) -> None:
        """The agent spent credit on a chunk, or a piece of one; raises
        credit_exceeded if it had not enough."""
        if wire_len > self.holding:
            raise RequestError(f"{wire_len} payload bytes with {self.holding} bytes of credit", "credit_exceeded")
        first = not offset
        if (total if total is not None else wire_len) > raw_len + 1024:
            raise RequestError("payload larger than its raw length", "bad_field")
        if first and name in self.in_flight:
            raise RequestError("chunk already in flight", "bad_state")
        if not first and name not in self.in_flight:
            raise RequestError("a piece of a chunk that was not started", "bad_state")
        self.holding -= wire_len
        if first:
            self.demand = max(0, self.demand - raw_len)
            self.in_flight[name] = (wire_len, raw_len)
            self.chunks_received += 1
        else:
            sent, raw = self.in_flight[name]
            self.in_flight[name] = (sent + wire_len, raw)
        self.in_flight_bytes += wire_len
        self.bytes_sent += wire_len

    def on_chunk_done(self, name: bytes, stored: bool) -> int:
        """The node stored (or refused) a chunk; returns wire bytes to release."""
        wire_len, raw_len = self.in_flight.pop(name, (0, 0))
        self.in_flight_bytes -= wire_len
        if stored:
            self.bytes_done += raw_len
        return wire_len

    def release_holding(self) -> int:
        """Unspent credit, returned to the node's pool when the agent is done sending."""
        held, self.holding = self.holding, 0
        return held

    def release_all(self) -> int:
        """Everything this transfer still holds, for the node's pool, on finish."""
        total = self.holding + self.in_flight_bytes
        self.holding = 0
        self.in_flight.clear()
        self.in_flight_bytes = 0
        self.demand = 0
        return total

    def status(self) -> dict:
        return {
            "transfer_id": self.transfer_id, "kind": self.kind, "device_id": self.device_id,
            "dataset": self.dataset, "snapshot": self.snapshot, "node_id": self.node_id, "state": self.state,
            "reason": self.reason, "bytes_total": self.image_size, "bytes_done": self.bytes_done,
            "bytes_sent": self.bytes_sent, "chunks_received": self.chunks_received,
            "credit_holding": self.holding, "in_flight_bytes": self.in_flight_bytes,
        }
