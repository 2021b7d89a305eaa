-- 007: what the operator's view reads besides the counters (issue 10): the Kamailio nodes as
-- their heartbeats last showed them, and the refusals for a limit per minute and counter.
-- Both are shared by every sidecar (a page served by one sidecar shows what all of them did).

-- One row per node, written by every heartbeat (POST /v1/control/heartbeat).
CREATE TABLE nodes (
    node       text PRIMARY KEY,
    boot       text NOT NULL,
    booted_at  timestamptz NOT NULL,   -- first heartbeat of this boot id
    seen_at    timestamptz NOT NULL,   -- last heartbeat
    dialogs    integer                 -- dialogs listed in the last heartbeat (NULL: no list)
);

-- Calls refused for a limit, counted by the admission batch that refused them (only batches
-- with a refusal write here, once per batch). A repeated answer to a retransmission is not a
-- new refusal. The janitor forgets minutes older than SIDECAR_REFUSAL_HISTORY.
CREATE TABLE refusal_minutes (
    minute    timestamptz NOT NULL,    -- date_trunc('minute', the batch's now())
    counter   text NOT NULL,           -- account:<id>:<counter>, channel:<id>:calls|cps
    refusals  integer NOT NULL CHECK (refusals > 0),
    PRIMARY KEY (minute, counter)
);
