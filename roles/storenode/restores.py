"""Restores: chunk files streamed back in order, under the agent's credit.

Theory of operation: a READ's manifest is loaded on the store pool; then
IMAGE goes out and the session streams. Each session reads its next chunk
file on the store pool (never on the loop thread) and holds at most one
ready block: a BLOCK goes only when its payload fits the credit the agent
granted, so the bytes in flight never exceed it; without credit the
session waits (waiting_credit) and reads nothing more until CREDIT comes.
All-zero chunks travel as BLOCKs without payload and take no credit. A
CREDIT for a restore that has sent everything is late, not an error.
States and moves: `transitions.READ_TRANSITIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from bus.effects import Send, Submit
from bus.errors import RequestError
from roles.storenode.manifests import Manifest
from roles.storenode.transitions import READ_TRANSITIONS, advance
from schemas import error_message, make

BROKER = ("broker", None)


@dataclass
class ReadSession:
    """A restore stream: chunks go out in order, only within the agent's credit."""

    transfer_id: str
    manifest: Manifest
    credit: int
    next_index: int = 0
    last_activity: float = 0.0
    state: str = "streaming"  # see transitions.READ_TRANSITIONS
    reading: bool = False  # a read of chunk `next_index` is on the store pool
    ready: tuple | None = None  # (codec, raw_len, payload) of chunk `next_index`

    @property
    def finished(self) -> bool:
        return self.next_index >= self.manifest.chunk_count


def read_block(chunks, index: int, name: bytes, read_hook=None) -> tuple:
    """On a store thread: the chunk file as stored; errors name the chunk index.
    `read_hook()` runs first (the fault component's, in tests); it may raise OSError."""
    try:
        if read_hook is not None:
            read_hook()
        return chunks.read_stored(name)
    except RequestError as exc:
        raise RequestError(f"chunk {index}: {exc.reason}", exc.code) from None
    except OSError as exc:
        raise RequestError(f"chunk {index}: {exc.strerror or exc}", "storage_error") from None


class RestorePump:
    def __init__(self, chunks, read_hook=None):
        self._chunks = chunks
        self._read_hook = read_hook
        self.sessions: dict[str, ReadSession] = {}
        self._opening: dict[str, int] = {}  # transfer id -> credit that came while the manifest loads
        self.blocks_sent = 0
        self.bytes_sent = 0

    def __len__(self) -> int:
        return len(self.sessions) + len(self._opening)

    def opening(self, transfer_id: str, window: int) -> None:
        self._opening[transfer_id] = window

    def opened(self, transfer_id: str, manifest: Manifest, now: float) -> list:
        """The manifest is loaded: IMAGE, then as many blocks as credit allows."""
        credit = self._opening.pop(transfer_id, None)
        if credit is None:
            return []  # aborted while the manifest loaded
        session = self.sessions[transfer_id] = ReadSession(transfer_id, manifest, credit, last_activity=now)
        image = make("IMAGE", transfer_id=transfer_id, image_size=manifest.image_size,
                     chunk_size=manifest.chunk_size, chunk_count=manifest.chunk_count,
                     image_blake3=manifest.image_blake3)
        return [Send(BROKER, image), *self._pump(session)]

    def credit(self, transfer_id: str, nbytes: int, now: float) -> list:
        if transfer_id in self._opening:
            self._opening[transfer_id] += nbytes
            return []
        session = self.sessions.get(transfer_id)
        if session is None:
            return []  # the restore has sent everything: late credit is not an error
        session.credit += nbytes
        session.last_activity = now
        advance(session, READ_TRANSITIONS, "CREDIT", "broker")
        return self._pump(session)

    def block_read(self, transfer_id: str, index: int, result, error, now: float) -> list:
        session = self.sessions.get(transfer_id)
        if session is None or session.next_index != index or not session.reading:
            return []  # aborted meanwhile
        session.reading = False
        if error is not None:
            self.abort(transfer_id)
            if not isinstance(error, RequestError):
                error = RequestError(f"chunk {index}: {error}", "storage_error")
            return [Send(BROKER, error_message(error, ref="READ", transfer_id=transfer_id))]
        session.ready = result
        return self._pump(session)

    def failed_to_open(self, transfer_id: str) -> bool:
        return self._opening.pop(transfer_id, None) is not None

    def abort(self, transfer_id: str) -> None:
        self._opening.pop(transfer_id, None)
        session = self.sessions.pop(transfer_id, None)
        if session is not None:
            advance(session, READ_TRANSITIONS, "ABORT")

    def transfer_ids(self) -> set:
        return set(self.sessions) | set(self._opening)

    def clear(self) -> None:
        for transfer_id in list(self.sessions):
            self.abort(transfer_id)
        self._opening.clear()

    def idle_since(self, transfer_id: str) -> float | None:
        session = self.sessions.get(transfer_id)
        return None if session is None else session.last_activity

    def _pump(self, session: ReadSession) -> list:
        out = []
        tid, chunks = session.transfer_id, session.manifest.chunks
        while session.state == "streaming":
            if session.finished:
                advance(session, READ_TRANSITIONS, "sent_all")
                del self.sessions[tid]
                break
            index = session.next_index
            if session.ready is not None:
                codec, raw_len, payload = session.ready
                if len(payload) > session.credit:
                    advance(session, READ_TRANSITIONS, "no_credit")
                    break
                session.credit -= len(payload)
                session.ready = None
                self.blocks_sent += 1
                self.bytes_sent += len(payload)
                out.append(Send(BROKER, make("BLOCK", payload=[payload], transfer_id=tid, index=index,
                                             hash=chunks[index], raw_len=raw_len, codec=codec)))
                session.next_index += 1
                continue
            name = chunks[index]
            if name is None:
                self.blocks_sent += 1
                out.append(Send(BROKER, make("BLOCK", transfer_id=tid, index=index, hash=None,
                                             raw_len=session.manifest.chunk_len(index), codec="raw")))
                session.next_index += 1
                continue
            if not session.reading:
                session.reading = True
                out.append(Submit("store", ("block", tid, index), read_block, (self._chunks, index, name, self._read_hook)))
            break
        return out
