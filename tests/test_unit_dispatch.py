"""Each core's dispatch table is exactly what schemas/ declares it receives.

A type a role receives (directly, or passed on `via` the broker) has a
handler; a handler exists only for a type that may arrive. Planned types
(not yet spoken) have neither.
"""

import pytest

from roles.controller.core import DISPATCH, Controller
from schemas import MESSAGES


def declared(receiver: str, sender: str) -> set:
    return {name for name, m in MESSAGES.items()
            if not m.planned and sender in m.senders and (receiver in m.receivers or receiver in m.via)}


@pytest.mark.parametrize("side,sender", [("agent", "agent"), ("node", "node"), ("status", "operator")])
def test_broker_dispatch_matches_the_schema(side, sender):
    assert set(DISPATCH[side]) == declared("broker", sender)


def test_every_broker_handler_exists():
    for side, table in DISPATCH.items():
        for t, name in table.items():
            assert callable(getattr(Controller, name, None)), f"{side} {t}: no method {name}"


def declared_to(receiver: str) -> set:
    """What a DEALER role gets from the broker: sent by it, or passed on via it."""
    return {name for name, m in MESSAGES.items()
            if not m.planned and receiver in m.receivers and ("broker" in m.senders or "broker" in m.via)}


def test_storage_node_dispatch_matches_the_schema():
    from roles.storenode.core import DISPATCH as NODE, StorageCore
    assert set(NODE) == {"broker"}
    assert set(NODE["broker"]) == declared_to("node")
    assert all(callable(getattr(StorageCore, name, None)) for name in NODE["broker"].values())


def test_agent_dispatch_matches_the_schema():
    from roles.appliance.core import AgentCore
    from roles.appliance.replies import DISPATCH as AGENT
    assert set(AGENT["broker"]) == declared_to("agent")
    assert set(AGENT["status"]) == {n for n, m in MESSAGES.items() if "operator" in m.senders and "agent" in m.receivers}
    assert all(callable(getattr(AgentCore, name, None)) for name in AGENT["broker"].values())
