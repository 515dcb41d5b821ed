"""The commit path of StorageCore, and how uploads end (a mixin: the core's
state, split off to keep each file to one job).

COMMIT, in order: the manifest is complete (every slice, every chunk asked
for stored); chunks this upload depends on (another upload of the device is
sending them) are stored, or it waits for them (waiting_on_peer) and is
rechecked on that device's STORED or closed uploads only; the store pool
checks the snapshot is not stored with other content (a committed manifest
is never overwritten; the same one again is idempotent) and that every chunk
file is on disk; the image thread checks the whole-image blake3 and saves
the manifest durably; then COMMITTED. Any refusal is an ERROR ref COMMIT.
"""

from __future__ import annotations

import errno

from loguru import logger

from bus.effects import Send
from bus.errors import RequestError
from roles.counting import decrement
from roles.storenode.manifests import conflict as conflict_error, same_content
from roles.storenode.restores import BROKER
from roles.storenode.transitions import UPLOAD_TRANSITIONS as UPLOAD, advance, fail
from schemas import make

COMMIT_RECHECK_S = 1.0  # an idle upload that is committing is looked at again this often


def check_commit(manifests, chunks, manifest) -> tuple[bool, bool]:
    """On a store thread: (conflict, every chunk file present) for a manifest about to commit."""
    conflict = False
    if manifests.exists(manifest.device_id, manifest.dataset, manifest.snapshot):
        existing = manifests.load(manifest.device_id, manifest.dataset, manifest.snapshot)
        conflict = not same_content(existing, manifest)
    present = all(chunks.has(name) for name in set(manifest.chunks) if name is not None)
    return conflict, present


def describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{error.__class__.__name__}: {error}"


def storage_code(error: BaseException) -> str:
    """A full disk is `no_space` (the broker parks the upload until room appears); any other failure
    of the disk `storage_error`."""
    return "no_space" if isinstance(error, OSError) and error.errno == errno.ENOSPC else "storage_error"


def as_commit_error(error: BaseException, tid: str) -> RequestError:
    if isinstance(error, RequestError):
        return error
    logger.error("commit of {} failed: {}", tid, error)
    code = storage_code(error) if isinstance(error, OSError) else "commit_failed"
    return RequestError(f"commit failed: {describe(error)}", code)


class CommitPath:
    def _violated(self, session, out: list) -> None:
        """The peer broke the protocol: the session fails, and stops holding names in flight."""
        fail(session, UPLOAD)
        self._release(session, out)

    def _release(self, session, out: list) -> None:
        if session.awaiting:
            self.in_flight.release(session.device_id, session.awaiting)
            session.awaiting = set()
            self._recheck_waiting_commits(session.device_id, out)

    def _commit(self, session, msg, out: list) -> None:
        try:
            advance(session, UPLOAD, "COMMIT", "broker")
            session.require_complete()
        except RequestError:
            self._violated(session, out)
            raise
        session.image_blake3 = msg["image_blake3"]
        self._try_commit(session, out)

    def _try_commit(self, session, out: list) -> None:
        """Check on the pool now, or wait for chunks another upload of the device is sending."""
        device, tid = session.device_id, session.transfer_id
        waiting_on = session.unresolved_depends(self._owns(device))
        if waiting_on:
            if all(self.in_flight.contains(device, name) for name in waiting_on):
                if session.state == "committing":
                    advance(session, UPLOAD, "waiting")
                self.in_flight.wait(device, tid)
                return
            self.in_flight.unwait(device, tid)
            self._close_upload(tid, out)
            raise RequestError("chunks another transfer was to send never arrived; offer again", "commit_failed")
        self.in_flight.unwait(device, tid)
        if session.state == "waiting_on_peer":
            advance(session, UPLOAD, "peer_stored")
        self._store(out, ("check", tid), check_commit, self.manifests, self.chunks, session.manifest())

    def _commit_checked(self, key, result, error, now: float, out: list) -> None:
        tid = key[1]
        session = self.uploads.get(tid)
        if session is None or session.state != "committing":
            return
        if error is not None:
            advance(session, UPLOAD, "refused")
            self._error(out, as_commit_error(error, tid), "COMMIT", transfer_id=tid)
            return
        conflict, present = result
        manifest = session.manifest()
        if conflict:
            self._close_upload(tid, out)
            self._error(out, conflict_error(manifest), "COMMIT", transfer_id=tid)
            return
        owns = self._owns(session.device_id)
        if not present or not all(owns(name) for name in manifest.chunks if name is not None):
            advance(session, UPLOAD, "refused")
            self._error(out, RequestError("the manifest names chunks this device has not stored", "commit_failed"),
                        "COMMIT", transfer_id=tid)
            return
        self._advance_image(session, out)
        if not session.fully_hashed:  # cannot happen when every chunk is owned; never commit unhashed
            advance(session, UPLOAD, "refused")
            self._error(out, RequestError("image hash incomplete at commit", "commit_failed"), "COMMIT",
                        transfer_id=tid)
            return
        self.image_turns.finish(session.device_id, tid, manifest)  # after its feeds, in the device's turn

    def _committed(self, key, result, error, now: float, out: list) -> None:
        tid = key[1]
        session = self.uploads.get(tid)
        if session is None:
            return
        if error is not None:
            self._close_upload(tid, out)
            self._error(out, as_commit_error(error, tid), "COMMIT", transfer_id=tid)
            return
        if session.state != "committing":
            self._close_upload(tid, out)
            return  # failed meanwhile: its error went out then
        advance(session, UPLOAD, "committed")
        self._close_upload(tid, out)
        self.commits += 1
        m = result
        logger.info("committed {}/{}/{} ({} chunks)", m.device_id, m.dataset, m.snapshot, m.chunk_count)
        out.append(Send(BROKER, make("COMMITTED", transfer_id=tid, device_id=m.device_id, dataset=m.dataset,
                                     snapshot=m.snapshot, image_size=m.image_size, chunk_count=m.chunk_count,
                                     image_blake3=m.image_blake3)))

    def _close_upload(self, tid: str, out: list):
        """Forget an upload, and that it was to send what it still awaits."""
        session = self.uploads.pop(tid, None)
        self.assembler.forget(tid)
        if session is None:
            return None
        decrement(self.sessions_per_device, session.device_id)
        self.pins.release(tid)  # un-pinned in batches, and held to the end of a GC run in progress (gcpins.py)
        self.deadlines.schedule("unpin", 0.0)  # due at once
        hashed = session.state == "committed"  # the image thread forgot it at finish
        advance(session, UPLOAD, "ABORT")
        self.deadlines.cancel(("idle", tid))
        self.in_flight.unwait(session.device_id, tid)
        if not hashed:
            self.image_turns.drop(session.device_id, tid)
        if session.awaiting:
            self.in_flight.release(session.device_id, session.awaiting)
            session.awaiting = set()
        self._recheck_waiting_commits(session.device_id, out)
        return session

    def _recheck_waiting_commits(self, device: str, out: list) -> None:
        for tid in self.in_flight.waiting(device):
            session = self.uploads.get(tid)
            if session is None or session.state != "waiting_on_peer":
                self.in_flight.unwait(device, tid)
                continue
            try:
                self._try_commit(session, out)
            except RequestError as exc:
                self._error(out, exc, "COMMIT", transfer_id=tid)

    def _expire_upload(self, tid: str, now: float, out: list) -> None:
        session = self.uploads.get(tid)
        if session is None:
            return
        due = session.last_activity + self._idle_s
        if due > now:
            self.deadlines.schedule(("idle", tid), due)
        elif session.state in ("committing", "waiting_on_peer"):
            self.deadlines.schedule(("idle", tid), now + COMMIT_RECHECK_S)
        else:
            logger.info("forgetting idle upload {}", tid)
            self._close_upload(tid, out)
