"""Every SpeedSync message, declared once, as data.

The codec, validation, README's protocol table and the tests all read
`MESSAGES`. Roles: `agent` (appliance, DEALER), `broker` (controller, ROUTER
on both sides), `node` (storage worker, DEALER), `operator` (status client).

Protocol versioning: `v` is the major version. A peer with another major
version gets ERROR bad_version. New optional fields and new message types
are minor changes and keep `v`; removing or re-typing a field bumps it.

Flow of one upload (DESIGN.md, "Wire protocol"):
  agent OFFER -> broker OPEN -> node OPENED -> broker ACCEPT -> agent
  agent QUERY (manifest slice) -> node MISSING (indexes it lacks for this device)
  broker CREDIT -> agent CHUNK (+payload) -> node STORED (durable) -> agent
  agent COMMIT -> node COMMITTED (verified, manifest durable) -> broker catalog -> agent
Restore: agent RESTORE -> broker READ -> node IMAGE, BLOCK... under agent CREDIT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.fields import HASH, Bin, Bool, Doc, Field, Id, Int, ListOf, Str

PROTOCOL_VERSION = 1

MAX_CHUNK_SIZE = 16 * 1024 * 1024
MIN_CHUNK_SIZE = 4096
MAX_IMAGE_SIZE = 2**50
MAX_HASHES_PER_QUERY = 4096
MAX_CHUNKS = MAX_IMAGE_SIZE // MIN_CHUNK_SIZE
TAKEN_AT_MAX = 2**40  # a snapshot's time, seconds since the epoch (the image file's mtime)
# The largest chunk as it travels: zstd's worst case for MAX_CHUNK_SIZE (ZSTD_compressBound: + size/256)
MAX_WIRE_CHUNK = MAX_CHUNK_SIZE + MAX_CHUNK_SIZE // 256
CODECS = ("raw", "zstd")

# Header limits: data-path messages are small; QUERY carries up to 4096
# 32-byte names; only the broker's answers to operators may be large.
SMALL_HEADER = 4 * 1024
QUERY_HEADER = 160 * 1024
DOC_HEADER = 64 * 1024 * 1024
VERIFY_REPORT_HEADER = 64 * 1024  # 32 damaged snapshots named, 8 chunk names each


@dataclass(frozen=True)
class MessageType:
    name: str
    senders: tuple
    receivers: tuple
    purpose: str
    fields: dict = field(default_factory=dict)
    payload: tuple = (0, 0)  # (min, max) payload frames
    max_header: int = SMALL_HEADER
    planned: bool = False
    via: tuple = ()  # roles that pass it on between sender and receiver (the broker)


def _t(name, senders, receivers, purpose, fields=None, payload=(0, 0), max_header=SMALL_HEADER, planned=False,
       via=""):
    return MessageType(name, tuple(senders.split()), tuple(receivers.split()), purpose,
                       dict(fields or {}), payload, max_header, planned, tuple(via.split()))


TRANSFER = {"transfer_id": Id()}
# a node's store figures for status (READY, HEARTBEAT): chunk files, GC runs, bytes GC freed
NODE_FIGURES = {"chunks": Int(required=False), "gc_runs": Int(required=False),
                "gc_freed_bytes": Int(required=False)}
CATALOG_KEY = ListOf(item=Id(), max_items=3, required=False)  # (device_id, dataset, snapshot): a LIST page's key

_DECLARED = [
    _t("HELLO", "agent", "broker", "register a device session (identity from its key under CURVE)",
       {"device_id": Id(), "software": Str(max_len=64, required=False)}),
    _t("WELCOME", "broker", "agent", "session accepted; heartbeat interval to use (and, with no transfer in "
       "progress, the longer idle one)",
       {"heartbeat_interval_ms": Int(min=10, max=600_000), "idle_heartbeat_interval_ms": Int(min=10, max=600_000,
                                                                                             required=False)}),
    _t("READY", "node", "broker", "register a storage worker with its credit window and space",
       {"node_id": Id(), "window": Int(min=1, max=2**40), "free_bytes": Int(), "used_bytes": Int(),
        "software": Str(max_len=64, required=False), **NODE_FIGURES}),
    _t("HEARTBEAT", "agent broker node", "agent broker node", "liveness; nodes also report space, load, "
       "chunk count and garbage collection",
       {"free_bytes": Int(required=False), "used_bytes": Int(required=False),
        "load": Int(required=False), **NODE_FIGURES}),
    _t("BYE", "agent node", "broker", "orderly disconnect"),
    _t("PING", "agent", "broker", "round-trip probe (endpoint choice, yield mode's queueing delay)",
       {"seq": Int(), "sent_us": Int()}),
    _t("PONG", "broker", "agent", "the PING's fields, echoed at once", {"seq": Int(), "sent_us": Int()}),
    _t("OFFER", "agent", "broker", "ask to replicate one snapshot (device_id, if given, must be the key's)",
       {"req": Int(), "device_id": Id(required=False), "dataset": Id(), "snapshot": Id(), "image_size": Int(max=MAX_IMAGE_SIZE),
        "chunk_size": Int(min=MIN_CHUNK_SIZE, max=MAX_CHUNK_SIZE), "chunk_count": Int(max=MAX_CHUNKS),
        "taken_at": Int(max=TAKEN_AT_MAX, required=False)}),
    _t("OPEN", "broker", "node", "open an upload transfer on the chosen node",
       {**TRANSFER, "device_id": Id(), "dataset": Id(), "snapshot": Id(),
        "image_size": Int(max=MAX_IMAGE_SIZE), "chunk_size": Int(min=MIN_CHUNK_SIZE, max=MAX_CHUNK_SIZE),
        "chunk_count": Int(max=MAX_CHUNKS)}),
    _t("OPENED", "node broker", "broker node", "the node holds state for the transfer (broker to a drain copy's "
       "source node: its target is open, start sending)", {**TRANSFER}),
    _t("ROOM", "broker", "agent", "room appeared for a snapshot parked no_space: offer it again now",
       {"dataset": Id(), "snapshot": Id()}),
    _t("ACCEPT", "broker", "agent", "answer to OFFER or RESTORE: the transfer id and its node",
       {"req": Int(), **TRANSFER, "node_id": Id(), "committed": Bool()}),
    _t("QUERY", "agent node", "node", "a slice of the manifest in order: which of these do you lack? (nil = zero chunk)",
       {**TRANSFER, "start": Int(max=MAX_CHUNKS), "hashes": ListOf(item=Bin(size=32, max_len=32, nullable=True),
                                                                  max_items=MAX_HASHES_PER_QUERY)},
       max_header=QUERY_HEADER, via="broker"),
    _t("MISSING", "node", "agent node", "indexes of that slice this device has not stored (each name once per transfer)",
       {**TRANSFER, "start": Int(max=MAX_CHUNKS), "count": Int(max=MAX_HASHES_PER_QUERY),
        "missing": ListOf(item=Int(max=MAX_CHUNKS), max_items=MAX_HASHES_PER_QUERY)},
       max_header=QUERY_HEADER, via="broker"),
    _t("CREDIT", "broker agent", "agent node", "grant the right to send this many more payload bytes",
       {**TRANSFER, "bytes": Int(max=2**40)}, via="broker"),
    _t("CHUNK", "agent node", "node", "a chunk's bytes (zstd or raw), named by blake3 of the raw bytes; a paced "
       "sender may split them into pieces at `offset` of `total` payload bytes, sent in order",
       {**TRANSFER, "hash": HASH, "raw_len": Int(min=1, max=MAX_CHUNK_SIZE), "codec": Str(choices=CODECS),
        "offset": Int(max=MAX_WIRE_CHUNK, required=False),
        "total": Int(min=1, max=MAX_WIRE_CHUNK, required=False)},
       payload=(1, 1), via="broker"),
    _t("DELTA", "agent", "node", "a changed chunk as its base chunk plus the 4 KiB pages that differ",
       {**TRANSFER, "hash": HASH, "base_hash": HASH, "raw_len": Int(min=1, max=MAX_CHUNK_SIZE),
        "pages": ListOf(item=Int(max=MAX_CHUNK_SIZE // 4096), max_items=MAX_CHUNK_SIZE // 4096),
        "codec": Str(choices=CODECS)},
       payload=(1, 1), planned=True, via="broker"),
    _t("STORED", "node", "agent node", "the chunk is durable (fsync'd, renamed); its credit returns",
       {**TRANSFER, "hash": HASH, "raw_len": Int(max=MAX_CHUNK_SIZE), "wire_len": Int(max=MAX_WIRE_CHUNK)}, via="broker"),
    _t("COMMIT", "agent node", "node", "every chunk is sent: verify against the image blake3 (nil: the node computes it) and commit",
       {**TRANSFER, "image_blake3": Bin(size=32, max_len=32, nullable=True)}, via="broker"),
    _t("COMMITTED", "node", "broker agent", "the snapshot is verified against its image blake3 and durable",
       {**TRANSFER, "device_id": Id(), "dataset": Id(), "snapshot": Id(), "image_size": Int(max=MAX_IMAGE_SIZE),
        "chunk_count": Int(max=MAX_CHUNKS), "image_blake3": HASH}, via="broker"),
    _t("ABORT", "agent broker", "broker node", "forget a transfer (chunks already stored stay)", {**TRANSFER}),
    _t("PRUNE", "broker", "node", "retention: remove a snapshot's manifest (its row has left the catalog); "
       "an absent manifest is success", {"device_id": Id(), "dataset": Id(), "snapshot": Id()}),
    _t("PRUNED", "node", "broker", "the PRUNE's manifest is gone, durably", {"device_id": Id(), "dataset": Id(),
                                                                             "snapshot": Id()}),
    _t("RESTORE", "agent", "broker", "stream a committed snapshot back, under the agent's credit",
       {"req": Int(), "device_id": Id(required=False), "dataset": Id(), "snapshot": Id(), "window": Int(min=1, max=2**34)}),
    _t("READ", "broker", "node", "open a restore stream for a device's snapshot",
       {**TRANSFER, "device_id": Id(), "dataset": Id(), "snapshot": Id(), "window": Int(min=1, max=2**34)}),
    _t("IMAGE", "node", "agent broker", "restore header: what the image is (a drain copy's source: what it will send)",
       {**TRANSFER, "image_size": Int(max=MAX_IMAGE_SIZE), "chunk_size": Int(min=MIN_CHUNK_SIZE, max=MAX_CHUNK_SIZE),
        "chunk_count": Int(max=MAX_CHUNKS), "image_blake3": HASH}, via="broker"),
    _t("BLOCK", "node", "agent", "one chunk of a restore in order; no payload for a zero chunk",
       {**TRANSFER, "index": Int(max=MAX_CHUNKS), "hash": Bin(size=32, max_len=32, nullable=True),
        "raw_len": Int(max=MAX_CHUNK_SIZE), "codec": Str(choices=CODECS)},
       payload=(0, 1), via="broker"),
    _t("COPY", "broker", "node", "drain: send a committed snapshot to another node as an upload's sender "
       "(IMAGE, then QUERY, CHUNK under CREDIT and COMMIT with image_blake3, through the broker)",
       {**TRANSFER, "device_id": Id(), "dataset": Id(), "snapshot": Id(), "image_blake3": HASH}),
    _t("DRAIN", "operator", "broker", "an admin key: the node takes no new dataset and its datasets move to others "
       "(undrain: it takes new datasets again; those moved stay moved)",
       {"node_id": Id(), "undrain": Bool(required=False)}),
    _t("DRAIN_REPLY", "broker", "operator", "the node's drain as it stands now",
       {"drain": Doc()}),
    _t("VERIFY", "agent broker", "broker node", "re-read a committed snapshot and check it against the local image's "
       "blake3 (agent: req; broker to node: verify_id and device_id); one at a time per device",
       {"req": Int(required=False), "verify_id": Id(required=False), "device_id": Id(required=False),
        "dataset": Id(), "snapshot": Id(), "image_blake3": HASH}),
    _t("VERIFIED", "node broker", "broker agent", "a VERIFY's answer: every chunk re-hashed and the image blake3 "
       "matched (match), or why not",
       {"req": Int(required=False), "verify_id": Id(required=False), "dataset": Id(required=False),
        "snapshot": Id(required=False), "match": Bool(), "reason": Str(max_len=256)}),
    _t("VERIFY_REPORT", "node", "broker", "the node's background verification figures and damaged snapshots "
       "(bounded), on change, at most once a heartbeat interval",
       {"report": Doc()}, max_header=VERIFY_REPORT_HEADER),
    _t("ERROR", "agent broker node", "agent broker node operator", "a refusal with a stable code and a human reason",
       {"code": Str(max_len=32), "reason": Str(max_len=1024), "ref": Str(max_len=32, required=False),
        "transfer_id": Id(required=False), "req": Int(required=False), "hash": Bin(size=32, max_len=32, required=False)}),
    _t("STATUS", "operator", "broker agent", "ask for a status document (the broker's, or an agent's own); "
       "device_id narrows the broker's agents and transfers to one device",
       {"device_id": Id(required=False)}),
    _t("STATUS_REPLY", "broker agent", "operator", "broker: agents, storage, transfers, counters; agent: queues, "
       "transfers, bandwidth",
       {"status": Doc()}, max_header=DOC_HEADER),
    _t("LIST", "operator agent", "broker", "ask for one page of the catalog of committed snapshots (an agent: its "
       "own only), optionally of one device or dataset, after the key `after` (device_id, dataset, snapshot)",
       {"device_id": Id(required=False), "dataset": Id(required=False), "after": CATALOG_KEY}),
    _t("LIST_REPLY", "broker", "operator", "one page of committed snapshots in key order; `next`: the key to ask "
       "after for the next page (absent on the last)",
       {"snapshots": Doc(), "next": CATALOG_KEY}, max_header=DOC_HEADER),
]

MESSAGES: dict[str, MessageType] = {m.name: m for m in _DECLARED}
