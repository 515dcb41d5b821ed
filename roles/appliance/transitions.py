"""One upload's states on the agent, as tables (h11's `_state.py`, Rule 1).

    offering --accepted--> sending --all_stored--> committing --COMMITTED--> committed
    offering --already_committed--> committed
    any state --fail--> failed, --park--> parked

Every assignment of `Upload.state` happens here, in `move`. The cloud's
replies each state allows are `UPLOAD_REPLIES`: anything else is the
cloud's protocol violation, and the agent fails the upload.
"""

from __future__ import annotations

STATES = ("offering", "sending", "committing", "committed", "failed", "parked")
FINAL_STATES = frozenset({"committed", "failed", "parked"})

UPLOAD_TRANSITIONS = {
    ("offering", "accepted"): "sending",
    ("offering", "already_committed"): "committed",
    ("sending", "all_stored"): "committing",
    ("committing", "COMMITTED"): "committed",
    # an upload may be failed or parked whatever it was doing (and ended again: the last word stands)
    **{(state, "fail"): "failed" for state in STATES},
    **{(state, "park"): "parked" for state in STATES},
}

UPLOAD_REPLIES = {
    "offering": frozenset({"ACCEPT", "ERROR"}),
    "sending": frozenset({"MISSING", "CREDIT", "STORED", "ERROR"}),
    "committing": frozenset({"CREDIT", "COMMITTED", "ERROR"}),
}


def move(upload, event: str) -> str:
    """Apply `event` to `upload`; a move the table does not list is our own bug (LookupError)."""
    next_state = UPLOAD_TRANSITIONS.get((upload.state, event))
    if next_state is None:
        raise LookupError(f"upload {upload.state}: no move on {event}")
    upload.state = next_state
    return next_state
