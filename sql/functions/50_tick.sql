-- One transaction for what a sidecar has waiting of both kinds (sidecar/batching.py): the
-- answers and releases first, in arrival order (they give room back), then the admissions,
-- in arrival order. Each part is exactly control_events() and admit_planned(): only the round
-- trip and the commit are shared, where the two kinds would otherwise take one each.
--
-- Applied by every `sidecar migrate` (CREATE OR REPLACE), after sql/migrations/.

CREATE OR REPLACE FUNCTION control_tick(
    -- the events, as control_events() takes them
    p_types      text[],
    p_ev_call_ids text[],
    p_ev_from_tags text[],
    p_legs       integer[],
    p_reasons    text[],
    -- the admissions, as admit_planned() takes them
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
    -- both: the ringing TTL is also how long a release's tombstone lasts
    p_ring_ttl   interval,
    p_max_duration interval,
    OUT events   integer[],
    OUT admissions text[]
) LANGUAGE plpgsql AS $$
BEGIN
    events := control_events(p_types, p_ev_call_ids, p_ev_from_tags, p_legs, p_reasons,
                             p_max_duration, p_ring_ttl);
    admissions := admit_planned(p_generation, p_plans, p_verdicts, p_origins, p_call_ids,
                                p_from_tags, p_sources, p_from_users, p_to_users,
                                p_auth_users, p_nodes, p_boots, p_lates, p_force, p_domain,
                                p_ring_ttl, p_max_duration);
END $$;
