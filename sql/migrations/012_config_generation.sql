-- 012: a generation number for the configuration, so that the sidecar can classify calls
-- from a cache of it (sidecar/classify.py) and PostgreSQL can tell, in the transaction
-- that counts the call, whether that cache was the configuration it would have read.
--
-- Every statement that changes a configuration table (the ones that already NOTIFY
-- sidecar_config) adds one to config_generation.n in its own transaction, so the number
-- and the tables it describes commit together: a reader that sees generation n in a
-- snapshot sees exactly the configuration of generation n. admit_planned()
-- (sql/functions/20_admission.sql) takes the generation the sidecar's cache holds and
-- classifies the calls itself when it is not the current one: a stale cache costs speed,
-- never a wrong decision.
--
-- Writers of the configuration now also queue on this one row, from their first change to
-- their commit (configuration changes are rare; the counters' *_active columns and the cps
-- buckets notify nobody and bump nothing). TRUNCATE, which fires no row or statement
-- trigger of the kinds above, gets its own.
CREATE TABLE config_generation (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    n  bigint NOT NULL DEFAULT 1
);
INSERT INTO config_generation DEFAULT VALUES;

CREATE OR REPLACE FUNCTION config_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE config_generation SET n = n + 1;
    PERFORM pg_notify('sidecar_config', TG_TABLE_NAME);
    RETURN NULL;
END $$;

CREATE TRIGGER accounts_truncated AFTER TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION config_changed();
CREATE TRIGGER channels_truncated AFTER TRUNCATE ON channels
    FOR EACH STATEMENT EXECUTE FUNCTION config_changed();
CREATE TRIGGER extensions_truncated AFTER TRUNCATE ON extensions
    FOR EACH STATEMENT EXECUTE FUNCTION config_changed();
CREATE TRIGGER numbers_truncated AFTER TRUNCATE ON numbers
    FOR EACH STATEMENT EXECUTE FUNCTION config_changed();

-- control_tick() takes the sidecar's classification too (sql/functions/50_tick.sql makes
-- it again with its new arguments; on a new database it does not exist yet).
DROP FUNCTION IF EXISTS control_tick(text[], text[], text[], integer[], text[], text[], text[], inet[],
                           text[], text[], text[], text[], text[], boolean[], boolean, text,
                           interval, interval);
