"""Garbage collection on a storage node (DESIGN.md "Lifecycle — contract"), driven from the loop.

Theory of operation. The manifests on disk are the only references: however
a manifest went (the broker's retention, an operator), its chunks are
collected once nothing else names them. Every `gc_interval_ms` a run goes
through three phases, one slice at a time on the store pool (gcwork.py), so
it holds one store thread at most and chunk writes queued meanwhile run
between its slices:

1. mark, device by device, `MARK_SLICE` manifests a slice: the names they
   reference join the run's referenced set and the device's own set;
2. at the end of each device's mark, its ownership is compacted (on the loop,
   then one durable log write on the pool): the device owns what its
   manifests reference and what its open uploads hold and already owned
   (gcpins.py), and nothing else, so negotiation stops counting a chunk as
   soon as its last manifest of that device is gone, whether or not another
   device still references it (no device can learn that);
3. sweep, one `chunks/<hh>/` directory a slice (at most `SWEEP_SLICE`
   deletions, then the same directory again): a chunk file neither
   referenced nor pinned is deleted.

Uploads in flight: Pins. A run is an epoch (Pins.begin_run): what an upload
pins is protected while it is open and, once released, until the run ends,
so a chunk stored or reported present after the mark read its device is not
swept. kill -9 at any point: deletes only unreferenced, unpinned files, and
a log is replaced whole or not at all; the next run (after a restart every
upload is gone, and so are its pins) converges. A manifest that cannot be
read stops the run before its sweep: what it references is unknown.

Memory: the referenced set holds each live chunk's name once (a 32-byte
bytes object and a set slot), plus the one device's set being marked (which
becomes that device's ownership set, as it is in memory anyway): bench/gc.py
measures 155 bytes per live chunk at the peak, 7.8 MB per 100,000. Loop work
per run: O(devices), plus, per device with open uploads, O(names they hold).
Pinning costs O(slice) per QUERY; an upload's end un-pins in batches (gcpins.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from loguru import logger

from bus.effects import Submit
from roles.storenode import gcwork
from roles.storenode.chunkstore import SUBDIRS


@dataclass(frozen=True)
class GcStatistics:
    runs: int
    freed_bytes: int
    deleted_chunks: int
    running: bool
    failed_runs: int


class GarbageCollector:
    def __init__(self, chunks, manifests, owners, pins, slice_hook=None):
        self.chunks, self.manifests, self.owners, self.pins = chunks, manifests, owners, pins
        self._slice_hook = slice_hook  # run on the store thread before each slice (faults.py: a slow GC)
        self.running = False
        self.runs = self.freed_bytes = self.deleted_chunks = self.failed_runs = 0
        self._run_freed = self._run_deleted = 0
        self._devices: list = []
        self._device = None
        self._paths: list = []
        self._device_names: set = set()
        self._referenced: set = set()
        self._unloaded = None  # the references of a device compacted while not in memory, until its log is written

    # --- what the core calls -------------------------------------------------------

    def start(self) -> list:
        """A run, unless one is still going (a slow store: the next interval tries again)."""
        if self.running:
            return []
        self.running = True
        self._run_freed = self._run_deleted = 0
        self._referenced = set()
        self.pins.begin_run()
        return [self._submit(("gc", "devices"), gcwork.list_devices, self.manifests.root, self.owners.root)]

    def completed(self, key, result, error) -> list:
        if not self.running:
            return []
        if error is not None:
            self._fail(key, error)
            return []
        step = key[1]
        if step == "devices":  # with those in memory: a device whose every manifest and log went
            self._devices = sorted(set(result) | set(self.owners.devices_loaded()), reverse=True)
            return self._next_device()
        if step == "paths":
            self._paths = result
            return self._mark_next()
        if step == "mark":
            return self._mark_next()
        if step == "log":
            self.owners.end_rewrite(key[2])
            if self._unloaded is not None and self.owners.loaded(key[2]) is not None:
                self._narrow(key[2], self._unloaded)  # it came in meanwhile, from the log being replaced
            self._unloaded = None
            return self._next_device()
        if step == "sweep":
            deleted, freed, done = result
            self._run_deleted += deleted
            self._run_freed += freed
            self.deleted_chunks += deleted
            self.freed_bytes += freed
            return self._sweep(key[2] + 1 if done else key[2])
        return []

    def statistics(self) -> GcStatistics:
        return GcStatistics(self.runs, self.freed_bytes, self.deleted_chunks, self.running, self.failed_runs)

    # --- the phases ----------------------------------------------------------------

    def _submit(self, key: tuple, fn, *args) -> Submit:
        if self._slice_hook is not None:
            return Submit("store", key, gcwork.after_hook, (self._slice_hook, fn, *args))
        return Submit("store", key, fn, args)

    def _next_device(self) -> list:
        if not self._devices:
            self._device = None
            return self._sweep(0)
        self._device = self._devices.pop()
        self._device_names = set()
        return [self._submit(("gc", "paths", self._device), gcwork.list_manifests, self.manifests.root,
                             self._device)]

    def _mark_next(self) -> list:
        if self._paths:
            batch, self._paths = self._paths[:gcwork.MARK_SLICE], self._paths[gcwork.MARK_SLICE:]
            return [self._submit(("gc", "mark", self._device), gcwork.mark, batch, self._referenced,
                                 self._device_names)]
        return self._compact(self._device)

    def _compact(self, device: str) -> list:
        """The device's mark is done: it owns what its manifests reference, plus what its open
        uploads hold (or released this run) that it owned already."""
        references, self._device_names = self._device_names, set()
        kept = set()
        if self.owners.loaded(device) is not None:
            kept = self._narrow(device, references)
        else:
            self._unloaded = references
        self.owners.begin_rewrite(device)
        return [self._submit(("gc", "log", device), self.owners.write_log, device, sorted(kept))]

    def _narrow(self, device: str, references: set) -> set:
        """The device's set becomes `references` plus what its uploads hold that it owned; returns
        that addition (what its log must keep)."""
        kept = set().union(*self.pins.held_by(device))
        kept &= self.owners.loaded(device)
        kept -= references
        references |= kept
        self.owners.replace(device, references)
        return kept

    def _sweep(self, index: int) -> list:
        if index < len(SUBDIRS):
            return [self._submit(("gc", "sweep", index), gcwork.sweep, self.chunks.root / SUBDIRS[index],
                                 self._referenced, self.pins)]
        self._finish()
        return []

    def _finish(self) -> None:
        self.running = False
        self.runs += 1
        self._referenced = set()
        self.pins.end_run()
        logger.info("gc run {}: {} chunks deleted, {} bytes freed", self.runs, self._run_deleted, self._run_freed)

    def _fail(self, key, error) -> None:
        if key[1] == "log":
            self.owners.end_rewrite(key[2])  # the old log stays; what came meanwhile follows it
        logger.error("gc run stopped at {}: {}", "/".join(map(str, key[1:])), error)
        self.running = False
        self.failed_runs += 1
        self._referenced, self._device_names, self._devices, self._paths = set(), set(), [], []
        self._unloaded = None
        self.pins.end_run()
