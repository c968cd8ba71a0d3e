//! `caracal spend trend --agent-id ID --days N`: an agent's daily spend over its
//! last N UTC days (today included, zero days shown), from the spend history the
//! metrics-aggregator keeps in Redis, over the admin API's SpendService
//! (`--output table|json|csv`).

use std::io::Write;

use anyhow::Result;
use caracal_proto::v1 as pb;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::{
    commands::Ctx,
    output::{self, micros_text, money_json, OutputFormat, Table},
};

#[derive(Debug, Args)]
pub struct SpendArgs {
    #[command(subcommand)]
    pub command: SpendCmd,
}

#[derive(Debug, Subcommand)]
pub enum SpendCmd {
    /// Daily spend of an agent over its last N UTC days, oldest first.
    Trend {
        /// Agent id (or name).
        #[arg(long, value_name = "ID")]
        agent_id: String,
        /// Days, today included (1..=400).
        #[arg(long, value_name = "N", default_value_t = 7,
              value_parser = clap::value_parser!(u32).range(1..=400))]
        days: u32,
        /// Only this currency (default: every currency the agent spent in).
        #[arg(long, value_name = "CODE")]
        currency: Option<String>,
    },
}

pub async fn run(ctx: &Ctx<'_>, cmd: SpendCmd, out: &mut dyn Write) -> Result<()> {
    match cmd {
        SpendCmd::Trend {
            agent_id,
            days,
            currency,
        } => {
            let request = pb::SpendTrendRequest {
                agent_id,
                days,
                currency: currency.unwrap_or_default(),
            };
            let trend = ctx
                .connect()
                .await?
                .spend()
                .spend_trend(request)
                .await?
                .into_inner();
            match ctx.format {
                OutputFormat::Json => output::write_json(out, &trend_json(&trend, days)),
                OutputFormat::Csv => output::write_text(out, &table(&trend).render_csv()),
                OutputFormat::Table => output::write_text(out, &trend_table(&trend, days)),
            }
        }
    }
}

fn micros(m: Option<&pb::Money>) -> i64 {
    m.map_or(0, |m| m.micros)
}

fn trend_json(t: &pb::SpendTrendResponse, days: u32) -> Value {
    let currencies: Vec<Value> = t
        .currencies
        .iter()
        .map(|c| {
            let daily: Vec<Value> = c
                .days
                .iter()
                .map(|d| {
                    let models: Vec<Value> = d
                        .models
                        .iter()
                        .map(|m| json!({ "model": m.model, "spend": money_json(m.spend.as_ref()) }))
                        .collect();
                    json!({
                        "date": d.date,
                        "spend": money_json(d.spend.as_ref()),
                        "models": models,
                    })
                })
                .collect();
            json!({
                "currency": c.currency,
                "total": money_json(c.total.as_ref()),
                "days": daily,
            })
        })
        .collect();
    json!({ "agent_id": t.agent_id, "days": days, "currencies": currencies })
}

/// One row per day and currency: date, currency, spend, models (largest first).
fn table(t: &pb::SpendTrendResponse) -> Table {
    let mut table = Table::new(["DATE", "CURRENCY", "SPEND", "MODELS"]);
    for c in &t.currencies {
        for d in &c.days {
            let models: Vec<String> = d
                .models
                .iter()
                .map(|m| format!("{} {}", m.model, micros_text(micros(m.spend.as_ref()))))
                .collect();
            table.row(vec![
                d.date.clone(),
                c.currency.clone(),
                micros_text(micros(d.spend.as_ref())),
                if models.is_empty() {
                    "-".to_owned()
                } else {
                    models.join(", ")
                },
            ]);
        }
    }
    table
}

/// The table, then each currency's total.
fn trend_table(t: &pb::SpendTrendResponse, days: u32) -> String {
    let mut text = if t.currencies.is_empty() {
        format!(
            "No spend recorded for agent {} in the last {days} days.\n",
            t.agent_id
        )
    } else {
        table(t).render()
    };
    for c in &t.currencies {
        text.push_str(&format!(
            "Total {}: {} over {days} days\n",
            c.currency,
            micros_text(micros(c.total.as_ref()))
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn money(micros: i64) -> Option<pb::Money> {
        Some(pb::Money {
            currency: "USD".into(),
            micros,
            amount: String::new(),
        })
    }

    #[test]
    fn table_shows_every_day_and_the_total() {
        let t = pb::SpendTrendResponse {
            agent_id: "a1".into(),
            currencies: vec![pb::CurrencyTrend {
                currency: "USD".into(),
                days: vec![
                    pb::DailySpend {
                        date: "2026-02-01".into(),
                        spend: money(0),
                        models: vec![],
                    },
                    pb::DailySpend {
                        date: "2026-02-02".into(),
                        spend: money(2_500_000),
                        models: vec![pb::ModelSpend {
                            model: "gpt-4o".into(),
                            spend: money(2_500_000),
                        }],
                    },
                ],
                total: money(2_500_000),
            }],
        };
        let text = trend_table(&t, 2);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].starts_with("2026-02-01  USD       0.00"), "{text}");
        assert!(
            lines[2].contains("2.50") && lines[2].ends_with("gpt-4o 2.50"),
            "{text}"
        );
        assert_eq!(lines[3], "Total USD: 2.50 over 2 days");
        assert_eq!(
            table(&t).render_csv(),
            "DATE,CURRENCY,SPEND,MODELS\n2026-02-01,USD,0.00,-\n2026-02-02,USD,2.50,gpt-4o 2.50\n"
        );
        let v = trend_json(&t, 2);
        assert_eq!(v["currencies"][0]["days"][1]["spend"]["micros"], 2_500_000);
        let empty = pb::SpendTrendResponse {
            agent_id: "a2".into(),
            currencies: vec![],
        };
        assert_eq!(
            trend_table(&empty, 3),
            "No spend recorded for agent a2 in the last 3 days.\n"
        );
    }
}
