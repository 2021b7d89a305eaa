-- 001: the configuration (accounts, extensions, numbers, channels) and the call records.
--
-- Configuration tables are what operators edit (SQL, JSON API, `sidecar import`).
-- Call tables (calls, slots) are the source of truth for usage; the *_active columns on
-- accounts and channels are a cache of them, kept exact by the admission functions and
-- rebuildable at any time with rebuild_counters() (002).

-- Deployment-wide settings: a single row.
CREATE TABLE settings (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    -- per_call (Stringee): one slot per counter per call, whatever its legs.
    -- per_leg (VoipNow): one slot per counter per leg.
    counting text NOT NULL DEFAULT 'per_call' CHECK (counting IN ('per_call', 'per_leg'))
);
INSERT INTO settings DEFAULT VALUES;

-- An identifier: no whitespace nor the characters that delimit SIP URIs or our counter keys.
CREATE DOMAIN ident AS text CHECK (VALUE ~ '^[^\s:@;<>"\\/?]{1,128}$');

-- Accounts form a tree of any depth (provider -> organization -> user, or one per customer).
-- A NULL limit is unlimited; 0 allows nothing.
CREATE TABLE accounts (
    id               ident PRIMARY KEY,
    name             text CHECK (length(name) <= 256),
    parent           ident REFERENCES accounts (id) DEFERRABLE INITIALLY IMMEDIATE,
    calls_limit      integer CHECK (calls_limit >= 0),
    public_limit     integer CHECK (public_limit >= 0),
    internal_limit   integer CHECK (internal_limit >= 0),
    -- Live counters (cache of the slots table; see rebuild_counters()).
    calls_active     integer NOT NULL DEFAULT 0 CHECK (calls_active >= 0),
    public_active    integer NOT NULL DEFAULT 0 CHECK (public_active >= 0),
    internal_active  integer NOT NULL DEFAULT 0 CHECK (internal_active >= 0),
    CHECK (parent IS DISTINCT FROM id)
);
CREATE INDEX accounts_parent ON accounts (parent);

-- Trunks to the outside world.
CREATE TABLE channels (
    id            ident PRIMARY KEY,
    name          text CHECK (length(name) <= 256),
    calls_limit   integer CHECK (calls_limit >= 0),
    -- Inbound calls are matched to a channel by source address.
    sources       cidr[] NOT NULL DEFAULT '{}',
    -- Where outbound calls go: sip:host[:port]; the dialled number becomes the user part.
    gateway       text CHECK (gateway ~ '^sips?:[^\s@<>"]+$'),
    -- Outbound calls pick a channel by longest prefix, then lowest priority; '' matches all.
    prefixes      text[] NOT NULL DEFAULT '{}'
                  CHECK (array_position(prefixes, NULL) IS NULL),
    priority      integer NOT NULL DEFAULT 0,
    calls_active  integer NOT NULL DEFAULT 0 CHECK (calls_active >= 0)
);

-- Local endpoints; the id is the SIP user part.
CREATE TABLE extensions (
    id         ident PRIMARY KEY,
    account    ident NOT NULL REFERENCES accounts (id) DEFERRABLE INITIALLY IMMEDIATE,
    name       text CHECK (length(name) <= 256),
    -- Digest HA1 = md5(id:realm:password); the password itself is never stored.
    ha1        text CHECK (ha1 ~ '^[0-9a-f]{32}$'),
    -- Static contact (IVR, queue, voicemail, PBX): calls go there instead of registrations.
    contact    text CHECK (contact ~ '^sips?:[^\s<>"]+$'),
    -- Source-address authentication (application servers placing calls).
    sources    cidr[] NOT NULL DEFAULT '{}',
    -- Forward targets in order: an extension id, a local number, or an external number.
    forward    text[] NOT NULL DEFAULT '{}'
               CHECK (array_position(forward, NULL) IS NULL AND cardinality(forward) <= 32),
    ring_self  boolean NOT NULL DEFAULT false
);
CREATE INDEX extensions_account ON extensions (account);
CREATE INDEX extensions_with_sources ON extensions (id) WHERE cardinality(sources) > 0;

-- Public numbers (DIDs) routed to an extension.
CREATE TABLE numbers (
    number     text PRIMARY KEY CHECK (number ~ '^\+?[0-9*#]{1,32}$'),
    extension  ident NOT NULL REFERENCES extensions (id) DEFERRABLE INITIALLY IMMEDIATE
);
CREATE INDEX numbers_extension ON numbers (extension);

-- One row per call (initial INVITE: Call-ID + From-tag), from admission until release.
-- Refused calls are kept for a transaction lifetime so that retransmissions get the same answer.
CREATE TABLE calls (
    call_id      text NOT NULL CHECK (length(call_id) BETWEEN 1 AND 2048),
    from_tag     text NOT NULL CHECK (length(from_tag) <= 512),
    state        text NOT NULL CHECK (state IN ('ringing', 'answered', 'refused')),
    origin       text,            -- 'extension:<id>' or 'channel:<id>'
    destination  text,            -- the dialled user part
    node         text,            -- Kamailio node that asked
    boot         text,            -- that node's boot id, for reconciliation
    late         boolean NOT NULL DEFAULT false,  -- counted after the fact (fail-open)
    decision     jsonb NOT NULL,
    answered_leg integer,
    created_at   timestamptz NOT NULL DEFAULT now(),
    answered_at  timestamptz,
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (call_id, from_tag)
);
CREATE INDEX calls_expires ON calls (expires_at);
CREATE INDEX calls_node ON calls (node, boot);

-- Every counter slot every admitted leg of a call holds: 'account:<id>:calls|public|internal'
-- or 'channel:<id>:calls'. per_leg counts rows; per_call counts distinct calls.
CREATE TABLE slots (
    call_id   text NOT NULL,
    from_tag  text NOT NULL,
    leg       integer NOT NULL,
    counter   text NOT NULL,
    PRIMARY KEY (call_id, from_tag, leg, counter),
    FOREIGN KEY (call_id, from_tag) REFERENCES calls ON DELETE CASCADE
);
CREATE INDEX slots_counter ON slots (counter);

-- What Kamailio's auth_db reads (HA1 only; calculate_ha1 = 0, password_column = ha1).
CREATE VIEW subscriber AS
    SELECT id::text AS username, ''::text AS domain, ha1, ha1 AS ha1b, ''::text AS password
    FROM extensions
    WHERE ha1 IS NOT NULL;
