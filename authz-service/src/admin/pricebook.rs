//! PriceBookService: per provider/model prices, versioned.
//!
//! A price row never changes: `SetPrice` adds version n+1, so a ledger entry that
//! records (provider, model, version) can always be re-priced exactly.

use caracal_domain::{money::Currency, pricing::parse_price_per_mtok};
use caracal_proto::v1::{self as pb, price_book_service_server::PriceBookService};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use tonic::{Request, Response, Status};

use super::{commit_change, respond, AdminState};
use crate::{
    admin_events::AdminEvent,
    auth::actor,
    convert::{self, timestamp},
    db::{self, schema::price_book},
    error::{ServiceError, ServiceResult},
};

/// Largest import accepted in one call (explicit bound; bigger books go in batches).
pub const MAX_IMPORT_ROWS: usize = 10_000;

#[derive(Queryable, Selectable, Insertable, Debug, Clone)]
#[diesel(table_name = price_book)]
pub struct PriceRow {
    pub provider: String,
    pub model: String,
    pub version: i32,
    pub currency: String,
    pub input_per_mtok_micros: i64,
    pub output_per_mtok_micros: i64,
    pub cached_input_per_mtok_micros: i64,
    pub per_request_micros: i64,
    pub effective_at: DateTime<Utc>,
}

impl From<PriceRow> for pb::Price {
    fn from(r: PriceRow) -> Self {
        pb::Price {
            provider: r.provider,
            model: r.model,
            version: r.version,
            currency: r.currency,
            input_per_mtok_micros: r.input_per_mtok_micros,
            output_per_mtok_micros: r.output_per_mtok_micros,
            cached_input_per_mtok_micros: r.cached_input_per_mtok_micros,
            per_request_micros: r.per_request_micros,
            effective_at: Some(timestamp(r.effective_at)),
        }
    }
}

impl PriceRow {
    pub fn state(&self) -> pb::PriceState {
        pb::PriceState {
            provider: self.provider.clone(),
            model: self.model.clone(),
            version: self.version,
            currency: self.currency.clone(),
            input_per_mtok_micros: self.input_per_mtok_micros,
            output_per_mtok_micros: self.output_per_mtok_micros,
            cached_input_per_mtok_micros: self.cached_input_per_mtok_micros,
            per_request_micros: self.per_request_micros,
            effective_at: Some(timestamp(self.effective_at)),
        }
    }
}

/// The change event of a new price version, keyed `provider/model` (one model's
/// versions stay ordered). `kind`: price_set or price_imported.
fn price_event(actor: &str, kind: &str, before: Option<&PriceRow>, after: &PriceRow) -> AdminEvent {
    AdminEvent::policy_change(
        actor,
        format!("{}/{}", after.provider, after.model),
        pb::PolicyChangeEvent {
            kind: kind.to_owned(),
            version: after.version,
            change: Some(pb::policy_change_event::Change::Price(pb::PriceChange {
                before: before.map(PriceRow::state),
                after: Some(after.state()),
            })),
            ..Default::default()
        },
    )
}

/// A validated price, not yet versioned.
struct NewPrice {
    provider: String,
    model: String,
    currency: Currency,
    input: i64,
    output: i64,
    cached: i64,
    per_request: i64,
}

fn price_field(name: &str, text: &str) -> ServiceResult<i64> {
    if text.trim().is_empty() {
        return Ok(0);
    }
    parse_price_per_mtok(text).map_err(|e| ServiceError::invalid(name, e))
}

/// Longest provider, in bytes, as stored (lowercased, which can lengthen it).
const MAX_PROVIDER_BYTES: usize = 64;

/// Provider and model lengths count bytes, not characters: the hot path refuses a
/// model longer than [`crate::authorize::MAX_TEXT_BYTES`] (the ledger's cap), so
/// the price book holds none no call could name (200 characters of 'é' are 400
/// bytes).
fn within_bytes(field: &str, value: String, max_bytes: usize) -> ServiceResult<String> {
    if value.len() > max_bytes {
        return Err(ServiceError::InvalidArgument(format!(
            "{field} is longer than {max_bytes} bytes ({} bytes)",
            value.len()
        )));
    }
    Ok(value)
}

fn validate(req: &pb::SetPriceRequest) -> ServiceResult<NewPrice> {
    use crate::authorize::MAX_TEXT_BYTES;
    Ok(NewPrice {
        provider: within_bytes(
            "provider",
            convert::required_text("provider", &req.provider, MAX_PROVIDER_BYTES)?.to_lowercase(),
            MAX_PROVIDER_BYTES,
        )?,
        model: within_bytes(
            "model",
            convert::required_text("model", &req.model, MAX_TEXT_BYTES)?,
            MAX_TEXT_BYTES,
        )?,
        currency: Currency::parse(&req.currency)
            .map_err(|e| ServiceError::invalid("currency", e))?,
        input: price_field("input_per_mtok", &req.input_per_mtok)?,
        output: price_field("output_per_mtok", &req.output_per_mtok)?,
        cached: price_field("cached_input_per_mtok", &req.cached_input_per_mtok)?,
        per_request: price_field("per_request", &req.per_request)?,
    })
}

/// Adds the next version of a model's price; returns the version it supersedes
/// (if any) and the new one.
async fn insert_version(
    conn: &mut AsyncPgConnection,
    p: &NewPrice,
) -> ServiceResult<(Option<PriceRow>, PriceRow)> {
    // Serialise version assignment per (provider, model): two concurrent `set`s get
    // consecutive versions instead of one failing on the primary key.
    diesel::sql_query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind::<diesel::sql_types::Text, _>(format!("price_book/{}/{}", p.provider, p.model))
        .execute(conn)
        .await?;
    let latest: Option<PriceRow> = price_book::table
        .select(PriceRow::as_select())
        .filter(price_book::provider.eq(&p.provider))
        .filter(price_book::model.eq(&p.model))
        .order(price_book::version.desc())
        .first(conn)
        .await
        .optional()?;
    let row = PriceRow {
        provider: p.provider.clone(),
        model: p.model.clone(),
        version: latest.as_ref().map_or(0, |l| l.version) + 1,
        currency: p.currency.as_str().to_owned(),
        input_per_mtok_micros: p.input,
        output_per_mtok_micros: p.output,
        cached_input_per_mtok_micros: p.cached,
        per_request_micros: p.per_request,
        effective_at: Utc::now(),
    };
    let row = diesel::insert_into(price_book::table)
        .values(&row)
        .returning(PriceRow::as_returning())
        .get_result(conn)
        .await?;
    Ok((latest, row))
}

pub struct PriceBookAdmin {
    state: AdminState,
}

impl PriceBookAdmin {
    pub fn new(state: AdminState) -> Self {
        Self { state }
    }
}

#[tonic::async_trait]
impl PriceBookService for PriceBookAdmin {
    async fn set_price(
        &self,
        request: Request<pb::SetPriceRequest>,
    ) -> Result<Response<pb::Price>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let price = validate(request.get_ref())?;
            let mut conn = db::conn(&self.state.pool).await?;
            let row = conn
                .transaction::<_, ServiceError, _>(async move |conn| {
                    let (before, row) = insert_version(conn, &price).await?;
                    let event = price_event(&changed_by, "price_set", before.as_ref(), &row);
                    commit_change(conn, &[event]).await?;
                    Ok(row)
                })
                .await?;
            Ok(pb::Price::from(row))
        }
        .await;
        respond("SetPrice", result)
    }

    async fn import_prices(
        &self,
        request: Request<pb::ImportPricesRequest>,
    ) -> Result<Response<pb::ImportPricesResponse>, Status> {
        let changed_by = actor(&request);
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            if req.prices.is_empty() {
                return Err(ServiceError::InvalidArgument(
                    "import contains no prices".to_owned(),
                ));
            }
            if req.prices.len() > MAX_IMPORT_ROWS {
                return Err(ServiceError::InvalidArgument(format!(
                    "import has {} rows; at most {MAX_IMPORT_ROWS} per call",
                    req.prices.len()
                )));
            }
            let prices = req
                .prices
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    validate(p)
                        .map_err(|e| ServiceError::InvalidArgument(format!("row {}: {e}", i + 1)))
                })
                .collect::<ServiceResult<Vec<_>>>()?;
            let mut conn = db::conn(&self.state.pool).await?;
            let rows = conn
                .transaction::<_, ServiceError, _>(async move |conn| {
                    let mut rows = Vec::with_capacity(prices.len());
                    let mut events = Vec::with_capacity(prices.len());
                    for p in &prices {
                        let (before, row) = insert_version(conn, p).await?;
                        events.push(price_event(
                            &changed_by,
                            "price_imported",
                            before.as_ref(),
                            &row,
                        ));
                        rows.push(row);
                    }
                    commit_change(conn, &events).await?;
                    Ok(rows)
                })
                .await?;
            Ok(pb::ImportPricesResponse {
                prices: rows.into_iter().map(pb::Price::from).collect(),
            })
        }
        .await;
        respond("ImportPrices", result)
    }

    async fn list_prices(
        &self,
        request: Request<pb::ListPricesRequest>,
    ) -> Result<Response<pb::ListPricesResponse>, Status> {
        let result: ServiceResult<_> = async {
            let req = request.into_inner();
            let mut conn = db::conn(&self.state.pool).await?;
            let mut query = price_book::table
                .select(PriceRow::as_select())
                .order((
                    price_book::provider.asc(),
                    price_book::model.asc(),
                    price_book::version.desc(),
                ))
                .limit(100_000)
                .into_boxed();
            let provider = req.provider.trim().to_lowercase();
            if !provider.is_empty() {
                query = query.filter(price_book::provider.eq(provider));
            }
            let mut rows: Vec<PriceRow> = query.load(&mut conn).await?;
            if !req.include_history {
                // Rows are ordered newest version first per model: keep the first.
                rows.dedup_by(|b, a| a.provider == b.provider && a.model == b.model);
            }
            Ok(pb::ListPricesResponse {
                prices: rows.into_iter().map(pb::Price::from).collect(),
            })
        }
        .await;
        respond("ListPrices", result)
    }
}
