-- 008: ended calls kept for a retention of their own (SIDECAR_ENDED_RETENTION), apart from
-- refusals. A refusal goes at its expires_at (a retransmission until then gets the same
-- answer; an attempt after it is decided afresh); an ended call's row (a tombstone: its
-- origin, destination, times, node) may be kept longer as a record, and refuses a late
-- admission of the same call all along. purge_calls() is now in sql/functions/30_events.sql,
-- with one index per kind of row, so that neither purge walks over the other's rows.
DROP FUNCTION purge_calls(integer);
DROP INDEX calls_dead_expires;
CREATE INDEX calls_refused_expires ON calls (expires_at) WHERE state = 'refused';
CREATE INDEX calls_released_expires ON calls (expires_at) WHERE state = 'released';
