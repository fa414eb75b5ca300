"""The operator's own privacy accountant: ε from (σ, q, steps), without torch.

The operator stops a run before any hospital exceeds ``spec.privacy.targetEpsilon``, and
it accounts ε itself rather than taking the server's figure: from the (σ, q, steps) the
server reports and from the σ and q the spec implies (:func:`planned_cost`), over the
steps the server reports (what that does and does not protect: ``status.py``). Its image has no
torch, so it cannot import Opacus (``opacus/__init__`` imports torch); this module is a
pure-Python (``math`` only) copy of the accountant Opacus 1.6 uses for ``accountant:
rdp``: Rényi DP of the Sampled Gaussian Mechanism (``opacus.accountants.analysis.rdp``)
over ``RDPAccountant.DEFAULT_ALPHAS``, converted to (ε, δ)-DP with the bound of Balle et
al. 2020, Theorem 21 (Opacus' ``get_privacy_spent``). It agrees with
``RDPAccountant.get_epsilon`` to about 1e-12 relative (the unit tests check 1e-9 over a
grid). For a run with ``accountant: prv`` the figure is the RDP bound of the same
history, which is typically somewhat larger (more conservative) than PRV's.

A *history* is Opacus' ``RDPAccountant.history``: ``[(σ, q, steps), ...]`` where σ is the
noise multiplier (noise standard deviation over the clipping norm), q the Poisson sample
rate of one step (Opacus: ``1 / len(loader)``) and steps the number of noisy gradient
steps taken with that (σ, q). RDP composes by addition, so the order of the entries does
not matter and ``(σ, q, n1) + (σ, q, n2)`` is ``(σ, q, n1 + n2)`` (:func:`collapse`).

The per-step RDP of each distinct (σ, q) is cached, so recomputing ε for a few hospitals
on every status read costs microseconds once each (σ, q) has been seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache

__all__ = [
    "DEFAULT_ALPHAS",
    "EPSILON_SLACK",
    "HistoryEntry",
    "PlannedCost",
    "collapse",
    "epsilon",
    "epsilon_after",
    "fits_budget",
    "noise_multiplier_for_run",
    "over_target",
    "planned_cost",
]

#: One accountant history entry: (noise multiplier σ, sample rate q, number of steps).
HistoryEntry = tuple[float, float, int]

#: The RDP orders Opacus' ``RDPAccountant`` searches by default (same floats, same order).
DEFAULT_ALPHAS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]
)

#: Relative slack when comparing ε with a target, the same the hospitals allow: one history
#: split into rounds can differ from the whole-run figure in the last floating-point digits.
EPSILON_SLACK = 1e-6

_NEG_INF = -math.inf
_LOG_2 = math.log(2)
_SQRT_2 = math.sqrt(2)
_SQRT_PI = math.sqrt(math.pi)
# Beyond this, erfc(x) underflows towards subnormals; use the asymptotic series of erfcx.
_ERFC_ASYMPTOTIC_FROM = 25.0


# --------------------------------------------------------------------- log-space arithmetic


def _log_add(logx: float, logy: float) -> float:
    a, b = min(logx, logy), max(logx, logy)
    if a == _NEG_INF:
        return b
    return math.log1p(math.exp(a - b)) + b


def _log_sub(logx: float, logy: float) -> float:
    if logx < logy:
        raise ValueError("The result of subtraction must be non-negative.")
    if logy == _NEG_INF:
        return logx
    if logx == logy:
        return _NEG_INF
    try:
        return math.log(math.expm1(logx - logy)) + logy
    except OverflowError:
        return logx


def _log_erfc(x: float) -> float:
    """log(erfc(x)) accurate for large x, where erfc itself underflows.

    Follows scipy's ``log_ndtr`` (which Opacus calls): ``log1p`` of the small complement
    for x <= 1/√2, otherwise log of erfc (or of its asymptotic form for large x).
    """
    if x <= 1 / _SQRT_2:
        return _LOG_2 + math.log1p(-math.erfc(-x) / 2)
    if x < _ERFC_ASYMPTOTIC_FROM:
        return math.log(math.erfc(x))
    # erfcx(x) = exp(x²) erfc(x) ~ 1/(x√π) · Σ (-1)^k (2k-1)!! / (2x²)^k; at x >= 25 the
    # terms fall below 1e-20 relative within ten terms, long before the series diverges.
    inv = 1.0 / (2 * x * x)
    term, total = 1.0, 1.0
    for k in range(1, 12):
        term *= -(2 * k - 1) * inv
        total += term
    return math.log(total / (x * _SQRT_PI)) - x * x


def _binom_frac(alpha: float, i: int, previous: float) -> float:
    """Generalised binomial coefficient C(alpha, i) for non-integer alpha.

    For i < 20 this is scipy's multiplication formula (bit for bit); beyond, the
    recurrence C(a, i) = C(a, i-1) · (a - i + 1) / i from the ``previous`` coefficient.
    """
    if i < 20:
        num, den = 1.0, 1.0
        for k in range(1, i + 1):
            num *= k + alpha - i
            den *= k
        return num / den
    return previous * (alpha - i + 1) / i


# --------------------------------------------------------------------- RDP of the SGM


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = _NEG_INF
    log_q, log_1q = math.log(q), math.log(1 - q)
    for i in range(alpha + 1):
        log_coef_i = math.log(math.comb(alpha, i)) + i * log_q + (alpha - i) * log_1q
        s = log_coef_i + (i * i - i) / (2 * (sigma**2))
        log_a = _log_add(log_a, s)
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    # The two parts of A_alpha, integrals over (-inf, z0] and [z0, +inf), in log space.
    log_a0, log_a1 = _NEG_INF, _NEG_INF
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1q = math.log(q), math.log(1 - q)
    coef = 1.0
    i = 0
    while True:
        coef = _binom_frac(alpha, i, coef)
        log_coef = math.log(abs(coef))
        j = alpha - i

        log_t0 = log_coef + i * log_q + j * log_1q
        log_t1 = log_coef + j * log_q + i * log_1q

        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))

        log_s0 = log_t0 + (i * i - i) / (2 * (sigma**2)) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * (sigma**2)) + log_e1

        if coef > 0:
            log_a0 = _log_add(log_a0, log_s0)
            log_a1 = _log_add(log_a1, log_s1)
        else:
            log_a0 = _log_sub(log_a0, log_s0)
            log_a1 = _log_sub(log_a1, log_s1)

        i += 1
        if max(log_s0, log_s1) < -30:
            break
    return _log_add(log_a0, log_a1)


def _rdp_one_step(q: float, sigma: float, alpha: float) -> float:
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if float(alpha).is_integer():
        return _log_a_int(q, sigma, int(alpha)) / (alpha - 1)
    return _log_a_frac(q, sigma, alpha) / (alpha - 1)


@lru_cache(maxsize=1024)
def _rdp_per_step(sigma: float, q: float) -> tuple[float, ...]:
    """RDP of one step of the SGM at every default order (cached per distinct (σ, q))."""
    return tuple(_rdp_one_step(q, sigma, alpha) for alpha in DEFAULT_ALPHAS)


# --------------------------------------------------------------------- public API


def _checked(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    entries: list[HistoryEntry] = []
    for entry in history:
        if len(entry) != 3:
            raise ValueError(f"a history entry is (σ, q, steps), got {tuple(entry)!r}")
        sigma, q, steps = float(entry[0]), float(entry[1]), entry[2]
        if not sigma >= 0 or math.isinf(sigma):
            raise ValueError(f"noise multiplier σ must be finite and >= 0, got {sigma}")
        if not 0 <= q <= 1:
            raise ValueError(f"sample rate q must be in [0, 1], got {q}")
        if steps != int(steps) or steps < 0:
            raise ValueError(f"steps must be a whole number >= 0, got {steps}")
        entries.append((sigma, q, int(steps)))
    return entries


def collapse(history: Iterable[Sequence[float]]) -> list[HistoryEntry]:
    """The same history with one entry per distinct (σ, q), steps summed, zero-step entries
    dropped, in order of first appearance.

    ε is unchanged (RDP composition adds per-step RDP, whatever the order), so this is the
    shortest faithful form to store or publish a hospital's spend in.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in _checked(history):
        if n > 0:
            steps[(sigma, q)] = steps.get((sigma, q), 0) + n
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def epsilon(history: Sequence[Sequence[float]], delta: float) -> float:
    """ε spent by an accountant history ``[(σ, q, steps), ...]`` at ``delta``.

    The same number as Opacus' ``RDPAccountant`` with ``.history = history`` and
    ``get_epsilon(delta)``. An empty history, or one whose entries took zero steps, has
    spent nothing: 0.0. (Opacus itself answers 0 for an empty history but a small positive
    ε for a zero-step entry; no noisy step released anything, so 0.0 is the true figure and
    the one the trainer reports.) σ = 0 means no noise: ε is ``math.inf``. Never below 0.

    Raises ``ValueError`` for δ outside (0, 1), σ < 0, q outside [0, 1] or negative or
    fractional steps.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    entries = [e for e in _checked(history) if e[2] > 0]
    if not entries:
        return 0.0
    per_step = [(_rdp_per_step(sigma, q), n) for sigma, q, n in entries]
    log_delta = math.log(delta)
    best = math.inf
    for k, alpha in enumerate(DEFAULT_ALPHAS):
        # Summed in history order, as Opacus does, so the last digits agree as well.
        rdp = 0.0
        for rdp_step, n in per_step:
            rdp += rdp_step[k] * n
        eps = rdp - (log_delta + math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha)
        if eps < best:  # strict: the first minimum wins, like numpy's argmin
            best = eps
    # The conversion can dip below 0 for a very noisy history at a large δ; (ε', δ)-DP with
    # ε' < 0 implies (0, δ)-DP, and a negative ε would read as a refund.
    return max(best, 0.0)


def epsilon_after(history: Sequence[Sequence[float]], extra_steps: int, delta: float) -> float:
    """ε if ``extra_steps`` more steps were taken with the last entry's (σ, q).

    This is the question before a round: "would the next round's steps overspend?". With
    ``extra_steps = 0`` or an empty history it is :func:`epsilon` of the history.
    """
    if extra_steps < 0:
        raise ValueError(f"extra_steps must be >= 0, got {extra_steps}")
    entries = _checked(history)
    if entries and extra_steps:
        sigma, q, _ = entries[-1]
        entries.append((sigma, q, extra_steps))
    return epsilon(entries, delta)


def fits_budget(
    history: Sequence[Sequence[float]],
    delta: float,
    target_epsilon: float,
    extra_steps: int = 0,
) -> bool:
    """Whether the history, plus ``extra_steps`` at its last (σ, q), stays within the target.

    The stop rule in one call: a hospital may take another round while
    ``fits_budget(history, delta, target, steps_per_round)`` holds; a run whose hospitals'
    histories no longer fit (``extra_steps=0``) has overspent. The comparison allows the
    hospitals' relative slack :data:`EPSILON_SLACK`, so the operator never stops a round
    that a hospital, computing the same figure with Opacus, accepts.
    """
    return not over_target(epsilon_after(history, extra_steps, delta), target_epsilon)


def over_target(eps: float, target_epsilon: float) -> bool:
    """Whether ``eps`` is over the budget ``target_epsilon``, beyond :data:`EPSILON_SLACK`.

    The one comparison every stop rule uses: the hospital before a round, the server before
    it asks for one, and the operator on what it observes. An ε that is not a number counts
    as over: a stop rule never lets a round through on a figure it cannot compare.
    """
    return not eps <= target_epsilon * (1.0 + EPSILON_SLACK)


# --------------------------------------------------------------------- calibration

#: What the spec implies for one hospital: (σ, q, steps per round).
PlannedCost = tuple[float, float, int]

# Opacus' ``get_noise_multiplier``: the search's tolerance and the σ it gives up at.
_CALIBRATION_TOLERANCE = 0.01
_MAX_SIGMA = 1e6


@lru_cache(maxsize=256)
def noise_multiplier_for_run(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int
) -> float:
    """The σ the hospitals calibrate for a whole run under RDP, as Opacus computes it.

    The same search as Opacus 1.6's ``get_noise_multiplier`` (double σ from 10 until the
    run fits, then bisect until ε is within 0.01 under the target; return the upper end)
    over this module's accountant, which agrees with Opacus' to about 1e-12 relative, so
    the operator arrives at the hospitals' σ without torch. Raises ValueError for a budget
    no σ meets.
    """
    if target_epsilon <= 0 or not 0 < delta < 1 or not 0 < sample_rate <= 1 or total_steps < 1:
        raise ValueError("need target_epsilon > 0, 0 < delta < 1, 0 < q <= 1, total_steps >= 1")
    eps_high = math.inf
    sigma_low, sigma_high = 0.0, 10.0
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        eps_high = epsilon([(sigma_high, sample_rate, total_steps)], delta)
        if sigma_high > _MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
    while target_epsilon - eps_high > _CALIBRATION_TOLERANCE:
        sigma = (sigma_low + sigma_high) / 2
        eps = epsilon([(sigma, sample_rate, total_steps)], delta)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


def planned_cost(
    *,
    n_train: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    noise_multiplier: float | None = None,
) -> PlannedCost:
    """(σ, q, steps per round) of a hospital with ``n_train`` rows, as the spec implies.

    q is Opacus' Poisson rate ``1 / ceil(n_train / batch_size)``; a round is ``local_epochs``
    epochs of ``ceil(n_train / batch_size)`` steps; σ is the spec's ``noiseMultiplier`` or
    :func:`noise_multiplier_for_run` over all rounds (the RDP accountant's calibration).
    """
    if n_train < 1 or batch_size < 1 or local_epochs < 1 or rounds < 1:
        raise ValueError("need n_train, batch_size, local_epochs and rounds >= 1")
    per_epoch = math.ceil(n_train / batch_size)
    q = 1.0 / per_epoch
    per_round = per_epoch * local_epochs
    sigma = (
        float(noise_multiplier)
        if noise_multiplier is not None
        else noise_multiplier_for_run(target_epsilon, delta, q, rounds * per_round)
    )
    return sigma, q, per_round
