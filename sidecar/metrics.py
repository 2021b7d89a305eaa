"""Prometheus metrics, one registry per application (several apps may share a process)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# No `*_created` series: a timestamp per counter doubles the series for nothing a dashboard
# uses (process-wide in prometheus_client).
disable_created_metrics()


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    # (metric name, label values) -> the labelled child, for the counters every call
    # touches: prometheus_client's labels() takes a lock and builds its key on each call.
    _children: dict[tuple[str, tuple[Any, ...]], Any] = field(default_factory=dict, repr=False)

    def child(self, metric: Any, *values: Any) -> Any:
        """metric.labels(*values), looked up once."""
        key = (metric._name, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def __post_init__(self) -> None:
        r = self.registry
        # outcome: relay | reject | challenge; reason: admitted | limit_origin |
        # limit_destination | forbidden | not_found | repeat | shadow_refusal
        self.decisions = Counter(
            "sidecar_decisions", "Admission decisions", ["outcome", "reason"], registry=r
        )
        self.decision_seconds = Histogram(
            "sidecar_decision_seconds",
            "Time to decide one INVITE, PostgreSQL round trip included",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.answers = Counter("sidecar_answers", "2xx reported by Kamailio", registry=r)
        # queue: admissions | events (answers and releases). One observation per batch.
        self.batch_size = Histogram(
            "sidecar_batch_size",
            "Control requests decided in one transaction (group commit)",
            ["queue"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.shed = Counter(
            "sidecar_shed_admissions",
            "Admissions refused at once (503) because they could not be decided in time",
            registry=r,
        )
        self.releases = Counter("sidecar_releases", "Calls released", ["reason"], registry=r)
        self.expired = Counter(
            "sidecar_expired_calls",
            "Calls released by expiry or reconciliation",
            ["cause"],
            registry=r,
        )
        # operation: the route's pattern, or "janitor".
        self.db_errors = Counter(
            "sidecar_db_errors", "Requests that failed on PostgreSQL", ["operation"], registry=r
        )
        self.active_calls = Gauge(
            "sidecar_active_calls", "Calls holding slots, by state", ["state"], registry=r
        )
        self.pool_size = Gauge("sidecar_db_pool_size", "Connections in the pool", registry=r)
        self.pool_idle = Gauge("sidecar_db_pool_idle", "Idle connections in the pool", registry=r)
        self.pool_in_use = Gauge(
            "sidecar_db_pool_in_use", "Connections of the pool serving a request", registry=r
        )
        self.pool_max = Gauge("sidecar_db_pool_max", "Largest size of the pool", registry=r)
        self.db_up = Gauge(
            "sidecar_db_up",
            "1 when PostgreSQL answered the last scrape's query, else 0",
            registry=r,
        )
        # Per account and channel, computed at scrape time from the counters (busiest first,
        # at most SIDECAR_METRICS_MAX_SERIES accounts and as many channels). counter: calls |
        # public | internal. A limit series exists only where a limit is set.
        self.account_active = Gauge(
            "sidecar_account_active_calls", "Calls an account holds, by counter",
            ["account", "counter"], registry=r,
        )
        self.account_limit = Gauge(
            "sidecar_account_limit", "An account's limit, by counter", ["account", "counter"],
            registry=r,
        )
        self.channel_active = Gauge(
            "sidecar_channel_active_calls", "Calls a channel carries", ["channel"], registry=r
        )
        self.channel_limit = Gauge(
            "sidecar_channel_limit", "A channel's calls limit", ["channel"], registry=r
        )
        # counter: the counter that refused (account:<id>:<counter> or channel:<id>:calls).
        self.limit_refusals = Counter(
            "sidecar_limit_refusals", "Calls refused for a limit, by the counter that refused",
            ["counter"], registry=r,
        )
        # route: the route's pattern (/v1/calls/{call_id}), never the raw path.
        self.requests = Counter(
            "sidecar_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=r,
        )
