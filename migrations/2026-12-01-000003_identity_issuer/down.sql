ALTER TABLE agent_identities DROP CONSTRAINT agent_identities_kind_issuer_value_key;
ALTER TABLE agent_identities ADD CONSTRAINT agent_identities_kind_value_key UNIQUE (kind, value);
ALTER TABLE agent_identities DROP COLUMN issuer;
