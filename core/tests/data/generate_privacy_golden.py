#!/usr/bin/env python3
"""Writes privacy_golden.json, the reference values for core/tests/privacy_golden.rs.

Last run with dp-accounting 0.6.0, mpmath 1.4.1, numpy 2.4.6, scipy 1.17.1 and
Python 3.11.7:

    python3 -m venv /tmp/dpacc && /tmp/dpacc/bin/pip install dp-accounting==0.6.0
    /tmp/dpacc/bin/python core/tests/data/generate_privacy_golden.py > core/tests/data/privacy_golden.json

Two references, for the Poisson-subsampled Gaussian mechanism over a grid of
noise multipliers (sigma), sampling rates (q), rounds (T) and deltas:

- "dp_accounting": Google's dp_accounting RdpAccountant, with
  PoissonSampledDpEvent(q, GaussianDpEvent(sigma)) composed T times:
  get_epsilon_and_optimal_order(delta) over its DEFAULT_RDP_ORDERS, and the
  per-round RDP (the accountant's .rdp after composing one round) at a few
  orders. dp_accounting 0.6's fractional-order series adds the magnitudes of
  its terms (an upper bound on the exact value), and gives an order up
  (infinite RDP, written null) when that sum has not converged after 1000
  terms, so at fractional orders it can be far above the exact RDP.

- "exact": the RDP from its definition, log(A) / (alpha - 1) with
  A = E_{z ~ N(0, sigma^2)}[((1 - q) + q exp((2z - 1) / (2 sigma^2)))^alpha],
  evaluated in mpmath at 30 digits: the binomial sum for integer alpha,
  numerical integration (tanh-sinh) for fractional alpha. Epsilon is
  dp_accounting's own compute_epsilon (the Canonne-Kamath-Steinke 2020
  conversion) applied to T times these per-order values over
  DEFAULT_RDP_ORDERS, so it shares the conversion and the orders with the
  accountant and differs only in the fractional-order RDP.

Infinite values are written as null. Takes about ten minutes on two cores.
"""

import importlib.metadata
import json
import math
import multiprocessing
import platform
import sys

import mpmath
from mpmath import mp
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

mp.dps = 30

SIGMAS = [0.5, 0.8, 1.0, 1.5, 4.0]
SAMPLING_RATES = [0.001, 0.01, 0.1, 1.0]
ROUNDS = [1, 100, 10000]
DELTAS = [1e-5, 1e-6]
CHECK_ORDERS = [1.5, 2.0, 8.0, 32.0, 256.0]
ORDERS = [float(a) for a in rdp.DEFAULT_RDP_ORDERS]


def log_a_binomial(q, sigma, alpha):
    """log A for integer alpha: sum_k C(alpha,k) q^k (1-q)^(alpha-k) exp((k^2-k)/(2 sigma^2))."""
    q, sigma = mp.mpf(q), mp.mpf(sigma)
    n = int(alpha)
    total = mp.fsum(
        mp.binomial(n, k) * q**k * (1 - q) ** (n - k) * mp.exp((k * k - k) / (2 * sigma**2))
        for k in range(n + 1)
    )
    return mp.log(total)


def log_a_integral(q, sigma, alpha):
    """log A by numerical integration of its definition."""
    q, sigma, alpha = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)

    def integrand(z):
        ratio = (1 - q) + q * mp.exp((2 * z - 1) / (2 * sigma**2))
        return mp.npdf(z, 0, sigma) * ratio**alpha

    # The mass sits near 0 (the N(0, sigma^2) part) and near alpha (the part
    # tilted by exp(alpha z / sigma^2)); split there for accuracy.
    z0 = sigma**2 * mp.log(1 / q - 1) + mp.mpf(1) / 2
    points = {mp.mpf(0), alpha, z0}
    for centre in (mp.mpf(0), alpha):
        for k in (-8, -4, 4, 8):
            points.add(centre + k * sigma)
    points = sorted(p for p in points if -60 * sigma - alpha < p < 60 * sigma + alpha)
    return mp.log(mp.quad(integrand, [-mp.inf] + points + [mp.inf]))


def exact_rdp(q, sigma, alpha):
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if float(alpha).is_integer():
        log_a = log_a_binomial(q, sigma, alpha)
    else:
        log_a = log_a_integral(q, sigma, alpha)
    return float(log_a / (mp.mpf(alpha) - 1))


def self_check():
    """The integral agrees with the binomial sum at integer orders."""
    for sigma in (0.5, 1.0, 4.0):
        for q in (0.001, 0.1):
            for alpha in (2, 7):
                a = log_a_binomial(q, sigma, alpha)
                b = log_a_integral(q, sigma, alpha)
                assert abs(a - b) <= mp.mpf(10) ** -25 * abs(a), (sigma, q, alpha, a, b)


def finite_or_none(x):
    x = float(x)
    return x if math.isfinite(x) else None


def accountant(q, sigma, count, orders=None):
    acc = rdp.RdpAccountant(orders=orders)
    acc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), count)
    return acc


def main():
    self_check()
    pool = multiprocessing.Pool(2)
    rdp_cases = []
    epsilon_cases = []
    for sigma in SIGMAS:
        for q in SAMPLING_RATES:
            print(f"sigma={sigma} q={q}", file=sys.stderr)
            exact_all = pool.starmap(exact_rdp, [(q, sigma, a) for a in ORDERS])
            reference = accountant(q, sigma, 1, orders=CHECK_ORDERS).rdp
            rdp_cases.append(
                {
                    "sigma": sigma,
                    "q": q,
                    "orders": CHECK_ORDERS,
                    "dp_accounting": [finite_or_none(r) for r in reference],
                    "exact": [finite_or_none(exact_rdp(q, sigma, a)) for a in CHECK_ORDERS],
                }
            )
            for rounds in ROUNDS:
                acc = accountant(q, sigma, rounds)
                for delta in DELTAS:
                    eps, order = acc.get_epsilon_and_optimal_order(delta)
                    exact_eps, exact_order = rdp.compute_epsilon(
                        ORDERS, [rounds * r for r in exact_all], delta
                    )
                    epsilon_cases.append(
                        {
                            "sigma": sigma,
                            "q": q,
                            "rounds": rounds,
                            "delta": delta,
                            "dp_accounting": {
                                "epsilon": finite_or_none(eps),
                                "order": float(order),
                            },
                            "exact": {
                                "epsilon": finite_or_none(exact_eps),
                                "order": float(exact_order),
                            },
                        }
                    )
    versions = {
        name: importlib.metadata.version(name)
        for name in ("dp-accounting", "mpmath", "numpy", "scipy")
    }
    versions["python"] = platform.python_version()
    json.dump(
        {
            "generator": "core/tests/data/generate_privacy_golden.py",
            "versions": versions,
            "orders": ORDERS,
            "rdp": rdp_cases,
            "epsilon": epsilon_cases,
        },
        sys.stdout,
        indent=1,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
