"""What every role process shares: stop signals and the clock at the edge."""

from __future__ import annotations

import signal
import time

from loguru import logger

from bus import security


class StopFlag:
    """Set by SIGTERM/SIGINT; the poll loop checks it between polls."""

    def __init__(self):
        self.stopping = False
        self.reload_requested = False

    def install(self) -> "StopFlag":
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        if hasattr(signal, "SIGHUP"):
            signal.signal(signal.SIGHUP, self._reload)
        return self

    def _stop(self, *_):
        self.stopping = True

    def _reload(self, *_):
        self.reload_requested = True


def now() -> float:
    return time.monotonic()


# The longest a poll may block, so that signals and deadlines are seen promptly.
MAX_POLL_MS = 200


def client_security(config):
    """The CURVE set-up for a DEALER of an agent or storage node (None if insecure)."""
    if config.insecure:
        logger.warning("insecure: true: plain TCP, the broker is not authenticated")
        return None
    ours = security.load_keypair(config.key_file)
    broker_public = security.load_public(config.broker_key)
    return lambda sock: security.make_client(sock, ours, broker_public)


def tune_malloc() -> None:
    """Chunk-sized buffers (about 1 MiB, allocated and freed thousands of times
    a second on several threads) go straight to mmap and back to the system
    when freed. glibc otherwise raises its mmap threshold after the first free
    and serves them from per-thread arenas, whose fragmentation shows up as
    resident memory that never comes back."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3
        libc.mallopt(m_mmap_threshold, 256 * 1024)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune
