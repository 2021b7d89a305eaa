-- 003: the call life cycle driven by Kamailio's dialog module.
--
-- * A released call leaves a tombstone: its row stays, in state 'released', with a refusal
--   as its decision and no slot, for a ringing TTL. An admission that arrives after the
--   release (a retransmission, or a CANCEL that overtook the decision) is refused and counts
--   nothing. A release of a call not recorded yet leaves the tombstone first.
-- * A CANCEL ('cancel') releases only a call that is not answered yet.
-- * A late admission (fail-open catch-up) records an answered call.
-- * Forward legs that cannot be routed are not legs: they hold nothing and do not ring.
-- * Counter rows are locked FOR NO KEY UPDATE, and the counting mode is read after the locks.
-- * The janitor releases expired calls one by one when a batch fails, and purges refusals
--   and tombstones past their time.
-- * A node's dialog list is reconciled set-based (arrays, anti-join); dialogs the node
--   reports as confirmed mark ringing calls answered.
--
-- 001 and 002 stay as they were deployed; what changes is replaced here.

------------------------------------------------------------------------------------------
-- Schema
------------------------------------------------------------------------------------------

ALTER TABLE calls DROP CONSTRAINT calls_state_check;
ALTER TABLE calls ADD CONSTRAINT calls_state_check
    CHECK (state IN ('ringing', 'answered', 'refused', 'released'));

-- The janitor looks for live calls whose time is up, and for dead records (refusals,
-- tombstones) to forget: one index each, so that neither walks the other's rows.
DROP INDEX calls_expires;
CREATE INDEX calls_live_expires ON calls (expires_at) WHERE state IN ('ringing', 'answered');
CREATE INDEX calls_dead_expires ON calls (expires_at) WHERE state IN ('refused', 'released');

-- Functions whose arguments change: dropped, then created again below.
DROP FUNCTION admit(text, text, inet, text, text, text, text, text, boolean, text, interval);
DROP FUNCTION release_locked(text[], text[]);
DROP FUNCTION release(text, text);
DROP FUNCTION expire_calls(integer);
DROP FUNCTION reconcile_node(text, text, jsonb, interval);

------------------------------------------------------------------------------------------
-- Counters
------------------------------------------------------------------------------------------

-- Lock the counter rows behind these keys, accounts then channels, each in id order.
-- FOR NO KEY UPDATE is the lock the UPDATE of a counter takes anyway: it excludes every
-- other admission and release, but not the foreign-key checks of rows that refer to the
-- account (FOR UPDATE would make those wait, and can deadlock with admin changes).
CREATE OR REPLACE FUNCTION lock_counters(p_keys text[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM accounts
    WHERE id IN (SELECT split_part(k, ':', 2) FROM unnest(p_keys) k WHERE k LIKE 'account:%')
    ORDER BY id FOR NO KEY UPDATE;
    PERFORM 1 FROM channels
    WHERE id IN (SELECT split_part(k, ':', 2) FROM unnest(p_keys) k WHERE k LIKE 'channel:%')
    ORDER BY id FOR NO KEY UPDATE;
END $$;

-- Set every counter from the call records. Returns how many counters changed.
CREATE OR REPLACE FUNCTION rebuild_counters() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_changed integer;
BEGIN
    PERFORM 1 FROM accounts ORDER BY id FOR NO KEY UPDATE;
    PERFORM 1 FROM channels ORDER BY id FOR NO KEY UPDATE;
    SELECT count(*) INTO v_changed FROM counter_drift();
    WITH e AS (SELECT * FROM expected_counters())
    UPDATE accounts a SET
        calls_active = coalesce((SELECT active FROM e WHERE counter = 'account:' || a.id || ':calls'), 0),
        public_active = coalesce((SELECT active FROM e WHERE counter = 'account:' || a.id || ':public'), 0),
        internal_active = coalesce((SELECT active FROM e WHERE counter = 'account:' || a.id || ':internal'), 0);
    WITH e AS (SELECT * FROM expected_counters())
    UPDATE channels c SET
        calls_active = coalesce((SELECT active FROM e WHERE counter = 'channel:' || c.id || ':calls'), 0);
    RETURN v_changed;
END $$;

------------------------------------------------------------------------------------------
-- Admission
------------------------------------------------------------------------------------------

-- What admit() answers for a call already recorded, or NULL when the call is to be decided
-- now (not recorded; or gone meanwhile).
--   released: the refusal {"action": "reject", "why": "released"}. Its end came first (a
--             release, a CANCEL during the decision, expiry): it is never counted again.
--   otherwise: the first decision, with "repeat": true (retransmission, spiral, second
--             sidecar).
-- A late admission (fail-open catch-up) comes only for an answered call: a ringing call is
-- marked answered like an answer on an unknown leg; a call refused earlier went ahead anyway
-- (Kamailio never got the refusal), so its refusal is forgotten and it is decided again,
-- counted whatever the limits.
CREATE FUNCTION known_call(p_call_id text, p_from_tag text, p_late boolean,
                           p_max_duration interval)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    v_state    text;
    v_decision jsonb;
BEGIN
    IF p_late THEN
        SELECT state, decision INTO v_state, v_decision FROM calls
        WHERE call_id = p_call_id AND from_tag = p_from_tag FOR UPDATE;
    ELSE
        SELECT state, decision INTO v_state, v_decision FROM calls
        WHERE call_id = p_call_id AND from_tag = p_from_tag;
    END IF;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF v_state = 'released' THEN
        RETURN v_decision;
    END IF;
    IF p_late AND v_state = 'refused' THEN
        DELETE FROM calls WHERE call_id = p_call_id AND from_tag = p_from_tag;
        RETURN NULL;
    END IF;
    IF p_late AND v_state = 'ringing' THEN
        PERFORM answer(p_call_id, p_from_tag, NULL, p_max_duration);
    END IF;
    RETURN v_decision || '{"repeat": true}';
END $$;

-- Decide one call. Returns the decision as jsonb:
--   {"action": "relay", "legs": [{"leg": n, "uri": ..., "lookup": bool, "class": ...}], ...}
--   {"action": "reject", "why": "limit_origin"|"limit_destination", "counter": key, ...}
--   {"action": "reject", "why": "not_found"}   (unknown destination: nothing recorded; or
--                                               no forward target can be reached: recorded)
--   {"action": "reject", "why": "forbidden"}   (nothing recorded)
--   {"action": "reject", "why": "released"}    (the call was released before: see known_call)
--   {"action": "challenge"}                    (nothing recorded)
-- A call already decided returns its first decision with "repeat": true.
-- p_force (shadow mode) admits every leg whatever the limits and reports what would have
-- been refused under "shadow". p_late (fail-open catch-up, sent only for an answered call)
-- forces too, and records the call answered: it expires after p_max_duration, never after
-- the ringing TTL.
CREATE FUNCTION admit(
    p_call_id   text,
    p_from_tag  text,
    p_source    inet,
    p_from_user text,
    p_to_user   text,
    p_auth_user text,
    p_node      text,
    p_boot      text,
    p_force     boolean,
    p_domain    text,
    p_ring_ttl  interval,
    p_late      boolean DEFAULT false,
    p_max_duration interval DEFAULT interval '4 hours'
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
    -- A late admission is counted whatever the limits: the call is already up.
    v_force       boolean := p_force OR p_late;
    v_mode        text;
    v_decision    jsonb;
    v_origin_ext  extensions%ROWTYPE;
    v_origin_chan text;
    v_dest        extensions%ROWTYPE;
    v_dest_number text;       -- external number dialled (leg 0 to a channel)
    v_origin      text;
    v_origin_accs text[] := '{}';
    -- legs, as parallel arrays indexed from 1 (leg number = index - 1)
    l_from_ext    text[] := '{}';
    l_to_ext      text[] := '{}';
    l_number      text[] := '{}';   -- external end: the number dialled
    l_in_chan     text[] := '{}';   -- inbound channel (leg 0 from a carrier)
    v_n           integer;
    v_chains      jsonb := '{}';    -- extension id -> its account chain
    v_cands       jsonb := '{}';    -- number -> candidate channels
    v_all_keys    text[] := '{}';
    v_room        jsonb;
    v_held        text[] := '{}';   -- per_call: keys this call already holds
    v_acquired    text[] := '{}';   -- counter increments (with multiplicity)
    v_slot_leg    integer[] := '{}';
    v_slot_key    text[] := '{}';
    v_legs_out    jsonb := '[]';
    v_refusal     jsonb;           -- first refusal (leg 0's, or first forward leg's)
    v_shadow      jsonb;
    v_forwards    boolean;
    v_ext         extensions%ROWTYPE;
    v_target      text;
    i             integer;
    v_class       text;
    v_keys        text[];
    v_need        text[];
    v_chan_try    text[];
    v_chan        text;
    v_k           text;
    v_full        text;
    v_ok          boolean;
    v_uri         text;
    v_lookup      boolean;
    v_inserted    integer;
BEGIN
    -- 1. A call already recorded: its first decision, or the refusal of a released call.
    v_decision := known_call(p_call_id, p_from_tag, p_late, p_max_duration);
    IF v_decision IS NOT NULL THEN
        RETURN v_decision;
    END IF;

    -- 2. Origin: digest-authenticated extension, else by source address, else challenge.
    IF p_auth_user IS NOT NULL THEN
        SELECT * INTO v_origin_ext FROM extensions WHERE id = p_auth_user AND ha1 IS NOT NULL;
        IF NOT FOUND THEN
            RETURN '{"action": "reject", "why": "forbidden"}';
        END IF;
    ELSE
        SELECT * INTO v_origin_ext FROM extensions
        WHERE cardinality(sources) > 0 AND p_source <<= ANY (sources) AND id = p_from_user;
        IF NOT FOUND THEN
            SELECT id INTO v_origin_chan FROM channels
            WHERE p_source <<= ANY (sources) ORDER BY priority, id LIMIT 1;
            IF v_origin_chan IS NULL THEN
                SELECT * INTO v_origin_ext FROM extensions
                WHERE cardinality(sources) > 0 AND p_source <<= ANY (sources) ORDER BY id LIMIT 1;
                IF NOT FOUND THEN
                    IF EXISTS (SELECT 1 FROM extensions WHERE id = p_from_user AND ha1 IS NOT NULL) THEN
                        RETURN '{"action": "challenge"}';
                    END IF;
                    RETURN '{"action": "reject", "why": "forbidden"}';
                END IF;
            END IF;
        END IF;
    END IF;
    IF v_origin_chan IS NOT NULL THEN
        v_origin := 'channel:' || v_origin_chan;
    ELSE
        v_origin := 'extension:' || v_origin_ext.id;
        v_origin_accs := account_chain(v_origin_ext.account);
        v_chains := jsonb_build_object(v_origin_ext.id, to_jsonb(v_origin_accs));
    END IF;

    -- 3. Destination: an extension, a number (its extension), or an external number.
    SELECT * INTO v_dest FROM extensions WHERE id = p_to_user;
    IF NOT FOUND THEN
        SELECT e.* INTO v_dest FROM numbers n JOIN extensions e ON e.id = n.extension
        WHERE n.number = p_to_user;
    END IF;
    IF v_dest.id IS NULL THEN
        -- Carriers only reach local destinations; external numbers need a channel.
        IF v_origin_chan IS NOT NULL OR coalesce(p_to_user, '') !~ '^\+?[0-9*#]{1,32}$'
           OR cardinality(channel_candidates(p_to_user)) = 0 THEN
            RETURN '{"action": "reject", "why": "not_found"}';
        END IF;
        v_dest_number := p_to_user;
    END IF;

    -- 4. Claim the call. A concurrent admission of the same call, or a release that came
    --    first (its tombstone), waits here for the other transaction to commit; the call is
    --    then known. (known_call() returns NULL again only when the row it found is gone:
    --    claim again.)
    LOOP
        INSERT INTO calls (call_id, from_tag, state, origin, destination, node, boot, late,
                           decision, expires_at)
        VALUES (p_call_id, p_from_tag, 'refused', v_origin, p_to_user, p_node, p_boot, p_late,
                '{}', now() + p_ring_ttl)
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS v_inserted = ROW_COUNT;
        EXIT WHEN v_inserted = 1;
        v_decision := known_call(p_call_id, p_from_tag, p_late, p_max_duration);
        IF v_decision IS NOT NULL THEN
            RETURN v_decision;
        END IF;
    END LOOP;

    -- 5. The legs. Leg 0: origin -> dialled destination. Then, if the destination forwards,
    --    one leg per forward target in order, and ring_self last.
    l_from_ext := ARRAY[v_origin_ext.id::text];
    l_in_chan := ARRAY[v_origin_chan];
    l_to_ext := ARRAY[v_dest.id::text];
    l_number := ARRAY[v_dest_number];
    v_forwards := v_dest.id IS NOT NULL AND (cardinality(v_dest.forward) > 0 OR v_dest.ring_self);
    IF v_forwards THEN
        FOREACH v_target IN ARRAY v_dest.forward LOOP
            SELECT * INTO v_ext FROM extensions WHERE id = v_target;
            IF NOT FOUND THEN
                SELECT e.* INTO v_ext FROM numbers n JOIN extensions e ON e.id = n.extension
                WHERE n.number = v_target;
            END IF;
            l_from_ext := l_from_ext || v_dest.id::text;
            l_in_chan := l_in_chan || NULL::text;
            IF v_ext.id IS NOT NULL THEN
                l_to_ext := l_to_ext || v_ext.id::text;
                l_number := l_number || NULL::text;
            ELSE
                l_to_ext := l_to_ext || NULL::text;
                l_number := l_number || v_target;
            END IF;
            v_ext := NULL;
        END LOOP;
        IF v_dest.ring_self THEN
            l_from_ext := l_from_ext || v_dest.id::text;
            l_in_chan := l_in_chan || NULL::text;
            l_to_ext := l_to_ext || v_dest.id::text;
            l_number := l_number || NULL::text;
        END IF;
    END IF;
    v_n := cardinality(l_from_ext);

    -- 6. Every counter any leg may need, locked in canonical order, with the room left.
    --    FOR NO KEY UPDATE, like the UPDATE of the counters that follows: enough to exclude
    --    every other admission and release, without blocking foreign-key checks (an
    --    extension added to the account meanwhile).
    FOR i IN 1 .. v_n LOOP
        FOREACH v_k IN ARRAY ARRAY[l_from_ext[i], l_to_ext[i]] LOOP
            IF v_k IS NOT NULL AND NOT v_chains ? v_k THEN
                v_chains := v_chains || jsonb_build_object(v_k,
                    to_jsonb(account_chain((SELECT account FROM extensions WHERE id = v_k))));
            END IF;
        END LOOP;
        -- Only a dialable number leaves through a channel ('' prefixes match any string).
        IF l_number[i] IS NOT NULL AND NOT v_cands ? l_number[i] THEN
            v_cands := v_cands || jsonb_build_object(l_number[i], to_jsonb(
                CASE WHEN l_number[i] ~ '^\+?[0-9*#]{1,32}$' THEN channel_candidates(l_number[i])
                     ELSE '{}' END));
        END IF;
    END LOOP;
    SELECT coalesce(array_agg(DISTINCT 'account:' || a), '{}') INTO v_all_keys
    FROM jsonb_each(v_chains) c, jsonb_array_elements_text(c.value) a;
    SELECT v_all_keys || coalesce(array_agg(DISTINCT 'channel:' || ch), '{}') INTO v_all_keys
    FROM (SELECT jsonb_array_elements_text(value) AS ch FROM jsonb_each(v_cands)
          UNION SELECT v_origin_chan WHERE v_origin_chan IS NOT NULL) s;

    WITH acc AS (
        SELECT id, calls_limit - calls_active AS c, public_limit - public_active AS p,
               internal_limit - internal_active AS n
        FROM accounts
        WHERE id IN (SELECT split_part(k, ':', 2) FROM unnest(v_all_keys) k WHERE k LIKE 'account:%')
        ORDER BY id FOR NO KEY UPDATE
    ), chan AS (
        SELECT id, calls_limit - calls_active AS c
        FROM channels
        WHERE id IN (SELECT split_part(k, ':', 2) FROM unnest(v_all_keys) k WHERE k LIKE 'channel:%')
        ORDER BY id FOR NO KEY UPDATE
    )
    SELECT coalesce(jsonb_object_agg(k, r) FILTER (WHERE r IS NOT NULL), '{}') INTO v_room FROM (
        SELECT 'account:' || id || ':calls' AS k, c AS r FROM acc
        UNION ALL SELECT 'account:' || id || ':public', p FROM acc
        UNION ALL SELECT 'account:' || id || ':internal', n FROM acc
        UNION ALL SELECT 'channel:' || id || ':calls', c FROM chan
    ) s;
    -- Read after the locks: a change of counting mode (settings_recount() locks every
    -- counter) has then committed, and is seen.
    SELECT counting INTO v_mode FROM settings;

    -- 7. Decide the legs in order. A leg is admitted when every counter it needs has room:
    --    per_leg needs one more slot in each counter it touches; per_call only in those the
    --    call does not hold yet.
    FOR i IN 1 .. v_n LOOP
        v_class := CASE WHEN l_from_ext[i] IS NOT NULL AND l_to_ext[i] IS NOT NULL
                        THEN 'internal' ELSE 'public' END;
        -- Account counters, origin side first (nearest account first), then destination.
        SELECT coalesce(array_agg(k ORDER BY o), '{}') INTO v_keys FROM (
            SELECT DISTINCT ON (k) k, o FROM (
                SELECT 'account:' || a.v || ':' || d.dim AS k, s.side * 100000 + a.ord * 2 + d.o AS o
                FROM (VALUES (1, l_from_ext[i]), (2, l_to_ext[i])) s(side, ext)
                CROSS JOIN LATERAL jsonb_array_elements_text(v_chains -> s.ext) WITH ORDINALITY a(v, ord)
                CROSS JOIN (VALUES ('calls', 0), (v_class, 1)) d(dim, o)
                WHERE s.ext IS NOT NULL
            ) x ORDER BY k, o
        ) y;
        -- Channel: the inbound carrier, or the candidates for the external number.
        IF l_in_chan[i] IS NOT NULL THEN
            v_chan_try := ARRAY[l_in_chan[i]::text];
        ELSIF l_number[i] IS NOT NULL THEN
            SELECT coalesce(array_agg(x), '{}') INTO v_chan_try
            FROM jsonb_array_elements_text(v_cands -> l_number[i]) x;
        ELSE
            v_chan_try := '{}';
        END IF;
        -- A leg to an external end no channel can carry (a forward target that is an
        -- unroutable number, or neither an extension, a number nor a number at all) is no
        -- leg: it holds nothing and does not ring.
        IF l_to_ext[i] IS NULL AND cardinality(v_chan_try) = 0 THEN
            CONTINUE;
        END IF;

        -- First full account counter, if any.
        v_full := NULL;
        FOREACH v_k IN ARRAY v_keys LOOP
            IF (v_mode = 'per_leg' OR NOT v_k = ANY (v_held))
               AND (v_room ->> v_k)::integer < 1 THEN
                v_full := v_k;
                EXIT;
            END IF;
        END LOOP;
        -- Channel overflow: the first candidate with room (or already held, per_call).
        v_chan := NULL;
        IF v_full IS NULL AND cardinality(v_chan_try) > 0 THEN
            FOREACH v_k IN ARRAY v_chan_try LOOP
                IF (v_mode = 'per_call' AND ('channel:' || v_k || ':calls') = ANY (v_held))
                   OR coalesce((v_room ->> ('channel:' || v_k || ':calls'))::integer, 1) >= 1 THEN
                    v_chan := v_k;
                    EXIT;
                END IF;
            END LOOP;
            IF v_chan IS NULL THEN
                v_full := 'channel:' || v_chan_try[1] || ':calls';
            END IF;
        END IF;

        v_ok := v_full IS NULL;
        IF NOT v_ok THEN
            IF v_refusal IS NULL THEN
                v_refusal := jsonb_build_object(
                    'why', CASE WHEN i = 1 AND v_full LIKE 'account:%'
                                     AND split_part(v_full, ':', 2) = ANY (v_origin_accs)
                                THEN 'limit_origin' ELSE 'limit_destination' END,
                    'counter', v_full, 'leg', i - 1);
            END IF;
            IF v_force THEN
                v_shadow := coalesce(v_shadow, '[]') ||
                            jsonb_build_object('leg', i - 1, 'counter', v_full);
                v_ok := true;
                IF v_chan IS NULL AND cardinality(v_chan_try) > 0 THEN
                    v_chan := v_chan_try[1];
                END IF;
            ELSIF i = 1 THEN
                EXIT;   -- leg 0 refused: the call is refused
            END IF;
        END IF;

        IF v_ok THEN
            IF v_chan IS NOT NULL THEN
                v_keys := v_keys || ('channel:' || v_chan || ':calls');
            END IF;
            -- What this leg acquires, and the room it uses.
            IF v_mode = 'per_leg' THEN
                v_need := v_keys;
            ELSE
                SELECT coalesce(array_agg(k), '{}') INTO v_need
                FROM unnest(v_keys) k WHERE NOT k = ANY (v_held);
                v_held := v_held || v_need;
            END IF;
            FOREACH v_k IN ARRAY v_need LOOP
                IF v_room ? v_k THEN
                    v_room := jsonb_set(v_room, ARRAY[v_k], to_jsonb((v_room ->> v_k)::integer - 1));
                END IF;
            END LOOP;
            v_acquired := v_acquired || v_need;
            v_slot_leg := v_slot_leg || array_fill(i - 1, ARRAY[cardinality(v_keys)]);
            v_slot_key := v_slot_key || v_keys;

            -- Where this leg rings (leg 0 rings only when the destination does not forward).
            IF i > 1 OR NOT v_forwards THEN
                IF l_to_ext[i] IS NOT NULL THEN
                    SELECT contact INTO v_uri FROM extensions WHERE id = l_to_ext[i];
                    v_lookup := v_uri IS NULL;
                    IF v_lookup THEN
                        v_uri := 'sip:' || l_to_ext[i] || '@' || p_domain;
                    END IF;
                ELSE
                    SELECT regexp_replace(gateway, '^(sips?:)([^@]*@)?', '\1' || l_number[i] || '@')
                    INTO v_uri FROM channels WHERE id = v_chan;
                    v_lookup := false;
                END IF;
                v_legs_out := v_legs_out || jsonb_build_object(
                    'leg', i - 1, 'uri', v_uri, 'lookup', v_lookup, 'class', v_class,
                    'to', coalesce('extension:' || l_to_ext[i], 'number:' || l_number[i]),
                    'channel', v_chan);
            END IF;
        END IF;
    END LOOP;

    -- 8. Outcome: refused when leg 0 is, or when nothing rings: for the first limit that
    --    refused a leg, else because no forward target can be reached.
    IF jsonb_array_length(v_legs_out) = 0 THEN
        v_decision := CASE WHEN v_refusal IS NULL THEN '{"action": "reject", "why": "not_found"}'
                           ELSE jsonb_build_object('action', 'reject', 'limit', true) || v_refusal
                      END;
        UPDATE calls SET decision = v_decision WHERE call_id = p_call_id AND from_tag = p_from_tag;
        RETURN v_decision;
    END IF;

    v_decision := jsonb_build_object('action', 'relay', 'legs', v_legs_out);
    IF v_shadow IS NOT NULL THEN
        v_decision := v_decision || jsonb_build_object('shadow', v_shadow);
    END IF;
    -- A late admission is of a call already answered (on an unknown leg: every slot stays).
    UPDATE calls SET state = CASE WHEN p_late THEN 'answered' ELSE 'ringing' END,
                     decision = v_decision,
                     answered_at = CASE WHEN p_late THEN now() END,
                     expires_at = CASE WHEN p_late THEN now() + p_max_duration ELSE expires_at END
    WHERE call_id = p_call_id AND from_tag = p_from_tag;
    INSERT INTO slots (call_id, from_tag, leg, counter)
    SELECT p_call_id, p_from_tag, l, k FROM unnest(v_slot_leg, v_slot_key) AS u(l, k);
    PERFORM apply_counters(v_acquired, 1);
    RETURN v_decision;
END $$;

------------------------------------------------------------------------------------------
-- Answer and release
------------------------------------------------------------------------------------------

-- A 2xx came from p_leg: the slots of every other ringing leg but leg 0 go back. An unknown
-- leg (NULL, or a leg the call did not admit) keeps every slot: never give back what may
-- still be in use. Either way the call is answered: it expires after p_max_duration.
-- Returns false for an unknown, refused, released or already answered call (idempotent).
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
    IF EXISTS (SELECT 1 FROM slots WHERE call_id = p_call_id AND from_tag = p_from_tag
               AND leg = p_leg) THEN
        v_keep := ARRAY[0, p_leg];
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

-- The decision a tombstone answers to an admission.
CREATE FUNCTION released_decision() RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT '{"action": "reject", "why": "released"}'::jsonb
$$;

-- Give back every slot of the given calls, whose rows the caller has locked, and leave a
-- tombstone of each live one (state 'released', kept until now() + p_tombstone_ttl).
-- Counters are locked once, in canonical order, for the whole batch. Returns how many
-- calls were live (ringing or answered); refusals and tombstones are left as they are.
CREATE FUNCTION release_locked(p_call_ids text[], p_from_tags text[], p_tombstone_ttl interval)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_mode  text;
    v_keys  text[];
    v_n     integer;
BEGIN
    -- The counters these calls hold are the same in either mode: lock them, then read the
    -- mode (a change of mode, which locks every counter, has then committed).
    PERFORM lock_counters(ARRAY(
        SELECT DISTINCT s.counter
        FROM slots s JOIN unnest(p_call_ids, p_from_tags) AS u(call_id, from_tag)
             ON s.call_id = u.call_id AND s.from_tag = u.from_tag));
    SELECT counting INTO v_mode FROM settings;

    UPDATE calls c SET state = 'released', decision = released_decision(),
                       expires_at = now() + p_tombstone_ttl
    FROM unnest(p_call_ids, p_from_tags) AS u(call_id, from_tag)
    WHERE c.call_id = u.call_id AND c.from_tag = u.from_tag
      AND c.state IN ('ringing', 'answered');
    GET DIAGNOSTICS v_n = ROW_COUNT;

    -- per_leg gives back one slot per row; per_call one per counter per call.
    WITH gone AS (
        DELETE FROM slots s USING unnest(p_call_ids, p_from_tags) AS u(call_id, from_tag)
        WHERE s.call_id = u.call_id AND s.from_tag = u.from_tag
        RETURNING s.call_id, s.from_tag, s.counter
    ), per_call AS (
        SELECT call_id, from_tag, counter, count(*) AS slots FROM gone
        GROUP BY call_id, from_tag, counter
    )
    SELECT coalesce(array_agg(p.counter), '{}') INTO v_keys
    FROM per_call p
    CROSS JOIN LATERAL generate_series(1, CASE WHEN v_mode = 'per_leg' THEN p.slots ELSE 1 END);
    PERFORM apply_counters(v_keys, -1);
    RETURN v_n;
END $$;

-- The end of a call: give back every slot of the call and leave its tombstone. Returns how
-- many calls were released; releasing twice, or an unknown call, is harmless.
--   p_from_tag NULL: every live call with this Call-ID (an admin's force-release); no
--     tombstone for a call that is not recorded.
--   p_from_tag given and the call not recorded (yet): a tombstone alone, so that an
--     admission arriving later is refused. When an admission of the call is being decided
--     at that very moment, the tombstone's INSERT waits for it to commit (same key), then
--     the committed call is released.
--   p_reason 'cancel': only a call still ringing. A CANCEL that crosses the 200 must not
--     free the slots of a call that goes on.
-- p_tombstone_ttl: how long the tombstone refuses admissions (the INVITE transaction's
-- lifetime: SIDECAR_RINGING_TTL).
CREATE FUNCTION release(p_call_id text, p_from_tag text, p_reason text DEFAULT NULL,
                        p_tombstone_ttl interval DEFAULT interval '180 seconds')
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_states   text[] := CASE WHEN p_reason = 'cancel' THEN '{ringing}'
                              ELSE '{ringing,answered}' END;
    v_inserted integer;
    v_ids      text[];
    v_tags     text[];
BEGIN
    -- (A key longer than the calls table allows belongs to no call: nothing to refuse.)
    IF p_from_tag IS NOT NULL
       AND length(p_call_id) BETWEEN 1 AND 2048 AND length(p_from_tag) <= 512 THEN
        INSERT INTO calls (call_id, from_tag, state, decision, expires_at)
        VALUES (p_call_id, p_from_tag, 'released', released_decision(),
                now() + p_tombstone_ttl)
        ON CONFLICT (call_id, from_tag) DO NOTHING;
        GET DIAGNOSTICS v_inserted = ROW_COUNT;
        IF v_inserted = 1 THEN
            RETURN 0;
        END IF;
    END IF;
    -- The row lock re-reads the state: a call released or answered meanwhile drops out.
    SELECT array_agg(call_id ORDER BY from_tag), array_agg(from_tag ORDER BY from_tag)
    INTO v_ids, v_tags
    FROM (SELECT call_id, from_tag FROM calls
          WHERE call_id = p_call_id AND (p_from_tag IS NULL OR from_tag = p_from_tag)
            AND state = ANY (v_states)
          ORDER BY from_tag FOR UPDATE) c;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    RETURN release_locked(v_ids, v_tags, p_tombstone_ttl);
END $$;

------------------------------------------------------------------------------------------
-- Janitor
------------------------------------------------------------------------------------------

-- Release live calls whose time is up: ringing past the INVITE transaction's lifetime,
-- answered past the maximum duration. SKIP LOCKED lets several sidecar replicas run it at
-- once. The batch is released at once; if that fails, its calls are released one by one,
-- each in its own subtransaction, so that one call that cannot be released (logged as a
-- WARNING, retried at the next run) does not keep the others counted. Returns how many
-- calls were released.
CREATE FUNCTION expire_calls(p_batch integer DEFAULT 500,
                             p_tombstone_ttl interval DEFAULT interval '180 seconds')
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_ids  text[];
    v_tags text[];
    v_n    integer := 0;
BEGIN
    SELECT array_agg(call_id), array_agg(from_tag) INTO v_ids, v_tags
    FROM (SELECT call_id, from_tag FROM calls
          WHERE state IN ('ringing', 'answered') AND expires_at < now()
          ORDER BY expires_at LIMIT p_batch FOR UPDATE SKIP LOCKED) c;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    BEGIN
        RETURN release_locked(v_ids, v_tags, p_tombstone_ttl);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'expire_calls: releasing % calls at once failed (%: %); one by one',
            cardinality(v_ids), SQLSTATE, SQLERRM;
    END;
    -- Every counter of the batch, locked first in canonical order: releasing the calls one
    -- by one then takes no counter lock out of order (no deadlock with admissions).
    PERFORM lock_counters(ARRAY(
        SELECT DISTINCT s.counter
        FROM slots s JOIN unnest(v_ids, v_tags) AS u(call_id, from_tag)
             ON s.call_id = u.call_id AND s.from_tag = u.from_tag));
    FOR i IN 1 .. cardinality(v_ids) LOOP
        BEGIN
            v_n := v_n + release_locked(ARRAY[v_ids[i]], ARRAY[v_tags[i]], p_tombstone_ttl);
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'expire_calls: call % (from-tag %) not released: %: %',
                v_ids[i], v_tags[i], SQLSTATE, SQLERRM;
        END;
    END LOOP;
    RETURN v_n;
END $$;

-- Forget refusals and tombstones past their time (they hold no slot), p_batch at most.
-- Returns how many rows went.
CREATE FUNCTION purge_calls(p_batch integer DEFAULT 5000) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_n integer;
BEGIN
    DELETE FROM calls c
    USING (SELECT call_id, from_tag FROM calls
           WHERE state IN ('refused', 'released') AND expires_at < now()
           ORDER BY expires_at LIMIT p_batch FOR UPDATE SKIP LOCKED) d
    WHERE c.call_id = d.call_id AND c.from_tag = d.from_tag;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    RETURN v_n;
END $$;

------------------------------------------------------------------------------------------
-- Reconciliation
------------------------------------------------------------------------------------------

-- How a Kamailio node's report judges its calls (read only): 'gone' for the calls to release,
-- 'confirmed' for the ringing calls to mark answered. The dialogs are parallel arrays
-- (Call-ID, From-tag, dialog state; a NULL From-tag matches any, a NULL state is unknown;
-- states as Kamailio's: 1 unconfirmed, 2 early, 3 confirmed without ACK yet, 4 confirmed,
-- 5 deleted); p_call_ids NULL: no list, the boot id alone is judged.
--   gone: calls of the node admitted under another boot id (they died with that process),
--         and, with a list, calls older than p_grace (a dialog too young to be listed) that
--         the list lacks or lists as deleted.
--   confirmed: ringing calls of the node the list shows confirmed (3, 4).
-- Set-based, and so that it stays so whatever the planner believes: the list is joined once
-- (hash joins), never scanned once per call. Two settings see to it: plan_cache_mode, so
-- that every call is planned knowing the list's length (a generic plan assumes 10 items);
-- enable_nestloop off, so that a table whose statistics lag (10,000 calls the planner does
-- not know of yet) is not taken for a few rows to loop over, each scanning the whole list.
CREATE FUNCTION judge_node_calls(
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
    SELECT c.call_id, c.from_tag, 'gone' FROM calls c
    WHERE c.node = p_node AND c.state IN ('ringing', 'answered')
      AND c.boot IS NOT NULL AND c.boot <> p_boot
    UNION
    SELECT c.call_id, c.from_tag, 'gone' FROM calls c
    WHERE p_call_ids IS NOT NULL
      AND c.node = p_node AND c.state IN ('ringing', 'answered')
      AND c.created_at < now() - p_grace
      AND NOT EXISTS (
          SELECT 1 FROM unnest(p_call_ids, p_from_tags, p_states) AS d(call_id, from_tag, state)
          WHERE d.call_id = c.call_id AND (d.from_tag IS NULL OR d.from_tag = c.from_tag)
            AND d.state IS DISTINCT FROM 5)
    UNION
    SELECT c.call_id, c.from_tag, 'confirmed' FROM calls c
    WHERE c.node = p_node AND c.state = 'ringing'
      AND EXISTS (
          SELECT 1 FROM unnest(p_call_ids, p_from_tags, p_states) AS d(call_id, from_tag, state)
          WHERE d.call_id = c.call_id AND (d.from_tag IS NULL OR d.from_tag = c.from_tag)
            AND d.state IN (3, 4));
END $$;

-- A Kamailio node reports in, with its boot id and, optionally, the dialogs it holds (see
-- judge_node_calls()). Calls judged gone are released; ringing calls it shows confirmed are
-- answered on an unknown leg, as an answer would (a lost answer must never let the ringing
-- TTL release a live call). Rows locked elsewhere are skipped: the next heartbeat sees them
-- again. Returns how many calls were released and how many marked answered.
CREATE FUNCTION reconcile_node(
    p_node          text,
    p_boot          text,
    p_call_ids      text[],
    p_from_tags     text[],
    p_states        integer[],
    p_grace         interval,
    p_tombstone_ttl interval,
    p_max_duration  interval,
    OUT released    integer,
    OUT answered    integer
) LANGUAGE plpgsql AS $$
DECLARE
    v_gone_ids  text[];
    v_gone_tags text[];
    v_conf_ids  text[];
    v_conf_tags text[];
    v_ids       text[];
    v_tags      text[];
BEGIN
    SELECT array_agg(j.id) FILTER (WHERE j.verdict = 'gone'),
           array_agg(j.tag) FILTER (WHERE j.verdict = 'gone'),
           array_agg(j.id) FILTER (WHERE j.verdict = 'confirmed'),
           array_agg(j.tag) FILTER (WHERE j.verdict = 'confirmed')
    INTO v_gone_ids, v_gone_tags, v_conf_ids, v_conf_tags
    FROM judge_node_calls(p_node, p_boot, p_call_ids, p_from_tags, p_states, p_grace) j;

    -- The lock reads the rows afresh: a call that ended meanwhile drops out.
    SELECT array_agg(c.call_id), array_agg(c.from_tag) INTO v_ids, v_tags
    FROM (SELECT c.call_id, c.from_tag
          FROM calls c JOIN unnest(v_gone_ids, v_gone_tags) AS u(call_id, from_tag)
               ON c.call_id = u.call_id AND c.from_tag = u.from_tag
          WHERE c.state IN ('ringing', 'answered')
          FOR UPDATE OF c SKIP LOCKED) c;
    released := CASE WHEN v_ids IS NULL THEN 0
                     ELSE release_locked(v_ids, v_tags, p_tombstone_ttl) END;

    UPDATE calls c SET state = 'answered', answered_leg = NULL, answered_at = now(),
                       expires_at = now() + p_max_duration
    FROM (SELECT c.call_id, c.from_tag
          FROM calls c JOIN unnest(v_conf_ids, v_conf_tags) AS u(call_id, from_tag)
               ON c.call_id = u.call_id AND c.from_tag = u.from_tag
          WHERE c.state = 'ringing'
          FOR UPDATE OF c SKIP LOCKED) f
    WHERE c.call_id = f.call_id AND c.from_tag = f.from_tag;
    GET DIAGNOSTICS answered = ROW_COUNT;
END $$;
