-- 010: the checks of accounts and channels as domains (as 009 did for calls).
--
-- Every call moves the counters (accounts.*_active, channels.calls_active) at least twice,
-- one UPDATE per batch each, and PostgreSQL reads every CHECK of the table back from text
-- and prepares it again for each such statement: ten on accounts, seven on channels, for
-- three columns set. A domain's check is kept parsed and is applied only where a value is
-- given. The rules are the same; a violation now names the domain's constraint
-- ('value for domain plan_limit violates check constraint "limit_check"'). An account that
-- is its own parent is refused by accounts_no_loop (it always was: the check was a second
-- guard).
CREATE DOMAIN slot_count AS integer CONSTRAINT active_check CHECK (VALUE >= 0);
CREATE DOMAIN plan_limit AS integer CONSTRAINT limit_check CHECK (VALUE >= 0);
CREATE DOMAIN cps_burst AS integer CONSTRAINT burst_check CHECK (VALUE >= 1);
CREATE DOMAIN display_name AS text CONSTRAINT name_check CHECK (length(VALUE) <= 256);
CREATE DOMAIN sip_gateway AS text CONSTRAINT gateway_check CHECK (VALUE ~ '^sips?:[^\s@<>"]+$');
CREATE DOMAIN prefix_list AS text[]
    CONSTRAINT prefixes_check CHECK (array_position(VALUE, NULL) IS NULL);

-- (The triggers that name columns are made again after, as 006 made them.)
DROP TRIGGER accounts_changed ON accounts;
DROP TRIGGER channels_changed ON channels;

ALTER TABLE accounts
    DROP CONSTRAINT accounts_name_check,
    DROP CONSTRAINT accounts_calls_limit_check,
    DROP CONSTRAINT accounts_public_limit_check,
    DROP CONSTRAINT accounts_internal_limit_check,
    DROP CONSTRAINT accounts_calls_active_check,
    DROP CONSTRAINT accounts_public_active_check,
    DROP CONSTRAINT accounts_internal_active_check,
    DROP CONSTRAINT accounts_cps_limit_check,
    DROP CONSTRAINT accounts_cps_burst_check,
    DROP CONSTRAINT accounts_check,
    ALTER COLUMN name TYPE display_name,
    ALTER COLUMN calls_limit TYPE plan_limit,
    ALTER COLUMN public_limit TYPE plan_limit,
    ALTER COLUMN internal_limit TYPE plan_limit,
    ALTER COLUMN calls_active TYPE slot_count,
    ALTER COLUMN public_active TYPE slot_count,
    ALTER COLUMN internal_active TYPE slot_count,
    ALTER COLUMN cps_limit TYPE plan_limit,
    ALTER COLUMN cps_burst TYPE cps_burst;

ALTER TABLE channels
    DROP CONSTRAINT channels_name_check,
    DROP CONSTRAINT channels_calls_limit_check,
    DROP CONSTRAINT channels_calls_active_check,
    DROP CONSTRAINT channels_gateway_check,
    DROP CONSTRAINT channels_prefixes_check,
    DROP CONSTRAINT channels_cps_limit_check,
    DROP CONSTRAINT channels_cps_burst_check,
    ALTER COLUMN name TYPE display_name,
    ALTER COLUMN calls_limit TYPE plan_limit,
    ALTER COLUMN calls_active TYPE slot_count,
    ALTER COLUMN gateway TYPE sip_gateway,
    ALTER COLUMN prefixes TYPE prefix_list,
    ALTER COLUMN cps_limit TYPE plan_limit,
    ALTER COLUMN cps_burst TYPE cps_burst;

CREATE TRIGGER accounts_changed
    AFTER INSERT OR DELETE OR UPDATE OF id, name, parent, calls_limit, public_limit,
        internal_limit, cps_limit, cps_burst
    ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION config_changed();
CREATE TRIGGER channels_changed
    AFTER INSERT OR DELETE OR UPDATE OF id, name, calls_limit, sources, gateway, prefixes,
        priority, cps_limit, cps_burst
    ON channels
    FOR EACH STATEMENT EXECUTE FUNCTION config_changed();
