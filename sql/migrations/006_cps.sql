-- 006: calls-per-second limits, beside the concurrent ones (issue 10).
--
-- An account or a channel may limit how many new calls per second it takes: a token bucket
-- of cps_burst tokens (NULL: one second's worth, cps_limit) refilled at cps_limit tokens per
-- second. Every call admitted takes one token from each account and channel it touches
-- (once per call, in both counting modes: a rate counts call attempts, not legs); a call
-- that finds a bucket empty is refused like a full counter (`account:<id>:cps`,
-- `channel:<id>:cps`). The bucket's state (cps_tokens at cps_at) is kept in the row, so it is
-- exact across every sidecar, and changed once per batch, only for rows with a limit.

ALTER TABLE accounts
    ADD COLUMN cps_limit  integer CHECK (cps_limit >= 0),
    ADD COLUMN cps_burst  integer CHECK (cps_burst >= 1),
    ADD COLUMN cps_tokens double precision,
    ADD COLUMN cps_at     timestamptz;
ALTER TABLE channels
    ADD COLUMN cps_limit  integer CHECK (cps_limit >= 0),
    ADD COLUMN cps_burst  integer CHECK (cps_burst >= 1),
    ADD COLUMN cps_tokens double precision,
    ADD COLUMN cps_at     timestamptz;

-- A change of these limits is a change of the configuration (listeners are told).
DROP TRIGGER accounts_changed ON accounts;
CREATE TRIGGER accounts_changed
    AFTER INSERT OR DELETE OR UPDATE OF id, name, parent, calls_limit, public_limit,
        internal_limit, cps_limit, cps_burst
    ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION config_changed();
DROP TRIGGER channels_changed ON channels;
CREATE TRIGGER channels_changed
    AFTER INSERT OR DELETE OR UPDATE OF id, name, calls_limit, sources, gateway, prefixes,
        priority, cps_limit, cps_burst
    ON channels
    FOR EACH STATEMENT EXECUTE FUNCTION config_changed();

-- counters_room() (sql/functions/20_admission.sql) now also returns the buckets: dropped here,
-- created again by the functions files that `sidecar migrate` applies next.
DROP FUNCTION IF EXISTS counters_room(text[]);
