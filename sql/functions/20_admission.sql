-- Admission: the counting rules, in the order the product documents them (docs/ and
-- tests/model.py, the reference model the property test holds these functions to).
--
--   call_origin()   who is calling: an extension (digest, or source address) or a carrier
--   call_legs()     the legs of the call: leg 0 to what was dialled, then the forward targets
--   plan_leg()      one leg: its class, the counters it needs (leg_keys), its channels
--   decide_leg()    whether a leg has room, and through which channel
--   batch_known()   what is known already of each call of a batch (retransmissions)
--   admit_batch()   a batch of INVITEs in arrival order: classify them all, then
--   decide_batch()  lock and read every counter they may need once, decide each call in
--                   memory, write the calls (one row each) in one INSERT, and move every
--                   counter of the batch in one UPDATE
--   admit_planned() admit_batch() with the calls classified by the sidecar from its cache
--                   of the configuration, when that cache is the current generation
--
-- Applied by every `sidecar migrate` (CREATE OR REPLACE), after sql/migrations/.

-- A phone number: what alone may leave through a channel.
CREATE OR REPLACE FUNCTION is_phone(p_user text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(p_user ~ '^\+?[0-9*#]{1,32}$', false)
$$;

-- Channels that may carry a call to p_number, in the order they are tried:
-- longest matching prefix first, then lowest priority, then id. (A sorted subquery with the
-- best prefix of each channel beside it: a third cheaper than grouping the channels' prefixes.)
CREATE OR REPLACE FUNCTION channel_candidates(p_number text) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN ARRAY(
        SELECT c.id::text
        FROM channels c,
             LATERAL (SELECT max(length(p)) AS best FROM unnest(c.prefixes) AS p
                      WHERE left(p_number, length(p)) = p) m
        WHERE c.gateway IS NOT NULL AND m.best IS NOT NULL
        ORDER BY m.best DESC, c.priority, c.id);
END $$;

-- The local extension a user part names: an extension id, or a number routed to one.
CREATE OR REPLACE FUNCTION local_extension(p_user text) RETURNS extensions
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_ext extensions%ROWTYPE;
BEGIN
    SELECT * INTO v_ext FROM extensions WHERE id = p_user;
    IF NOT FOUND THEN
        SELECT e.* INTO v_ext FROM numbers n JOIN extensions e ON e.id = n.extension
        WHERE n.number = p_user;
    END IF;
    RETURN v_ext;
END $$;

-- Who is calling. A digest-authenticated extension; else, by source address, the extension
-- named in From, a carrier's channel, any extension; else a challenge when From names an
-- extension with a password, a refusal otherwise (verdict set, nothing else).
CREATE OR REPLACE FUNCTION call_origin(p_source inet, p_from_user text, p_auth_user text,
                                       OUT ext text, OUT account text, OUT chan text,
                                       OUT verdict jsonb)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_auth_user IS NOT NULL THEN
        SELECT e.id, e.account INTO ext, account FROM extensions e
        WHERE e.id = p_auth_user AND e.ha1 IS NOT NULL;
        IF NOT FOUND THEN
            verdict := '{"action": "reject", "why": "forbidden"}';
        END IF;
        RETURN;
    END IF;
    SELECT e.id, e.account INTO ext, account FROM extensions e
    WHERE cardinality(e.sources) > 0 AND p_source <<= ANY (e.sources) AND e.id = p_from_user;
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT c.id INTO chan FROM channels c
    WHERE p_source <<= ANY (c.sources) ORDER BY c.priority, c.id LIMIT 1;
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT e.id, e.account INTO ext, account FROM extensions e
    WHERE cardinality(e.sources) > 0 AND p_source <<= ANY (e.sources) ORDER BY e.id LIMIT 1;
    IF FOUND THEN
        RETURN;
    END IF;
    verdict := CASE WHEN EXISTS (SELECT 1 FROM extensions
                                 WHERE id = p_from_user AND ha1 IS NOT NULL)
                    THEN '{"action": "challenge"}'
                    ELSE '{"action": "reject", "why": "forbidden"}' END;
END $$;

-- The account counters a leg needs: for each end that is an extension (its account chain
-- given, nearest first), origin side first, every account of its chain, 'calls' then the
-- leg's class; each key once.
CREATE OR REPLACE FUNCTION leg_keys(p_from_chain text[], p_to_chain text[], p_class text)
RETURNS text[] LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_keys text[] := '{}';
    v_acc  text;
    v_key  text;
BEGIN
    FOREACH v_acc IN ARRAY coalesce(p_from_chain, '{}') || coalesce(p_to_chain, '{}') LOOP
        FOREACH v_key IN ARRAY ARRAY['account:' || v_acc || ':calls',
                                     'account:' || v_acc || ':' || p_class] LOOP
            IF NOT v_key = ANY (v_keys) THEN
                v_keys := v_keys || v_key;
            END IF;
        END LOOP;
    END LOOP;
    RETURN v_keys;
END $$;

-- One leg, from an extension (its account chain p_from_chain; or a carrier, p_in_chan) to an
-- extension or an external number. NULL when it is no leg: an external end that no channel
-- can carry (an unroutable forward target) holds nothing and does not ring.
CREATE OR REPLACE FUNCTION plan_leg(p_leg integer, p_from_chain text[], p_in_chan text,
                                    p_to extensions, p_number text, p_rings boolean,
                                    p_origin_accounts text[])
RETURNS planned_leg LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_class text := CASE WHEN p_from_chain IS NOT NULL AND p_to.id IS NOT NULL
                         THEN 'internal' ELSE 'public' END;
    v_chans text[];
BEGIN
    IF p_in_chan IS NOT NULL THEN
        v_chans := ARRAY[p_in_chan];
    ELSIF p_to.id IS NULL AND is_phone(p_number) THEN
        v_chans := channel_candidates(p_number);
    ELSE
        v_chans := '{}';
    END IF;
    IF p_to.id IS NULL AND cardinality(v_chans) = 0 THEN
        RETURN NULL;
    END IF;
    RETURN ROW(NULL, p_leg, p_to.id, CASE WHEN p_to.id IS NULL THEN p_number END, v_class,
               leg_keys(p_from_chain,
                        CASE WHEN p_to.id IS NOT NULL THEN account_chain(p_to.account) END,
                        v_class),
               v_chans, p_rings, p_to.contact, p_origin_accounts)::planned_leg;
END $$;

-- The legs of a call, in order: leg 0 from the origin to what was dialled; then, when the
-- destination forwards, one leg per forward target and ring_self last (leg 0 then rings
-- nothing: it only carries the caller's counters). NULL: nothing can be reached (an unknown
-- destination, or a number no channel carries, or a carrier dialling out).
CREATE OR REPLACE FUNCTION call_legs(p_from_ext text, p_from_account text, p_in_chan text,
                                     p_to_user text)
RETURNS planned_leg[] LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_dest     extensions := local_extension(p_to_user);
    -- the caller's account chain (NULL for a carrier)
    v_accounts text[] := CASE WHEN p_from_ext IS NOT NULL THEN account_chain(p_from_account) END;
    v_dest_chain text[];
    v_forwards boolean;
    v_legs     planned_leg[];
    v_leg      planned_leg;
    v_target   text;
    v_n        integer := 0;
BEGIN
    IF v_dest.id IS NULL AND (p_in_chan IS NOT NULL OR NOT is_phone(p_to_user)) THEN
        RETURN NULL;
    END IF;
    v_leg := plan_leg(0, v_accounts, p_in_chan, v_dest, p_to_user, true,
                      coalesce(v_accounts, '{}'));
    IF v_leg.leg IS NULL THEN   -- an external number no channel carries
        RETURN NULL;
    END IF;
    v_forwards := v_dest.id IS NOT NULL
                  AND (cardinality(v_dest.forward) > 0 OR v_dest.ring_self);
    v_leg.rings := NOT v_forwards;
    v_legs := ARRAY[v_leg];
    IF v_forwards THEN
        v_dest_chain := account_chain(v_dest.account);
        FOREACH v_target IN ARRAY v_dest.forward LOOP
            v_n := v_n + 1;
            v_leg := plan_leg(v_n, v_dest_chain, NULL, local_extension(v_target), v_target,
                              true, v_accounts);
            IF v_leg.leg IS NOT NULL THEN   -- (a row IS NOT NULL only when no field is)
                v_legs := v_legs || v_leg;
            END IF;
        END LOOP;
        IF v_dest.ring_self THEN
            v_legs := v_legs || plan_leg(v_n + 1, v_dest_chain, NULL, v_dest, NULL, true,
                                         v_accounts);
        END IF;
    END IF;
    RETURN v_legs;
END $$;

-- Whether a leg has room: the first of its account counters that is full, else the first of
-- its channels with room. A counter has room when one more slot stays within its limit (a
-- NULL limit has no entry in p_room: always room); per_call, a counter the call already
-- holds needs no more room. full_at: the counter that refuses the leg (a full channel is named
-- by the first channel tried), or NULL; chan: the channel the leg uses, or NULL.
CREATE OR REPLACE FUNCTION decide_leg(p_leg planned_leg, p_mode text, p_room jsonb,
                                      p_held text[], OUT full_at text, OUT chan text)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_key text;
    v_ch  text;
BEGIN
    FOREACH v_key IN ARRAY p_leg.keys LOOP
        IF (p_mode = 'per_leg' OR NOT v_key = ANY (p_held))
           AND (p_room ->> v_key)::integer < 1 THEN
            full_at := v_key;
            RETURN;
        END IF;
    END LOOP;
    FOREACH v_ch IN ARRAY p_leg.chans LOOP
        v_key := 'channel:' || v_ch || ':calls';
        IF (p_mode = 'per_call' AND v_key = ANY (p_held))
           OR coalesce((p_room ->> v_key)::integer, 1) >= 1 THEN
            chan := v_ch;
            RETURN;
        END IF;
    END LOOP;
    IF cardinality(p_leg.chans) > 0 THEN
        full_at := 'channel:' || p_leg.chans[1] || ':calls';
    END IF;
END $$;

-- Lock the counter rows behind p_keys (canonical order) and read the room each has left:
-- {key: limit - active} for every counter with a limit, the channels' gateways, and the
-- calls-per-second buckets of the rows with a cps limit, refilled to now:
-- {"account:<id>:cps" | "channel:<id>:cps": tokens} (migration 006).
CREATE OR REPLACE FUNCTION counters_room(p_keys text[], OUT room jsonb, OUT gateways jsonb,
                                         OUT cps jsonb)
LANGUAGE plpgsql AS $$
BEGIN
    WITH acc AS (
        SELECT id, calls_limit - calls_active AS c, public_limit - public_active AS p,
               internal_limit - internal_active AS n, cps_limit, cps_burst, cps_tokens, cps_at
        FROM accounts
        WHERE id IN (SELECT split_part(k, ':', 2) FROM unnest(p_keys) k WHERE k LIKE 'account:%')
        ORDER BY id FOR NO KEY UPDATE
    ), chan AS (
        SELECT id, calls_limit - calls_active AS c, gateway, cps_limit, cps_burst, cps_tokens,
               cps_at
        FROM channels
        WHERE id IN (SELECT split_part(k, ':', 2) FROM unnest(p_keys) k WHERE k LIKE 'channel:%')
        ORDER BY id FOR NO KEY UPDATE
    ), buckets AS (
        SELECT 'account:' || id || ':cps' AS k, cps_limit, cps_burst, cps_tokens, cps_at
        FROM acc WHERE cps_limit IS NOT NULL
        UNION ALL
        SELECT 'channel:' || id || ':cps', cps_limit, cps_burst, cps_tokens, cps_at
        FROM chan WHERE cps_limit IS NOT NULL
    )
    SELECT (SELECT coalesce(jsonb_object_agg(k, r) FILTER (WHERE r IS NOT NULL), '{}') FROM (
                SELECT 'account:' || id || ':calls' AS k, c AS r FROM acc
                UNION ALL SELECT 'account:' || id || ':public', p FROM acc
                UNION ALL SELECT 'account:' || id || ':internal', n FROM acc
                UNION ALL SELECT 'channel:' || id || ':calls', c FROM chan) s),
           (SELECT coalesce(jsonb_object_agg(id, gateway), '{}') FROM chan),
           (SELECT coalesce(jsonb_object_agg(k, least(
                coalesce(cps_burst, cps_limit)::float8,
                coalesce(cps_tokens, coalesce(cps_burst, cps_limit)::float8)
                + extract(epoch FROM now() - coalesce(cps_at, now())) * cps_limit)), '{}')
            FROM buckets)
    INTO room, gateways, cps;
END $$;

-- Keep the calls-per-second buckets as a batch left them ({key: tokens} as of now()).
CREATE OR REPLACE FUNCTION store_cps(p_cps jsonb) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF p_cps = '{}' THEN
        RETURN;
    END IF;
    UPDATE accounts a SET cps_tokens = b.value::float8, cps_at = now()
    FROM jsonb_each_text(p_cps) b
    WHERE b.key LIKE 'account:%' AND a.id = split_part(b.key, ':', 2);
    UPDATE channels c SET cps_tokens = b.value::float8, cps_at = now()
    FROM jsonb_each_text(p_cps) b
    WHERE b.key LIKE 'channel:%' AND c.id = split_part(b.key, ':', 2);
END $$;

-- The calls-per-second bucket a call would take a token from, for each counter it holds:
-- every account and channel it touches, once.
CREATE OR REPLACE FUNCTION cps_keys(p_slot_keys text[]) RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
    SELECT ARRAY(SELECT DISTINCT regexp_replace(k, ':[a-z]+$', ':cps') FROM unnest(p_slot_keys) k)
$$;

-- Write the calls a batch decided, in order: one INSERT for the batch (a statement per call
-- cost more than the row it wrote).
CREATE OR REPLACE FUNCTION write_calls(p_rows calls[]) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO calls (call_id, from_tag, state, origin, destination, node, boot, late,
                       decision, answered_at, expires_at, slot_legs, slot_keys)
    SELECT call_id, from_tag, state, origin, destination, node, boot, late,
           decision, answered_at, expires_at, slot_legs, slot_keys
    FROM unnest(p_rows);
END $$;

-- The first step of admit_batch() and admit_planned(), per call of a batch: what is known
-- of it already (decided: known_call(), a retransmission or a call released before), and
-- whether it was asked before in the same batch (again: decide_batch() decides it in its
-- turn, after its twin is written). Only the others are classified.
CREATE OR REPLACE FUNCTION batch_known(
    p_call_ids text[], p_from_tags text[], p_lates boolean[], p_max_duration interval,
    OUT decided jsonb[], OUT again boolean[]
) LANGUAGE plpgsql AS $$
DECLARE
    v_seen text[] := '{}';          -- the calls looked at so far, as [call_id, from_tag]
    v_key  text;
BEGIN
    decided := '{}';
    again := '{}';
    FOR i IN 1 .. coalesce(cardinality(p_call_ids), 0) LOOP
        decided := decided || NULL::jsonb;
        v_key := jsonb_build_array(p_call_ids[i], p_from_tags[i])::text;
        again := again || (v_key = ANY (v_seen));
        CONTINUE WHEN again[i];
        v_seen := v_seen || v_key;
        decided[i] := known_call(p_call_ids[i], p_from_tags[i], p_lates[i], p_max_duration);
    END LOOP;
END $$;

-- Decide several initial INVITEs in arrival order; returns the decisions in the same order,
-- as jsonb text:
--   {"action": "relay", "legs": [{"leg", "uri", "lookup", "class", "to", "channel"}, ...]}
--   {"action": "reject", "limit": true, "why": "limit_origin"|"limit_destination",
--    "counter": key, "leg": n}                            (recorded: retransmissions agree)
--   {"action": "reject", "why": "not_found"}   (unknown destination: nothing recorded; or
--                                               no forward target can be reached: recorded)
--   {"action": "reject", "why": "forbidden"}   (nothing recorded)
--   {"action": "reject", "why": "released"}    (released before: see known_call)
--   {"action": "challenge"}                    (nothing recorded)
-- A call already decided returns its first decision with "repeat": true.
-- p_force (shadow mode) admits every leg whatever the limits and reports what would have
-- been refused under "shadow". p_lates[i] (fail-open catch-up, sent only for an answered
-- call) forces too, and records the call answered: it expires after p_max_duration, never
-- after the ringing TTL.
--
-- The batch is decided in two passes. First every call is classified (known already? who
-- calls? which legs?), here; then decide_batch() locks and reads every counter any of them
-- may need at once and decides each call against them in memory, in arrival order.
-- (admit_planned() is the same with the classification done by the sidecar.)
CREATE OR REPLACE FUNCTION admit_batch(
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
    v_count    integer := coalesce(cardinality(p_call_ids), 0);
    v_out      jsonb[];
    v_again    boolean[];
    v_origins  text[] := array_fill(NULL::text, ARRAY[v_count]);
    v_plans    planned_leg[] := '{}';
    v_origin   record;
    v_legs     planned_leg[];
    v_leg      planned_leg;
BEGIN
    PERFORM sidecar_counters_lock();

    -- 1. Classify the calls not known already.
    SELECT * INTO v_out, v_again FROM batch_known(p_call_ids, p_from_tags, p_lates,
                                                  p_max_duration);
    FOR i IN 1 .. v_count LOOP
        CONTINUE WHEN v_again[i] OR v_out[i] IS NOT NULL;
        -- (Functions are called in assignments rather than SELECT ... FROM f(): a plain
        -- expression costs no query of its own.)
        v_origin := call_origin(p_sources[i], p_from_users[i], p_auth_users[i]);
        v_out[i] := v_origin.verdict;
        CONTINUE WHEN v_out[i] IS NOT NULL;
        v_origins[i] := coalesce('extension:' || v_origin.ext, 'channel:' || v_origin.chan);
        v_legs := call_legs(v_origin.ext, v_origin.account, v_origin.chan, p_to_users[i]);
        IF v_legs IS NULL THEN
            v_out[i] := '{"action": "reject", "why": "not_found"}';
            CONTINUE;
        END IF;
        FOREACH v_leg IN ARRAY v_legs LOOP
            v_leg.call_no := i;
            v_plans := v_plans || v_leg;
        END LOOP;
    END LOOP;

    RETURN decide_batch(v_out, v_again, v_origins, v_plans, p_call_ids, p_from_tags,
                        p_sources, p_from_users, p_to_users, p_auth_users, p_nodes, p_boots,
                        p_lates, p_force, p_domain, p_ring_ttl, p_max_duration);
END $$;

-- admit_batch() with the classification done by the sidecar, from its cache of the
-- configuration (sidecar/classify.py mirrors call_origin() and call_legs() above):
--   p_generation  the configuration generation the cache holds (migration 012)
--   p_plans       every leg of every call classified, in order, as planned_leg rows in a
--                 jsonb array (call_no: the call's place in the batch)
--   p_verdicts    per call, what the classification decided alone (challenge, forbidden,
--                 not_found), or NULL
--   p_origins     per call, 'extension:<id>' or 'channel:<id>', or NULL
-- When p_generation is not the generation this transaction sees (the configuration changed
-- and the cache has not followed yet, or the sidecar has no cache), the plans are ignored
-- and the batch is classified here: admit_batch(). What the sidecar computed stands only
-- for the very configuration PostgreSQL would have read, so a decision is the same either
-- way; what a known call (a retransmission) decided before still comes first.
CREATE OR REPLACE FUNCTION admit_planned(
    p_generation bigint,
    p_plans      jsonb,
    p_verdicts   jsonb[],
    p_origins    text[],
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
    v_count    integer := coalesce(cardinality(p_call_ids), 0);
    v_out      jsonb[];
    v_again    boolean[];
    v_origins  text[] := array_fill(NULL::text, ARRAY[v_count]);
    v_given    planned_leg[];       -- the sidecar's legs, every call's
    v_at       integer := 1;        -- next of them
    v_plans    planned_leg[] := '{}';
BEGIN
    PERFORM sidecar_counters_lock();
    IF p_generation IS DISTINCT FROM (SELECT n FROM config_generation) THEN
        RETURN admit_batch(p_call_ids, p_from_tags, p_sources, p_from_users, p_to_users,
                           p_auth_users, p_nodes, p_boots, p_lates, p_force, p_domain,
                           p_ring_ttl, p_max_duration);
    END IF;
    v_given := ARRAY(SELECT jsonb_populate_recordset(NULL::planned_leg, p_plans));

    -- 1. Classified already: only what is known of the calls is read here.
    SELECT * INTO v_out, v_again FROM batch_known(p_call_ids, p_from_tags, p_lates,
                                                  p_max_duration);
    FOR i IN 1 .. v_count LOOP
        CONTINUE WHEN v_again[i] OR v_out[i] IS NOT NULL;
        v_out[i] := p_verdicts[i];
        CONTINUE WHEN v_out[i] IS NOT NULL;
        v_origins[i] := p_origins[i];
        -- (The legs of calls decided above are passed over below.)
        WHILE v_at <= cardinality(v_given) AND (v_given[v_at]).call_no < i LOOP
            v_at := v_at + 1;
        END LOOP;
        WHILE v_at <= cardinality(v_given) AND (v_given[v_at]).call_no = i LOOP
            v_plans := v_plans || v_given[v_at];
            v_at := v_at + 1;
        END LOOP;
    END LOOP;

    RETURN decide_batch(v_out, v_again, v_origins, v_plans, p_call_ids, p_from_tags,
                        p_sources, p_from_users, p_to_users, p_auth_users, p_nodes, p_boots,
                        p_lates, p_force, p_domain, p_ring_ttl, p_max_duration);
END $$;

-- (decide_batch() took the counter keys as a parameter before they were read off the legs.)
DROP FUNCTION IF EXISTS decide_batch(jsonb[], boolean[], text[], planned_leg[], text[],
    text[], text[], inet[], text[], text[], text[], text[], text[], boolean[], boolean, text,
    interval, interval);

-- The second pass of admit_batch() and admit_planned(): the calls classified (p_out: a
-- decision already, or NULL; p_again: asked twice in the batch; p_origins; p_plans: the
-- legs of the calls still to decide, in order, each with the counters it may need), lock
-- and read the counters once, decide each call in arrival order (earlier calls use room
-- first), as one row; the rows are written, and the counters move, once, at the end. A
-- call asked twice in one batch (a retransmission) is decided when its turn comes, after
-- what came before it is written, as a batch of its own.
CREATE OR REPLACE FUNCTION decide_batch(
    p_out        jsonb[],
    p_again      boolean[],
    p_origins    text[],
    p_plans      planned_leg[],
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
    v_count    integer := coalesce(cardinality(p_call_ids), 0);
    v_out      jsonb[] := p_out;
    v_origins  text[] := p_origins;
    v_again    boolean[] := p_again;
    v_plans    planned_leg[] := p_plans;
    v_keys     text[] := '{}';        -- every counter a leg of the batch may need
    v_mode     text;
    v_room     jsonb;
    v_gateways jsonb;
    v_cps      jsonb;              -- calls-per-second buckets: {key: tokens}
    v_call_cps jsonb;
    v_accounts text[];             -- the caller's account chain (refusals name their side)
    v_acquired text[] := '{}';     -- every slot the batch takes (counter increments)
    v_refused  text[] := '{}';     -- the counter of every call refused for a limit
    v_rows     calls[] := '{}';    -- the calls decided, in order, not written yet
    v_row      calls;
    v_leg      planned_leg;
    v_key      text;
    v_next     integer := 1;       -- next leg of v_plans to decide
    -- one call's decision
    v_force    boolean;
    v_call_room jsonb;
    v_held     text[];
    v_need     text[];
    v_take     text[];
    v_slot_leg integer[];
    v_slot_key text[];
    v_rung     jsonb;
    v_refusal  jsonb;
    v_shadow   jsonb;
    v_decision jsonb;
    v_verdict  record;
    v_uri      text;
BEGIN
    -- 2. Lock and read every counter the batch may need; then the counting mode (read after
    --    the locks: a change of mode recounts under the same advisory lock).
    FOREACH v_leg IN ARRAY v_plans LOOP
        v_keys := v_keys || v_leg.keys;
        FOREACH v_key IN ARRAY v_leg.chans LOOP
            v_keys := v_keys || ('channel:' || v_key || ':calls');
        END LOOP;
    END LOOP;
    SELECT * INTO v_room, v_gateways, v_cps FROM counters_room(v_keys);
    SELECT counting INTO v_mode FROM settings;

    -- 3. Decide each call in arrival order.
    FOR i IN 1 .. v_count LOOP
        IF v_again[i] THEN
            -- Write what came before, then decide it alone (it sees its twin), then read the
            -- counters again for the calls after it.
            PERFORM write_calls(v_rows);
            PERFORM move_counters(v_acquired, 1);  -- locked by counters_room()
            PERFORM store_cps(v_cps);
            v_rows := '{}';
            v_acquired := '{}';
            v_out[i] := (admit_batch(p_call_ids[i:i], p_from_tags[i:i], p_sources[i:i],
                                     p_from_users[i:i], p_to_users[i:i], p_auth_users[i:i],
                                     p_nodes[i:i], p_boots[i:i], p_lates[i:i], p_force,
                                     p_domain, p_ring_ttl, p_max_duration))[1]::jsonb;
            SELECT * INTO v_room, v_gateways, v_cps FROM counters_room(v_keys);
            CONTINUE;
        END IF;
        CONTINUE WHEN v_out[i] IS NOT NULL;

        -- A late admission is counted whatever the limits: the call is already up.
        v_force := p_force OR p_lates[i];
        v_call_room := v_room;
        v_call_cps := v_cps;
        v_held := '{}';
        v_take := '{}';
        v_slot_leg := '{}';
        v_slot_key := '{}';
        v_rung := '[]';
        v_refusal := NULL;
        v_shadow := NULL;
        WHILE v_next <= cardinality(v_plans) AND (v_plans[v_next]).call_no = i LOOP
            v_leg := v_plans[v_next];
            v_next := v_next + 1;
            v_accounts := v_leg.origin_accounts;
            v_verdict := decide_leg(v_leg, v_mode, v_call_room, v_held);
            IF v_verdict.full_at IS NOT NULL THEN
                v_refusal := coalesce(v_refusal, jsonb_build_object(
                    'why', CASE WHEN v_leg.leg = 0 AND v_verdict.full_at LIKE 'account:%'
                                     AND split_part(v_verdict.full_at, ':', 2)
                                         = ANY (v_leg.origin_accounts)
                                THEN 'limit_origin' ELSE 'limit_destination' END,
                    'counter', v_verdict.full_at, 'leg', v_leg.leg));
                IF NOT v_force THEN
                    -- Leg 0 refused: the call is refused. A forward leg: it does not ring.
                    EXIT WHEN v_leg.leg = 0;
                    CONTINUE;
                END IF;
                v_shadow := coalesce(v_shadow, '[]')
                            || jsonb_build_object('leg', v_leg.leg, 'counter', v_verdict.full_at);
                v_verdict.chan := coalesce(v_verdict.chan, v_leg.chans[1]);
            END IF;

            -- The leg is admitted: the slots it holds, and the room it uses.
            v_need := v_leg.keys || CASE WHEN v_verdict.chan IS NOT NULL
                                         THEN ARRAY['channel:' || v_verdict.chan || ':calls']
                                         ELSE '{}'::text[] END;
            FOREACH v_key IN ARRAY v_need LOOP
                CONTINUE WHEN v_mode = 'per_call' AND v_key = ANY (v_held);
                v_held := v_held || v_key;
                v_take := v_take || v_key;
                IF v_call_room ? v_key THEN
                    v_call_room := jsonb_set(v_call_room, ARRAY[v_key],
                                             to_jsonb((v_call_room ->> v_key)::integer - 1));
                END IF;
            END LOOP;
            v_slot_leg := v_slot_leg || array_fill(v_leg.leg, ARRAY[cardinality(v_need)]);
            v_slot_key := v_slot_key || v_need;

            -- Where it rings.
            IF v_leg.rings THEN
                IF v_leg.to_ext IS NOT NULL THEN
                    v_uri := coalesce(v_leg.contact, 'sip:' || v_leg.to_ext || '@' || p_domain);
                ELSE
                    v_uri := regexp_replace(v_gateways ->> v_verdict.chan,
                                            '^(sips?:)([^@]*@)?', '\1' || v_leg.number || '@');
                END IF;
                v_rung := v_rung || jsonb_build_object(
                    'leg', v_leg.leg, 'uri', v_uri,
                    'lookup', v_leg.to_ext IS NOT NULL AND v_leg.contact IS NULL,
                    'class', v_leg.class,
                    'to', coalesce('extension:' || v_leg.to_ext, 'number:' || v_leg.number),
                    'channel', v_verdict.chan);
            END IF;
        END LOOP;
        -- (Legs left undecided after a refused leg 0.)
        WHILE v_next <= cardinality(v_plans) AND (v_plans[v_next]).call_no = i LOOP
            v_next := v_next + 1;
        END LOOP;

        -- A call that would ring takes one token from each calls-per-second bucket it
        -- touches (accounts and channels with a cps limit); an empty bucket refuses it.
        IF jsonb_array_length(v_rung) > 0 AND v_call_cps <> '{}' THEN
            FOREACH v_key IN ARRAY cps_keys(v_slot_key) LOOP
                CONTINUE WHEN NOT v_call_cps ? v_key;
                IF (v_call_cps ->> v_key)::float8 < 1 THEN
                    IF v_force THEN
                        v_shadow := coalesce(v_shadow, '[]')
                                    || jsonb_build_object('leg', 0, 'counter', v_key);
                        CONTINUE;
                    END IF;
                    v_refusal := jsonb_build_object(
                        'why', CASE WHEN v_key LIKE 'account:%'
                                         AND split_part(v_key, ':', 2) = ANY (v_accounts)
                                    THEN 'limit_origin' ELSE 'limit_destination' END,
                        'counter', v_key, 'leg', 0);
                    v_rung := '[]';
                    EXIT;
                END IF;
                v_call_cps := jsonb_set(v_call_cps, ARRAY[v_key],
                                        to_jsonb((v_call_cps ->> v_key)::float8 - 1));
            END LOOP;
        END IF;

        -- 4. The call's row. Refused when leg 0 is, or when nothing rings: for the first
        --    limit that refused a leg, else because no forward target can be reached. A
        --    refused call holds nothing.
        v_row.call_id := p_call_ids[i];
        v_row.from_tag := p_from_tags[i];
        v_row.origin := v_origins[i];
        v_row.destination := p_to_users[i];
        v_row.node := p_nodes[i];
        v_row.boot := p_boots[i];
        v_row.late := p_lates[i];
        IF jsonb_array_length(v_rung) = 0 THEN
            v_decision := CASE WHEN v_refusal IS NULL
                               THEN '{"action": "reject", "why": "not_found"}'
                               ELSE '{"action": "reject", "limit": true}' || v_refusal END;
            v_row.state := 'refused';
            v_row.answered_at := NULL;
            v_row.expires_at := now() + p_ring_ttl;
            v_row.slot_legs := '{}';
            v_row.slot_keys := '{}';
            IF v_refusal IS NOT NULL THEN
                v_refused := v_refused || (v_refusal ->> 'counter');
            END IF;
        ELSE
            v_decision := jsonb_build_object('action', 'relay', 'legs', v_rung);
            IF v_shadow IS NOT NULL THEN
                v_decision := v_decision || jsonb_build_object('shadow', v_shadow);
            END IF;
            -- A late admission is of a call already answered (on an unknown leg: every slot
            -- stays).
            v_row.state := CASE WHEN p_lates[i] THEN 'answered' ELSE 'ringing' END;
            v_row.answered_at := CASE WHEN p_lates[i] THEN now() END;
            v_row.expires_at := now() + CASE WHEN p_lates[i] THEN p_max_duration
                                             ELSE p_ring_ttl END;
            v_row.slot_legs := v_slot_leg;
            v_row.slot_keys := v_slot_key;
            v_room := v_call_room;
            v_cps := v_call_cps;
            v_acquired := v_acquired || v_take;
        END IF;
        v_row.decision := v_decision;
        v_rows := v_rows || v_row;
        v_out[i] := v_decision;
    END LOOP;

    -- 5. The calls, the counters, the buckets and the refusals, once for the batch.
    PERFORM write_calls(v_rows);
    PERFORM move_counters(v_acquired, 1);  -- locked by counters_room()
    PERFORM store_cps(v_cps);
    IF cardinality(v_refused) > 0 THEN
        PERFORM count_refusals(v_refused);
    END IF;
    RETURN v_out::text[];
END $$;

-- One INVITE: a batch of one.
CREATE OR REPLACE FUNCTION admit(
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
) RETURNS jsonb LANGUAGE sql AS $$
    SELECT (admit_batch(ARRAY[p_call_id], ARRAY[p_from_tag], ARRAY[p_source],
                        ARRAY[p_from_user], ARRAY[p_to_user], ARRAY[p_auth_user],
                        ARRAY[p_node], ARRAY[p_boot], ARRAY[p_late], p_force, p_domain,
                        p_ring_ttl, p_max_duration))[1]::jsonb
$$;
