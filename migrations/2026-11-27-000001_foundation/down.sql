DROP TABLE config_epoch;
DROP TABLE price_book;
DROP TABLE allowlist_entries;
DROP TABLE policy_versions;
DROP TABLE policies;
DROP TABLE agent_api_keys;
DROP TRIGGER agents_parent_check ON agents;
DROP FUNCTION caracal_check_agent_parent();
DROP TABLE agents;
