"""Restores under the broker's credit (DESIGN.md "Wire protocol": the bytes in
flight of a transfer never exceed its window; no process buffers without bound).

Theory of operation: the agent asks for a window; the broker caps it at
`restore_window` and opens the node's stream with READ(window=cap), so the
node starts with that much credit and sends BLOCKs only within it. Every
BLOCK payload the broker forwards is counted in flight, for its restore and
for its node. An agent's CREDIT acknowledges bytes it received: at most what
is in flight (more is refused, `credit_exceeded`, and changes nothing), and
only then is it passed on to the node as new credit. So for every restore

    node's credit + bytes travelling to the broker + in_flight == window

and the broker never holds more than `window` bytes of one restore, whatever
window the agent asked for and whether or not it reads. Once IMAGE says the
chunk size, a window smaller than one chunk's largest payload is raised to
it (the node is granted the difference), or nothing could ever move.

A restore that makes no progress (no IMAGE or BLOCK forwarded, no CREDIT
acknowledged) for `restore_idle_timeout_ms` is failed `stalled`: the agent
gets ERROR, the node ABORT, and its bytes leave the counts. A device may run
at most `restores_per_device` restores at once; one more is refused
`over_budget` before anything is allocated for it.

IMAGE is checked against the catalog's entry (size, chunk count,
whole-image blake3) before it is forwarded: a node that disagrees with the
catalog fails the restore (`catalog_mismatch`), so the agent verifies the
image against what the catalog recorded at commit, never against the node's word.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from bus.deadlines import Deadlines
from bus.errors import RequestError
from roles.counting import decrement
from roles.controller.credit import PIECE_SLACK
from roles.geometry import ImageGeometry


@dataclass
class RestoreLedger:
    """One restore's credit, seen from the broker."""

    window: int
    expected_size: int = 0
    expected_chunks: int = 0
    expected_blake3: bytes = b""
    in_flight: int = 0  # BLOCK payload bytes forwarded to the agent and not yet acknowledged
    last_progress: float = 0.0


class RestoreCredit:
    def __init__(self, window_cap: int, idle_timeout_s: float, per_device: int):
        self.window_cap = window_cap
        self.idle_timeout_s = idle_timeout_s
        self.per_device = per_device
        self.ledgers: dict[str, RestoreLedger] = {}
        self.node_in_flight: Counter = Counter()  # node id -> restore bytes in flight through the broker
        self.device_restores: Counter = Counter()  # device id -> restores in progress
        self.idle = Deadlines()

    # --- admission ---------------------------------------------------------------------

    def admit(self, transfer_id: str, device_id: str, asked_window: int, now: float) -> RestoreLedger:
        """A new restore: refused `over_budget` when the device already runs its share."""
        if self.device_restores[device_id] >= self.per_device:
            raise RequestError(f"device {device_id} already runs {self.per_device} restores "
                               f"(restores_per_device)", "over_budget")
        self.device_restores[device_id] += 1
        ledger = self.ledgers[transfer_id] = RestoreLedger(min(asked_window, self.window_cap), last_progress=now)
        self.idle.schedule(transfer_id, now + self.idle_timeout_s)
        return ledger

    def found(self, transfer_id: str, entry: dict) -> None:
        """The catalog's entry for the snapshot: what the node's IMAGE must say."""
        ledger = self.ledgers[transfer_id]
        ledger.expected_size, ledger.expected_chunks = entry["size"], entry["chunk_count"]
        ledger.expected_blake3 = bytes.fromhex(entry["blake3"])

    def release(self, transfer_id: str, node_id: str, device_id: str) -> None:
        ledger = self.ledgers.pop(transfer_id, None)
        if ledger is None:
            return
        self.idle.cancel(transfer_id)
        decrement(self.node_in_flight, node_id, ledger.in_flight)
        decrement(self.device_restores, device_id, 1)

    # --- the stream ----------------------------------------------------------------------

    def image(self, transfer_id: str, image_size: int, chunk_size: int, chunk_count: int, image_blake3: bytes,
              now: float) -> int:
        """Check the node's IMAGE against the catalog; returns extra credit to grant
        the node (0 unless the window must grow to fit one chunk)."""
        ledger = self.ledgers[transfer_id]
        if image_size != ledger.expected_size:
            raise RequestError(f"the node says {image_size} bytes, the catalog {ledger.expected_size}",
                               "catalog_mismatch")
        if chunk_count != ledger.expected_chunks:
            raise RequestError(f"the node says {chunk_count} chunks, the catalog {ledger.expected_chunks}",
                               "catalog_mismatch")
        if ImageGeometry(image_size, chunk_size).chunk_count != chunk_count:
            raise RequestError(f"{chunk_count} chunks of {chunk_size} bytes cannot make {image_size} bytes",
                               "catalog_mismatch")
        if bytes(image_blake3) != ledger.expected_blake3:
            raise RequestError("the node's image blake3 is not the catalog's", "catalog_mismatch")
        ledger.last_progress = now
        needed = chunk_size + PIECE_SLACK
        if ledger.window >= needed:
            return 0
        extra, ledger.window = needed - ledger.window, needed
        return extra

    def block(self, transfer_id: str, node_id: str, payload_len: int, now: float) -> None:
        """A BLOCK about to be forwarded; a node that sends beyond its credit broke the protocol."""
        ledger = self.ledgers[transfer_id]
        if ledger.in_flight + payload_len > ledger.window:
            raise RequestError(f"{payload_len} more bytes with {ledger.in_flight} of {ledger.window} in flight",
                               "credit_exceeded")
        ledger.in_flight += payload_len
        self.node_in_flight[node_id] += payload_len
        ledger.last_progress = now

    def acknowledged(self, transfer_id: str, node_id: str, nbytes: int, now: float) -> None:
        """The agent's CREDIT: bytes it received, which the node may now send again."""
        ledger = self.ledgers[transfer_id]
        if nbytes > ledger.in_flight:
            raise RequestError(f"credit for {nbytes} bytes with {ledger.in_flight} in flight", "credit_exceeded")
        ledger.in_flight -= nbytes
        decrement(self.node_in_flight, node_id, nbytes)
        if nbytes:
            ledger.last_progress = now

    # --- the watchdog -------------------------------------------------------------------------

    def idle_due(self, now: float) -> list[str]:
        """Restores with no progress for the idle timeout (the others are rescheduled)."""
        out = []
        for tid in self.idle.pop_due(now):
            ledger = self.ledgers.get(tid)
            if ledger is None:
                continue
            due = ledger.last_progress + self.idle_timeout_s
            if due <= now:
                out.append(tid)
            else:
                self.idle.schedule(tid, due)
        return out

    def next_due(self) -> float | None:
        return self.idle.next_due()

    def in_flight(self, transfer_id: str) -> int:
        ledger = self.ledgers.get(transfer_id)
        return 0 if ledger is None else ledger.in_flight

    def window(self, transfer_id: str) -> int:
        ledger = self.ledgers.get(transfer_id)
        return 0 if ledger is None else ledger.window
