"""The onset experiment's analysis (beyond the paper): one row per cascade of a run, the run's
thresholds, and the merge of a sweep with its statistics over seeds and its fits.

A stored onset unit (apparatus/onset.py) holds, per step, lambda_max (``lam``), the period-two
mode's amplitude along the top eigenvector (``mode``: c of beyond/onset.py), the hidden units
changing sign (``flips``, ``flipbacks``), the cosine of consecutive updates (``cos``) and the
dense spectra at events. :func:`analyze_unit` reads each cascade of instabilities: where the
Fig. 4 rule enters it, where eta lambda-bar crossed 1.2, 1.5, 1.9 and 2 on the way, the forcing
that holds the mode below the edge, the e-folds from the onset to the step where the mode is seen,
the mode's growth against the linear map's. :func:`merge_onset` gathers a sweep: per condition
the seeds' values, their means and t intervals; the fits of docs/onset.md ("Fits"); the figures.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import scipy.stats

import stability
from apparatus import plots, statistics, sweeps
from apparatus.cli import InputError
from apparatus.onset import (
    COLD_EVERY,
    CONDITION_KEYS,
    EVENT_FIELDS,
    EVENT_KINDS,
    HOT_FRACTION,
    RULE_STRIDE,
    condition_name,
    conditions,
    onset_expect,
    onset_units,
)
from apparatus.rule import MIN_QUIET, QUIET_FRACTION, rule_readings
from apparatus.storage import atomic_savez, write_json
from beyond.onset import (
    branch_midpoint,
    first_reaching,
    forcing_estimate,
    growth_rate,
    multiplier_sum,
    upward_crossing,
)
from spiral import spiral_params

HOT_LEVEL = 2.0 * HOT_FRACTION  # eta lambda-bar from which every step is measured
LEVEL = 1.5  # eta lambda-bar where the chattering is read on the way up
RAMP_TO = 1.9  # the ramp rho: the mean rise of eta lambda-bar per step from LEVEL to this or to
# the rule's entry (two samples before it), whichever comes first: before the mode's own
# alternation lifts lambda-bar
MIN_RAMP_STEPS = 10  # a ramp read over fewer steps is not read
AROUND = 25  # steps on each side over which the chattering is averaged at a level
AMP_AROUND = 2  # steps on each side over which the mode's amplitude is averaged at a crossing
MODE_SEEN = 1e-4  # the mode is "seen" once its amplitude c reaches this (parameter units)
GROWTH_FROM = 1e-8  # its growth is measured from this amplitude (above the float64 floor) to seen
MIN_GROWTH_STEPS = 5  # fewer steps between the two: no growth measured
MIN_CORRELATED = 8  # cascades a rank correlation needs
ALTERNATION_WINDOW = 100  # steps before the onset over which |lambda(t) - lambda(t-1)| is averaged
NO_GROWTH_RUNS = ("no run: the mode was seen before the onset in every cascade (it did not grow "
                  "from the seed level; the entry-exit relation does not apply)")  # fmt: skip
EPISODE_FIELDS = (
    "entry_step", "entry_lambda", "entry_excess", "entered_below", "hot_step", "level_step",
    "onset_step", "lag_steps", "ramp", "mode_hot", "mode_level", "mode_onset", "mode_entry",
    "forcing_low", "forcing_high", "mode_exponent", "seen_step", "seen_lambda", "seen_excess",
    "seen_ramp", "seen_before_onset",
    "seen_censored", "efolds_seen", "seed_implied", "growth_measured", "growth_linear",
    "flips_level", "flipback_level", "cos_level", "flips_onset", "flipback_onset", "cos_onset",
    "lam_alternation", "onset_lam_dense", "onset_lam_gn", "onset_lam_wntk", "onset_lam_ntk",
    "entry_lam_dense", "entry_lam_gn", "entry_lam_wntk", "entry_lam_ntk",
)  # fmt: skip


def _event_values(events, step, kind, within=0):
    """The dense spectra recorded for an event of ``kind`` nearest to ``step``, at most
    ``within`` steps away (NaNs if none)."""
    off = np.abs(events[:, 0] - step)
    hit = (off <= within) & (events[:, 1] == EVENT_KINDS.index(kind))
    return events[hit][np.argmin(off[hit]), 2:] if hit.any() else np.full(len(EVENT_FIELDS), np.nan)


def _around(x, t, half=AROUND):
    """The mean of x over t - half .. t + half (NaN for t < 0)."""
    return np.nanmean(x[max(0, t - half) : t + half + 1]) if t >= 0 else np.nan


def _geo_around(x, t, half=AMP_AROUND):
    """The geometric mean of x > 0 over t - half .. t + half (NaN for t < 0)."""
    if t < 0:
        return np.nan
    with np.errstate(divide="ignore"):
        return float(np.exp(np.nanmean(np.log(x[max(0, t - half) : t + half + 1]))))


def _share(u, t):
    """The share of the sign flips around step t that flip back at the next step."""
    return _around(u["flipbacks"], t) / _around(u["flips"], t) if t >= 0 else np.nan


def _mean(x):
    """The mean of x, NaN (without a warning) if x is empty."""
    return np.mean(x) if len(x) else np.nan


def _band_median(x, eta_mid, t0, t1, lo, hi):
    """The median of x over the steps t0 .. t1 - 1 where lo <= eta lambda-bar < hi (NaN if
    none)."""
    if t0 < 0 or t1 <= t0:
        return np.nan
    sel = (eta_mid[t0:t1] >= lo) & (eta_mid[t0:t1] < hi) & np.isfinite(x[t0:t1])
    return float(np.median(x[t0:t1][sel])) if sel.any() else np.nan


def _mode_exponent(c, eta_mid, t0, t1, lo, hi):
    """k in c ∝ (2 - eta lambda-bar)^-k over the steps t0 .. t1 - 1 where lo <= eta lambda-bar
    < hi: the slope of ln c on -ln(2 - eta lambda-bar). A mode held by a constant forcing has
    k = 1 (c = F / (2 - eta lambda-bar)); NaN with fewer than MIN_RAMP_STEPS steps."""
    if t0 < 0 or t1 <= t0:
        return np.nan
    x, y = eta_mid[t0:t1], c[t0:t1]
    sel = (x >= lo) & (x < hi) & np.isfinite(y) & (y > 0)
    if sel.sum() < MIN_RAMP_STEPS or np.ptp(x[sel]) == 0:
        return np.nan
    return float(np.polyfit(-np.log(2.0 - x[sel]), np.log(y[sel]), 1)[0])


def analyze_unit(u, lr, T):
    """One row per cascade of a stored onset run ``u`` (period T, learning rate lr), and the
    run's numbers.

    Rows {field: (C,)}: where the rule on every COLD_EVERY-th step enters the cascade
    (``entry_*``); the last upward crossings of eta lambda-bar = HOT_LEVEL, LEVEL and 2 before
    the entry (``hot_step``, ``level_step``, ``onset_step``: the linear-stability onset; if the
    rule came first, the first crossing of 2 after it) and ``lag_steps`` = entry - onset; the
    ramp rho (``ramp``: the mean rise of eta lambda-bar per step from LEVEL to RAMP_TO, before
    the onset); the mode's amplitude c at the crossings and the entry (``mode_*``); the forcing
    F = c (2 - eta lambda-bar) that would hold it there, median over HOT_LEVEL-LEVEL and
    LEVEL-RAMP_TO (``forcing_low``, ``forcing_high``), and k of c ∝ (2 - eta lambda-bar)^-k
    over HOT_LEVEL-RAMP_TO (``mode_exponent``: 1 for a constant forcing); the first step from
    the HOT_LEVEL crossing on where c reaches MODE_SEEN (``seen_step``, ``seen_lambda`` =
    lambda-bar there, ``seen_excess`` = seen_lambda - 2/eta where seen after the onset, and
    ``seen_ramp`` the ramp of those cascades,
    ``seen_before_onset``; ``seen_censored``: c was not measured below MODE_SEEN before, so
    it was already there when the tracking began and seen_lambda is only an upper bound), the
    e-folds of the linear map from the onset to it (``efolds_seen``:
    NaN if seen before the onset) and the floor they imply, log10 MODE_SEEN - efolds / ln 10
    (``seed_implied``); the growth of ln c per step from c = GROWTH_FROM (or the onset) to seen,
    against the linear map's mean ln|1 - eta lambda-bar| (``growth_measured``,
    ``growth_linear``); the chattering over +-AROUND steps at LEVEL and at the onset; the mean
    |lambda(t) - lambda(t-1)| over ALTERNATION_WINDOW steps before the onset; the dense spectra
    at the onset and the entry.

    The run's numbers: ``threshold`` (the rule at stride 25, as Figs. 4-5), ``threshold_5``,
    ``threshold_entries``, ``threshold_restarts``, ``threshold_ends`` (the stride-25 rule's mean
    midpoint at the starts that begin cascades, at its other starts, at its ends),
    ``threshold_scaled`` and ``threshold_scaled_entries`` (the jump measured in eta lambda,
    eta |jump| >= 0.1), ``lam_max``, ``coverage`` (the share of the steps inside the cascades
    where lambda_max was measured), ``entries``, ``entries_below``.
    """
    lam, c = u["lam"], u["mode"]
    quiet = max(MIN_QUIET, QUIET_FRACTION * T)
    eta_mid, gd = lr * branch_midpoint(lam), stability.gd_threshold(lr)  # (S,); 2/eta
    below_nan = np.where(np.isfinite(eta_mid), eta_mid, -np.inf)  # an unmeasured step: below
    r5 = rule_readings(lam, T, COLD_EVERY, stability.HESS_JUMP, lr)
    r25 = rule_readings(lam, T, RULE_STRIDE, stability.HESS_JUMP, lr)
    scaled = rule_readings(lam, T, RULE_STRIDE, stability.HESS_JUMP / lr, lr)  # scale-free
    _, starts, ends, picks, mids5, _ = r5
    rows = {f: [] for f in EPISODE_FIELDS}
    inside = np.zeros(len(lam), dtype=bool)  # the steps inside the cascades
    for n, k in enumerate(picks):
        s = int(starts[k])
        last = int(ends[picks[n + 1] - 1]) if n + 1 < len(picks) else int(ends[-1])
        inside[s : last + 1] = True
        lo = int(ends[k - 1]) + 1 if k > 0 else 1  # since the previous cascade
        cross = lambda level, x=eta_mid, lo=lo, s=s: upward_crossing(x, level, lo, s + 1)
        t_level, t_to, t_onset = cross(LEVEL), cross(RAMP_TO), cross(2.0)
        t_hot = cross(HOT_LEVEL, below_nan)  # where every step begins to be measured
        if t_onset < 0:  # the rule fired first: the onset follows
            t_onset = upward_crossing(eta_mid, 2.0, s, s + int(quiet), last=False)
        entered = s - 2 * COLD_EVERY  # before the stride-5 rule saw the first bounce
        t_ramp = t_to if 0 <= t_to < entered else entered  # RAMP_TO, or the entry if first
        rho = ((eta_mid[t_ramp] - eta_mid[t_level]) / (t_ramp - t_level)
               if 0 <= t_level and t_ramp - t_level >= MIN_RAMP_STEPS else np.nan)  # fmt: skip
        t_seen = first_reaching(c, MODE_SEEN, t_hot if t_hot >= 0 else lo, s + int(quiet))
        after = t_seen > t_onset >= 0
        t_first = t_hot if t_hot >= 0 else lo
        censored = t_seen >= 0 and not (c[t_first:t_seen] < MODE_SEEN).any()  # NaN: not below
        efolds = multiplier_sum(eta_mid, t_onset, t_seen) if after else np.nan
        t_from = first_reaching(c, GROWTH_FROM, t_onset, t_seen) if after else -1
        grow = t_seen - t_from >= MIN_GROWTH_STEPS and t_from >= 0
        measured, linear = growth_rate(c, eta_mid, t_from, t_seen) if grow else (np.nan,) * 2
        F = forcing_estimate(c, eta_mid)  # (S,)
        below = t_onset if t_onset >= 0 else s
        window = slice(max(1, t_onset - ALTERNATION_WINDOW), max(1, t_onset))
        values = {
            "entry_step": s, "entry_lambda": mids5[k], "entry_excess": mids5[k] - gd,
            "entered_below": float(lr * mids5[k] <= 2.0), "hot_step": t_hot,
            "level_step": t_level, "onset_step": t_onset,
            "lag_steps": s - t_onset if t_onset >= 0 else np.nan, "ramp": rho,
            "mode_hot": _geo_around(c, t_hot), "mode_level": _geo_around(c, t_level),
            "mode_onset": _geo_around(c, t_onset), "mode_entry": _geo_around(c, s),
            "forcing_low": _band_median(F, eta_mid, t_hot, below, HOT_LEVEL, LEVEL),
            "forcing_high": _band_median(F, eta_mid, t_hot, below, LEVEL, RAMP_TO),
            "mode_exponent": _mode_exponent(c, eta_mid, t_hot, below, HOT_LEVEL, RAMP_TO),
            "seen_excess": eta_mid[t_seen] / lr - gd if after else np.nan,
            "seen_ramp": rho if after else np.nan,  # the ramp of the same cascades, for its fit
            "seen_step": t_seen, "seen_lambda": eta_mid[t_seen] / lr if t_seen >= 0 else np.nan,
            "seen_before_onset": float(0 <= t_seen < t_onset) if t_seen >= 0 else np.nan,
            "seen_censored": float(censored) if t_seen >= 0 else np.nan,
            "efolds_seen": efolds, "seed_implied": np.log10(MODE_SEEN) - efolds / np.log(10),
            "growth_measured": measured, "growth_linear": linear,
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
    marks25, marks_scaled = r25[5], scaled[5]
    return rows, {
        "threshold": r25[0],
        "threshold_5": r5[0],
        "threshold_entries": _mean(marks25["entries"]),
        "threshold_restarts": _mean(marks25["restarts"]),
        "threshold_ends": _mean(marks25["ends"]),
        "threshold_scaled": scaled[0],
        "threshold_scaled_entries": _mean(marks_scaled["entries"]),
        "lam_max": np.nanmax(lam),  # how far lambda_max climbs inside the cascades
        "coverage": float(np.isfinite(lam[inside]).mean()) if inside.any() else np.nan,
        "entries": len(picks),
        "entries_below": int(rows["entered_below"].sum()) if len(picks) else 0,
    }


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
    "coverage",
)  # one number per run
EPISODE_SUMMARY = (
    "entry_lambda",
    "entry_excess",
    "entered_below",
    "lag_steps",
    "ramp",
    "mode_hot",
    "mode_level",
    "mode_onset",
    "mode_entry",
    "forcing_low",
    "forcing_high",
    "mode_exponent",
    "seen_lambda",
    "seen_excess",
    "seen_ramp",
    "seen_before_onset",
    "seen_censored",
    "efolds_seen",
    "seed_implied",
    "growth_measured",
    "growth_linear",
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
SUMMARY_FIELDS = RUN_FIELDS + EPISODE_SUMMARY
LOG10_FIELDS = ("mode_hot", "mode_level", "mode_onset", "mode_entry", "forcing_low")
LOG10_FIELDS += ("forcing_high",)  # averaged as log10 (decades apart)
ZOOM_CONDITIONS = (  # onset_zoom.png: one cascade of the first seed of each, when present
    dict(T0=5000.0, lr=1.0, dtype="float64", noise=0.0, beta=None, force=0.0),
    dict(T0=5000.0, lr=1.0, dtype="float64", noise=0.0, beta=20.0, force=0.0),
    dict(T0=5000.0, lr=1.0, dtype="float64", noise=0.0, beta=20.0, force=1e-4),
)
ZOOM_CASCADE = 1  # ... this cascade (0: the start of training)


def _analyze(u, c):
    """analyze_unit without the warnings of means over nothing (NaN: not measured)."""
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return analyze_unit(u, c["lr"], c["T"])


def merge_onset(out):
    """Analyze every unit of the complete conditions of an onset sweep: per condition and seed
    the run's numbers (episode means), their means and t intervals over seeds; the fits across
    conditions; onset.npz, onset.json and the figures onset.png and onset_zoom.png."""
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
        j = seeds.index(seed)
        rows, run = _analyze(done[name], conds[i])
        with warnings.catch_warnings(), np.errstate(divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)  # a mean of nothing: NaN
            for f in EPISODE_SUMMARY:
                v = rows[f]
                per_seed[f][i, j] = np.nanmean(np.log10(v) if f in LOG10_FIELDS else v)
        for f in RUN_FIELDS:
            per_seed[f][i, j] = run[f]
        below[i, j], replaced[i, j] = run["entries_below"], int(done[name]["replaced"])
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
    for key in ("T0", "lr", "T", "noise", "steps", "force"):
        arrays[key] = np.array([c[key] for c in conds], dtype=np.float64)
    arrays["beta"] = np.array([np.nan if c["beta"] is None else c["beta"] for c in conds])
    arrays["dtype"] = np.array([c["dtype"] for c in conds])
    fits = onset_fits(conds, per_seed, cfg["width"])
    atomic_savez(os.path.join(out, "onset.npz"), **arrays)
    clean = lambda v: _num(v) if isinstance(v, (float, np.floating)) else v  # NaN: null
    report = {"conditions": conds, "per_condition": [],
              "fits": [{k: clean(v) for k, v in fit.items()} for fit in fits]}  # fmt: skip
    for i, c in enumerate(conds):
        row = {"condition": condition_name(c)}
        for f in SUMMARY_FIELDS:
            row[f] = [_num(arrays[f][i]), _num(arrays[f"{f}_lo"][i]), _num(arrays[f"{f}_hi"][i])]
        mine = arrays["episode_condition"] == i
        row["cascades"] = int(mine.sum())
        entries = arrays["episode_entry_lambda"][mine]  # heavy-tailed: its median too
        row["entry_lambda_median"] = _num(np.median(entries)) if len(entries) else None
        row["cascades_with_spectra"] = int(
            np.isfinite(arrays["episode_onset_lam_dense"][mine]).sum()
        )
        row["cascades_entered_below_2_over_eta"] = int(below[i].sum())
        seen = arrays["episode_seen_before_onset"][arrays["episode_condition"] == i]
        row["cascades_seen_before_onset"] = int(np.nansum(seen))
        censored = arrays["episode_seen_censored"][arrays["episode_condition"] == i]
        row["cascades_seen_censored"] = int(np.nansum(censored))
        row["warm_lanczos_replaced"] = int(replaced[i].sum())
        row["forcing_vs_flips"] = _rank_correlation(
            arrays["episode_flips_level"][arrays["episode_condition"] == i],
            arrays["episode_forcing_high"][arrays["episode_condition"] == i],
        )
        report["per_condition"].append(row)
    write_json(os.path.join(out, "onset.json"), json.loads(json.dumps(report, default=_num)))
    png = os.path.join(out, "onset.png")
    plots.plot_onset(arrays, cfg, png, spiral_params(cfg["width"]))
    _zoom(out, conds, seeds[0], done)
    print_onset(arrays, conds, fits)
    print(f"wrote {out}/onset.npz, onset.json and the figures {png}, onset_zoom.png")
    return arrays


def _zoom(out, conds, seed, done):
    """onset_zoom.png: cascade ZOOM_CASCADE of ``seed`` in each of ZOOM_CONDITIONS present (or the
    first condition), step by step."""
    picks = [i for z in ZOOM_CONDITIONS for i, c in enumerate(conds) if z.items() <= c.items()]
    panels = []
    for i in picks or [0]:
        c = conds[i]
        u = done[f"{condition_name(c)}_s{seed:05d}"]
        rows, _ = _analyze(u, c)
        if not len(rows["entry_step"]):
            continue
        k = min(ZOOM_CASCADE, len(rows["entry_step"]) - 1)
        panels.append((u, c["lr"], int(rows["entry_step"][k]), int(rows["onset_step"][k]),
                       f"{condition_name(c)}, seed {seed}, cascade {k}"))  # fmt: skip
    if panels:
        plots.plot_onset_zoom(panels, os.path.join(out, "onset_zoom.png"))


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


Q = (50 * (1 - statistics.CONFIDENCE), 50 * (1 + statistics.CONFIDENCE))  # interval percentiles


def _bootstrap(fit, x, y, rng):
    """fit(x, y) on the seeds (columns of x, y (C, S)) and on BOOTSTRAP_SAMPLES resamplings of
    them: (the estimate, lo, hi) of its first value, and the whole estimate."""
    est = fit(x, y)
    draws = []
    for _ in range(statistics.BOOTSTRAP_SAMPLES):
        cols = rng.integers(0, x.shape[1], x.shape[1])
        draws.append(fit(x[:, cols], y[:, cols])[0])
    draws = np.array(draws, dtype=np.float64)
    ok = np.isfinite(draws)
    lo, hi = np.percentile(draws[ok], Q) if ok.sum() > 1 else (np.nan, np.nan)
    return est, lo, hi


def _line(x, y):
    """Least squares y = b x + a over the finite pairs of x, y (C, S): (b, a, pairs)."""
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < stability.MIN_FIT_POINTS or np.ptp(x[ok]) == 0:
        return np.nan, np.nan, int(ok.sum())
    b, a = np.polyfit(x[ok], y[ok], 1)
    return b, a, int(ok.sum())


def _power_law(x, y):
    """y = k x^alpha by least squares in y itself (so an excess <= 0 is kept, not dropped) over
    the finite pairs of x > 0, y (C, S): (alpha, k, pairs); NaNs where it does not converge."""
    from scipy.optimize import curve_fit

    ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
    n = int(ok.sum())
    if n < stability.MIN_FIT_POINTS or np.ptp(x[ok]) == 0:
        return np.nan, np.nan, n
    scale = np.median(x[ok])
    law = lambda v, k, alpha: k * (v / scale) ** alpha
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (k, alpha), _ = curve_fit(law, x[ok], y[ok], p0=(max(np.mean(y[ok]), 1e-3), 0.5))
    except (RuntimeError, ValueError):
        return np.nan, np.nan, n
    return alpha, k * scale**-alpha, n


def _rank_correlation(x, y):
    """Spearman's rank correlation of x and y over the cascades where both are finite, as
    [rho, two-sided p, n] (rho and p None below MIN_CORRELATED cascades or where x or y is
    constant): does the forcing follow the chattering from cascade to cascade?"""
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < MIN_CORRELATED or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return [None, None, n]
    rho, p = scipy.stats.spearmanr(x[ok], y[ok])
    return [float(rho), float(p), n]


def onset_fits(conds, per_seed, width):
    """The fits across conditions (docs/onset.md, "Fits"), each a dict with its family, what is
    fitted, the estimate with a bootstrap interval over seeds, and the runs it uses:

    - seed levels (conditions differing in the perturbation only): the e-folds from the onset to
      the mode's being seen against ln of the perturbation's share along one direction,
      epsilon / sqrt(P); the entry-exit relation predicts slope -1;
    - ramps (differing in T0 only): seen_excess, entry_excess and threshold - 2/eta =
      k rho^alpha over every run (excesses <= 0 kept); the slow passage predicts alpha = 1/2;
    - learning rates (differing in eta only, at least 3): threshold, threshold_scaled,
      threshold_entries, threshold_scaled_entries, entry_lambda ~ eta^x; 2/eta has x = -1.

    A fit with no usable run is kept, with NaN estimates and ``runs`` 0, and says why. There is
    no fit across activations: ReLU and the softplus networks form two clusters (tens of units
    changing sign per step against none; a forcing of 1e-3 against the estimator's floor), and
    a line through two clusters measures no dose-response (docs/onset.md).

    Each fit draws its resamplings from its own generator, so its interval does not depend on
    which other conditions the folder holds."""
    fits = []
    P = spiral_params(width)
    rng = lambda: np.random.default_rng(statistics.BOOTSTRAP_SEED)
    for label, members in families(conds, "noise").items():
        eps = np.array([conds[i]["noise"] for i in members])
        if (eps > 0).sum() < 2:
            continue
        sel = [m for m, e in zip(members, eps, strict=True) if e > 0]
        x = np.log(np.array([conds[i]["noise"] for i in sel]) / np.sqrt(P))[:, None]
        x = np.broadcast_to(x, (len(sel), per_seed["efolds_seen"].shape[1])).copy()
        (b, a, n), lo, hi = _bootstrap(_line, x, per_seed["efolds_seen"][sel], rng())
        fit = dict(family=label, fit="efolds_seen = slope ln(eps / sqrt(P)) + c", slope=b,
                   slope_lo=lo, slope_hi=hi, intercept=a, runs=n, law="slope -1")  # fmt: skip
        if n == 0:
            fit["why"] = NO_GROWTH_RUNS
        fits.append(fit)
    for label, members in families(conds, "T0").items():
        if len(members) < 2:
            continue
        gd = stability.gd_threshold(np.array([conds[i]["lr"] for i in members]))[:, None]
        for f, excess, ramp in (  # the seen excess with the ramp of the same cascades
            ("seen_excess", per_seed["seen_excess"][members], per_seed["seen_ramp"][members]),
            ("entry_excess", per_seed["entry_excess"][members], per_seed["ramp"][members]),
            ("threshold - 2/lr", per_seed["threshold"][members] - gd, per_seed["ramp"][members]),
        ):  # (C, S) each
            (alpha, k, n), lo, hi = _bootstrap(_power_law, ramp, excess, rng())
            fits.append(dict(family=label, fit=f"{f} = k ramp^alpha", alpha=alpha,
                             alpha_lo=lo, alpha_hi=hi, k=k, runs=n,
                             law="alpha 1/2"))  # fmt: skip
    for label, members in families(conds, "lr").items():
        lrs = np.array([conds[i]["lr"] for i in members])
        if len(members) < stability.MIN_FIT_POINTS:
            continue
        for f in ("threshold", "threshold_scaled", "threshold_entries",
                  "threshold_scaled_entries", "entry_lambda"):  # fmt: skip
            (x, err, _), draws = statistics.bootstrap_exponent(lrs, per_seed[f][members].T, rng())
            lo, hi = np.nanpercentile(draws, Q) if np.isfinite(draws).any() else (np.nan,) * 2
            n = int(np.isfinite(per_seed[f][members]).sum())
            fits.append(dict(family=label, fit=f"{f} ~ lr^x", x=x, x_stderr=err, x_lo=lo,
                             x_hi=hi, runs=n, law="x -1"))  # fmt: skip
    return fits


def print_onset(arrays, conds, fits):
    """One line per condition: the thresholds, the entries, the onset, the mode (forcing,
    where it is seen, the e-folds), the chattering, the NTK side; then the fits."""
    c95 = f"{statistics.CONFIDENCE:.0%}"

    def show(f, i, fmt=".3f"):
        ci = statistics.interval(arrays[f + "_lo"][i], arrays[f + "_hi"][i], fmt)
        return f"{arrays[f][i]:{fmt}} {ci}"

    print(f"means over seeds [{c95} t intervals] of each run's mean over its cascades")
    for i, c in enumerate(conds):
        print(
            f"{condition_name(c)}: threshold (stride {RULE_STRIDE}) {show('threshold', i)}, "
            f"stride 5 {show('threshold_5', i)}, first starts {show('threshold_entries', i)}, "
            f"other starts {show('threshold_restarts', i)}, ends {show('threshold_ends', i)}, "
            f"scale-free {show('threshold_scaled', i)}; entry at lambda "
            f"{show('entry_lambda', i)}; mode seen (c >= {MODE_SEEN:g}) at lambda "
            f"{show('seen_lambda', i)} (censored: already there when tracked, share "
            f"{show('seen_censored', i, '.2f')}), {show('efolds_seen', i, '.1f')} e-folds after "
            f"the onset "
            f"(implied log10 floor {show('seed_implied', i, '.1f')}); growth per step "
            f"{show('growth_measured', i, '.3f')} vs the linear map's "
            f"{show('growth_linear', i, '.3f')}; log10 forcing at eta lambda 1.2-1.5 "
            f"{show('forcing_low', i, '.2f')}, 1.5-1.9 {show('forcing_high', i, '.2f')}; at 1.5: "
            f"flips/step {show('flips_level', i, '.0f')}, back {show('flipback_level', i, '.2f')}"
            f", cos {show('cos_level', i, '.2f')}; measured in cascades "
            f"{show('coverage', i, '.3f')}"
        )
    for fit in fits:
        values = ", ".join(f"{k} {v:.4g}" for k, v in fit.items() if isinstance(v, float))
        why = f"; {fit['why']}" if "why" in fit else ""
        print(f"{fit['family']}: {fit['fit']}: {values}; runs {fit['runs']} ({fit['law']}){why}")
