"""Credit in bytes, from the storage node's window to each upload (DESIGN.md
"Wire protocol"; the zguide's fileio3 idea, per transfer).

Theory of operation: a storage node announces a credit window W, the bytes
it accepts in flight. The `CreditScheduler` shares it among the uploads
placed on that node: an upload is granted credit only for bytes it has to
send (`demand`: raw bytes of chunks the node said are missing and not yet
received, and `owed`: the pieces still to come of chunks begun), up to its
own window, and only from the node's free credit. An agent sends within
the credit it holds; the broker counts each chunk in flight until the
node's STORED (or refusal) returns it. So for every node

    sum(holding + in_flight_bytes of its uploads) == pool.outstanding <= W

and a slow node slows its senders instead of growing the broker's memory.
Fair shares by device: a device may hold at most `window / devices`
of a node's credit, counting the devices that hold some or wait for some,
so one device's eight uploads and another's one share the node 1:1 while
both are busy, and one device alone may use all of it. An upload short of
credit waits under its device; waiting devices are served round robin
(a device served goes to the back), and within a device its uploads
oldest first: O(devices waiting) per STORED. Payload bytes
never exceed raw bytes (agents send a chunk raw when compression does not
help), so raw demand bounds wire credit.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from bus.credit import CreditPool
from bus.errors import RequestError
from roles.counting import decrement

PIECE_SLACK = 1024  # a compressed payload may exceed its raw length by a frame header at most


@dataclass
class UploadLedger:
    """One upload's credit: what it may still send, holds, and has in flight.

    A chunk leaves `demand` (raw bytes) at its first piece; the wire bytes of
    its pieces still to come are `owed` until they arrive, so a chunk begun
    with too little credit still gets the rest of it."""

    window: int = 0
    demand: int = 0
    owed: int = 0
    holding: int = 0
    in_flight: dict = field(default_factory=dict)  # chunk name -> [wire bytes received, raw_len, wire total]
    in_flight_bytes: int = 0
    chunks_received: int = 0
    device: str = ""  # whose share this upload's credit counts against

    def wanted(self) -> int:
        room = self.window - self.in_flight_bytes - self.holding
        return max(0, min(room, self.demand + self.owed - self.holding))

    def spend(self, name: bytes, wire_len: int, raw_len: int, offset: int | None, total: int | None) -> None:
        """The agent spent credit on a chunk or a piece of one; raises before changing anything."""
        if wire_len > self.holding:
            raise RequestError(f"{wire_len} payload bytes with {self.holding} bytes of credit", "credit_exceeded")
        first = not offset
        total = total if total is not None else wire_len
        if total > raw_len + PIECE_SLACK:
            raise RequestError("payload larger than its raw length", "bad_field")
        entry = self.in_flight.get(name)
        if first and entry is not None:
            raise RequestError("chunk already in flight", "bad_state")
        if not first and entry is None:
            raise RequestError("a piece of a chunk that was not started", "bad_state")
        if (wire_len if first else entry[0] + wire_len) > (total if first else entry[2]):
            raise RequestError("piece runs past the chunk's total", "bad_field")
        self.holding -= wire_len
        if first:
            self.demand = max(0, self.demand - raw_len)
            self.in_flight[name] = [wire_len, raw_len, total]
            self.owed += total - wire_len
            self.chunks_received += 1
        else:
            entry[0] += wire_len
            self.owed -= wire_len
        self.in_flight_bytes += wire_len

    def done(self, name: bytes) -> tuple[int, int]:
        """The node stored or refused a chunk: (wire bytes to release, raw length)."""
        wire_len, raw_len, total = self.in_flight.pop(name, (0, 0, 0))
        self.in_flight_bytes -= wire_len
        self.owed -= total - wire_len  # a chunk refused part-way is owed no more
        return wire_len, raw_len

    def release_holding(self) -> int:
        held, self.holding = self.holding, 0
        return held

    def release_all(self) -> int:
        total = self.holding + self.in_flight_bytes
        self.holding = 0
        self.in_flight.clear()
        self.in_flight_bytes = 0
        self.demand = self.owed = 0
        return total


@dataclass
class NodeCredit:
    pool: CreditPool
    # device -> {transfer id: None}, oldest wait first; device order is the round robin
    hungry: OrderedDict = field(default_factory=OrderedDict)
    held: Counter = field(default_factory=Counter)  # device -> credit outstanding (holding + in flight)
    # devices holding or waiting for credit (held | hungry), kept as they change: `share` runs per
    # grant, on every STORED, and must not walk every device on the node
    active: set = field(default_factory=set)

    def share(self, device: str) -> int:
        devices = len(self.active) + (device not in self.active)
        return self.pool.window // devices

    def settle(self, device: str) -> None:
        """After `held` or `hungry` changed for `device`."""
        if device in self.held or device in self.hungry:
            self.active.add(device)
        else:
            self.active.discard(device)


class CreditScheduler:
    def __init__(self):
        self.nodes: dict[str, NodeCredit] = {}

    def add_node(self, node_id: str, window: int) -> CreditPool:
        credit = self.nodes[node_id] = NodeCredit(CreditPool(window))
        return credit.pool

    def grant(self, node_id: str, transfer_id: str, ledger: UploadLedger, chunk_size: int) -> int:
        """Credit for one upload now; 0 (and the upload queued) when the node's pool,
        or its device's share of it, is short."""
        node = self.nodes.get(node_id)
        wanted = ledger.wanted()
        if node is None or wanted <= 0:
            return 0
        device = ledger.device
        smallest = min(wanted, chunk_size + PIECE_SLACK)
        # At least a whole chunk's worth, so credit never fragments into slivers no chunk fits in.
        room = max(node.share(device) - node.held[device], smallest if not node.held[device] else 0)
        wanted = min(wanted, room)
        if wanted < smallest or node.pool.free < smallest:
            node.hungry.setdefault(device, OrderedDict()).setdefault(transfer_id, None)
            node.active.add(device)
            return 0
        granted = node.pool.take(min(wanted, node.pool.free))
        ledger.holding += granted
        node.held[device] += granted
        node.active.add(device)
        return granted

    def is_waiting(self, node_id: str, transfer_id: str, device: str = "") -> bool:
        node = self.nodes.get(node_id)
        if node is None:
            return False
        return transfer_id in node.hungry.get(device, ())

    def serve_waiting(self, node_id: str, lookup) -> list:
        """Hand freed credit to waiting uploads, device by device round robin: [(transfer, granted)].
        `lookup(tid)` gives the live upload or None (finished meanwhile)."""
        node = self.nodes.get(node_id)
        out = []
        stuck = 0  # devices in a row that could not be served
        while node is not None and node.hungry and node.pool.free > 0 and stuck < len(node.hungry):
            device, tids = next(iter(node.hungry.items()))
            tid = next(iter(tids))
            del tids[tid]
            if not tids:
                del node.hungry[device]
                node.settle(device)
            t = lookup(tid)
            if t is None:
                continue
            granted = self.grant(node_id, tid, t.ledger, t.chunk_size)
            if granted:
                out.append((t, granted))
                stuck = 0
                if device in node.hungry:
                    node.hungry.move_to_end(device)
            elif tid in node.hungry.get(device, ()):  # still short: it keeps its place at its device's head...
                node.hungry[device].move_to_end(tid, last=False)
                node.hungry.move_to_end(device)  # ...and the next device is tried
                stuck += 1
        return out

    def release(self, node_id: str, n: int, device: str = "") -> None:
        node = self.nodes.get(node_id)
        if node is not None and n:
            node.pool.release(n)
            decrement(node.held, device, n)
            node.settle(device)

    def forget(self, node_id: str, transfer_id: str, device: str = "") -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        tids = node.hungry.get(device)
        if tids is not None:
            tids.pop(transfer_id, None)
            if not tids:
                del node.hungry[device]
                node.settle(device)
