"""Per-device byte quotas on the broker (`quota` in broker.yaml; issue 11, fair shares and quotas).

Theory of operation. A device's **usage** is the payload bytes of the chunks
the cloud stored for it: every STORED adds the chunk's bytes as they
travelled and as the node keeps them on disk (compressed when the agent
compressed it). Only chunks new to the device travel, so an incremental
costs what it changed, a zero chunk or a chunk the device already holds
costs nothing, and 288 snapshots a day of one image do not add up to 288
images. A chunk another device also holds costs this device its bytes all
the same: a quota that did not would tell a device what others store, which
negotiation per device exists to hide. Uploads in progress count as their
chunks are stored, whether or not the snapshot ever commits (the chunks stay
on the node). Nothing is subtracted yet: nothing is deleted yet either
(retention and garbage collection will give bytes back when they land).

The rule an operator sees:
- an OFFER from a device whose usage is at or past its quota is refused with
  `quota_exceeded` (parked on the broker, nothing allocated);
- a STORED that takes a device's usage past its quota interrupts the device's
  uploads still sending (parked `quota_exceeded`, their node told ABORT); an
  upload that has sent everything and is committing goes on, since it adds
  nothing more. Usage can therefore end above the quota by what was already
  in flight when it was reached: at most each such upload's credit window.
  (Chunks that land after their upload ended, interrupted or aborted by its
  agent, are not charged: the broker has forgotten the transfer, and the
  node keeps them for the device only if it stored them before the ABORT.
  At most one window per upload that ends with chunks in flight; charging
  them needs the node to say which it kept.)

Which quota a device has is `roles/quotarules.py`'s (exact id, then the
longest pattern, else unlimited); it is looked up once per device and kept.

Usage lives in memory on the loop (O(1) per STORED and OFFER) and in the
catalog (`device_usage`, roles/controller/catalog.py), loaded at start. It
is saved off the loop at most once a second (`due_save`) with the devices
that changed, as absolute values (a save repeated after an error is
harmless), and once more as the broker stops; a `kill -9` loses at most the
last second of accounting (chunks stored then are not charged).
"""

from __future__ import annotations

from bus.errors import RequestError
from roles.quotarules import QuotaRules

SAVE_INTERVAL_S = 1.0


class DeviceQuotas:
    """Usage per device against its quota: the accounting, the checks and what to save."""

    def __init__(self, rules: QuotaRules, usage: dict | None = None):
        self.rules = rules
        self.usage: dict[str, int] = dict(usage or {})  # device -> bytes stored for it
        self._limits: dict[str, int | None] = {}  # bounded by the devices that offer or store
        self.dirty: set = set()  # devices whose usage changed since the last save was handed over
        self.saving: tuple = ()  # devices of the save the catalog is writing
        self.next_save_at = 0.0

    def limit(self, device_id: str) -> int | None:
        try:
            return self._limits[device_id]
        except KeyError:
            limit = self._limits[device_id] = self.rules.limit_for(device_id)
            return limit

    def admit_offer(self, device_id: str) -> None:
        """Raises quota_exceeded when the device's usage is at or past its quota."""
        limit = self.limit(device_id)
        if limit is not None and self.usage.get(device_id, 0) >= limit:
            raise self.exceeded(device_id)

    def stored(self, device_id: str, nbytes: int) -> bool:
        """A chunk of `nbytes` was stored for the device; True if its usage is now past its quota."""
        if nbytes:
            self.usage[device_id] = self.usage.get(device_id, 0) + nbytes
            self.dirty.add(device_id)
        return self.over(device_id)

    def over(self, device_id: str) -> bool:
        limit = self.limit(device_id)
        return limit is not None and self.usage.get(device_id, 0) > limit

    def exceeded(self, device_id: str) -> RequestError:
        usage, limit = self.usage.get(device_id, 0), self.limit(device_id)
        return RequestError(f"device {device_id} stores {usage} bytes, {'at' if usage == limit else 'past'} its "
                            f"quota of {limit}", "quota_exceeded")

    def figures(self, device_id: str) -> dict:
        """For status: `stored_bytes` and `quota_bytes` (None: unlimited)."""
        return {"stored_bytes": self.usage.get(device_id, 0), "quota_bytes": self.limit(device_id)}

    # --- saving to the catalog ------------------------------------------------------------

    def due_save(self, now: float) -> dict | None:
        """The usage to save now ({device: bytes}), or None: nothing changed, a save is being
        written, or the last was handed over less than SAVE_INTERVAL_S ago."""
        if not self.dirty or self.saving or now < self.next_save_at:
            return None
        self.saving, self.dirty = tuple(self.dirty), set()
        self.next_save_at = now + SAVE_INTERVAL_S
        return {d: self.usage[d] for d in self.saving}

    def saved(self, error) -> None:
        """The catalog wrote the save (or failed: its devices are saved again next time)."""
        if error is not None:
            self.dirty.update(self.saving)
        self.saving = ()

    def next_deadline(self) -> float | None:
        return self.next_save_at if self.dirty and not self.saving else None

    def unsaved(self) -> dict:
        """Everything not known to be saved, for the last save as the broker stops."""
        return {d: self.usage[d] for d in (*self.dirty, *self.saving)}
