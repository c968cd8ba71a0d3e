//! `caracal pricebook ...`. Amounts go to the server as the decimal text given; prices
//! come back in micro-units and are shown as decimals.

use std::io::Write;

use anyhow::Result;
use caracal_proto::v1 as pb;
use serde_json::{json, Value};

use super::Ctx;
use crate::{
    args::PricebookCmd,
    output::{self, micros_text, ts_json, ts_text, Table},
    price_import,
};

pub async fn run(ctx: &Ctx<'_>, cmd: PricebookCmd, out: &mut dyn Write) -> Result<()> {
    match cmd {
        PricebookCmd::Set(set) => {
            let request = pb::SetPriceRequest {
                provider: set.provider,
                model: set.model,
                currency: set.currency,
                input_per_mtok: set.input_price,
                output_per_mtok: set.output_price,
                cached_input_per_mtok: set.cached_input_price.unwrap_or_default(),
                per_request: set.per_request_price.unwrap_or_default(),
            };
            let p = ctx
                .connect()
                .await?
                .prices()
                .set_price(request)
                .await?
                .into_inner();
            let pairs = [
                ("provider", p.provider.clone()),
                ("model", p.model.clone()),
                ("version", p.version.to_string()),
                ("currency", p.currency.clone()),
                ("input", micros_text(p.input_per_mtok_micros)),
                ("output", micros_text(p.output_per_mtok_micros)),
                ("cached_input", micros_text(p.cached_input_per_mtok_micros)),
                ("per_request", micros_text(p.per_request_micros)),
                ("effective_at", ts_text(p.effective_at.as_ref())),
            ];
            output::write_object(out, ctx.format, price_json(&p), &pairs)
        }
        PricebookCmd::Import(import) => {
            // Read and check the whole file before connecting.
            let prices = price_import::read_file(&import.file)?;
            let request = pb::ImportPricesRequest { prices };
            let prices = ctx
                .connect()
                .await?
                .prices()
                .import_prices(request)
                .await?
                .into_inner()
                .prices;
            write_prices(ctx, &prices, out)
        }
        PricebookCmd::List(list) => {
            let request = pb::ListPricesRequest {
                provider: list.provider.unwrap_or_default(),
                include_history: list.history,
            };
            let prices = ctx
                .connect()
                .await?
                .prices()
                .list_prices(request)
                .await?
                .into_inner()
                .prices;
            write_prices(ctx, &prices, out)
        }
    }
}

fn write_prices(ctx: &Ctx<'_>, prices: &[pb::Price], out: &mut dyn Write) -> Result<()> {
    let mut table = Table::new([
        "PROVIDER",
        "MODEL",
        "VERSION",
        "CURRENCY",
        "INPUT",
        "OUTPUT",
        "CACHED_INPUT",
        "PER_REQUEST",
        "EFFECTIVE_AT",
    ]);
    for p in prices {
        table.row(vec![
            p.provider.clone(),
            p.model.clone(),
            p.version.to_string(),
            p.currency.clone(),
            micros_text(p.input_per_mtok_micros),
            micros_text(p.output_per_mtok_micros),
            micros_text(p.cached_input_per_mtok_micros),
            micros_text(p.per_request_micros),
            ts_text(p.effective_at.as_ref()),
        ]);
    }
    output::write_list(
        out,
        ctx.format,
        prices.iter().map(price_json).collect(),
        &table,
    )
}

/// The proto fields (micro-units), plus the same amounts as decimal text under the
/// request's names (`input_per_mtok`, ...).
fn price_json(p: &pb::Price) -> Value {
    json!({
        "provider": p.provider,
        "model": p.model,
        "version": p.version,
        "currency": p.currency,
        "input_per_mtok_micros": p.input_per_mtok_micros,
        "output_per_mtok_micros": p.output_per_mtok_micros,
        "cached_input_per_mtok_micros": p.cached_input_per_mtok_micros,
        "per_request_micros": p.per_request_micros,
        "input_per_mtok": micros_text(p.input_per_mtok_micros),
        "output_per_mtok": micros_text(p.output_per_mtok_micros),
        "cached_input_per_mtok": micros_text(p.cached_input_per_mtok_micros),
        "per_request": micros_text(p.per_request_micros),
        "effective_at": ts_json(p.effective_at.as_ref()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn price_json_shape() {
        let p = pb::Price {
            provider: "openai".into(),
            model: "gpt-4o".into(),
            version: 2,
            currency: "USD".into(),
            input_per_mtok_micros: 2_500_000,
            output_per_mtok_micros: 10_000_000,
            cached_input_per_mtok_micros: 1_250_000,
            per_request_micros: 0,
            effective_at: None,
        };
        assert_eq!(
            price_json(&p),
            json!({
                "provider": "openai", "model": "gpt-4o", "version": 2, "currency": "USD",
                "input_per_mtok_micros": 2_500_000, "output_per_mtok_micros": 10_000_000,
                "cached_input_per_mtok_micros": 1_250_000, "per_request_micros": 0,
                "input_per_mtok": "2.50", "output_per_mtok": "10.00",
                "cached_input_per_mtok": "1.25", "per_request": "0.00",
                "effective_at": null,
            })
        );
    }
}
