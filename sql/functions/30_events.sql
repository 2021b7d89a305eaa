-- Answers and releases: what Kamailio's dialog module reports of a call's life.
--
--   answer_call()     a 2xx from a leg: the call is answered; the other ringing legs' slots
--                     go back (leg 0's stay: it carries the caller's counters)
--   release_call()    the call's end: every slot back, and a tombstone that refuses a late
--                     admission of the same call
--   control_events()  a batch of both in arrival order, the counters moved once
--   answer(), release(), release_locked(): the same, one call (or a list of calls) at a time,
--                     for the janitor, reconciliation, force-release and SQL users
--
-- answer_call() and release_call() change only the call's row and return the counter keys
-- to give back (NULL when the call did not change); the caller holds the counters' advisory
-- lock and gives them back with apply_counters(keys, -1).
--
-- A call is found by its key. Its state is tested inside CASE (`CASE state WHEN 'ringing'
-- THEN true END`), never as a plain condition: a plain `state = 'ringing'` lets the planner
-- read the call through a partial index of live calls (calls_live_expires) instead of the
-- primary key, and it does so whenever the statistics were taken while few calls were live,
-- scanning every live call for each answer and release (tests/test_lifecycle.py).
--
-- Applied by every `sidecar migrate` (CREATE OR REPLACE), after sql/migrations/.

-- The decision a tombstone answers to an admission.
CREATE OR REPLACE FUNCTION released_decision() RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT '{"action": "reject", "why": "released"}'::jsonb
$$;

-- A 2xx came from p_leg. An unknown leg (NULL, or a leg the call did not admit) keeps every
-- slot: never give back what may still be in use. Either way the call is answered: it
-- expires after p_max_duration. NULL for an unknown, refused, released or already answered
-- call (idempotent). One statement for a call of one leg, the common case.
CREATE OR REPLACE FUNCTION answer_call(p_call_id text, p_from_tag text, p_leg integer,
                                       p_max_duration interval, p_mode text)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    v_legs integer[];
    v_keys text[];
    v_keep integer[] := ARRAY[0, p_leg];
BEGIN
    UPDATE calls SET state = 'answered', answered_leg = p_leg, answered_at = now(),
                     expires_at = now() + p_max_duration
    WHERE call_id = p_call_id AND from_tag = p_from_tag
      AND CASE state WHEN 'ringing' THEN true END
    RETURNING slot_legs, slot_keys INTO v_legs, v_keys;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF p_leg IS NULL OR NOT p_leg = ANY (v_legs) OR v_legs <@ v_keep THEN
        RETURN '{}';
    END IF;
    UPDATE calls SET
        slot_legs = ARRAY(SELECT l FROM unnest(v_legs) WITH ORDINALITY u(l, o)
                          WHERE l = ANY (v_keep) ORDER BY o),
        slot_keys = ARRAY(SELECT k FROM unnest(v_legs, v_keys) WITH ORDINALITY u(l, k, o)
                          WHERE l = ANY (v_keep) ORDER BY o)
    WHERE call_id = p_call_id AND from_tag = p_from_tag;
    RETURN slots_given_back(v_legs, v_keys, v_keep, p_mode);
END $$;

-- The end of a call. NULL when nothing was released:
--   the call is not recorded (yet): a tombstone alone, so that an admission arriving later
--     is refused (kept p_tombstone_ttl: the INVITE transaction's lifetime);
--   it is refused, released already, or answered and p_reason is 'cancel' (a CANCEL that
--     crosses the 200 must not free the slots of a call that goes on).
-- Otherwise the call becomes a tombstone and its slots are returned. One statement.
-- p_from_tag NULL: every live call with this Call-ID, and no tombstone.
CREATE OR REPLACE FUNCTION release_call(p_call_id text, p_from_tag text, p_reason text,
                                        p_tombstone_ttl interval, p_mode text)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    v_live  text[] := CASE WHEN p_reason = 'cancel' THEN '{ringing}'
                           ELSE '{ringing,answered}' END;
    v_legs  integer[];
    v_keys  text[];
BEGIN
    IF p_from_tag IS NULL THEN
        -- Every live call with this Call-ID (an administrator's force-release): no tombstone.
        WITH gone AS (
            UPDATE calls c SET state = 'released', decision = released_decision(),
                               expires_at = now() + p_tombstone_ttl
            WHERE c.call_id = p_call_id AND CASE WHEN c.state = ANY (v_live) THEN true END
            RETURNING slots_given_back(c.slot_legs, c.slot_keys, NULL, p_mode) AS back
        )
        SELECT array_agg(k) INTO v_keys FROM gone, unnest(gone.back || '{NULL}'::text[]) k;
        RETURN array_remove(v_keys, NULL);   -- NULL: no call; '{}': calls that held nothing
    END IF;
    -- (A key longer than the calls table allows belongs to no call: nothing to refuse.)
    IF NOT length(p_call_id) BETWEEN 1 AND 2048 OR length(p_from_tag) > 512 THEN
        RETURN NULL;
    END IF;
    -- The live call, the common case: one plain UPDATE (an INSERT ... ON CONFLICT DO UPDATE
    -- locks the row it finds, then updates it: two row operations and two WAL records).
    -- Every writer of calls' states holds the counters' lock, so nothing comes between the
    -- UPDATE and the INSERT.
    UPDATE calls SET state = 'released', decision = released_decision(),
                     expires_at = now() + p_tombstone_ttl
    WHERE call_id = p_call_id AND from_tag = p_from_tag
      AND CASE WHEN state = ANY (v_live) THEN true END
    RETURNING slot_legs, slot_keys INTO v_legs, v_keys;
    IF FOUND THEN
        RETURN slots_given_back(v_legs, v_keys, NULL, p_mode);
    END IF;
    -- Not live: a tombstone when nothing is recorded; a refusal, a tombstone or an answered
    -- call that a CANCEL crossed stays as it is.
    INSERT INTO calls (call_id, from_tag, state, decision, expires_at)
    VALUES (p_call_id, p_from_tag, 'released', released_decision(), now() + p_tombstone_ttl)
    ON CONFLICT (call_id, from_tag) DO NOTHING;
    RETURN NULL;
END $$;

-- Apply answers and releases in arrival order (an answer and the release of the same call
-- keep their order); the counters move once, at the end. p_types[i] is 'answer' or
-- 'release'; returns, per event, 1 when it changed the call, else 0.
--
-- A batch that names each call once (the outbox's usual batch: a call's answer and its
-- release are seconds apart) is applied set-based: its events touch different rows, so
-- their order does not matter, and one UPDATE for the answers and one for the releases
-- replace a function call and an UPDATE per event (about 30 us of PostgreSQL each). The
-- events those statements do not settle (an answer that gives slots back, an answer or a
-- release of a call that is not live) go through answer_call() and release_call() as
-- before. A batch naming a call twice, or a release without a From tag, goes event by event.
-- The set-based statements find their calls by key, as the one-call ones do: the states
-- are tested inside CASE (see above), and the function plans without hash and merge joins
-- (its SET clause), which leaves a nested loop of key lookups. Without it, the benchmark's
-- calls table (ended calls kept a while) was joined by hashing a sequential scan of it:
-- PostgreSQL 0.32 instead of 0.21 ms per call at 1,800 CPS (bench/RESULTS.md).
CREATE OR REPLACE FUNCTION control_events(
    p_types      text[],
    p_call_ids   text[],
    p_from_tags  text[],
    p_legs       integer[],
    p_reasons    text[],
    p_max_duration interval,
    p_tombstone_ttl interval
) RETURNS integer[] LANGUAGE plpgsql SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    v_n     integer := coalesce(cardinality(p_types), 0);
    v_mode  text;
    v_out   integer[] := array_fill(0, ARRAY[v_n]);
    v_back  text[] := '{}';
    v_keys  text[];
    v_done  integer[];   -- events the set-based statements applied
    v_i     integer;
BEGIN
    PERFORM sidecar_counters_lock();
    SELECT counting INTO v_mode FROM settings;
    IF v_n >= 2 AND array_position(p_from_tags, NULL) IS NULL
       AND (SELECT count(DISTINCT (c, t)) FROM unnest(p_call_ids, p_from_tags) u(c, t)) = v_n
    THEN
        -- Answers of ringing calls that give nothing back (answer_call()'s '{}': an unknown
        -- leg, or no other leg holds a slot).
        WITH u AS (
            SELECT * FROM unnest(p_call_ids, p_from_tags, p_legs, p_types)
                          WITH ORDINALITY u(call_id, from_tag, leg, type, o)
            WHERE type = 'answer'
        ), done AS (
            UPDATE calls c SET state = 'answered', answered_leg = u.leg, answered_at = now(),
                               expires_at = now() + p_max_duration
            FROM u
            WHERE c.call_id = u.call_id AND c.from_tag = u.from_tag
              AND CASE c.state WHEN 'ringing' THEN true END
              AND (u.leg IS NULL OR NOT u.leg = ANY (c.slot_legs)
                   OR c.slot_legs <@ ARRAY[0, u.leg])
            RETURNING u.o
        )
        SELECT coalesce(array_agg(o::integer), '{}') INTO v_done FROM done;
        -- Releases of live calls (a CANCEL releases only a ringing one: release_call()).
        WITH u AS (
            SELECT * FROM unnest(p_call_ids, p_from_tags, p_reasons, p_types)
                          WITH ORDINALITY u(call_id, from_tag, reason, type, o)
            WHERE type <> 'answer'
        ), gone AS (
            UPDATE calls c SET state = 'released', decision = released_decision(),
                               expires_at = now() + p_tombstone_ttl
            FROM u
            WHERE c.call_id = u.call_id AND c.from_tag = u.from_tag
              AND CASE c.state WHEN 'ringing' THEN true
                               WHEN 'answered' THEN u.reason IS DISTINCT FROM 'cancel' END
            RETURNING u.o, slots_given_back(c.slot_legs, c.slot_keys, NULL, v_mode) AS back
        )
        SELECT v_done || coalesce((SELECT array_agg(o::integer) FROM gone), '{}'),
               coalesce((SELECT array_agg(k) FROM gone, unnest(gone.back) k), '{}')
        INTO v_done, v_back;
        FOREACH v_i IN ARRAY v_done LOOP
            v_out[v_i] := 1;
        END LOOP;
    END IF;
    -- Event by event, in order: every event of a batch that cannot go set-based; else the
    -- ones its statements left (answers that give slots back, events of calls not live: a
    -- release leaves its tombstone, release_call()).
    FOR i IN 1 .. v_n LOOP
        CONTINUE WHEN v_out[i] = 1;
        IF p_types[i] = 'answer' THEN
            v_keys := answer_call(p_call_ids[i], p_from_tags[i], p_legs[i], p_max_duration,
                                  v_mode);
        ELSE
            v_keys := release_call(p_call_ids[i], p_from_tags[i], p_reasons[i],
                                   p_tombstone_ttl, v_mode);
        END IF;
        v_out[i] := (v_keys IS NOT NULL)::integer;
        v_back := v_back || v_keys;
    END LOOP;
    PERFORM apply_counters(v_back, -1);
    RETURN v_out;
END $$;

-- One answer. true when the call was ringing.
CREATE OR REPLACE FUNCTION answer(p_call_id text, p_from_tag text, p_leg integer,
                                  p_max_duration interval)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_keys text[];
BEGIN
    PERFORM sidecar_counters_lock();
    v_keys := answer_call(p_call_id, p_from_tag, p_leg, p_max_duration,
                          (SELECT counting FROM settings));
    PERFORM apply_counters(v_keys, -1);
    RETURN v_keys IS NOT NULL;
END $$;

-- Give back every slot of the given calls and leave a tombstone of each live one (state
-- 'released', kept until now() + p_tombstone_ttl). Returns how many calls were live
-- (ringing or answered); refusals and tombstones are left as they are.
CREATE OR REPLACE FUNCTION release_locked(p_call_ids text[], p_from_tags text[],
                                          p_tombstone_ttl interval)
RETURNS integer LANGUAGE plpgsql SET enable_hashjoin = off SET enable_mergejoin = off AS $$
DECLARE
    v_mode  text;
    v_n     integer;
    v_keys  text[];
BEGIN
    PERFORM sidecar_counters_lock();
    SELECT counting INTO v_mode FROM settings;
    WITH gone AS (
        UPDATE calls c SET state = 'released', decision = released_decision(),
                           expires_at = now() + p_tombstone_ttl
        FROM unnest(p_call_ids, p_from_tags) AS u(call_id, from_tag)
        WHERE c.call_id = u.call_id AND c.from_tag = u.from_tag
          AND CASE WHEN c.state IN ('ringing', 'answered') THEN true END
        RETURNING slots_given_back(c.slot_legs, c.slot_keys, NULL, v_mode) AS back
    )
    SELECT (SELECT count(*) FROM gone),
           ARRAY(SELECT k FROM gone, unnest(gone.back) k)
    INTO v_n, v_keys;
    PERFORM apply_counters(v_keys, -1);
    RETURN v_n;
END $$;

-- The end of a call (see release_call()). Returns how many calls were released; releasing
-- twice, or an unknown call, is harmless. p_from_tag NULL: every live call with this
-- Call-ID (an administrator's force-release), and no tombstone.
CREATE OR REPLACE FUNCTION release(p_call_id text, p_from_tag text, p_reason text DEFAULT NULL,
                                   p_tombstone_ttl interval DEFAULT interval '180 seconds')
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_keys text[];
    v_ids  text[];
    v_tags text[];
BEGIN
    PERFORM sidecar_counters_lock();
    IF p_from_tag IS NULL THEN
        SELECT array_agg(call_id ORDER BY from_tag), array_agg(from_tag ORDER BY from_tag)
        INTO v_ids, v_tags
        FROM calls WHERE call_id = p_call_id
          AND (p_reason IS DISTINCT FROM 'cancel' OR state = 'ringing');
        RETURN coalesce(release_locked(v_ids, v_tags, p_tombstone_ttl), 0);
    END IF;
    v_keys := release_call(p_call_id, p_from_tag, p_reason, p_tombstone_ttl,
                           (SELECT counting FROM settings));
    PERFORM apply_counters(v_keys, -1);
    RETURN (v_keys IS NOT NULL)::integer;
END $$;

-- Forget rows that hold no slot, p_batch of each kind at most (SKIP LOCKED: the replicas
-- share the work): refusals past their expires_at, ended calls p_keep after theirs
-- (SIDECAR_ENDED_RETENTION; migration 008). Returns how many rows went.
CREATE OR REPLACE FUNCTION purge_calls(p_batch integer DEFAULT 5000,
                                       p_keep interval DEFAULT interval '0')
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_refused integer;
    v_ended   integer;
BEGIN
    DELETE FROM calls c
    USING (SELECT call_id, from_tag FROM calls
           WHERE state = 'refused' AND expires_at < now()
           ORDER BY expires_at LIMIT p_batch FOR UPDATE SKIP LOCKED) d
    WHERE c.call_id = d.call_id AND c.from_tag = d.from_tag;
    GET DIAGNOSTICS v_refused = ROW_COUNT;
    DELETE FROM calls c
    USING (SELECT call_id, from_tag FROM calls
           WHERE state = 'released' AND expires_at < now() - p_keep
           ORDER BY expires_at LIMIT p_batch FOR UPDATE SKIP LOCKED) d
    WHERE c.call_id = d.call_id AND c.from_tag = d.from_tag;
    GET DIAGNOSTICS v_ended = ROW_COUNT;
    RETURN v_refused + v_ended;
END $$;
