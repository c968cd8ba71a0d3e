-- Verified identities bound to agents: the SPIFFE id of an mTLS peer (as Istio
-- issues) or a claim of a JWT that Envoy's jwt_authn verified. The gateway passes the
-- identity it verified; the authz-service maps it to an agent through this table.
CREATE TABLE agent_identities (
    id          UUID PRIMARY KEY,
    agent_id    UUID NOT NULL REFERENCES agents(id),
    kind        TEXT NOT NULL CHECK (kind IN ('spiffe', 'jwt')),
    value       TEXT NOT NULL CHECK (length(value) BETWEEN 1 AND 2048),
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (kind, value)
);
CREATE INDEX agent_identities_agent_idx ON agent_identities (agent_id);
