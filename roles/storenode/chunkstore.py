"""Content-addressed chunk store: each distinct chunk once, verified, durable.

Layout: `<root>/chunks/<hh>/<hash hex>` where `hh` is the first two hex
digits. A chunk file is an 8-byte header (magic `SC`, format 1, codec,
raw length) and the chunk as it travelled (zstd or raw), so a restore sends
it back without recompressing. `put` verifies the bytes against their name
before anything touches the disk.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import blake3
import zstandard

from bus.errors import RequestError
from roles.storenode.durable import write_durable

MAGIC = b"SC"
FORMAT = 1
CODEC_IDS = {"raw": 0, "zstd": 1}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
HEADER = struct.Struct(">2sBBI")


def decode_payload(codec: str, data, raw_len: int) -> bytes:
    """Raw bytes of a chunk payload; RequestError(bad_chunk) if it does not decode to raw_len."""
    if codec == "raw":
        raw = bytes(data)
    else:
        try:
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_len)
        except zstandard.ZstdError as exc:
            raise RequestError(f"chunk does not decompress: {exc}", "bad_chunk") from None
    if len(raw) != raw_len:
        raise RequestError(f"chunk is {len(raw)} bytes, announced {raw_len}", "bad_chunk")
    return raw


class ChunkStore:
    def __init__(self, root: str | os.PathLike, write_hook=None):
        self.root = Path(root) / "chunks"
        self.root.mkdir(parents=True, exist_ok=True)
        self.write_hook = write_hook

    def path_for(self, name: bytes) -> Path:
        hexname = name.hex()
        return self.root / hexname[:2] / hexname

    def has(self, name: bytes) -> bool:
        return self.path_for(name).exists()

    def put(self, name: bytes, raw_len: int, codec: str, payload) -> bytes:
        """Verify and store durably (unless already stored); returns the raw bytes.

        Runs on a store thread. Raises RequestError(bad_chunk) when the bytes
        do not match the name: nothing is written then.
        """
        raw = decode_payload(codec, payload, raw_len)
        if blake3.blake3(raw).digest() != name:
            raise RequestError("chunk bytes do not match their blake3 name", "bad_chunk")
        path = self.path_for(name)
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            header = HEADER.pack(MAGIC, FORMAT, CODEC_IDS[codec], raw_len)
            write_durable(path, [header, payload], self.write_hook)
        return raw

    def read_stored(self, name: bytes) -> tuple[str, int, bytes]:
        """(codec, raw_len, payload) as stored; RequestError(not_found/storage_error)."""
        try:
            blob = self.path_for(name).read_bytes()
        except FileNotFoundError:
            raise RequestError(f"chunk {name.hex()[:16]} is not stored", "not_found") from None
        if len(blob) < HEADER.size:
            raise RequestError(f"chunk {name.hex()[:16]} is truncated", "storage_error")
        magic, fmt, codec_id, raw_len = HEADER.unpack_from(blob)
        if magic != MAGIC or fmt != FORMAT or codec_id not in CODEC_NAMES:
            raise RequestError(f"chunk {name.hex()[:16]} has a bad header", "storage_error")
        return CODEC_NAMES[codec_id], raw_len, blob[HEADER.size:]

    def read_raw(self, name: bytes) -> bytes:
        """The chunk's raw bytes, verified against its name."""
        codec, raw_len, payload = self.read_stored(name)
        try:
            raw = decode_payload(codec, payload, raw_len)
        except RequestError:
            raise RequestError(f"chunk {name.hex()[:16]} is damaged", "storage_error") from None
        if blake3.blake3(raw).digest() != name:
            raise RequestError(f"chunk {name.hex()[:16]} is damaged", "storage_error")
        return raw

    def space(self) -> tuple[int, int]:
        """(free_bytes, used_bytes) of the store's filesystem."""
        st = os.statvfs(self.root)
        free = st.f_bavail * st.f_frsize
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        return free, used
