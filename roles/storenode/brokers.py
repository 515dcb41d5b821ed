"""A node attached to several brokers of one controller (DESIGN.md "Several brokers").

The node holds one DEALER link per broker (loop sides "broker/0",
"broker/1", ...; a node of one broker keeps the side "broker"). Every
session belongs to the broker that opened it, and everything about it goes
back on that link: the core sends to the logical BROKER and `route` names
the link, from the transfer id (OPEN, READ, COPY), the snapshot of a PRUNE,
the id of a VERIFY. A message that answers none of these goes to the broker
whose message is being handled; VERIFY_REPORT goes to every broker.

Credit: each broker is told `window // brokers` (`share`), so what all of
them grant together never exceeds the node's window. A broker that is away
keeps its share unused until it is back: a share given to the others could
not be taken back before the bytes already granted against it arrived.
"""

from __future__ import annotations

from bus.effects import Send

LOGICAL = ("broker", None)
BROADCAST = frozenset({"VERIFY_REPORT"})


def broker_sides(count: int) -> tuple:
    return ("broker",) if count == 1 else tuple(f"broker/{i}" for i in range(count))


class BrokerRoutes:
    def __init__(self, sides: tuple = ("broker",)):
        self.sides = sides
        self.current = sides[0]
        self.by_transfer: dict[str, str] = {}
        self.by_prune: dict[tuple, str] = {}
        self.by_verify: dict[str, str] = {}

    @property
    def several(self) -> bool:
        return len(self.sides) > 1

    def share(self, window: int) -> int:
        return max(1, window // len(self.sides))

    def heard(self, peer) -> None:
        """A message from this broker is being handled."""
        if self.several and peer is not None and peer[0] in self.sides:
            self.current = peer[0]

    def opened(self, msg) -> None:
        """Remember which broker sent a message that opens something."""
        if not self.several:
            return
        if msg.t in ("OPEN", "READ", "COPY"):
            self.by_transfer[msg["transfer_id"]] = self.current
        elif msg.t == "PRUNE":
            self.by_prune[(msg["device_id"], msg["dataset"], msg["snapshot"])] = self.current
        elif msg.t == "VERIFY" and msg.get("verify_id"):
            self.by_verify[msg["verify_id"]] = self.current

    def owner(self, transfer_id: str) -> str | None:
        return self.by_transfer.get(transfer_id, self.sides[0] if not self.several else None)

    def route(self, out: list) -> list:
        if not self.several:
            return out
        routed = []
        for effect in out:
            if type(effect) is not Send or effect.to != LOGICAL:
                routed.append(effect)
                continue
            msg = effect.message
            if msg.t in BROADCAST:
                routed.extend(Send((side, None), msg) for side in self.sides)
                continue
            side = None
            tid = msg.get("transfer_id")
            if tid:
                side = self.by_transfer.get(tid)
            elif msg.t == "PRUNED":
                side = self.by_prune.pop((msg["device_id"], msg["dataset"], msg["snapshot"]), None)
            elif msg.t == "VERIFIED":
                side = self.by_verify.pop(msg["verify_id"], None)
            routed.append(Send((side or self.current, None), msg))
        return routed

    def forget_except(self, live: set) -> None:
        """Drop the routes of transfers no longer open (called now and then, not per message)."""
        if self.several:
            self.by_transfer = {tid: side for tid, side in self.by_transfer.items() if tid in live}
