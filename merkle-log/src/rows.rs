//! A ledger row as a leaf: the columns every path that rebuilds a leaf reads
//! (backfill, prove, verify-range), and the one conversion to
//! [`LedgerLeaf`]. The ledger-writer builds the same leaf from the event it writes
//! (`consumers::ledger`); a test checks both give the same bytes.

use caracal_domain::merkle::leaf::LedgerLeaf;
use chrono::{DateTime, Utc};
use diesel::sql_types::{Array, BigInt, Integer, Nullable, Text, Timestamptz};

/// The `ledger_events` columns of a leaf, for `SELECT {LEAF_COLUMNS} FROM ledger_events e`.
pub const LEAF_COLUMNS: &str = "e.event_id, e.kind, e.reservation_id, e.request_id, e.agent_id, \
    e.root_agent_id, e.policy_ids, e.currency, e.reserved_micros, e.charged_micros, \
    e.overshoot_micros, e.input_tokens, e.output_tokens, e.cached_input_tokens, e.provider, \
    e.model, e.price_version, e.schema_version, e.occurred_at, e.reserved_at";

/// One row's leaf columns.
#[derive(Debug, Clone, diesel::QueryableByName)]
pub struct LeafRow {
    #[diesel(sql_type = Text)]
    pub event_id: String,
    #[diesel(sql_type = Text)]
    pub kind: String,
    #[diesel(sql_type = Text)]
    pub reservation_id: String,
    #[diesel(sql_type = Text)]
    pub request_id: String,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub agent_id: uuid::Uuid,
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    pub root_agent_id: uuid::Uuid,
    #[diesel(sql_type = Array<Text>)]
    pub policy_ids: Vec<String>,
    #[diesel(sql_type = Text)]
    pub currency: String,
    #[diesel(sql_type = BigInt)]
    pub reserved_micros: i64,
    #[diesel(sql_type = BigInt)]
    pub charged_micros: i64,
    #[diesel(sql_type = BigInt)]
    pub overshoot_micros: i64,
    #[diesel(sql_type = BigInt)]
    pub input_tokens: i64,
    #[diesel(sql_type = BigInt)]
    pub output_tokens: i64,
    #[diesel(sql_type = BigInt)]
    pub cached_input_tokens: i64,
    #[diesel(sql_type = Text)]
    pub provider: String,
    #[diesel(sql_type = Text)]
    pub model: String,
    #[diesel(sql_type = Integer)]
    pub price_version: i32,
    #[diesel(sql_type = Integer)]
    pub schema_version: i32,
    #[diesel(sql_type = Timestamptz)]
    pub occurred_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    pub reserved_at: Option<DateTime<Utc>>,
}

impl LeafRow {
    /// The leaf this row is (every column that carries meaning; not the ingest
    /// metadata: Kafka position, ingested_at).
    pub fn leaf(&self) -> LedgerLeaf {
        LedgerLeaf {
            event_id: self.event_id.clone(),
            kind: self.kind.clone(),
            reservation_id: self.reservation_id.clone(),
            request_id: self.request_id.clone(),
            agent_id: *self.agent_id.as_bytes(),
            root_agent_id: *self.root_agent_id.as_bytes(),
            policy_ids: self.policy_ids.clone(),
            currency: self.currency.clone(),
            reserved_micros: self.reserved_micros,
            charged_micros: self.charged_micros,
            overshoot_micros: self.overshoot_micros,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            cached_input_tokens: self.cached_input_tokens,
            provider: self.provider.clone(),
            model: self.model.clone(),
            price_version: self.price_version,
            schema_version: self.schema_version,
            occurred_at_micros: self.occurred_at.timestamp_micros(),
            reserved_at_micros: self.reserved_at.map(|t| t.timestamp_micros()),
        }
    }
}

/// A row's key: `(occurred_at, event_id)`, the ledger's primary key.
pub type RowKey = (DateTime<Utc>, String);

/// The rows of `keys` that exist, by key (one query).
pub async fn rows_by_key(
    conn: &mut diesel_async::AsyncPgConnection,
    keys: &[(DateTime<Utc>, &str)],
) -> Result<std::collections::HashMap<RowKey, LeafRow>, diesel::result::Error> {
    use diesel_async::RunQueryDsl;
    if keys.is_empty() {
        return Ok(Default::default());
    }
    let rows: Vec<LeafRow> = diesel::sql_query(format!(
        "SELECT {LEAF_COLUMNS} FROM ledger_events e \
         JOIN unnest($1::timestamptz[], $2::text[]) AS w(occurred_at, event_id) \
           ON e.occurred_at = w.occurred_at AND e.event_id = w.event_id"
    ))
    .bind::<Array<Timestamptz>, _>(keys.iter().map(|k| k.0).collect::<Vec<_>>())
    .bind::<Array<Text>, _>(keys.iter().map(|k| k.1).collect::<Vec<_>>())
    .load(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.occurred_at, r.event_id.clone()), r))
        .collect())
}
