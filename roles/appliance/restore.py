"""Rebuild an image from the cloud, verified chunk by chunk and as a whole.

`ImageWriter` is the plain logic: it takes IMAGE and BLOCK messages in
order, checks each chunk's blake3 against its name, writes it at its offset
in a temporary file, feeds the whole-image hasher, and returns credit to
grant back. `finish()` checks the whole-image blake3, fsyncs and renames to
the final name; any failure removes the temporary file, so a wrong byte
never leaves a FILE behind.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import blake3
import zmq

from bus.errors import CODES, RequestError
from roles.appliance.endpoints import choose_endpoint
from roles.appliance.link import BrokerLink
from roles.config import AgentConfig
from roles.process import MAX_POLL_MS, client_security, now
from roles.chunkdata import decode_and_verify, feed_zeros
from roles.geometry import ImageGeometry
from roles.durable import fsync_dir
from schemas import make

RESTORE_WINDOW = 32 * 1024 * 1024


class ImageWriter:
    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.tmp = self.out.with_name(f".{self.out.name}.restoring")
        self.fd: int | None = None
        self.hasher = blake3.blake3()
        self.expected_blake3: bytes | None = None
        self.chunk_count = 0
        self.chunk_size = 0
        self.image_size = 0
        self.next_index = 0

    def on_image(self, image_size: int, chunk_size: int, chunk_count: int, image_blake3: bytes) -> None:
        self.image_size, self.chunk_size, self.chunk_count = image_size, chunk_size, chunk_count
        self.expected_blake3 = image_blake3
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, image_size)

    def on_block(self, index: int, name: bytes | None, raw_len: int, codec: str, payload) -> int:
        """Write one chunk; returns the credit (payload bytes) to grant back."""
        if self.fd is None:
            raise RequestError("BLOCK before IMAGE", "bad_state")
        if index != self.next_index:
            raise RequestError(f"chunk {index} arrived, expected {self.next_index}", "bad_state")
        expected_len = ImageGeometry(self.image_size, self.chunk_size).chunk_len(index)
        if raw_len != expected_len:
            raise RequestError(f"chunk {index} is {raw_len} bytes, expected {expected_len}", "bad_chunk")
        if name is None:
            feed_zeros(self.hasher, raw_len)  # the file is already zero there (ftruncate)
        else:
            if payload is None:
                raise RequestError(f"chunk {index} has no data", "bad_chunk")
            try:
                raw = decode_and_verify(codec, payload, raw_len, name)
            except RequestError as exc:
                raise RequestError(f"chunk {index}: {exc.reason}: the cloud copy is damaged", "bad_chunk") from None
            os.pwrite(self.fd, raw, index * self.chunk_size)
            self.hasher.update(raw)
        self.next_index += 1
        return len(payload) if payload is not None else 0

    @property
    def complete(self) -> bool:
        return self.fd is not None and self.next_index >= self.chunk_count

    def finish(self) -> None:
        if self.hasher.digest() != self.expected_blake3:
            raise RequestError("the restored image does not match its blake3", "bad_chunk")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.rename(self.tmp, self.out)
        fsync_dir(self.out.parent)

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.fd is not None:
            self.discard()

    def discard(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.tmp.unlink(missing_ok=True)


def restore(config: AgentConfig, dataset: str, snapshot: str, out: str, timeout_s: float | None = None) -> dict:
    """Run a restore to completion; raises RequestError with a clear reason on failure."""
    ctx = zmq.Context()
    secure = client_security(config)
    endpoint = config.brokers[0]
    if len(config.brokers) > 1:
        endpoint = choose_endpoint(ctx, config, secure) or endpoint
    link = BrokerLink(ctx, endpoint, config.device_id, config.heartbeat_interval_ms / 1000,
                      config.heartbeat_liveness, now(), secure=secure)
    started = time.monotonic()
    if timeout_s is None:
        timeout_s = config.connect_timeout_ms / 1000
    try:
        with ImageWriter(out) as writer:
            return _restore_loop(link, writer, dataset, snapshot, out, timeout_s, started)
    finally:
        link.close()
        ctx.term()


def _restore_loop(link, writer, dataset, snapshot, out, timeout_s, started) -> dict:
    transfer_id = None
    last_progress = now()
    poller = zmq.Poller()
    poller.register(link.sock, zmq.POLLIN)
    requested = False
    while True:
        t = now()
        if t - last_progress > timeout_s:
            if not link.welcomed:
                raise RequestError(f"no broker answered at {link.endpoint} for {timeout_s:.0f}s", "node_unavailable")
            raise RequestError(f"the restore made no progress for {timeout_s:.0f}s", "internal")
        if not link.tick(t):
            raise RequestError(f"broker {link.endpoint} does not answer", "node_unavailable")
        if link.welcomed and not requested:
            link.send(make("RESTORE", req=1, dataset=dataset, snapshot=snapshot, window=RESTORE_WINDOW), t)
            requested = True
        if not poller.poll(MAX_POLL_MS):
            continue
        for msg in link.receive(now()):
            last_progress = now()
            if msg.t == "ERROR":
                raise RequestError(msg["reason"], msg["code"] if msg["code"] in CODES else "internal")
            if msg.t == "ACCEPT":
                transfer_id = msg["transfer_id"]
            elif msg.t == "IMAGE" and msg["transfer_id"] == transfer_id:
                writer.on_image(msg["image_size"], msg["chunk_size"], msg["chunk_count"], msg["image_blake3"])
            elif msg.t == "BLOCK" and msg["transfer_id"] == transfer_id:
                credit = writer.on_block(msg["index"], msg["hash"], msg["raw_len"], msg["codec"],
                                         msg.payload[0] if msg.payload else None)
                if credit and not writer.complete:
                    link.send(make("CREDIT", transfer_id=transfer_id, bytes=credit), now())
            if writer.complete:
                writer.finish()
                return {"dataset": dataset, "snapshot": snapshot, "out": str(out), "bytes": writer.image_size,
                        "blake3": writer.expected_blake3.hex(), "seconds": round(time.monotonic() - started, 3)}

