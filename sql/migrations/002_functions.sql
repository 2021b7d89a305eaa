-- 002: integrity triggers, and the call-control functions: admit, answer, release,
-- expire, reconcile and rebuild. Each is one round trip from the sidecar.
--
-- Locking discipline (no deadlocks): a function that changes counters first locks every
-- accounts row it may touch in id order, then every channels row in id order.

------------------------------------------------------------------------------------------
-- Integrity
------------------------------------------------------------------------------------------

-- Reject loops in the account tree. Tree changes are serialised by an advisory lock so that
-- two concurrent updates cannot close a loop together.
CREATE FUNCTION accounts_no_loop() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_cur  text := NEW.parent;
    v_seen integer := 0;
BEGIN
    IF NEW.parent IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('sidecar.accounts.tree'));
    WHILE v_cur IS NOT NULL LOOP
        IF v_cur = NEW.id THEN
            RAISE EXCEPTION 'account % would be its own ancestor (loop through %)', NEW.id, NEW.parent
                USING ERRCODE = 'check_violation', CONSTRAINT = 'accounts_no_loop';
        END IF;
        v_seen := v_seen + 1;
        IF v_seen > 10000 THEN
            RAISE EXCEPTION 'account tree too deep at %', NEW.id USING ERRCODE = 'check_violation';
        END IF;
        SELECT parent INTO v_cur FROM accounts WHERE id = v_cur;
    END LOOP;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER accounts_no_loop
    AFTER INSERT OR UPDATE OF parent ON accounts
    DEFERRABLE INITIALLY IMMEDIATE
    FOR EACH ROW EXECUTE FUNCTION accounts_no_loop();

-- A counter row created while calls still hold its slots (an account deleted and added back)
-- starts from those slots, so that releasing them can never drive it negative.
CREATE FUNCTION counters_from_slots() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_mode text := (SELECT counting FROM settings);
    v_kind text := CASE TG_TABLE_NAME WHEN 'accounts' THEN 'account' ELSE 'channel' END;
BEGIN
    NEW.calls_active := slot_count(v_kind || ':' || NEW.id || ':calls', v_mode);
    IF TG_TABLE_NAME = 'accounts' THEN
        NEW.public_active := slot_count('account:' || NEW.id || ':public', v_mode);
        NEW.internal_active := slot_count('account:' || NEW.id || ':internal', v_mode);
    END IF;
    RETURN NEW;
END $$;

-- How many slots a counter holds, from the call records.
CREATE FUNCTION slot_count(p_counter text, p_mode text) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_mode = 'per_call'
                THEN count(DISTINCT (call_id, from_tag))
                ELSE count(*) END::integer
    FROM slots WHERE counter = p_counter
$$;

CREATE TRIGGER accounts_counters BEFORE INSERT ON accounts
    FOR EACH ROW EXECUTE FUNCTION counters_from_slots();
CREATE TRIGGER channels_counters BEFORE INSERT ON channels
    FOR EACH ROW EXECUTE FUNCTION counters_from_slots();

------------------------------------------------------------------------------------------
-- Lookups
------------------------------------------------------------------------------------------

-- The account and all its ancestors, nearest first.
-- (PL/pgSQL rather than SQL: its plans are cached per session; a SQL function that cannot
-- be inlined is planned again at every call, which costs more than running it.)
CREATE FUNCTION account_chain(p_account text) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (WITH RECURSIVE up(id, parent, depth) AS (
        SELECT id, parent, 0 FROM accounts WHERE id = p_account
        UNION ALL
        SELECT a.id, a.parent, up.depth + 1
        FROM accounts a JOIN up ON a.id = up.parent
        WHERE up.depth < 1000
    )
    SELECT coalesce(array_agg(id::text ORDER BY depth), '{}') FROM up);
END $$;

-- Channels that may carry a call to p_number, in the order they are tried:
-- longest matching prefix first, then lowest priority, then id.
CREATE FUNCTION channel_candidates(p_number text) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(array_agg(id ORDER BY best DESC, priority, id), '{}')
    FROM (
        SELECT c.id::text AS id, c.priority, max(length(p)) AS best
        FROM channels c, unnest(c.prefixes) AS p
        WHERE c.gateway IS NOT NULL AND left(p_number, length(p)) = p
        GROUP BY c.id, c.priority
    ) m);
END $$;

-- Lock the counter rows behind these keys, accounts then channels, each in id order.
CREATE FUNCTION lock_counters(p_keys text[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM accounts
    WHERE id IN (SELECT split_part(k, ':', 2) FROM unnest(p_keys) k WHERE k LIKE 'account:%')
    ORDER BY id FOR UPDATE;
    PERFORM 1 FROM channels
    WHERE id IN (SELECT split_part(k, ':', 2) FROM unnest(p_keys) k WHERE k LIKE 'channel:%')
    ORDER BY id FOR UPDATE;
END $$;

-- Add p_sign for every occurrence of a key (a key listed twice moves twice).
-- The rows must already be locked (lock_counters).
CREATE FUNCTION apply_counters(p_keys text[], p_sign integer) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(p_keys) = 0 THEN
        RETURN;
    END IF;
    UPDATE accounts a
    SET calls_active = a.calls_active + p_sign * d.calls,
        public_active = a.public_active + p_sign * d.public,
        internal_active = a.internal_active + p_sign * d.internal
    FROM (
        SELECT split_part(k, ':', 2) AS id,
               count(*) FILTER (WHERE split_part(k, ':', 3) = 'calls') AS calls,
               count(*) FILTER (WHERE split_part(k, ':', 3) = 'public') AS public,
               count(*) FILTER (WHERE split_part(k, ':', 3) = 'internal') AS internal
        FROM unnest(p_keys) k WHERE k LIKE 'account:%' GROUP BY 1
    ) d
    WHERE a.id = d.id;
    UPDATE channels c
    SET calls_active = c.calls_active + p_sign * d.n
    FROM (
        SELECT split_part(k, ':', 2) AS id, count(*) AS n
        FROM unnest(p_keys) k WHERE k LIKE 'channel:%' GROUP BY 1
    ) d
    WHERE c.id = d.id;
END $$;

-- The counter keys a call's slots stand for: per_leg one per slot, per_call one per key.
CREATE FUNCTION held_keys(p_call_id text, p_from_tag text, p_mode text, p_legs integer[] DEFAULT NULL)
RETURNS text[] LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT coalesce(
        CASE WHEN p_mode = 'per_call' THEN array_agg(DISTINCT counter) ELSE array_agg(counter) END,
        '{}')
    FROM slots
    WHERE call_id = p_call_id AND from_tag = p_from_tag
      AND (p_legs IS NULL OR leg = ANY(p_legs)));
END $$;

------------------------------------------------------------------------------------------
-- Admission
------------------------------------------------------------------------------------------

-- Decide one call. Returns the decision as jsonb:
--   {"action": "relay", "legs": [{"leg": n, "uri": ..., "lookup": bool, "class": ...}], ...}
--   {"action": "reject", "why": "limit_origin"|"limit_destination", "counter": key, ...}
--   {"action": "reject", "why": "forbidden"|"not_found"}      (nothing recorded)
--   {"action": "challenge"}                                      (nothing recorded)
-- A call already decided returns its first decision with "repeat": true.
-- p_force (fail-open catch-up, shadow mode) admits every leg whatever the limits and reports
-- what would have been refused under "shadow".
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
    p_ring_ttl  interval
) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
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
    -- 1. A call already decided (retransmission, spiral, second sidecar): first decision.
    SELECT decision INTO v_decision FROM calls WHERE call_id = p_call_id AND from_tag = p_from_tag;
    IF FOUND THEN
        RETURN v_decision || '{"repeat": true}';
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

    -- 4. Claim the call: a concurrent admission of the same call waits here for the first
    --    one to commit, then returns its decision.
    INSERT INTO calls (call_id, from_tag, state, origin, destination, node, boot, late,
                       decision, expires_at)
    VALUES (p_call_id, p_from_tag, 'refused', v_origin, p_to_user, p_node, p_boot, p_force,
            '{}', now() + p_ring_ttl)
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS v_inserted = ROW_COUNT;
    IF v_inserted = 0 THEN
        SELECT decision INTO v_decision FROM calls WHERE call_id = p_call_id AND from_tag = p_from_tag;
        RETURN v_decision || '{"repeat": true}';
    END IF;

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
    FOR i IN 1 .. v_n LOOP
        FOREACH v_k IN ARRAY ARRAY[l_from_ext[i], l_to_ext[i]] LOOP
            IF v_k IS NOT NULL AND NOT v_chains ? v_k THEN
                v_chains := v_chains || jsonb_build_object(v_k,
                    to_jsonb(account_chain((SELECT account FROM extensions WHERE id = v_k))));
            END IF;
        END LOOP;
        IF l_number[i] IS NOT NULL AND NOT v_cands ? l_number[i] THEN
            v_cands := v_cands || jsonb_build_object(l_number[i], to_jsonb(channel_candidates(l_number[i])));
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
        ORDER BY id FOR UPDATE
    ), chan AS (
        SELECT id, calls_limit - calls_active AS c
        FROM channels
        WHERE id IN (SELECT split_part(k, ':', 2) FROM unnest(v_all_keys) k WHERE k LIKE 'channel:%')
        ORDER BY id FOR UPDATE
    )
    SELECT coalesce(jsonb_object_agg(k, r) FILTER (WHERE r IS NOT NULL), '{}') INTO v_room FROM (
        SELECT 'account:' || id || ':calls' AS k, c AS r FROM acc
        UNION ALL SELECT 'account:' || id || ':public', p FROM acc
        UNION ALL SELECT 'account:' || id || ':internal', n FROM acc
        UNION ALL SELECT 'channel:' || id || ':calls', c FROM chan
    ) s;
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
            IF v_refusal IS NULL AND (i = 1 OR i = 2) THEN
                v_refusal := jsonb_build_object(
                    'why', CASE WHEN i = 1 AND v_full LIKE 'account:%'
                                     AND split_part(v_full, ':', 2) = ANY (v_origin_accs)
                                THEN 'limit_origin' ELSE 'limit_destination' END,
                    'counter', v_full, 'leg', i - 1);
            END IF;
            IF p_force THEN
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

    -- 8. Outcome: refused when leg 0 is, or when nothing rings.
    IF jsonb_array_length(v_legs_out) = 0 THEN
        v_decision := jsonb_build_object('action', 'reject', 'limit', true)
                      || coalesce(v_refusal, '{"why": "limit_destination"}');
        UPDATE calls SET decision = v_decision WHERE call_id = p_call_id AND from_tag = p_from_tag;
        RETURN v_decision;
    END IF;

    v_decision := jsonb_build_object('action', 'relay', 'legs', v_legs_out);
    IF v_shadow IS NOT NULL THEN
        v_decision := v_decision || jsonb_build_object('shadow', v_shadow);
    END IF;
    UPDATE calls SET state = 'ringing', decision = v_decision
    WHERE call_id = p_call_id AND from_tag = p_from_tag;
    INSERT INTO slots (call_id, from_tag, leg, counter)
    SELECT p_call_id, p_from_tag, l, k FROM unnest(v_slot_leg, v_slot_key) AS u(l, k);
    PERFORM apply_counters(v_acquired, 1);
    RETURN v_decision;
END $$;

------------------------------------------------------------------------------------------
-- Answer and release
------------------------------------------------------------------------------------------

-- A 2xx came from p_leg: the slots of every other ringing leg but leg 0 go back.
-- Returns false for an unknown, refused or already answered call (idempotent).
CREATE FUNCTION answer(p_call_id text, p_from_tag text, p_leg integer, p_max_duration interval)
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
    SELECT counting INTO v_mode FROM settings;
    -- An unknown leg keeps every slot: never give back what may still be in use.
    IF EXISTS (SELECT 1 FROM slots WHERE call_id = p_call_id AND from_tag = p_from_tag
               AND leg = p_leg) THEN
        v_keep := ARRAY[0, p_leg];
        IF v_mode = 'per_leg' THEN
            SELECT coalesce(array_agg(counter), '{}') INTO v_drop FROM slots
            WHERE call_id = p_call_id AND from_tag = p_from_tag AND NOT leg = ANY (v_keep);
        ELSE
            SELECT coalesce(array_agg(k), '{}') INTO v_drop
            FROM unnest(held_keys(p_call_id, p_from_tag, v_mode)) k
            WHERE NOT k = ANY (held_keys(p_call_id, p_from_tag, v_mode, v_keep));
        END IF;
        PERFORM lock_counters(v_drop);
        DELETE FROM slots WHERE call_id = p_call_id AND from_tag = p_from_tag
            AND NOT leg = ANY (v_keep);
        PERFORM apply_counters(v_drop, -1);
    END IF;
    UPDATE calls SET state = 'answered', answered_leg = p_leg, answered_at = now(),
                     expires_at = now() + p_max_duration
    WHERE call_id = p_call_id AND from_tag = p_from_tag;
    RETURN true;
END $$;

-- Give back every slot of the given calls, whose rows the caller has locked, and forget them.
-- Counters are locked once, in canonical order, for the whole batch. Returns how many of
-- them held slots (refused records hold none).
CREATE FUNCTION release_locked(p_call_ids text[], p_from_tags text[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_mode  text;
    v_keys  text[];
    v_n     integer;
BEGIN
    SELECT counting INTO v_mode FROM settings;
    SELECT coalesce(array_agg(k), '{}') INTO v_keys
    FROM unnest(p_call_ids, p_from_tags) AS c(call_id, from_tag),
         LATERAL unnest(held_keys(c.call_id, c.from_tag, v_mode)) k;
    PERFORM lock_counters(v_keys);
    DELETE FROM calls c USING unnest(p_call_ids, p_from_tags) AS u(call_id, from_tag)
    WHERE c.call_id = u.call_id AND c.from_tag = u.from_tag AND c.state <> 'refused';
    GET DIAGNOSTICS v_n = ROW_COUNT;
    DELETE FROM calls c USING unnest(p_call_ids, p_from_tags) AS u(call_id, from_tag)
    WHERE c.call_id = u.call_id AND c.from_tag = u.from_tag;
    PERFORM apply_counters(v_keys, -1);
    RETURN v_n;
END $$;

-- Give back every slot of a call (every call with this Call-ID when p_from_tag is NULL) and
-- forget it. Returns how many calls held slots. Unknown calls are harmless.
CREATE FUNCTION release(p_call_id text, p_from_tag text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_ids  text[];
    v_tags text[];
BEGIN
    SELECT array_agg(call_id ORDER BY from_tag), array_agg(from_tag ORDER BY from_tag)
    INTO v_ids, v_tags
    FROM (SELECT call_id, from_tag FROM calls
          WHERE call_id = p_call_id AND (p_from_tag IS NULL OR from_tag = p_from_tag)
          ORDER BY from_tag FOR UPDATE) c;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    RETURN release_locked(v_ids, v_tags);
END $$;

-- Release calls whose time is up: ringing past the INVITE transaction's lifetime, answered
-- past the maximum duration, refused records past their retransmission window.
-- SKIP LOCKED lets several sidecar replicas run it at once.
CREATE FUNCTION expire_calls(p_batch integer DEFAULT 500) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_ids  text[];
    v_tags text[];
BEGIN
    SELECT array_agg(call_id), array_agg(from_tag) INTO v_ids, v_tags
    FROM (SELECT call_id, from_tag FROM calls WHERE expires_at < now()
          ORDER BY expires_at LIMIT p_batch FOR UPDATE SKIP LOCKED) c;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    RETURN release_locked(v_ids, v_tags);
END $$;

-- A Kamailio node reports in. Calls it admitted under another boot id died with that
-- process. With a dialog list, calls of the node older than p_grace that it no longer
-- knows are released too. Returns the number of calls released.
CREATE FUNCTION reconcile_node(p_node text, p_boot text, p_dialogs jsonb, p_grace interval)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_ids  text[];
    v_tags text[];
BEGIN
    SELECT array_agg(call_id), array_agg(from_tag) INTO v_ids, v_tags
    FROM (SELECT c.call_id, c.from_tag FROM calls c
          WHERE c.node = p_node AND c.state <> 'refused'
            -- A call recorded without a boot id (no heartbeat support) is never judged by it.
            AND ((c.boot IS NOT NULL AND c.boot <> p_boot)
                 OR (p_dialogs IS NOT NULL AND c.created_at < now() - p_grace
                     AND NOT EXISTS (
                         SELECT 1 FROM jsonb_array_elements(p_dialogs) d
                         WHERE d ->> 'call_id' = c.call_id
                           AND coalesce(d ->> 'from_tag', c.from_tag) = c.from_tag)))
          FOR UPDATE SKIP LOCKED) c;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    RETURN release_locked(v_ids, v_tags);
END $$;

------------------------------------------------------------------------------------------
-- Rebuild
------------------------------------------------------------------------------------------

-- Every counter as the call records say it should be.
CREATE FUNCTION expected_counters() RETURNS TABLE (counter text, active integer)
LANGUAGE sql STABLE AS $$
    SELECT counter,
           CASE WHEN (SELECT counting FROM settings) = 'per_call'
                THEN count(DISTINCT (call_id, from_tag)) ELSE count(*) END::integer
    FROM slots GROUP BY counter
$$;

-- Live counters that differ from the call records (empty when nothing drifted).
CREATE FUNCTION counter_drift() RETURNS TABLE (counter text, live integer, expected integer)
LANGUAGE sql STABLE AS $$
    WITH live AS (
        SELECT 'account:' || id || ':calls' AS counter, calls_active AS n FROM accounts
        UNION ALL SELECT 'account:' || id || ':public', public_active FROM accounts
        UNION ALL SELECT 'account:' || id || ':internal', internal_active FROM accounts
        UNION ALL SELECT 'channel:' || id || ':calls', calls_active FROM channels
    )
    SELECT l.counter, l.n, coalesce(e.active, 0)
    FROM live l LEFT JOIN expected_counters() e USING (counter)
    WHERE l.n <> coalesce(e.active, 0)
$$;

-- Set every counter from the call records. Returns how many counters changed.
CREATE FUNCTION rebuild_counters() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_changed integer;
BEGIN
    PERFORM 1 FROM accounts ORDER BY id FOR UPDATE;
    PERFORM 1 FROM channels ORDER BY id FOR UPDATE;
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

-- Changing the counting mode recounts everything under the new rule.
CREATE FUNCTION settings_recount() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM rebuild_counters();
    RETURN NULL;
END $$;
CREATE TRIGGER settings_recount AFTER UPDATE OF counting ON settings
    FOR EACH ROW WHEN (OLD.counting IS DISTINCT FROM NEW.counting)
    EXECUTE FUNCTION settings_recount();

-- Notify listeners (sidecar caches, dashboards) that the configuration changed. Counter
-- updates touch only the *_active columns and notify nobody.
CREATE FUNCTION config_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sidecar_config', TG_TABLE_NAME);
    RETURN NULL;
END $$;
CREATE TRIGGER accounts_changed
    AFTER INSERT OR DELETE OR UPDATE OF id, name, parent, calls_limit, public_limit, internal_limit
    ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION config_changed();
CREATE TRIGGER channels_changed
    AFTER INSERT OR DELETE OR UPDATE OF id, name, calls_limit, sources, gateway, prefixes, priority
    ON channels
    FOR EACH STATEMENT EXECUTE FUNCTION config_changed();
CREATE TRIGGER extensions_changed AFTER INSERT OR UPDATE OR DELETE ON extensions
    FOR EACH STATEMENT EXECUTE FUNCTION config_changed();
CREATE TRIGGER numbers_changed AFTER INSERT OR UPDATE OR DELETE ON numbers
    FOR EACH STATEMENT EXECUTE FUNCTION config_changed();
CREATE TRIGGER settings_changed AFTER UPDATE ON settings
    FOR EACH STATEMENT EXECUTE FUNCTION config_changed();
