"""The controller's storage-node side: registration, the upload and restore
replies it passes on to agents, and what happens when a node goes away.

A mixin of `Controller` (core.py), split out to keep each file to one side
of the broker; it uses the controller's sending, credit and lifecycle helpers.
"""

from __future__ import annotations

from loguru import logger

from bus.errors import RequestError
from roles.controller.transfers import NODE, Transfer, advance
from schemas import error_message, make


class NodeSide:
    def on_ready(self, who, msg, frames) -> None:
        routing = who[1] if isinstance(who, tuple) else who.routing
        if not self.config.insecure and msg["node_id"] != self.identify(frames):
            raise RequestError("node_id does not match the key this connection authenticated with", "forbidden")
        replaced = self.registry.nodes_by_id.get(msg["node_id"])
        if replaced is not None:
            self.registry.drop_node(replaced.routing)
            if replaced.transfers:
                self.node_lost(replaced, "node re-registered; its open transfers were lost")
        if not isinstance(who, tuple) and who.node_id != msg["node_id"]:
            self.registry.drop_node(who.routing)
            self.node_lost(who, "the connection registered as another node")
        pool = self.credit.add_node(msg["node_id"], msg["window"])
        node = self.registry.register_node(routing, msg["node_id"], pool, msg["free_bytes"], msg["used_bytes"],
                                           self.now)
        node.take_figures(msg)
        logger.info("storage node {} ready (window {} bytes, {} free)", node.node_id, msg["window"],
                    msg["free_bytes"])
        self.send_prunes(node.node_id)  # manifests of snapshots pruned while it was away (pruneside.py)
        self.drains_node_ready()
        self.room_appeared(node, joined=True)

    def node_HEARTBEAT(self, node, msg, frames) -> None:
        node.free_bytes = msg.get("free_bytes", node.free_bytes)
        node.used_bytes = msg.get("used_bytes", node.used_bytes)
        node.load = msg.get("load", node.load)
        node.take_figures(msg)
        self.room_appeared(node)

    def node_BYE(self, node, msg, frames) -> None:
        self.registry.drop_node(node.routing)
        self.node_lost(node, "node said BYE")

    def placed(self, node, msg) -> Transfer:
        """The node's transfer, moved by the table (a violation ends it in error on both sides)."""
        t = self.transfers.get(msg["transfer_id"])
        if t is None or t.node_id != node.node_id or t.transfer_id not in node.transfers:
            raise RequestError(f"no transfer {msg['transfer_id']} on this node", "unknown_transfer")
        event = msg.t
        if msg.t == "BLOCK" and msg["index"] >= t.chunk_count - 1:
            event = "BLOCK@last"
        elif msg.t == "IMAGE" and msg["chunk_count"] == 0:
            event = "IMAGE@empty"
        try:
            advance(t, NODE, event, node.node_id)
        except RequestError as exc:
            self.violation(t, exc)
            raise
        return t

    def violation(self, t: Transfer, exc: RequestError) -> None:
        """The node broke the protocol for `t`: the agent is told, the transfer
        ends in error (the caller raises, so the node is answered and the code counted once)."""
        self.to_agent(t, error_message(exc, ref="OFFER" if t.kind == "upload" else "RESTORE",
                                       transfer_id=t.transfer_id, req=t.req))
        self.finish(t, "error", exc.reason)

    def node_OPENED(self, node, msg, frames) -> None:
        t = self.placed(node, msg)
        t.last_progress = self.now
        if t.kind == "copy":  # the source starts sending (drain.py)
            self.to_agent(t, make("OPENED", transfer_id=t.transfer_id))
            return
        self.to_agent(t, make("ACCEPT", req=t.req, transfer_id=t.transfer_id, node_id=t.node_id, committed=False))

    def node_MISSING(self, node, msg, frames) -> None:
        t = self.placed(node, msg)
        geometry = t.geometry
        missing_raw = sum(geometry.chunk_len(i) for i in msg["missing"])
        if msg["start"] >= t.queried_to:
            # new ground: chunks found held are done, those missing are owed, and the upload moved (a slice
            # asked again is none of these)
            t.ledger.demand += missing_raw
            t.queried_to = msg["start"] + msg["count"]
            t.bytes_done += geometry.slice_len(msg["start"], msg["count"]) - missing_raw
            t.last_progress = self.now
        self.to_agent(t, frames=frames, name=msg.t)
        self.grant_credit(node, t)

    def node_STORED(self, node, msg, frames) -> None:
        t = self.placed(node, msg)
        t.last_progress = self.now
        wire_len, raw_len = t.ledger.done(msg["hash"])
        t.bytes_done += raw_len
        self.credit.release(node.node_id, wire_len, t.device_id)
        self.to_agent(t, frames=frames, name=msg.t)
        # the device is charged the chunk's bytes as the broker forwarded them (and the node keeps them);
        # a drain's copy is the cloud's move, not the device's upload
        if t.kind == "upload" and self.quotas.stored(t.device_id, wire_len):
            self.quota_reached(t)
        self.serve_waiting(node)  # those already waiting go first
        if not t.finished and not self.credit.is_waiting(node.node_id, t.transfer_id, t.device_id):
            self.grant_credit(node, t)

    def node_COMMITTED(self, node, msg, frames) -> None:
        t = self.transfers.get(msg["transfer_id"])
        if t is not None and t.node_id == node.node_id and (msg["device_id"], msg["dataset"], msg["snapshot"]) != t.key:
            exc = RequestError("COMMITTED does not match the transfer", "bad_state")
            self.violation(t, exc)
            raise exc
        t = self.placed(node, msg)
        t.last_progress = self.now
        if t.kind == "copy":
            self.copy_committed(t, msg)
            return
        self.committed_frames[t.transfer_id] = list(frames)
        # group commit: rows that arrive together share one transaction (one fsync); see flush_records
        self.rows_waiting[t.transfer_id] = (t.device_id, t.dataset, t.snapshot, node.node_id, msg["image_size"],
                                            msg["chunk_count"], msg["image_blake3"], t.taken_at)

    def node_IMAGE(self, node, msg, frames) -> None:
        copy = self.transfers.get(msg["transfer_id"])
        if copy is not None and copy.kind == "copy":
            self.copy_image(node, msg)  # a drain copy's source: what it will send (drain.py)
            return
        t = self.placed(node, msg)
        try:  # the catalog's size, chunk count and blake3, never the node's word (restores.py)
            extra = self.restores.image(t.transfer_id, msg["image_size"], msg["chunk_size"], msg["chunk_count"],
                                        msg["image_blake3"], self.now)
        except RequestError as exc:
            self.violation(t, exc)
            raise
        t.window = self.restores.window(t.transfer_id)
        t.chunk_size = msg["chunk_size"]
        self.to_agent(t, frames=frames, name=msg.t)
        if extra:
            self.send(node, make("CREDIT", transfer_id=t.transfer_id, bytes=extra))
        if msg["chunk_count"] == 0:
            self.finish(t, "restored")

    def node_BLOCK(self, node, msg, frames) -> None:
        t = self.placed(node, msg)
        payload_len = len(msg.payload[0]) if msg.payload else 0
        try:
            self.restores.block(t.transfer_id, node.node_id, payload_len, self.now)
        except RequestError as exc:
            self.violation(t, exc)
            raise
        t.bytes_done += msg["raw_len"]
        t.bytes_sent += payload_len
        self.to_agent(t, frames=frames, name=msg.t)
        if msg["index"] >= t.chunk_count - 1:
            self.finish(t, "restored")

    def node_ERROR(self, node, msg, frames) -> None:
        self.count_error(msg["code"])
        if self.node_ERROR_verify(node, msg):
            return
        tid = msg.get("transfer_id")
        t = self.transfers.get(tid) if tid else None
        if t is not None and t.kind == "copy" and node.node_id in (t.node_id, t.source_node):
            # its credit, chunks in flight included, returns to the node's pool as it ends (finish)
            self.copy_end(t, "failed", f"{node.node_id}: {msg['code']}: {msg['reason']}")
            return
        if t is None or t.node_id != node.node_id:
            logger.warning("node {} reports {}: {}", node.node_id, msg["code"], msg["reason"])
            return
        self.to_agent(t, frames=frames, name=msg.t)
        if msg.get("ref") == "CHUNK" and msg.get("hash") is not None:
            wire_len, _ = t.ledger.done(msg["hash"])
            self.credit.release(node.node_id, wire_len, t.device_id)
            self.serve_waiting(node)
        if t.kind == "restore":
            # a read error (EIO, a missing or damaged chunk file) fails this restore only
            self.finish(t, "failed", f"{msg['code']}: {msg['reason']}")
        elif msg["code"] in ("storage_error", "no_space"):
            # The node's disk failed or filled: nothing was acknowledged that
            # is not on disk; park until the agent offers it again (a full
            # disk: when room appears, nospace.py).
            self.finish(t, "parked", f"{msg['code']}: {msg['reason']}")
            self.wait_for_room(t, msg["code"])
        elif msg.get("ref") != "CHUNK":
            self.finish(t, "failed", f"{msg['code']}: {msg['reason']}")

    def node_lost(self, node, reason: str) -> None:
        """Park every transfer on a node that went away; the agents offer them
        again and they resume (only missing chunks travel) once it is back."""
        for tid in list(node.transfers):
            t = self.transfers.get(tid)
            if t is not None:
                self.interrupt(t, RequestError(f"node {node.node_id}: {reason}", "node_unavailable"))
        node.transfers.clear()
        self.copies_of_node_lost(node.node_id, reason)
        self.verifies_lost(node.node_id, reason)
        logger.warning("storage node {} lost: {}", node.node_id, reason)
