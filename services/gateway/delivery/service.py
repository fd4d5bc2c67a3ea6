"""Results delivery: a durable outbox and one sender thread per destination.

``DeliveryService.accept(group)`` is the worker's sink for completed groups. It picks the route
(routing.py), builds the DICOM results from the group's sources (an SR per classification result,
a SEG per segmentation map; dicom_results.py), de-identifies when the route says so, writes the
objects as fsynced files and then, in one transaction, one outbox row per (group key,
destination). Only then does it return: a group the sink accepted is never lost, and accepting
the same group again (the worker retries after a crash) adds nothing, the rows being unique on
(group key, destination).

Per destination a sender thread takes the due rows oldest first and sends their files (C-STORE
or STOW-RS, destinations.py). A row is ``pending`` -> ``delivered``, or ``dead`` (dead-letter:
reason, attempts and files kept) when the destination refuses it for good or keeps failing past
the destination's retry limits; in between, failed attempts wait with capped exponential
backoff (an HTTP Retry-After is honoured up to the cap). Files the destination already
confirmed are not sent again. When every row of a group is delivered, its jobs are marked
delivered in the job table. A restart resumes pending rows where they were.

The outbox table itself (rows, states, transactions) is ``outbox.py``.

The return path (``take_returning``, called by intake before an instance is checked for the
model): an instance that arrives on a ``reidentify`` route and is about a study a
``deidentify`` route sent out (the reverse map knows its study or its references; see
``security/deid.py``) is re-identified and durably queued for that route's destinations as a
group of its own (key: a hash of its SOP Instance UID, so a resend adds nothing), without
inference; only then may the edge acknowledge it. The reverse map is pruned to the routes file's
retention at start and hourly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from optimizer.contract.manifest import Manifest
from services.gateway.delivery.destinations import Sender, make_sender
from services.gateway.delivery.dicom_results import (
    DEFAULT_DEVICE,
    ResultDevice,
    build_seg,
    build_sr,
)
from services.gateway.delivery.outbox import (
    DEAD,
    DELIVERED,
    PENDING,
    RETRY,
    MarkDelivered,
    NewRow,
    Outbox,
    OutboxRow,
)
from services.gateway.delivery.routing import Route, RoutesConfig
from services.gateway.errors import (
    DeliveryFailed,
    DeliveryRejected,
    GatewayError,
    Unavailable,
    UnsupportedInstance,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.processing.grouping import CompletedGroup
from services.gateway.security.deid import AmbiguousReturn, Deidentifier, DeidOptions, UidMap
from services.gateway.store.durable import WAL, fsync_dir
from services.gateway.store.spool import write_durably

LOG = logging.getLogger(__name__)
PRUNE_EVERY_S = 3600.0


def write_part10(ds: Dataset, path: Path) -> None:
    """A result object as a Part-10 file, through the store's one durable write (fsynced
    temporary, renamed into place, directory fsynced): a crash never leaves half a file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    write_durably(path, buffer.getbuffer())


class DeliveryService:
    """The worker's ``GroupSink`` and the sender threads; ``start()`` / ``stop()``."""

    def __init__(self, routes: RoutesConfig, spool_root: Path, manifest: Manifest,
                 metrics: GatewayMetrics, mark_delivered: MarkDelivered | None = None,
                 senders: Mapping[str, Sender] | None = None,
                 device: ResultDevice = DEFAULT_DEVICE,
                 clock: Callable[[], float] = time.time, poll_s: float = 1.0,
                 manifests: Mapping[str, Manifest] | None = None,
                 journal: str = WAL) -> None:
        """``senders`` replaces the real clients per destination name (tests). ``manifest``
        is the default model's; ``manifests`` every served model's by name (a group names its
        model; its results are built and routed by that model's manifest). ``journal``:
        SHARED_VOLUME when replicas on several hosts share the spool (the outbox and the
        reverse UID map are SQLite files on it)."""
        self.routes = routes
        self.outbox = Outbox(spool_root, clock, journal)
        self._manifest = manifest
        self._manifests = dict(manifests or {manifest.name: manifest})
        self._metrics = metrics
        self._mark = mark_delivered
        self._device = device
        self._clock = clock
        self._poll_s = poll_s
        given = dict(senders or {})
        self._senders: dict[str, Sender] = {
            name: given[name] if name in given else make_sender(dest)
            for name, dest in routes.destinations.items()}
        self._uids = (UidMap(spool_root / "deid_uids.sqlite3", routes.deid_secret, clock,
                             journal)
                      if routes.deid_secret is not None else None)
        self._pruned_at = 0.0
        self._prune_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = {name: threading.Event() for name in routes.destinations}
        self._threads = [threading.Thread(target=self._run, args=(name,), daemon=True,
                                          name=f"deliver-{name}")
                         for name in routes.destinations]
        for name in routes.destinations:
            metrics.outbox_depth.labels(name).set_function(
                partial(self.outbox.count, PENDING, name))
            metrics.dead_letters.labels(name).set_function(
                partial(self.outbox.count, DEAD, name))

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._prune_map()
        self._mark_finished_groups()
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Lets attempts in progress finish, waiting ``timeout_s`` in all. An attempt cut short
        leaves its row pending: it is sent again after the restart (at least once)."""
        self._stop.set()
        for event in self._wake.values():
            event.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self.outbox.close()
        if self._uids is not None:
            self._uids.close()

    @property
    def alive(self) -> bool:
        return all(t.is_alive() for t in self._threads)

    # -- the sink ----------------------------------------------------------------------------

    def accept(self, group: CompletedGroup) -> None:
        """Durably record the group's results for every destination of its route."""
        route = self.routes.route_for(group.protocols, group.calling_aets,
                                      group.model or self._manifest.name)
        if route is None:
            LOG.info("group %s matches no route and there is no default route: not delivered",
                     group.key)
            return
        todo = [d for d in route.destinations if d not in self.outbox.destinations_of(group.key)]
        if not todo:
            return  # accepted before (the worker offered it again after a restart)
        protocol = group.protocols[0] if group.protocols else "recovered"
        try:
            objects = self._build(group, route)
        except Exception as exc:  # this group's results can never be built: record why
            reason = exc.reason if isinstance(exc, GatewayError) else "build_failed"
            LOG.error("group %s: results could not be built (%s): dead-letter", group.key,
                      reason)
            self.outbox.add(group.key, route.name, protocol, group.job_names,
                            [NewRow(d, ()) for d in todo], dead_reason=(reason, str(exc)[:500]))
            for name in todo:
                self._metrics.deliveries.labels(name, "dead").inc()
            return
        if not objects:
            LOG.info("group %s: no result to deliver (every item failed)", group.key)
            return
        self._queue(group.key, route.name, protocol, group.job_names, objects, todo)
        LOG.info("group %s: %d result object(s) queued for %s (route %s%s)", group.key,
                 len(objects), ", ".join(todo), route.name,
                 ", de-identified" if route.deidentify else "")
        self._prune_map()

    def _queue(self, key: str, route: str, protocol: str, job_names: Sequence[str],
               objects: Sequence[Dataset], todo: Sequence[str]) -> None:
        """Files first (fsynced), then the rows in one transaction; then wake the senders."""
        rows = []
        for name in todo:
            folder = self.outbox.folder_for(key, name)
            folder.mkdir(exist_ok=True)
            files = []
            for k, ds in enumerate(objects):
                path = folder / f"{k:04d}.dcm"
                write_part10(ds, path)
                files.append(path)
            rows.append(NewRow(name, tuple(files)))
        fsync_dir(self.outbox.folder)
        self.outbox.add(key, route, protocol, job_names, rows)
        for name in todo:
            self._wake[name].set()

    # -- the return path ---------------------------------------------------------------------

    def take_returning(self, ds: Dataset, protocol: str, calling_aet: str | None) -> bool:
        """Intake's return-path hook. True: ``ds`` came back about a de-identified study, on a
        ``reidentify`` route, and its re-identified copy is now durably queued for the route's
        destinations (the edge may acknowledge). False: not a returning object here (no
        reidentify route for this caller, or the reverse map does not know it); intake
        handles it as any other instance. Raises ``UnsupportedInstance`` (about several
        patients' studies) or ``Unavailable`` (cannot queue it now)."""
        if self._uids is None:
            return False
        route = self.routes.route_for([protocol], [calling_aet] if calling_aet else [])
        if route is None or not route.reidentify:
            return False
        try:
            back = Deidentifier(self._uids).reidentify_returning(ds)
        except AmbiguousReturn as exc:
            raise UnsupportedInstance(str(exc), "return_ambiguous") from exc
        if back is None:
            return False
        sop = str(back.get("SOPInstanceUID", "") or "")
        key = "return-" + hashlib.sha256(f"return|{sop}".encode()).hexdigest()[:24]
        todo = [d for d in route.destinations if d not in self.outbox.destinations_of(key)]
        if todo:
            try:
                self._queue(key, route.name, protocol, (), [back], todo)
            except (OSError, ValueError) as exc:  # disk, or an object pydicom cannot write
                LOG.error("returning object %s could not be queued: %s", key,
                          type(exc).__name__)
                raise Unavailable("cannot queue the returning result", "spool_error") from exc
        LOG.info("returning object %s re-identified and queued for %s (route %s)", key,
                 ", ".join(route.destinations), route.name)
        return True

    def _prune_map(self) -> None:
        """Drop reverse-map studies past the retention; at most once per ``PRUNE_EVERY_S``."""
        if self._uids is None:
            return
        now = self._clock()
        with self._prune_lock:
            if now - self._pruned_at < PRUNE_EVERY_S:
                return
            self._pruned_at = now
        gone = self._uids.prune(self.routes.deid_retention_s)
        if gone:
            LOG.info("de-identification map: %d studies past the retention removed", gone)

    def _build(self, group: CompletedGroup, route: Route) -> list[Dataset]:
        originals: list[Dataset] = [pydicom.dcmread(p) for p in group.sources]
        sources = originals
        if route.deidentify:
            if self._uids is None:  # RoutesConfig validation rules this out
                raise GatewayError("de-identification without a secret", "deid_no_secret")
            deid = Deidentifier(self._uids, DeidOptions(retain_private=route.retain_private))
            sources = [deid.deidentify(ds) for ds in originals]
        manifest = self._manifests.get(group.model, self._manifest)
        task = manifest.task
        items = [(k, r) for k, r in enumerate(group.results) if "error" not in r]
        out = []
        for n, (k, result) in enumerate(items):
            version = result.get("model_version")
            if isinstance(version, int) and version != manifest.version:
                manifest = dataclasses.replace(manifest, version=version)  # a canary's result
            chosen = [sources[i] for i in self._select(result, originals, manifest)]
            if task == "classification":
                ds = build_sr(chosen, result.get("findings", []), manifest, self._device)
            else:
                index = k if len(group.maps) == len(group.results) else n
                maps = np.load(group.maps[index], allow_pickle=False)
                ds = build_seg(chosen, maps, manifest, self._device)
            if route.deidentify:
                for keyword in ("PatientIdentityRemoved", "DeidentificationMethod",
                                "DeidentificationMethodCodeSequence"):
                    setattr(ds, keyword, getattr(chosen[0], keyword))
            out.append(ds)
        return out

    def _select(self, result: Mapping[str, Any], originals: Sequence[Dataset],
                manifest: Manifest | None = None) -> list[int]:
        """The source instances a result is about: all of its series for a 3-D model, else
        the instance it names (else its series, else all of the group's)."""
        every = list(range(len(originals)))
        series = [i for i in every
                  if originals[i].get("SeriesInstanceUID") == result.get("series_instance_uid")]
        if (manifest or self._manifest).input.depth is not None:
            return series or every
        same = [i for i in every
                if originals[i].get("SOPInstanceUID") == result.get("sop_instance_uid")]
        return same or series or every

    # -- the senders -------------------------------------------------------------------------

    def _run(self, name: str) -> None:
        """Oldest due row first. After a transient failure the whole destination is held off
        (its own backoff on consecutive failures, reset by a success), so a destination that
        is down is probed at a growing interval instead of being tried row after row."""
        wake = self._wake[name]
        retry = self.routes.destinations[name].retry
        failures, hold_until = 0, 0.0
        while not self._stop.is_set():
            row: OutboxRow | None = None
            try:
                now = self._clock()
                if now < hold_until:
                    self._stop.wait(min(self._poll_s, hold_until - now))
                    continue
                row = self.outbox.claim(name, now)  # no other process sends it meanwhile
                if row is None:
                    when = self.outbox.next_at(name)
                    wait = self._poll_s if when is None else min(
                        self._poll_s, max(0.005, when - self._clock()))
                    wake.wait(wait)
                    wake.clear()
                    continue
                if self.attempt(row) == RETRY:
                    failures += 1
                    after = self.outbox.get(row.id)  # its next_at honours a Retry-After
                    hold_until = max(self._clock() + retry.delay(failures),
                                     after.next_at if after is not None else 0.0)
                else:
                    failures = 0
            except Exception:  # never end the thread: the row stays pending
                LOG.exception("delivery to %s: unexpected error", name)
                if row is not None:  # claimed: due again soon, not when the claim runs out
                    with contextlib.suppress(Exception):
                        self.outbox.release(row.id, self._clock() + self._poll_s)
                self._stop.wait(self._poll_s)

    def attempt(self, row: OutboxRow) -> str:
        """One delivery attempt of ``row``, its outcome recorded and returned: ``delivered``,
        ``retry`` or ``dead`` (public for tests)."""
        name = row.destination
        retry = self.routes.destinations[name].retry
        folder = self.outbox.folder / row.folder
        files = [folder / f for f in row.files if f not in row.stored]
        attempts = row.attempts + 1
        try:
            self._senders[name].send(files, lambda p: self.outbox.mark_stored(row.id, p.name))
        except DeliveryRejected as exc:
            self.outbox.dead(row.id, attempts, exc.reason, str(exc)[:500])
            self._metrics.deliveries.labels(name, "dead").inc()
            LOG.error("delivery of group %s to %s refused (%s): dead-letter", row.group_key,
                      name, exc.reason)
            return DEAD
        except (DeliveryFailed, OSError) as exc:
            reason = getattr(exc, "reason", "io_error")
            age = self._clock() - row.created_at
            if retry.exhausted(attempts, age):
                self.outbox.dead(row.id, attempts, reason,
                                 f"gave up after {attempts} attempt(s) in {age:.0f} s: {exc}"
                                 [:500])
                self._metrics.deliveries.labels(name, "dead").inc()
                LOG.error("delivery of group %s to %s keeps failing (%s, %d attempts): "
                          "dead-letter", row.group_key, name, reason, attempts)
                return DEAD
            delay = retry.delay(attempts)
            hint = getattr(exc, "retry_after_s", None)
            if isinstance(hint, float) and hint > delay:
                delay = min(hint, retry.cap_s)
            self.outbox.retry(row.id, attempts, self._clock() + delay, reason, str(exc)[:500])
            self._metrics.deliveries.labels(name, "retry").inc()
            LOG.warning("delivery of group %s to %s failed (%s), attempt %d; next in %.1f s",
                        row.group_key, name, reason, attempts, delay)
            return RETRY
        group_done = self.outbox.delivered(row.id, attempts)
        self._metrics.deliveries.labels(name, "delivered").inc()
        self._metrics.stage_seconds.labels(self._manifest.name, row.protocol, "deliver").observe(
            max(0.0, self._clock() - row.created_at))
        LOG.info("group %s delivered to %s (%d file(s), attempt %d)", row.group_key, name,
                 len(row.files), attempts)
        if group_done:
            self._mark_finished_groups()
        return DELIVERED

    def _mark_finished_groups(self) -> None:
        if self._mark is None:
            return
        for key, jobs in self.outbox.unmarked_groups():
            try:
                self._mark(jobs)
            except Exception:  # the job table is closing; done again at the next start
                LOG.exception("group %s: marking jobs delivered failed", key)
                continue
            self.outbox.set_marked(key)

