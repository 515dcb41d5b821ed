"""Scrub: re-verify every stored chunk against its name and every manifest
against its chunks; move damaged chunks to quarantine.

A quarantined chunk is absent to the store, so the next upload of the same
data (by any device that still has it) stores it afresh: that heals every
manifest that names it. The report names each damaged chunk with the
device, dataset and snapshot that reference it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


from bus.errors import RequestError
from roles.chunkdata import decode_and_verify, parse_chunk_file
from roles.durable import fsync_dir, make_dirs
from roles.storenode.chunkstore import ChunkStore
from roles.storenode.manifests import Manifest, ManifestStore


@dataclass
class ScrubReport:
    chunks_checked: int = 0
    manifests_checked: int = 0
    damaged_chunks: list = field(default_factory=list)  # {"chunk", "reason", "quarantined_to"}
    damaged_manifests: list = field(default_factory=list)  # {"path", "reason"}
    affected_snapshots: list = field(default_factory=list)  # {"device_id","dataset","snapshot","chunks":[hex]}

    @property
    def problems(self) -> int:
        return len(self.damaged_chunks) + len(self.damaged_manifests) + len(self.affected_snapshots)

    def as_dict(self) -> dict:
        return {"chunks_checked": self.chunks_checked, "manifests_checked": self.manifests_checked,
                "damaged_chunks": self.damaged_chunks, "damaged_manifests": self.damaged_manifests,
                "affected_snapshots": self.affected_snapshots, "problems": self.problems}


def _check_chunk(path: Path) -> str | None:
    """None if the chunk file is whole and matches its name, else the reason."""
    try:
        name = bytes.fromhex(path.name)
    except ValueError:
        return "file name is not a chunk name"
    try:
        codec, raw_len, payload = parse_chunk_file(path.read_bytes())
        decode_and_verify(codec, payload, raw_len, name)
    except ValueError as exc:
        return str(exc)
    except RequestError as exc:
        return exc.reason
    return None


def scrub(data_dir: str | os.PathLike) -> ScrubReport:
    store = ChunkStore(data_dir)
    manifests = ManifestStore(data_dir)
    quarantine = Path(data_dir) / "quarantine"
    report = ScrubReport()
    for sub in sorted(store.root.iterdir()):
        if not sub.is_dir():
            continue
        for path in sorted(sub.iterdir()):
            if path.name.startswith("."):
                continue
            report.chunks_checked += 1
            reason = _check_chunk(path)
            if reason is not None:
                make_dirs(quarantine)
                target = quarantine / path.name
                os.replace(path, target)
                fsync_dir(quarantine)
                fsync_dir(sub)
                report.damaged_chunks.append({"chunk": path.name, "reason": reason,
                                              "quarantined_to": str(target)})
    for path in sorted(manifests.root.glob("*/*/*.manifest")):
        report.manifests_checked += 1
        try:
            manifest = Manifest.from_bytes(path.read_bytes())
        except Exception as exc:  # any undecodable manifest is reported, never fatal to the scrub
            report.damaged_manifests.append({"path": str(path), "reason": f"undecodable: {exc.__class__.__name__}"})
            continue
        absent = [name.hex() for name in manifest.chunks if name is not None and not store.has(name)]
        if absent:
            report.affected_snapshots.append({"device_id": manifest.device_id, "dataset": manifest.dataset,
                                              "snapshot": manifest.snapshot, "chunks": sorted(set(absent))})
    return report
