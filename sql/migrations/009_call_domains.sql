-- 009: the single-column checks of calls as domains.
--
-- PostgreSQL reads a table's CHECK constraints back from their stored text
-- (stringToNode) and prepares them again in every INSERT or UPDATE statement on the table,
-- however few columns it sets: on calls, four checks for every answer and every release
-- (one statement each). Under callgrind that was 14 % of a backend's instructions per call
-- (bench/RESULTS.md). A domain's check is kept parsed by the backend, and is applied only
-- where a value is given to the column. The rules are the same; only the statements' cost
-- changes. calls_slots_parallel (two columns) stays a table check.
--
-- The type change rewrites calls (and its indexes) once, under its lock: on a platform with
-- a long retention of ended calls, run this migration at a quiet moment.
CREATE DOMAIN call_id_text AS text
    CONSTRAINT call_id_check CHECK (length(VALUE) BETWEEN 1 AND 2048);
CREATE DOMAIN from_tag_text AS text
    CONSTRAINT from_tag_check CHECK (length(VALUE) <= 512);
CREATE DOMAIN call_state AS text
    CONSTRAINT call_state_check CHECK (VALUE IN ('ringing', 'answered', 'refused', 'released'));

DROP VIEW slots;
ALTER TABLE calls
    DROP CONSTRAINT calls_call_id_check,
    DROP CONSTRAINT calls_from_tag_check,
    DROP CONSTRAINT calls_state_check,
    ALTER COLUMN call_id TYPE call_id_text,
    ALTER COLUMN from_tag TYPE from_tag_text,
    ALTER COLUMN state TYPE call_state;

-- Every slot every live call holds (what the counters count), as 005 made it.
CREATE VIEW slots AS
    SELECT c.call_id, c.from_tag, s.leg, s.counter
    FROM calls c, unnest(c.slot_legs, c.slot_keys) AS s(leg, counter)
    WHERE c.state IN ('ringing', 'answered');

-- judge_node_calls() (003) returns the calls' keys as text: the domains' values are given as
-- their base type (RETURN QUERY wants the declared types exactly).
CREATE OR REPLACE FUNCTION judge_node_calls(
    p_node      text,
    p_boot      text,
    p_call_ids  text[],
    p_from_tags text[],
    p_states    integer[],
    p_grace     interval
) RETURNS TABLE (id text, tag text, verdict text)
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_custom_plan
SET enable_nestloop = off
AS $$
BEGIN
    RETURN QUERY
    -- A call recorded without a boot id (no heartbeat support) is never judged by it.
    SELECT c.call_id::text, c.from_tag::text, 'gone' FROM calls c
    WHERE c.node = p_node AND c.state IN ('ringing', 'answered')
      AND c.boot IS NOT NULL AND c.boot <> p_boot
    UNION
    SELECT c.call_id::text, c.from_tag::text, 'gone' FROM calls c
    WHERE p_call_ids IS NOT NULL
      AND c.node = p_node AND c.state IN ('ringing', 'answered')
      AND c.created_at < now() - p_grace
      AND NOT EXISTS (
          SELECT 1 FROM unnest(p_call_ids, p_from_tags, p_states) AS d(call_id, from_tag, state)
          WHERE d.call_id = c.call_id AND (d.from_tag IS NULL OR d.from_tag = c.from_tag)
            AND d.state IS DISTINCT FROM 5)
    UNION
    SELECT c.call_id::text, c.from_tag::text, 'confirmed' FROM calls c
    WHERE c.node = p_node AND c.state = 'ringing'
      AND EXISTS (
          SELECT 1 FROM unnest(p_call_ids, p_from_tags, p_states) AS d(call_id, from_tag, state)
          WHERE d.call_id = c.call_id AND (d.from_tag IS NULL OR d.from_tag = c.from_tag)
            AND d.state IN (3, 4));
END $$;
