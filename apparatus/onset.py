"""Where the instabilities begin (beyond the paper): the top Hessian eigenvalue and the period-two
mode at every step of a run, the units of an onset sweep, and their analysis.

An onset run is spiral.train_reference logging every step, with an :class:`OnsetTracker` per
network as its callback. The tracker measures lambda_max of the exact Hessian by Lanczos
warm-started from the previous eigenvector, converged to a relative residual ONSET_TOL (and
checked against the dense eigensolver every VERIFY_EVERY steps): at every step where eta
lambda_max at the step before was >= 2 HOT_FRACTION, and every COLD_EVERY steps. At every step
it records the hidden pre-activations that change sign (and those that change back at the next
step), the cosine of consecutive updates, the update's projection on the top eigenvector, and
the period-two amplitude of the logits (stability.period_two_amplitude). Where eta lambda
crosses 2 and where the Fig. 4 rule starts an instability, it computes the dense spectra: the
Hessian, its Gauss-Newton part, the loss-weighted NTK and the plain NTK (spectra.py).

:func:`analyze_unit` turns a run's series into one row per cascade of instabilities
(stability.py's onset analysis); :func:`merge_onset` gathers a sweep's units, the statistics
over seeds and the fits across conditions; docs/onset.md describes the experiment and its
fields.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
from scipy.linalg import eigh
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import spectra
import stability
from apparatus import plots, statistics, sweeps
from apparatus.cli import InputError
from apparatus.storage import atomic_savez, write_json
from dynloss import class_weights
from fast import mlp_spectra as fast_spectra
from fast.workers import WORKERS, run_jobs
from models import flatten, init_mlp
from spiral import D_SPIRAL, K_SPIRAL, TrainSpec, spiral_data, train_reference

ONSET_TOL = 1e-5  # Lanczos residual / |lambda| at every step: within 1e-5 of an eigenvalue, and
# within about (1e-5 lambda)^2 / gap of lambda_max (checked against the dense one, VERIFY_*)
ONSET_MIX = 0.03  # a random unit vector of this weight joins each warm start (as the tracker's)
MIX_SEED = 1  # its stream
VERIFY_EVERY = 250  # steps between dense checks of the warm-started value
VERIFY_RTOL = 1e-4  # a warm value this far from the dense lambda_max (another eigenvalue) is
# replaced by it and counted
MAX_EVENTS = 400  # dense spectra at most this many times per run
RULE_STRIDE = 25  # the Fig. 4-5 threshold's tracking stride (the published measurement)
HOT_FRACTION = 0.6  # lambda_max at every step once eta lambda_max >= this times 2 ...
COLD_EVERY = 5  # ... and every this many steps below (a divisor of RULE_STRIDE, VERIFY_EVERY)
GAMMA_BLOCK = 4096  # Gamma(t) is evaluated for this many steps at once
SERIES = ("lam", "products", "flips", "flipbacks", "cos", "proj", "amp_logits")
EVENT_KINDS = ("onset", "rule")  # eta * midpoint crosses 2; the rule's bouncing pair starts
EVENT_FIELDS = ("lam_dense", "lam_gn", "lam_wntk", "lam_ntk")


def top_eigenvalue(matrix):
    """The largest eigenvalue and its eigenvector of a symmetric matrix (LAPACK, subset)."""
    n = len(matrix)
    vals, vecs = eigh(matrix, subset_by_index=[n - 1, n - 1])
    return float(vals[0]), vecs[:, 0]


class OnsetTracker:
    """The per-step measurements of network ``net`` of a run (module docstring): an ``on_log``
    callback of spiral.train_reference with log_every = 1. X (N, D), y (N,); spec: the run's
    TrainSpec (A, T, stop_step, lr, loss, beta)."""

    def __init__(self, X, y, spec, net=0):
        self.X, self.y, self.net = np.asarray(X, dtype=np.float64), np.asarray(y), net
        pick = lambda a: float(np.atleast_1d(a)[net])
        self.A, self.T, self.stop = pick(spec.A), pick(spec.T), pick(spec.stop_step)
        self.lr, self.loss, self.beta = spec.lr, spec.loss, spec.beta
        self.series = {f: np.full(spec.steps + 1, np.nan) for f in SERIES}
        self.events = []  # (step, kind, lam_dense, lam_gn, lam_wntk, lam_ntk)
        self.verified, self.replaced = 0, 0
        self._rng = np.random.default_rng(MIX_SEED)
        self._vec = None
        self._prev = []  # the last two steps: (params, theta, logits, signs)
        self._dtheta = None  # the previous update
        self._work = None  # the (N, H) buffers of fast_spectra.net_state
        self._last = None  # the last lambda_max measured
        self._gammas = (None, None)  # (first step, (GAMMA_BLOCK, K)) class weights ahead

    def _gamma(self, step):
        """Gamma(step) (K,), from class_weights evaluated for GAMMA_BLOCK steps at a time."""
        start, block = self._gammas
        if start is None or not 0 <= step - start < len(block):
            start = step
            block = class_weights(np.arange(step, step + GAMMA_BLOCK), self.A, self.T, K_SPIRAL,
                                  self.stop)  # fmt: skip
            self._gammas = (start, block)
        return block[step - start]

    def _top(self, matvec, one, step, P):
        """lambda_max and its eigenvector by Lanczos from the previous one, checked against the
        dense eigensolver every VERIFY_EVERY steps; returns (lambda_max, products)."""
        v0 = self._vec
        if v0 is not None:
            r = self._rng.normal(size=len(v0))
            v0 = v0 + ONSET_MIX * r / np.linalg.norm(r)
        lam, vec, n = spectra.warm_top_eig(matvec, P, v0=v0, tol=ONSET_TOL)
        if self._vec is None or step % VERIFY_EVERY == 0:
            args = (one, self.X, self.y, self._gamma(step), self.loss)
            dense, dense_vec = top_eigenvalue(spectra.hessian(*args, beta=self.beta))
            self.verified += 1
            if abs(lam - dense) > VERIFY_RTOL * abs(dense):
                self.replaced += 1
                lam, vec = dense, dense_vec
        if self._vec is not None and vec @ self._vec < 0:
            vec = -vec  # the eigenvector's sign follows the previous one's
        self._vec, self._last = vec, lam
        return lam, n

    def _dense(self, one, step, kind):
        """Record the dense spectra of one network's parameters ``one`` at ``step``."""
        if len(self.events) >= MAX_EVENTS:
            return
        args = (one, self.X, self.y, self._gamma(step), self.loss)
        gn, network = spectra.hessian(*args, parts=True, beta=self.beta)
        row = (top_eigenvalue(gn + network)[0], top_eigenvalue(gn)[0])
        row += (top_eigenvalue(spectra.weighted_ntk(*args, beta=self.beta))[0],)
        row += (top_eigenvalue(spectra.ntk(one, self.X, beta=self.beta))[0],)
        self.events.append((step, EVENT_KINDS.index(kind), *row))

    def __call__(self, step, params):
        one = {
            k: np.asarray(a[self.net : self.net + 1], dtype=np.float64) for k, a in params.items()
        }
        s = self.series
        if self.beta is None:  # ReLU: the fused products of fast/mlp_spectra.py, into buffers
            if self._work is None:
                shape = (len(self.X), one["W1"].shape[2])  # (N, H) buffers, reused
                self._work = {"h1": np.empty(shape), "mask": np.empty(shape)}
            state = fast_spectra.net_state(one, self.X, work=self._work)
        else:  # softplus: the same products with its slope and curvature
            state = fast_spectra.net_state(one, self.X, beta=self.beta)
        logits = state["logits"][None]  # (1, N, K)
        signs = state["mask"] > 0.5  # (N, H)  z1 > 0 (the mask is 1[z1 > 0], or sigmoid(beta z1))
        theta = flatten(one)[0]  # (P,)
        hot = self._last is None or self.lr * self._last >= 2.0 * HOT_FRACTION
        if hot or step % COLD_EVERY == 0:
            matvec = fast_spectra.hessian_matvec(state, self.y, self._gamma(step), self.loss)
            s["lam"][step], s["products"][step] = self._top(matvec, one, step, len(theta))
        if self._prev:
            p_one, p_theta, p_logits, p_signs = self._prev[-1]
            s["flips"][step] = (signs != p_signs).sum()
            dtheta = theta - p_theta  # the update of step - 1
            s["proj"][step - 1] = dtheta @ self._vec  # on the latest top eigenvector
            if self._dtheta is not None:
                norms = np.linalg.norm(dtheta) * np.linalg.norm(self._dtheta)
                s["cos"][step - 1] = dtheta @ self._dtheta / norms if norms > 0 else np.nan
            self._dtheta = dtheta
            if len(self._prev) == 2:
                _, _, pp_logits, pp_signs = self._prev[0]
                s["flipbacks"][step - 1] = ((p_signs != pp_signs) & (signs == pp_signs)).sum()
                s["amp_logits"][step - 1] = np.linalg.norm(logits - 2 * p_logits + pp_logits) / 4
            self._events(step, one, p_one)
        self._prev = (self._prev + [(one, theta, logits, signs)])[-2:]

    def _events(self, step, one, p_one):
        """Dense spectra where eta * midpoint crosses 2 upwards, and at the first step of a pair
        of opposite jumps of at least HESS_JUMP (where the Fig. 4 rule starts an instability)."""
        lam = self.series["lam"]
        if (
            step >= 2
            and self.lr * (lam[step] + lam[step - 1]) / 2
            > 2.0
            >= self.lr * (lam[step - 1] + lam[step - 2]) / 2
        ):
            self._dense(one, step, "onset")
        if step >= 3:
            d = np.diff(lam[step - 3 : step + 1])  # jumps at step - 2, step - 1, step
            pair = lambda a, b: min(abs(a), abs(b)) >= stability.HESS_JUMP and a * b < 0
            if pair(d[1], d[2]) and not pair(d[0], d[1]):
                self._dense(p_one, step - 1, "rule")

    def arrays(self):
        """The per-step series, the events (E, 6) and the verification counts, for np.savez."""
        out = dict(self.series)
        out["events"] = np.array(self.events, dtype=np.float64).reshape(-1, 2 + len(EVENT_FIELDS))
        out["verified"], out["replaced"] = np.int64(self.verified), np.int64(self.replaced)
        return out


# ---------------------------------------------------------------------------------------------
# One run's instabilities
# ---------------------------------------------------------------------------------------------

EPISODE_FIELDS = (
    "entry_step", "entry_lambda", "entry_excess", "entered_below", "onset_step", "lag_steps",
    "ramp", "level_step", "amp_level", "amp_onset", "amp_entry", "growth_measured",
    "growth_linear", "growth_slope", "growth_intercept", "predicted_excess", "flips_level",
    "flipback_level", "cos_level", "flips_onset", "flipback_onset", "cos_onset",
    "lam_alternation", "onset_lam_dense", "onset_lam_gn", "onset_lam_wntk", "onset_lam_ntk",
    "entry_lam_dense", "entry_lam_gn", "entry_lam_wntk", "entry_lam_ntk",
)  # fmt: skip
QUIET_FRACTION = 0.2  # an instability begins a cascade after this many periods without one
MIN_QUIET = 100  # ... and at least this many steps
LEVEL = 1.5  # eta lambda_max where the mode is read on its way up, below the onset at 2
AROUND = 25  # steps on each side over which the chattering is averaged at a level
ALTERNATION_WINDOW = 100  # steps before the onset over which |lambda(t) - lambda(t-1)| is averaged


def _event_values(events, step, kind, within=0):
    """The dense spectra recorded for an event of ``kind`` nearest to ``step``, at most
    ``within`` steps away (NaNs if none)."""
    off = np.abs(events[:, 0] - step)
    hit = (off <= within) & (events[:, 1] == EVENT_KINDS.index(kind))
    return events[hit][np.argmin(off[hit]), 2:] if hit.any() else np.full(len(EVENT_FIELDS), np.nan)


def _around(x, t, half=AROUND):
    """The mean of x over t - half .. t + half (NaN for t < 0)."""
    return np.nanmean(x[max(0, t - half) : t + half + 1]) if t >= 0 else np.nan


def _share(u, t):
    """The share of the sign flips around step t that flip back at the next step."""
    return _around(u["flipbacks"], t) / _around(u["flips"], t) if t >= 0 else np.nan


def _mean(x):
    """The mean of x, NaN (without a warning) if x is empty."""
    return np.mean(x) if len(x) else np.nan


def analyze_unit(u, lr, T):
    """One row per cascade of a stored onset run ``u`` (period T, learning rate lr): where the
    Fig. 4 rule on every COLD_EVERY-th step enters it, where eta lambda_max crossed LEVEL and 2
    on the way, how the period-two mode grew between the two against the linear map's decay, the
    chattering there, and the dense spectra at the onset and the entry. Returns (rows {field:
    (C,)}, the run's numbers: "threshold" (the rule at stride 25, as Figs. 4-5), "threshold_5"
    (at stride 5), "threshold_entries", "threshold_restarts", "threshold_ends" (the stride-25
    rule's mean midpoint at the starts that begin cascades, at the other starts, at the ends:
    the threshold is the mean over all three), "threshold_scaled" and "threshold_scaled_entries"
    (the same with the jump measured in eta lambda, eta |jump| >= 0.1: scale-free in eta),
    "lam_max" (the largest lambda_max measured), "entries", "entries_below" (cascades entered
    with eta * midpoint <= 2)).

    Every COLD_EVERY-th step is measured, the others only while eta lambda_max at the previous
    step is above 2 HOT_FRACTION: inside a cascade, whose lower branch can fall below that, the
    per-step series has gaps. So the rule reads the complete stride-5 and stride-25 series (odd
    strides: both see the alternation), and the per-step series is used for the crossings
    before an entry, where both branches are measured."""
    lam, amp, steps = u["lam"], u["amp_logits"], np.arange(len(u["lam"]))
    quiet = max(MIN_QUIET, QUIET_FRACTION * T)
    mid = stability.branch_midpoint(lam)
    readings = {}  # the rule on a complete series: (threshold, starts, ends, firsts, midpoints)
    for key, stride, jump in (
        ("5", COLD_EVERY, stability.HESS_JUMP),
        ("25", RULE_STRIDE, stability.HESS_JUMP),
        ("scaled", RULE_STRIDE, stability.HESS_JUMP / lr),  # eta |jump| >= 0.1: scale-free
    ):
        at = steps[np.isfinite(lam) & (steps % stride == 0)]  # (S/stride,) measured steps
        thr, starts, ends = stability.hessian_threshold(at, lam[at], jump=jump)
        first = stability.cascade_entries(starts, ends, quiet)  # into starts
        mids = stability.branch_midpoint(lam[at])[np.searchsorted(at, starts)]  # (E,) lambda bar
        readings[key] = thr, starts, ends, first, mids
    thr5, starts, ends, picks, mids5 = readings["5"]
    _, _, e25, first25, mids25 = readings["25"]
    at25 = steps[np.isfinite(lam) & (steps % RULE_STRIDE == 0)]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_amp = np.log(amp)
        linear = np.log(np.abs(1.0 - lr * mid))  # eqs. (6)-(7): log|1 - eta lambda| per step
    rows = {f: [] for f in EPISODE_FIELDS}
    eta_mid, gd = lr * mid, stability.gd_threshold(lr)  # (S,) eta lambda-bar; 2/eta
    for k in picks:
        s = int(starts[k])
        lo = int(ends[k - 1]) + 1 if k > 0 else 1  # since the previous cascade
        t_level = stability.upward_crossing(eta_mid, LEVEL, lo, s + 1)
        t_onset = stability.upward_crossing(eta_mid, 2.0, lo, s + 1)
        if t_onset < 0:  # the rule fired first: the onset follows
            t_onset = stability.upward_crossing(eta_mid, 2.0, s, s + int(quiet), last=False)
        span = slice(t_level, t_onset) if 0 <= t_level < t_onset else slice(0, 0)
        a_level, a_onset = _around(amp, t_level, 2), _around(amp, t_onset, 2)
        rho = stability.ramp_rate(lam, lr, t_onset) if t_onset >= 0 else np.nan
        fit = stability.growth_fit(amp, lam, lr, t_level, s) if 0 <= t_level < s else (np.nan,) * 4
        window = slice(max(1, t_onset - ALTERNATION_WINDOW), max(1, t_onset))
        values = {
            "entry_step": s, "entry_lambda": mids5[k], "entry_excess": mids5[k] - gd,
            "entered_below": float(lr * mids5[k] <= 2.0), "onset_step": t_onset,
            "lag_steps": s - t_onset if t_onset >= 0 else np.nan, "ramp": rho,
            "level_step": t_level, "amp_level": a_level, "amp_onset": a_onset,
            "amp_entry": amp[s], "growth_measured": (
                (log_amp[span.stop] - log_amp[span.start]) / (span.stop - span.start)
                if span.stop > span.start else np.nan),
            "growth_linear": np.nanmean(linear[span]) if span.stop > span.start else np.nan,
            "growth_slope": fit[0], "growth_intercept": fit[1],
            "predicted_excess": (stability.slow_passage_excess(rho, a_onset, amp[s]) / lr
                                 if s > t_onset >= 0 else np.nan),
            "flips_level": _around(u["flips"], t_level), "flipback_level": _share(u, t_level),
            "cos_level": _around(u["cos"], t_level), "flips_onset": _around(u["flips"], t_onset),
            "flipback_onset": _share(u, t_onset), "cos_onset": _around(u["cos"], t_onset),
            "lam_alternation": (np.nanmean(np.abs(np.diff(lam[window.start - 1 : window.stop])))
                                if t_onset > 1 else np.nan),
        }  # fmt: skip
        for kind, at, name, within in (
            ("onset", t_onset, "onset", 0),
            ("rule", s, "entry", 2 * COLD_EVERY),
        ):
            dense = _event_values(u["events"], at, kind, within)  # the tracker's rule: every step
            for f, v in zip(EVENT_FIELDS, dense, strict=True):
                values[f"{name}_{f}"] = v
        for f in EPISODE_FIELDS:
            rows[f].append(values[f])
    rows = {f: np.array(v, dtype=np.float64) for f, v in rows.items()}
    return rows, {
        "threshold": readings["25"][0],
        "threshold_5": thr5,
        "threshold_entries": _mean(mids25[first25]),
        "threshold_restarts": _mean(np.delete(mids25, first25)),
        "threshold_ends": _mean(stability.branch_midpoint(lam[at25])[np.searchsorted(at25, e25)]),
        "threshold_scaled": readings["scaled"][0],
        "threshold_scaled_entries": _mean(readings["scaled"][4][readings["scaled"][3]]),
        "lam_max": np.nanmax(lam),  # how far lambda_max climbs inside the cascades
        "entries": len(picks),
        "entries_below": int(rows["entered_below"].sum()) if len(picks) else 0,
    }


# ---------------------------------------------------------------------------------------------
# The sweep: conditions x seeds, one unit per network
# ---------------------------------------------------------------------------------------------


CONDITION_KEYS = ("T0", "lr", "dtype", "noise", "beta")  # what a condition of the sweep fixes


def grid(T0s, lrs, dtypes, noises, betas):
    """The conditions of a command line, a product of its lists, in a fixed order: dicts of
    T0, lr, dtype, noise and beta (None: ReLU)."""
    return [
        dict(T0=T0, lr=lr, dtype=dtype, noise=noise, beta=beta)
        for beta in betas
        for dtype in dtypes
        for noise in noises
        for T0 in T0s
        for lr in lrs
    ]


def conditions(cfg):
    """The sweep's conditions (its sweep.json lists them; a later command may append more), each
    with its run's T = T0/lr and steps = periods T."""
    out = []
    for c in cfg["conditions"]:
        T = c["T0"] / c["lr"]
        out.append(dict(c, T=T, steps=int(round(cfg["periods"] * T))))
    return out


def condition_name(c):
    """A file-name key that holds the condition's exact values (repr of the floats; "*" for a
    key that varies within a family)."""
    r = lambda v: v if v == "*" else repr(float(v))
    beta = "relu" if c["beta"] is None else f"softplus{r(c['beta'])}"
    return f"T0{r(c['T0'])}_lr{r(c['lr'])}_{c['dtype']}_noise{r(c['noise'])}_{beta}"


def onset_units(cfg):
    """(name, condition index, seed) of every unit, conditions outermost."""
    return [
        (f"{condition_name(c)}_s{s:05d}", i, s)
        for i, c in enumerate(conditions(cfg))
        for s in cfg["seeds"]
    ]


def onset_spec(cfg, c, seeds):
    """The TrainSpec of the networks ``seeds`` of condition ``c`` (every step logged)."""
    M = len(seeds)
    full = lambda v: np.full(M, float(v))
    return TrainSpec(
        A=full(cfg["A"]), T=full(c["T"]), stop_step=full(c["steps"] + 1), lr=c["lr"],
        steps=c["steps"], log_every=1, loss=cfg["loss"], val_every=c["steps"],
        beta=c["beta"], dtype=c["dtype"], noise=c["noise"], noise_seed=np.array(seeds),
    )  # fmt: skip


def track_onsets(params0, data, spec, xp=np, progress=None):
    """Train with spiral.train_reference (on the CPU: ``xp`` is NumPy), one OnsetTracker per
    network: (result, [arrays])."""
    trackers = [OnsetTracker(data[0], data[1], spec, net=m) for m in range(len(params0["W1"]))]

    def on_log(step, params):
        for tracker in trackers:
            tracker(step, params)

    with threadpool_limits(limits=1):
        res = train_reference(params0, data, spec, on_log=on_log, progress=progress)
    return res, [t.arrays() for t in trackers]


def run_onset(out, cfg, units, progress=True, workers=WORKERS):
    """Train the pending units of a prepared onset sweep, a condition's seeds split over the
    worker processes; store each network's series as its unit."""
    conds = conditions(cfg)
    data = spiral_data()
    by_cond = {}
    for u in units:
        by_cond.setdefault(u[1], []).append(u)
    jobs, members = [], []
    for i, group in by_cond.items():
        pieces = max(1, min(workers, len(group)))
        size = -(-len(group) // pieces)
        for j in range(0, len(group), size):
            part = group[j : j + size]
            seeds = [u[2] for u in part]
            params0 = init_mlp(seeds, D=D_SPIRAL, H=cfg["width"], K=K_SPIRAL, init=cfg["init"])
            jobs.append((params0, data, onset_spec(cfg, conds[i], seeds)))
            members.append(part)
    total = sum(len(m) * j[2].steps for m, j in zip(members, jobs, strict=True))
    bar = tqdm(total=total, unit="net-step", unit_scale=True, disable=not progress, mininterval=1)

    def done(k, result):
        res, arrays = result
        for m, u in enumerate(members[k]):
            unit = dict(arrays[m], loss=res["loss"][:, m], diverged_step=res["diverged_step"][m])
            sweeps.save_unit(out, u[0], unit)

    run_jobs(track_onsets, jobs, np, workers, bar=bar, done=done)
    bar.close()


def onset_expect(cfg):
    """name -> the fields a stored onset unit must have, with its run's length."""
    steps = {condition_name(c): c["steps"] for c in conditions(cfg)}

    def expect(name):
        S = steps[name.rsplit("_s", 1)[0]] + 1
        fields = {f: (S,) for f in SERIES}
        fields.update(loss=(S,), diverged_step=(), verified=(), replaced=())
        fields["events"] = lambda a: a.ndim == 2 and a.shape[1] == 2 + len(EVENT_FIELDS)
        return fields

    return expect


# ---------------------------------------------------------------------------------------------
# Merge: statistics over seeds per condition, fits across conditions
# ---------------------------------------------------------------------------------------------

RUN_FIELDS = (
    "threshold",
    "threshold_5",
    "threshold_entries",
    "threshold_restarts",
    "threshold_ends",
    "threshold_scaled",
    "threshold_scaled_entries",
    "lam_max",
)  # one number per run
SUMMARY_FIELDS = RUN_FIELDS + (
    "entry_lambda",
    "entry_excess",
    "entered_below",
    "lag_steps",
    "ramp",
    "amp_level",
    "amp_onset",
    "amp_entry",
    "growth_measured",
    "growth_linear",
    "growth_slope",
    "growth_intercept",
    "predicted_excess",
    "flips_level",
    "flipback_level",
    "cos_level",
    "flips_onset",
    "flipback_onset",
    "cos_onset",
    "lam_alternation",
    "onset_lam_dense",
    "onset_lam_gn",
    "onset_lam_wntk",
    "onset_lam_ntk",
    "entry_lam_dense",
    "entry_lam_gn",
)  # fmt: skip  (per run: the mean over its cascades)
LOG10_FIELDS = ("amp_level", "amp_onset", "amp_entry")  # averaged as log10 (decades apart)
ZOOM_CONDITION = dict(T0=5000.0, lr=1.0, dtype="float64", noise=0.0, beta=None)  # onset_zoom.png
ZOOM_CASCADE = 1  # ... shows this cascade of the first seed (0: the start of training)


def merge_onset(out):
    """Analyze every unit of a finished onset sweep: per condition and seed the run's numbers
    (episode means), their means and t intervals over seeds; fits of the excess against the ramp
    rate and of the thresholds against eta; onset.npz, onset.json and onset.png."""
    cfg = sweeps.load_config(out, kind="spiral-onset")
    seeds, expect = cfg["seeds"], onset_expect(cfg)
    complete = [
        c
        for i, c in enumerate(conditions(cfg))
        if not sweeps.pending(out, [u[0] for u in onset_units(cfg) if u[1] == i], expect)
    ]
    if not complete:
        raise InputError(f"{out}: no condition has all its units yet: run the onset command")
    cfg = dict(cfg, conditions=[{k: c[k] for k in CONDITION_KEYS} for c in complete])
    conds, units = conditions(cfg), onset_units(cfg)
    done = sweeps.load_units(out, [u[0] for u in units], expect)
    C, S = len(conds), len(seeds)
    per_seed = {f: np.full((C, S), np.nan) for f in SUMMARY_FIELDS}
    episodes = {f: [] for f in ("condition", "seed", *EPISODE_FIELDS)}
    below, replaced = np.zeros((C, S), dtype=np.int64), np.zeros((C, S), dtype=np.int64)
    for name, i, seed in units:
        u = done[name]
        j = seeds.index(seed)
        with np.errstate(divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # means of nothing: NaN, not measured
            rows, run = analyze_unit(u, conds[i]["lr"], conds[i]["T"])
            for f in SUMMARY_FIELDS[len(RUN_FIELDS) :]:
                v = rows[f]
                per_seed[f][i, j] = np.nanmean(np.log10(v) if f in LOG10_FIELDS else v)
        for f in RUN_FIELDS:
            per_seed[f][i, j] = run[f]
        below[i, j], replaced[i, j] = run["entries_below"], int(u["replaced"])
        n = len(rows["entry_step"])
        episodes["condition"] += [i] * n
        episodes["seed"] += [seed] * n
        for f in EPISODE_FIELDS:
            episodes[f] += list(rows[f])
    arrays = {f"{f}_seeds": v for f, v in per_seed.items()}
    for f, v in per_seed.items():
        mean, lo, hi, _ = statistics.mean_interval(v)
        arrays.update({f: mean, f"{f}_lo": lo, f"{f}_hi": hi})
    arrays.update({f"episode_{f}": np.array(v, dtype=np.float64) for f, v in episodes.items()})
    arrays.update(entries_below=below, replaced=replaced, seeds=np.array(seeds))
    for key in ("T0", "lr", "T", "noise", "steps"):
        arrays[key] = np.array([c[key] for c in conds], dtype=np.float64)
    arrays["beta"] = np.array([np.nan if c["beta"] is None else c["beta"] for c in conds])
    arrays["dtype"] = np.array([c["dtype"] for c in conds])
    fits = _fits(conds, per_seed)
    atomic_savez(os.path.join(out, "onset.npz"), **arrays)
    report = {"conditions": conds, "fits": fits, "per_condition": []}
    for i, c in enumerate(conds):
        row = {"condition": condition_name(c)}
        for f in SUMMARY_FIELDS:
            row[f] = [_num(arrays[f][i]), _num(arrays[f"{f}_lo"][i]), _num(arrays[f"{f}_hi"][i])]
        row["cascades"] = int((arrays["episode_condition"] == i).sum())
        row["cascades_entered_below_2_over_eta"] = int(below[i].sum())
        row["warm_lanczos_replaced"] = int(replaced[i].sum())
        report["per_condition"].append(row)
    write_json(os.path.join(out, "onset.json"), json.loads(json.dumps(report, default=_num)))
    png = os.path.join(out, "onset.png")
    plots.plot_onset(arrays, cfg, png)
    _zoom(out, conds, seeds[0], done)
    print_onset(arrays, conds, fits)
    print(f"wrote {out}/onset.npz, onset.json and the figures {png}, onset_zoom.png")
    return arrays


def _zoom(out, conds, seed, done):
    """onset_zoom.png: cascade ZOOM_CASCADE of ``seed`` in ZOOM_CONDITION (or the first
    condition), step by step."""
    i = next((k for k, c in enumerate(conds) if ZOOM_CONDITION.items() <= c.items()), 0)
    c = conds[i]
    u = done[f"{condition_name(c)}_s{seed:05d}"]
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rows, _ = analyze_unit(u, c["lr"], c["T"])
    if not len(rows["entry_step"]):
        return
    k = min(ZOOM_CASCADE, len(rows["entry_step"]) - 1)
    entry, t_onset = int(rows["entry_step"][k]), int(rows["onset_step"][k])
    title = (
        f"{condition_name(c)}, seed {seed}: cascade {k} (the rule enters at step {entry}, "
        f"midpoint {rows['entry_lambda'][k]:.3f}; eta * midpoint reaches 2 at {t_onset})"
    )
    plots.plot_onset_zoom(u, c["lr"], entry, t_onset, os.path.join(out, "onset_zoom.png"), title)


def _num(v):
    v = float(v)
    return None if not np.isfinite(v) else round(v, 6)


def families(conds, vary):
    """Groups of conditions that differ only in the key ``vary``: {label: [indices]}, in order."""
    groups = {}
    for i, c in enumerate(conds):
        fixed = {k: c[k] for k in CONDITION_KEYS if k != vary}
        groups.setdefault(condition_name({**fixed, vary: "*"}), []).append(i)
    return groups


def _power_law(x, y, rng):
    """y = k x^alpha by least squares in logs over the columns (seeds) of x, y (C, S), with a
    bootstrap interval of alpha over the seeds. Returns alpha, lo, hi, k, points (NaNs if fewer
    than MIN_FIT_POINTS positive pairs)."""
    q = (50 * (1 - statistics.CONFIDENCE), 50 * (1 + statistics.CONFIDENCE))
    ok = (x > 0) & (y > 0)
    if ok.sum() < stability.MIN_FIT_POINTS:
        return (np.nan,) * 4 + (int(ok.sum()),)
    lx, ly = np.log(np.where(ok, x, 1.0)), np.log(np.where(ok, y, 1.0))
    alpha, icpt = np.polyfit(lx[ok], ly[ok], 1)
    draws = []
    for _ in range(statistics.BOOTSTRAP_SAMPLES):
        cols = rng.integers(0, x.shape[1], x.shape[1])
        k = ok[:, cols]
        if len(np.unique(lx[:, cols][k])) > 1:
            draws.append(np.polyfit(lx[:, cols][k], ly[:, cols][k], 1)[0])
    lo, hi = np.percentile(draws, q) if draws else (np.nan, np.nan)
    return alpha, lo, hi, np.exp(icpt), int(ok.sum())


def _fits(conds, per_seed):
    """Within each family of conditions that differ in T0 only (the ramp): the excess over 2/eta
    of the paper's threshold, and of the midpoint where the rule enters the cascades, against
    the ramp rate of eta lambda_max at the onsets, per run, excess = k rho^alpha (the slow
    passage predicts alpha = 1/2; runs with an excess <= 0 are left out and counted), with a
    bootstrap interval over seeds; within each family that differs in the learning rate only
    (at least MIN_FIT_POINTS): the exponent x of threshold ~ eta^x for the paper's threshold,
    the scale-free rule, the rule restricted to the cascades' first starts and the midpoint at
    the cascades' entries (bootstrap over seeds). Each fit draws from its own generator, so its
    interval does not depend on which other conditions the folder holds.
    Returns [dict per fit]."""
    fits = []
    q = (50 * (1 - statistics.CONFIDENCE), 50 * (1 + statistics.CONFIDENCE))
    for label, members in families(conds, "T0").items():
        if len(members) < 2:
            continue
        gd = stability.gd_threshold(np.array([conds[i]["lr"] for i in members]))[:, None]
        for f, excess in (
            ("threshold - 2/lr", per_seed["threshold"][members] - gd),  # (C, S)
            ("entry_excess", per_seed["entry_excess"][members]),
        ):
            rng = np.random.default_rng(statistics.BOOTSTRAP_SEED)
            alpha, lo, hi, k, n = _power_law(per_seed["ramp"][members], excess, rng)
            fits.append(dict(family=label, fit=f"{f} = k ramp^alpha", alpha=alpha,
                             alpha_lo=lo, alpha_hi=hi, k=k, runs=n))  # fmt: skip
    for label, members in families(conds, "lr").items():
        lrs = np.array([conds[i]["lr"] for i in members])
        if len(members) < stability.MIN_FIT_POINTS:
            continue
        for f in ("threshold", "threshold_scaled", "threshold_entries", "entry_lambda"):
            rng = np.random.default_rng(statistics.BOOTSTRAP_SEED)
            (x, err, _), draws = statistics.bootstrap_exponent(lrs, per_seed[f][members].T, rng)
            lo, hi = np.nanpercentile(draws, q) if np.isfinite(draws).any() else (np.nan,) * 2
            fits.append(dict(family=label, fit=f"{f} ~ lr^x", x=x, x_stderr=err, x_lo=lo, x_hi=hi))
    return fits


def print_onset(arrays, conds, fits):
    """One line per condition: the thresholds, the cascades' entries, the onset, the period-two
    mode's growth against the linear map's, the chattering, the NTK side; then the fits."""
    c95 = f"{statistics.CONFIDENCE:.0%}"

    def show(f, i, fmt=".3f"):
        ci = statistics.interval(arrays[f + "_lo"][i], arrays[f + "_hi"][i], fmt)
        return f"{arrays[f][i]:{fmt}} {ci}"

    print(f"means over seeds [{c95} t intervals] of each run's mean over its cascades")
    for i, c in enumerate(conds):
        print(
            f"{condition_name(c)}: threshold (stride {RULE_STRIDE}) {show('threshold', i)}, "
            f"stride 5 {show('threshold_5', i)}, first starts only "
            f"{show('threshold_entries', i)}, other starts {show('threshold_restarts', i)}, ends "
            f"{show('threshold_ends', i)}, scale-free rule {show('threshold_scaled', i)} (first "
            f"starts {show('threshold_scaled_entries', i)}), largest lambda_max "
            f"{show('lam_max', i, '.1f')}; the rule enters a cascade at lambda "
            f"{show('entry_lambda', i)} (share below 2/lr {show('entered_below', i, '.2f')}); "
            f"period-two growth per step from eta lambda {LEVEL:g} to 2: "
            f"{show('growth_measured', i, '.4f')}, the linear map's {show('growth_linear', i)}; "
            f"log10 amplitude at {LEVEL:g}, 2, entry: {show('amp_level', i, '.2f')}, "
            f"{show('amp_onset', i, '.2f')}, {show('amp_entry', i, '.2f')}; at {LEVEL:g}: "
            f"flips/step {show('flips_level', i, '.0f')}, flip-back share "
            f"{show('flipback_level', i, '.2f')}, cos {show('cos_level', i, '.2f')}; at 2: cos "
            f"{show('cos_onset', i, '.2f')}; at the onset lambda_H {show('onset_lam_dense', i)}, "
            f"Gauss-Newton {show('onset_lam_gn', i)}, loss-weighted NTK "
            f"{show('onset_lam_wntk', i)}, plain NTK {show('onset_lam_ntk', i, '.0f')}"
        )
    for fit in fits:
        values = ", ".join(f"{k} {v:.4g}" for k, v in fit.items() if isinstance(v, float))
        print(f"{fit['family']}: {fit['fit']}: {values}")
