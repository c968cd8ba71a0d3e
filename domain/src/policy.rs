//! Whether one reservation fits every budget that applies to an agent.
//!
//! An agent is limited by its own policies and by every policy of its
//! ancestors (a team's budget caps all of its agents together). Before a
//! request goes upstream, its estimated cost is reserved against all of them
//! at once; it is allowed only if it fits every one. This module is the pure
//! rule; the hot path applies the same rule atomically next to the counters.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::money::{Currency, Money, MAX_AMOUNT_MICROS};

/// Why a policy input was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    /// A reservation estimate below zero would create budget out of nothing.
    #[error("estimate must not be negative")]
    NegativeEstimate,
    /// An estimate above [`MAX_AMOUNT_MICROS`] (see there for why).
    #[error("estimate exceeds the maximum single amount")]
    EstimateTooLarge,
    /// Not `charge` or `release`.
    #[error("unknown on-expiry action {0:?}: expected charge or release")]
    UnknownOnExpiry(String),
}

/// What happens to a reservation that expires without being settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnExpiry {
    /// Keep the estimate as spent. The default, because an unsettled request
    /// (a crashed proxy, a lost usage report) may still have been served and
    /// billed upstream: for a hard limit, assuming it cost the estimate is
    /// the safe side.
    #[default]
    Charge,
    /// Give the estimate back to the budget.
    Release,
}

impl OnExpiry {
    /// `"charge"` or `"release"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            OnExpiry::Charge => "charge",
            OnExpiry::Release => "release",
        }
    }
}

impl fmt::Display for OnExpiry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OnExpiry {
    type Err = PolicyError;

    /// `charge` or `release`, ignoring ASCII case and surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim();
        [OnExpiry::Charge, OnExpiry::Release]
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| PolicyError::UnknownOnExpiry(name.chars().take(40).collect()))
    }
}

/// One policy's limit and its counters in the current window.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyState {
    /// Policy identifier (reported on deny).
    pub policy_id: String,
    /// Agent the policy belongs to (the requester or one of its ancestors).
    pub agent_id: String,
    /// Limit for the window, in micro-units.
    pub limit_micros: i64,
    /// Currency of the limit and the counters.
    pub currency: Currency,
    /// Settled spend in the current window. Can exceed the limit after an
    /// overshoot (a request that cost more than its estimate).
    pub spent_micros: i64,
    /// Open (not yet settled) reservations in the current window.
    pub reserved_micros: i64,
}

impl PolicyState {
    /// `limit - spent - reserved`, saturated to `i64`; negative after an
    /// overshoot.
    pub fn available_micros(&self) -> i64 {
        saturate(headroom(self))
    }
}

/// A policy's remaining budget, as reported back to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Remaining {
    /// Policy identifier.
    pub policy_id: String,
    /// Agent the policy belongs to.
    pub agent_id: String,
    /// Remaining micro-units; negative after an overshoot.
    pub remaining_micros: i64,
    /// Currency of the policy.
    pub currency: Currency,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    /// The estimate does not fit in the named policy's remaining budget.
    BudgetExceeded,
    /// The named policy is kept in a different currency than the estimate.
    /// Refused rather than converted: exchange rates move, limits must not.
    CurrencyMismatch,
    /// No policy applies and unrestricted agents are not allowed.
    NoPolicy,
}

impl DenyReason {
    /// Stable machine-readable code: `budget_exceeded`, `currency_mismatch`,
    /// `no_policy`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DenyReason::BudgetExceeded => "budget_exceeded",
            DenyReason::CurrencyMismatch => "currency_mismatch",
            DenyReason::NoPolicy => "no_policy",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Decision {
    /// The estimate fits every policy.
    Allow {
        /// Every policy's remaining budget *after* reserving the estimate,
        /// in input order.
        remaining: Vec<Remaining>,
    },
    /// The estimate does not fit (or no policy applies).
    Deny {
        /// The first failing policy in input order; empty for
        /// [`DenyReason::NoPolicy`].
        policy_id: String,
        /// Owner of that policy; empty for [`DenyReason::NoPolicy`].
        agent_id: String,
        /// Why it failed.
        reason: DenyReason,
        /// Every policy's remaining budget *before* reserving (nothing was
        /// reserved), in input order.
        remaining: Vec<Remaining>,
    },
}

impl Decision {
    /// Whether the reservation may proceed.
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// The per-policy remaining budgets carried by either variant.
    pub fn remaining(&self) -> &[Remaining] {
        match self {
            Decision::Allow { remaining } | Decision::Deny { remaining, .. } => remaining,
        }
    }
}

/// Decides whether `estimate` can be reserved against all `policies`.
///
/// Callers pass the agent's own policies first, then its ancestors' from the
/// nearest up, so that a deny names the most specific budget that failed.
///
/// Allowed iff every policy is in the estimate's currency and
/// `spent + reserved + estimate <= limit`. The sums are done in `i128`, so
/// no combination of `i64` counters can overflow into a wrong answer. A
/// policy that is already over its limit refuses even a zero estimate.
///
/// With no policies the result is `Allow` only if `allow_without_policy`
/// (a deployment choice between "unbudgeted agents are free" and "every
/// agent needs a budget"); otherwise `Deny` with [`DenyReason::NoPolicy`].
///
/// Errors: a negative estimate, or one above [`MAX_AMOUNT_MICROS`].
pub fn evaluate(
    policies: &[PolicyState],
    estimate: Money,
    allow_without_policy: bool,
) -> Result<Decision, PolicyError> {
    if estimate.micros < 0 {
        return Err(PolicyError::NegativeEstimate);
    }
    if estimate.micros > MAX_AMOUNT_MICROS {
        return Err(PolicyError::EstimateTooLarge);
    }
    if policies.is_empty() {
        return Ok(if allow_without_policy {
            Decision::Allow {
                remaining: Vec::new(),
            }
        } else {
            Decision::Deny {
                policy_id: String::new(),
                agent_id: String::new(),
                reason: DenyReason::NoPolicy,
                remaining: Vec::new(),
            }
        });
    }

    let failure = policies
        .iter()
        .find_map(|p| refusal(p, estimate).map(|reason| (p, reason)));
    Ok(match failure {
        None => Decision::Allow {
            remaining: remaining_list(policies, estimate.micros),
        },
        Some((policy, reason)) => Decision::Deny {
            policy_id: policy.policy_id.clone(),
            agent_id: policy.agent_id.clone(),
            reason,
            remaining: remaining_list(policies, 0),
        },
    })
}

/// The smallest remaining budget (the first one on ties): the figure worth
/// reporting to a client, since it is the one that will refuse first.
/// Only meaningful when all entries share a currency, which is the case for
/// an `Allow`.
pub fn min_remaining(remaining: &[Remaining]) -> Option<&Remaining> {
    remaining.iter().min_by_key(|r| r.remaining_micros)
}

/// Why `policy` refuses `estimate`, if it does.
fn refusal(policy: &PolicyState, estimate: Money) -> Option<DenyReason> {
    if policy.currency != estimate.currency {
        Some(DenyReason::CurrencyMismatch)
    } else if headroom(policy) < i128::from(estimate.micros) {
        Some(DenyReason::BudgetExceeded)
    } else {
        None
    }
}

/// `limit - spent - reserved`, exact.
fn headroom(policy: &PolicyState) -> i128 {
    i128::from(policy.limit_micros)
        - i128::from(policy.spent_micros)
        - i128::from(policy.reserved_micros)
}

fn saturate(value: i128) -> i64 {
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

fn remaining_list(policies: &[PolicyState], reserving: i64) -> Vec<Remaining> {
    policies
        .iter()
        .map(|p| Remaining {
            policy_id: p.policy_id.clone(),
            agent_id: p.agent_id.clone(),
            remaining_micros: saturate(headroom(p) - i128::from(reserving)),
            currency: p.currency,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(id: &str, limit: i64, spent: i64, reserved: i64) -> PolicyState {
        PolicyState {
            policy_id: id.to_owned(),
            agent_id: format!("agent-of-{id}"),
            limit_micros: limit,
            currency: Currency::USD,
            spent_micros: spent,
            reserved_micros: reserved,
        }
    }

    fn usd(micros: i64) -> Money {
        Money::new(micros, Currency::USD)
    }

    #[test]
    fn on_expiry_names() {
        assert_eq!(OnExpiry::default(), OnExpiry::Charge);
        assert_eq!("charge".parse::<OnExpiry>(), Ok(OnExpiry::Charge));
        assert_eq!(" Release ".parse::<OnExpiry>(), Ok(OnExpiry::Release));
        assert_eq!(OnExpiry::Release.to_string(), "release");
        assert_eq!(
            "refund".parse::<OnExpiry>(),
            Err(PolicyError::UnknownOnExpiry("refund".into()))
        );
    }

    #[test]
    fn allow_reports_remaining_after_reserving() {
        let policies = [policy("own", 100, 30, 20), policy("team", 1_000, 0, 900)];
        let decision = evaluate(&policies, usd(40), false).unwrap();
        let Decision::Allow { remaining } = &decision else {
            panic!("expected allow, got {decision:?}");
        };
        let values: Vec<i64> = remaining.iter().map(|r| r.remaining_micros).collect();
        assert_eq!(values, vec![10, 60]);
        assert_eq!(
            min_remaining(remaining).map(|r| r.policy_id.as_str()),
            Some("own")
        );
    }

    #[test]
    fn exact_fit_is_allowed() {
        let decision = evaluate(&[policy("p", 100, 60, 40)], usd(0), false).unwrap();
        assert!(decision.is_allow());
        let decision = evaluate(&[policy("p", 100, 60, 30)], usd(10), false).unwrap();
        assert_eq!(decision.remaining()[0].remaining_micros, 0);
        assert!(decision.is_allow());
    }

    #[test]
    fn deny_names_first_failing_policy_and_reports_before_reserving() {
        let policies = [
            policy("own", 100, 0, 0),
            policy("team", 50, 45, 0),
            policy("org", 10, 20, 0),
        ];
        let decision = evaluate(&policies, usd(10), false).unwrap();
        assert_eq!(
            decision,
            Decision::Deny {
                policy_id: "team".into(),
                agent_id: "agent-of-team".into(),
                reason: DenyReason::BudgetExceeded,
                remaining: vec![
                    Remaining {
                        policy_id: "own".into(),
                        agent_id: "agent-of-own".into(),
                        remaining_micros: 100,
                        currency: Currency::USD
                    },
                    Remaining {
                        policy_id: "team".into(),
                        agent_id: "agent-of-team".into(),
                        remaining_micros: 5,
                        currency: Currency::USD
                    },
                    Remaining {
                        policy_id: "org".into(),
                        agent_id: "agent-of-org".into(),
                        remaining_micros: -10,
                        currency: Currency::USD
                    },
                ],
            }
        );
        assert_eq!(
            min_remaining(decision.remaining()).unwrap().policy_id,
            "org"
        );
    }

    #[test]
    fn overshot_budget_refuses_even_zero() {
        let decision = evaluate(&[policy("p", 100, 101, 0)], usd(0), false).unwrap();
        assert!(!decision.is_allow());
    }

    #[test]
    fn currency_mismatch_is_denied() {
        let mut eur = policy("eur", 1_000, 0, 0);
        eur.currency = Currency::EUR;
        let decision = evaluate(&[policy("usd", 1_000, 0, 0), eur], usd(1), false).unwrap();
        assert!(matches!(
            decision,
            Decision::Deny { ref policy_id, reason: DenyReason::CurrencyMismatch, .. } if policy_id == "eur"
        ));
    }

    #[test]
    fn no_policy() {
        assert_eq!(
            evaluate(&[], usd(5), false).unwrap(),
            Decision::Deny {
                policy_id: String::new(),
                agent_id: String::new(),
                reason: DenyReason::NoPolicy,
                remaining: vec![],
            }
        );
        assert_eq!(
            evaluate(&[], usd(5), true).unwrap(),
            Decision::Allow { remaining: vec![] }
        );
        assert_eq!(min_remaining(&[]), None);
    }

    #[test]
    fn invalid_estimates() {
        let policies = [policy("p", 100, 0, 0)];
        assert_eq!(
            evaluate(&policies, usd(-1), true),
            Err(PolicyError::NegativeEstimate)
        );
        assert_eq!(
            evaluate(&policies, usd(MAX_AMOUNT_MICROS + 1), true),
            Err(PolicyError::EstimateTooLarge)
        );
    }

    #[test]
    fn extreme_counters_do_not_overflow() {
        let policies = [
            policy("a", i64::MAX, i64::MIN, i64::MIN),
            policy("b", i64::MIN, i64::MAX, i64::MAX),
        ];
        let decision = evaluate(&policies, usd(MAX_AMOUNT_MICROS), false).unwrap();
        assert_eq!(
            decision
                .remaining()
                .iter()
                .map(|r| r.remaining_micros)
                .collect::<Vec<_>>(),
            vec![i64::MAX, i64::MIN]
        );
        assert!(matches!(decision, Decision::Deny { ref policy_id, .. } if policy_id == "b"));
    }

    fn states() -> impl Strategy<Value = Vec<PolicyState>> {
        // Small numbers so that exact fits and near misses happen often.
        prop::collection::vec((0i64..1_000, 0i64..1_200, 0i64..600), 0..5).prop_map(|rows| {
            rows.into_iter()
                .enumerate()
                .map(|(i, (limit, spent, reserved))| {
                    policy(&format!("p{i}"), limit, spent, reserved)
                })
                .collect()
        })
    }

    fn lacks_room(p: &PolicyState, estimate: i64) -> bool {
        i128::from(p.spent_micros) + i128::from(p.reserved_micros) + i128::from(estimate)
            > i128::from(p.limit_micros)
    }

    proptest! {
        #[test]
        fn allow_iff_every_policy_has_room(policies in states(), estimate in 0i64..1_000) {
            let decision = evaluate(&policies, usd(estimate), false).unwrap();
            let any_lacks = policies.iter().any(|p| lacks_room(p, estimate));
            if policies.is_empty() {
                let no_policy = matches!(decision, Decision::Deny { reason: DenyReason::NoPolicy, .. });
                prop_assert!(no_policy);
                return Ok(());
            }
            prop_assert_eq!(decision.is_allow(), !any_lacks);
            match &decision {
                Decision::Allow { remaining } => {
                    // Every policy stays within its limit after the estimate.
                    for (p, r) in policies.iter().zip(remaining) {
                        prop_assert!(p.spent_micros + p.reserved_micros + estimate <= p.limit_micros);
                        prop_assert!(r.remaining_micros >= 0);
                        prop_assert_eq!(r.remaining_micros, p.limit_micros - p.spent_micros - p.reserved_micros - estimate);
                    }
                }
                Decision::Deny { policy_id, reason, remaining, .. } => {
                    prop_assert_eq!(*reason, DenyReason::BudgetExceeded);
                    // The named policy really lacks room, and it is the first such.
                    let first = policies.iter().position(|p| lacks_room(p, estimate)).unwrap();
                    prop_assert_eq!(&policies[first].policy_id, policy_id);
                    for (p, r) in policies.iter().zip(remaining) {
                        prop_assert_eq!(r.remaining_micros, p.limit_micros - p.spent_micros - p.reserved_micros);
                    }
                }
            }
        }

        #[test]
        fn sequence_of_reservations_never_exceeds_a_limit(
            limits in prop::collection::vec(0i64..1_000, 1..5),
            estimates in prop::collection::vec(0i64..300, 1..30),
        ) {
            let mut policies: Vec<PolicyState> = limits
                .iter()
                .enumerate()
                .map(|(i, &limit)| policy(&format!("p{i}"), limit, limit / 3, 0))
                .collect();
            for estimate in estimates {
                if evaluate(&policies, usd(estimate), false).unwrap().is_allow() {
                    for p in &mut policies {
                        p.reserved_micros += estimate;
                    }
                }
                for p in &policies {
                    prop_assert!(p.spent_micros + p.reserved_micros <= p.limit_micros, "{:?}", p);
                }
            }
        }

        #[test]
        fn any_counters_never_panic(
            rows in prop::collection::vec((any::<i64>(), any::<i64>(), any::<i64>()), 0..4),
            estimate in 0..=MAX_AMOUNT_MICROS,
        ) {
            let policies: Vec<PolicyState> = rows
                .into_iter()
                .map(|(limit, spent, reserved)| policy("p", limit, spent, reserved))
                .collect();
            let decision = evaluate(&policies, usd(estimate), true).unwrap();
            prop_assert_eq!(decision.is_allow(), !policies.iter().any(|p| lacks_room(p, estimate)));
        }
    }
}
