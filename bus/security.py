"""CurveZMQ: key files, server and client socket set-up, and the ZAP authenticator.

Keys use pyzmq's `zmq.auth` certificate format: `NAME.key` (public) and
`NAME.key_secret` (both). A server socket accepts only the public keys found
in its domain's directory; the authenticated peer's User-Id is the key file's
name (a device id, node id or operator name), so a role reads the identity
from the connection (`peer_identity(frame)`), never from what a message claims.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85
from zmq.auth.thread import ThreadAuthenticator


class KeyFileError(Exception):
    """A key file or directory is missing or malformed (a configuration error)."""


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


class _NamedKeys(ThreadAuthenticator):
    """ZAP handler whose User-Id is the key file's name."""

    def __init__(self, ctx, names: dict[bytes, str]):
        super().__init__(ctx)
        self._names = names

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._names.get(z85.encode(client_public_key), "")


class Authenticator:
    """One ZAP thread for a process; each domain admits the keys of one directory.

    A key may not appear in two domains: a device's key must never pass for a
    storage node's.
    """

    def __init__(self, ctx: zmq.Context, domains: dict[str, str]):
        names: dict[bytes, str] = {}
        self.domains = {}
        for domain, directory in domains.items():
            keys = keys_in(directory)
            for key, name in keys.items():
                if key in names:
                    raise KeyFileError(f"key {directory}/{name}.key is also listed for another role")
                names[key] = name
            self.domains[domain] = (directory, keys)
        self._auth = _NamedKeys(ctx, names)
        self._auth.start()
        for domain, (directory, _keys) in self.domains.items():
            self._auth.configure_curve(domain=domain, location=directory)

    def stop(self) -> None:
        self._auth.stop()


def peer_identity(frame) -> str | None:
    """The authenticated name of the peer that sent `frame` (None without CURVE)."""
    try:
        user = frame.get("User-Id")
    except (zmq.ZMQError, AttributeError, TypeError):
        return None
    return user or None
