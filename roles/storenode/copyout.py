"""A drain's copies, on the node being drained: this node is the sender of
an upload to another node, through the broker (DESIGN.md "Lifecycle", Drain).

Theory of operation. COPY names a committed snapshot. Its manifest is loaded
on the store pool and checked against the catalog's image blake3; IMAGE
tells the broker its geometry, and the broker opens the upload on the
target node as the device's. OPENED starts the stream: QUERY slices in
order (at most `SLICES_OUT` unanswered), and for every index the target
says it lacks, the chunk file as stored (already verified against its name
by the target) goes as CHUNK once the broker's CREDIT covers it, one read
on the pool at a time. When every slice is answered and every missing chunk
sent and STORED, COMMIT carries the catalog's image blake3: the target re-hashes the
whole image before it commits. An ERROR or ABORT from the broker ends the
copy; nothing here changes the store.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from bus.effects import Send, Submit
from bus.errors import RequestError
from roles.storenode.restores import BROKER, read_block
from schemas import error_message, make
from schemas.messages import MAX_HASHES_PER_QUERY

SLICES_OUT = 2


@dataclass
class CopyOut:
    transfer_id: str
    key: tuple  # (device, dataset, snapshot)
    image_blake3: bytes
    manifest: object = None
    started: bool = False
    next_query: int = 0  # the first chunk index not yet asked about
    slices_out: int = 0
    to_send: deque = field(default_factory=deque)  # indexes the target lacks, in order
    credit: int = 0
    reading: bool = False
    ready: tuple | None = None  # (index, codec, raw_len, payload)
    unstored: int = 0  # chunks sent whose STORED has not come (the target commits only once all have)
    committed: bool = False
    last_activity: float = 0.0

    def all_sent(self) -> bool:
        return (self.next_query >= self.manifest.chunk_count and not self.slices_out and not self.to_send
                and not self.reading and self.ready is None and not self.unstored)


class CopySender:
    def __init__(self, chunks, manifests, read_hook=None):
        self._chunks = chunks
        self._manifests = manifests
        self._read_hook = read_hook
        self.sessions: dict[str, CopyOut] = {}
        self.chunks_sent = 0
        self.bytes_sent = 0

    def __len__(self) -> int:
        return len(self.sessions)

    def begin(self, msg, now: float) -> list:
        tid = msg["transfer_id"]
        if tid in self.sessions:
            raise RequestError(f"copy {tid} is open already", "bad_state")
        key = (msg["device_id"], msg["dataset"], msg["snapshot"])
        self.sessions[tid] = CopyOut(tid, key, msg["image_blake3"], last_activity=now)
        return [Submit("store", ("copy-manifest", tid), self._manifests.load, key)]

    def manifest_loaded(self, tid: str, manifest, error, now: float) -> list:
        copy = self.sessions.get(tid)
        if copy is None:
            return []  # aborted meanwhile
        if error is None and manifest.image_blake3 != copy.image_blake3:
            error = RequestError("the manifest's image blake3 is not the catalog's", "catalog_mismatch")
        if error is not None:
            del self.sessions[tid]
            if not isinstance(error, RequestError):
                error = RequestError(f"manifest read failed: {error}", "storage_error")
            return [Send(BROKER, error_message(error, ref="COPY", transfer_id=tid))]
        copy.manifest, copy.last_activity = manifest, now
        return [Send(BROKER, make("IMAGE", transfer_id=tid, image_size=manifest.image_size,
                                  chunk_size=manifest.chunk_size, chunk_count=manifest.chunk_count,
                                  image_blake3=manifest.image_blake3))]

    def opened(self, tid: str, now: float) -> list:
        copy = self._session(tid, now)
        if copy.manifest is None or copy.started:
            raise RequestError(f"OPENED for copy {tid} before its IMAGE, or twice", "bad_state")
        copy.started = True
        return self._pump(copy)

    def missing(self, msg, now: float) -> list:
        copy = self._session(msg["transfer_id"], now)
        if not copy.slices_out:
            raise RequestError("MISSING for no slice asked", "bad_state")
        copy.slices_out -= 1
        count = copy.manifest.chunk_count
        copy.to_send.extend(i for i in msg["missing"] if 0 <= i < count and copy.manifest.chunks[i] is not None)
        return self._pump(copy)

    def credit(self, tid: str, nbytes: int, now: float) -> list | None:
        """None if `tid` is not a copy (the CREDIT is a restore's)."""
        copy = self.sessions.get(tid)
        if copy is None:
            return None
        copy.credit += nbytes
        copy.last_activity = now
        return self._pump(copy)

    def stored(self, tid: str, now: float) -> list:
        copy = self.sessions.get(tid)
        if copy is None:
            return []
        copy.last_activity = now
        copy.unstored = max(0, copy.unstored - 1)
        return self._pump(copy)

    def chunk_read(self, tid: str, index: int, result, error, now: float) -> list:
        copy = self.sessions.get(tid)
        if copy is None or not copy.reading:
            return []
        copy.reading = False
        if error is not None:
            del self.sessions[tid]
            if not isinstance(error, RequestError):
                error = RequestError(f"chunk {index}: {error}", "storage_error")
            return [Send(BROKER, error_message(error, ref="COPY", transfer_id=tid))]
        copy.ready = (index, *result)
        return self._pump(copy)

    def abort(self, tid: str) -> bool:
        return self.sessions.pop(tid, None) is not None

    def clear(self) -> None:
        self.sessions.clear()

    def idle_since(self, tid: str) -> float | None:
        copy = self.sessions.get(tid)
        return None if copy is None else copy.last_activity

    def _session(self, tid: str, now: float) -> CopyOut:
        copy = self.sessions.get(tid)
        if copy is None:
            raise RequestError(f"no copy {tid} on this node", "unknown_transfer")
        copy.last_activity = now
        return copy

    def _pump(self, copy: CopyOut) -> list:
        out = []
        tid, manifest = copy.transfer_id, copy.manifest
        if not copy.started or copy.committed:
            return out
        while copy.slices_out < SLICES_OUT and copy.next_query < manifest.chunk_count:
            start = copy.next_query
            names = list(manifest.chunks[start:start + MAX_HASHES_PER_QUERY])
            copy.next_query += len(names)
            copy.slices_out += 1
            out.append(Send(BROKER, make("QUERY", transfer_id=tid, start=start, hashes=names)))
        while copy.ready is not None:
            index, codec, raw_len, payload = copy.ready
            if len(payload) > copy.credit:
                break
            copy.credit -= len(payload)
            copy.ready = None
            copy.unstored += 1
            self.chunks_sent += 1
            self.bytes_sent += len(payload)
            out.append(Send(BROKER, make("CHUNK", payload=[payload], transfer_id=tid, hash=manifest.chunks[index],
                                         raw_len=raw_len, codec=codec)))
            self._read_next(copy, out)
        if copy.ready is None:
            self._read_next(copy, out)
        if copy.all_sent():
            copy.committed = True
            out.append(Send(BROKER, make("COMMIT", transfer_id=tid, image_blake3=copy.image_blake3)))
        return out

    def _read_next(self, copy: CopyOut, out: list) -> None:
        if copy.reading or copy.ready is not None or not copy.to_send:
            return
        index = copy.to_send.popleft()
        copy.reading = True
        out.append(Submit("store", ("copy-read", copy.transfer_id, index), read_block,
                          (self._chunks, index, copy.manifest.chunks[index], self._read_hook)))
