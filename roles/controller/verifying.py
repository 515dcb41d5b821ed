"""The controller's side of verification: a device's VERIFY goes to the node
holding the snapshot, the node's VERIFIED comes back to the device, and each
node's VERIFY_REPORT (background verification figures, damaged snapshots)
is kept for status.

A mixin of `Controller` (core.py). Budget: one verify in progress per
device, whichever connection asks (over_budget), so a device cannot make a
node read without end; the node reads under its `verify_read_limit` and
queues at most a bounded number (background.py). The snapshot is looked up
in the catalog (on its pool, as a restore is); the node re-reads it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from loguru import logger

from bus.effects import Submit
from bus.errors import RequestError
from schemas import error_message, make

REPORT_FIELDS = {"verified_snapshots": 0, "verify_bytes_read": 0, "verify_passes": 0, "damaged_chunks": 0,
                 "damaged_snapshots": 0, "verify_behind": False}
DAMAGED_KEPT = 32  # damaged snapshots per node kept from a report (the node sends no more)


@dataclass
class PendingVerify:
    verify_id: str
    device_id: str
    dataset: str
    snapshot: str
    image_blake3: bytes
    agent_routing: bytes
    req: int
    node_id: str = ""


def _clean_report(report) -> dict:
    """A node's report, reduced to the fields status shows, each of its type (a node's word, bounded)."""
    if not isinstance(report, dict):
        return dict(REPORT_FIELDS)
    out = {}
    for name, default in REPORT_FIELDS.items():
        value = report.get(name, default)
        out[name] = value if type(value) is type(default) else default
    damaged = []
    for entry in report.get("damaged", ())[:DAMAGED_KEPT] if isinstance(report.get("damaged"), list) else ():
        if isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("device_id", "dataset",
                                                                                   "snapshot")):
            chunks = entry.get("chunks") if isinstance(entry.get("chunks"), list) else []
            damaged.append({"device_id": entry["device_id"], "dataset": entry["dataset"],
                            "snapshot": entry["snapshot"], "chunks": [c for c in chunks if isinstance(c, str)][:8],
                            "chunk_count": entry.get("chunk_count") if isinstance(entry.get("chunk_count"), int)
                            else len(chunks),
                            "reason": entry.get("reason") if isinstance(entry.get("reason"), str) else ""})
    out["damaged"] = damaged
    return out


class VerifySide:
    def init_verifying(self) -> None:
        self.verifies: dict[str, PendingVerify] = {}  # verify id -> request
        self.verify_by_device: dict[str, str] = {}  # device -> its verify id
        self.node_reports: dict[str, dict] = {}  # node id -> its last VERIFY_REPORT, cleaned

    def agent_VERIFY(self, session, msg, frames) -> None:
        self.require_own(session, msg)
        if msg.get("req") is None:
            raise RequestError("VERIFY needs req", "bad_field")
        device = session.device_id
        if device in self.verify_by_device:
            raise RequestError(f"device {device} has a verify in progress", "over_budget")
        vid = f"v-{uuid.uuid4().hex[:16]}"
        self.verifies[vid] = PendingVerify(vid, device, msg["dataset"], msg["snapshot"], msg["image_blake3"],
                                           session.routing, msg["req"])
        self.verify_by_device[device] = vid
        self.out.append(Submit("catalog", ("verify", vid), self.store.lookup, (device, msg["dataset"],
                                                                                 msg["snapshot"])))

    def verify_found(self, vid: str, entry, error) -> None:
        v = self.verifies.get(vid)
        if v is None:
            return
        node = self.registry.nodes_by_id.get(entry["node_id"]) if entry else None
        if error is not None:
            self.verify_failed(v, RequestError("the catalog cannot answer now; ask again later",
                                               "catalog_unavailable"))
        elif entry is None:
            self.verify_failed(v, RequestError(f"{v.dataset}/{v.snapshot} is not in the catalog", "not_found"))
        elif node is None:
            self.verify_failed(v, RequestError(f"node {entry['node_id']} holding {v.dataset} is not available",
                                               "node_unavailable"))
        else:
            v.node_id = node.node_id
            self.send(node, make("VERIFY", verify_id=vid, device_id=v.device_id, dataset=v.dataset,
                                 snapshot=v.snapshot, image_blake3=v.image_blake3))

    def verify_failed(self, v: PendingVerify, exc: RequestError) -> None:
        self._verify_done(v)
        self.count_error(exc.code)
        self.send(self._verify_agent(v), error_message(exc, ref="VERIFY", req=v.req))

    def _verify_done(self, v: PendingVerify) -> None:
        self.verifies.pop(v.verify_id, None)
        if self.verify_by_device.get(v.device_id) == v.verify_id:
            del self.verify_by_device[v.device_id]

    def _verify_agent(self, v: PendingVerify):
        session = self.registry.agents.get(v.agent_routing)
        return session if session is not None else ("agent", v.agent_routing)

    def node_VERIFIED(self, node, msg, frames) -> None:
        v = self.verifies.get(msg.get("verify_id") or "")
        if v is None or v.node_id != node.node_id:
            return  # its device went away meanwhile, or the node is confused: nobody is waiting
        self._verify_done(v)
        logger.info("verify of {}/{}/{} on {}: {} ({})", v.device_id, v.dataset, v.snapshot, node.node_id,
                    "match" if msg["match"] else "MISMATCH", msg["reason"])
        if v.agent_routing in self.registry.agents:
            self.send(self.registry.agents[v.agent_routing],
                      make("VERIFIED", req=v.req, dataset=v.dataset, snapshot=v.snapshot, match=msg["match"],
                           reason=msg["reason"]))

    def node_VERIFY_REPORT(self, node, msg, frames) -> None:
        self.node_reports[node.node_id] = _clean_report(msg["report"])

    def node_ERROR_verify(self, node, msg) -> bool:
        """A node's ERROR about a VERIFY (over_budget, bad_field): to the device. True if it was one."""
        if msg.get("ref") != "VERIFY":
            return False
        for v in list(self.verifies.values()):
            if v.node_id == node.node_id and v.verify_id == msg.get("transfer_id"):
                self.verify_failed(v, RequestError(msg["reason"], msg["code"]))
        return True

    def verifies_lost(self, node_id: str, reason: str) -> None:
        """The node went away: its verifies end node_unavailable (the device asks again later)."""
        for v in [v for v in self.verifies.values() if v.node_id == node_id]:
            self.verify_failed(v, RequestError(f"node {node_id}: {reason}", "node_unavailable"))

    def verifies_of_agent_gone(self, routing: bytes) -> None:
        for v in [v for v in self.verifies.values() if v.agent_routing == routing]:
            self._verify_done(v)  # a late VERIFIED finds nothing

    def storage_report(self, node_id: str) -> dict:
        return self.node_reports.get(node_id) or {**REPORT_FIELDS, "damaged": []}
