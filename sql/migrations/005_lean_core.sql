-- 005: the lean counting core (issue 8). The schema part only: the functions that decide
-- and release live in sql/functions/, re-applied with CREATE OR REPLACE by every
-- `sidecar migrate`, so that a diff of those files shows the rule that changed.
--
-- * One row per call. The counter slots a call holds are two parallel arrays on its row
--   (slot_legs[i] is the leg that holds slot_keys[i]), written once, with the call, instead
--   of one row per slot in a table of their own with a foreign key each.
-- * `slots` stays, as a view of those arrays for live calls (ringing, answered): usage,
--   reconciliation and operators' queries read it as before.
-- * The counter columns (accounts.*_active, channels.calls_active) stay the cache of those
--   slots, changed once per batch (one UPDATE per table) rather than once per call.

ALTER TABLE calls
    ADD COLUMN slot_legs integer[] NOT NULL DEFAULT '{}',
    ADD COLUMN slot_keys text[] NOT NULL DEFAULT '{}',
    ADD CONSTRAINT calls_slots_parallel CHECK (cardinality(slot_legs) = cardinality(slot_keys));

UPDATE calls c SET slot_legs = s.legs, slot_keys = s.keys
FROM (SELECT call_id, from_tag,
             array_agg(leg ORDER BY leg, counter) AS legs,
             array_agg(counter ORDER BY leg, counter) AS keys
      FROM slots GROUP BY call_id, from_tag) s
WHERE c.call_id = s.call_id AND c.from_tag = s.from_tag;

DROP TABLE slots;

-- Every slot every live call holds (what the counters count).
CREATE VIEW slots AS
    SELECT c.call_id, c.from_tag, s.leg, s.counter
    FROM calls c, unnest(c.slot_legs, c.slot_keys) AS s(leg, counter)
    WHERE c.state IN ('ringing', 'answered');

-- A leg of a call as the configuration lists it, before the counters decide it
-- (see sql/functions/admission.sql).
CREATE TYPE planned_leg AS (
    call_no   integer,   -- the call's place in its batch
    leg       integer,   -- 0: origin -> dialled; then one per forward target, ring_self last
    to_ext    text,      -- the extension rung, or NULL for an external number
    number    text,      -- the external number dialled, or NULL
    class     text,      -- 'internal' (extension to extension) or 'public'
    keys      text[],    -- account counters the leg needs, origin side first, nearest first
    chans     text[],    -- channels it may use, in the order they are tried
    rings     boolean,   -- rung (leg 0 of a destination that forwards is not)
    contact   text,      -- the extension's static contact, if any
    origin_accounts text[]   -- the caller's account chain (refusals name their side)
);

-- The functions files applied, by content: `sidecar migrate` re-applies a file only when it
-- changed.
CREATE TABLE schema_functions (
    name       text PRIMARY KEY,
    sha256     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
