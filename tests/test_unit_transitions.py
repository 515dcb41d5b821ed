"""The broker's transfer table: every (kind, state, sender, event) either
moves to its tabled next state or is refused as bad_state naming the type,
the state and the peer, and leaves the transfer as it was."""

import itertools

import pytest

from bus.errors import RequestError
from roles.controller.transfers import FINAL_STATES, TRANSITIONS, Transfer, advance
from schemas import MESSAGES

KINDS = ("upload", "restore")
STATES = sorted({state for (_, state, _, _) in TRANSITIONS} | FINAL_STATES)
SENDERS = ("agent", "node", "catalog")
EVENTS = sorted(set(MESSAGES) | {event for (_, _, _, event) in TRANSITIONS})


def transfer(kind, state):
    return Transfer("t-1", kind, "dev", "ds", "s1", "node-a", b"r", 1, state=state)


@pytest.mark.parametrize("kind,state", list(itertools.product(KINDS, STATES)))
def test_every_event_is_tabled_or_refused(kind, state):
    for sender, event in itertools.product(SENDERS, EVENTS):
        t = transfer(kind, state)
        expected = TRANSITIONS.get((kind, state, sender, event))
        if expected is None:
            with pytest.raises(RequestError) as info:
                advance(t, sender, event, "peer-7")
            assert info.value.code == "bad_state"
            reason = info.value.reason
            assert event.split("@")[0] in reason and state in reason and "peer-7" in reason, reason
            assert t.state == state
        else:
            assert advance(t, sender, event, "peer-7") == expected
            assert t.state == (state if expected in FINAL_STATES else expected)


def test_final_states_accept_nothing():
    for (kind, state, _, _) in TRANSITIONS:
        assert state not in FINAL_STATES, (kind, state)


def test_every_live_state_can_be_aborted_by_its_agent():
    for (kind, state, _, _) in TRANSITIONS:
        if kind == "copy":
            continue  # a drain's copy has no agent: the broker ends it (drain.py copy_end)
        assert TRANSITIONS.get((kind, state, "agent", "ABORT")) == "aborted", (kind, state)


def test_no_agent_event_moves_a_copy():
    assert not [key for key in TRANSITIONS if key[0] == "copy" and key[2] == "agent"]


def test_the_agent_upload_table_moves_or_refuses():
    from types import SimpleNamespace

    from roles.appliance.transitions import STATES, UPLOAD_REPLIES, UPLOAD_TRANSITIONS, move
    events = {event for (_, event) in UPLOAD_TRANSITIONS}
    for state, event in itertools.product(STATES, events):
        upload = SimpleNamespace(state=state)
        expected = UPLOAD_TRANSITIONS.get((state, event))
        if expected is None:
            with pytest.raises(LookupError):
                move(upload, event)
            assert upload.state == state
        else:
            assert move(upload, event) == expected == upload.state
    assert set(UPLOAD_REPLIES) <= set(STATES)
    assert all(t in MESSAGES for replies in UPLOAD_REPLIES.values() for t in replies)
