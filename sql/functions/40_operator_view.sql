-- What the operator's view reads (GET /v1/usage/accounts, /v1/usage/channels; the /ui/ page):
-- usage against every limit, busiest first, searchable and paged, so that a platform of
-- 10,000 accounts is read one page at a time. Read-only: nothing here takes a lock.

-- A calls-per-second bucket as of now: {"limit", "burst", "used"}, where used is the part of
-- the burst taken by recent calls (burst minus the tokens left, refilled to now); NULL
-- without a cps limit.
CREATE OR REPLACE FUNCTION cps_usage(p_limit integer, p_burst integer, p_tokens float8,
                                     p_at timestamptz) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p_limit IS NOT NULL THEN jsonb_build_object(
        'limit', p_limit,
        'burst', coalesce(p_burst, p_limit),
        'used', round(greatest(0, coalesce(p_burst, p_limit) - least(
            coalesce(p_burst, p_limit)::float8,
            coalesce(p_tokens, coalesce(p_burst, p_limit)::float8)
            + extract(epoch FROM now() - coalesce(p_at, now())) * p_limit))::numeric, 1))
    END
$$;

-- How full a counter is: active / limit (a limit of 0 is full), NULL when unlimited.
CREATE OR REPLACE FUNCTION fullness(p_active numeric, p_limit numeric) RETURNS float8
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_limit IS NULL THEN NULL
                WHEN p_limit = 0 THEN 1.0
                ELSE p_active::float8 / p_limit::float8 END
$$;

-- Accounts with their usage, in the subtree of p_under (NULL: every account) and matching
-- p_search (a part of the id or name, case-insensitive; NULL: all), busiest first: by the
-- fullest of their counters, then by active calls, then by id. `path` is the chain from the
-- root to the account; `total` is how many match, for paging.
CREATE OR REPLACE FUNCTION usage_accounts(p_under text, p_search text, p_limit integer,
                                          p_offset integer)
RETURNS TABLE (id text, name text, parent text, path text[], children bigint, usage jsonb,
               fullness float8, total bigint)
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE tree AS (
        SELECT a.id::text AS id, ARRAY[a.id::text] AS path FROM accounts a WHERE a.parent IS NULL
        UNION ALL
        SELECT a.id, t.path || a.id::text FROM accounts a JOIN tree t ON a.parent = t.id
    ), matched AS (
        SELECT a.*, t.path,
               greatest(fullness(a.calls_active, a.calls_limit),
                        fullness(a.public_active, a.public_limit),
                        fullness(a.internal_active, a.internal_limit),
                        fullness((u.cps ->> 'used')::numeric, (u.cps ->> 'burst')::numeric))
                   AS fullness,
               u.cps
        FROM accounts a
        JOIN tree t ON t.id = a.id
        CROSS JOIN LATERAL (SELECT cps_usage(a.cps_limit, a.cps_burst, a.cps_tokens, a.cps_at)
                            AS cps) u
        WHERE (p_under IS NULL OR p_under = ANY (t.path))
          AND (p_search IS NULL
               OR strpos(lower(a.id), lower(p_search)) > 0
               OR strpos(lower(coalesce(a.name, '')), lower(p_search)) > 0)
    )
    SELECT m.id, m.name, m.parent, m.path,
           (SELECT count(*) FROM accounts c WHERE c.parent = m.id),
           jsonb_build_object(
               'calls', jsonb_build_object('active', m.calls_active, 'limit', m.calls_limit),
               'public', jsonb_build_object('active', m.public_active, 'limit', m.public_limit),
               'internal', jsonb_build_object('active', m.internal_active,
                                              'limit', m.internal_limit),
               'cps', m.cps),
           m.fullness,
           count(*) OVER ()
    FROM matched m
    ORDER BY m.fullness DESC NULLS LAST,
             m.calls_active + m.public_active + m.internal_active DESC, m.id
    LIMIT p_limit OFFSET p_offset
$$;

-- Channels with their usage, matching p_search, busiest first.
CREATE OR REPLACE FUNCTION usage_channels(p_search text, p_limit integer, p_offset integer)
RETURNS TABLE (id text, name text, usage jsonb, fullness float8, total bigint)
LANGUAGE sql STABLE AS $$
    SELECT c.id, c.name,
           jsonb_build_object(
               'calls', jsonb_build_object('active', c.calls_active, 'limit', c.calls_limit),
               'cps', u.cps),
           greatest(fullness(c.calls_active, c.calls_limit),
                    fullness((u.cps ->> 'used')::numeric, (u.cps ->> 'burst')::numeric)),
           count(*) OVER ()
    FROM channels c
    CROSS JOIN LATERAL (SELECT cps_usage(c.cps_limit, c.cps_burst, c.cps_tokens, c.cps_at)
                        AS cps) u
    WHERE p_search IS NULL
       OR strpos(lower(c.id), lower(p_search)) > 0
       OR strpos(lower(coalesce(c.name, '')), lower(p_search)) > 0
    ORDER BY 4 DESC NULLS LAST, c.calls_active DESC, c.id
    LIMIT p_limit OFFSET p_offset
$$;
