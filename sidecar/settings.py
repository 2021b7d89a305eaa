"""One settings object, read once from the environment. Every field says what it is for."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return default if raw in (None, "") else int(raw)  # type: ignore[arg-type]


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return default if raw in (None, "") else float(raw)  # type: ignore[arg-type]


def _nets(raw: str) -> tuple[_Net, ...]:
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in raw.split(",") if p.strip())


def _admin_token() -> str | None:
    token = os.environ.get("SIDECAR_ADMIN_TOKEN")
    path = os.environ.get("SIDECAR_ADMIN_TOKEN_FILE")
    if not token and path:
        token = Path(path).read_text().strip()
    return token or None


@dataclass(frozen=True)
class Settings:
    # PostgreSQL holding the configuration and the call records (libpq URL).
    database_url: str = field(
        default_factory=lambda: _env("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/sidecar")
    )
    # Where the HTTP API listens. Keep it on loopback or a private network.
    host: str = field(default_factory=lambda: _env("SIDECAR_HOST", "127.0.0.1"))
    port: int = field(default_factory=lambda: _int("SIDECAR_PORT", 8080))
    # Connections the listener queues before the sidecar accepts them (listen(2); the kernel
    # caps it at net.core.somaxconn). http_async_client opens connections in bursts; with
    # aiohttp's 128, a burst while the event loop was busy overflowed the queue, the kernel
    # dropped the connections' SYNs, and each retried a second later: admissions timed out
    # in Kamailio (fail-closed 503s) with the sidecar itself idle (bench/RESULTS.md).
    listen_backlog: int = field(default_factory=lambda: _int("SIDECAR_LISTEN_BACKLOG", 4096))
    # Bearer token for the admin API (/v1/config, /v1/usage, /v1/calls...); from the variable,
    # else from the file SIDECAR_ADMIN_TOKEN_FILE. Without one, the admin API answers 401.
    admin_token: str | None = field(default_factory=_admin_token)
    # Shared secret Kamailio may send as X-Control-Secret on the call-control API.
    control_secret: str | None = field(
        default_factory=lambda: os.environ.get("SIDECAR_CONTROL_SECRET") or None
    )
    # Source networks allowed on the call-control API without the secret (Kamailio nodes).
    control_sources: tuple[_Net, ...] = field(
        default_factory=lambda: _nets(_env("SIDECAR_CONTROL_SOURCES", "127.0.0.0/8,::1/128"))
    )
    # Digest realm: HA1 = md5(user:realm:password). Must match Kamailio's SIP_REALM.
    sip_realm: str = field(default_factory=lambda: _env("SIDECAR_SIP_REALM", "sidecar.local"))
    # Shadow mode: decide and count every call, but never refuse one (safe roll-out).
    shadow: bool = field(default_factory=lambda: _bool("SIDECAR_SHADOW", False))
    # SIP status for a call refused by the caller's own plan (a counter on the origin side).
    origin_refusal_code: int = field(
        default_factory=lambda: _int("SIDECAR_ORIGIN_REFUSAL_CODE", 403)
    )
    # SIP status for a call refused at the destination side or by a channel.
    destination_refusal_code: int = field(
        default_factory=lambda: _int("SIDECAR_DESTINATION_REFUSAL_CODE", 486)
    )
    # A call still ringing after this many seconds is released: the INVITE transaction's
    # lifetime (Kamailio's max_inv_lifetime, 180 s by default). Also how long a refusal is
    # remembered for retransmissions, and how long a released call's tombstone refuses an
    # admission of the same call that comes late (a retransmission, a CANCEL that overtook
    # the decision).
    ringing_ttl: int = field(default_factory=lambda: _int("SIDECAR_RINGING_TTL", 180))
    # Seconds an ended call's row is kept after its tombstone's time (SIDECAR_RINGING_TTL
    # after its release) before the janitor deletes it, in batches: a record of the call
    # (origin, destination, node, times) for that long. 0: deleted with the tombstone.
    # Refusals always go after SIDECAR_RINGING_TTL. Rows kept: about this many seconds
    # times the calls per second.
    ended_retention: int = field(default_factory=lambda: _int("SIDECAR_ENDED_RETENTION", 0))
    # An answered call is released after this many seconds whatever happens (lost BYE).
    max_call_duration: int = field(default_factory=lambda: _int("SIDECAR_MAX_CALL_DURATION", 14400))
    # A node's calls younger than this are never released by a dialog-list reconciliation
    # (the dialog may not be in the list yet).
    reconcile_grace: int = field(default_factory=lambda: _int("SIDECAR_RECONCILE_GRACE", 30))
    # How often (seconds) each replica releases expired calls.
    janitor_interval: float = field(
        default_factory=lambda: float(_env("SIDECAR_JANITOR_INTERVAL", "5"))
    )
    # Connection pool size per replica.
    db_pool_min: int = field(default_factory=lambda: _int("SIDECAR_DB_POOL_MIN", 2))
    db_pool_max: int = field(default_factory=lambda: _int("SIDECAR_DB_POOL_MAX", 16))
    # synchronous_commit for the sidecar's sessions. "on" (the default): an admitted call is
    # never lost by a database crash; group commit (batching.py) shares each WAL flush among
    # the requests of a batch. "off" is faster on a slow disk, but a crash may forget the last
    # few hundred ms of decisions (consistently: those calls end as unknown releases).
    db_synchronous_commit: str = field(
        default_factory=lambda: _env("SIDECAR_DB_SYNCHRONOUS_COMMIT", "on")
    )
    # Largest number of control requests decided in one transaction (group commit). Larger
    # batches share more commits, but each admission of a batch updates the hot counter rows
    # again, and the versions a transaction leaves cannot be pruned before it commits.
    # Measured: through Kamailio, 1,200 CPS without a failure with 50 (642 of 9,600 calls
    # failed with 16); the admission API alone at 64 in flight preferred 16 (579/s vs 480).
    batch_max: int = field(default_factory=lambda: _int("SIDECAR_BATCH_MAX", 50))
    # Milliseconds an idle sidecar waits after a control request arrives before it starts
    # the transaction, so that the requests right behind it share that transaction and its
    # commit (0: at once; while a transaction is in flight requests wait for it anyway). Only
    # when requests come densely (the one before came less than this earlier: a lone request
    # is decided at once), and only until a full batch waits. Each transaction costs
    # PostgreSQL a fixed part (counters locked, read and written, the commit) whatever its
    # size; a wait costs an admission up to this much latency. Measured (bench/RESULTS.md):
    # through Kamailio at 1,800-2,100 CPS, 2 ms -> 10 ms took PostgreSQL from 0.18-0.24 to
    # 0.15-0.19 ms per call; the sidecar alone at 64 in flight, 10 ms put the admission p99 at
    # 20-24 ms (the target is under 20), 5 ms at 17-18, 2 ms at 15-17.
    batch_linger_ms: float = field(default_factory=lambda: _float("SIDECAR_BATCH_LINGER_MS", 5.0))
    # Classify calls (origin, legs, counters, channels) in the sidecar, from a cache of the
    # configuration that follows every change (LISTEN sidecar_config, sidecar/classify.py),
    # leaving PostgreSQL only the counting. Exact either way: the transaction that counts a
    # call checks the cache's generation and classifies the call itself when the
    # configuration changed since (migration 012). Off: PostgreSQL classifies every call.
    config_cache: bool = field(default_factory=lambda: _bool("SIDECAR_CONFIG_CACHE", True))
    # Largest number of answers and releases applied in one transaction. They move the
    # counters once per batch and cost about 30 us of PostgreSQL each, and Kamailio's outbox
    # posts up to 200 of them at a time, one POST after the other: with 50, a POST took four
    # transactions in a row. Measured (bench_admission.py --levels 64 --events outbox):
    # 3,655-3,785 calls/s with 50, 4,316-4,446 with 250.
    events_batch_max: int = field(default_factory=lambda: _int("SIDECAR_EVENTS_BATCH_MAX", 250))
    # Milliseconds Kamailio waits for an admission when it does not say (X-Deadline-Ms): an
    # admission that cannot be decided within it is shed at once with a 503 (Kamailio's
    # failure policy then applies) instead of being decided after Kamailio gave up.
    admit_deadline_ms: int = field(default_factory=lambda: _int("SIDECAR_ADMIT_DEADLINE_MS", 300))
    # Seconds to wait for PostgreSQL on one statement before failing the request.
    db_timeout: float = field(default_factory=lambda: float(_env("SIDECAR_DB_TIMEOUT", "2")))
    # Allocations between two collections of Python's youngest generation in `serve`, after
    # the start-up objects are frozen out of the collector's sight (cli._tune_gc); 0 keeps
    # Python's own (700, nothing frozen).
    gc_threshold: int = field(default_factory=lambda: _int("SIDECAR_GC_THRESHOLD", 50000))
    # Seconds to wait for PostgreSQL on one statement of a configuration change (PUT
    # /v1/config, `sidecar import`). Taking its table locks may wait for a running
    # autovacuum to be cancelled (deadlock_timeout, 1 s by default) and a large document takes
    # seconds to stage: the call-control timeout above is too short for that.
    admin_db_timeout: float = field(
        default_factory=lambda: float(_env("SIDECAR_ADMIN_DB_TIMEOUT", "30"))
    )
    # Apply pending migrations when the server starts.
    migrate_on_start: bool = field(default_factory=lambda: _bool("SIDECAR_MIGRATE_ON_START", True))
    # Largest request body accepted, in bytes (413 above it).
    max_body_bytes: int = field(default_factory=lambda: _int("SIDECAR_MAX_BODY_BYTES", 1 << 20))
    # Seconds between SIGTERM and closing the listener, while /health already answers 503 so
    # balancers and Kamailio move away first (envoy-style drain).
    shutdown_drain: float = field(
        default_factory=lambda: float(_env("SIDECAR_SHUTDOWN_DRAIN", "2"))
    )
    # Most accounts (and channels) with series of their own on /metrics, busiest first.
    metrics_max_series: int = field(default_factory=lambda: _int("SIDECAR_METRICS_MAX_SERIES", 500))
    # Minutes of refusals per minute and counter kept for the operator's view (/ui/,
    # GET /v1/refusals); the janitor forgets older minutes.
    refusal_history: int = field(default_factory=lambda: _int("SIDECAR_REFUSAL_HISTORY", 1440))
    # A Kamailio node whose last heartbeat is older than this many seconds is shown as silent
    # (about three of its HEARTBEAT_INTERVAL, 10 s by default).
    node_silent_after: int = field(default_factory=lambda: _int("SIDECAR_NODE_SILENT_AFTER", 30))
    # Log level (DEBUG, INFO, WARNING...). Logs are JSON lines on stderr.
    log_level: str = field(default_factory=lambda: _env("SIDECAR_LOG_LEVEL", "INFO"))
