"""Storage worker process: one DEALER to each broker, one poll loop, a store pool.

It verifies and stores chunks (durable before STORED), answers manifest
slices with what the device lacks, commits verified manifests, and streams
restores under the agent's credit. This file is the driver: sockets, clock,
threads and wiring. Every decision is StorageCore's (roles/storenode/core.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
from loguru import logger

from bus.clock import MonotonicClock
from bus.errors import RemoteProtocolError
from bus.link import DealerLink
from bus.loop import Loop
from bus.pipeline import TaskPool
from roles.config import StorageConfig
from roles.durable import PLAIN, remove_temp_files
from roles import metrics
from roles.process import StopFlag, client_security
from roles.storenode.background import Verifier
from roles.storenode.chunkstore import ChunkStore
from roles.storenode.core import StorageCore
from roles.storenode.faults import DiskFaults
from roles.storenode.manifests import ManifestStore
from roles.storenode.ownership import DeviceChunks
from roles.storenode.verifyrun import load_state
from schemas import decode, encode
from schemas.limits import max_frame_for


class StorageProcess:
    def __init__(self, config: StorageConfig):
        self.config = config
        removed = remove_temp_files(config.data_dir) if os.path.isdir(config.data_dir) else 0
        if removed:
            logger.info("removed {} temporary files left by an interrupted write", removed)
        self.faults = faults = DiskFaults(
            write_rate=config.fault_write_rate, fail_at_write=config.fault_fail_at_write,
            capacity=config.fault_disk_capacity, log_capacity=config.fault_log_capacity,
            manifest_errors=config.fault_manifest_errors,
            fail_at_read=config.fault_fail_at_read, sync_log=config.fault_sync_log,
            gc_slice_ms=config.fault_gc_slice_ms)
        io = faults if faults.active else PLAIN
        chunks = ChunkStore(config.data_dir, io=io)
        chunks.reap(everything=True)
        manifests = ManifestStore(config.data_dir, io=io,
                                  write_hook=faults.before_manifest_write if faults.manifest_errors else None)
        owners = DeviceChunks(config.data_dir, committed_chunks=lambda device: (
            name for manifest in manifests.all_for_device(device) for name in manifest.chunks),
            log_handles=config.owner_log_handles,
            write_hook=faults.before_log_write if faults.log_capacity is not None else None, io=io)
        self.clock = MonotonicClock()
        interval_s = config.heartbeat_interval_ms / 1000
        verifier = Verifier(chunks, manifests, config.data_dir, read_limit=config.verify_read_limit,
                            interval_s=config.verify_interval_ms / 1000, now=self.clock.now(),
                            saved=load_state(Path(config.data_dir)))
        # before the loop runs: the first READY carries real figures, later ones the pool's
        self.core = StorageCore(config.node_id, config.window, chunks, manifests, owners, brokers=len(config.broker),
                                heartbeat_interval_s=interval_s, space=chunks.space(), now=self.clock.now(),
                                chunks_on_disk=chunks.count(),
                                read_hook=faults.before_read if config.fault_fail_at_read else None,
                                gc_interval_s=config.gc_interval_ms / 1000,
                                gc_slice_hook=faults.before_gc_slice if config.fault_gc_slice_ms else None,
                                verifier=verifier)
        self.pools = {"store": TaskPool(config.store_threads, name="store"),
                      "image": TaskPool(1, name="image")}  # whole-image hashes, strictly in order
        self.ctx = zmq.Context()
        # one link per broker (roles/storenode/brokers.py), each on its own loop side
        self.links = {side: DealerLink(self.ctx, lambda endpoint=endpoint: endpoint, encode,
                                       self.core.register_message, self.core.heartbeat_message, interval_s,
                                       config.heartbeat_liveness, max_frame=max_frame_for("node"),
                                       secure=client_security(config))
                      for side, endpoint in zip(self.core.routes.sides, config.broker)}
        self.loop = Loop(self.clock, encode)
        self.metrics = metrics.start(metrics.StorageMetrics, config.metrics_listen, self.core)

    def on_frames(self, peer, frames, now: float) -> list:
        try:
            msg = decode(frames, receiver="node")
        except RemoteProtocolError as exc:
            return self.core.malformed(peer, exc, now)
        return self.core.received(peer, msg, frames, now)

    def on_link(self, side: str, event: str, now: float) -> list:
        return self.core.on_link(event, now)

    def run(self, stop: StopFlag) -> None:
        for name, pool in self.pools.items():
            self.loop.add_pool(name, pool, self.core.completed)
        for side, link in self.links.items():
            link.connect(self.clock.now())
            self.loop.add_link(side, link, self.on_frames, self.on_link)
        try:
            self.loop.run(stop, self.core, self.metrics.tick)
        finally:
            self.metrics.close()
            self.core.close()
            self.faults.close()
            for pool in self.pools.values():
                pool.close()
            for link in self.links.values():
                link.close(say_bye=False)
            self.loop.close()
            self.ctx.term()


def run_storage(config: StorageConfig) -> int:
    stop = StopFlag().install()
    StorageProcess(config).run(stop)
    return 0
