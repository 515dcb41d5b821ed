"""The storage node's state machines, as tables: every `state` assignment is here.

Theory of operation (h11 `_state.py`, ROLES.md "A state machine is a table"):
an event is a message type from the peer (capitals, as on the wire) or an
internal event of the node (lower case: a pool answer, a peer's chunk). The
next state is `TABLE[(state, event)]`; a pair the table does not hold is the
error: `RequestError(bad_state)` naming type, state and peer, and the session
moves to `failed` (h11: an exception while handling a peer's event sets
their state to ERROR). Only `failed` is reachable from anywhere.

Upload (one per transfer the broker OPENed here):

    open --COMMIT--> committing --committed--> committed
                      |   ^
              waiting |   | peer_stored       (chunks another upload of the
                      v   |                    device is sending)
                 waiting_on_peer
    committing | waiting_on_peer --refused--> failed     (commit refused)
    any --violation--> failed;  any --ABORT--> closed    (forgotten)

Restore (one per READ):

    streaming --no_credit--> waiting_credit --CREDIT--> streaming
    streaming --sent_all--> done;  any --ABORT--> done
"""

from __future__ import annotations

from bus.errors import RequestError

FAILED = "failed"

UPLOAD_TRANSITIONS = {
    ("open", "QUERY"): "open",
    ("open", "CHUNK"): "open",
    ("open", "COMMIT"): "committing",
    ("committing", "waiting"): "waiting_on_peer",
    ("waiting_on_peer", "peer_stored"): "committing",
    ("committing", "committed"): "committed",
    ("committing", "refused"): FAILED,
    ("waiting_on_peer", "refused"): FAILED,
    **{(state, "ABORT"): "closed" for state in ("open", "committing", "waiting_on_peer", "committed", FAILED)},
    **{(state, "violation"): FAILED for state in ("open", "committing", "waiting_on_peer", FAILED)},
}

READ_TRANSITIONS = {
    ("streaming", "no_credit"): "waiting_credit",
    ("streaming", "CREDIT"): "streaming",
    ("waiting_credit", "CREDIT"): "streaming",
    ("streaming", "sent_all"): "done",
    ("done", "CREDIT"): "done",  # late credit for a finished restore is not an error
    **{(state, "ABORT"): "done" for state in ("streaming", "waiting_credit", "done")},
    **{(state, "violation"): "done" for state in ("streaming", "waiting_credit", "done")},
}


def allows(table: dict, state: str, event: str) -> bool:
    return (state, event) in table


def advance(session, table: dict, event: str, peer: str = "node") -> str:
    """Move `session.state` by `event`; a miss raises bad_state and fails the session."""
    next_state = table.get((session.state, event))
    if next_state is None:
        was = session.state
        session.state = table.get((was, "violation"), FAILED)
        raise RequestError(f"{event} is not allowed in state {was} (from {peer})", "bad_state")
    session.state = next_state
    return next_state


def fail(session, table: dict) -> None:
    """A protocol violation while handling a peer's message: the session is done for."""
    session.state = table.get((session.state, "violation"), FAILED)
