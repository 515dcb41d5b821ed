"""Live enrolment and revocation in the controller (DESIGN.md "Fleet
operations — contract", Live enrolment).

Theory of operation. The driver rescans the key directories (bus.keyring)
and tells the core only what changed: `keys_changed(domain, added,
removed, now)`, with names (the key files' stems, which are also the
User-Id of every message on a connection that key authenticated). The ZAP
handler already refuses new handshakes with a removed key; what is left is
the connections that key opened before:

- every session of a removed name is dropped at once (its open uploads are
  aborted, so the nodes forget them; what it committed stays), told
  ERROR `forbidden`, and its connection remembered as revoked;
- every later message from a revoked connection, HELLO or READY included,
  is answered ERROR `forbidden`, never `not_registered` (which would make
  the peer say HELLO again at once, in a loop);
- a message without a session (HELLO, READY, anything on the status
  socket) whose User-Id names a revoked key is refused the same way: the
  connection may have been authenticated just before the handler's table
  was swapped.

A name removed and added again in one change (its key replaced) loses its
connections but stays admitted: the new key connects afresh. A name added
back later is admitted on new connections; connections revoked before stay
refused. Only a change pays for a walk over the sessions (one per change,
not per message); the per-message cost is a set lookup, and none at all
while nothing is revoked. Admin names (operators that may change state) are
kept in `admins` for the commands that will need them.
"""

from __future__ import annotations

from loguru import logger

from bus.errors import RequestError

# key directory -> the socket side its keys connect on
DOMAIN_SIDES = {"devices": "agent", "nodes": "node", "operators": "status"}


class Enrolment:
    """A mixin of Controller (core.py): `init_enrolment()` in its __init__."""

    def init_enrolment(self) -> None:
        self.revoked_names: dict[str, set] = {side: set() for side in DOMAIN_SIDES.values()}
        self.revoked_peers: set = set()  # (side, routing) of connections whose key was removed
        self.admins: set = set()

    def keys_changed(self, domain: str, added, removed, now: float) -> list:
        """The key directory `domain` (devices, nodes, operators, admins) gained
        `added` names and lost `removed` ones (a name in both: its key changed)."""
        self.now, self.out = now, []
        if domain == "admins":
            self.admins.difference_update(removed)
            self.admins.update(added)
            return self.out
        side = DOMAIN_SIDES[domain]
        revoked = self.revoked_names[side]
        revoked.update(removed)
        revoked.difference_update(added)
        if removed:
            self._revoke_sessions(side, set(removed))
        if added or removed:
            logger.info("{} keys: {} added, {} removed", domain, len(added), len(removed))
        return self.out

    def _revoke_sessions(self, side: str, names: set) -> None:
        exc = RequestError("the key of this connection is no longer listed", "forbidden")
        if side == "agent":
            gone = [s for s in self.registry.agents.values() if s.device_id in names]
        elif side == "node":
            gone = [s for s in self.registry.nodes.values() if s.node_id in names]
        else:
            return  # status connections hold no session: each request is checked by its User-Id
        for session in gone:
            self.revoked_peers.add(session.peer)
            self.reply_error(session.peer, exc)
            if side == "agent":
                self.drop_agent(session, "key revoked")
            else:
                self.registry.drop_node(session.routing)
                self.node_lost(session, "key revoked")
            logger.warning("{} {} dropped: its key was removed", side, session.device_id if side == "agent"
                           else session.node_id)

    def require_admitted(self, peer, session, frames) -> None:
        """Raise `forbidden` for a revoked connection, a sessionless message under a revoked key,
        or (under CURVE) a message whose User-Id is not the identity its session enrolled with:
        authority rests on the key of every message, never on the routing id alone."""
        if self.revoked_peers and peer in self.revoked_peers:
            raise RequestError("the key of this connection is no longer listed", "forbidden")
        if session is not None and not self.config.insecure:
            enrolled = session.device_id if peer[0] == "agent" else session.node_id
            if self.identify(frames) != enrolled:
                raise RequestError("this message's key is not the one its session enrolled with", "forbidden")
        if session is None:
            revoked = self.revoked_names[peer[0]]
            if revoked and self.identify(frames) in revoked:
                raise RequestError("the key of this connection is no longer listed", "forbidden")
