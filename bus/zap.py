"""ZAP (RFC 27/ZAP) as a plain function: request frames and a key table in,
reply frames out. No sockets here; `bus.security.ZapHandler` is the thread
that moves frames between libzmq and `answer`.

Theory of operation. libzmq asks the handler about every CURVE handshake on
a server socket whose ZAP domain is set: "version 1.0, request id, domain,
address, identity, mechanism, credentials". The handler answers "version,
request id, status code, status text, user id, metadata". We admit only
CURVE, and only a public key listed for the socket's domain; the User-Id is
the key file's name, which a role reads from every message it receives
(`peer_identity`). Everything else (an unknown domain, an unknown key, another
mechanism, a malformed request) is refused with 400 (500 for a request we
cannot parse at all), so the peer never completes a handshake.

`keys` is `{domain: {public key: name}}`, keyed by the raw 32-byte key as
libzmq sends it. The table is never mutated: reloading builds a new one and
the handler's reference is replaced, so a handshake always sees one whole
table, old or new, and a reload never waits on a handshake (or the reverse).
"""

from __future__ import annotations

VERSION = b"1.0"
CURVE = b"CURVE"
REQUEST_FRAMES = 7  # version, request id, domain, address, identity, mechanism, one credential (CURVE: the key)
CURVE_KEY_BYTES = 32

OK, REFUSED, INTERNAL = b"200", b"400", b"500"


def reply(request_id: bytes, status: bytes, text: str, user_id: str = "") -> list[bytes]:
    return [VERSION, request_id, status, text.encode(), user_id.encode(), b""]


def answer(request: list[bytes], keys: dict) -> tuple[list[bytes], str]:
    """(reply frames, a short reason for counting) for one ZAP request.

    `request` is the request without its routing envelope. The reason is
    "admitted" or why the handshake was refused.
    """
    if len(request) < 2:
        return reply(b"", INTERNAL, "malformed request"), "malformed"
    request_id = request[1]
    if request[0] != VERSION:
        return reply(request_id, INTERNAL, "unsupported ZAP version"), "malformed"
    if len(request) < 6:
        return reply(request_id, INTERNAL, "malformed request"), "malformed"
    domain, mechanism = request[2], request[5]
    if mechanism != CURVE:
        return reply(request_id, REFUSED, "CURVE only"), "mechanism"
    if len(request) != REQUEST_FRAMES or len(request[6]) != CURVE_KEY_BYTES:
        return reply(request_id, INTERNAL, "malformed CURVE credentials"), "malformed"
    listed = keys.get(domain.decode("utf-8", "replace"))
    if listed is None:
        return reply(request_id, REFUSED, "unknown domain"), "domain"
    name = listed.get(request[6])
    if name is None:
        return reply(request_id, REFUSED, "key not listed"), "key"
    return reply(request_id, OK, "OK", name), "admitted"
