-- Counters: the *_active columns of accounts and channels, a cache of the slots that live
-- calls hold (calls.slot_legs / calls.slot_keys, seen through the `slots` view).
--
-- Applied by every `sidecar migrate` (CREATE OR REPLACE), after sql/migrations/.
--
-- Locking discipline. Every transaction that changes counters first takes one
-- transaction-level advisory lock, sidecar_counters_lock() (004): admission batches, answer
-- and release batches, the janitor, reconciliation, force-release and recounts run one at a
-- time across every sidecar replica. The hot counters (a provider account, a trunk) impose
-- that order anyway; in exchange nothing that changes counters can deadlock with anything
-- else that does, and a batch can read a counter, decide many calls against it in memory and
-- write it once. Counter rows are still locked in canonical order (accounts then channels,
-- each by id) before they are written, so that an administrator's multi-row UPDATE of
-- accounts cannot deadlock with a batch either.

-- The account and all its ancestors, nearest first; 1001 at most (a guard: accounts_no_loop
-- keeps loops out of the tree, but a deferred check may not have run yet). One primary-key
-- lookup per account, in a loop: half the cost of a recursive query for the short chains every
-- call walks.
CREATE OR REPLACE FUNCTION account_chain(p_account text) RETURNS text[]
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_chain  text[] := '{}';
    v_id     text;
    v_parent text := p_account;
BEGIN
    LOOP
        SELECT id, parent INTO v_id, v_parent FROM accounts WHERE id = v_parent;
        EXIT WHEN NOT FOUND;
        v_chain := v_chain || v_id;
        EXIT WHEN v_parent IS NULL OR cardinality(v_chain) > 1000;
    END LOOP;
    RETURN v_chain;
END $$;

-- Lock the counter rows behind these keys, accounts then channels, each in id order.
-- FOR NO KEY UPDATE is the lock the UPDATE of a counter takes anyway: it excludes every
-- other writer of the row, but not the foreign-key checks of rows that refer to the account.
-- (No statement for a kind the keys do not name: see move_counters().)
CREATE OR REPLACE FUNCTION lock_counters(p_keys text[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_all text := ' ' || array_to_string(p_keys, ' ');
BEGIN
    IF position(' account:' IN v_all) > 0 THEN
        PERFORM 1 FROM accounts
        WHERE id IN (SELECT split_part(k, ':', 2) FROM unnest(p_keys) k WHERE k LIKE 'account:%')
        ORDER BY id FOR NO KEY UPDATE;
    END IF;
    IF position(' channel:' IN v_all) > 0 THEN
        PERFORM 1 FROM channels
        WHERE id IN (SELECT split_part(k, ':', 2) FROM unnest(p_keys) k WHERE k LIKE 'channel:%')
        ORDER BY id FOR NO KEY UPDATE;
    END IF;
END $$;

-- Add p_sign for every occurrence of a key (a key listed twice moves twice): one UPDATE of
-- accounts and one of channels for a whole batch (none for a kind the keys do not name).
-- The caller holds the rows' locks (lock_counters(), or counters_room() in an admission
-- batch). The keys are counted first: a batch lists a few counters hundreds of times.
CREATE OR REPLACE FUNCTION move_counters(p_keys text[], p_sign integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_keys  text[];     -- each key once, v_times[i] the occurrences of v_keys[i]
    v_times integer[];
    v_all   text := ' ' || array_to_string(p_keys, ' ');
BEGIN
    IF coalesce(cardinality(p_keys), 0) = 0 THEN
        RETURN;
    END IF;
    SELECT array_agg(k), array_agg(n) INTO v_keys, v_times
    FROM (SELECT k, count(*)::integer AS n FROM unnest(p_keys) k GROUP BY k) u;
    -- (Identifiers hold neither a space nor a colon: ' account:' is the start of a key.)
    IF position(' account:' IN v_all) > 0 THEN
        UPDATE accounts a
        SET calls_active = a.calls_active + p_sign * d.calls,
            public_active = a.public_active + p_sign * d.public,
            internal_active = a.internal_active + p_sign * d.internal
        FROM (
            SELECT split_part(k, ':', 2) AS id,
                   coalesce(sum(n) FILTER (WHERE split_part(k, ':', 3) = 'calls'), 0) AS calls,
                   coalesce(sum(n) FILTER (WHERE split_part(k, ':', 3) = 'public'), 0) AS public,
                   coalesce(sum(n) FILTER (WHERE split_part(k, ':', 3) = 'internal'), 0)
                       AS internal
            FROM unnest(v_keys, v_times) u(k, n) WHERE k LIKE 'account:%' GROUP BY 1
        ) d
        WHERE a.id = d.id;
    END IF;
    IF position(' channel:' IN v_all) > 0 THEN
        UPDATE channels c
        SET calls_active = c.calls_active + p_sign * d.n
        FROM (
            SELECT split_part(k, ':', 2) AS id, sum(n) AS n
            FROM unnest(v_keys, v_times) u(k, n) WHERE k LIKE 'channel:%' GROUP BY 1
        ) d
        WHERE c.id = d.id;
    END IF;
END $$;

-- The same, the rows locked first in canonical order (lock_counters()).
CREATE OR REPLACE FUNCTION apply_counters(p_keys text[], p_sign integer)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(cardinality(p_keys), 0) = 0 THEN
        RETURN;
    END IF;
    PERFORM lock_counters(p_keys);
    PERFORM move_counters(p_keys, p_sign);
END $$;

-- What a call gives back when only the legs in p_keep stay (p_keep NULL: every slot goes):
-- per_leg, every slot of the other legs; per_call, every counter the call holds that no kept
-- leg holds, once. p_legs/p_keys are the call's slot arrays. (Loops over a handful of slots:
-- a query here cost more than the release around it.)
CREATE OR REPLACE FUNCTION slots_given_back(p_legs integer[], p_keys text[], p_keep integer[],
                                            p_mode text)
RETURNS text[] LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_n    integer := coalesce(cardinality(p_legs), 0);
    v_kept text[] := '{}';   -- per_call: the counters a kept leg holds
    v_back text[] := '{}';
BEGIN
    IF p_mode = 'per_leg' THEN
        FOR i IN 1 .. v_n LOOP
            IF p_keep IS NULL OR NOT p_legs[i] = ANY (p_keep) THEN
                v_back := v_back || p_keys[i];
            END IF;
        END LOOP;
        RETURN v_back;
    END IF;
    IF p_keep IS NOT NULL THEN
        FOR i IN 1 .. v_n LOOP
            IF p_legs[i] = ANY (p_keep) THEN
                v_kept := v_kept || p_keys[i];
            END IF;
        END LOOP;
    END IF;
    FOR i IN 1 .. v_n LOOP
        IF (p_keep IS NULL OR NOT p_keys[i] = ANY (v_kept)) AND NOT p_keys[i] = ANY (v_back) THEN
            v_back := v_back || p_keys[i];
        END IF;
    END LOOP;
    RETURN v_back;
END $$;

-- How many slots a counter holds, from the call records.
CREATE OR REPLACE FUNCTION slot_count(p_counter text, p_mode text) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_mode = 'per_call'
                THEN count(DISTINCT (call_id, from_tag))
                ELSE count(*) END::integer
    FROM slots WHERE counter = p_counter
$$;

-- Every counter as the call records say it should be.
CREATE OR REPLACE FUNCTION expected_counters() RETURNS TABLE (counter text, active integer)
LANGUAGE sql STABLE AS $$
    SELECT counter,
           CASE WHEN (SELECT counting FROM settings) = 'per_call'
                THEN count(DISTINCT (call_id, from_tag)) ELSE count(*) END::integer
    FROM slots GROUP BY counter
$$;

-- Set every counter from the call records. Returns how many counters changed.
CREATE OR REPLACE FUNCTION rebuild_counters() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    v_changed integer;
BEGIN
    PERFORM sidecar_counters_lock();
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

-- Refusals for a limit, per minute and counter (the operator's view): one statement for a
-- batch's refusals, none for a batch without.
CREATE OR REPLACE FUNCTION count_refusals(p_counters text[]) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO refusal_minutes AS r (minute, counter, refusals)
    SELECT date_trunc('minute', now()), c, count(*) FROM unnest(p_counters) c GROUP BY c
    ON CONFLICT (minute, counter) DO UPDATE SET refusals = r.refusals + EXCLUDED.refusals
$$;
