"""The controller's agent side: registration, offers and restores (each
checked against the catalog off the loop), and the data-path messages an
agent may send for its own transfers, which go on to the node.

A mixin of `Controller` (core.py), split out to keep each file to one side
of the broker; it uses the controller's sending, credit and lifecycle helpers.
"""

from __future__ import annotations

import uuid

from loguru import logger

from bus.effects import Submit
from bus.errors import RequestError
from roles.controller.transfers import AGENT, CATALOG, Transfer, advance
from roles.geometry import ImageGeometry
from schemas import error_message, make


class AgentSide:
    # --- agents --------------------------------------------------------------------------------

    def on_hello(self, who, msg, frames) -> None:
        peer = who if isinstance(who, tuple) else who.peer
        # Under CURVE the device is the one its key names; a claim to be
        # another device is refused, never believed.
        if not self.config.insecure and msg["device_id"] != self.identify(frames):
            raise RequestError("device_id does not match the key this connection authenticated with", "forbidden")
        if not isinstance(who, tuple) and who.device_id != msg["device_id"]:
            raise RequestError("a connection speaks for one device only", "forbidden")
        session = self.registry.register_agent(peer[1], msg["device_id"], self.now)
        self.send(session, make("WELCOME", heartbeat_interval_ms=self.config.heartbeat_interval_ms,
                                idle_heartbeat_interval_ms=int(self.registry.idle_interval_s * 1000)))
        logger.info("agent {} connected", msg["device_id"])

    def agent_HEARTBEAT(self, session, msg, frames) -> None:
        pass

    def agent_ERROR(self, session, msg, frames) -> None:
        logger.warning("agent {} reports {}: {}", session.device_id, msg["code"], msg["reason"])

    def agent_PING(self, session, msg, frames) -> None:
        self.send(session, make("PONG", seq=msg["seq"], sent_us=msg["sent_us"]))

    def agent_BYE(self, session, msg, frames) -> None:
        self.drop_agent(session, "agent said BYE")

    def require_own(self, session, msg) -> None:
        claimed = msg.get("device_id")
        if claimed is not None and claimed != session.device_id:
            raise RequestError(f"device {session.device_id} may not act for another device", "forbidden")

    def agent_LIST(self, session, msg, frames) -> None:
        self.require_own(session, msg)
        self.list_page(session.peer, session.device_id, msg)

    def agent_OFFER(self, session, msg, frames) -> None:
        self.require_own(session, msg)
        self.require_catalog_writable(session, msg)  # before anything is made: its commit could not be recorded
        if ImageGeometry(msg["image_size"], msg["chunk_size"]).chunk_count != msg["chunk_count"]:
            raise RequestError("chunk_count does not match image_size and chunk_size", "bad_field")
        device, dataset, snapshot = session.device_id, msg["dataset"], msg["snapshot"]
        # The device offers it again (it restarted, or lost its connection
        # before we noticed): the older upload of it is obsolete, whichever
        # connection it came from, and must not hold chunks the new one needs.
        stale = self.uploads_by_key.get((device, dataset, snapshot))
        if stale is not None:
            self.finish(stale, "aborted", "offered again")
        self.budgets.admit_upload(device)
        window = max(self.config.transfer_window, 2 * msg["chunk_size"] + 65536)
        t = Transfer(f"t-{uuid.uuid4().hex[:16]}", "upload", device, dataset, snapshot, "", session.routing,
                     msg["req"], image_size=msg["image_size"], chunk_size=msg["chunk_size"],
                     chunk_count=msg["chunk_count"], window=window, started_at=self.now, last_progress=self.now,
                     taken_at=msg.get("taken_at"))
        t.ledger.window, t.ledger.device = window, device
        try:
            # refused, not failed: the catalog is still asked (a snapshot already committed is answered so)
            self.quotas.admit_offer(device)
            t.node_id = self.placement.choose(device, dataset, self.registry.nodes_by_id, t.image_size)
        except RequestError as exc:
            t.refusal = exc
            t.node_id = self.placement.node_for(device, dataset) or ""
        self.add_transfer(t, session)
        self.budgets.upload_started(device)
        if t.refusal is None:
            node = self.registry.nodes_by_id[t.node_id]
            node.reserved_bytes += t.image_size
            self.placement.hold(device, dataset, t.node_id)
        self.out.append(Submit("catalog", ("offer", t.transfer_id), self.store.check_offer,
                               (device, dataset, snapshot, None if t.refusal else t.node_id)))

    def offer_checked(self, tid: str, result, error) -> None:
        t = self.transfers.get(tid)
        if t is None or t.state != "checking":
            return  # aborted or offered again meanwhile
        if error is not None:
            self.catalog_failed(t, "OFFER", error)  # unavailable: parked with the reason
            return
        existing, placed_on = result
        if existing is None and t.refusal is None and placed_on not in (None, t.node_id):
            self.follow_placement(t, placed_on)
        if existing is not None:  # snapshots are immutable once named (DESIGN.md)
            self.history.unpark(t.key, self.now)
            self.space_waits.leave(t.key)
            self.finish(t, "aborted", "already committed", record=False)
            self.to_agent(t, make("ACCEPT", req=t.req, transfer_id="committed", node_id=existing["node_id"],
                                  committed=True))
            return
        node = self.registry.nodes_by_id.get(t.node_id) if t.refusal is None else None
        if node is None:
            exc = t.refusal or RequestError(f"node {t.node_id} holding this dataset is not available",
                                             "node_unavailable")
            self.finish(t, "aborted", "refused", record=False)
            self.park_offer(t, f"{exc.code}: {exc.reason}")
            self.wait_for_room(t, exc.code)
            self.count_error(exc.code)
            self.to_agent(t, error_message(exc, ref="OFFER", req=t.req))
            return
        advance(t, CATALOG, "checked")
        self.placement.placed(t.device_id, t.dataset, t.node_id)
        self.history.unpark(t.key, self.now)
        self.space_waits.leave(t.key)
        node.transfers.add(t.transfer_id)
        self.stalls.schedule(t.transfer_id, self.now + self.stall_s)
        self.send(node, make("OPEN", transfer_id=t.transfer_id, device_id=t.device_id, dataset=t.dataset,
                             snapshot=t.snapshot, image_size=t.image_size, chunk_size=t.chunk_size,
                             chunk_count=t.chunk_count))

    def follow_placement(self, t: Transfer, placed_on: str) -> None:
        """Another broker of the controller placed the dataset first (a shared catalog): the upload goes
        where the catalog says, or, that node not attached here, is refused node_unavailable below."""
        logger.info("{}/{} was placed on {} by another broker, not {}: following the catalog", t.device_id,
                    t.dataset, placed_on, t.node_id)
        chosen = self.registry.nodes_by_id.get(t.node_id)
        if chosen is not None:
            chosen.reserved_bytes = max(0, chosen.reserved_bytes - t.image_size)
        self.placement.release(t.device_id, t.dataset)
        t.node_id = placed_on
        node = self.registry.nodes_by_id.get(placed_on)
        if node is not None:
            node.reserved_bytes += t.image_size
        self.placement.hold(t.device_id, t.dataset, placed_on)  # finish releases it, whichever way this ends

    def park_offer(self, t: Transfer, reason: str) -> None:
        parked = Transfer(f"p-{uuid.uuid4().hex[:16]}", "upload", t.device_id, t.dataset, t.snapshot, t.node_id,
                          t.agent_routing, t.req, image_size=t.image_size, started_at=self.now)
        self.history.park(parked, reason, self.now)

    def wait_for_room(self, t: Transfer, code: str) -> None:
        """A parked upload waits for room (no_space) or no longer does (any other reason)."""
        if code == "no_space":
            self.space_waits.park(t.key, t.image_size, self.placement.node_for(t.device_id, t.dataset),
                                  t.agent_routing)
        else:
            self.space_waits.leave(t.key)

    def room_appeared(self, node, joined: bool = False) -> None:
        """`node` reported its space: if it has more room than before (or just joined), the offers
        parked no_space that now fit are told ROOM, and offered again (nospace.py)."""
        grew = self.space_waits.room_grew(node)
        if not (grew or joined) or not len(self.space_waits):
            return

        def reachable(routing, device):
            session = self.registry.agents.get(routing)
            return session is not None and session.device_id == device

        for routing, device, dataset, snapshot in self.space_waits.wake(self.registry.nodes_by_id, self.now,
                                                                          reachable):
            self.send(self.registry.agents[routing], make("ROOM", dataset=dataset, snapshot=snapshot))

    def agent_RESTORE(self, session, msg, frames) -> None:
        self.require_own(session, msg)
        tid = f"r-{uuid.uuid4().hex[:16]}"
        ledger = self.restores.admit(tid, session.device_id, msg["window"], self.now)  # over_budget: nothing made
        t = Transfer(tid, "restore", session.device_id, msg["dataset"], msg["snapshot"],
                     "", session.routing, msg["req"], window=ledger.window, started_at=self.now,
                     last_progress=self.now)
        self.add_transfer(t, session)
        self.out.append(Submit("catalog", ("restore", t.transfer_id), self.store.lookup, t.key))

    def restore_found(self, tid: str, entry, error) -> None:
        t = self.transfers.get(tid)
        if t is None or t.state != "checking":
            return
        if error is not None:
            self.catalog_failed(t, "RESTORE", error)
            return
        node = self.registry.nodes_by_id.get(entry["node_id"]) if entry else None
        if node is None:
            exc = (RequestError(f"{t.dataset}/{t.snapshot} is not in the catalog", "not_found") if entry is None else
                   RequestError(f"node {entry['node_id']} holding {t.dataset} is not available", "node_unavailable"))
            self.finish(t, "failed", exc.reason, record=False)
            self.count_error(exc.code)
            self.to_agent(t, error_message(exc, ref="RESTORE", req=t.req))
            return
        advance(t, CATALOG, "found")
        t.node_id, t.image_size, t.chunk_count = node.node_id, entry["size"], entry["chunk_count"]
        self.restores.found(t.transfer_id, entry)
        node.transfers.add(t.transfer_id)
        self.send(node, make("READ", transfer_id=t.transfer_id, device_id=t.device_id, dataset=t.dataset,
                             snapshot=t.snapshot, window=t.window))
        self.to_agent(t, make("ACCEPT", req=t.req, transfer_id=t.transfer_id, node_id=node.node_id, committed=False))

    def owned(self, session, msg) -> Transfer:
        """The sender's own transfer, moved by the table (a violation ends it in error)."""
        t = self.transfers.get(msg["transfer_id"])
        # Someone else's transfer and no transfer look the same: nothing leaks.
        if t is None or t.device_id != session.device_id or t.agent_routing != session.routing:
            raise RequestError(f"no transfer {msg['transfer_id']} of yours", "unknown_transfer")
        try:
            advance(t, AGENT, msg.t, session.device_id)
        except RequestError as exc:
            self.finish(t, "error", exc.reason)
            raise
        return t

    def node_of(self, t: Transfer):
        node = self.registry.nodes_by_id.get(t.node_id)
        if node is None:
            raise RequestError(f"node {t.node_id} is not available", "node_unavailable")
        return node

    def agent_QUERY(self, session, msg, frames) -> None:
        # Limited before the node sees it: every slice costs the node a lookup
        # per name and the image thread a hash of each zero chunk it names.
        self.budgets.admit_query(session.device_id, self.now)
        t = self.owned(session, msg)
        self.forward(self.node_of(t), frames, msg.t)

    def agent_CHUNK(self, session, msg, frames) -> None:
        t = self.owned(session, msg)
        self.received_bytes += self.pass_chunk(t, msg, frames)

    def agent_COMMIT(self, session, msg, frames) -> None:
        self.pass_commit(self.owned(session, msg), frames)

    def agent_CREDIT(self, session, msg, frames) -> None:
        if msg["transfer_id"] not in self.transfers and self.history.ended_restore(msg["transfer_id"],
                                                                                   session.device_id):
            return  # credit for blocks of a restore already complete: nothing left to grant it for
        t = self.owned(session, msg)
        node = self.node_of(t)
        # only bytes the agent received become the node's credit again (restores.py)
        self.restores.acknowledged(t.transfer_id, node.node_id, msg["bytes"], self.now)
        self.forward(node, frames, msg.t)

    def restores_idle(self) -> None:
        """Restores with no progress for restore_idle_timeout_ms: failed, agent and node told."""
        for tid in self.restores.idle_due(self.now):
            t = self.transfers.get(tid)
            if t is None:
                continue
            node = self.registry.nodes_by_id.get(t.node_id)
            if node is not None and t.state != "checking":
                self.send(node, make("ABORT", transfer_id=tid))
            exc = RequestError(f"restore made no progress for {self.restores.idle_timeout_s:g}s "
                               f"({self.restores.in_flight(tid)} bytes unacknowledged)", "stalled")
            self.interrupt(t, exc)

    def agent_ABORT(self, session, msg, frames) -> None:
        t = self.owned(session, msg)
        self.finish(t, "aborted", "agent aborted")

