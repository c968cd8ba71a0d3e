DROP TABLE agent_identities;
