-- Answers and releases: what Kamailio's dialog module reports of a call's life.
--
--   answer_calls()    a 2xx from a leg: the call is answered; the other ringing legs' slots
--                     go back (leg 0's stay: it carries the caller's counters)
--   release_calls()   the call's end: every slot back, and a tombstone that refuses a late
--                     admission of the same call
--   control_events()  a batch of both in arrival order, the counters moved once: the events
--                     of distinct calls together (a statement per batch, not per event)
--   answer_call(), release_call(): one call; answer(), release(), release_locked(): the same,
--                     one call (or a list of calls) at a time, for the janitor,
--                     reconciliation, force-release and SQL users
--
-- answer_calls() and release_calls() change only the calls' rows and return the counter
-- keys to give back for each call that changed (answer_call() and release_call(): the keys,
-- NULL when the call did not change); the caller holds the counters' advisory lock and gives
-- them back with apply_counters(keys, -1).
--
-- Applied by every `sidecar migrate` (CREATE OR REPLACE), after sql/migrations/.

-- The decision a tombstone answers to an admission.
CREATE OR REPLACE FUNCTION released_decision() RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT '{"action": "reject", "why": "released"}'::jsonb
$$;

-- A 2xx came from a leg, for several calls (each once): p_legs[i] answered p_call_ids[i].
-- An unknown leg (NULL, or a leg the call did not admit) keeps every slot: never give back
-- what may still be in use. Either way the call is answered: it expires after
-- p_max_duration. Returns each call that was ringing (n: its place in the arrays) with the
-- counter keys it gives back; an unknown, refused, released or already answered call is not
-- returned (idempotent). One statement for all the calls; a second one for a call of
-- several legs, to drop the slots of the legs that did not answer.
CREATE OR REPLACE FUNCTION answer_calls(p_call_ids text[], p_from_tags text[],
                                        p_legs integer[], p_max_duration interval,
                                        p_mode text)
RETURNS TABLE (n integer, back text[]) LANGUAGE plpgsql AS $$
DECLARE
    r      record;
    v_keep integer[];
BEGIN
    FOR r IN
        UPDATE calls c SET state = 'answered', answered_leg = u.leg, answered_at = now(),
                           expires_at = now() + p_max_duration
        FROM unnest(p_call_ids, p_from_tags, p_legs) WITH ORDINALITY AS u(call_id, from_tag, leg, n)
        WHERE c.call_id = u.call_id AND c.from_tag = u.from_tag AND c.state = 'ringing'
        RETURNING u.n, u.leg, c.call_id, c.from_tag, c.slot_legs, c.slot_keys
    LOOP
        n := r.n;
        v_keep := ARRAY[0, r.leg];
        IF r.leg IS NULL OR NOT r.leg = ANY (r.slot_legs) OR r.slot_legs <@ v_keep THEN
            back := '{}';
        ELSE
            UPDATE calls SET
                slot_legs = ARRAY(SELECT l FROM unnest(r.slot_legs) WITH ORDINALITY u(l, o)
                                  WHERE l = ANY (v_keep) ORDER BY o),
                slot_keys = ARRAY(SELECT k FROM unnest(r.slot_legs, r.slot_keys)
                                                WITH ORDINALITY u(l, k, o)
                                  WHERE l = ANY (v_keep) ORDER BY o)
            WHERE call_id = r.call_id AND from_tag = r.from_tag;
            back := slots_given_back(r.slot_legs, r.slot_keys, v_keep, p_mode);
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;

-- One answer (see answer_calls()): the keys to give back, NULL when the call was not ringing.
CREATE OR REPLACE FUNCTION answer_call(p_call_id text, p_from_tag text, p_leg integer,
                                       p_max_duration interval, p_mode text)
RETURNS text[] LANGUAGE plpgsql AS $$
BEGIN
    RETURN (SELECT back FROM answer_calls(ARRAY[p_call_id], ARRAY[p_from_tag], ARRAY[p_leg],
                                          p_max_duration, p_mode));
END $$;

-- The end of several calls (each once; p_from_tags not NULL), p_reasons[i] ending
-- p_call_ids[i]. Returns each call released (n: its place in the arrays) with the counter
-- keys it gives back. Not returned, nothing released:
--   the call is not recorded (yet): a tombstone alone, so that an admission arriving later
--     is refused (kept p_tombstone_ttl: the INVITE transaction's lifetime);
--   it is refused, released already, or answered and the reason is 'cancel' (a CANCEL that
--     crosses the 200 must not free the slots of a call that goes on).
-- Otherwise the call becomes a tombstone and its slots are returned. Two statements for all
-- the calls: the live ones become tombstones, then a tombstone for each call not recorded.
CREATE OR REPLACE FUNCTION release_calls(p_call_ids text[], p_from_tags text[],
                                         p_reasons text[], p_tombstone_ttl interval,
                                         p_mode text)
RETURNS TABLE (n integer, back text[]) LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY
    WITH u AS (
        SELECT * FROM unnest(p_call_ids, p_from_tags, p_reasons)
                      WITH ORDINALITY AS u(call_id, from_tag, reason, n)
        -- (A key longer than the calls table allows belongs to no call: nothing to refuse.)
        WHERE (NOT length(u.call_id) BETWEEN 1 AND 2048 OR length(u.from_tag) > 512)
              IS NOT TRUE
    ), gone AS (
        UPDATE calls c SET state = 'released', decision = released_decision(),
                           expires_at = now() + p_tombstone_ttl
        FROM u
        WHERE c.call_id = u.call_id AND c.from_tag = u.from_tag
          AND c.state = ANY (CASE WHEN u.reason = 'cancel' THEN '{ringing}'::text[]
                                  ELSE '{ringing,answered}' END)
        RETURNING u.n::integer, slots_given_back(c.slot_legs, c.slot_keys, NULL, p_mode)
    )
    SELECT * FROM gone;
    INSERT INTO calls (call_id, from_tag, state, decision, expires_at)
    SELECT u.call_id, u.from_tag, 'released', released_decision(), now() + p_tombstone_ttl
    FROM unnest(p_call_ids, p_from_tags) AS u(call_id, from_tag)
    WHERE (NOT length(u.call_id) BETWEEN 1 AND 2048 OR length(u.from_tag) > 512) IS NOT TRUE
    ON CONFLICT (call_id, from_tag) DO NOTHING;
END $$;

-- The end of a call (see release_calls()): the keys to give back, NULL when nothing was
-- released. p_from_tag NULL: every live call with this Call-ID, and no tombstone.
CREATE OR REPLACE FUNCTION release_call(p_call_id text, p_from_tag text, p_reason text,
                                        p_tombstone_ttl interval, p_mode text)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    v_keys  text[];
BEGIN
    IF p_from_tag IS NULL THEN
        -- Every live call with this Call-ID (an administrator's force-release): no tombstone.
        WITH gone AS (
            UPDATE calls c SET state = 'released', decision = released_decision(),
                               expires_at = now() + p_tombstone_ttl
            WHERE c.call_id = p_call_id
              AND c.state = ANY (CASE WHEN p_reason = 'cancel' THEN '{ringing}'::text[]
                                      ELSE '{ringing,answered}' END)
            RETURNING slots_given_back(c.slot_legs, c.slot_keys, NULL, p_mode) AS back
        )
        SELECT array_agg(k) INTO v_keys FROM gone, unnest(gone.back || '{NULL}'::text[]) k;
        RETURN array_remove(v_keys, NULL);   -- NULL: no call; '{}': calls that held nothing
    END IF;
    RETURN (SELECT back FROM release_calls(ARRAY[p_call_id], ARRAY[p_from_tag],
                                           ARRAY[p_reason], p_tombstone_ttl, p_mode));
END $$;

-- Apply answers and releases in arrival order (an answer and the release of the same call
-- keep their order); the counters move once, at the end. p_types[i] is 'answer' or
-- 'release'; returns, per event, 1 when it changed the call, else 0. Events of distinct calls
-- are applied together, in rounds: a round ends before a second event of one of its calls,
-- and before a release of every call with a Call-ID (NULL from-tag), applied alone.
CREATE OR REPLACE FUNCTION control_events(
    p_types      text[],
    p_call_ids   text[],
    p_from_tags  text[],
    p_legs       integer[],
    p_reasons    text[],
    p_max_duration interval,
    p_tombstone_ttl interval
) RETURNS integer[] LANGUAGE plpgsql AS $$
DECLARE
    v_count integer := coalesce(cardinality(p_types), 0);
    v_mode  text;
    v_out   integer[] := array_fill(0, ARRAY[v_count]);
    v_back  text[] := '{}';
    v_keys  text[];
    v_call  text;
    r       record;
    -- the round: its calls (call_id and from_tag; two calls that read alike only end a round
    -- early), its answers and its releases
    v_round text[] := '{}';
    v_a_at  integer[] := '{}';     -- the answers' places in the batch
    v_a_ids text[] := '{}';
    v_a_tags text[] := '{}';
    v_a_legs integer[] := '{}';
    v_r_at  integer[] := '{}';     -- the releases' places in the batch
    v_r_ids text[] := '{}';
    v_r_tags text[] := '{}';
    v_r_reasons text[] := '{}';
BEGIN
    PERFORM sidecar_counters_lock();
    SELECT counting INTO v_mode FROM settings;
    FOR i IN 1 .. v_count + 1 LOOP
        v_call := p_call_ids[i] || ' ' || p_from_tags[i];
        IF i > v_count OR v_call = ANY (v_round)
           OR (p_types[i] IS DISTINCT FROM 'answer' AND p_from_tags[i] IS NULL) THEN
            -- Apply the round.
            IF cardinality(v_a_at) > 0 THEN
                FOR r IN SELECT * FROM answer_calls(v_a_ids, v_a_tags, v_a_legs,
                                                    p_max_duration, v_mode) LOOP
                    v_out[v_a_at[r.n]] := 1;
                    v_back := v_back || r.back;
                END LOOP;
            END IF;
            IF cardinality(v_r_at) > 0 THEN
                FOR r IN SELECT * FROM release_calls(v_r_ids, v_r_tags, v_r_reasons,
                                                     p_tombstone_ttl, v_mode) LOOP
                    v_out[v_r_at[r.n]] := 1;
                    v_back := v_back || r.back;
                END LOOP;
            END IF;
            EXIT WHEN i > v_count;
            v_round := '{}';
            v_a_at := '{}'; v_a_ids := '{}'; v_a_tags := '{}'; v_a_legs := '{}';
            v_r_at := '{}'; v_r_ids := '{}'; v_r_tags := '{}'; v_r_reasons := '{}';
            IF p_types[i] IS DISTINCT FROM 'answer' AND p_from_tags[i] IS NULL THEN
                v_keys := release_call(p_call_ids[i], NULL, p_reasons[i], p_tombstone_ttl,
                                       v_mode);
                v_out[i] := (v_keys IS NOT NULL)::integer;
                v_back := v_back || v_keys;
                CONTINUE;
            END IF;
        END IF;
        v_round := v_round || v_call;
        IF p_types[i] = 'answer' THEN
            v_a_at := v_a_at || i;
            v_a_ids := v_a_ids || p_call_ids[i];
            v_a_tags := v_a_tags || p_from_tags[i];
            v_a_legs := v_a_legs || p_legs[i];
        ELSE
            v_r_at := v_r_at || i;
            v_r_ids := v_r_ids || p_call_ids[i];
            v_r_tags := v_r_tags || p_from_tags[i];
            v_r_reasons := v_r_reasons || p_reasons[i];
        END IF;
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
RETURNS integer LANGUAGE plpgsql AS $$
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
          AND c.state IN ('ringing', 'answered')
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
