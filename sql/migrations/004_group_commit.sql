-- 004: group commit. Control requests that arrive together are decided together: one
-- transaction, one commit, one round trip per batch, each request in arrival order, by the
-- same functions that decide a single request (admit, answer, release).
--
-- A batch takes counter locks call after call, so two batches (or a batch and a janitor
-- sweep) could take the same rows in opposite orders. Every transaction that changes
-- counters through these batch functions, the janitor, reconciliation or a force-release
-- therefore first takes one transaction-level advisory lock, sidecar_counters_lock():
-- batches run one at a time across every replica, which the hot counters (a provider, a
-- trunk) impose anyway, and can never deadlock.

-- The advisory lock key, in one place (the sidecar takes it too before a janitor sweep,
-- a reconciliation or a force-release).
CREATE FUNCTION sidecar_counters_lock() RETURNS void LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(7239401)
$$;

-- Decide several initial INVITEs in arrival order; returns the decisions (as admit()
-- returns them) in the same order.
CREATE FUNCTION admit_batch(
    p_call_ids   text[],
    p_from_tags  text[],
    p_sources    inet[],
    p_from_users text[],
    p_to_users   text[],
    p_auth_users text[],
    p_nodes      text[],
    p_boots      text[],
    p_lates      boolean[],
    p_force      boolean,
    p_domain     text,
    p_ring_ttl   interval,
    p_max_duration interval
) RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    v_out text[] := '{}';
BEGIN
    PERFORM sidecar_counters_lock();
    FOR i IN 1 .. coalesce(cardinality(p_call_ids), 0) LOOP
        v_out := v_out || admit(p_call_ids[i], p_from_tags[i], p_sources[i], p_from_users[i],
                                p_to_users[i], p_auth_users[i], p_nodes[i], p_boots[i],
                                p_force, p_domain, p_ring_ttl, p_lates[i],
                                p_max_duration)::text;
    END LOOP;
    RETURN v_out;
END $$;

-- Apply answers and releases in arrival order (an answer and the release of the same call
-- keep their order). p_types[i] is 'answer' or 'release'; returns, per event, whether the
-- answer changed the call (1/0) or how many calls the release gave slots back for.
CREATE FUNCTION control_events(
    p_types      text[],
    p_call_ids   text[],
    p_from_tags  text[],
    p_legs       integer[],
    p_reasons    text[],
    p_max_duration interval,
    p_tombstone_ttl interval
) RETURNS integer[] LANGUAGE plpgsql AS $$
DECLARE
    v_out integer[] := '{}';
BEGIN
    PERFORM sidecar_counters_lock();
    FOR i IN 1 .. coalesce(cardinality(p_types), 0) LOOP
        IF p_types[i] = 'answer' THEN
            v_out := v_out || answer(p_call_ids[i], p_from_tags[i], p_legs[i],
                                     p_max_duration)::integer;
        ELSE
            v_out := v_out || release(p_call_ids[i], p_from_tags[i], p_reasons[i],
                                      p_tombstone_ttl);
        END IF;
    END LOOP;
    RETURN v_out;
END $$;

-- A 2xx from p_leg: the slots of every other leg but leg 0 go back. Same as 003's answer(),
-- with a fast path for the common case: when no other leg holds a slot (every call of one
-- leg), nothing is locked, counted or deleted: the call is only marked answered.
CREATE OR REPLACE FUNCTION answer(p_call_id text, p_from_tag text, p_leg integer,
                                  p_max_duration interval)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    v_mode   text;
    v_state  text;
    v_keep   integer[];
    v_drop   text[];
BEGIN
    SELECT state INTO v_state FROM calls
    WHERE call_id = p_call_id AND from_tag = p_from_tag FOR UPDATE;
    IF v_state IS DISTINCT FROM 'ringing' THEN
        RETURN false;
    END IF;
    v_keep := ARRAY[0, p_leg];
    IF p_leg IS NOT NULL
       AND EXISTS (SELECT 1 FROM slots WHERE call_id = p_call_id AND from_tag = p_from_tag
                   AND leg = p_leg)
       AND EXISTS (SELECT 1 FROM slots WHERE call_id = p_call_id AND from_tag = p_from_tag
                   AND NOT leg = ANY (v_keep)) THEN
        -- Lock what the other legs hold (the same counters in either mode), then read the
        -- mode: a change of mode (settings_recount() locks every counter) has then committed.
        PERFORM lock_counters(ARRAY(
            SELECT DISTINCT counter FROM slots
            WHERE call_id = p_call_id AND from_tag = p_from_tag AND NOT leg = ANY (v_keep)));
        SELECT counting INTO v_mode FROM settings;
        IF v_mode = 'per_leg' THEN
            SELECT coalesce(array_agg(counter), '{}') INTO v_drop FROM slots
            WHERE call_id = p_call_id AND from_tag = p_from_tag AND NOT leg = ANY (v_keep);
        ELSE
            SELECT coalesce(array_agg(k), '{}') INTO v_drop
            FROM unnest(held_keys(p_call_id, p_from_tag, v_mode)) k
            WHERE NOT k = ANY (held_keys(p_call_id, p_from_tag, v_mode, v_keep));
        END IF;
        DELETE FROM slots WHERE call_id = p_call_id AND from_tag = p_from_tag
            AND NOT leg = ANY (v_keep);
        PERFORM apply_counters(v_drop, -1);
    END IF;
    UPDATE calls SET state = 'answered', answered_leg = p_leg, answered_at = now(),
                     expires_at = now() + p_max_duration
    WHERE call_id = p_call_id AND from_tag = p_from_tag;
    RETURN true;
END $$;
