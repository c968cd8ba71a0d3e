//! Diesel table definitions, matching `migrations/`.

diesel::table! {
    agents (id) {
        id -> Uuid,
        name -> Text,
        agent_type -> Text,
        parent_id -> Nullable<Uuid>,
        metadata -> Jsonb,
        status -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    agent_api_keys (id) {
        id -> Uuid,
        agent_id -> Uuid,
        key_prefix -> Text,
        key_hash -> Bytea,
        created_at -> Timestamptz,
        revoked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    policies (id) {
        id -> Uuid,
        agent_id -> Uuid,
        limit_micros -> Int8,
        currency -> Text,
        time_window -> Text,
        window_type -> Text,
        on_expiry -> Text,
        active -> Bool,
        version -> Int4,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    policy_versions (policy_id, version) {
        policy_id -> Uuid,
        version -> Int4,
        agent_id -> Uuid,
        limit_micros -> Int8,
        currency -> Text,
        time_window -> Text,
        window_type -> Text,
        on_expiry -> Text,
        active -> Bool,
        change_kind -> Text,
        changed_by -> Text,
        changed_at -> Timestamptz,
    }
}

diesel::table! {
    allowlist_entries (id) {
        id -> Uuid,
        agent_id -> Uuid,
        target -> Text,
        pattern_kind -> Text,
        pattern -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    price_book (provider, model, version) {
        provider -> Text,
        model -> Text,
        version -> Int4,
        currency -> Text,
        input_per_mtok_micros -> Int8,
        output_per_mtok_micros -> Int8,
        cached_input_per_mtok_micros -> Int8,
        per_request_micros -> Int8,
        effective_at -> Timestamptz,
    }
}

diesel::table! {
    config_epoch (id) {
        id -> Bool,
        epoch -> Int8,
    }
}

diesel::joinable!(agent_api_keys -> agents (agent_id));
diesel::joinable!(policies -> agents (agent_id));
diesel::joinable!(allowlist_entries -> agents (agent_id));

diesel::allow_tables_to_appear_in_same_query!(
    agents,
    agent_api_keys,
    policies,
    policy_versions,
    allowlist_entries,
    price_book,
    config_epoch,
);

diesel::table! {
    agent_identities (id) {
        id -> Uuid,
        agent_id -> Uuid,
        kind -> Text,
        value -> Text,
        created_at -> Timestamptz,
        issuer -> Text,
    }
}

diesel::joinable!(agent_identities -> agents (agent_id));
diesel::allow_tables_to_appear_in_same_query!(agent_identities, agents);

diesel::table! {
    admin_outbox (id) {
        id -> Int8,
        event_id -> Uuid,
        topic -> Text,
        key -> Text,
        event_type -> Text,
        payload -> Bytea,
        created_at -> Timestamptz,
    }
}
