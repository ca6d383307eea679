"""Statistics over seeds: means with t intervals, paired differences to the static loss, Welch
intervals, the bootstrap of a fitted exponent, and the phase-diagram summary and table.
"""

from __future__ import annotations

import warnings

import numpy as np

import stability

PAIRED_FIELDS = ("train_acc", "val_acc")  # compared with the static loss (A = 1) seed by seed
CONFIDENCE = 0.95  # of every interval
BOOTSTRAP_SAMPLES = 2000  # resamplings of the seeds for an exponent's interval
BOOTSTRAP_SEED = 0


def interval(lo, hi, spec=".3f", sep=", "):
    """ "[lo, hi]" formatted with ``spec``, or "[no interval: one value]" where it is undefined
    (fewer than two finite values)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "[no interval: one value]"
    return f"[{lo:{spec}}{sep}{hi:{spec}}]"


def summarize(arrays, fields, A, T, seeds, diverged_field):
    """Grid, per-cell diverged counts, the mean and std over seeds of each field, (n_T, n_A), and,
    when A = 1 is in the grid, the paired differences to it of PAIRED_FIELDS
    (:func:`paired_differences`).

    Diverged runs hold NaN and are left out of the means; a cell whose runs all diverged is NaN.
    """
    summary = {
        "A": np.array(A, dtype=float),
        "T": np.array(T, dtype=float),
        "seeds": np.array(seeds),
        "diverged": (arrays[diverged_field] >= 0).sum(axis=2),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of an all-NaN cell: NaN
        for f in fields:
            summary[f + "_mean"] = np.nanmean(arrays[f], axis=2)
            summary[f + "_std"] = np.nanstd(arrays[f], axis=2)
        if 1.0 in A:
            for f in PAIRED_FIELDS:
                mean, lo, hi, n = paired_differences(arrays[f], list(A).index(1.0))
                summary.update({f"{f}_diff_mean": mean, f"{f}_diff_lo": lo, f"{f}_diff_hi": hi})
                summary[f"{f}_diff_n"] = n
    return summary


def mean_interval(values, confidence=CONFIDENCE):
    """The mean over the last axis (NaN left out) and its t interval mean +- t_{n-1} sd / sqrt(n)
    at ``confidence``, over the n finite values (NaN where n < 2). values : (..., S).
    Returns mean, lo, hi (...) float and n (...) int."""
    from scipy.stats import t as student_t

    values = np.asarray(values, dtype=np.float64)
    n = np.isfinite(values).sum(axis=-1)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # fewer than 2 values: NaN
        mean = np.nanmean(values, axis=-1)
        half = student_t.ppf(0.5 + confidence / 2, n - 1) * np.nanstd(values, axis=-1, ddof=1)
    half = np.where(n >= 2, half / np.sqrt(np.maximum(n, 1)), np.nan)
    return mean, mean - half, mean + half, n


def welch_difference(a, b, confidence=CONFIDENCE):
    """mean(b) - mean(a) of two independent samples over their last axis (NaN left out) and its
    Welch t interval: diff +- t_nu sqrt(va/na + vb/nb), nu from the Welch-Satterthwaite formula.
    a : (..., Sa), b : (..., Sb).  Returns diff, lo, hi (...) float (NaN where a side has < 2)."""
    from scipy.stats import t as student_t

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = np.isfinite(a).sum(axis=-1), np.isfinite(b).sum(axis=-1)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # fewer than 2 values: NaN
        ea = np.nanvar(a, axis=-1, ddof=1) / na  # squared standard errors of the two means
        eb = np.nanvar(b, axis=-1, ddof=1) / nb
        nu = (ea + eb) ** 2 / (ea**2 / (na - 1) + eb**2 / (nb - 1))
        diff = np.nanmean(b, axis=-1) - np.nanmean(a, axis=-1)
        half = student_t.ppf(0.5 + confidence / 2, nu) * np.sqrt(ea + eb)
    half = np.where((na >= 2) & (nb >= 2), half, np.nan)
    return diff, diff - half, diff + half


def paired_differences(values, static_index, confidence=CONFIDENCE):
    """The difference of every cell to the static cell (A = 1) of its row, seed by seed.

    values : (n_T, n_A, n_seeds), seed s the same initial network in every cell of a row;
    static_index : the A index of A = 1. For each cell, d_s = values[., ., s] - values[., static,
    s] over the seeds where both are finite: the mean of d and its paired t interval
    (:func:`mean_interval`). Returns mean, lo, hi (n_T, n_A) float and n (n_T, n_A) int.
    """
    d = values - values[:, static_index : static_index + 1, :]  # (n_T, n_A, n_seeds)
    return mean_interval(d, confidence)


def print_table(summary, digits=2):
    """Mean final training / validation accuracy per cell, one row per T; a cell with diverged
    runs (left out of its means) is marked ``!k``, k the number of diverged runs."""
    A, div = summary["A"], summary["diverged"]
    print("mean train / val accuracy; rows T, columns A = " + " ".join(f"{a:g}" for a in A))
    for ti, T in enumerate(summary["T"]):
        cells = []
        for ai in range(len(A)):
            cell = (
                f"{summary['train_acc_mean'][ti, ai]:.{digits}f}/"
                f"{summary['val_acc_mean'][ti, ai]:.{digits}f}"
            )
            cells.append(cell + (f"!{div[ti, ai]}" if div[ti, ai] else ""))
        print(f"T={T:>6g}: {' '.join(cells)}")
    if div.any():
        print(
            f"!k: k runs of that cell diverged and are left out of its means ({div.sum()} in all)"
        )
    if "val_acc_diff_mean" in summary:
        print(
            f"val acc minus val acc at A = 1, seed by seed: mean [{CONFIDENCE:.0%} paired t "
            "interval]; * where the interval excludes 0"
        )
        for ti, T in enumerate(summary["T"]):
            cells = []
            for ai in range(len(A)):
                m, lo, hi = (summary[f"val_acc_diff_{k}"][ti, ai] for k in ("mean", "lo", "hi"))
                mark = "*" if lo > 0 or hi < 0 else " "
                cells.append(
                    f"{m:+.{digits + 1}f} {interval(lo, hi, f'+.{digits + 1}f', ',')}{mark}"
                )
            print(f"T={T:>6g}: {' '.join(cells)}")


def bootstrap_exponent(lrs, thresholds, rng, samples=BOOTSTRAP_SAMPLES):
    """The exponent x of threshold ~ eta^x fitted to the points of all seeds together, and its
    fits on ``samples`` resamplings of the seeds (with replacement).

    thresholds : (S, L) one row per seed.  Returns (x, its least-squares standard error,
    intercept), and the resampled exponents (samples,)."""
    fit = stability.fit_exponent(lrs, thresholds)
    S = len(thresholds)
    draws = np.array(
        [stability.fit_exponent(lrs, thresholds[rng.integers(0, S, S)])[0] for _ in range(samples)]
    )
    return fit, draws
