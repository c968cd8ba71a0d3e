//! What a request costs, from a price book entry and token usage.
//!
//! Providers quote prices per million tokens, so a price is stored as the
//! micro-units one million tokens cost (`$2.50 / 1M` = `2_500_000`). That
//! keeps every published price exact as an integer, and the per-request cost
//! is computed with a single rounding step at the end.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::money::{parse_amount, Currency, Money, MoneyError, MAX_AMOUNT_MICROS};

/// Tokens per pricing unit: prices are quoted per million tokens.
pub const TOKENS_PER_PRICE_UNIT: u128 = 1_000_000;

/// Why a cost could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PricingError {
    /// The cost is above [`MAX_AMOUNT_MICROS`] (or beyond 128-bit range).
    #[error("cost exceeds the maximum single amount")]
    Overflow,
    /// A price component was negative; prices are never credits.
    #[error("price component {field} must not be negative")]
    NegativePrice {
        /// Name of the offending field.
        field: &'static str,
    },
}

/// One model's price-book entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Price {
    /// Micro-units per one million non-cached input tokens.
    pub input_per_mtok_micros: i64,
    /// Micro-units per one million output tokens.
    pub output_per_mtok_micros: i64,
    /// Micro-units per one million cached input tokens.
    pub cached_input_per_mtok_micros: i64,
    /// Flat micro-units charged per request, on top of the token cost.
    pub per_request_micros: i64,
    /// Currency of every component.
    pub currency: Currency,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Input tokens that were **not** served from the provider's cache.
    /// Providers usually report a prompt total that includes cached tokens;
    /// callers subtract the cached count before filling this in, so that no
    /// token is charged at both rates.
    pub input_tokens: u64,
    /// Output (completion) tokens, including any reasoning tokens the
    /// provider bills as output.
    pub output_tokens: u64,
    /// Input tokens served from the provider's cache.
    pub cached_input_tokens: u64,
}

/// Cost of `usage` under `price`, in micro-units.
///
/// Rule: `ceil((input·in + output·out + cached·cached_in) / 1_000_000) +
/// per_request`, with the three products summed exactly in `u128`. Rounding
/// happens once, upwards, so a budget is never under-charged by truncation
/// (one token at $0.10 per million costs 1 micro, not 0), and the rounding
/// excess is below one micro-unit per request.
///
/// Errors: a negative price component, or a result above
/// [`MAX_AMOUNT_MICROS`].
pub fn cost_micros(price: &Price, usage: &Usage) -> Result<i64, PricingError> {
    let input = rate(price.input_per_mtok_micros, "input_per_mtok_micros")?;
    let output = rate(price.output_per_mtok_micros, "output_per_mtok_micros")?;
    let cached = rate(
        price.cached_input_per_mtok_micros,
        "cached_input_per_mtok_micros",
    )?;
    let per_request = rate(price.per_request_micros, "per_request_micros")?;

    // Each product fits in u128 (u64 · u64 < 2^128), but their sum may not.
    let token_cost = u128::from(usage.input_tokens)
        .checked_mul(input)
        .and_then(|sum| {
            u128::from(usage.output_tokens)
                .checked_mul(output)
                .and_then(|p| sum.checked_add(p))
        })
        .and_then(|sum| {
            u128::from(usage.cached_input_tokens)
                .checked_mul(cached)
                .and_then(|p| sum.checked_add(p))
        })
        .ok_or(PricingError::Overflow)?;
    let total = token_cost
        .div_ceil(TOKENS_PER_PRICE_UNIT)
        .checked_add(per_request)
        .ok_or(PricingError::Overflow)?;
    match i64::try_from(total) {
        Ok(micros) if micros <= MAX_AMOUNT_MICROS => Ok(micros),
        _ => Err(PricingError::Overflow),
    }
}

fn rate(value: i64, field: &'static str) -> Result<u128, PricingError> {
    u128::try_from(value).map_err(|_| PricingError::NegativePrice { field })
}

impl Price {
    /// [`cost_micros`] as [`Money`] in the price's currency.
    pub fn cost(&self, usage: &Usage) -> Result<Money, PricingError> {
        Ok(Money::new(cost_micros(self, usage)?, self.currency))
    }
}

/// Parses a decimal price per million tokens into micro-units per million
/// tokens: `"2.50"` → `2_500_000`. Same grammar as
/// [`crate::money::parse_amount`]; zero is allowed (free or self-hosted
/// models).
pub fn parse_price_per_mtok(s: &str) -> Result<i64, MoneyError> {
    parse_amount(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: &str, output: &str, cached: &str, per_request: i64) -> Price {
        Price {
            input_per_mtok_micros: parse_price_per_mtok(input).unwrap(),
            output_per_mtok_micros: parse_price_per_mtok(output).unwrap(),
            cached_input_per_mtok_micros: parse_price_per_mtok(cached).unwrap(),
            per_request_micros: per_request,
            currency: Currency::USD,
        }
    }

    fn usage(input: u64, output: u64, cached: u64) -> Usage {
        Usage {
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: cached,
        }
    }

    #[test]
    fn cost_table() {
        let gpt4o = price("2.50", "10", "1.25", 0);
        let cheap = price("0.10", "0.40", "0.025", 0);
        let flat = price("0", "0", "0", 2_000);
        let free = price("0", "0", "0", 0);
        let top = price("1000000000", "0", "0", 0);
        let top_plus_request = price("1000000000", "0", "0", 1);
        let huge = Price {
            input_per_mtok_micros: i64::MAX,
            output_per_mtok_micros: i64::MAX,
            cached_input_per_mtok_micros: i64::MAX,
            per_request_micros: i64::MAX,
            currency: Currency::USD,
        };
        let max = u64::MAX;
        /// (name, price, (input, output, cached) tokens, expected cost)
        type Case = (
            &'static str,
            Price,
            (u64, u64, u64),
            Result<i64, PricingError>,
        );
        #[rustfmt::skip]
        let cases: &[Case] = &[
            // 1000·2.50/1M + 500·10/1M = 0.0025 + 0.005 dollars.
            ("gpt-4o-like",                          gpt4o,            (1_000, 500, 0),         Ok(7_500)),
            ("cached input at its own rate",         gpt4o,            (0, 0, 1_000),           Ok(1_250)),
            ("all three",                            gpt4o,            (1_000, 500, 1_000),     Ok(8_750)),
            ("one token at $0.10/1M rounds up",      cheap,            (1, 0, 0),               Ok(1)),
            ("ten tokens at $0.10/1M is exact",      cheap,            (10, 0, 0),              Ok(1)),
            ("eleven tokens at $0.10/1M rounds up",  cheap,            (11, 0, 0),              Ok(2)),
            // Rounding happens once on the sum: 0.1 + 0.4 + 0.025 = 0.525 micros -> 1.
            ("single rounding",                      cheap,            (1, 1, 1),               Ok(1)),
            ("zero usage costs per_request only",    flat,             (0, 0, 0),               Ok(2_000)),
            ("per_request added after rounding",     flat,             (1, 1, 1),               Ok(2_000)),
            ("zero usage of a token price is free",  gpt4o,            (0, 0, 0),               Ok(0)),
            ("one million tokens is the list price", gpt4o,            (1_000_000, 0, 0),       Ok(2_500_000)),
            ("u64::MAX tokens overflow",             gpt4o,            (max, 0, 0),             Err(PricingError::Overflow)),
            ("u128 sum overflow",                    huge,             (max, max, max),         Err(PricingError::Overflow)),
            ("free model, huge usage",               free,             (max, max, max),         Ok(0)),
            ("exactly the maximum",                  top,              (1_000_000, 0, 0),       Ok(MAX_AMOUNT_MICROS)),
            ("per_request pushes past the maximum",  top_plus_request, (1_000_000, 0, 0),       Err(PricingError::Overflow)),
        ];
        for (name, price, (input, output, cached), expected) in cases {
            let usage = usage(*input, *output, *cached);
            assert_eq!(&cost_micros(price, &usage), expected, "{name}");
        }
    }

    #[test]
    fn negative_prices_are_refused() {
        let mut p = price("1", "1", "1", 0);
        p.output_per_mtok_micros = -1;
        assert_eq!(
            cost_micros(&p, &Usage::default()),
            Err(PricingError::NegativePrice {
                field: "output_per_mtok_micros"
            })
        );
        let mut p = price("1", "1", "1", 0);
        p.per_request_micros = -5;
        assert!(matches!(
            cost_micros(&p, &Usage::default()),
            Err(PricingError::NegativePrice { .. })
        ));
    }

    #[test]
    fn parse_price_table() {
        assert_eq!(parse_price_per_mtok("2.50"), Ok(2_500_000));
        assert_eq!(parse_price_per_mtok("0"), Ok(0));
        assert_eq!(parse_price_per_mtok("0.075"), Ok(75_000));
        assert_eq!(parse_price_per_mtok("15"), Ok(15_000_000));
        assert_eq!(parse_price_per_mtok("-1"), Err(MoneyError::Negative));
        assert!(matches!(
            parse_price_per_mtok("0.0000001"),
            Err(MoneyError::TooPrecise { .. })
        ));
    }

    #[test]
    fn cost_as_money() {
        let p = price("2.50", "10", "0", 0);
        let cost = p.cost(&usage(1_000, 500, 0)).unwrap();
        assert_eq!(cost.to_string(), "0.0075 USD");
    }
}
