"""What a core asks its driver to do. Cores return lists of these and never
touch a socket, a thread or the clock (ROLES.md, "The core interface").

A peer is `(side, routing)`: `side` names the socket the driver registered
("agent", "node", "status" on the broker; "broker" on a DEALER, whose
routing is None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

Peer = tuple  # (side: str, routing: bytes | None)

# What a DEALER link tells its core (`on_link(event, now)`).
CONNECTED, LOST = "connected", "lost"


@dataclass(frozen=True, slots=True)
class Send:
    """Encode `message` and send it to `to` without blocking (a drop is counted)."""
    to: Peer
    message: Any


@dataclass(frozen=True, slots=True)
class Forward:
    """Pass frames that arrived on to `to`, untouched (data is never re-encoded)."""
    to: Peer
    frames: list
    t: str


@dataclass(frozen=True, slots=True)
class Submit:
    """Run `fn(*args)` on pool `pool`; the result comes back as `completed(key, ...)`."""
    pool: str
    key: Any
    fn: Callable
    args: tuple = ()


Effect = Send | Forward | Submit


class Core(Protocol):
    def received(self, peer: Peer, msg, frames: list, now: float) -> list: ...

    def completed(self, key, result, error, now: float) -> list: ...

    def on_time(self, now: float) -> list: ...

    def next_deadline(self) -> float | None: ...

    def statistics(self): ...
