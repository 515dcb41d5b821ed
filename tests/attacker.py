"""An attacker holding an enrolled device key (issue 11, "what it must show" item 2), shared by
tests/test_e2e_attack.py and bench/attack.py.

It speaks the protocol by hand, under CURVE with its own key, on two connections: `main` says
HELLO and sends every attack; `idle` opens a restore and never reads a byte of it (it only sends
HEARTBEATs, so the broker keeps seeing it alive). The attacks:

- `headers()`: an oversized header, a header of a million nils, a header nested 100,000 deep;
- `offer_flood()`: OFFERs past `device_uploads_max`, and one image of a PiB;
- `amplify()`: an OFFER of 4,096 chunks of 16 MiB (64 GiB, or what the node has free), QUERYs of
  every slice as 4,096 nil names (each makes the node hash 64 GiB of zeros), then a COMMIT with
  a wrong blake3 (its answer comes only once all those zeros are hashed);
- `query_flood()`: QUERY slices past the device's `query_rate`;
- `restore_unread()`: a restore on `idle`, never read.

Single threaded: `pump()` reads `main` (keeping every reply in `replies`, ERROR codes counted in
`codes`) and keeps heartbeats going on both connections. Call it while waiting for anything.
"""

from __future__ import annotations

import time
from collections import Counter

import msgpack

from bus.security import load_keypair, load_public
from schemas import decode
from schemas.messages import MAX_CHUNK_SIZE, MAX_HASHES_PER_QUERY
from tests.harness import RawClient

BEAT_S = 0.1  # well inside the harness's heartbeat_interval_ms * liveness (200 ms * 10)
NO_TRANSFER = "t-0000000000000000"
DECODE_CODES = {"too_large", "bad_header"}  # what an oversized or too deeply nested header may get


def curve(cluster, key_name: str):
    return load_keypair(cluster.keys / f"{key_name}.key_secret"), load_public(cluster.keys / "broker.key")


def packed(fields) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


class Attacker:
    def __init__(self, ctx, cluster, device: str = "mallory"):
        self.cluster, self.device = cluster, device
        self._ctx = ctx
        self.main = RawClient(ctx, cluster.frontend, curve=curve(cluster, device))
        self.idle: RawClient | None = None
        self.replies: list = []  # every message `main` received other than HEARTBEAT
        self.codes: Counter = Counter()  # ERROR codes `main` and `idle` were answered with
        self.idle_replies: list = []
        self._req = 0
        self._beat_at = 0.0
        self._seen = 0  # replies already matched by `wait`

    # --- the connection -------------------------------------------------------------------

    def pump(self, timeout_s: float = 0.0) -> None:
        """Read what `main` has (waiting up to timeout_s for the first), and beat on both."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            if now >= self._beat_at:
                self._beat_at = now + BEAT_S
                self.main.send("HEARTBEAT")
                if self.idle is not None:
                    self.idle.send("HEARTBEAT")  # alive, never reading
            wait_ms = max(0, int((min(deadline, self._beat_at) - now) * 1000))
            if not self.main.sock.poll(wait_ms):
                if time.monotonic() >= deadline:
                    return
                continue
            msg = decode(self.main.sock.recv_multipart())
            if msg.t == "HEARTBEAT":
                continue
            self.replies.append(msg)
            if msg.t == "ERROR":
                self.codes[msg["code"]] += 1
            deadline = now  # drain what is there, then return

    def wait(self, match, timeout_s: float = 20.0, what: str = "a reply"):
        """The first reply not yet matched for which match(msg) is true."""
        deadline = time.monotonic() + timeout_s
        while True:
            for i in range(self._seen, len(self.replies)):
                if match(self.replies[i]):
                    msg = self.replies.pop(i)
                    self.replies.insert(self._seen, msg)
                    self._seen += 1
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.device}: no {what} within {timeout_s}s; got "
                                     f"{[(m.t, m.get('code')) for m in self.replies[self._seen:]]}")
            self.pump(min(left, 0.2))

    def answer_to(self, req: int, timeout_s: float = 20.0):
        return self.wait(lambda m: m.get("req") == req, timeout_s, f"answer to request {req}")

    def hello(self) -> None:
        self.main.send("HELLO", device_id=self.device)
        self.wait(lambda m: m.t == "WELCOME", what="WELCOME")

    def next_req(self) -> int:
        self._req += 1
        return self._req

    # --- the attacks ----------------------------------------------------------------------

    def headers(self, rounds: int = 1) -> Counter:
        """Headers past every limit; returns the ERROR codes they got."""
        hostile = [
            [packed({"v": 1, "t": "HELLO", "device_id": self.device, "pad": b"\0" * (1 << 20)})],
            [packed({"v": 1, "t": "HEARTBEAT", "x": [None] * 1_000_000})],
            [b"\x91" * 100_000 + b"\xc0"],  # an array in an array... 100,000 deep
            [packed({"v": 1, "t": "OFFER", **{f"k{i}": i for i in range(50_000)}})],
        ]
        before = Counter(self.codes)
        for _ in range(rounds):
            for frames in hostile:
                self.main.send_frames(frames)
        answered = len(hostile) * rounds
        self.wait_codes(before, answered)
        return self.codes - before

    def wait_codes(self, before: Counter, n: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while sum((self.codes - before).values()) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.device}: {n} errors expected, got {dict(self.codes - before)}")
            self.pump(0.1)

    def amplify(self, image_size: int | None = None, snapshot: str = "huge") -> tuple[str, int]:
        """OFFER an image of nil names and QUERY all of it; returns (transfer id, COMMIT's req-less id)."""
        chunks = MAX_HASHES_PER_QUERY
        image_size = image_size or chunks * MAX_CHUNK_SIZE
        count = -(-image_size // MAX_CHUNK_SIZE)
        req = self.next_req()
        self.main.send("OFFER", req=req, dataset="attack", snapshot=snapshot, image_size=image_size,
                       chunk_size=MAX_CHUNK_SIZE, chunk_count=count)
        accept = self.answer_to(req)
        assert accept.t == "ACCEPT", f"the amplifying OFFER was refused: {dict(accept.fields)}"
        tid = accept["transfer_id"]
        for start in range(0, count, MAX_HASHES_PER_QUERY):
            n = min(MAX_HASHES_PER_QUERY, count - start)
            self.main.send("QUERY", transfer_id=tid, start=start, hashes=[None] * n)
            self.wait(lambda m: m.t == "MISSING" and m["transfer_id"] == tid and m["start"] == start,
                      what=f"MISSING for slice {start}")
        self.main.send("COMMIT", transfer_id=tid, image_blake3=b"\0" * 32)  # wrong: refused once hashed
        return tid, count

    def commit_answered(self, tid: str) -> bool:
        """Whether the node has answered the COMMIT of `tid` (COMMITTED or ERROR ref COMMIT)."""
        self.pump()
        return any(m.get("transfer_id") == tid and (m.t == "COMMITTED" or m.get("ref") == "COMMIT")
                   for m in self.replies)

    def offer_flood(self, offers: int) -> Counter:
        """OFFERs of small images past the device's upload budget, and one of a PiB; the answers' kinds."""
        answers: Counter = Counter()
        req = self.next_req()
        self.main.send("OFFER", req=req, dataset="attack", snapshot="pib", image_size=2**50,
                       chunk_size=MAX_CHUNK_SIZE, chunk_count=2**50 // MAX_CHUNK_SIZE)
        reply = self.answer_to(req)
        answers[reply.get("code", reply.t)] += 1
        for i in range(offers):
            req = self.next_req()
            self.main.send("OFFER", req=req, dataset="flood", snapshot=f"f{self._req:06d}", image_size=65536,
                           chunk_size=65536, chunk_count=1)
            reply = self.answer_to(req)
            answers[reply.get("code", reply.t)] += 1
        return answers

    def query_flood(self, queries: int) -> Counter:
        """QUERY slices faster than query_rate (at a transfer that is not there: the rate is checked first)."""
        before = Counter(self.codes)
        for _ in range(queries):
            self.main.send("QUERY", transfer_id=NO_TRANSFER, start=0, hashes=[None])
        self.wait_codes(before, queries)
        return self.codes - before

    def restore_unread(self, dataset: str, snapshot: str) -> None:
        """RESTORE on the second connection, which then never reads (it only beats)."""
        self.idle = RawClient(self._ctx, self.cluster.frontend, curve=curve(self.cluster, self.device))
        self.idle.hello(self.device)
        self.idle.send("RESTORE", req=self.next_req(), dataset=dataset, snapshot=snapshot, window=2**34)

    def drain_idle(self, timeout_s: float = 2.0) -> list:
        """Read, at last, what the restore connection was sent; its ERROR codes are counted."""
        while (msg := self.idle.receive(timeout_s)) is not None:
            self.idle_replies.append(msg)
            if msg.t == "ERROR":
                self.codes[msg["code"]] += 1
        return self.idle_replies

    def abort(self, tid: str) -> None:
        self.main.send("ABORT", transfer_id=tid)

    def close(self) -> None:
        self.main.close()
        if self.idle is not None:
            self.idle.close()
