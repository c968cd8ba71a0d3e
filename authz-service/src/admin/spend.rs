//! SpendService: an agent's daily spend, read from the spend history the
//! metrics-aggregator keeps in Redis (key layout: [`caracal_domain::spend`], the
//! same `redis.keyPrefix` as the budget state).
//!
//! One pipeline per call: the agent's currencies, then each day's hash (total and
//! per model) for each currency. Days without a hash are shown with zero.

use std::collections::BTreeSet;

use caracal_domain::{
    money::Currency,
    spend::{self, SpendKeys, MAX_TREND_DAYS},
};
use caracal_proto::v1::{self as pb, spend_service_server::SpendService};
use chrono::{DateTime, NaiveDate, Utc};
use tonic::{Request, Response, Status};

use super::{agents::find_agent, respond, AdminState};
use crate::{
    budget::BudgetStore,
    convert::money,
    db,
    error::{ServiceError, ServiceResult},
};

pub struct SpendAdmin {
    state: AdminState,
    store: BudgetStore,
    keys: SpendKeys,
}

impl SpendAdmin {
    /// `store`: the service's Redis; the spend keys share its prefix.
    pub fn new(state: AdminState, store: BudgetStore) -> Self {
        let keys = SpendKeys::new(store.keys().prefix());
        Self { state, store, keys }
    }
}

fn unavailable(e: &redis::RedisError) -> ServiceError {
    ServiceError::Unavailable(format!("reading spend history from Redis: {e}"))
}

/// One currency's days from their hashes (field -> micros), in `days` order.
fn currency_trend(
    currency: &str,
    days: &[NaiveDate],
    hashes: Vec<Vec<(String, i64)>>,
) -> pb::CurrencyTrend {
    let mut total = 0_i64;
    let daily = days
        .iter()
        .zip(hashes)
        .map(|(day, fields)| {
            let mut day_total = 0;
            let mut models: Vec<(String, i64)> = Vec::new();
            for (field, micros) in fields {
                if field == spend::TOTAL_FIELD {
                    day_total = micros;
                } else if let Some(model) = spend::model_of_field(&field) {
                    // A model whose charges were all superseded keeps a zero field.
                    if micros != 0 {
                        models.push((model.to_owned(), micros));
                    }
                }
            }
            models.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            total = total.saturating_add(day_total);
            pb::DailySpend {
                date: spend::day_part(*day),
                spend: Some(money(day_total, currency)),
                models: models
                    .into_iter()
                    .map(|(model, micros)| pb::ModelSpend {
                        model,
                        spend: Some(money(micros, currency)),
                    })
                    .collect(),
            }
        })
        .collect();
    pb::CurrencyTrend {
        currency: currency.to_owned(),
        days: daily,
        total: Some(money(total, currency)),
    }
}

async fn spend_trend(
    admin: &SpendAdmin,
    req: pb::SpendTrendRequest,
    now: DateTime<Utc>,
) -> ServiceResult<pb::SpendTrendResponse> {
    if req.days == 0 || req.days > MAX_TREND_DAYS {
        return Err(ServiceError::invalid(
            "days",
            format!("must be 1..={MAX_TREND_DAYS}, got {}", req.days),
        ));
    }
    let wanted = match req.currency.trim() {
        "" => None,
        c => Some(Currency::parse(c)?.to_string()),
    };
    let agent = {
        let mut conn = db::conn(&admin.state.pool).await?;
        find_agent(&mut conn, &req.agent_id).await?.id.to_string()
    };
    let mut conn = admin.store.connection();
    let currencies: BTreeSet<String> = match wanted {
        Some(c) => BTreeSet::from([c]),
        None => redis::cmd("SMEMBERS")
            .arg(admin.keys.currencies(&agent))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?,
    };
    let days = spend::last_days(spend::day_of(now), req.days);
    let mut pipe = redis::pipe();
    for currency in &currencies {
        for day in &days {
            pipe.hgetall(admin.keys.day(&agent, *day, currency));
        }
    }
    let hashes: Vec<Vec<(String, i64)>> = if currencies.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?
    };
    let mut hashes = hashes.into_iter();
    let trends = currencies
        .iter()
        .map(|currency| {
            let chunk: Vec<Vec<(String, i64)>> = hashes.by_ref().take(days.len()).collect();
            currency_trend(currency, &days, chunk)
        })
        .collect();
    Ok(pb::SpendTrendResponse {
        agent_id: agent,
        currencies: trends,
    })
}

#[tonic::async_trait]
impl SpendService for SpendAdmin {
    async fn spend_trend(
        &self,
        request: Request<pb::SpendTrendRequest>,
    ) -> Result<Response<pb::SpendTrendResponse>, Status> {
        let result = spend_trend(self, request.into_inner(), Utc::now()).await;
        respond("SpendTrend", result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_without_a_hash_are_zero_and_models_sorted() {
        let days = spend::last_days(NaiveDate::from_ymd_opt(2026, 2, 3).unwrap(), 3);
        let t = currency_trend(
            "USD",
            &days,
            vec![
                vec![
                    ("total".into(), 1_500_000),
                    ("model:a".into(), 500_000),
                    ("model:b".into(), 1_000_000),
                ],
                vec![],
                vec![
                    ("total".into(), 7),
                    ("model:gone".into(), 0),
                    ("model:c".into(), 7),
                ],
            ],
        );
        let line: Vec<(String, i64, usize)> = t
            .days
            .iter()
            .map(|d| {
                (
                    d.date.clone(),
                    d.spend.as_ref().unwrap().micros,
                    d.models.len(),
                )
            })
            .collect();
        assert_eq!(
            line,
            [
                ("2026-02-01".to_owned(), 1_500_000, 2),
                ("2026-02-02".to_owned(), 0, 0),
                ("2026-02-03".to_owned(), 7, 1),
            ]
        );
        assert_eq!(t.days[0].models[0].model, "b");
        assert_eq!(t.total.unwrap().micros, 1_500_007);
    }
}
