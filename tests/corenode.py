"""The real StorageCore driven in a test: a FakeClock, every message through
the real codec, and pool work run when the test says so.

`CoreNode.deliver(msg)` feeds the core a message as the broker would; the
node's answers collect in `sent` (decoded). Submit effects wait in `store`
(any order, as a multi-threaded pool) and `image` (strictly in order, one
thread) until `run_store()`/`run_image()`/`settle()` run them and feed the
results back through `completed()`.
"""

from __future__ import annotations

import random
from collections import deque

from bus.clock import FakeClock
from bus.effects import Send, Submit
from roles.storenode.chunkstore import ChunkStore
from roles.storenode.core import StorageCore
from roles.storenode.manifests import ManifestStore
from roles.storenode.ownership import DeviceChunks
from schemas import decode, encode, make

BROKER = ("broker", None)


class CoreNode:
    def __init__(self, root, *, window: int = 1 << 30, seed: int | None = None, idle_s: float = 600.0,
                 gc_interval_s: float | None = None):
        self.clock = FakeClock()
        self.chunks = ChunkStore(root)
        self.manifests = ManifestStore(root)
        self.owners = DeviceChunks(root, committed_chunks=lambda d: (
            n for m in self.manifests.all_for_device(d) for n in m.chunks))
        self.core = StorageCore("node-a", window, self.chunks, self.manifests, self.owners,
                                heartbeat_interval_s=1.0, space=(1 << 40, 0), now=self.clock.now(), idle_s=idle_s,
                                gc_interval_s=gc_interval_s)
        self.rng = random.Random(seed) if seed is not None else None
        self.store: list = []
        self.image: deque = deque()
        self.sent: deque = deque()
        self.submitted = 0

    @property
    def now(self) -> float:
        return self.clock.now()

    def _take(self, effects) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                assert effect.to == BROKER
                self.sent.append(decode(encode(effect.message)))  # through the real codec
            elif isinstance(effect, Submit):
                self.submitted += 1
                (self.store if effect.pool == "store" else self.image).append(effect)
            else:
                raise AssertionError(f"unexpected effect {effect!r}")

    def deliver(self, msg) -> None:
        wire = decode(encode(msg))
        self._take(self.core.received(BROKER, wire, list(encode(msg)), self.now))

    def send(self, t: str, payload=(), **fields) -> None:
        self.deliver(make(t, payload=payload, **fields))

    def _run(self, effect: Submit) -> None:
        try:
            result, error = effect.fn(*effect.args), None
        except Exception as exc:  # as TaskPool: reported, never lost
            result, error = None, exc
        self._take(self.core.completed(effect.key, result, error, self.now))

    def run_store(self) -> bool:
        if not self.store:
            return False
        index = self.rng.randrange(len(self.store)) if self.rng else 0
        self._run(self.store.pop(index))
        return True

    def run_image(self) -> bool:
        if not self.image:
            return False
        self._run(self.image.popleft())
        return True

    def settle(self) -> None:
        """Run pool work until none is left."""
        while self.run_store() or self.run_image():
            pass

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self._take(self.core.on_time(self.now))

    def take_sent(self) -> list:
        out = list(self.sent)
        self.sent.clear()
        return out
