"""CurveZMQ: key files, server and client socket set-up, and the ZAP handler.

Keys use pyzmq's `zmq.auth` certificate format: `NAME.key` (public) and
`NAME.key_secret` (both). A server socket accepts only the public keys found
in its domain's directory; the authenticated peer's User-Id is the key file's
name (a device id, node id or operator name), so a role reads the identity
from the connection (`peer_identity(frame)`), never from what a message claims.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from bus import zap
from bus.keyring import KeyFileError, KeyScanner, ScanResult

__all__ = ["KeyFileError", "KeyPair", "Authenticator", "ZapHandler", "load_keypair", "load_public", "keys_in",
           "create_keypair", "make_server", "make_client", "peer_identity"]


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes


def load_keypair(path: str | os.PathLike) -> KeyPair:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot load key pair {path}: {exc}") from None
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key (use the .key_secret file)")
    return KeyPair(public, secret)


def load_public(path: str | os.PathLike) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot load public key {path}: {exc}") from None
    return public


def keys_in(directory: str | os.PathLike) -> dict[bytes, str]:
    """{public key (z85): name} for every NAME.key in a directory."""
    out = {}
    base = Path(directory)
    if not base.is_dir():
        raise KeyFileError(f"{directory} is not a directory of public keys")
    for path in sorted(base.glob("*.key")):
        out[load_public(path)] = path.stem  # z85 text, as zmq.auth stores it
    return out


def create_keypair(directory: str | os.PathLike, name: str) -> tuple[str, str]:
    Path(directory).mkdir(parents=True, exist_ok=True)
    for suffix in (".key", ".key_secret"):
        if (Path(directory) / f"{name}{suffix}").exists():
            raise KeyFileError(f"{Path(directory) / (name + suffix)} exists; refusing to overwrite a key")
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return public, secret


def make_server(sock: zmq.Socket, ours: KeyPair, domain: str) -> None:
    sock.curve_server = True
    sock.curve_publickey = ours.public
    sock.curve_secretkey = ours.secret
    sock.zap_domain = domain.encode()


def make_client(sock: zmq.Socket, ours: KeyPair, server_public: bytes) -> None:
    sock.curve_publickey = ours.public
    sock.curve_secretkey = ours.secret
    sock.curve_serverkey = server_public


class ZapHandler:
    """The process's one ZAP handler: a thread (an actor behind an inproc
    pipe, as pyzmq's zmq/auth/thread.py) answering libzmq's requests on
    `inproc://zeromq.zap.01` with `bus.zap.answer` and the current table.

    `install(table)` replaces the table by reference (never mutated, read
    once per request), so a reload never blocks a handshake. The socket is
    bound before `__init__` returns: no handshake can precede the handler.
    """

    ENDPOINT = "inproc://zeromq.zap.01"
    BURST = 256  # requests answered per wake-up before the pipe is looked at again

    def __init__(self, ctx: zmq.Context, table: dict):
        self.table = table
        # reason -> handshakes; every key present from the start, so reading it from another thread is safe
        self.counts: Counter = Counter(dict.fromkeys(("admitted", "key", "domain", "mechanism", "malformed",
                                                      "unsent"), 0))
        self._zap = ctx.socket(zmq.ROUTER)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(self.ENDPOINT)
        self._pipe = ctx.socket(zmq.PAIR)
        self._pipe.setsockopt(zmq.LINGER, 0)
        endpoint = f"inproc://speedsync-zap-pipe-{id(self):x}"
        self._pipe.bind(endpoint)
        their_pipe = ctx.socket(zmq.PAIR)
        their_pipe.setsockopt(zmq.LINGER, 0)
        their_pipe.connect(endpoint)
        self._thread = threading.Thread(target=self._run, args=(their_pipe,), name="zap", daemon=True)
        self._thread.start()

    def install(self, table: dict) -> None:
        self.table = table

    def statistics(self) -> dict:
        return dict(self.counts)

    def _run(self, pipe: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(pipe, zmq.POLLIN)
        poller.register(self._zap, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if pipe in events:
                    return  # TERMINATE is the only command
                for _ in range(self.BURST):
                    try:
                        frames = self._zap.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._answer(frames)
        finally:
            pipe.close()
            self._zap.close()

    def _answer(self, frames: list) -> None:
        try:
            split = frames.index(b"") + 1  # the routing envelope ends with an empty delimiter
        except ValueError:
            self.counts["malformed"] += 1
            return
        reply, reason = zap.answer(frames[split:], self.table)
        self.counts[reason] += 1
        try:
            self._zap.send_multipart(frames[:split] + reply, zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counts["unsent"] += 1

    def stop(self) -> None:
        self._pipe.send(b"TERMINATE")
        self._thread.join(timeout=5)
        self._pipe.close()


class Authenticator:
    """The broker's CURVE admission: its key directories (bus.keyring) and the ZAP handler.

    `scan()` may run on any one thread at a time (a pool thread: 10,000 key
    files must not stall the loop); `install(result)` swaps the handler's
    table. At start (`__init__`) a conflict or a missing directory is a
    KeyFileError: a key may not appear in two roles, a device's key must
    never pass for a storage node's. A malformed key file is refused alone,
    named in `skipped` (the broker logs each as a warning).
    """

    def __init__(self, ctx: zmq.Context, directories: dict[str, str]):
        self.scanner = KeyScanner(directories)
        first = self.scanner.scan(strict=True)
        self.keys = first.keys
        self.skipped = list(first.skipped)
        self.problems = set(first.problems)
        self.handler = ZapHandler(ctx, self.keys.zap)

    def scan(self) -> ScanResult:
        return self.scanner.scan()

    def install(self, result: ScanResult) -> None:
        self.keys = result.keys
        self.handler.install(result.keys.zap)

    def stop(self) -> None:
        self.handler.stop()


def peer_identity(frame) -> str | None:
    """The authenticated name of the peer that sent `frame` (None without CURVE)."""
    try:
        user = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, TypeError):
        return None
    return user or None
