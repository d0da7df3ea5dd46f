//! Compares the privacy accountant with reference values from Google's
//! `dp_accounting` and from high-precision evaluation of the RDP's
//! definition, stored in `data/privacy_golden.json` (written by
//! `data/generate_privacy_golden.py`, which says how and with which versions).
//!
//! What is checked, per grid point:
//! - per-round RDP at a few orders against the exact value (mpmath): equal to
//!   1e-6 relative or 1e-9 absolute, and never below it by more than 1e-9
//!   relative (plus 1e-15 absolute for rounding);
//! - at integer orders, equal to `dp_accounting`'s RDP to the same
//!   tolerance; at fractional orders never above it (`dp_accounting` 0.6 sums
//!   the magnitudes of the alternating series' terms, an upper bound, and
//!   gives up on orders whose series has not converged in 1000 terms);
//! - epsilon against `dp_accounting`'s conversion of the exact RDP over the
//!   same orders: equal to 1e-6 relative, never below it by more than 1e-9
//!   relative, and at the same optimal order;
//! - epsilon never above `dp_accounting`'s `RdpAccountant`, and equal to it
//!   (1e-6 relative, same order) wherever the accountant's answer is not
//!   distorted by its fractional-order bound (it equals the exact one).

use std::collections::BTreeMap;

use cohort_core::privacy::{epsilon, noise_multiplier_for, rdp_sampled_gaussian, DEFAULT_ORDERS};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    versions: BTreeMap<String, String>,
    orders: Vec<f64>,
    rdp: Vec<RdpCase>,
    epsilon: Vec<EpsilonCase>,
}

#[derive(Deserialize)]
struct RdpCase {
    sigma: f64,
    q: f64,
    orders: Vec<f64>,
    /// `None` is +infinity.
    dp_accounting: Vec<Option<f64>>,
    exact: Vec<Option<f64>>,
}

#[derive(Deserialize)]
struct EpsilonCase {
    sigma: f64,
    q: f64,
    rounds: u64,
    delta: f64,
    dp_accounting: Epsilon,
    exact: Epsilon,
}

#[derive(Deserialize)]
struct Epsilon {
    epsilon: Option<f64>,
    order: f64,
}

fn golden() -> Golden {
    serde_json::from_str(include_str!("data/privacy_golden.json")).expect("golden JSON parses")
}

fn inf(x: Option<f64>) -> f64 {
    x.unwrap_or(f64::INFINITY)
}

/// `|got - want|` relative to `want` (0 when both are equal, including
/// infinite).
fn rel_err(got: f64, want: f64) -> f64 {
    if got == want {
        0.0
    } else {
        (got - want).abs() / want.abs()
    }
}

fn close(got: f64, want: f64, rel: f64, abs: f64) -> bool {
    got == want || (got - want).abs() <= abs || rel_err(got, want) <= rel
}

#[test]
fn golden_file_uses_the_default_orders() {
    let g = golden();
    assert_eq!(g.orders, DEFAULT_ORDERS);
    assert!(g.versions.contains_key("dp-accounting"));
    assert_eq!(g.rdp.len(), 20);
    assert_eq!(g.epsilon.len(), 120);
}

#[test]
fn rdp_matches_the_references() {
    let g = golden();
    let mut max_exact = 0.0_f64;
    let mut max_dp_accounting_integer = 0.0_f64;
    let mut fractional_looser = 0;
    for case in &g.rdp {
        for (i, &order) in case.orders.iter().enumerate() {
            let at = format!("sigma={} q={} order={order}", case.sigma, case.q);
            let ours = rdp_sampled_gaussian(case.q, case.sigma, order).unwrap();
            let exact = inf(case.exact[i]);
            let reference = inf(case.dp_accounting[i]);
            assert!(
                close(ours, exact, 1e-6, 1e-9),
                "{at}: ours {ours}, exact {exact}"
            );
            assert!(
                ours >= exact * (1.0 - 1e-9) - 1e-15,
                "{at}: ours {ours} under the exact {exact}"
            );
            if exact > 1e-9 {
                max_exact = max_exact.max(rel_err(ours, exact));
            }
            if order.fract() == 0.0 {
                assert!(
                    close(ours, reference, 1e-6, 1e-9),
                    "{at}: ours {ours}, dp_accounting {reference}"
                );
                if reference > 1e-9 {
                    max_dp_accounting_integer =
                        max_dp_accounting_integer.max(rel_err(ours, reference));
                }
            } else {
                assert!(
                    ours <= reference * (1.0 + 1e-9) + 1e-15,
                    "{at}: ours {ours} above dp_accounting's bound {reference}"
                );
                if rel_err(ours, reference) > 1e-6 {
                    fractional_looser += 1;
                }
            }
        }
    }
    println!(
        "RDP: max relative error vs exact {max_exact:.3e}, vs dp_accounting at integer orders \
         {max_dp_accounting_integer:.3e}; dp_accounting looser at {fractional_looser} fractional points"
    );
}

#[test]
fn epsilon_matches_the_references() {
    let g = golden();
    let mut max_exact = 0.0_f64;
    let mut max_dp_accounting = 0.0_f64;
    let mut distorted = 0;
    for case in &g.epsilon {
        let at = format!(
            "sigma={} q={} T={} delta={}",
            case.sigma, case.q, case.rounds, case.delta
        );
        let ours = epsilon(case.sigma, case.q, case.rounds, case.delta).unwrap();
        let exact = inf(case.exact.epsilon);
        let reference = inf(case.dp_accounting.epsilon);
        assert!(
            close(ours.epsilon, exact, 1e-6, 0.0),
            "{at}: ours {ours:?}, exact {exact}"
        );
        assert!(
            ours.epsilon >= exact * (1.0 - 1e-9),
            "{at}: ours {ours:?} under the exact {exact}"
        );
        assert_eq!(ours.order, case.exact.order, "{at}: optimal order");
        max_exact = max_exact.max(rel_err(ours.epsilon, exact));
        assert!(
            ours.epsilon <= reference * (1.0 + 1e-9),
            "{at}: ours {ours:?} above dp_accounting's {reference}"
        );
        if rel_err(reference, exact) <= 1e-9 {
            assert!(
                close(ours.epsilon, reference, 1e-6, 0.0),
                "{at}: ours {ours:?}, dp_accounting {reference}"
            );
            assert_eq!(ours.order, case.dp_accounting.order, "{at}: optimal order");
            max_dp_accounting = max_dp_accounting.max(rel_err(ours.epsilon, reference));
        } else {
            distorted += 1;
        }
    }
    println!(
        "epsilon: max relative error vs exact {max_exact:.3e}, vs dp_accounting where it is exact \
         {max_dp_accounting:.3e}; dp_accounting looser in {distorted} of {} cases",
        g.epsilon.len()
    );
}

/// Inverting the golden epsilons gives back the noise multipliers (on a
/// subset of the grid, to keep the test short).
#[test]
fn noise_multiplier_for_inverts_golden_epsilons() {
    let g = golden();
    for case in g
        .epsilon
        .iter()
        .filter(|c| c.rounds == 100 && c.delta == 1e-5)
    {
        let target = inf(case.exact.epsilon);
        if !(target > 0.0 && target.is_finite()) {
            continue;
        }
        let sigma = noise_multiplier_for(target, case.q, case.rounds, case.delta).unwrap();
        assert!(
            rel_err(sigma, case.sigma) <= 1e-5,
            "sigma={} q={}: target {target} gave sigma {sigma}",
            case.sigma,
            case.q
        );
    }
}
