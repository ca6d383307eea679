"""Stability along a training run (Figs. 4 and 5): bifurcations, the Hessian threshold, the
bounds it is compared with, and the exponent of Fig. 5.

:func:`bifurcation_episodes` finds where the loss bounces with period two (Fig. 4 (c));
:func:`hessian_threshold` finds the curvature above which lambda_max bounces (the Fig. 4
caption's threshold, Fig. 5 (a)); :func:`analyze` collects these for one run; :func:`fit_exponent`
fits threshold ~ eta^x (Fig. 5). The series they read (lambda_max along a run) are measured by
apparatus/tracker.py with spectra.py's operators.

Symbols: S logged (or tracked) steps; E episodes (instabilities); eta the learning rate; lambda
an eigenvalue (of the Hessian H; in eqs. 13-14, of the NTK Theta); d = dF/dtheta the gradient;
g the output residual of eq. (12); N samples.

The bounds they are compared with (eqs. 6-7 and 13-14 of the paper):
- eqs. (6)-(7): to second order, F(theta - eta d) = F - eta |d|^2 + (eta^2/2) d^T H d; along an
  eigenvector of curvature lambda the step lowers F only while -eta |d|^2 + (eta^2/2) lambda |d|^2
  < 0, i.e. lambda < 2/eta. On a quadratic F = (theta - theta*)^T H (theta - theta*) / 2 the
  gradient is H (theta - theta*), so a step maps theta - theta* to (I - eta H)(theta - theta*):
  the component along that eigenvector is multiplied by 1 - eta lambda, which passes -1 at
  lambda = 2/eta (:func:`gd_threshold`, the constant the paper's proportionality (7) leaves
  open): the threshold scales as eta^-1;
- eqs. (13)-(14): under MSE the outputs' residual g obeys dg/dt = -(eta/N) Theta g (13), in
  discrete steps g <- (1 - (eta/N) Theta) g (14): the NTK mode with eigenvalue lambda is
  multiplied by 1 - (eta/N) lambda per step (:func:`ntk_multiplier`), so it flips and grows once
  lambda > 2N/eta (:func:`ntk_threshold`).

Where an instability begins, beyond the paper's threshold, is the onset experiment's question:
beyond/onset.py.
"""

from __future__ import annotations

import numpy as np

BIF_MIN_FLIPS = 4  # consecutive sign changes of F(t) - F(t-1) that make a bifurcation episode
BIF_MIN_JUMP = 1e-12  # |F(t) - F(t-1)| at or below this is roundoff, not a bounce
HESS_JUMP = 0.1  # Fig. 4 caption: lambda_max(t) - lambda_max(t-1) ~ 0.1 marks an instability
HESS_MIN_RUN = 2  # an instability is at least this many bouncing jumps in a row
ANALYSIS_FIELDS = ("bif_start", "bif_end", "thr_start", "thr_end", "threshold", "gd_bound")
ANALYSIS_FIELDS += ("ntk_bound", "settled_period")  # the keys of analyze()


# ---------------------------------------------------------------------------------------------
# Bifurcations, the Hessian threshold, the bounds
# ---------------------------------------------------------------------------------------------


def _runs(flags):
    """Maximal runs of True in a boolean (S,) array: first (E,), last (E,) indices."""
    f = np.concatenate([[False], np.asarray(flags, dtype=bool), [False]])
    edges = np.flatnonzero(f[1:] != f[:-1])
    return edges[::2], edges[1::2] - 1


def bifurcation_episodes(F, step=None, min_flips=BIF_MIN_FLIPS, min_jump=BIF_MIN_JUMP):
    """Period-two bouncing in a loss series: dF(t) = F(t) - F(t-1) alternating in sign step
    after step (Fig. 4 (c)).

    F : (S,) loss logged at consecutive steps (log every step: with an even stride a period-two
        oscillation is invisible)
    step : (S,) steps (default 0..S-1); differences across a gap (step jump != 1) are not used
    min_flips : an episode needs at least this many consecutive sign flips
    min_jump : |dF| at or below this counts as no change (roundoff) and breaks an episode

    A flip at step t means sign dF(t) != sign dF(t-1). For a loss that bounces by +-a from step
    s to step e on top of a smooth descent, the flips run from t = s to t = e + 1.
    Returns starts (E,), ends (E,): the first and the last flip step of each episode.
    """
    F = np.asarray(F, dtype=np.float64)
    step = np.arange(len(F)) if step is None else np.asarray(step)
    dF = np.diff(F)  # (S-1,)  dF at step[1:]
    ok = (np.diff(step) == 1) & (np.abs(dF) > min_jump) & np.isfinite(dF)
    flip = ok[1:] & ok[:-1] & (np.sign(dF[1:]) != np.sign(dF[:-1]))  # (S-2,)  at step[2:]
    first, last = _runs(flip)
    keep = last - first + 1 >= min_flips
    return step[first[keep] + 2], step[last[keep] + 2]


def instabilities(lmax, jump=HESS_JUMP, min_length=HESS_MIN_RUN):
    """The instabilities of a tracked lambda_max (S,) by the Fig. 4 caption's rule.

    Jumps d(i) = lambda_max(i+1) - lambda_max(i) between consecutive samples (NaN where either is
    not measured) with |d| >= ``jump`` next to a jump of the opposite sign (bouncing between two
    branches, not a fast but smooth change) form runs; a run of at least ``min_length`` of them
    is an instability. Returns first (E,), last (E,) (indices into d: the instability starts at
    sample first + 1 and ends at sample last + 1), open_start (E,), open_end (E,) (bool): the run
    touches the series' first or last jump, or a jump that could not be measured (NaN): it may
    have begun before, or go on after, what was seen, so that side is cut, not observed.
    """
    lmax = np.asarray(lmax, dtype=np.float64)
    d = np.diff(lmax)  # (S-1,) jump i between samples i and i+1
    measured = np.isfinite(d)
    big = measured & (np.abs(d) >= jump)
    flip = big[1:] & big[:-1] & (np.sign(d[1:]) != np.sign(d[:-1]))  # (S-2,) between d's
    bouncing = big & (np.r_[False, flip] | np.r_[flip, False])  # a jump next to a reversed one
    first, last = _runs(bouncing)
    keep = last - first + 1 >= min_length
    first, last = first[keep], last[keep]
    open_start = (first == 0) | ~measured[np.maximum(first - 1, 0)]
    open_end = (last == len(d) - 1) | ~measured[np.minimum(last + 1, len(d) - 1)]
    return first, last, open_start, open_end


def hessian_threshold(step, lmax, jump=HESS_JUMP, min_length=HESS_MIN_RUN):
    """The curvature threshold of the Fig. 4 caption, from a tracked Hessian lambda_max.

    The instabilities are :func:`instabilities`' (jumps of at least ``jump``, the caption's
    "~ 0.1", in alternation, ``min_length`` in a row); each one's first sample is its start
    (green line) and its last its end (red line). The threshold is the average of lambda_max at
    all starts and ends, each taken as the midpoint (lambda(t) + lambda(t-1))/2 of the two
    branches the system alternates between. A side of an instability that the series does not
    show (it is still bouncing at the last sample, or next to an unmeasured one) gives no mark:
    a run cut by the end of the series has its start counted and no end, since where the cut
    falls says nothing about where the instability ends. Track at an odd stride (the authors'
    notebook: 25 steps) or every step, or the bouncing is invisible.
    step : (S,) tracked steps; lmax : (S,) (NaN where not measured).

    Returns threshold (nan when no mark), starts (E,), ends (E,) steps (the end of a cut
    instability is its last sample seen).
    """
    step, lmax = np.asarray(step), np.asarray(lmax, dtype=np.float64)
    first, last, open_start, open_end = instabilities(lmax, jump, min_length)
    mid = 0.5 * (lmax[1:] + lmax[:-1])  # (S-1,)
    marks = np.concatenate([first[~open_start], last[~open_end]])
    threshold = mid[marks].mean() if len(marks) else np.nan
    return threshold, step[first + 1], step[last + 1]


def gd_threshold(lr):
    """Gradient descent on a quadratic diverges along curvature lambda > 2/eta: the eta^-1 of
    eq. (7), with its constant. lr : float or array."""
    return 2.0 / lr


def ntk_threshold(lr, N):
    """Eq. (14): the mode of NTK eigenvalue lambda is unstable when 1 - (eta/N) lambda < -1."""
    return 2.0 * N / lr


def ntk_multiplier(lam, lr, N):
    """The factor 1 - (eta/N) lambda of eq. (14) multiplying an NTK eigenmode each step; lam : a
    float or array of NTK eigenvalues, returns the same shape.

    In (0, 1): smooth decay; in (-1, 0): decay flipping sign each step; below -1: period-two
    divergence (the bifurcation branches).
    """
    return 1.0 - lr / N * np.asarray(lam)  # Eq. (14): g <- (1 - (eta/N) Theta) g, per mode


def analyze(arrays, lr, N, T, stop_step):
    """Bifurcations of F, the Hessian threshold (Fig. 4 caption), and when lambda_max settles.

    Returns a dict: ``bif_start, bif_end`` (episodes of F(t) - F(t-1) alternating in sign, from
    F at every logged step), ``thr_start, thr_end`` (instabilities of lambda_max),
    ``threshold``, ``gd_bound`` = 2/eta, ``ntk_bound`` = 2N/eta (eq. 14), and
    ``settled_period``: the number of periods T after which lambda_max never again exceeds the
    threshold while the loss still oscillates (nan when there is no threshold).

    arrays : one run's arrays (a run.npz: apparatus/spiral_sweeps.run_arrays): ``step`` (S,),
    ``loss`` (S,) and the tracked
    ``hess_step`` (R,), ``hess_lmax`` (R,); lr, N (training points), T, stop_step : scalars.
    Starts and ends are int arrays (E,) of steps, one per episode.
    """
    step = arrays["step"]
    contiguous = len(step) > 2 and np.all(np.diff(step[:-1]) == 1)
    if contiguous:
        bif_start, bif_end = bifurcation_episodes(arrays["loss"], step)
    else:  # F was not logged at every step: period-two bouncing cannot be seen
        bif_start = bif_end = np.zeros(0, dtype=np.int64)
    ok = np.isfinite(arrays["hess_lmax"])
    thr, thr_start, thr_end = hessian_threshold(arrays["hess_step"], arrays["hess_lmax"])
    settled = np.nan
    if np.isfinite(thr):
        osc = ok & (arrays["hess_step"] < stop_step)
        above = arrays["hess_step"][osc][arrays["hess_lmax"][osc] > thr]
        settled = float(above.max() // T + 1) if len(above) else 0.0
    return {
        "bif_start": np.asarray(bif_start, dtype=np.int64),
        "bif_end": np.asarray(bif_end, dtype=np.int64),
        "thr_start": np.asarray(thr_start, dtype=np.int64),
        "thr_end": np.asarray(thr_end, dtype=np.int64),
        "threshold": np.float64(thr),
        "gd_bound": np.float64(gd_threshold(lr)),
        "ntk_bound": np.float64(ntk_threshold(lr, N)),
        "settled_period": np.float64(settled),
    }


# ---------------------------------------------------------------------------------------------
# Fig. 5: the threshold against the learning rate
# ---------------------------------------------------------------------------------------------

MIN_FIT_POINTS = 3  # a log-log fit needs at least this many finite thresholds


def unit_threshold(unit):
    """The Hessian threshold (float, nan without instability) of one stored run, recomputed from
    its series ``hess_step`` (R,) and ``hess_lmax`` (R,) (NaN after a divergence: an instability
    running then is cut there)."""
    return hessian_threshold(unit["hess_step"], unit["hess_lmax"])[0]


def fit_exponent(lrs, thresholds):
    """Least squares of log threshold on log eta: (slope, its standard error, intercept).

    lrs : (L,);  thresholds : (R, L), R rows (widths or seeds) sharing the learning rates.
    NaN thresholds are left out; fewer than MIN_FIT_POINTS finite points, or all at one learning
    rate, give NaNs.
    """
    from scipy.stats import linregress

    x = np.log(np.tile(lrs, (len(thresholds), 1))).ravel()
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(thresholds).ravel()
    ok = np.isfinite(y)
    if ok.sum() < MIN_FIT_POINTS or np.ptp(x[ok]) == 0:  # too few points, or a single eta
        return (np.nan, np.nan, np.nan)
    r = linregress(x[ok], y[ok])
    return (r.slope, r.stderr, r.intercept)
