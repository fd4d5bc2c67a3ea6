"""Gateway metrics, defined once, on a registry owned by the gateway instance.

Labels are bounded: model, protocol, stage, outcome, reason, state. Never UIDs or patient data.

A pod of several gateway processes exposes the pod's figures on every process's ``/metrics``
(prometheus-client's multiprocess mode: the supervisor points ``PROMETHEUS_MULTIPROC_DIR`` at a
directory of the pod's run directory before any process starts, each process writes its
values there, and a scrape sums them; gauges say how, e.g. ``livesum``). Gauges read at scrape
time from shared state (the job table, the outbox) are ``FunctionGauge``s: they are computed by
the answering process, outside the multiprocess files, and are the pod's by construction. The
Triton breaker's is the answering process's own breaker (every process calls the same Triton).
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Clinical latencies: sub-millisecond stages up to multi-second totals under load.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGES = ("receive", "spool", "queue", "preprocess", "inference", "postprocess",
          "gateway_overhead", "total", "deliver")


class _Bound:
    def __init__(self, functions: dict[tuple[str, ...], Callable[[], float]],
                 values: tuple[str, ...]) -> None:
        self._functions, self._values = functions, values

    def set_function(self, f: Callable[[], float]) -> None:
        self._functions[self._values] = f


class FunctionGauge(Collector):
    """A gauge whose samples are functions called at scrape time (``labels(...).set_function``,
    as on prometheus-client's ``Gauge``), kept out of the multiprocess files."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 registry: CollectorRegistry) -> None:
        self._name, self._doc, self._labelnames = name, documentation, labelnames
        self._functions: dict[tuple[str, ...], Callable[[], float]] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def labels(self, *values: str) -> _Bound:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}")
        return _Bound(self._functions, tuple(str(v) for v in values))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self._name, self._doc, labels=self._labelnames)
        for values, f in list(self._functions.items()):
            family.add_metric(list(values), float(f()))
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self._name, self._doc, labels=self._labelnames)


class _LaneSum:
    """One gauge several models' workers each set to their own figure (spool depth, open
    groups): it holds the sum over the models, so that it is right in multiprocess mode too,
    where a gauge is the value last set (``set_function`` is not read there)."""

    def __init__(self, gauge: Gauge) -> None:
        self._gauge = gauge
        self._parts: dict[str, float] = {}
        self._lock = threading.Lock()

    def set_part(self, lane: str, value: float) -> None:
        with self._lock:
            self._parts[lane] = value
            self._gauge.set(sum(self._parts.values()))


class _LanePart:
    def __init__(self, total: _LaneSum, lane: str) -> None:
        self._total, self._lane = total, lane

    def set(self, value: float) -> None:
        self._total.set_part(self._lane, value)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """``registry``: where the metrics are exposed (a new one by default). In multiprocess
        mode (``PROMETHEUS_MULTIPROC_DIR`` set) it aggregates every process of the pod."""
        self.registry = registry or CollectorRegistry()
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        exposed = self.registry
        if self.multiprocess:
            MultiProcessCollector(self.registry)
            # this process's own values are in the pod's files; its registry stays private
            registry = CollectorRegistry()
        else:
            registry = self.registry
        self.stage_seconds = Histogram(
            "bedside_gateway_stage_seconds", "Time spent per pipeline stage",
            ["model", "protocol", "stage"], buckets=BUCKETS, registry=registry,
        )
        self.requests = Counter(
            "bedside_gateway_requests", "Instances and requests by protocol and outcome",
            ["protocol", "outcome", "reason"], registry=registry,
        )
        self.spool_depth = Gauge(
            "bedside_gateway_spool_depth", "Acknowledged instances waiting for inference",
            registry=registry, multiprocess_mode="livesum",
        )
        self.jobs = FunctionGauge(
            "bedside_gateway_jobs", "Acknowledged instances in the job table, by state "
            "(received, inferred, failed, skipped, delivered)", ("state",), exposed,
        )
        self.triton_breaker = FunctionGauge(
            "bedside_gateway_triton_breaker", "1 for the Triton circuit breaker's current state "
            "(closed, open, half_open), 0 for the others", ("state",), exposed,
        )
        # Results delivery (delivery/service.py): destination names come from the routes file
        # (validated, bounded); outcome is delivered, retry or dead.
        self.deliveries = Counter(
            "bedside_gateway_deliveries", "Result delivery attempts by destination and outcome "
            "(delivered, retry, dead)", ["destination", "outcome"], registry=registry,
        )
        self.outbox_depth = FunctionGauge(
            "bedside_gateway_outbox_depth", "Outbox rows waiting for delivery, by destination",
            ("destination",), exposed,
        )
        self.dead_letters = FunctionGauge(
            "bedside_gateway_dead_letters", "Outbox rows in the dead-letter state (refused for "
            "good or retries exhausted), by destination", ("destination",), exposed,
        )
        self.open_associations = Gauge(
            "bedside_gateway_open_associations", "Open DIMSE associations",
            registry=registry, multiprocess_mode="livesum",
        )
        # Grouping (processing/): level is instance, series or study; outcome is inferred (at
        # least one item inferred), failed (only errors) or skipped (nothing selected).
        self.groups_open = Gauge(
            "bedside_gateway_groups_open", "Series/study groups waiting for their inactivity "
            "timeout", registry=registry, multiprocess_mode="livesum",
        )
        self.groups_closed = Counter(
            "bedside_gateway_groups_closed", "Groups closed and handed on, by level and outcome "
            "(inferred, failed, skipped)", ["level", "outcome"], registry=registry,
        )
        self.group_sink_errors = Counter(
            "bedside_gateway_group_sink_errors", "Completed groups the sink refused (retried "
            "with backoff), by level", ["level"], registry=registry,
        )

        # Versions of one model (inference/versions.py, intake/models.py): baseline is the
        # primary version, candidate the shadow version; label is one of the manifest's labels
        # (bounded, no patient data). Agreement = agree="true" / all, per label.
        version_labels = ["model", "baseline", "candidate", "label"]
        self.version_decisions = Counter(
            "bedside_gateway_version_decisions", "Shadow-versus-primary decisions per label "
            "(agree true or false), classification models", [*version_labels, "agree"],
            registry=registry,
        )
        self.version_score_error = Histogram(
            "bedside_gateway_version_score_error", "Absolute score difference between the "
            "shadow and the primary version per label, classification models", version_labels,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=registry,
        )
        self.version_dice = Histogram(
            "bedside_gateway_version_dice", "Dice between the shadow's and the primary's masks "
            "per class, segmentation models", version_labels,
            buckets=(0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 1.0), registry=registry,
        )
        self.shadow_failures = Counter(
            "bedside_gateway_shadow_failures", "Shadow inferences that failed (never affecting "
            "the primary's answer), by reason", ["model", "candidate", "reason"],
            registry=registry,
        )
        self.accuracy_budget = Gauge(
            "bedside_gateway_model_accuracy_budget", "The manifest's accuracy budget, for the "
            "agreement alerts: kind min_agreement or max_dice_drop", ["model", "kind"],
            registry=registry, multiprocess_mode="livemax",
        )
        self.model_version = Gauge(
            "bedside_gateway_model_version", "1 for each version in use, by role (primary, "
            "shadow, canary)", ["model", "role", "version"], registry=registry,
            multiprocess_mode="livemax",
        )
        self.canary_share = Gauge(
            "bedside_gateway_canary_share", "Share of studies the canary version answers",
            ["model"], registry=registry, multiprocess_mode="livemax",
        )
        self._lane_sums: dict[str, _LaneSum] = {}

    def for_lane(self, lane: str) -> GatewayMetrics:
        """These metrics, as one model's worker sees them: its ``spool_depth`` and
        ``groups_open`` are its part of the gauges' sum over the served models."""
        view = copy.copy(self)
        for name in ("spool_depth", "groups_open"):
            total = self._lane_sums.setdefault(name, _LaneSum(getattr(self, name)))
            setattr(view, name, _LanePart(total, lane))
        return view

    def observe(self, model: str, protocol: str, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            if stage in STAGES:
                self.stage_seconds.labels(model, protocol, stage).observe(ms / 1000.0)
