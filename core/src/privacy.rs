//! User-level (epsilon, delta) differential-privacy accounting for rounds of
//! the Poisson-subsampled Gaussian mechanism, through Rényi DP (RDP).
//!
//! Each round samples every user independently with probability `q` (the
//! sampling rate), clips each user's contribution to L2 norm `C` and adds
//! Gaussian noise of standard deviation `sigma * C`; `sigma` is the noise
//! multiplier. Such a round is `(alpha, rdp(alpha))`-RDP at every order
//! `alpha > 1` (Mironov, Talwar and Zhang 2019; see [`rdp_sampled_gaussian`]),
//! RDP adds up over rounds, and the total converts to an (epsilon, delta)
//! guarantee with [`epsilon_from_rdp`].
//!
//! The pieces:
//! - [`rdp_sampled_gaussian`] / [`rdp_curve`]: the RDP of one round.
//! - [`epsilon_from_rdp`]: RDP at a set of orders to (epsilon, delta).
//! - [`epsilon`] and [`noise_multiplier_for`]: planning T identical rounds.
//! - [`PrivacyLedger`]: the spent RDP of a running job, charged round by
//!   round (each round with its own `q` and effective `sigma`), which can say
//!   before charging whether a round would overrun a [`PrivacyBudget`].
//!
//! The numbers agree with Google's `dp_accounting` `RdpAccountant` (see
//! `core/tests/privacy_golden.rs`), except that fractional orders here use
//! the exact signed series where `dp_accounting` 0.6 sums the magnitudes of
//! its terms (an upper bound), so epsilon here can be smaller, never larger.

mod sgm;

use serde::{Deserialize, Serialize};

/// Number of orders in [`DEFAULT_ORDERS`].
pub const DEFAULT_ORDER_COUNT: usize = 156;

/// The RDP orders of Google's `dp_accounting` (`DEFAULT_RDP_ORDERS`):
/// 1.1, 1.2, ..., 10.9, then 11, 12, ..., 63, then 128, 256, 512, 1024.
/// The fractional ones are computed as `1 + x / 10` like Python does, so
/// they are the same `f64` values.
pub const DEFAULT_ORDERS: [f64; DEFAULT_ORDER_COUNT] = default_orders();

const fn default_orders() -> [f64; DEFAULT_ORDER_COUNT] {
    let mut orders = [0.0; DEFAULT_ORDER_COUNT];
    let mut x = 1;
    while x < 100 {
        orders[x - 1] = 1.0 + x as f64 / 10.0;
        x += 1;
    }
    let mut k = 11;
    while k < 64 {
        orders[99 + k - 11] = k as f64;
        k += 1;
    }
    orders[152] = 128.0;
    orders[153] = 256.0;
    orders[154] = 512.0;
    orders[155] = 1024.0;
    orders
}

/// Largest RDP order accepted (the integer-order sum has `order + 1` terms).
pub const MAX_ORDER: f64 = 100_000.0;

/// Relative width of the final bracket of [`noise_multiplier_for`]: the
/// returned `sigma` meets the target and `sigma * (1 - NOISE_MULTIPLIER_TOLERANCE)`
/// (or less) was found not to.
pub const NOISE_MULTIPLIER_TOLERANCE: f64 = 1e-6;

/// [`noise_multiplier_for`] searches noise multipliers in
/// `[MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER]`.
pub const MIN_NOISE_MULTIPLIER: f64 = 1e-6;
/// See [`MIN_NOISE_MULTIPLIER`].
pub const MAX_NOISE_MULTIPLIER: f64 = 1e7;

/// Why a privacy computation was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum PrivacyError {
    #[error("sampling rate must be in {allowed}, got {value}")]
    SamplingRate { value: f64, allowed: &'static str },
    #[error("noise multiplier must be {allowed}, got {value}")]
    NoiseMultiplier { value: f64, allowed: &'static str },
    #[error("delta must be in (0, 1), got {value}")]
    Delta { value: f64 },
    #[error("the number of rounds must be at least 1")]
    ZeroRounds,
    #[error("target epsilon must be positive and finite, got {value}")]
    TargetEpsilon { value: f64 },
    #[error("budget epsilon must be non-negative and finite, got {value}")]
    BudgetEpsilon { value: f64 },
    #[error("no RDP orders given")]
    NoOrders,
    #[error(
        "RDP order #{index} is {value}; orders must be finite, above 1 and at most {MAX_ORDER}"
    )]
    Order { index: usize, value: f64 },
    #[error("{orders} RDP orders but {values} RDP values")]
    LengthMismatch { orders: usize, values: usize },
    #[error("RDP value #{index} is {value}; RDP values must be non-negative")]
    RdpValue { index: usize, value: f64 },
    #[error(
        "epsilon {target_epsilon} is out of reach: even noise multiplier \
         {max_noise_multiplier} gives epsilon {epsilon}"
    )]
    Unreachable {
        target_epsilon: f64,
        max_noise_multiplier: f64,
        epsilon: f64,
    },
    #[error(
        "charging this round would raise epsilon to {epsilon_after} at delta {delta}, \
         over the budget of {budget_epsilon}"
    )]
    BudgetExceeded {
        epsilon_after: f64,
        budget_epsilon: f64,
        delta: f64,
    },
}

/// An (epsilon, delta) guarantee at a given delta, and the RDP order that
/// gave it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpsilonReport {
    /// `>= 0`; +infinity when no order gives a finite bound.
    pub epsilon: f64,
    /// The order that achieved `epsilon` (the first of equals).
    pub order: f64,
}

fn check_sampling_rate(q: f64, allow_zero: bool) -> Result<(), PrivacyError> {
    let ok = if allow_zero {
        (0.0..=1.0).contains(&q)
    } else {
        q > 0.0 && q <= 1.0
    };
    if ok {
        Ok(())
    } else {
        Err(PrivacyError::SamplingRate {
            value: q,
            allowed: if allow_zero { "[0, 1]" } else { "(0, 1]" },
        })
    }
}

fn check_noise_multiplier(sigma: f64, allow_zero: bool) -> Result<(), PrivacyError> {
    let ok = sigma.is_finite() && (sigma > 0.0 || (allow_zero && sigma == 0.0));
    if ok {
        Ok(())
    } else {
        Err(PrivacyError::NoiseMultiplier {
            value: sigma,
            allowed: if allow_zero {
                "non-negative and finite"
            } else {
                "positive and finite"
            },
        })
    }
}

fn check_delta(delta: f64) -> Result<(), PrivacyError> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(PrivacyError::Delta { value: delta })
    }
}

fn check_orders(orders: &[f64]) -> Result<(), PrivacyError> {
    if orders.is_empty() {
        return Err(PrivacyError::NoOrders);
    }
    for (index, &value) in orders.iter().enumerate() {
        if !(value > 1.0 && value <= MAX_ORDER) {
            return Err(PrivacyError::Order { index, value });
        }
    }
    Ok(())
}

fn check_rdp_values(orders: &[f64], rdp: &[f64]) -> Result<(), PrivacyError> {
    if orders.len() != rdp.len() {
        return Err(PrivacyError::LengthMismatch {
            orders: orders.len(),
            values: rdp.len(),
        });
    }
    for (index, &value) in rdp.iter().enumerate() {
        if value.is_nan() || value < 0.0 {
            return Err(PrivacyError::RdpValue { index, value });
        }
    }
    Ok(())
}

/// RDP at `order` of one round of the Poisson-subsampled Gaussian mechanism
/// with sampling rate `q` and noise multiplier `sigma` (Mironov, Talwar and
/// Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian
/// Mechanism").
///
/// With `mu0 = N(0, sigma^2)` and `mu = (1 - q) N(0, sigma^2) + q N(1, sigma^2)`
/// the value is `log(A) / (order - 1)` with `A = E_{mu0}[(mu / mu0)^order]`:
/// for integer orders the exact binomial sum, for fractional orders the
/// two-series formula of the paper's Sec. 3.3, both summed in log space. The
/// fractional series is truncated once its terms fall below `exp(-30)` and
/// `exp(-25)` times `A - 1` (or below `exp(-36)`), and the last terms'
/// magnitudes are added (the tails alternate, so this rounds up); if it has not converged after 200 000 terms the order gets
/// +infinity, which only removes it from the (epsilon, delta) minimum.
///
/// Special cases: `q = 0` gives 0, `sigma = 0` (with `q > 0`) +infinity and
/// `q = 1` the plain Gaussian's `order / (2 sigma^2)`.
///
/// Accepts `q` in [0, 1], finite `sigma >= 0` and `1 < order <= MAX_ORDER`.
pub fn rdp_sampled_gaussian(q: f64, sigma: f64, order: f64) -> Result<f64, PrivacyError> {
    check_sampling_rate(q, true)?;
    check_noise_multiplier(sigma, true)?;
    check_orders(&[order])?;
    Ok(sgm::rdp(q, sigma, order))
}

/// [`rdp_sampled_gaussian`] at each of `orders`.
pub fn rdp_curve(q: f64, sigma: f64, orders: &[f64]) -> Result<Vec<f64>, PrivacyError> {
    check_sampling_rate(q, true)?;
    check_noise_multiplier(sigma, true)?;
    check_orders(orders)?;
    Ok(orders
        .iter()
        .map(|&order| sgm::rdp(q, sigma, order))
        .collect())
}

/// Converts RDP guarantees at several orders into the smallest epsilon they
/// imply at `delta`, with the conversion of Canonne, Kamath and Steinke 2020
/// ("The Discrete Gaussian for Differential Privacy", Prop. 12; also Balle
/// et al. 2020, "Hypothesis Testing Interpretations and Rényi Differential
/// Privacy", Thm. 21):
///
/// ```text
/// epsilon(alpha) = rdp(alpha) + log((alpha - 1) / alpha) - (log(delta) + log(alpha)) / (alpha - 1)
/// epsilon        = max(0, min over alpha of epsilon(alpha))
/// ```
///
/// It is never worse than the classic `rdp(alpha) + log(1/delta) / (alpha - 1)`
/// (Mironov 2017), since `log((alpha - 1) / alpha) - log(alpha) / (alpha - 1) < 0`.
///
/// As in `dp_accounting`, an order whose RDP is tiny enough that
/// `delta^2 > 1 - exp(-rdp(alpha))` gives epsilon 0: RDP of any order
/// `>= 1` bounds the KL divergence, and the total variation distance, which
/// is the delta of epsilon 0, is at most `sqrt(1 - exp(-KL))`
/// (Bretagnolle-Huber).
///
/// The returned order is the first one that achieves the minimum.
/// Infinite RDP values are allowed (they give infinite epsilon).
pub fn epsilon_from_rdp(
    orders: &[f64],
    rdp: &[f64],
    delta: f64,
) -> Result<EpsilonReport, PrivacyError> {
    check_orders(orders)?;
    check_rdp_values(orders, rdp)?;
    check_delta(delta)?;
    Ok(convert(orders, rdp.iter().copied(), delta))
}

/// [`epsilon_from_rdp`] without the checks.
fn convert(orders: &[f64], rdp: impl Iterator<Item = f64>, delta: f64) -> EpsilonReport {
    let log_delta = delta.ln();
    let mut best = EpsilonReport {
        epsilon: f64::INFINITY,
        order: orders[0],
    };
    for (&alpha, r) in orders.iter().zip(rdp) {
        let eps = if r == f64::INFINITY {
            f64::INFINITY
        } else if delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else {
            r + (-1.0 / alpha).ln_1p() - (log_delta + alpha.ln()) / (alpha - 1.0)
        };
        if eps < best.epsilon {
            best = EpsilonReport {
                epsilon: eps,
                order: alpha,
            };
        }
    }
    best.epsilon = best.epsilon.max(0.0);
    best
}

fn check_plan(q: f64, rounds: u64, delta: f64) -> Result<(), PrivacyError> {
    check_sampling_rate(q, false)?;
    if rounds == 0 {
        return Err(PrivacyError::ZeroRounds);
    }
    check_delta(delta)
}

/// Epsilon at `delta` after `rounds` rounds with noise multiplier `sigma` and
/// sampling rate `q`, over [`DEFAULT_ORDERS`]: per-round RDP times `rounds`,
/// converted with [`epsilon_from_rdp`].
///
/// Requires `q` in (0, 1], `sigma > 0` and finite, `rounds >= 1`, `delta` in
/// (0, 1).
pub fn epsilon(sigma: f64, q: f64, rounds: u64, delta: f64) -> Result<EpsilonReport, PrivacyError> {
    check_noise_multiplier(sigma, false)?;
    check_plan(q, rounds, delta)?;
    Ok(plan_epsilon(sigma, q, rounds, delta))
}

fn plan_epsilon(sigma: f64, q: f64, rounds: u64, delta: f64) -> EpsilonReport {
    let t = rounds as f64;
    let rdp = DEFAULT_ORDERS
        .iter()
        .map(|&order| t * sgm::rdp(q, sigma, order));
    convert(&DEFAULT_ORDERS, rdp, delta)
}

/// The smallest noise multiplier whose [`epsilon`] after `rounds` rounds at
/// sampling rate `q` is at most `target_epsilon` at `delta`.
///
/// Brackets the answer by doubling or halving from 1, then bisects until the
/// bracket is narrower than [`NOISE_MULTIPLIER_TOLERANCE`] (relative) and
/// returns its upper end, so the result always meets the target:
/// `epsilon(result) <= target_epsilon`, and `result * (1 - NOISE_MULTIPLIER_TOLERANCE)`
/// does not. Noise multipliers are searched in
/// [[`MIN_NOISE_MULTIPLIER`], [`MAX_NOISE_MULTIPLIER`]]: if even the largest
/// misses the target the error is [`PrivacyError::Unreachable`], and if even
/// the smallest meets it, the smallest is returned.
pub fn noise_multiplier_for(
    target_epsilon: f64,
    q: f64,
    rounds: u64,
    delta: f64,
) -> Result<f64, PrivacyError> {
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return Err(PrivacyError::TargetEpsilon {
            value: target_epsilon,
        });
    }
    check_plan(q, rounds, delta)?;
    let meets = |sigma: f64| plan_epsilon(sigma, q, rounds, delta).epsilon <= target_epsilon;
    // Invariant after bracketing: meets(hi) and !meets(lo).
    let (mut lo, mut hi);
    if meets(1.0) {
        hi = 1.0;
        lo = 0.5;
        while meets(lo) {
            hi = lo;
            if hi <= MIN_NOISE_MULTIPLIER {
                return Ok(hi);
            }
            lo = (lo * 0.5).max(MIN_NOISE_MULTIPLIER);
        }
    } else {
        lo = 1.0;
        hi = 2.0;
        while !meets(hi) {
            lo = hi;
            if lo >= MAX_NOISE_MULTIPLIER {
                return Err(PrivacyError::Unreachable {
                    target_epsilon,
                    max_noise_multiplier: MAX_NOISE_MULTIPLIER,
                    epsilon: plan_epsilon(MAX_NOISE_MULTIPLIER, q, rounds, delta).epsilon,
                });
            }
            hi = (hi * 2.0).min(MAX_NOISE_MULTIPLIER);
        }
    }
    while hi - lo > NOISE_MULTIPLIER_TOLERANCE * hi {
        let mid = 0.5 * (lo + hi);
        if meets(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

/// One round as the ledger charges it: each user was included with
/// probability `sampling_rate`, and the aggregate carried Gaussian noise of
/// `noise_multiplier` times the clipping norm. When fewer noise shares
/// arrived than planned, pass the effective (smaller) noise multiplier; 0
/// means no noise at all (infinite cost unless `sampling_rate` is 0).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampledGaussianRound {
    /// In [0, 1].
    pub sampling_rate: f64,
    /// Non-negative and finite.
    pub noise_multiplier: f64,
}

impl SampledGaussianRound {
    pub fn validate(&self) -> Result<(), PrivacyError> {
        check_sampling_rate(self.sampling_rate, true)?;
        check_noise_multiplier(self.noise_multiplier, true)
    }

    /// The RDP this round costs at each of `orders`.
    pub fn rdp(&self, orders: &[f64]) -> Result<Vec<f64>, PrivacyError> {
        rdp_curve(self.sampling_rate, self.noise_multiplier, orders)
    }
}

/// A job's privacy budget: epsilon may not exceed `epsilon` at `delta`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyBudget {
    /// Non-negative and finite.
    pub epsilon: f64,
    /// In (0, 1).
    pub delta: f64,
}

impl PrivacyBudget {
    pub fn validate(&self) -> Result<(), PrivacyError> {
        if !(self.epsilon >= 0.0 && self.epsilon.is_finite()) {
            return Err(PrivacyError::BudgetEpsilon {
                value: self.epsilon,
            });
        }
        check_delta(self.delta)
    }
}

/// What charging a round would do, from [`PrivacyLedger::check`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetCheck {
    /// Epsilon (at the budget's delta) if the round were charged.
    pub epsilon_after: EpsilonReport,
    /// `epsilon_after.epsilon <= budget.epsilon`.
    pub within_budget: bool,
}

/// The RDP a job has spent so far, per order, composed over the rounds it
/// has been charged (RDP adds up under composition, and rounds may differ
/// in sampling rate and noise).
///
/// Spent RDP only grows: every charge adds a non-negative amount at every
/// order. Serialises as `{"orders": [...], "spent_rdp": [...], "rounds": n}`
/// where an infinite spent RDP (a round without noise was charged) is
/// written as `null`; deserialising checks the same invariants as
/// construction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LedgerRecord", into = "LedgerRecord")]
pub struct PrivacyLedger {
    orders: Vec<f64>,
    spent: Vec<f64>,
    rounds: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerRecord {
    orders: Vec<f64>,
    /// `None` is +infinity, which JSON cannot write as a number.
    spent_rdp: Vec<Option<f64>>,
    rounds: u64,
}

impl TryFrom<LedgerRecord> for PrivacyLedger {
    type Error = PrivacyError;

    fn try_from(record: LedgerRecord) -> Result<Self, Self::Error> {
        let spent: Vec<f64> = record
            .spent_rdp
            .iter()
            .map(|v| v.unwrap_or(f64::INFINITY))
            .collect();
        check_orders(&record.orders)?;
        check_rdp_values(&record.orders, &spent)?;
        Ok(PrivacyLedger {
            orders: record.orders,
            spent,
            rounds: record.rounds,
        })
    }
}

impl From<PrivacyLedger> for LedgerRecord {
    fn from(ledger: PrivacyLedger) -> Self {
        LedgerRecord {
            spent_rdp: ledger
                .spent
                .iter()
                .map(|&v| v.is_finite().then_some(v))
                .collect(),
            orders: ledger.orders,
            rounds: ledger.rounds,
        }
    }
}

impl Default for PrivacyLedger {
    /// An empty ledger over [`DEFAULT_ORDERS`].
    fn default() -> Self {
        PrivacyLedger {
            orders: DEFAULT_ORDERS.to_vec(),
            spent: vec![0.0; DEFAULT_ORDER_COUNT],
            rounds: 0,
        }
    }
}

impl PrivacyLedger {
    /// An empty ledger over the given orders (each finite, above 1 and at
    /// most [`MAX_ORDER`]).
    pub fn new(orders: Vec<f64>) -> Result<PrivacyLedger, PrivacyError> {
        check_orders(&orders)?;
        let spent = vec![0.0; orders.len()];
        Ok(PrivacyLedger {
            orders,
            spent,
            rounds: 0,
        })
    }

    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// Spent RDP at each of [`Self::orders`] (may hold +infinity).
    pub fn spent_rdp(&self) -> &[f64] {
        &self.spent
    }

    /// Number of rounds charged so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// Epsilon spent so far, at `delta` (0 for an empty ledger).
    pub fn epsilon(&self, delta: f64) -> Result<EpsilonReport, PrivacyError> {
        check_delta(delta)?;
        Ok(convert(&self.orders, self.spent.iter().copied(), delta))
    }

    /// Epsilon at `delta` if `round` were charged now; changes nothing.
    pub fn epsilon_after(
        &self,
        round: &SampledGaussianRound,
        delta: f64,
    ) -> Result<EpsilonReport, PrivacyError> {
        check_delta(delta)?;
        let cost = round.rdp(&self.orders)?;
        let after = self.spent.iter().zip(&cost).map(|(s, c)| s + c);
        Ok(convert(&self.orders, after, delta))
    }

    /// Whether charging `round` would keep epsilon within `budget`; changes
    /// nothing.
    pub fn check(
        &self,
        round: &SampledGaussianRound,
        budget: &PrivacyBudget,
    ) -> Result<BudgetCheck, PrivacyError> {
        budget.validate()?;
        let epsilon_after = self.epsilon_after(round, budget.delta)?;
        Ok(BudgetCheck {
            epsilon_after,
            within_budget: epsilon_after.epsilon <= budget.epsilon,
        })
    }

    /// Charges `round` if that keeps epsilon within `budget` and returns the
    /// new epsilon; otherwise returns [`PrivacyError::BudgetExceeded`] and
    /// leaves the ledger as it was.
    pub fn try_charge(
        &mut self,
        round: &SampledGaussianRound,
        budget: &PrivacyBudget,
    ) -> Result<EpsilonReport, PrivacyError> {
        let check = self.check(round, budget)?;
        if !check.within_budget {
            return Err(PrivacyError::BudgetExceeded {
                epsilon_after: check.epsilon_after.epsilon,
                budget_epsilon: budget.epsilon,
                delta: budget.delta,
            });
        }
        self.charge(round)?;
        Ok(check.epsilon_after)
    }

    /// Charges `round` unconditionally (it has happened, whatever the budget
    /// says). Fails only on an invalid round, leaving the ledger unchanged.
    pub fn charge(&mut self, round: &SampledGaussianRound) -> Result<(), PrivacyError> {
        let cost = round.rdp(&self.orders)?;
        for (spent, c) in self.spent.iter_mut().zip(cost) {
            *spent += c;
        }
        self.rounds = self.rounds.saturating_add(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
