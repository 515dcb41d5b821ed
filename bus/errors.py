"""The error tree. Every error a peer can cause has a stable wire code.

    SpeedSyncError
    ├── ProtocolError            a message broke the wire rules
    │   ├── RemoteProtocolError  the peer sent it (we answer ERROR, keep serving)
    │   └── LocalProtocolError   we were about to send it (a bug on our side)
    └── RequestError             a well-formed request we refuse (forbidden, not_found...)

`code` is the stable identifier carried in ERROR messages; `reason` is for
humans. Never put a traceback on the wire.
"""

from __future__ import annotations

# Stable codes. Add, never rename: operators grep logs and metrics for them.
CODES = {
    "bad_frames": "the multipart layout is wrong (frame count, empty header)",
    "too_large": "a header or list exceeds its declared limit",
    "bad_header": "the header frame is not a msgpack map",
    "bad_version": "the protocol major version is not ours",
    "unknown_type": "the message type is not declared in schemas/",
    "bad_field": "a field is missing, of the wrong type or out of range",
    "bad_id": "an id does not match the id syntax",
    "not_registered": "the peer has not said HELLO/READY yet",
    "unknown_transfer": "the transfer id does not exist",
    "forbidden": "the peer may not touch that object",
    "bad_state": "the message is not allowed in the transfer's state",
    "credit_exceeded": "data was sent beyond the granted credit",
    "bad_chunk": "chunk bytes do not match their name",
    "bad_delta": "a delta does not rebuild its chunk from its base (corrupt, larger than announced, or another blake3)",
    "not_found": "the snapshot or chunk does not exist",
    "no_storage": "no storage node is available",
    "node_unavailable": "the node holding this dataset is not available",
    "storage_error": "the storage node failed to store or read",
    "commit_failed": "the manifest could not be committed",
    "conflict": "the snapshot exists with different content",
    "pruned": "the snapshot was pruned and its removal from the node is not finished; offer it again later",
    "stalled": "the transfer made no acknowledged progress for too long",
    "over_budget": "the device is over one of its budgets (device_uploads_max, restores_per_device, upload sessions "
                   "or chunk bytes in pieces on a node)",
    "catalog_mismatch": "the node's answer disagrees with the catalog's record of the snapshot",
    "internal": "an unexpected failure on the answering side",
    "rate_limited": "the device sent QUERY slices faster than query_rate",
    "image_too_large": "the image is larger than any node it may go to could ever hold (its free plus used bytes)",
    "no_space": "no node it may go to has room for the image now (free space minus what uploads in progress "
                "reserve); parked, and offered again when room appears",
    "quota_exceeded": "the device's stored bytes would exceed its quota",
    "damaged": "the snapshot has chunks found damaged on its node (quarantined); a new upload of the same data heals it",
    "catalog_unavailable": "the broker's catalog cannot serve now (its disk is full or failing, its PostgreSQL server unreachable); offer or ask again later",
}


class SpeedSyncError(Exception):
    code = "internal"

    def __init__(self, reason: str, code: str | None = None):
        super().__init__(reason)
        if code is not None:
            if code not in CODES:
                raise ValueError(f"unknown error code {code!r}")
            self.code = code

    @property
    def reason(self) -> str:
        return str(self.args[0])


class ProtocolError(SpeedSyncError):
    code = "bad_field"


class RemoteProtocolError(ProtocolError):
    """The peer sent something that breaks the wire rules."""


class LocalProtocolError(ProtocolError):
    """We were about to send something that breaks the wire rules."""


class RequestError(SpeedSyncError):
    """A valid request we refuse; `code` says why."""
