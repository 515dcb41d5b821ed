"""The controller's catalog side: group commit of the rows COMMITTED brought,
and what a catalog that fails does to requests (cataloghealth.py says when
it is unavailable and when to try again).

A row is recorded before its agent is told COMMITTED, always: a batch that
fails for want of disk is held, whole, and tried again with back-off; its
uploads stay `recording` with the reason, and the agent keeps waiting (or
offers again after its reply timeout: the row is still recorded, and that
offer then finds the snapshot committed). Nothing acknowledged is lost, and
the broker serves everyone else meanwhile.

A mixin of `Controller` (core.py); it uses the controller's sending and lifecycle helpers.
"""

from __future__ import annotations

import uuid

from loguru import logger

from bus.effects import Submit
from bus.errors import RequestError
from roles.controller.catalog import unavailable_reason
from roles.controller.transfers import CATALOG, Transfer, advance
from schemas import error_message, make


class CatalogSide:
    # --- refusing while the catalog cannot serve ---------------------------------------------------

    def require_catalog_writable(self, session=None, msg=None) -> None:
        """Refuse an OFFER while the catalog cannot record; given the offer, it is parked with the
        reason (status lists it; bounded per device by device_parked_max)."""
        health = self.catalog_health
        if not health.available:
            exc = RequestError(f"the catalog cannot record snapshots now ({health.reason}); offer again later",
                               "catalog_unavailable")
            if session is not None:
                device, dataset = session.device_id, msg["dataset"]
                parked = Transfer(f"p-{uuid.uuid4().hex[:16]}", "upload", device, dataset, msg["snapshot"],
                                  self.placement.node_for(device, dataset) or "", session.routing, msg["req"],
                                  image_size=msg["image_size"], started_at=self.now)
                self.history.park(parked, f"{exc.code}: {exc.reason}", self.now)
            raise exc

    def catalog_refusal(self, error: BaseException, what: str) -> RequestError:
        """The answer to a catalog call that failed; a catalog that cannot serve is marked so."""
        if isinstance(error, RequestError):
            return error  # the catalog's own refusal (an offer of a snapshot being pruned)
        reason = unavailable_reason(error)
        if reason is None:
            logger.error("catalog failed ({}): {!r}", what, error)
            return RequestError("the catalog could not answer; try again", "internal")
        self.catalog_down(reason, what)
        return RequestError(f"the catalog cannot serve now ({reason}); try again later", "catalog_unavailable")

    def catalog_down(self, reason: str, what: str) -> None:
        health = self.catalog_health
        if health.available:
            logger.error("catalog unavailable ({}): {}; holding its writes and trying again", what, reason)
        health.failed(reason, self.now)

    def catalog_failed(self, t: Transfer, ref: str, error: BaseException) -> None:
        """An OFFER's check or a restore's lookup failed: that request ends, told why."""
        exc = self.catalog_refusal(error, f"{ref} {t.transfer_id}")
        if t.kind == "upload" and exc.code in ("catalog_unavailable", "pruned"):
            self.finish(t, "aborted", "refused", record=False)
            self.park_offer(t, f"{exc.code}: {exc.reason}")
        else:
            self.finish(t, "failed", f"{exc.code}: {exc.reason}")
        self.count_error(exc.code)
        self.to_agent(t, error_message(exc, ref=ref, req=t.req))

    # --- group commit, held while the catalog is unavailable ---------------------------------------

    def catalog_due(self) -> float | None:
        """When the catalog next has work from us: rows to hand it, or a probe to try."""
        if self.batch_in_flight or self.probe_in_flight:
            return None
        health = self.catalog_health
        if not self.rows_waiting and health.available:
            return None
        return self.now if health.may_try(self.now) else health.retry_at

    def flush_records(self) -> None:
        """Hand the catalog every row waiting, as one batch, unless a batch is
        already being written (they wait for it and go together next) or the
        catalog is unavailable and its next try is not due. With nothing to
        write while it is unavailable, a probe row finds out when it is back."""
        if self.batch_in_flight or self.probe_in_flight or not self.catalog_health.may_try(self.now):
            return
        if self.rows_waiting:
            self.batch_in_flight, self.rows_waiting = self.rows_waiting, {}
            self.out.append(Submit("catalog", ("records", tuple(self.batch_in_flight)), self.store.record_many,
                                   (list(self.batch_in_flight.values()),)))
        elif not self.catalog_health.available:
            self.probe_in_flight = True
            self.out.append(Submit("catalog", ("probe",), self.store.probe))

    def save_usage(self) -> None:
        """Hand the catalog the devices' stored bytes, when a save is due (quota.py)."""
        usage = self.quotas.due_save(self.now)
        if usage:
            self.out.append(Submit("catalog", ("usage",), self.store.save_usage, (usage,)))

    def usage_saved(self, error) -> None:
        if error is not None:
            logger.error("saving the devices' stored bytes failed (kept, saved again): {}", error)
        self.quotas.saved(error)

    def probed(self, error) -> None:
        self.probe_in_flight = False
        if error is None:
            self.catalog_up()
        else:
            self.catalog_down(unavailable_reason(error) or repr(error), "probe")
        self.flush_records()

    def catalog_up(self) -> None:
        failures = self.catalog_health.failures
        if self.catalog_health.succeeded():
            logger.info("catalog available again after {} failed tries", failures)

    def batch_recorded(self, tids: tuple, error, committed_at: float | None = None) -> None:
        batch, self.batch_in_flight = self.batch_in_flight, {}
        reason = unavailable_reason(error) if error is not None else None
        if reason is not None:
            # held whole, ahead of rows that came since; their agents are not told (nothing is durable)
            self.rows_waiting = {**batch, **self.rows_waiting}
            self.catalog_down(reason, f"recording {len(batch)} snapshots")
            for tid in batch:
                t = self.transfers.get(tid)
                if t is not None:
                    t.reason = f"catalog_unavailable: {reason} (held, trying again)"
            return
        if error is None:
            self.catalog_up()
        for tid, row in batch.items():
            self.recorded(tid, row, error, committed_at)
        self.flush_records()

    def recorded(self, tid: str, row: tuple, error, committed_at: float | None = None) -> None:
        frames = self.committed_frames.pop(tid, None)
        t = self.transfers.get(tid)
        live = t is not None and t.state == "recording"
        if error is not None:
            if live:
                self.catalog_failed(t, "COMMIT", error)
            return
        # the row is durable, even if its upload ended meanwhile (offered again while held): the
        # index follows the catalog
        device_id, dataset, _, node_id = row[:4]
        self.snapshots_committed += 1
        if committed_at is not None:
            self.last_commits.record(device_id, dataset, committed_at)
        self.placement.placed(device_id, dataset, node_id)
        self.index.committed(device_id, dataset, committed_at)
        if not live:
            return
        advance(t, CATALOG, "recorded")  # final: committed, assigned by finish
        t.bytes_done = t.image_size
        self.to_agent(t, frames=frames, name="COMMITTED")
        self.finish(t, "committed")
        logger.info("committed {}/{}/{} on {}", t.device_id, t.dataset, t.snapshot, t.node_id)

    # --- LIST ---------------------------------------------------------------------------------------

    def list_page(self, peer, device_id: str | None, msg) -> None:
        """One page of the catalog, read on the catalog thread (keyset: rows after `after`)."""
        after = msg.get("after")
        if after is not None and len(after) != 3:
            raise RequestError("after is (device_id, dataset, snapshot)", "bad_field")
        self.out.append(Submit("catalog", ("list", peer), self.store.list,
                               (device_id, msg.get("dataset"), tuple(after) if after else None,
                                self.config.list_page_size)))

    def listed(self, peer, page, error) -> None:
        session = self.registry.session(*peer) if peer[0] != "status" else None
        to = session if session is not None else peer
        if error is not None:
            self.reply_error(to, self.catalog_refusal(error, "LIST"), ref="LIST")
            return
        rows, next_key = page
        fields = {"next": list(next_key)} if next_key is not None else {}
        self.send(to, make("LIST_REPLY", snapshots=rows, **fields))
