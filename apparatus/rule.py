"""The Fig. 4 rule read as a detector (beyond the paper): how much of the threshold of Figs. 4-5
(2.8 at eta = 1) and of its exponent (-0.9) belongs to the rule's settings, on the Fig. 4-5 runs
themselves.

The rule (stability.hessian_threshold) marks an instability where the tracked lambda_max jumps
by at least ``jump`` between samples ``stride`` steps apart, in alternation, and averages the
branch midpoint at every start and end. Here the same runs are read with other jumps and
strides, and the marks are split by kind (:func:`rule_readings`):

- entries: starts that begin a cascade (an instability more than max(MIN_QUIET, QUIET_FRACTION T)
  steps after the previous one ended);
- restarts: the other starts, inside a cascade, where the rule's runs break and restart;
- inner ends: ends followed by a restart within the cascade;
- exits: the last end of each cascade.

:func:`audit` reads two folders: a ``dynamics`` run of the Fig. 4 setting with lambda_max at
every step (``--hess-every 1``), and the ``threshold`` sweep of Fig. 5 (stride 25, every eta).
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np

import stability
from apparatus import plots, statistics, sweeps
from apparatus.cli import InputError
from apparatus.spiral_sweeps import dynamics_expect, threshold_expect, threshold_units
from apparatus.storage import atomic_savez, write_json
from beyond.onset import cascade_entries

QUIET_FRACTION = 0.2  # an instability begins a cascade after this many periods without one
MIN_QUIET = 100  # ... and at least this many steps
JUMPS = (0.05, 0.1, 0.2, 0.4)  # the rule's jump, around the caption's "~ 0.1"
STRIDES = (1, 5, 25)  # every step, and the odd strides that still see a period-two bounce
MARK_KINDS = ("entries", "restarts", "inner_ends", "exits")
SERIES_COPIES = 40  # bytes in memory per byte of the units read: the Fig. 5 series as per-step
# arrays (NaN between the stride-25 samples: 25 times), and their copies


def rule_readings(lam, T, stride, jump, lr=1.0):
    """The Fig. 4 rule on a run's lambda_max (S,) (per step, NaN where not measured) sampled
    every ``stride`` steps from step 0, with jump ``jump``; a run with eta lambda_max >= 2 at
    step 0 (learning rate ``lr``) began inside a cascade whose entry it did not see
    (beyond/onset.cascade_entries). Returns (threshold, starts (E,),
    ends (E,) steps, cascade firsts (C,) indices into starts, midpoints at the starts (E,),
    marks {kind: (n,) midpoints} for MARK_KINDS and "ends" (inner ends and exits)): a side of an
    instability the series cuts (the end of the run, an unmeasured sample) gives no mark."""
    steps = np.arange(len(lam))
    at = steps[steps % stride == 0]  # (S/stride,) sampled steps
    series = np.asarray(lam, dtype=np.float64)[at]
    first, last, open_start, open_end = stability.instabilities(series, jump)
    thr, starts, ends = stability.hessian_threshold(at, series, jump=jump)
    unstable = lam[0] >= stability.gd_threshold(lr)  # NaN (not measured): not known
    quiet = max(MIN_QUIET, QUIET_FRACTION * T)
    firsts = cascade_entries(starts, ends, quiet, 0 if unstable else None)
    mid = 0.5 * (series[1:] + series[:-1])  # (S/stride - 1,)
    is_first = np.zeros(len(first), dtype=bool)
    is_first[firsts] = True
    is_exit = np.r_[is_first[1:], len(first) > 0]  # the instability before a cascade's entry
    marks = {
        "entries": mid[first[is_first & ~open_start]],
        "restarts": mid[first[~is_first & ~open_start]],
        "inner_ends": mid[last[~is_exit & ~open_end]],
        "exits": mid[last[is_exit & ~open_end]],
        "ends": mid[last[~open_end]],
    }
    return thr, starts, ends, firsts, mid[first], marks


def threshold_with_cut_marks(lam, stride=25, jump=stability.HESS_JUMP):
    """The rule as it was before cut sides were dropped: every run's first and last jump marked,
    whether or not the series shows it end (for the comparison in docs/onset.md)."""
    series = np.asarray(lam, dtype=np.float64)[::stride]
    first, last, _, _ = stability.instabilities(series, jump)
    mid = 0.5 * (series[1:] + series[:-1])
    marks = np.concatenate([first, last])
    return mid[marks].mean() if len(marks) else np.nan


def _every_step(folder):
    """The per-step lambda_max of each seed of a ``dynamics --hess-every 1`` folder: (S, steps+1),
    the seeds, T and the learning rate."""
    cfg = sweeps.load_config(folder, kind="spiral-dynamics")
    if cfg["hess_every"] != 1:
        raise InputError(f"{folder}: tracked every {cfg['hess_every']} steps; need --hess-every 1")
    names = [f"seed_{s:05d}" for s in cfg["seeds"]]
    missing = sweeps.pending(folder, names, dynamics_expect)
    if missing:
        raise InputError(f"{folder}: {len(missing)} seed(s) not done yet, e.g. {missing[0]}")
    done = sweeps.load_units(folder, names, dynamics_expect)
    lams = []
    for n in names:
        u = done[n]
        lam = np.full(cfg["steps"] + 1, np.nan)
        lam[u["hess_step"]] = u["hess_lmax"]
        lams.append(lam)
    return np.array(lams), cfg


def _fig5(folder):
    """The Fig. 5 sweep's stride-25 series: {(width, lr): [per-step arrays, NaN between]} and its
    settings."""
    cfg = sweeps.load_config(folder, kind="spiral-threshold")
    units = [
        u for u in threshold_units(cfg["widths"], cfg["lrs"], cfg["seeds"]) if u[2][0] != "static"
    ]
    missing = sweeps.pending(folder, [u[0] for u in units], threshold_expect)
    if missing:
        raise InputError(f"{folder}: {len(missing)} unit(s) not done yet, e.g. {missing[0]}")
    done = sweeps.load_units(folder, [u[0] for u in units], threshold_expect)
    series = {}
    for name, width, (_, lr), _seed in units:
        u = done[name]
        lam = np.full(int(u["hess_step"][-1]) + 1, np.nan)
        lam[u["hess_step"]] = u["hess_lmax"]
        series.setdefault((width, lr), []).append(lam)
    return series, cfg


def audit(every_step, fig5, out):
    """Read the Fig. 4 runs (every step) and the Fig. 5 sweep with other jumps and strides;
    rule.npz, rule.json, rule.png in ``out``. Returns the arrays."""
    lams, dcfg = _every_step(every_step)
    T, lr = dcfg["T"], dcfg["lr"]
    S = len(lams)
    thr = np.full((len(JUMPS), len(STRIDES), S), np.nan)
    kinds = {k: np.full((len(STRIDES), S), np.nan) for k in MARK_KINDS}  # mean midpoint
    counts = {k: np.zeros((len(STRIDES), S)) for k in MARK_KINDS}
    cut = np.array([threshold_with_cut_marks(lam) for lam in lams])  # (S,)
    periods = (lams.shape[1] - 1) // int(T)  # the run's periods of Gamma
    by_period = np.full((len(STRIDES), S, periods), np.nan)  # mean entry midpoint per period
    below = np.zeros((len(STRIDES), S, periods), dtype=np.int64)  # entries at <= 2/eta
    count = np.zeros((len(STRIDES), S, periods), dtype=np.int64)
    for s, lam in enumerate(lams):
        for b, stride in enumerate(STRIDES):
            for a, jump in enumerate(JUMPS):
                r = rule_readings(lam, T, stride, jump, lr)
                thr[a, b, s] = r[0]
                if jump != stability.HESS_JUMP:
                    continue
                for k in MARK_KINDS:
                    counts[k][b, s] = len(r[5][k])
                    kinds[k][b, s] = np.mean(r[5][k]) if len(r[5][k]) else np.nan
                entry = r[4][r[3]]  # (C,) midpoints where cascades begin, and their period:
                period = (r[1][r[3]] // T).astype(int)
                for p in range(periods):
                    here = entry[(period == p) & np.isfinite(entry)]
                    count[b, s, p], below[b, s, p] = (
                        len(here),
                        (here <= stability.gd_threshold(lr)).sum(),
                    )
                    by_period[b, s, p] = here.mean() if len(here) else np.nan
    arrays = {
        "jumps": np.array(JUMPS),
        "strides": np.array(STRIDES),
        "seeds": np.array(dcfg["seeds"]),
    }
    arrays["threshold"] = thr
    arrays.update(entries_by_period=by_period, entries_below_by_period=below,
                  entries_count_by_period=count)  # fmt: skip
    arrays["threshold_with_cut_marks"] = cut
    for k in MARK_KINDS:
        arrays[f"marks_{k}"], arrays[f"count_{k}"] = kinds[k], counts[k]
    for key, v in [("threshold", thr)] + [(f"marks_{k}", kinds[k]) for k in MARK_KINDS]:
        mean, lo, hi, _ = statistics.mean_interval(v)
        arrays.update({f"{key}_mean": mean, f"{key}_lo": lo, f"{key}_hi": hi})
    series, fcfg = _fig5(fig5)
    widths, lrs = fcfg["widths"], np.array(fcfg["lrs"])
    ft = np.full((len(widths), len(JUMPS), 2, len(lrs), len(fcfg["seeds"])), np.nan)  # fixed/scaled
    old = np.full((len(widths), len(lrs), len(fcfg["seeds"])), np.nan)
    for w, width in enumerate(widths):
        for l, eta in enumerate(lrs):
            for s, lam in enumerate(series[(width, eta)]):
                old[w, l, s] = threshold_with_cut_marks(lam)
                for a, jump in enumerate(JUMPS):
                    for scaled in (0, 1):
                        j = jump / eta if scaled else jump
                        ft[w, a, scaled, l, s] = rule_readings(lam, fcfg["T0"] / eta, 25, j, eta)[0]
    arrays.update(widths=np.array(widths), lrs=lrs, fig5_threshold=ft, fig5_with_cut_marks=old)
    rng = np.random.default_rng(statistics.BOOTSTRAP_SEED)
    q = (50 * (1 - statistics.CONFIDENCE), 50 * (1 + statistics.CONFIDENCE))
    x = np.full((len(widths), len(JUMPS), 2, 3), np.nan)  # exponent, lo, hi
    for w in range(len(widths)):
        for a in range(len(JUMPS)):
            for scaled in (0, 1):
                (slope, _, _), draws = statistics.bootstrap_exponent(lrs, ft[w, a, scaled].T, rng)
                lo, hi = np.nanpercentile(draws, q) if np.isfinite(draws).any() else (np.nan,) * 2
                x[w, a, scaled] = slope, lo, hi
    arrays["fig5_exponent"] = x
    os.makedirs(out, exist_ok=True)
    atomic_savez(os.path.join(out, "rule.npz"), **arrays)
    write_json(os.path.join(out, "rule.json"), _report(arrays, lr))
    plots.plot_rule(arrays, lr, os.path.join(out, "rule.png"))
    print_rule(arrays, lr)
    print(f"wrote {out}/rule.npz, rule.json and the figure {out}/rule.png")
    return arrays


def _num(v):
    v = float(v)
    return None if not np.isfinite(v) else round(v, 6)


def _per_lr(values):
    """[[mean, lo, hi] per learning rate] of values (L, S) over the seeds."""
    mean, lo, hi, _ = statistics.mean_interval(values)
    return [[_num(m), _num(a), _num(b)] for m, a, b in zip(mean, lo, hi, strict=True)]


def _report(arrays, lr):
    """rule.json: every number of print_rule, [mean, lo, hi] where an interval exists."""
    triple = lambda key, idx: [_num(arrays[f"{key}_{s}"][idx]) for s in ("mean", "lo", "hi")]
    rep = {"lr": lr, "jump_stride": [], "marks": [], "fig5": []}
    for a, jump in enumerate(JUMPS):
        for b, stride in enumerate(STRIDES):
            rep["jump_stride"].append(dict(jump=jump, stride=stride,
                                           threshold=triple("threshold", (a, b))))  # fmt: skip
    for b, stride in enumerate(STRIDES):
        for k in MARK_KINDS:
            rep["marks"].append(dict(stride=stride, kind=k, midpoint=triple(f"marks_{k}", b),
                                     per_run=_num(arrays[f"count_{k}"][b].mean())))  # fmt: skip
    rep["entries_by_period"] = []
    for b, stride in enumerate(STRIDES):
        n, low = arrays["entries_count_by_period"][b], arrays["entries_below_by_period"][b]
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a period without entries: NaN
            mean = np.nanmean(arrays["entries_by_period"][b], axis=0)  # (periods,) over seeds
        for p in range(n.shape[1]):
            row = dict(stride=stride, period=p, mean=_num(mean[p]), cascades=int(n[:, p].sum()))
            rep["entries_by_period"].append(dict(row, below_2_over_eta=int(low[:, p].sum())))
    cut = statistics.mean_interval(arrays["threshold_with_cut_marks"])
    rep["fig4_with_cut_marks"] = [_num(v) for v in cut[:3]]
    for w, width in enumerate(arrays["widths"]):
        for a, jump in enumerate(JUMPS):
            for scaled in (0, 1):
                x = arrays["fig5_exponent"][w, a, scaled]
                rows = _per_lr(arrays["fig5_threshold"][w, a, scaled])
                rep["fig5"].append(dict(width=int(width), jump=jump, scale_free=bool(scaled),
                                        exponent=[_num(v) for v in x], threshold=rows))  # fmt: skip
        old = _per_lr(arrays["fig5_with_cut_marks"][w])
        rep.setdefault("fig5_with_cut_marks", []).append(dict(width=int(width), threshold=old))
    return json.loads(json.dumps(rep))


def print_rule(arrays, lr):
    """The threshold against the jump and the stride, the marks by kind, the exponent against the
    jump (fixed and scale-free)."""
    fmt = lambda key, idx: (
        f"{arrays[f'{key}_mean'][idx]:.3f} "
        + statistics.interval(arrays[f"{key}_lo"][idx], arrays[f"{key}_hi"][idx])
    )
    print(f"Fig. 4 runs (lr {lr:g}), {len(arrays['seeds'])} seeds: the rule's threshold")
    for a, jump in enumerate(JUMPS):
        cells = ", ".join(f"stride {s}: {fmt('threshold', (a, b))}" for b, s in enumerate(STRIDES))
        print(f"  jump {jump:g}: {cells}")
    for b, stride in enumerate(STRIDES):
        cells = ", ".join(
            f"{k} {fmt(f'marks_{k}', b)} ({arrays[f'count_{k}'][b].mean():.1f}/run)"
            for k in MARK_KINDS
        )
        print(f"  marks at jump 0.1, stride {stride}: {cells}")
    b = STRIDES.index(5)
    n, low = (
        arrays["entries_count_by_period"][b].sum(0),
        arrays["entries_below_by_period"][b].sum(0),
    )
    cells = ", ".join(f"{p}: {lo}/{m}" for p, (lo, m) in enumerate(zip(low, n, strict=True)))
    print(f"  cascades entered at <= 2/eta by period (stride 5, jump 0.1): {cells}")
    for w, width in enumerate(arrays["widths"]):
        for scaled in (0, 1):
            cells = ", ".join(
                f"{jump:g}: {arrays['fig5_exponent'][w, a, scaled, 0]:.3f} "
                + statistics.interval(*arrays["fig5_exponent"][w, a, scaled, 1:])
                for a, jump in enumerate(JUMPS)
            )
            kind = "eta |jump| >= j" if scaled else "|jump| >= j"
            print(f"  Fig. 5 exponent, width {width}, {kind}: {cells}")
