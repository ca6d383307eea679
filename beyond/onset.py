"""Where an instability begins (beyond the paper): the analysis of a run followed at every step.

Symbols: S steps; eta the learning rate; lambda the top Hessian eigenvalue, v its eigenvector;
lambda-bar(t) = (lambda(t) + lambda(t-1))/2 the middle of the two branches a bouncing lambda
alternates between; c the amplitude of the period-two mode (the parameters' alternating part
along v).

Linear stability (stability.py, eqs. 6-7): along v, gradient descent multiplies a deviation by
1 - eta lambda per step. Below eta lambda = 2 a period-two deviation decays by |1 - eta lambda|
per step; above, it grows by eta lambda - 1 (a flip bifurcation).

Derivations
-----------
The mode's amplitude. Along v, write theta . v = x(t) = s(t) + c (-1)^t, a smooth drift s plus
the alternation. The k-th difference D^k x(t) = sum_i (-1)^(k-i) binom(k, i) x(t + i) maps
(-1)^t to (-2)^k (-1)^t, and a smooth s of time scale tau to about s tau^-k. So
c = |D^k x| / 2^k up to the drift's k-th derivative (:func:`alternating_amplitude`); the tracker
uses k = 4 (apparatus/onset.MODE_ORDER).

The entry-exit relation (a slow passage through the flip). While eta lambda-bar rises through 2
slowly, the mode keeps multiplying by |1 - eta lambda-bar(t)| per step: it decays below 2 and
grows above. Fed by a floor of size a0 (round-off, or a perturbation every step), it has decayed
to that floor by the time eta lambda-bar reaches 2, and from there it grows; it reaches a level
a1 at the first step t1 where sum_{t = t_2}^{t1} ln|1 - eta lambda-bar(t)| = ln(a1 / a0), with
t_2 the crossing of 2 (:func:`multiplier_sum`). The smaller the floor, the later (and so the
higher in eta lambda) the mode is seen: a delay of ln(a1/a0) e-folds, whatever the ramp.

The forced precursor. A mode forced by f (-1)^t every step, x(t+1) = (1 - eta lambda) x(t) +
f (-1)^t, settles (below the edge) at c = f / (2 - eta lambda): the amplitude times
(2 - eta lambda-bar) is the forcing, F = c (2 - eta lambda-bar) (:func:`forcing_estimate`). A
mode that is seeded, not forced, has F falling with its decay instead.
"""

from __future__ import annotations

from math import comb

import numpy as np


def alternating_amplitude(x, order):
    """|D^order x| / 2^order of a window x (order + 1, ...) of consecutive values (any trailing
    axes: their norm): the amplitude c of an alternation c (-1)^t on top of a smooth drift
    (module docstring). Returns a float."""
    x = np.asarray(x, dtype=np.float64)
    weights = np.array([(-1) ** (order - i) * comb(order, i) for i in range(order + 1)])
    d = np.tensordot(weights, x, axes=(0, 0))
    return float(np.linalg.norm(d)) / 2**order


def branch_midpoint(lam):
    """(lam(t) + lam(t-1)) / 2 of a per-step series (S,): the middle of the two branches a
    period-two bounce alternates between (the value the Fig. 4 rule averages); NaN at t = 0."""
    lam = np.asarray(lam, dtype=np.float64)
    return np.concatenate([[np.nan], 0.5 * (lam[1:] + lam[:-1])])


def cascade_entries(starts, ends, quiet, begin=None):
    """The instabilities that begin a cascade: those starting more than ``quiet`` steps after
    the previous one ended (inside a cascade the rule's runs break and restart all the time).
    The first always begins one, unless the series began inside a cascade (a network unstable
    from its first step: pass ``begin``, the series' first step): then it begins one only if it
    starts more than ``quiet`` steps after ``begin``, since that cascade's entry was not seen.
    starts, ends : (E,) steps of stability.hessian_threshold. Returns indices into starts (C,)."""
    starts, ends = np.asarray(starts), np.asarray(ends)
    if not len(starts):
        return starts[:0]
    first = np.inf if begin is None else starts[0] - begin
    gap = np.r_[first, starts[1:] - ends[:-1]]  # (E,) quiet steps before each
    return np.flatnonzero(gap > quiet)


def upward_crossing(x, level, lo, hi, last=True):
    """The last (or first) step t in [lo, hi) where x passes ``level`` upwards, x(t-1) < level
    <= x(t); -1 if none. x : (S,) a per-step series. A NaN next to the level hides a crossing,
    so callers read x where it is measured at every step (apparatus/onset.py's hot steps)."""
    t = np.arange(max(lo, 1), min(hi, len(x)))
    hits = t[(x[t - 1] < level) & (x[t] >= level)]
    return int(hits[-1] if last else hits[0]) if len(hits) else -1


def first_reaching(x, level, lo, hi):
    """The first step t in [lo, hi) with x(t) >= level; -1 if none. x : (S,)."""
    t = np.arange(max(lo, 0), min(hi, len(x)))
    hits = t[x[t] >= level]
    return int(hits[0]) if len(hits) else -1


def multiplier_sum(eta_mid, t0, t1):
    """sum_{t = t0}^{t1 - 1} ln|1 - eta lambda-bar(t)|: the e-folds the linear map multiplies the
    mode by from step t0 to t1 (module docstring: the entry-exit relation). eta_mid : (S,).
    NaN if a step in between is not measured or t1 < t0."""
    if t1 < t0 or t0 < 0:
        return np.nan
    with np.errstate(divide="ignore"):
        return float(np.sum(np.log(np.abs(1.0 - eta_mid[t0:t1]))))


def forcing_estimate(c, eta_mid):
    """F = c (2 - eta lambda-bar) elementwise: the forcing per step that holds a damped
    period-two mode at amplitude c below the edge (module docstring). c, eta_mid : (S,)."""
    return np.asarray(c) * (2.0 - np.asarray(eta_mid))


def growth_rate(c, eta_mid, t0, t1):
    """The mode's measured growth per step from t0 to t1, (ln c(t1) - ln c(t0)) / (t1 - t0), and
    the linear map's mean ln|1 - eta lambda-bar| over the same steps: (measured, linear), NaNs
    unless t1 > t0 >= 0."""
    if not t1 > t0 >= 0:
        return np.nan, np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        measured = (np.log(c[t1]) - np.log(c[t0])) / (t1 - t0)
    return float(measured), multiplier_sum(eta_mid, t0, t1) / (t1 - t0)
