"""Cloud controller process: ROUTER to agents, ROUTER to storage nodes, status.

One poll loop. Every message is decoded by `schemas.decode` first; a bad one
is answered with ERROR (or dropped and counted if no reply path exists) and
changes nothing. Data messages are forwarded as the frames that arrived,
never re-encoded. The logic it drives lives in `roles/controller/`.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter, deque

import zmq
from loguru import logger

from bus import security
from bus.errors import RemoteProtocolError, RequestError
from bus.sockets import Outbox, make_router, recv_frames
from roles.config import BrokerConfig
from roles.controller.catalog import Catalog
from roles.controller.placement import choose_node
from roles.controller.registry import Registry
from roles.controller.transfers import Transfer
from roles.process import MAX_POLL_MS, StopFlag, now, tune_malloc
from schemas import decode, encode, error_message, make
from schemas.messages import MAX_CHUNK_SIZE

AGENT_SIDE = "agent"
NODE_SIDE = "node"


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


class Broker:
    def __init__(self, config: BrokerConfig):
        self.config = config
        self.catalog = Catalog(config.data_dir)
        self.registry = Registry(config.heartbeat_interval_ms / 1000, config.heartbeat_liveness)
        self.transfers: dict[str, Transfer] = {}
        self.uploads_by_key: dict[tuple, Transfer] = {}  # (device, dataset, snapshot) -> upload in progress
        self.finished: deque = deque(maxlen=config.finished_transfers_kept)
        self.finished_by_id: dict[str, Transfer] = {}
        # (device, dataset, snapshot) -> transfer waiting for its storage node
        self.parked: dict[tuple, Transfer] = {}
        self.pending_placement: dict[tuple, str] = {}  # (device, dataset) -> node of uploads in progress
        self.errors_by_code: Counter = Counter()
        self.dropped_invalid = 0
        self.ctx = zmq.Context()
        self.auth = None
        secure = {"devices": None, "nodes": None, "operators": None}
        if config.insecure:
            logger.warning("insecure: true: plain TCP, peers are not authenticated and ids are taken on trust")
        else:
            ours = security.load_keypair(config.key_file)
            self.auth = security.Authenticator(self.ctx, {"devices": config.authorized_keys,
                                                          "nodes": config.node_keys,
                                                          "operators": config.operator_keys})
            secure = {domain: (lambda sock, d=domain: security.make_server(sock, ours, d)) for domain in secure}
        self.frontend = make_router(self.ctx, config.frontend_bind, secure=secure["devices"])
        self.backend = make_router(self.ctx, config.backend_bind, secure=secure["nodes"])
        self.status_sock = make_router(self.ctx, config.status_bind, secure=secure["operators"])
        self.front_out = Outbox(self.frontend, encode)
        self.back_out = Outbox(self.backend, encode)
        self.status_out = Outbox(self.status_sock, encode)

    # --- loop -------------------------------------------------------------

    def run(self, stop: StopFlag) -> None:
        poller = zmq.Poller()
        for sock in (self.frontend, self.backend, self.status_sock):
            poller.register(sock, zmq.POLLIN)
        logger.info("broker up: agents {}, nodes {}, status {}", self.config.frontend_bind,
                    self.config.backend_bind, self.config.status_bind)
        try:
            while not stop.stopping:
                events = dict(poller.poll(MAX_POLL_MS))
                if self.backend in events:
                    self._drain(self.backend, self._on_node_frames)
                if self.frontend in events:
                    self._drain(self.frontend, self._on_agent_frames)
                if self.status_sock in events:
                    self._drain(self.status_sock, self._on_status_frames)
                self.send_heartbeats()
                self.purge_dead()
                self.watch_stalls()
        finally:
            self.catalog.close()
            for sock in (self.frontend, self.backend, self.status_sock):
                sock.close(linger=0)
            if self.auth is not None:
                self.auth.stop()
            self.ctx.term()

    def _drain(self, sock, handler) -> None:
        for _ in range(512):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return
            if len(frames) < 2:
                self.dropped_invalid += 1
                continue
            handler(frames[0].bytes, frames[1:])

    def count_error(self, code: str) -> None:
        self.errors_by_code[code] += 1

    def reply_error(self, out: Outbox, routing: bytes, exc, ref: str | None = None, **extra) -> None:
        self.count_error(exc.code)
        out.send(error_message(exc, ref=ref, **extra), routing)

    # --- agents -----------------------------------------------------------

    def _on_agent_frames(self, routing: bytes, frames: list) -> None:
        self._mediate(routing, frames, self.front_out, self.registry.agents, "HELLO", self.on_hello, "agent")

    def _mediate(self, routing: bytes, frames: list, out: Outbox, peers: dict, register_t: str, register,
                 side: str) -> None:
        """Decode, note the peer alive, and hand the message to `<side>_<TYPE>`;
        a refusal goes back as ERROR and changes nothing."""
        try:
            msg = decode(frames)
        except RemoteProtocolError as exc:
            self.reply_error(out, routing, exc)
            return
        peer = peers.get(routing)
        if peer is not None:
            peer.liveness.heard(now())
        try:
            if msg.t == register_t:
                register(routing, msg, security.peer_identity(frames[0]))
                return
            if peer is None:
                raise RequestError(f"say {register_t} first", "not_registered")
            handler = getattr(self, f"{side}_{msg.t}", None)
            if handler is None:
                raise RequestError(f"{msg.t} is not accepted from {side}s", "unknown_type")
            handler(peer, msg, frames)
        except RequestError as exc:
            self.reply_error(out, routing, exc, ref=msg.t, transfer_id=msg.get("transfer_id"), req=msg.get("req"))

    def on_hello(self, routing: bytes, msg, key_name: str | None) -> None:
        # Under CURVE the device is the one its key names; a claim to be
        # another device is refused, never believed.
        if not self.config.insecure and msg["device_id"] != key_name:
            raise RequestError("device_id does not match the key this connection authenticated with", "forbidden")
        old = self.registry.agents.get(routing)
        if old is not None and old.device_id != msg["device_id"]:
            raise RequestError("a connection speaks for one device only", "forbidden")
        self.registry.register_agent(routing, msg["device_id"], now())
        self.front_out.send(make("WELCOME", heartbeat_interval_ms=self.config.heartbeat_interval_ms), routing)
        logger.info("agent {} connected", msg["device_id"])

    def agent_HEARTBEAT(self, session, msg, frames) -> None:
        pass

    def agent_PING(self, session, msg, frames) -> None:
        self.front_out.send(make("PONG", seq=msg["seq"], sent_us=msg["sent_us"]), session.routing)

    def agent_BYE(self, session, msg, frames) -> None:
        self.drop_agent(session, "agent said BYE")

    def _require_own(self, session, msg) -> None:
        claimed = msg.get("device_id")
        if claimed is not None and claimed != session.device_id:
            raise RequestError(f"device {session.device_id} may not act for another device", "forbidden")

    def agent_LIST(self, session, msg, frames) -> None:
        self._require_own(session, msg)
        self.front_out.send(make("LIST_REPLY", snapshots=self.catalog.list(session.device_id)), session.routing)

    def agent_OFFER(self, session, msg, frames) -> None:
        self._require_own(session, msg)
        device, dataset, snapshot = session.device_id, msg["dataset"], msg["snapshot"]
        if msg["chunk_count"] != (msg["image_size"] + msg["chunk_size"] - 1) // msg["chunk_size"]:
            raise RequestError("chunk_count does not match image_size and chunk_size", "bad_field")
        existing = self.catalog.lookup(device, dataset, snapshot)
        if existing is not None:  # snapshots are immutable once named (DESIGN.md)
            self.unpark((device, dataset, snapshot))
            self.front_out.send(make("ACCEPT", req=msg["req"], transfer_id="committed", node_id=existing["node_id"],
                                     committed=True), session.routing)
            return
        # The device offers it again (it restarted, or lost its connection
        # before we noticed): the older upload of it is obsolete, whichever
        # connection it came from, and must not hold chunks the new one needs.
        stale = self.uploads_by_key.get((device, dataset, snapshot))
        if stale is not None:
            self.finish(stale, "aborted", "offered again")
        placed = self.catalog.node_for(device, dataset) or self.pending_placement.get((device, dataset))
        try:
            node_id = choose_node(placed, self.registry.nodes_by_id, self.datasets_on)
        except RequestError as exc:
            self.park(device, dataset, snapshot, placed or "", session.routing, msg["req"], msg["image_size"],
                      f"{exc.code}: {exc.reason}")
            raise
        self.unpark((device, dataset, snapshot))
        node = self.registry.nodes_by_id[node_id]
        window = max(self.config.transfer_window, 2 * msg["chunk_size"] + 65536)
        t = Transfer(f"t-{uuid.uuid4().hex[:16]}", "upload", device, dataset, snapshot, node_id, session.routing,
                     msg["req"], image_size=msg["image_size"], chunk_size=msg["chunk_size"],
                     chunk_count=msg["chunk_count"], window=window, started_at=now(), last_progress=now())
        self.add_transfer(t, session, node)
        node.reserved_bytes += t.image_size
        self.pending_placement[(device, dataset)] = node_id
        # durable before the upload starts: a restarted broker sends the
        # dataset back to the node that already holds its first chunks
        self.catalog.place(device, dataset, node_id)
        self.back_out.send(make("OPEN", transfer_id=t.transfer_id, device_id=device, dataset=dataset,
                                snapshot=snapshot, image_size=t.image_size, chunk_size=t.chunk_size,
                                chunk_count=t.chunk_count), node.routing)

    def agent_RESTORE(self, session, msg, frames) -> None:
        self._require_own(session, msg)
        device, dataset, snapshot = session.device_id, msg["dataset"], msg["snapshot"]
        entry = self.catalog.lookup(device, dataset, snapshot)
        if entry is None:
            raise RequestError(f"{dataset}/{snapshot} is not in the catalog", "not_found")
        node = self.registry.nodes_by_id.get(entry["node_id"])
        if node is None:
            raise RequestError(f"node {entry['node_id']} holding {dataset} is not available", "node_unavailable")
        t = Transfer(f"r-{uuid.uuid4().hex[:16]}", "restore", device, dataset, snapshot, node.node_id,
                     session.routing, msg["req"], image_size=entry["size"], chunk_count=entry["chunk_count"],
                     state="restoring", started_at=now())
        self.add_transfer(t, session, node)
        self.back_out.send(make("READ", transfer_id=t.transfer_id, device_id=device, dataset=dataset,
                                snapshot=snapshot, window=msg["window"]), node.routing)
        self.front_out.send(make("ACCEPT", req=msg["req"], transfer_id=t.transfer_id, node_id=node.node_id,
                                 committed=False), session.routing)

    def _owned(self, session, msg) -> Transfer:
        t = self.transfers.get(msg["transfer_id"])
        # Someone else's transfer and no transfer look the same: nothing leaks.
        if t is None or t.device_id != session.device_id or t.agent_routing != session.routing:
            raise RequestError(f"no transfer {msg['transfer_id']} of yours", "unknown_transfer")
        t.require_from_agent(msg.t)
        return t

    def _node_of(self, t: Transfer):
        node = self.registry.nodes_by_id.get(t.node_id)
        if node is None:
            raise RequestError(f"node {t.node_id} is not available", "node_unavailable")
        return node

    def agent_QUERY(self, session, msg, frames) -> None:
        t = self._owned(session, msg)
        self.back_out.send_frames(list(frames), self._node_of(t).routing, msg.t)

    def agent_CHUNK(self, session, msg, frames) -> None:
        t = self._owned(session, msg)
        node = self._node_of(t)
        t.on_chunk_sent(msg["hash"], len(msg.payload[0]), msg["raw_len"], msg.get("offset"), msg.get("total"))
        if not self.back_out.send_frames(list(frames), node.routing, msg.t):
            node.credit.release(t.on_chunk_done(msg["hash"], stored=False))

    def agent_COMMIT(self, session, msg, frames) -> None:
        t = self._owned(session, msg)
        node = self._node_of(t)
        t.state = "committing"
        t.last_progress = now()
        node.credit.release(t.release_holding())
        self.grant_credit_all(node)
        self.back_out.send_frames(list(frames), node.routing, msg.t)

    def agent_CREDIT(self, session, msg, frames) -> None:
        late = self.finished_by_id.get(msg["transfer_id"])
        if late is not None and late.kind == "restore" and late.device_id == session.device_id:
            return  # credit for blocks of a restore already complete: nothing left to grant it for
        t = self._owned(session, msg)
        self.back_out.send_frames(list(frames), self._node_of(t).routing, msg.t)

    def agent_ABORT(self, session, msg, frames) -> None:
        t = self._owned(session, msg)
        self.finish(t, "aborted", "agent aborted")

    # --- storage nodes ------------------------------------------------------

    def _on_node_frames(self, routing: bytes, frames: list) -> None:
        self._mediate(routing, frames, self.back_out, self.registry.nodes, "READY", self.on_ready, "node")

    def on_ready(self, routing: bytes, msg, key_name: str | None) -> None:
        if not self.config.insecure and msg["node_id"] != key_name:
            raise RequestError("node_id does not match the key this connection authenticated with", "forbidden")
        node, replaced = self.registry.register_node(routing, msg["node_id"], msg["window"], msg["free_bytes"],
                                                     msg["used_bytes"], now())
        if replaced is not None and replaced.routing != routing:
            self.node_lost(replaced, "node re-registered; its open transfers were lost")
        logger.info("storage node {} ready (window {} bytes, {} free)", node.node_id, msg["window"],
                    msg["free_bytes"])

    def node_HEARTBEAT(self, node, msg, frames) -> None:
        node.free_bytes = msg.get("free_bytes", node.free_bytes)
        node.used_bytes = msg.get("used_bytes", node.used_bytes)
        node.load = msg.get("load", node.load)

    def _placed(self, node, msg) -> Transfer:
        t = self.transfers.get(msg["transfer_id"])
        if t is None or t.node_id != node.node_id:
            raise RequestError(f"no transfer {msg['transfer_id']} on this node", "unknown_transfer")
        t.require_from_node(msg.t)
        return t

    def _to_agent(self, t: Transfer, frames, t_name: str) -> None:
        self.front_out.send_frames(list(frames), t.agent_routing, t_name)

    def node_OPENED(self, node, msg, frames) -> None:
        t = self._placed(node, msg)
        t.last_progress = now()
        t.state = "active"
        self.front_out.send(make("ACCEPT", req=t.req, transfer_id=t.transfer_id, node_id=t.node_id,
                                 committed=False), t.agent_routing)

    def node_MISSING(self, node, msg, frames) -> None:
        t = self._placed(node, msg)
        t.last_progress = now()
        t.on_missing(msg["start"], msg["count"], msg["missing"])
        self._to_agent(t, frames, msg.t)
        self.grant_credit(node, t)

    def node_STORED(self, node, msg, frames) -> None:
        t = self._placed(node, msg)
        t.last_progress = now()
        node.credit.release(t.on_chunk_done(msg["hash"], stored=True))
        self._to_agent(t, frames, msg.t)
        self.grant_credit_all(node)  # those already waiting go first
        if t.transfer_id not in node.hungry:
            self.grant_credit(node, t)

    def node_COMMITTED(self, node, msg, frames) -> None:
        t = self._placed(node, msg)
        if t.state != "committing" or (msg["device_id"], msg["dataset"], msg["snapshot"]) != (
                t.device_id, t.dataset, t.snapshot):
            raise RequestError("COMMITTED does not match the transfer", "bad_state")
        self.catalog.record(t.device_id, t.dataset, t.snapshot, node.node_id, msg["image_size"],
                            msg["chunk_count"], msg["image_blake3"])
        t.bytes_done = t.image_size
        self._to_agent(t, frames, msg.t)
        self.finish(t, "committed")
        logger.info("committed {}/{}/{} on {}", t.device_id, t.dataset, t.snapshot, node.node_id)

    def node_IMAGE(self, node, msg, frames) -> None:
        t = self._placed(node, msg)
        self._to_agent(t, frames, msg.t)
        if msg["chunk_count"] == 0:
            self.finish(t, "restored")

    def node_BLOCK(self, node, msg, frames) -> None:
        t = self._placed(node, msg)
        t.bytes_done += msg["raw_len"]
        t.bytes_sent += len(msg.payload[0]) if msg.payload else 0
        self._to_agent(t, frames, msg.t)
        if msg["index"] >= t.chunk_count - 1:
            self.finish(t, "restored")

    def node_ERROR(self, node, msg, frames) -> None:
        self.count_error(msg["code"])
        tid = msg.get("transfer_id")
        t = self.transfers.get(tid) if tid else None
        if t is None or t.node_id != node.node_id:
            logger.warning("node {} reports {}: {}", node.node_id, msg["code"], msg["reason"])
            return
        self._to_agent(t, frames, msg.t)
        if msg.get("ref") == "CHUNK" and msg.get("hash") is not None:
            node.credit.release(t.on_chunk_done(msg["hash"], stored=False))
            self.grant_credit_all(node)
        if msg["code"] == "storage_error":
            # The node's disk failed or filled: nothing was acknowledged that
            # is not on disk; park until the agent offers it again.
            self.finish(t, "parked", f"{msg['code']}: {msg['reason']}")
        elif msg.get("ref") != "CHUNK":
            self.finish(t, "failed", f"{msg['code']}: {msg['reason']}")

    # --- credit -------------------------------------------------------------

    def grant_credit(self, node, t: Transfer) -> bool:
        """Grant what `t` can use now; False (and `t` queued as hungry) when
        the node's pool cannot cover it yet."""
        wanted = t.credit_wanted()
        if wanted <= 0:
            return True
        # At least a whole chunk's worth, so credit never fragments into
        # slivers no chunk fits in.
        if node.credit.free < min(wanted, t.chunk_size + 1024):
            if t.transfer_id not in node.hungry:
                node.hungry[t.transfer_id] = None
            return False
        granted = node.credit.take(wanted)
        t.holding += granted
        self.front_out.send(make("CREDIT", transfer_id=t.transfer_id, bytes=granted), t.agent_routing)
        return True

    def grant_credit_all(self, node) -> None:
        """Hand freed credit to the uploads waiting for it, oldest wait first:
        O(uploads served), not O(uploads on the node)."""
        while node.hungry and node.credit.free > 0:
            tid = next(iter(node.hungry))
            del node.hungry[tid]
            t = self.transfers.get(tid)
            if t is None or t.kind != "upload" or t.state != "active":
                continue
            if not self.grant_credit(node, t):
                # still short: it keeps its place at the head of the queue
                node.hungry[tid] = None
                node.hungry.move_to_end(tid, last=False)
                break

    # --- lifecycle ------------------------------------------------------------

    def datasets_on(self, node_id: str) -> int:
        pending = sum(1 for key, nid in self.pending_placement.items()
                      if nid == node_id and self.catalog.node_for(*key) is None)
        return self.catalog.datasets_on(node_id) + pending

    def add_transfer(self, t: Transfer, session, node) -> None:
        self.transfers[t.transfer_id] = t
        if t.kind == "upload":
            self.uploads_by_key[(t.device_id, t.dataset, t.snapshot)] = t
        session.transfers.add(t.transfer_id)
        node.transfers.add(t.transfer_id)

    def finish(self, t: Transfer, state: str, reason: str = "") -> None:
        if t.finished:
            return
        node = self.registry.nodes_by_id.get(t.node_id)
        if state in ("aborted", "parked") and node is not None:
            self.back_out.send(make("ABORT", transfer_id=t.transfer_id), node.routing)
        released = t.release_all()
        t.state, t.reason, t.finished_at = state, reason, now()
        self.transfers.pop(t.transfer_id, None)
        if self.uploads_by_key.get((t.device_id, t.dataset, t.snapshot)) is t:
            del self.uploads_by_key[(t.device_id, t.dataset, t.snapshot)]
        if state == "parked":
            self.parked[(t.device_id, t.dataset, t.snapshot)] = t
        else:
            if self.finished and len(self.finished) == self.finished.maxlen:
                self.finished_by_id.pop(self.finished[0].transfer_id, None)
            self.finished.append(t)
            if self.finished.maxlen:
                self.finished_by_id[t.transfer_id] = t
        agent = self.registry.agents.get(t.agent_routing)
        if agent is not None:
            agent.transfers.discard(t.transfer_id)
        if node is not None:
            node.transfers.discard(t.transfer_id)
            node.hungry.pop(t.transfer_id, None)
            node.credit.release(released)
            if t.kind == "upload":
                node.reserved_bytes = max(0, node.reserved_bytes - t.image_size)
            self.grant_credit_all(node)
        if t.kind == "upload" and not any(
                o.kind == "upload" and (o.device_id, o.dataset) == (t.device_id, t.dataset)
                for o in self.transfers.values()):
            self.pending_placement.pop((t.device_id, t.dataset), None)
        if state in ("failed", "aborted", "parked"):
            logger.warning("transfer {} {}/{}/{} {}: {}", t.transfer_id, t.device_id, t.dataset, t.snapshot,
                           state, reason)

    def drop_agent(self, session, reason: str) -> None:
        self.registry.drop_agent(session.routing)
        for tid in list(session.transfers):
            t = self.transfers.get(tid)
            if t is not None:
                self.finish(t, "aborted", reason)
        logger.info("agent {} gone: {}", session.device_id, reason)

    def node_lost(self, node, reason: str) -> None:
        """Park every transfer on a node that went away; the agents offer them
        again and they resume (only missing chunks travel) once it is back."""
        for tid in list(node.transfers):
            t = self.transfers.get(tid)
            if t is None:
                continue
            self.interrupt(t, RequestError(f"node {node.node_id}: {reason}", "node_unavailable"))
        node.transfers.clear()
        logger.warning("storage node {} lost: {}", node.node_id, reason)

    def interrupt(self, t: Transfer, exc: RequestError) -> None:
        """Tell the agent, and park an upload (or fail a restore)."""
        self.count_error(exc.code)
        self.front_out.send(error_message(exc, ref="OFFER" if t.kind == "upload" else "RESTORE",
                                          transfer_id=t.transfer_id, req=t.req), t.agent_routing)
        if t.kind == "upload":
            self.finish(t, "parked", f"{exc.code}: {exc.reason}")
        else:
            self.finish(t, "failed", f"{exc.code}: {exc.reason}")

    def park(self, device, dataset, snapshot, node_id, routing, req, image_size, reason) -> None:
        key = (device, dataset, snapshot)
        t = self.parked.get(key)
        if t is None:
            t = Transfer(f"p-{uuid.uuid4().hex[:16]}", "upload", device, dataset, snapshot, node_id, routing, req,
                         image_size=image_size, started_at=now())
            self.parked[key] = t
        t.state, t.reason = "parked", reason

    def unpark(self, key: tuple) -> None:
        t = self.parked.pop(key, None)
        if t is not None:
            t.state, t.finished_at = "resumed", now()
            self.finished.append(t)

    def watch_stalls(self) -> None:
        """The watchdog: an upload with no acknowledged progress is parked, and
        the agent offers it again (silent hangs are how replication dies)."""
        limit = self.config.stall_timeout_ms / 1000
        t_now = now()
        for t in [t for t in self.transfers.values()
                  if t.kind == "upload" and t.state in ("opening", "active", "committing")
                  and t_now - t.last_progress > limit]:
            self.interrupt(t, RequestError(f"no acknowledged progress for {limit:.0f}s", "stalled"))

    def send_heartbeats(self) -> None:
        t = now()
        beat = None
        for side, peer in list(self.registry.heartbeats_due(t)):
            beat = beat or make("HEARTBEAT")
            (self.front_out if side == "agent" else self.back_out).send(beat, peer.routing)
            peer.liveness.sent(t)

    def purge_dead(self) -> None:
        agents, nodes = self.registry.dead_peers(now())
        for session in agents:
            self.drop_agent(session, "silent past heartbeat liveness")
        for node in nodes:
            self.registry.drop_node(node.routing)
            self.node_lost(node, "silent past heartbeat liveness")

    # --- status socket ----------------------------------------------------------

    def _on_status_frames(self, routing: bytes, frames: list) -> None:
        try:
            msg = decode(frames)
            if msg.t == "STATUS":
                reply = make("STATUS_REPLY", status=self.status())
            elif msg.t == "LIST":
                reply = make("LIST_REPLY", snapshots=self.catalog.list(msg.get("device_id")))
            else:
                raise RequestError(f"{msg.t} is not a status request", "unknown_type")
        except (RemoteProtocolError, RequestError) as exc:
            self.reply_error(self.status_out, routing, exc)
            return
        self.status_out.send(reply, routing)

    def status(self) -> dict:
        devices = {}
        for device_id, connected in self.registry.known_devices.items():
            devices[device_id] = {"device_id": device_id, "connected": connected}
        storage = [n.status() for n in self.registry.nodes_by_id.values()]
        storage += [n.status() for n in self.registry.lost_nodes.values()]
        transfers = ([t.status() for t in self.transfers.values()] + [t.status() for t in self.parked.values()]
                     + [t.status() for t in self.finished])
        dropped = (self.front_out.dropped_total + self.back_out.dropped_total + self.status_out.dropped_total
                   + self.dropped_invalid)
        return {
            "agents": list(devices.values()),
            "storage": storage,
            "transfers": transfers,
            "broker": {"rss_bytes": rss_bytes(), "dropped_messages": dropped,
                       "errors_by_code": dict(self.errors_by_code), "active_transfers": len(self.transfers),
                       "max_chunk_size": MAX_CHUNK_SIZE},
        }


def run_broker(config: BrokerConfig) -> int:
    tune_malloc()
    stop = StopFlag().install()
    Broker(config).run(stop)
    return 0
