//! Amounts of money as integer micro-units, and ISO-4217 currencies.
//!
//! Why integers: a budget is a hard limit, so adding up thousands of tiny
//! charges must give exactly the same total in Rust, in Redis Lua and in
//! Postgres. Binary floats cannot even represent `0.1`; integer micro-units
//! (1 unit = 1,000,000 micros) are exact everywhere and fine enough for
//! per-token prices (a tenth of a micro-dollar per token is rounded up by
//! [`crate::pricing`], never dropped).
//!
//! Text is the only way amounts enter or leave the system (API, CLI, config),
//! so [`parse_amount`] is deliberately strict: one canonical grammar, no
//! signs, no exponents, no locale separators. Anything ambiguous is refused
//! rather than guessed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Micro-units in one currency unit (one dollar = 1,000,000 micros).
pub const MICROS_PER_UNIT: i64 = 1_000_000;

/// Number of decimal places representable by a micro-unit amount.
pub const FRACTION_DIGITS: usize = 6;

/// Largest single amount accepted anywhere: 1e15 micros = one billion units.
///
/// Why this cap: the hot path keeps budget counters in Redis and updates them
/// from Lua, whose numbers are IEEE-754 doubles that are exact only up to
/// 2^53 ≈ 9.007e15. Capping every individual amount (a limit, an estimate, a
/// price result) at 1e15 leaves room for `limit + open reservations + one
/// settled overshoot` to stay below 2^53, so the Lua arithmetic never rounds.
/// No real AI-agent budget gets anywhere near a billion units.
pub const MAX_AMOUNT_MICROS: i64 = 1_000_000_000_000_000;

/// Longest piece of caller input echoed back inside an error message.
///
/// Why: amounts arrive from API requests; an error must name the bad value but
/// must not copy megabytes of it into logs and responses.
const MAX_ECHO_CHARS: usize = 40;

/// Why a piece of money text or arithmetic was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MoneyError {
    /// The amount text was empty or only whitespace.
    #[error("amount is empty")]
    Empty,
    /// The amount text is not a plain decimal number.
    #[error("invalid amount {0:?}: expected a plain decimal number such as 12.50")]
    InvalidFormat(String),
    /// The amount has more fractional digits than micro-units can hold.
    #[error("amount {given:?} is too precise: at most 6 decimal places are allowed")]
    TooPrecise {
        /// The offending input (possibly shortened).
        given: String,
    },
    /// The amount carried a minus sign.
    #[error("amount must not be negative")]
    Negative,
    /// The amount is above [`MAX_AMOUNT_MICROS`].
    #[error("amount is too large: the maximum is {max}")]
    TooLarge {
        /// The maximum, formatted as decimal text.
        max: String,
    },
    /// The amount was zero where a positive amount is required.
    #[error("amount must be greater than zero")]
    NotPositive,
    /// The currency is not an active ISO-4217 currency code.
    #[error("unknown currency {0:?}: expected an active ISO-4217 code such as USD or EUR")]
    UnknownCurrency(String),
    /// Two amounts in different currencies were combined.
    #[error("currency mismatch: {left} and {right} cannot be combined")]
    CurrencyMismatch {
        /// Currency of the left operand.
        left: Currency,
        /// Currency of the right operand.
        right: Currency,
    },
    /// Arithmetic on two amounts left the representable range.
    #[error("amount arithmetic overflowed")]
    Overflow,
}

/// Shortens caller input for an error message (see [`MAX_ECHO_CHARS`]).
fn echo(s: &str) -> String {
    if s.chars().count() <= MAX_ECHO_CHARS {
        s.to_owned()
    } else {
        let mut short: String = s.chars().take(MAX_ECHO_CHARS).collect();
        short.push('…');
        short
    }
}

fn too_large() -> MoneyError {
    MoneyError::TooLarge {
        max: format_amount(MAX_AMOUNT_MICROS),
    }
}

/// Parses decimal text into micro-units.
///
/// Grammar, after trimming surrounding whitespace: `DIGITS [ "." DIGITS ]`
/// with ASCII digits only, at least one digit on each side of the point, and
/// at most six digits after it. So `"1000"`, `"1000.00"`, `"0.000001"` and
/// `"007"` are accepted, while `"1."`, `".5"`, `"1e5"`, `"1,000"`, `"+1"`,
/// `"NaN"` and `"inf"` are refused. Why refuse `".5"` and `"1."`: they are
/// usually a truncated or mistyped value, and one canonical form keeps the
/// CLI, the API and the config files in agreement.
///
/// Zero is accepted (`Ok(0)`); callers that need a positive amount use
/// [`parse_positive_limit`] or check themselves. Anything above
/// [`MAX_AMOUNT_MICROS`] is [`MoneyError::TooLarge`].
pub fn parse_amount(s: &str) -> Result<i64, MoneyError> {
    let text = s.trim();
    if text.is_empty() {
        return Err(MoneyError::Empty);
    }
    if let Some(rest) = text.strip_prefix('-') {
        // Only call it "negative" when the rest is a valid amount; "-abc" is
        // plain garbage and the message should say so.
        return match parse_unsigned(rest, text) {
            Ok(_) | Err(MoneyError::TooLarge { .. }) => Err(MoneyError::Negative),
            Err(_) => Err(MoneyError::InvalidFormat(echo(text))),
        };
    }
    parse_unsigned(text, text)
}

/// Parses `DIGITS [ "." DIGITS ]`; `original` is only used in messages.
fn parse_unsigned(text: &str, original: &str) -> Result<i64, MoneyError> {
    let invalid = || MoneyError::InvalidFormat(echo(original));
    let (int_part, frac_part) = match text.split_once('.') {
        Some((int_part, frac_part)) => (int_part, Some(frac_part)),
        None => (text, None),
    };
    if int_part.is_empty() || !int_part.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    let frac_digits = match frac_part {
        None => "",
        Some(f) if f.is_empty() || !f.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(invalid());
        }
        Some(f) if f.len() > FRACTION_DIGITS => {
            return Err(MoneyError::TooPrecise {
                given: echo(original),
            });
        }
        Some(f) => f,
    };

    // Checked arithmetic: a 400-digit number must be "too large", not wrap.
    let mut units: i64 = 0;
    for digit in int_part.bytes() {
        units = units
            .checked_mul(10)
            .and_then(|v| v.checked_add(i64::from(digit - b'0')))
            .ok_or_else(too_large)?;
    }
    let mut fraction: i64 = 0;
    for position in 0..FRACTION_DIGITS {
        let digit = frac_digits.as_bytes().get(position).map_or(0, |b| b - b'0');
        fraction = fraction * 10 + i64::from(digit);
    }
    let micros = units
        .checked_mul(MICROS_PER_UNIT)
        .and_then(|v| v.checked_add(fraction))
        .ok_or_else(too_large)?;
    if micros > MAX_AMOUNT_MICROS {
        return Err(too_large());
    }
    Ok(micros)
}

/// Like [`parse_amount`], but zero is refused with [`MoneyError::NotPositive`].
///
/// Why: a zero limit would deny every request forever, which is almost
/// always a typo; disabling an agent is a separate, explicit action.
pub fn parse_positive_limit(s: &str) -> Result<i64, MoneyError> {
    match parse_amount(s)? {
        0 => Err(MoneyError::NotPositive),
        micros => Ok(micros),
    }
}

/// Formats micro-units as decimal text: at least two fraction digits, and no
/// trailing zeros beyond those two.
///
/// `1_000_000_000` → `"1000.00"`, `1` → `"0.000001"`, `12_500_000` →
/// `"12.50"`. Negative values keep their sign (`"-3.25"`) because a remaining
/// budget goes below zero after a request overshoots its estimate. The output
/// of a non-negative value within [`MAX_AMOUNT_MICROS`] parses back to the
/// same value with [`parse_amount`].
pub fn format_amount(micros: i64) -> String {
    // unsigned_abs: i64::MIN has no positive i64 counterpart.
    let magnitude = micros.unsigned_abs();
    let per_unit = MICROS_PER_UNIT.unsigned_abs();
    let units = magnitude / per_unit;
    let mut fraction = format!("{:06}", magnitude % per_unit);
    while fraction.len() > 2 && fraction.ends_with('0') {
        fraction.pop();
    }
    let sign = if micros < 0 { "-" } else { "" };
    format!("{sign}{units}.{fraction}")
}

/// Active ISO-4217 currency codes (circulating currencies, as of 2025),
/// sorted so that [`Currency::parse`] can binary-search them.
///
/// Deliberately absent: precious metals and special codes (XAU, XAG, XPD,
/// XPT, XDR, XSU, XUA, XBA–XBD), the testing / "no currency" codes XTS and
/// XXX, fund codes (BOV, CHE, CHW, CLF, COU, MXV, USN, UYI, UYW) and
/// withdrawn codes (HRK, SLL, ZWL, ANG, CUC, …). Why: a budget must be kept
/// in money an agent can actually be charged in; a code outside this list is
/// far more likely a typo than a real need.
const ACTIVE_CODES: [&str; 156] = [
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN",
    "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF",
    "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP",
    "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD",
    "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY",
    "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD",
    "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK",
    "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK",
    "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG",
    "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS",
    "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS", "VED",
    "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

/// An active ISO-4217 currency, stored as three uppercase ASCII letters.
///
/// The field is private so that every `Currency` in the program has passed
/// [`Currency::parse`] (or is one of the associated constants).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency([u8; 3]);

impl Currency {
    /// United States dollar.
    pub const USD: Currency = Currency(*b"USD");
    /// Euro.
    pub const EUR: Currency = Currency(*b"EUR");
    /// Pound sterling.
    pub const GBP: Currency = Currency(*b"GBP");

    /// Parses a currency code: exactly three ASCII letters (any case, outer
    /// whitespace ignored) forming an active ISO-4217 code; stored uppercase.
    pub fn parse(s: &str) -> Result<Currency, MoneyError> {
        let unknown = || MoneyError::UnknownCurrency(echo(s));
        let bytes = s.trim().as_bytes();
        let [a, b, c] = bytes else {
            return Err(unknown());
        };
        let code = [
            a.to_ascii_uppercase(),
            b.to_ascii_uppercase(),
            c.to_ascii_uppercase(),
        ];
        if !code.iter().all(u8::is_ascii_uppercase) {
            return Err(unknown());
        }
        let found = ACTIVE_CODES
            .binary_search_by(|candidate| candidate.as_bytes().cmp(&code[..]))
            .is_ok();
        if found {
            Ok(Currency(code))
        } else {
            Err(unknown())
        }
    }

    /// The three-letter code, e.g. `"USD"`.
    pub fn as_str(&self) -> &str {
        // Every constructor admits only ASCII letters, so this cannot fail;
        // the fallback exists only to avoid a panic path.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({})", self.as_str())
    }
}

impl FromStr for Currency {
    type Err = MoneyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::parse(s)
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CurrencyVisitor;

        impl serde::de::Visitor<'_> for CurrencyVisitor {
            type Value = Currency;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an ISO-4217 currency code such as \"USD\"")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Currency, E> {
                Currency::parse(v).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(CurrencyVisitor)
    }
}

/// An amount of micro-units in one currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    /// Amount in micro-units (1e-6 of a unit). May be negative for derived
    /// values such as a remaining budget after an overshoot.
    pub micros: i64,
    /// Currency of the amount.
    pub currency: Currency,
}

impl Money {
    /// An amount from micro-units.
    pub const fn new(micros: i64, currency: Currency) -> Money {
        Money { micros, currency }
    }

    /// Zero in `currency`.
    pub const fn zero(currency: Currency) -> Money {
        Money::new(0, currency)
    }

    /// Parses an amount ([`parse_amount`] rules, zero allowed) and a
    /// currency ([`Currency::parse`] rules).
    pub fn parse(amount: &str, currency: &str) -> Result<Money, MoneyError> {
        Ok(Money::new(
            parse_amount(amount)?,
            Currency::parse(currency)?,
        ))
    }

    /// `self + other`; fails on different currencies or i64 overflow.
    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        let currency = self.same_currency(other)?;
        let micros = self
            .micros
            .checked_add(other.micros)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(micros, currency))
    }

    /// `self - other`; fails on different currencies or i64 overflow. The
    /// result may be negative.
    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        let currency = self.same_currency(other)?;
        let micros = self
            .micros
            .checked_sub(other.micros)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money::new(micros, currency))
    }

    fn same_currency(self, other: Money) -> Result<Currency, MoneyError> {
        if self.currency == other.currency {
            Ok(self.currency)
        } else {
            Err(MoneyError::CurrencyMismatch {
                left: self.currency,
                right: other.currency,
            })
        }
    }
}

impl fmt::Display for Money {
    /// `"1000.00 USD"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", format_amount(self.micros), self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_amount_table() {
        let too_large = || MoneyError::TooLarge {
            max: "1000000000.00".to_owned(),
        };
        let invalid = |s: &str| MoneyError::InvalidFormat(s.to_owned());
        let too_precise = |s: &str| MoneyError::TooPrecise {
            given: s.to_owned(),
        };
        let cases: Vec<(&str, Result<i64, MoneyError>)> = vec![
            ("1000", Ok(1_000_000_000)),
            ("1000.00", Ok(1_000_000_000)),
            ("0.000001", Ok(1)),
            ("12.5", Ok(12_500_000)),
            ("0", Ok(0)),
            ("0.0", Ok(0)),
            ("007", Ok(7_000_000)),
            ("  42.10\t\n", Ok(42_100_000)),
            ("999999999.999999", Ok(999_999_999_999_999)),
            ("1000000000", Ok(MAX_AMOUNT_MICROS)),
            ("1000000000.000000", Ok(MAX_AMOUNT_MICROS)),
            ("1000000000.000001", Err(too_large())),
            ("9223372036854.775807", Err(too_large())),
            ("99999999999999999999999999", Err(too_large())),
            ("", Err(MoneyError::Empty)),
            ("   ", Err(MoneyError::Empty)),
            ("-1", Err(MoneyError::Negative)),
            ("-0.5", Err(MoneyError::Negative)),
            ("-99999999999999999999", Err(MoneyError::Negative)),
            ("-", Err(invalid("-"))),
            ("-abc", Err(invalid("-abc"))),
            ("--1", Err(invalid("--1"))),
            ("+1", Err(invalid("+1"))),
            ("1.0000001", Err(too_precise("1.0000001"))),
            ("1.0000000", Err(too_precise("1.0000000"))),
            ("1e5", Err(invalid("1e5"))),
            ("1E5", Err(invalid("1E5"))),
            ("NaN", Err(invalid("NaN"))),
            ("nan", Err(invalid("nan"))),
            ("inf", Err(invalid("inf"))),
            ("infinity", Err(invalid("infinity"))),
            ("1,000", Err(invalid("1,000"))),
            ("1 000", Err(invalid("1 000"))),
            ("1_000", Err(invalid("1_000"))),
            ("1'000", Err(invalid("1'000"))),
            ("1,5", Err(invalid("1,5"))),
            (".", Err(invalid("."))),
            ("1.", Err(invalid("1."))),
            (".5", Err(invalid(".5"))),
            ("1.2.3", Err(invalid("1.2.3"))),
            ("0x10", Err(invalid("0x10"))),
            ("１", Err(invalid("１"))),
            ("1.5x", Err(invalid("1.5x"))),
            ("$5", Err(invalid("$5"))),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_amount(input), expected, "input {input:?}");
        }
    }

    #[test]
    fn error_messages_are_human_and_bounded() {
        assert_eq!(
            parse_amount("1.0000001").unwrap_err().to_string(),
            "amount \"1.0000001\" is too precise: at most 6 decimal places are allowed"
        );
        assert_eq!(
            parse_amount("2000000000").unwrap_err().to_string(),
            "amount is too large: the maximum is 1000000000.00"
        );
        let long = "x".repeat(10_000);
        let message = parse_amount(&long).unwrap_err().to_string();
        assert!(message.len() < 200, "{message}");
    }

    #[test]
    fn parse_positive_limit_table() {
        assert_eq!(parse_positive_limit("0"), Err(MoneyError::NotPositive));
        assert_eq!(
            parse_positive_limit("0.000000"),
            Err(MoneyError::NotPositive)
        );
        assert_eq!(parse_positive_limit("0.000001"), Ok(1));
        assert_eq!(parse_positive_limit("100"), Ok(100_000_000));
        assert_eq!(parse_positive_limit("-1"), Err(MoneyError::Negative));
        assert_eq!(parse_positive_limit(""), Err(MoneyError::Empty));
    }

    #[test]
    fn format_amount_table() {
        let cases = [
            (1_000_000_000, "1000.00"),
            (1, "0.000001"),
            (12_500_000, "12.50"),
            (-3_250_000, "-3.25"),
            (0, "0.00"),
            (10, "0.00001"),
            (1_234_567, "1.234567"),
            (100_000, "0.10"),
            (-1, "-0.000001"),
            (MAX_AMOUNT_MICROS, "1000000000.00"),
            (i64::MAX, "9223372036854.775807"),
            (i64::MIN, "-9223372036854.775808"),
        ];
        for (micros, expected) in cases {
            assert_eq!(format_amount(micros), expected, "micros {micros}");
        }
    }

    #[test]
    fn currency_table() {
        let accepted = [
            ("USD", "USD"),
            ("usd", "USD"),
            ("eUr", "EUR"),
            (" gbp ", "GBP"),
            ("JPY", "JPY"),
            ("CHF", "CHF"),
            ("XOF", "XOF"),
            ("ZWG", "ZWG"),
            ("AED", "AED"),
        ];
        for (input, code) in accepted {
            assert_eq!(
                Currency::parse(input).map(|c| c.to_string()),
                Ok(code.to_owned()),
                "{input:?}"
            );
        }
        let refused = [
            "", "US", "USDX", "XAU", "XAG", "XXX", "XTS", "XDR", "ABC", "HRK", "U$D", "12A", "ÜSD",
            "US D",
        ];
        for input in refused {
            assert!(
                matches!(Currency::parse(input), Err(MoneyError::UnknownCurrency(_))),
                "{input:?} should be refused"
            );
        }
    }

    #[test]
    fn currency_list_is_sorted_unique_and_well_formed() {
        assert!(ACTIVE_CODES.windows(2).all(|pair| pair[0] < pair[1]));
        for code in ACTIVE_CODES {
            assert_eq!(code.len(), 3);
            assert!(code.bytes().all(|b| b.is_ascii_uppercase()), "{code}");
            assert_eq!(
                Currency::parse(code).map(|c| c.to_string()),
                Ok(code.into())
            );
        }
        for common in [
            "USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "CNY", "INR", "BRL", "MXN", "SEK",
            "NOK", "DKK", "PLN", "CZK", "HUF", "ZAR", "SGD", "HKD", "NZD", "KRW", "TRY", "ILS",
            "AED", "SAR",
        ] {
            assert!(ACTIVE_CODES.contains(&common), "{common}");
        }
        assert_eq!(Currency::USD.as_str(), "USD");
        assert_eq!(format!("{:?}", Currency::EUR), "Currency(EUR)");
    }

    #[test]
    fn money_parse_display_and_arithmetic() {
        let a = Money::parse("1000", "usd").unwrap();
        assert_eq!(a, Money::new(1_000_000_000, Currency::USD));
        assert_eq!(a.to_string(), "1000.00 USD");
        let b = Money::parse("0.25", "USD").unwrap();
        assert_eq!(a.checked_add(b).unwrap().to_string(), "1000.25 USD");
        assert_eq!(b.checked_sub(a).unwrap().to_string(), "-999.75 USD");
        let e = Money::zero(Currency::EUR);
        assert_eq!(
            a.checked_add(e),
            Err(MoneyError::CurrencyMismatch {
                left: Currency::USD,
                right: Currency::EUR
            })
        );
        let max = Money::new(i64::MAX, Currency::USD);
        assert_eq!(max.checked_add(b), Err(MoneyError::Overflow));
        let min = Money::new(i64::MIN, Currency::USD);
        assert_eq!(min.checked_sub(b), Err(MoneyError::Overflow));
        assert_eq!(
            Money::parse("1", "ZZZ"),
            Err(MoneyError::UnknownCurrency("ZZZ".into()))
        );
        assert_eq!(
            Money::parse("x", "USD"),
            Err(MoneyError::InvalidFormat("x".into()))
        );
    }

    #[test]
    fn currency_serde_is_a_string() {
        // serde_json is not a dependency; use serde's value deserializer to
        // check the string representation.
        use serde::de::value::{Error as DeError, StrDeserializer};
        use serde::de::IntoDeserializer;
        let de: StrDeserializer<'_, DeError> = "eur".into_deserializer();
        assert_eq!(Currency::deserialize(de), Ok(Currency::EUR));
        let de: StrDeserializer<'_, DeError> = "XAU".into_deserializer();
        assert!(Currency::deserialize(de).is_err());
    }

    proptest! {
        #[test]
        fn format_then_parse_round_trips(micros in 0..=MAX_AMOUNT_MICROS) {
            prop_assert_eq!(parse_amount(&format_amount(micros)), Ok(micros));
        }

        #[test]
        fn parse_never_panics_and_stays_in_range(s in "\\PC{0,30}") {
            if let Ok(micros) = parse_amount(&s) {
                prop_assert!((0..=MAX_AMOUNT_MICROS).contains(&micros));
            }
        }

        #[test]
        fn numeric_text_parses_exactly(units in 0i64..1_000_000_000, frac in 0i64..1_000_000) {
            let text = format!("{units}.{frac:06}");
            prop_assert_eq!(parse_amount(&text), Ok(units * MICROS_PER_UNIT + frac));
        }
    }
}
