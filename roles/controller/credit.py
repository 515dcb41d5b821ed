"""Credit in bytes, from the storage node's window to each upload (DESIGN.md
"Wire protocol"; the zguide's fileio3 idea, per transfer).

Theory of operation: a storage node announces a credit window W, the bytes
it accepts in flight. The `CreditScheduler` shares it among the uploads
placed on that node: an upload is granted credit only for bytes it has to
send (`demand`: raw bytes of chunks the node said are missing and not yet
received), up to its own window, and only from the node's free credit. An
agent sends within the credit it holds; the broker counts each chunk in
flight until the node's STORED (or refusal) returns it. So for every node

    sum(holding + in_flight_bytes of its uploads) == pool.outstanding <= W

and a slow node slows its senders instead of growing the broker's memory.
An upload short of credit waits in its node's FIFO (`hungry`), served as
credit returns: O(uploads served) per STORED, fair by wait. Payload bytes
never exceed raw bytes (agents send a chunk raw when compression does not
help), so raw demand bounds wire credit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from bus.credit import CreditPool
from bus.errors import RequestError

PIECE_SLACK = 1024  # a compressed payload may exceed its raw length by a frame header at most


@dataclass
class UploadLedger:
    """One upload's credit: what it may still send, holds, and has in flight."""

    window: int = 0
    demand: int = 0
    holding: int = 0
    in_flight: dict = field(default_factory=dict)  # chunk name -> [wire_len, raw_len]
    in_flight_bytes: int = 0
    chunks_received: int = 0

    def wanted(self) -> int:
        room = self.window - self.in_flight_bytes - self.holding
        return max(0, min(room, self.demand - self.holding))

    def spend(self, name: bytes, wire_len: int, raw_len: int, offset: int | None, total: int | None) -> None:
        """The agent spent credit on a chunk or a piece of one; raises before changing anything."""
        if wire_len > self.holding:
            raise RequestError(f"{wire_len} payload bytes with {self.holding} bytes of credit", "credit_exceeded")
        first = not offset
        if (total if total is not None else wire_len) > raw_len + PIECE_SLACK:
            raise RequestError("payload larger than its raw length", "bad_field")
        if first and name in self.in_flight:
            raise RequestError("chunk already in flight", "bad_state")
        if not first and name not in self.in_flight:
            raise RequestError("a piece of a chunk that was not started", "bad_state")
        self.holding -= wire_len
        if first:
            self.demand = max(0, self.demand - raw_len)
            self.in_flight[name] = [wire_len, raw_len]
            self.chunks_received += 1
        else:
            self.in_flight[name][0] += wire_len
        self.in_flight_bytes += wire_len

    def done(self, name: bytes) -> tuple[int, int]:
        """The node stored or refused a chunk: (wire bytes to release, raw length)."""
        wire_len, raw_len = self.in_flight.pop(name, (0, 0))
        self.in_flight_bytes -= wire_len
        return wire_len, raw_len

    def release_holding(self) -> int:
        held, self.holding = self.holding, 0
        return held

    def release_all(self) -> int:
        total = self.holding + self.in_flight_bytes
        self.holding = 0
        self.in_flight.clear()
        self.in_flight_bytes = 0
        self.demand = 0
        return total


@dataclass
class NodeCredit:
    pool: CreditPool
    hungry: OrderedDict = field(default_factory=OrderedDict)  # transfer id -> None, oldest wait first


class CreditScheduler:
    def __init__(self):
        self.nodes: dict[str, NodeCredit] = {}

    def add_node(self, node_id: str, window: int) -> CreditPool:
        credit = self.nodes[node_id] = NodeCredit(CreditPool(window))
        return credit.pool

    def grant(self, node_id: str, transfer_id: str, ledger: UploadLedger, chunk_size: int) -> int:
        """Credit for one upload now; 0 (and the upload queued) when the node's pool is short."""
        node = self.nodes.get(node_id)
        wanted = ledger.wanted()
        if node is None or wanted <= 0:
            return 0
        # At least a whole chunk's worth, so credit never fragments into slivers no chunk fits in.
        if node.pool.free < min(wanted, chunk_size + PIECE_SLACK):
            node.hungry.setdefault(transfer_id, None)
            return 0
        granted = node.pool.take(wanted)
        ledger.holding += granted
        return granted

    def is_waiting(self, node_id: str, transfer_id: str) -> bool:
        node = self.nodes.get(node_id)
        return node is not None and transfer_id in node.hungry

    def serve_waiting(self, node_id: str, lookup) -> list:
        """Hand freed credit to waiting uploads, oldest first: [(transfer, granted)].
        `lookup(tid)` gives the live upload or None (finished meanwhile)."""
        node = self.nodes.get(node_id)
        out = []
        while node is not None and node.hungry and node.pool.free > 0:
            tid = next(iter(node.hungry))
            del node.hungry[tid]
            t = lookup(tid)
            if t is None:
                continue
            granted = self.grant(node_id, tid, t.ledger, t.chunk_size)
            if granted:
                out.append((t, granted))
            elif tid in node.hungry:  # still short: it keeps its place at the head
                node.hungry.move_to_end(tid, last=False)
                break
        return out

    def release(self, node_id: str, n: int) -> None:
        node = self.nodes.get(node_id)
        if node is not None and n:
            node.pool.release(n)

    def forget(self, node_id: str, transfer_id: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None:
            node.hungry.pop(transfer_id, None)

