//! Rényi divergence of the Poisson-subsampled Gaussian mechanism, and the
//! special functions it needs (log-space sums, `log erfc`), all in `f64`.
//!
//! Notation follows Mironov, Talwar and Zhang 2019, "Rényi Differential
//! Privacy of the Sampled Gaussian Mechanism" (arXiv:1908.10530): with
//! `mu0 = N(0, sigma^2)`, `mu1 = N(1, sigma^2)` and `mu = (1 - q) mu0 + q mu1`,
//! the mechanism is (alpha, log(A_alpha) / (alpha - 1))-RDP, where
//!
//! ```text
//! A_alpha = E_{z ~ mu0} [ (mu(z) / mu0(z))^alpha ]
//!         = E_{z ~ mu0} [ ((1 - q) + q exp((2z - 1) / (2 sigma^2)))^alpha ]
//! ```
//!
//! By Jensen's inequality `A_alpha >= 1`, which the truncation rules below use.

use std::f64::consts::{LN_2, PI};

/// Largest number of series terms summed for a fractional order before the
/// order is given up as "no finite bound known" (+infinity, which is always
/// a safe answer: the conversion to (epsilon, delta) then ignores the order).
pub(crate) const MAX_FRACTIONAL_TERMS: usize = 200_000;

/// A fractional-order series stops once both of its newest terms are below
/// `exp(TRUNCATION_LOG)` (relative to `A_alpha >= 1`) and below
/// `exp(-TRUNCATION_RELATIVE)` times the partial sum's `A_alpha - 1`, which
/// is what the RDP, `log(A_alpha) / (alpha - 1)`, is made of when small; but
/// terms below `exp(TRUNCATION_FLOOR)` always stop it.
const TRUNCATION_LOG: f64 = -30.0;
const TRUNCATION_RELATIVE: f64 = 25.0;
const TRUNCATION_FLOOR: f64 = -36.0;

/// RDP of one application of the Poisson-subsampled Gaussian mechanism at
/// `order`. Inputs are assumed validated: `q` in [0, 1], `sigma >= 0` and
/// finite, `order > 1` and finite. Returns a value `>= 0`, possibly +infinity.
pub(crate) fn rdp(q: f64, sigma: f64, order: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return order / (2.0 * sigma * sigma);
    }
    let log_a = if order.fract() == 0.0 {
        log_a_integer(q, sigma, order)
    } else {
        log_a_fractional(q, sigma, order)
    };
    if log_a.is_nan() {
        // Only for absurd inputs (sigma^2 overflowing): no bound known.
        return f64::INFINITY;
    }
    // log A >= 0 in exact arithmetic; rounding up to 0 is the safe side.
    (log_a / (order - 1.0)).max(0.0)
}

/// `log A_alpha` for integer `alpha`: the binomial expansion of
/// `((1 - q) + q X)^alpha` integrates term by term, with
/// `E_{mu0}[exp(k (2z - 1) / (2 sigma^2))] = exp((k^2 - k) / (2 sigma^2))`:
///
/// ```text
/// A_alpha = sum_{k=0}^{alpha} C(alpha, k) q^k (1 - q)^(alpha - k) exp((k^2 - k) / (2 sigma^2))
/// ```
///
/// The binomial weights sum to 1 and the exponent vanishes for k = 0 and 1,
/// so `A_alpha - 1 = sum_{k>=2} C(alpha, k) q^k (1 - q)^(alpha - k) expm1((k^2 - k) / (2 sigma^2))`.
/// Summing that (every term positive, in log space) and taking `log1p`
/// keeps full relative precision even when `A_alpha - 1` is tiny (small
/// `q`, large `sigma`), where `log` of a sum near 1 would lose it.
fn log_a_integer(q: f64, sigma: f64, alpha: f64) -> f64 {
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let two_var = 2.0 * sigma * sigma;
    let n = alpha as u64;
    // log C(n, 1)
    let mut log_binom = alpha.ln();
    let mut excess = LogSum::ZERO;
    for k in 2..=n {
        let kf = k as f64;
        // C(n, k) = C(n, k - 1) * (n - k + 1) / k
        log_binom += (alpha - kf + 1.0).ln() - kf.ln();
        let exponent = (kf * kf - kf) / two_var;
        let term = log_binom + kf * log_q + (alpha - kf) * log_1mq + log_expm1(exponent);
        excess = excess.add(term, false);
    }
    log_1p_exp(excess.log_value())
}

/// `log(exp(x) - 1)` for `x > 0`.
fn log_expm1(x: f64) -> f64 {
    if x > 40.0 {
        x + (-(-x).exp()).ln_1p()
    } else {
        x.exp_m1().ln()
    }
}

/// `log(1 + exp(x))`.
fn log_1p_exp(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// `log A_alpha` for fractional `alpha` (Mironov et al. 2019, Sec. 3.3).
///
/// Split the integral at `z0 = sigma^2 log(1/q - 1) + 1/2`, where the two
/// summands `(1 - q)` and `q exp((2z - 1) / (2 sigma^2))` are equal. Below
/// `z0` expand the power in the second summand, above it in the first; both
/// generalised binomial series converge absolutely there and integrate term
/// by term against the Gaussian:
///
/// ```text
/// A_alpha = sum_{i>=0} C(alpha, i) [ q^i (1-q)^(alpha-i) exp((i^2-i)/(2 sigma^2)) erfc((i-z0)/(sqrt(2) sigma)) / 2
///                                  + q^j (1-q)^i        exp((j^2-j)/(2 sigma^2)) erfc((z0-j)/(sqrt(2) sigma)) / 2 ],
///   j = alpha - i
/// ```
///
/// `C(alpha, i)` changes sign at every step once `i > alpha`, so each of the
/// two series is alternating from there on, with terms that shrink in
/// magnitude. The sum keeps the signs (it is the exact value, not a bound),
/// stops when both newest terms are small (below `exp(-30)` and below
/// `exp(-25) (A_alpha - 1)`, or below `exp(-36)`) and still shrinking, and
/// then adds their magnitudes: the tail of an alternating series with
/// shrinking terms is smaller than its last term, so the result is an upper
/// bound on `A_alpha` that is at most about `2 exp(-25) (A_alpha - 1)` too
/// large (or `2 exp(-36)` where the floor applies), i.e. the RDP is at most
/// about 3e-11 relative or 5e-16 / (alpha - 1) absolute too large. If the
/// series has not converged after `MAX_FRACTIONAL_TERMS` terms, returns
/// +infinity.
fn log_a_fractional(q: f64, sigma: f64, alpha: f64) -> f64 {
    let log_q = q.ln();
    let log_1mq = (-q).ln_1p();
    let two_var = 2.0 * sigma * sigma;
    let z0 = sigma * sigma * (log_1mq - log_q) + 0.5;
    let scale = std::f64::consts::SQRT_2 * sigma;
    let mut a0 = LogSum::ZERO;
    let mut a1 = LogSum::ZERO;
    // log |C(alpha, i)| and the sign of C(alpha, i).
    let mut log_binom = 0.0_f64;
    let mut negative = false;
    let mut previous = (f64::INFINITY, f64::INFINITY);
    for i in 0..MAX_FRACTIONAL_TERMS {
        let fi = i as f64;
        if i > 0 {
            // C(alpha, i) = C(alpha, i - 1) * (alpha - i + 1) / i
            let factor = alpha - fi + 1.0;
            log_binom += factor.abs().ln() - fi.ln();
            negative ^= factor < 0.0;
        }
        let j = alpha - fi;
        let log_s0 = log_binom
            + fi * log_q
            + j * log_1mq
            + (fi * fi - fi) / two_var
            + log_erfc((fi - z0) / scale)
            - LN_2;
        let log_s1 = log_binom
            + j * log_q
            + fi * log_1mq
            + (j * j - j) / two_var
            + log_erfc((z0 - j) / scale)
            - LN_2;
        a0 = a0.add(log_s0, negative);
        a1 = a1.add(log_s1, negative);
        let shrinking = log_s0 <= previous.0 && log_s1 <= previous.1;
        let newest = log_s0.max(log_s1);
        if fi > alpha + 1.0 && shrinking && newest < TRUNCATION_LOG && {
            // log(A - 1) of the partial sum (-inf or NaN if not above 1 yet).
            let log_excess = a0.add_signed(a1).add(0.0, true);
            let excess_ok =
                !log_excess.negative && newest < log_excess.log_abs - TRUNCATION_RELATIVE;
            excess_ok || newest < TRUNCATION_FLOOR
        } {
            // Bound the alternating tails by the last terms' magnitudes.
            let total = a0.add_signed(a1).add(log_s0, false).add(log_s1, false);
            return if total.negative {
                // Impossible in exact arithmetic (A >= 1): give no bound.
                f64::INFINITY
            } else {
                total.log_abs
            };
        }
        previous = (log_s0, log_s1);
    }
    f64::INFINITY
}

/// A signed real number kept as `(log |x|, sign)`, for sums whose terms span
/// hundreds of orders of magnitude. Zero is `log_abs = -inf`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogSum {
    log_abs: f64,
    negative: bool,
}

impl LogSum {
    pub(crate) const ZERO: LogSum = LogSum {
        log_abs: f64::NEG_INFINITY,
        negative: false,
    };

    /// Adds `(-1)^negative * exp(log_abs)`.
    pub(crate) fn add(self, log_abs: f64, negative: bool) -> LogSum {
        self.add_signed(LogSum { log_abs, negative })
    }

    pub(crate) fn add_signed(self, other: LogSum) -> LogSum {
        if other.log_abs == f64::NEG_INFINITY {
            return self;
        }
        if self.log_abs == f64::NEG_INFINITY {
            return other;
        }
        let (hi, lo) = if self.log_abs >= other.log_abs {
            (self, other)
        } else {
            (other, self)
        };
        if hi.log_abs == f64::INFINITY {
            // +inf - inf has no meaning here; +inf + anything finite is +inf.
            return if lo.log_abs == f64::INFINITY && lo.negative != hi.negative {
                LogSum {
                    log_abs: f64::NAN,
                    negative: false,
                }
            } else {
                hi
            };
        }
        let d = lo.log_abs - hi.log_abs; // <= 0
        let log_abs = if hi.negative == lo.negative {
            hi.log_abs + d.exp().ln_1p()
        } else if d == 0.0 {
            return LogSum::ZERO;
        } else {
            hi.log_abs + (-d.exp_m1()).ln()
        };
        LogSum {
            log_abs,
            negative: hi.negative,
        }
    }

    /// `log x` for a sum of positive terms (or -inf when empty).
    pub(crate) fn log_value(self) -> f64 {
        if self.negative {
            f64::NAN
        } else {
            self.log_abs
        }
    }
}

/// Below this argument `erfc` is `1 - erf` from the power series, above it
/// the continued fraction; both are accurate to a few units in 1e-14 at the
/// switch (`erfc(2) = 4.7e-3`).
const ERFC_SERIES_LIMIT: f64 = 2.0;

/// `log(erfc(x))` for every real `x`, without underflow for large `x`.
pub(crate) fn log_erfc(x: f64) -> f64 {
    if x.is_nan() {
        f64::NAN
    } else if x == f64::INFINITY {
        f64::NEG_INFINITY
    } else if x < 0.0 {
        // erfc(x) = 2 - erfc(-x)
        LN_2 + (-0.5 * erfc_nonnegative(-x)).ln_1p()
    } else if x < ERFC_SERIES_LIMIT {
        (-erf_series(x)).ln_1p()
    } else {
        log_erfc_continued_fraction(x)
    }
}

/// `erfc(x)` for `x >= 0`.
pub(crate) fn erfc_nonnegative(x: f64) -> f64 {
    if x < ERFC_SERIES_LIMIT {
        1.0 - erf_series(x)
    } else {
        log_erfc(x).exp()
    }
}

/// `erf(x)` for `0 <= x < ~3` from the series with positive terms
/// `erf(x) = 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (1 3 5 ... (2n+1))`,
/// which has no cancellation.
fn erf_series(x: f64) -> f64 {
    let two_x2 = 2.0 * x * x;
    let mut term = x;
    let mut sum = x;
    let mut n = 0.0_f64;
    while term > sum * 1e-17 {
        n += 1.0;
        term *= two_x2 / (2.0 * n + 1.0);
        sum += term;
    }
    2.0 / PI.sqrt() * (-x * x).exp() * sum
}

/// `log(erfc(x))` for `x >= ERFC_SERIES_LIMIT` from the continued fraction
/// `erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + (2/2)/(x + (3/2)/(x + ...))))`,
/// evaluated with the modified Lentz method.
fn log_erfc_continued_fraction(x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut f = x;
    let mut c = x;
    let mut d = 0.0_f64;
    for n in 1..10_000 {
        let a = n as f64 * 0.5;
        d = x + a * d;
        if d.abs() < TINY {
            d = TINY;
        }
        d = 1.0 / d;
        c = x + a / c;
        if c.abs() < TINY {
            c = TINY;
        }
        let delta = c * d;
        f *= delta;
        if (delta - 1.0).abs() < 1e-16 {
            break;
        }
    }
    -x * x - 0.5 * PI.ln() - f.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// log(erfc(x)) from mpmath at 50 digits.
    const LOG_ERFC: &[(f64, f64)] = &[
        (-30.0, LN_2),
        (-3.0, 0.6931361352504468),
        (-1.0, 0.6112323176780705),
        (-0.1, 0.10657640058652249),
        (0.0, 0.0),
        (0.1, -0.11930497373739561),
        (0.5, -0.7350111298370844),
        (1.0, -1.8496055099332482),
        (1.5, -3.3844920895515527),
        (1.9, -4.932345862780269),
        (2.0, -5.364941264616638),
        (2.1, -5.816010968867555),
        (2.5, -7.806815272727264),
        (3.0, -10.720363041981113),
        (4.0, -17.987778312103007),
        (5.0, -27.200889545537436),
        (10.0, -102.87988902484489),
        (30.0, -903.9741171106439),
        (1000.0, -1000007.4801207219),
    ];

    #[test]
    fn log_erfc_matches_mpmath() {
        for &(x, want) in LOG_ERFC {
            let got = log_erfc(x);
            let err = (got - want).abs() / want.abs().max(1e-300);
            assert!(
                err < 1e-12 || (got - want).abs() < 1e-15,
                "x={x}: got {got}, want {want}"
            );
        }
        assert_eq!(log_erfc(f64::INFINITY), f64::NEG_INFINITY);
        assert_eq!(log_erfc(f64::NEG_INFINITY), LN_2);
    }

    #[test]
    fn log_sum_cancels() {
        let s = LogSum::ZERO
            .add(0.0, false)
            .add(-1.0, true)
            .add(-1.0, false);
        assert!((s.log_value() - 0.0).abs() < 1e-15);
        let s = LogSum::ZERO.add(1.0, false).add(1.0, true);
        assert_eq!(s.log_abs, f64::NEG_INFINITY);
    }
}
