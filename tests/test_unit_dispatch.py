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
