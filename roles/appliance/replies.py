"""What the agent makes of the broker's messages: the dispatch table, the
handlers (a mixin of AgentCore), the cloud's refusals, and the answer on the
status socket."""

from __future__ import annotations

from loguru import logger

from bus.effects import Send
from bus.errors import RequestError
from roles.appliance.status import agent_status
from schemas import error_message, make

# Refusals that say "not now" rather than "never": the upload is parked and
# offered again without counting as a failed attempt.
PARKING_CODES = {"node_unavailable", "no_storage", "stalled", "storage_error", "catalog_unavailable", "pruned",
                 "no_space"}
# ERROR `forbidden` about the connection itself (our key is not or no longer
# admitted, or does not name this device), not about one request: saying
# HELLO again at once would be refused again, so the agent drops the
# connection and opens a new one after a back-off that doubles up to a minute
# (a key listed again is then admitted; DESIGN.md, Live enrolment).
REFUSING_REFS = {None, "HELLO", "HEARTBEAT", "PING"}
REFUSED_FIRST_S, REFUSED_MAX_S = 1.0, 60.0

# what the broker sends or passes on to an agent -> handler; tests/test_unit_dispatch.py checks it against schemas
DISPATCH = {
    "broker": {"WELCOME": "on_WELCOME", "HEARTBEAT": "on_HEARTBEAT", "PONG": "on_PONG", "ERROR": "on_ERROR",
               "ROOM": "on_ROOM",
               "ACCEPT": "on_reply", "MISSING": "on_reply", "CREDIT": "on_reply", "STORED": "on_reply",
               "COMMITTED": "on_reply", "IMAGE": "on_restore_reply", "BLOCK": "on_restore_reply",
               "VERIFIED": "on_VERIFIED"},
    "status": {"STATUS": "answer_status"},
}


class BrokerReplies:
    """AgentCore's handlers of what the broker sends; `_handlers` is built from DISPATCH."""

    def on_message(self, msg, now: float) -> None:
        handler = self._handlers.get(msg.t)
        if handler is None:  # declared for other receivers: a confused or hostile broker
            self.malformed_count += 1
            logger.warning("{} from the broker is not for an agent", msg.t)
            return
        handler(msg, now)

    def on_WELCOME(self, msg, now: float) -> None:
        self.welcomed = True
        self.refusals = 0
        self.heartbeat_interval_s = msg["heartbeat_interval_ms"] / 1000
        idle_ms = msg.get("idle_heartbeat_interval_ms") or msg["heartbeat_interval_ms"]
        self.idle_heartbeat_interval_s = max(self.heartbeat_interval_s, idle_ms / 1000)

    def on_HEARTBEAT(self, msg, now: float) -> None:
        pass

    def on_PONG(self, msg, now: float) -> None:
        if self.bandwidth.yielding is not None:
            self.bandwidth.yielding.on_rtt(now - msg["sent_us"] / 1e6, now, self.wire.ack_rate)

    def on_ROOM(self, msg, now: float) -> None:
        """The cloud has room for a snapshot we parked no_space: offer it again now, not at the end of
        its back-off. About anything else (not parked no_space, unknown) it changes nothing."""
        key = (msg["dataset"], msg["snapshot"])
        if self.outcomes.room(key, now):
            logger.info("{}/{}: the cloud has room; offering it again", *key)
            self.deadlines.schedule(("retry", key), now)

    def on_ERROR(self, msg, now: float) -> None:
        if msg["code"] == "not_registered":
            # the broker restarted and forgot us: our transfers are gone with it
            self.on_broker_lost(now)
            self._send(self.register_message(now))
            return
        if msg["code"] == "forbidden" and msg.get("ref") in REFUSING_REFS:
            self.on_refused(msg, now)
            return
        if self.verify_refused(msg):
            return
        self.on_reply(msg, now)

    def on_refused(self, msg, now: float) -> None:
        """The broker refuses this connection: park everything, and ask the
        driver (`reconnect_after_s`) for a new connection after a back-off."""
        if self.reconnect_after_s is not None:
            return  # already leaving this connection
        delay = min(REFUSED_MAX_S, REFUSED_FIRST_S * 2 ** self.refusals)
        self.refusals += 1
        logger.error("the broker refuses this connection ({}); connecting again in {:.0f}s", msg["reason"], delay)
        self.welcomed = False
        self.on_broker_lost(now)
        self.reconnect_after_s = delay

    def on_reply(self, msg, now: float) -> None:
        """A message about one upload: found by transfer id, else by request id."""
        upload = None
        if msg.get("transfer_id") is not None:
            upload = self.by_transfer.get(msg["transfer_id"])
        if upload is None and msg.get("req") is not None:
            upload = self.by_req.get(msg["req"])
        if upload is None:
            if msg.t == "ERROR":
                logger.warning("broker error {}: {}", msg["code"], msg["reason"])
            return
        try:
            self._dispatch(upload, msg, now)
        except RequestError as exc:
            self._fail(upload, f"{exc.code}: {exc.reason}", now)

    def on_restore_reply(self, msg, now: float) -> None:
        pass  # IMAGE and BLOCK belong to `speedsync restore` (roles/restore.py), never to a replicating agent

    def _dispatch(self, upload, msg, now: float) -> None:
        upload.heard()
        upload.require_allowed(msg.t)
        if msg.t == "ACCEPT":
            self.by_req.pop(msg["req"], None)
            if not msg["committed"]:
                self.by_transfer[msg["transfer_id"]] = upload
        apply_reply(upload, msg, self.wire, now)
        if upload.finished:
            self._finished(upload, now)


def answer_status(core, peer, msg, now: float, wall_now: float) -> Send:
    """STATUS gets the agent's status document; anything else an ERROR."""
    if msg.t != "STATUS":
        return Send(peer, error_message(RequestError(f"{msg.t} is not a status request", "unknown_type")))
    return Send(peer, make("STATUS_REPLY", status=agent_status(core, now, wall_now)))


def apply_reply(upload, msg, wire, now: float) -> None:
    """Hand the cloud's reply about `upload` to it (ACCEPT's bookkeeping is the core's)."""
    if msg.t == "ACCEPT":
        upload.on_accept(msg["transfer_id"], msg["committed"])
    elif msg.t == "MISSING":
        upload.on_missing(msg["start"], msg["missing"])
    elif msg.t == "CREDIT":
        upload.on_credit(msg["bytes"])
    elif msg.t == "STORED":
        upload.on_stored(msg["hash"], msg["raw_len"], msg["wire_len"])
        wire.acknowledged(msg["wire_len"], now)
    elif msg.t == "COMMITTED":
        upload.on_committed(msg["image_blake3"])
    elif msg.t == "ERROR" and msg["code"] in PARKING_CODES:
        upload.park(f"{msg['code']}: {msg['reason']}")
    elif msg.t == "ERROR":
        upload.fail(f"{msg['code']}: {msg['reason']}")
