-- Caracal foundation schema: agents, API keys, policies (+ version history),
-- allowlists, price book. Money is BIGINT micro-units; time is timestamptz (UTC).

CREATE TABLE agents (
    id          UUID PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    agent_type  TEXT NOT NULL CHECK (length(agent_type) BETWEEN 1 AND 64),
    parent_id   UUID REFERENCES agents(id),
    metadata    JSONB NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(metadata) = 'object'),
    status      TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'inactive')),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (parent_id IS NULL OR parent_id <> id)
);
CREATE INDEX agents_parent_idx ON agents (parent_id);

-- Parent cycles are impossible: every change of parent_id is serialised by one
-- transaction-scoped advisory lock and checked against the new parent's ancestor
-- chain. The service checks first (for a friendly error); this trigger is the
-- guarantee that holds whoever writes the table. Depth is bounded (16) because the
-- hot path checks every ancestor's policies in one atomic step.
CREATE FUNCTION caracal_check_agent_parent() RETURNS trigger AS $$
DECLARE
    depth INT;
    cyc   BOOLEAN;
    height INT;
BEGIN
    IF NEW.parent_id IS NULL THEN
        RETURN NEW;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.parent_id IS NOT DISTINCT FROM OLD.parent_id THEN
        RETURN NEW;
    END IF;
    PERFORM pg_advisory_xact_lock(7368223501);
    WITH RECURSIVE chain(id, parent_id, n) AS (
        SELECT a.id, a.parent_id, 1 FROM agents a WHERE a.id = NEW.parent_id
        UNION ALL
        SELECT a.id, a.parent_id, c.n + 1
        FROM agents a JOIN chain c ON a.id = c.parent_id
        WHERE c.n < 64
    )
    SELECT max(n), bool_or(id = NEW.id) INTO depth, cyc FROM chain;
    -- A moved agent brings its subtree along: count its height too.
    IF TG_OP = 'UPDATE' THEN
        WITH RECURSIVE sub(id, n) AS (
            SELECT NEW.id, 1
            UNION ALL
            SELECT a.id, s.n + 1 FROM agents a JOIN sub s ON a.parent_id = s.id
            WHERE s.n < 64
        )
        SELECT max(n) INTO height FROM sub;
    ELSE
        height := 1;
    END IF;
    IF cyc THEN
        RAISE EXCEPTION 'agent % cannot have parent %: that would create a cycle', NEW.id, NEW.parent_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'agents_parent_cycle';
    END IF;
    IF depth + height > 16 THEN
        RAISE EXCEPTION 'agent hierarchy would be deeper than 16 levels'
            USING ERRCODE = 'check_violation', CONSTRAINT = 'agents_parent_depth';
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER agents_parent_check
    BEFORE INSERT OR UPDATE OF parent_id ON agents
    FOR EACH ROW EXECUTE FUNCTION caracal_check_agent_parent();

-- Only a keyed hash (HMAC-SHA-256 with a server-side pepper) of each key is stored;
-- keys are 256-bit random, so a fast hash is enough and lookups stay one index probe.
CREATE TABLE agent_api_keys (
    id          UUID PRIMARY KEY,
    agent_id    UUID NOT NULL REFERENCES agents(id),
    key_prefix  TEXT NOT NULL,
    key_hash    BYTEA NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ
);
CREATE INDEX agent_api_keys_agent_idx ON agent_api_keys (agent_id);

CREATE TABLE policies (
    id           UUID PRIMARY KEY,
    agent_id     UUID NOT NULL REFERENCES agents(id),
    limit_micros BIGINT NOT NULL CHECK (limit_micros > 0 AND limit_micros <= 1000000000000000),
    currency     TEXT NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    time_window  TEXT NOT NULL CHECK (time_window IN ('hourly', 'daily', 'weekly', 'monthly', 'total')),
    window_type  TEXT NOT NULL CHECK (window_type IN ('calendar', 'rolling')),
    on_expiry    TEXT NOT NULL DEFAULT 'charge' CHECK (on_expiry IN ('charge', 'release')),
    active       BOOLEAN NOT NULL DEFAULT true,
    version      INT NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX policies_agent_idx ON policies (agent_id) WHERE active;

-- Every state a policy has ever had, one row per version, written in the same
-- transaction as the change (history, value at a time, diff).
CREATE TABLE policy_versions (
    policy_id    UUID NOT NULL REFERENCES policies(id),
    version      INT NOT NULL,
    agent_id     UUID NOT NULL,
    limit_micros BIGINT NOT NULL,
    currency     TEXT NOT NULL,
    time_window  TEXT NOT NULL,
    window_type  TEXT NOT NULL,
    on_expiry    TEXT NOT NULL,
    active       BOOLEAN NOT NULL,
    change_kind  TEXT NOT NULL CHECK (change_kind IN ('create', 'update', 'deactivate')),
    changed_by   TEXT NOT NULL,
    changed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (policy_id, version)
);

CREATE TABLE allowlist_entries (
    id           UUID PRIMARY KEY,
    agent_id     UUID NOT NULL REFERENCES agents(id),
    target       TEXT NOT NULL CHECK (target IN ('resource', 'model')),
    pattern_kind TEXT NOT NULL CHECK (pattern_kind IN ('glob', 'regex')),
    pattern      TEXT NOT NULL CHECK (length(pattern) BETWEEN 1 AND 512),
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (agent_id, target, pattern_kind, pattern)
);

-- Versioned price book: rows are immutable, `set` adds version n+1; ledger entries
-- record the version they were priced with.
CREATE TABLE price_book (
    provider                      TEXT NOT NULL CHECK (length(provider) BETWEEN 1 AND 64),
    model                         TEXT NOT NULL CHECK (length(model) BETWEEN 1 AND 200),
    version                       INT NOT NULL CHECK (version >= 1),
    currency                      TEXT NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    input_per_mtok_micros         BIGINT NOT NULL CHECK (input_per_mtok_micros >= 0),
    output_per_mtok_micros        BIGINT NOT NULL CHECK (output_per_mtok_micros >= 0),
    cached_input_per_mtok_micros  BIGINT NOT NULL CHECK (cached_input_per_mtok_micros >= 0),
    per_request_micros            BIGINT NOT NULL CHECK (per_request_micros >= 0),
    effective_at                  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, model, version)
);

-- Admin changes bump this row; every replica polls it to invalidate its caches.
CREATE TABLE config_epoch (
    id     BOOLEAN PRIMARY KEY DEFAULT true CHECK (id),
    epoch  BIGINT NOT NULL
);
INSERT INTO config_epoch (id, epoch) VALUES (true, 1);
