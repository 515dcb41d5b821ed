"""One snapshot's upload as a plain object: a pipeline driven by events.

Theory of operation: the image is read and hashed in batches on the pool
(`read_and_hash`); batches are turned, strictly in order, into QUERY slices
of the manifest and fed to the whole-image hasher. The node answers each
slice with the indexes this device lacks; only those are compressed and,
within the credit the broker granted, sent as CHUNK. Raw bytes read for
hashing are kept until the slice's answer so that a chunk is read from disk
once. Everything held is bounded: batches in hashing, raw bytes awaiting an
answer (`max_held_bytes`), compressed bytes awaiting credit.

The owner (the agent process) injects `submit(key, fn, *args)` for pool work
and `send(message)` for the wire, and calls `on_*` with results and replies.
"""

from __future__ import annotations

import time
from collections import deque

import blake3

from bus.credit import SendCredit
from bus.errors import RequestError
from loguru import logger

from roles.appliance.cbt import check_sample
from roles.appliance.chunker import compress, read_and_hash, read_chunk
from roles.appliance.scanner import PendingSnapshot
from roles.geometry import ImageGeometry
from roles.appliance.transitions import FINAL_STATES, UPLOAD_REPLIES, move
from schemas import make

BATCH_CHUNKS = 16
MAX_HASH_BATCHES_IN_FLIGHT = 4



class Upload:
    def __init__(self, pending: PendingSnapshot, submit, send, hash_image, compress_level: int = 1,
                 max_held_bytes: int = 48 * 1024 * 1024, clock=time.monotonic, known: dict | None = None,
                 read_pacer=None, sample: dict | None = None, distrust=None):
        self.pending = pending
        self.chunk_size = pending.dataset.chunk_size
        self.image_size = pending.size
        self.geometry = ImageGeometry(self.image_size, self.chunk_size)
        self.chunk_count = self.geometry.chunk_count
        self._submit = submit
        self._send = send
        self._hash_image = hash_image  # callable(pieces, final: bool) on the ordered hasher
        # changed-block tracking: {index: name} of chunks not read; then the
        # node computes the image's blake3 (we never see every byte)
        self.known = known
        # unchanged chunks read and checked before anything else: a lying sidecar means a full read
        self._sample = dict(sample or {}) if known else {}
        self._sampling = False
        self._distrust = distrust  # callable(): this snapshot's sidecar lied (never trust it again)
        self.sampled_chunks = 0
        self.sidecar_lied = False
        self.read_pacer = read_pacer
        self.names: list = []  # the manifest in order, kept for the next snapshot's CBT
        self.compress_level = compress_level
        self.max_held_bytes = max_held_bytes
        self._clock = clock
        self.transfer_id: str | None = None
        self.state = "offering"
        self.reason = ""
        self.credit = SendCredit()
        self.started_at = clock()
        self.last_heard = self.started_at  # the cloud's last word about this upload
        self.finished_at: float | None = None
        self.image_blake3: bytes | None = None
        # pipeline
        self._next_batch = 0
        self._hashing = 0
        self._hashed: dict[int, list] = {}
        self._next_query = 0
        self._unanswered: deque = deque()  # starts of QUERY slices sent, in order
        self._held: dict[int, bytes] = {}
        self._held_bytes = 0
        self._to_compress: deque = deque()
        self._compressing = 0
        self._ready: deque = deque()  # (name, raw_len, codec, payload)
        self._ready_bytes = 0
        self._current: list | None = None  # [name, raw_len, codec, payload, offset] being sent in pieces
        self.unacked_wire = 0  # payload bytes sent, not yet STORED (the agent's window)
        self._awaiting_stored: set = set()
        self._digest_requested = False
        # figures for the summary (DESIGN.md agent --once --json)
        self.chunks_sent = 0
        self.bytes_read = 0
        self.bytes_sent = 0
        self.bytes_stored_raw = 0
        self.bytes_known = 0  # raw bytes the cloud already had (or zero chunks)

    # --- negotiation -----------------------------------------------------

    def offer(self, req: int):
        return make("OFFER", req=req, dataset=self.pending.dataset.name, snapshot=self.pending.snapshot,
                    image_size=self.image_size, chunk_size=self.chunk_size, chunk_count=self.chunk_count,
                    **({} if self.pending.taken_at is None else {"taken_at": self.pending.taken_at}))

    def heard(self) -> None:
        self.last_heard = self._clock()

    def require_allowed(self, t: str) -> None:
        """Raise RequestError(bad_state) for a reply this state does not allow."""
        if t not in UPLOAD_REPLIES.get(self.state, ()):
            raise RequestError(f"{t} while the upload is {self.state}", "bad_state")

    def silent_for(self, now: float) -> float:
        return now - self.last_heard

    def on_accept(self, transfer_id: str, committed: bool) -> None:
        if committed:
            self._finish("already_committed")
            return
        self.transfer_id = transfer_id
        move(self, "accepted")
        self.pump()

    # --- pipeline ----------------------------------------------------------

    def pump(self) -> None:
        if self.state != "sending":
            return
        if self._sample:
            if not self._sampling:
                self._sampling = True
                self._submit(("sample", 0), check_sample, self.pending.path, self._sample, self.chunk_size,
                             self.image_size, self.read_pacer)
            return
        while (self._next_batch < self.chunk_count and self._hashing < MAX_HASH_BATCHES_IN_FLIGHT
               and self._held_bytes + self._hashing * BATCH_CHUNKS * self.chunk_size < self.max_held_bytes):
            count = min(BATCH_CHUNKS, self.chunk_count - self._next_batch)
            self._submit(("hash", self._next_batch), read_and_hash, self.pending.path, self._next_batch, count,
                         self.chunk_size, self.image_size, self.known, self.read_pacer)
            self._next_batch += count
            self._hashing += 1
        while self._to_compress and self._compressing + len(self._ready) < MAX_HASH_BATCHES_IN_FLIGHT * 2:
            index, name = self._to_compress.popleft()
            raw = self._held.pop(index, None)
            if raw is not None:
                self._held_bytes -= len(raw)
            else:  # a chunk CBT did not read, and the cloud lacks after all
                self.bytes_read += self._chunk_len(index)
            self._compressing += 1
            self._submit(("compress", index), self._compress_named, name, raw, index)
        self._maybe_commit()

    def on_sampled(self, lied: list) -> None:
        """The sampled unchanged chunks were read: any mismatch and the whole image is read and hashed."""
        self.sampled_chunks = len(self._sample)
        self.bytes_read += sum(self._chunk_len(i) for i in self._sample)
        self._sample = {}
        if lied:
            self.sidecar_lied = True
            logger.warning("{}/{}: the .changes sidecar under-reports: chunk(s) {} changed but are not listed; "
                           "reading the whole image", self.pending.dataset.name, self.pending.snapshot,
                           ", ".join(map(str, lied[:8])) + (" ..." if len(lied) > 8 else ""))
            self.known = None
            if self._distrust is not None:
                self._distrust()
        self.pump()

    def _compress_named(self, name: bytes, raw: bytes | None, index: int):
        if raw is None:
            raw = read_chunk(self.pending.path, index, self.chunk_size, self.image_size, self.read_pacer)
            if blake3.blake3(raw).digest() != name:
                if self._distrust is not None:
                    self._distrust()  # the retry reads the whole image
                raise OSError(f"chunk {index} changed but the .changes sidecar did not say so")
        codec, payload = compress(raw, self.compress_level)
        return name, len(raw), codec, payload

    def on_hashed(self, start: int, entries: list) -> None:
        self._hashing -= 1
        self._hashed[start] = entries
        while self._next_query in self._hashed:
            batch = self._hashed.pop(self._next_query)
            names, pieces = [], []
            for index, name, raw in batch:
                names.append(name)
                length = self._chunk_len(index)
                pieces.append((raw, length))
                if raw is not None:
                    self._held[index] = raw
                    self._held_bytes += len(raw)
                    self.bytes_read += len(raw)
                elif self.known is None or index not in self.known:
                    self.bytes_read += length  # read, and found all zero
            self.names.extend(names)
            if self.known is None:
                self._hash_image(pieces, False)
            self._send(make("QUERY", transfer_id=self.transfer_id, start=self._next_query, hashes=names))
            self._unanswered.append((self._next_query, names))
            self._next_query += len(batch)
        if self._next_query >= self.chunk_count and not self._digest_requested and self.known is None:
            self._digest_requested = True
            self._hash_image([], True)
        self.pump()

    def on_missing(self, start: int, missing: list) -> None:
        if not self._unanswered or self._unanswered[0][0] != start:
            raise RequestError(f"MISSING for slice {start} out of order", "bad_state")
        _, names = self._unanswered.popleft()
        wanted = set()
        for index in missing:
            if not start <= index < start + len(names) or names[index - start] is None:
                raise RequestError(f"MISSING names index {index} outside its slice", "bad_field")
            wanted.add(index)
        for offset, name in enumerate(names):
            index = start + offset
            if index in wanted:
                self._to_compress.append((index, names[offset]))
                self._awaiting_stored.add(name)
            else:
                raw = self._held.pop(index, None)
                if raw is not None:
                    self._held_bytes -= len(raw)
                self.bytes_known += self._chunk_len(index)
        self.pump()

    def on_compressed(self, name: bytes, raw_len: int, codec: str, payload: bytes) -> None:
        self._compressing -= 1
        self._ready.append((name, raw_len, codec, payload))
        self._ready_bytes += len(payload)
        self.pump()

    def on_credit(self, nbytes: int) -> None:
        self.credit.grant(nbytes)

    # --- the wire (driven by the agent's WireScheduler) ---------------------

    def next_piece(self, limit: int) -> int | None:
        """Size of the next piece this upload could send now, or None."""
        if self.state != "sending":
            return None
        if self._current is None:
            if not self._ready:
                return None
            payload = self._ready[0][3]
            size = min(limit, len(payload))
        else:
            payload, offset = self._current[3], self._current[4]
            size = min(limit, len(payload) - offset)
        return size if self.credit.can_spend(size) else None

    def send_piece(self, limit: int, now: float) -> int:
        if self._current is None:
            name, raw_len, codec, payload = self._ready.popleft()
            self._ready_bytes -= len(payload)
            self._current = [name, raw_len, codec, payload, 0]
        name, raw_len, codec, payload, offset = self._current
        size = min(limit, len(payload) - offset)
        self.credit.try_spend(size)
        piece = memoryview(payload)[offset:offset + size]
        fields = {} if size == len(payload) else {"offset": offset, "total": len(payload)}
        self._send(make("CHUNK", payload=[piece], transfer_id=self.transfer_id, hash=name, raw_len=raw_len,
                        codec=codec, **fields))
        self.bytes_sent += size
        self.unacked_wire += size
        self._current[4] = offset + size
        if self._current[4] >= len(payload):
            self._current = None
            self.chunks_sent += 1
        self.pump()
        return size

    def on_stored(self, name: bytes, raw_len: int, wire_len: int) -> None:
        if name not in self._awaiting_stored:
            raise RequestError("STORED for a chunk this upload is not waiting on", "bad_state")
        self._awaiting_stored.discard(name)
        self.unacked_wire = max(0, self.unacked_wire - wire_len)
        self.bytes_stored_raw += raw_len
        self._maybe_commit()

    def on_image_digest(self, digest: bytes) -> None:
        self.image_blake3 = digest
        self._maybe_commit()

    def _maybe_commit(self) -> None:
        hashed = self.image_blake3 is not None or self.known is not None
        if (self.state == "sending" and hashed and self._next_query >= self.chunk_count
                and not self._unanswered and not self._to_compress and not self._compressing
                and not self._ready and self._current is None and not self._awaiting_stored
                and not self._hashing):
            move(self, "all_stored")
            self._send(make("COMMIT", transfer_id=self.transfer_id, image_blake3=self.image_blake3))

    def on_committed(self, image_blake3: bytes) -> None:
        if self.image_blake3 is not None and image_blake3 != self.image_blake3:
            self.fail("the cloud committed another image blake3 than ours")
            return
        self.image_blake3 = image_blake3
        self._finish("COMMITTED")

    def fail(self, reason: str) -> None:
        self.reason = reason
        self._finish("fail")

    def park(self, reason: str) -> None:
        """The cloud cannot take it now (no node for it); offer again later."""
        self.reason = reason
        self._finish("park")

    def _finish(self, event: str) -> None:
        move(self, event)
        self.finished_at = self._clock()
        self._held.clear()
        self._ready.clear()
        self._current = None
        self._to_compress.clear()

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def idle_work(self) -> bool:
        """True when pool tasks of this upload may still be running."""
        return self._hashing > 0 or self._compressing > 0

    def _chunk_len(self, index: int) -> int:
        return self.geometry.chunk_len(index)

    # --- reporting -----------------------------------------------------------

    def progress(self) -> tuple[int, int]:
        """(raw bytes known to be in the cloud, image bytes)."""
        return self.bytes_known + self.bytes_stored_raw, self.image_size

    def summary(self) -> dict:
        end = self.finished_at if self.finished_at is not None else self._clock()
        return {"dataset": self.pending.dataset.name, "snapshot": self.pending.snapshot, "state": self.state,
                "chunks_total": self.chunk_count, "chunks_sent": self.chunks_sent, "bytes_image": self.image_size,
                "bytes_read": self.bytes_read, "bytes_sent": self.bytes_sent,
                **({"chunks_sampled": self.sampled_chunks} if self.sampled_chunks else {}),
                **({"sidecar_lied": True} if self.sidecar_lied else {}),
                "seconds": round(end - self.started_at, 3), **({"reason": self.reason} if self.reason else {})}
