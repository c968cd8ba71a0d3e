-- A JWT identity is bound to (issuer, claim): a `sub` is only unique within the
-- issuer that minted it, so one trusted issuer must not be able to speak for another
-- issuer's subject. SPIFFE ids carry their trust domain and keep issuer ''.
ALTER TABLE agent_identities
    ADD COLUMN issuer TEXT NOT NULL DEFAULT '' CHECK (length(issuer) <= 2048);
ALTER TABLE agent_identities DROP CONSTRAINT agent_identities_kind_value_key;
ALTER TABLE agent_identities
    ADD CONSTRAINT agent_identities_kind_issuer_value_key UNIQUE (kind, issuer, value);
-- JWT bindings made before this migration have issuer '' and match no token any more
-- (Authorize refuses a JWT identity without an issuer): rebind them with --issuer.
