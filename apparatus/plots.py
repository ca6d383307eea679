"""Every figure of the project, drawn with matplotlib from the arrays the commands save.

plot_spiral_run      Fig. 4 (a)-(d) for one spiral run: Gamma_i(t), F(t), F(t) - F(t-1), accuracies
plot_dynamics        Fig. 4: the same with the Hessian and NTK lambda_max, and a zoomed cascade
plot_threshold       Fig. 5: the Hessian threshold against the learning rate; static runs
plot_phase           Figs. 1 and 3: mean training and validation accuracy over (T, A)
plot_cifar_run       one Myrtle5 run of the Fig. 1 protocol against epoch
plot_density         the Hessian's spectral density (stochastic Lanczos quadrature) at chosen steps
plot_onset           where the instabilities begin: entry-exit, the kinks, the forcing, eta, T
plot_rule            the Fig. 4 rule as a detector: its threshold against the jump and the stride
plot_onset_zoom      cascades entered step by step: lambda_max, the period-two mode, the kinks
"""

from __future__ import annotations

import os
import tempfile

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from apparatus.statistics import CONFIDENCE  # noqa: E402
from apparatus.tracker import SPECTRA_FIELDS, zoom_window  # noqa: E402
from dynloss import class_weights  # noqa: E402
from protocol import lr_schedule  # noqa: E402
from stability import gd_threshold  # noqa: E402

FIGURE_DPI = 80  # every figure's resolution: small files for the repository
PLOT_MAX_POINTS = 20000  # points per curve of Gamma(t) in a CIFAR run figure
SEED_JITTER = 0.04  # log-spread of one (width, lr)'s seed points, so they do not overlap
WIDTH_SHIFT = 0.06  # log-offset between the widths' points at one learning rate
FLAT_RANGE = 1e-3  # a colour scale narrower than this is widened to this width
GRID_MARGIN = 1.15  # log-margin around the (T, A) grid of a phase panel
CELL_MARGIN = 1.3  # the same for the panel of paired differences (bigger markers)
DENSITY_FLOOR = 1e-12  # spectral densities below this are not drawn (log axis)
DENSITY_BOTTOM = 1e-6  # the density axis starts here: the bulk and the outliers, not the tails
SYMLOG_LINEAR = 1e-2  # eigenvalues within +- this are drawn on a linear scale (symlog axis)


def _save(fig, path, dpi=FIGURE_DPI):
    """Lay the figure out, write it whole to a temporary file beside ``path`` (PNG), rename it
    into place (a stop mid-drawing leaves the previous figure, never half of one), free it."""
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def plot_spiral_run(arrays, path, title):
    """Fig. 4 (a)-(d): Gamma_i(t), F(t), F(t) - F(t-1), training and validation accuracy."""
    step = arrays["step"]
    first = lambda a: a if a.ndim == 1 else a[:, 0]
    fig, ax = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    gamma = arrays["gamma"] if arrays["gamma"].ndim == 2 else arrays["gamma"][:, 0]
    for i in range(gamma.shape[1]):
        ax[0].plot(step, gamma[:, i], lw=1, label=f"class {i}")
    ax[0].set_ylabel(r"$\Gamma_i(t)$")
    ax[0].legend(loc="upper right", fontsize=7, ncol=3)
    ax[1].plot(step, first(arrays["loss"]), lw=0.8)
    ax[1].set_ylabel(r"$\mathcal{F}(t)$")
    ax[1].set_yscale("log")
    ax[2].plot(step, first(arrays["dloss"]), lw=0.5)
    ax[2].set_ylabel(r"$\mathcal{F}(t)-\mathcal{F}(t-1)$")
    ax[3].plot(step, arrays["train_acc"], lw=0.8, color="C0", label="training")
    val = arrays["val_acc"]
    seen = np.isfinite(val) if val.ndim == 1 else np.isfinite(val).any(axis=1)  # the rows evaluated
    ax[3].plot(step[seen], val[seen], lw=0.8, color="C1", label="validation")
    ax[3].set_ylabel("accuracy")
    ax[3].set_ylim(0, 1.02)
    ax[3].set_xlabel("step t")
    h, lab = ax[3].get_legend_handles_labels()
    ax[3].legend(h[:1] + h[-1:], lab[:1] + lab[-1:], loc="lower right", fontsize=8)
    for a, letter in zip(ax, "abcd", strict=False):
        a.text(0.01, 0.85, f"({letter})", transform=a.transAxes)
    fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi=90)


def plot_dynamics(arrays, info, path, title):
    """Fig. 4: (a) Gamma, (b) F, (c) F(t) - F(t-1), (d) accuracies, (e) Hessian lambda_max with
    the threshold, (f) NTK lambda_max with the eq. (14) bound; (g)-(l) the same zoomed.

    arrays : one run (spiral_sweeps.run_arrays; ``step`` (S,), ``hess_step`` (R,),
    ``hess_lmax`` (R,), ``ntk_lmax`` (R,)); info : stability.analyze's dict; path : the PNG
    to write."""
    step = arrays["step"]
    t0, t1 = zoom_window(info, step, arrays["T"])
    fig, ax = plt.subplots(6, 2, figsize=(13, 13), sharex="col")
    for col, (lo, hi) in enumerate(((step[0], step[-1]), (t0, t1))):
        sel = (step >= lo) & (step <= hi)
        pre = "zoom_" if col == 1 and "zoom_hess_step" in arrays else ""
        sp = {k: arrays[pre + k] for k in SPECTRA_FIELDS}
        hs = (sp["hess_step"] >= lo) & (sp["hess_step"] <= hi)
        ns = (sp["ntk_step"] >= lo) & (sp["ntk_step"] <= hi)
        a = ax[:, col]
        for i in range(arrays["gamma"].shape[1]):
            a[0].plot(step[sel], arrays["gamma"][sel, i], lw=1)
        a[1].plot(step[sel], arrays["loss"][sel], lw=0.6)
        a[1].set_yscale("log")
        a[2].plot(step[sel], arrays["dloss"][sel], lw=0.4)
        a[3].plot(step[sel], arrays["train_acc"][sel], lw=0.6, label="training")
        val = sel & np.isfinite(arrays["val_acc"])  # the steps where the validation set was used
        a[3].plot(step[val], arrays["val_acc"][val], lw=0.6, label="validation")
        a[4].plot(sp["hess_step"][hs], sp["hess_lmax"][hs], lw=0.6, color="k")
        if np.isfinite(info["threshold"]):
            a[4].axhline(info["threshold"], ls="--", color="C3", lw=1, label="threshold")
        a[4].axhline(info["gd_bound"], ls=":", color="C7", lw=1, label=r"$2/\eta$")
        a[5].plot(sp["ntk_step"][ns], sp["ntk_lmax"][ns], lw=0.6, label="full (NK x NK)")
        a[5].plot(sp["ntk_step"][ns], sp["ntk_traced_lmax"][ns], lw=0.6, label="traced (N x N)")
        a[5].axhline(info["ntk_bound"], ls=":", color="C7", lw=1, label=r"$2N/\eta$ (eq. 14)")
        a[5].set_xlabel("step t")
        for s0, color in (("thr_start", "g"), ("thr_end", "r")):
            for t in info[s0]:
                if lo <= t <= hi:
                    for row in a[1:]:
                        row.axvline(t, ls="--", color=color, lw=0.5, alpha=0.6)
        letters = "abcdef" if col == 0 else "ghijkl"
        for row, letter in zip(a, letters, strict=True):
            row.text(0.01, 0.85, f"({letter})", transform=row.transAxes)
    labels = (
        r"$\Gamma_i(t)$",
        r"$\mathcal{F}(t)$",
        r"$\mathcal{F}(t)-\mathcal{F}(t-1)$",
        "accuracy",
        r"Hessian $\lambda_{max}$",
        r"NTK $\lambda_{max}$",
    )
    for row, label in zip(ax[:, 0], labels, strict=True):
        row.set_ylabel(label)
    ax[3, 0].legend(fontsize=7, loc="lower right")
    ax[4, 0].legend(fontsize=7, loc="upper right")
    ax[5, 0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    _save(fig, path, dpi=70)


def plot_threshold(arrays, cfg, path):
    """Fig. 5: (a) the threshold against eta (log-log): every seed's point, the mean with its
    interval, the fit of all seeds' points with the bootstrap interval of its exponent; (b, c)
    the static runs of each width, every seed, against the threshold at the lr nearest 1."""
    widths, lrs, thr = arrays["widths"], arrays["lrs"], arrays["threshold"]  # (W, L, S)
    S = thr.shape[2]
    fig, ax = plt.subplots(1, 1 + len(widths), figsize=(5 + 4.5 * len(widths), 4))
    grid = np.geomspace(lrs.min(), lrs.max(), 50)
    jitter = np.exp(SEED_JITTER * (np.arange(S) - (S - 1) / 2) / max(S, 1))  # seeds apart
    for i, w in enumerate(widths):
        color = f"C{i}"
        shift = 1.0 + WIDTH_SHIFT * (i - (len(widths) - 1) / 2)  # the widths side by side
        ax[0].plot(np.outer(lrs * shift, jitter), thr[i], ".", color=color, ms=3, alpha=0.5)
        mean, lo, hi = (arrays[f"threshold_{k}"][i] for k in ("mean", "lo", "hi"))
        err = np.array([mean - lo, hi - mean])
        ax[0].errorbar(lrs * shift, mean, yerr=err, fmt="o", color=color, ms=5, capsize=3)
        slope, icpt = arrays[f"slope_{w}"], arrays[f"icpt_{w}"]
        if np.isfinite(slope):
            label = (
                f"width {w}: exponent {slope:.2f} "
                f"[{arrays[f'slope_{w}_lo']:.2f}, {arrays[f'slope_{w}_hi']:.2f}]"
            )
            ax[0].plot(grid, np.exp(icpt) * grid**slope, "-", color=color, lw=0.8, label=label)
    ax[0].plot(grid, gd_threshold(grid), ":", color="C7", label=r"$2/\eta$")
    ax[0].set_xscale("log")
    ax[0].set_yscale("log")
    ax[0].set_xticks(lrs, [f"{v:g}" for v in lrs])
    ax[0].minorticks_off()
    ax[0].set_xlabel(r"learning rate $\eta$")
    ax[0].set_ylabel(r"Hessian $\lambda_{max}$ threshold")
    ax[0].legend(fontsize=7)
    ax[0].set_title(f"(a) {S} seeds per point; mean and {CONFIDENCE:.0%} interval")
    at1 = np.nanmean(thr[:, np.argmin(np.abs(np.log(lrs)))])  # threshold at the lr nearest 1
    for i, w in enumerate(widths):
        a = ax[1 + i]
        step, lmax = arrays[f"static_w{w}_hess_step"], arrays[f"static_w{w}_hess_lmax"]
        for s in range(len(lmax)):
            a.plot(step, lmax[s], lw=0.4, color="k", alpha=0.6 if s == 0 else 0.25)
        if np.isfinite(at1):
            a.axhline(at1, ls="--", color="C3", label="threshold from (a)")
        a.set_yscale("log")
        a.set_xlabel("step t")
        acc = arrays[f"static_w{w}_train_acc"]
        a.set_title(
            f"({'bc'[i] if i < 2 else i}) static loss (A = 1), lr 1, width {w}, "
            f"train acc {np.nanmin(acc):.2f}-{np.nanmax(acc):.2f}",
            fontsize=9,
        )
        a.legend(fontsize=7)
    fig.suptitle(
        f"Fig. 5: A = {cfg['A']:g}, T = {cfg['T0']:g}/eta, {cfg['steps0']}/eta steps, "
        f"Hessian every {cfg['hess_every']} steps",
        fontsize=10,
    )
    _save(fig, path)


def plot_phase(summary, path, title, t_label):
    """Contour maps of mean training (a) and validation (b) accuracy over (T, A), log axes, and,
    when the summary has them (A = 1 in the grid), (c) the paired difference of validation
    accuracy to A = 1, cell by cell, a black ring where its interval excludes 0.

    Colour levels span each panel's own range, so small gains (Fig. 1) stay visible; the grid
    points are marked and the A = 1 row (the static loss) lies inside the frame.

    summary : sweep.summarize's dict: ``T`` (b,), ``A`` (a,), ``<field>_mean`` (b, a) and, when
    paired, ``val_acc_diff_{mean,lo,hi}`` (b, a); t_label : the T axis' label.
    """
    T, A = summary["T"], summary["A"]
    paired = "val_acc_diff_mean" in summary
    fig, axes = plt.subplots(1, 3 if paired else 2, figsize=(15 if paired else 10, 4), sharey=True)
    panels = (("train_acc", "(a) training"), ("val_acc", "(b) validation"))
    if paired:
        _plot_paired(axes[2], summary, t_label)
    for ax, (f, label) in zip(axes, panels, strict=False):
        Z = summary[f + "_mean"].T  # (a, b): rows A, columns T
        lo, hi = (np.nanmin(Z), np.nanmax(Z)) if np.isfinite(Z).any() else (0.0, 1.0)
        if hi - lo < FLAT_RANGE:
            lo, hi = lo - FLAT_RANGE / 2, hi + FLAT_RANGE / 2
        if len(T) > 1 and len(A) > 1:
            cs = ax.contourf(T, A, Z, levels=np.linspace(lo, hi, 15), cmap="viridis")
        else:
            cs = ax.scatter(
                np.tile(T, len(A)),
                np.repeat(A, len(T)),
                c=Z.ravel(),
                s=200,
                vmin=lo,
                vmax=hi,
                cmap="viridis",
            )
        ax.plot(*np.meshgrid(T, A), "k.", ms=3, clip_on=False)  # the grid points
        _grid_axes(ax, T, A, GRID_MARGIN, t_label)
        ax.set_title(f"{label} accuracy")
        fig.colorbar(cs, ax=ax, format="%.3f")
    axes[0].set_ylabel("amplitude A (A = 1: static loss)")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def _grid_axes(ax, T, A, margin, t_label):
    """Log axes over the (T, A) grid, ticks at its values, ``margin`` (a factor) around it."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(A.min() / margin, A.max() * margin)
    ax.set_xlim(T.min() / margin, T.max() * margin)
    ax.set_xticks(T, [f"{t:g}" for t in T], minor=False, fontsize=7)
    ax.set_yticks(A, [f"{a:g}" for a in A], minor=False, fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel(t_label)


def _plot_paired(ax, summary, t_label):
    """Panel (c) of plot_phase: val_acc_diff_mean per cell, rings where 0 is outside the
    interval [val_acc_diff_lo, val_acc_diff_hi]."""
    T, A = summary["T"], summary["A"]
    D = summary["val_acc_diff_mean"]  # (b, a)
    lo, hi = summary["val_acc_diff_lo"], summary["val_acc_diff_hi"]
    tt, aa = np.meshgrid(T, A, indexing="ij")  # (b, a)
    span = np.nanmax(np.abs(D)) if np.isfinite(D).any() else 1.0
    cs = ax.scatter(tt, aa, c=D, s=260, marker="s", cmap="RdBu", vmin=-span, vmax=span)
    sure = (lo > 0) | (hi < 0)
    ax.scatter(tt[sure], aa[sure], s=420, marker="o", facecolors="none", edgecolors="k", lw=1.2)
    _grid_axes(ax, T, A, CELL_MARGIN, t_label)
    ax.set_title("(c) validation accuracy minus A = 1 (paired)", fontsize=9)
    fig = ax.get_figure()
    fig.colorbar(cs, ax=ax, format="%+.3f")


def plot_cifar_run(arrays, settings, path, title):
    """Gamma_i(t) (every step), learning rate, losses, accuracies (and lambda_max) vs epoch.

    arrays : cifar_runs.run_arrays (``epoch`` (E+1,), ``gamma`` (E+1, K), history (E+1,));
    settings : the run's settings (A, T, schedule)."""
    spe = int(arrays["steps_per_epoch"])
    epoch = arrays["epoch"]
    E = int(epoch[-1])
    K = arrays["gamma"].shape[1]
    stride = max(1, E * spe // PLOT_MAX_POINTS)
    steps = np.arange(0, E * spe, stride)
    gam = class_weights(steps, settings["A"], settings["T"], K, int(arrays["stop_step"]))
    has_hess = np.isfinite(arrays["hess_top"]).any()
    n = 5 if has_hess else 4
    fig, ax = plt.subplots(n, 1, figsize=(8, 2.1 * n + 0.6), sharex=True)
    for i in range(K):
        ax[0].plot(steps / spe, gam[:, i], lw=0.4, rasterized=True)
    ax[0].set_ylabel(r"$\Gamma_i(t)$")
    ax[1].plot(
        steps / spe,
        lr_schedule(steps, spe, settings),
        color="k",
        lw=1,
    )
    ax[1].set_ylabel("learning rate")
    ok = np.isfinite(arrays["train_loss"])
    ax[2].plot(epoch[ok], arrays["train_loss"][ok], ".-", ms=3, label="train (dynamical)")
    ax[2].plot(epoch[ok], arrays["train_loss_static"][ok], ".-", ms=3, label="train (static)")
    ax[2].plot(epoch, arrays["test_loss"], ".-", ms=3, label="test")
    ax[2].set_yscale("log")
    ax[2].set_ylabel("loss")
    ax[2].legend(fontsize=7, loc="upper right")
    ax[3].plot(epoch[ok], arrays["train_acc"][ok], ".-", ms=3, label="training")
    ax[3].plot(epoch, arrays["test_acc"], ".-", ms=3, label="test")
    ax[3].axhline(1.0 / K, color="grey", lw=0.5, ls=":")
    ax[3].set_ylim(0, 1.02)
    ax[3].set_ylabel("accuracy")
    ax[3].legend(fontsize=7, loc="lower right")
    if has_hess:
        ok = np.isfinite(arrays["hess_top"])
        ax[4].plot(epoch[ok], arrays["hess_top"][ok], "o-", ms=3)
        ax[4].set_ylabel(r"$\lambda_{max}$ (Hessian)")
    for a, letter in zip(ax, "abcde", strict=False):
        a.text(0.01, 0.85, f"({letter})", transform=a.transAxes)
        a.axvline(settings["stop_epoch"], color="grey", lw=0.5, ls="--")
    ax[-1].set_xlabel("epoch")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def plot_density(arrays, path, title):
    """The Hessian's eigenvalue density at several steps of a run (stochastic Lanczos quadrature),
    on a symmetric-log eigenvalue axis and a log density axis; the legend gives each step's
    trace (Hutchinson, with its standard error) and lambda_max.

    arrays : stability.densities_along's dict: ``at`` (Q,), ``grid`` (Q, G), ``density`` (Q, G),
    ``trace``, ``trace_stderr``, ``lmax`` (Q,)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, step in enumerate(arrays["at"]):
        grid, density = arrays["grid"][i], arrays["density"][i]
        label = (
            f"t = {step}: trace {arrays['trace'][i]:.4g} ± {arrays['trace_stderr'][i]:.2g}, "
            rf"$\lambda_{{max}}$ {arrays['lmax'][i]:.4g}"
        )
        ax.plot(grid, np.maximum(density, DENSITY_FLOOR), lw=0.8, label=label)
    ax.set_xscale("symlog", linthresh=SYMLOG_LINEAR)
    ax.set_yscale("log")
    ax.set_ylim(bottom=DENSITY_BOTTOM)
    ax.set_xlabel("Hessian eigenvalue")
    ax.set_ylabel("density")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    _save(fig, path, dpi=90)


def _family_points(arrays, select, x_key, field):
    """x, mean, lo, hi of ``field`` over the conditions ``select`` (a boolean (C,)), by x_key."""
    idx = np.flatnonzero(select)
    idx = idx[np.argsort(arrays[x_key][idx])]
    return (arrays[x_key][idx], *(arrays[field + s][idx] for s in ("", "_lo", "_hi")))


def _onset_label(arrays, i):
    """A short name of condition i's kind: relu / softplus beta, dtype, noise, forcing."""
    beta = arrays["beta"][i]
    act = "ReLU" if not np.isfinite(beta) else f"softplus beta {beta:g}"
    noise = f", noise {arrays['noise'][i]:g}" if arrays["noise"][i] else ""
    force = f", forced {arrays['force'][i]:g}" if arrays["force"][i] else ""
    return f"{act}, {arrays['dtype'][i]}{noise}{force}"


def _log_ticks(ax, values):
    """A log x axis with a labelled tick at each of ``values`` and no others."""
    ax.set_xscale("log")
    ticks = np.unique(values)
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def _errorbar(ax, x, arrays, idx, field, scale=1.0, **style):
    """Means with their intervals of ``field`` at the conditions idx, drawn at x."""
    m, lo, hi = (scale * arrays[field + s][idx] for s in ("", "_lo", "_hi"))
    ax.errorbar(x, m, yerr=[m - np.where(np.isfinite(lo), lo, m), np.where(np.isfinite(hi), hi, m)
                            - m], capsize=2, **style)  # fmt: skip


def plot_onset(arrays, cfg, path, n_params):
    """Where the instabilities begin, at T0 = 5000 unless a panel varies it: (a) the e-folds of the
    linear map from eta lambda-bar = 2 to the step where the mode reaches MODE_SEEN, against the
    perturbation's size along one direction, eps / sqrt(P), with the entry-exit law's slope -1;
    (b) where the rule enters the cascades, where the mode is seen, and the onset 2, for the
    softplus beta series, ReLU and the forced smooth networks; (c) the forcing
    c (2 - eta lambda-bar) that holds the mode below the edge against the hidden units changing
    sign per step, with the forced networks' known forcing; (d) eta times the thresholds against
    eta; (e) the thresholds and the entries against T; (f) the mode's growth per step against the
    linear map's, every cascade where it grows from below 1e-8. n_params: P of one network."""
    fig, ax = plt.subplots(2, 3, figsize=(18, 9.5))
    ax = ax.ravel()
    C = len(arrays["lr"])
    at = lambda **kw: np.array([all(np.isclose(arrays[k][i], v) if not isinstance(v, str)
                                    else arrays[k][i] == v for k, v in kw.items())
                                for i in range(C)])  # fmt: skip
    base = at(T0=5000.0, lr=1.0) & (arrays["force"] == 0)
    relu = ~np.isfinite(arrays["beta"])
    # (a) the entry-exit relation across seed levels
    for j, (name, act) in enumerate((("ReLU", relu), ("softplus beta 20", arrays["beta"] == 20))):
        noisy = np.flatnonzero(base & act & (arrays["noise"] > 0) & at(dtype="float64"))
        if len(noisy) and np.isfinite(arrays["efolds_seen"][noisy]).any():  # ReLU: none grew
            x = np.log10(arrays["noise"][noisy] / np.sqrt(n_params))
            _errorbar(ax[0], x, arrays, noisy, "efolds_seen", fmt="o-", color=f"C{j}", label=name)
            mid = np.nanmean(arrays["efolds_seen"][noisy])
            line = mid - np.log(10) * (x - np.nanmean(x))
            ax[0].plot(x, line, ":", color=f"C{j}", lw=1, label=f"{name}: slope -1 (the law)")
        for k, dtype in enumerate(("float64", "float32")):
            i = np.flatnonzero(base & act & (arrays["noise"] == 0) & at(dtype=dtype))
            if len(i) and np.isfinite(arrays["efolds_seen"][i[0]]):
                ax[0].axhline(arrays["efolds_seen"][i[0]], color=f"C{j}", ls=("--", "-.")[k],
                              lw=0.8, label=f"{name}, {dtype}, no perturbation")  # fmt: skip
    ax[0].set_xlabel(r"log10 $\epsilon/\sqrt{P}$ (the perturbation per step along one direction)")
    ax[0].set_ylabel(r"e-folds $\sum \ln|1-\eta\bar\lambda|$ from the onset to c = 1e-4")
    ax[0].set_title("(a) entry-exit: how long the mode takes to be seen")
    # (b) entries and sightings along the beta series, ReLU at the right, forced networks apart
    series = np.flatnonzero(base & at(dtype="float64") & (arrays["noise"] == 0))
    order = sorted(series, key=lambda i: np.inf if relu[i] else arrays["beta"][i])
    xs = np.arange(len(order))
    for f, style in (
        ("entry_lambda", dict(fmt="o", color="C0", label="the rule enters")),
        ("seen_lambda", dict(fmt="s", color="C3", label="the mode reaches 1e-4")),
    ):
        _errorbar(ax[1], xs, arrays, order, f, **style)  # fmt: skip
    forced = np.flatnonzero(at(T0=5000.0, lr=1.0) & (arrays["force"] > 0))
    xf = len(order) + np.arange(len(forced))
    for f, mark in (("entry_lambda", "o"), ("seen_lambda", "s")):
        _errorbar(ax[1], xf, arrays, forced, f, fmt=mark, color="C2")
    names = [("ReLU" if relu[i] else f"beta {arrays['beta'][i]:g}") for i in order]
    names += [f"beta {arrays['beta'][i]:g}\nforced {arrays['force'][i]:g}" for i in forced]
    ax[1].set_xticks(np.r_[xs, xf], names, fontsize=7, rotation=30)
    ax[1].axhline(2.0, ls=":", color="C7", label=r"$2/\eta$")
    ax[1].set_ylabel(r"$\eta\bar\lambda$")
    ax[1].set_title("(b) softplus towards ReLU, and forced smooth networks (green)")
    # (c) the forcing against the chattering
    for i in list(order) + list(forced):
        mark = "o" if not arrays["force"][i] else "^"
        _errorbar(ax[2], [arrays["flips_level"][i]], arrays, [i], "forcing_high", fmt=mark,
                  label=_onset_label(arrays, i))  # fmt: skip
        if arrays["force"][i]:
            ax[2].axhline(np.log10(arrays["force"][i]), color="C7", lw=0.6, ls=":")
    ax[2].set_xscale("symlog", linthresh=1.0)
    ax[2].set_xlabel(r"hidden units changing sign per step at $\eta\bar\lambda$ = 1.5")
    ax[2].set_ylabel(r"log10 forcing c (2 - $\eta\bar\lambda$), $\eta\bar\lambda$ 1.5-1.9")
    ax[2].set_title("(c) the forcing the mode needs, and the kinks (dotted: forced sizes)")
    # (d) the exponent, (e) the ramp
    names = {
        "threshold": "paper's rule (stride 25)",
        "threshold_scaled": r"$\eta$|jump| >= 0.1",
        "threshold_entries": "first starts of cascades",
        "entry_lambda": "rule's entry",
    }
    for act, mark in ((relu, "o"), (arrays["beta"] == 20, "s")):
        fam = np.flatnonzero(act & at(T0=5000.0, dtype="float64") & (arrays["noise"] == 0)
                             & (arrays["force"] == 0))  # fmt: skip
        fam = fam[np.argsort(arrays["lr"][fam])]
        ram = np.flatnonzero(act & at(lr=1.0, dtype="float64") & (arrays["noise"] == 0)
                             & (arrays["force"] == 0))  # fmt: skip
        ram = ram[np.argsort(arrays["T"][ram])]
        kind = "ReLU" if mark == "o" else "softplus 20"
        for j, f in enumerate(names):
            if len(fam) > 1:
                _errorbar(ax[3], arrays["lr"][fam], arrays, fam, f, scale=arrays["lr"][fam],
                          fmt=mark + "-", color=f"C{j}", ms=4, lw=0.8,
                          label=f"{names[f]}: {kind}")  # fmt: skip
            if len(ram) > 1 and f != "threshold_scaled":
                _errorbar(ax[4], arrays["T"][ram], arrays, ram, f, fmt=mark + "-", color=f"C{j}",
                          ms=4, lw=0.8, label=f"{names[f]}: {kind}")  # fmt: skip
    for a, key in ((ax[3], "lr"), (ax[4], "T")):
        a.axhline(2.0, ls=":", color="C7", label=r"$2/\eta$")
        if len(arrays[key]):
            _log_ticks(a, arrays[key])
    ax[3].set_xlabel(r"learning rate $\eta$ (T = 5000/$\eta$)")
    ax[3].set_ylabel(r"$\eta\,\lambda$: a threshold $\propto \eta^{-1}$ is flat")
    ax[3].set_title(r"(d) the thresholds times $\eta$ against $\eta$")
    ax[4].set_xlabel("period T (steps), lr 1")
    ax[4].set_ylabel(r"Hessian $\lambda_{max}$ (branch midpoint)")
    ax[4].set_title("(e) the thresholds against the period T")
    # (f) the mode's growth above the onset against the linear map's, every cascade
    linear, measured = arrays["episode_growth_linear"], arrays["episode_growth_measured"]
    cond = arrays["episode_condition"].astype(int)
    for kind in sorted({_onset_label(arrays, i) for i in np.unique(cond)}):
        sel = np.array([_onset_label(arrays, i) == kind for i in cond], dtype=bool)
        if np.isfinite(measured[sel]).any():
            ax[5].plot(linear[sel], measured[sel], "o", ms=3, alpha=0.6, label=kind)
    ok = np.isfinite(linear) & np.isfinite(measured)
    if ok.any():
        lim = [min(0.0, linear[ok].min()), max(linear[ok].max(), measured[ok].max())]
        ax[5].plot(lim, lim, "k:", lw=0.8, label="measured = the linear map's")
    ax[5].set_xlabel(r"the linear map: mean $\ln|1 - \eta\bar\lambda|$ per step")
    ax[5].set_ylabel("measured growth of ln c per step, c from 1e-8 to 1e-4")
    ax[5].set_title("(f) the mode above the onset, every cascade")
    for a in ax:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=6)
    fig.suptitle(
        f"Onset of the instabilities: width {cfg['width']}, A = {cfg['A']:g}, "
        f"{cfg['periods']} periods, {len(arrays['seeds'])} seeds per point; means and "
        f"{CONFIDENCE:.0%} intervals over seeds",
        fontsize=10,
    )
    _save(fig, path)


def plot_onset_zoom(panels, path, before=600, after=150):
    """Cascades entered step by step, one column each, from ``before`` steps before the rule's
    entry to ``after`` steps after the later of it and the onset: (top) lambda_max at every step
    and the branch midpoint, the samples the stride-25 rule sees, 2/eta; (bottom) the period-two
    mode's amplitude c along the top eigenvector (log) and the hidden units changing sign per
    step. panels: [(a stored onset unit, lr, entry step, onset step (-1 if none), title)]."""
    fig, ax = plt.subplots(2, len(panels), figsize=(6.5 * len(panels), 6), squeeze=False)
    for col, (unit, lr, entry, onset, title) in enumerate(panels):
        lam = unit["lam"]
        t = np.arange(max(1, entry - before), min(len(lam), max(entry, onset) + after))
        mid = 0.5 * (lam[t] + lam[t - 1])
        ok = np.isfinite(lam[t])  # below eta lambda = 1.2 measured every 5th step only
        top, bottom = ax[0, col], ax[1, col]
        top.plot(t[ok], lam[t][ok], lw=0.5, color="C0", label=r"$\lambda_{max}$ (every step)")
        top.plot(t, mid, lw=1.0, color="C1", label=r"branch midpoint $\bar\lambda$")
        every = t[t % 25 == 0]
        top.plot(every, lam[every], "k.", ms=4, label="the stride-25 samples")
        top.axhline(gd_threshold(lr), ls=":", color="C7", label=r"$2/\eta$")
        bottom.semilogy(t, unit["mode"][t], lw=0.8, color="C3", label="mode amplitude c")
        twin = bottom.twinx()
        twin.plot(t, unit["flips"][t], lw=0.5, color="C2", alpha=0.6)
        twin.set_ylabel("hidden units changing sign per step", color="C2", fontsize=8)
        bottom.set_xlabel("step")
        for a in (top, bottom):
            a.axvline(entry, color="C2", lw=1, label="the rule enters the cascade")
            if onset >= 0:
                a.axvline(onset, color="C3", ls="--", lw=1, label=r"$\eta\bar\lambda$ reaches 2")
        top.legend(fontsize=7, loc="upper left")
        bottom.legend(fontsize=7, loc="upper left")
        top.set_title(title, fontsize=9)
    _save(fig, path)


def plot_rule(arrays, lr, path):
    """The Fig. 4 rule read as a detector: (a) the threshold of the Fig. 4 runs against the jump,
    one curve per stride; (b) the mean midpoint at each kind of mark (entries, restarts, inner
    ends, exits) per stride, with the marks per run; (c) the Fig. 5 exponent against the jump,
    fixed (|jump| >= j) and scale-free (eta |jump| >= j), per width."""
    fig, ax = plt.subplots(1, 3, figsize=(17, 4.6))
    jumps, strides = arrays["jumps"], arrays["strides"]
    for b, stride in enumerate(strides):
        m, lo, hi = (arrays[f"threshold_{s}"][:, b] for s in ("mean", "lo", "hi"))
        ax[0].errorbar(jumps * (1 + 0.03 * b), m, yerr=[m - lo, hi - m], fmt="o-", capsize=3,
                       label=f"stride {stride}")  # fmt: skip
    ax[0].axhline(gd_threshold(lr), ls=":", color="C7", label=r"$2/\eta$")
    _log_ticks(ax[0], jumps)
    ax[0].set_xlabel(r"the rule's jump j: $|\lambda(t) - \lambda(t - stride)| \geq j$")
    ax[0].set_ylabel(r"threshold (mean branch midpoint at the marks)")
    ax[0].set_title(f"(a) the Fig. 4 runs (lr {lr:g}): threshold against jump and stride")
    kinds = ("entries", "restarts", "inner_ends", "exits")
    for b, stride in enumerate(strides):
        x = np.arange(len(kinds)) + 0.2 * (b - 1)
        m = np.array([arrays[f"marks_{k}_mean"][b] for k in kinds])
        lo = np.array([arrays[f"marks_{k}_lo"][b] for k in kinds])
        hi = np.array([arrays[f"marks_{k}_hi"][b] for k in kinds])
        ax[1].errorbar(x, m, yerr=[m - lo, hi - m], fmt="o", capsize=3, label=f"stride {stride}")
        for xi, k in zip(x, kinds, strict=True):
            ax[1].annotate(f"{arrays[f'count_{k}'][b].mean():.0f}", (xi, hi[kinds.index(k)]),
                           fontsize=6, ha="center", va="bottom")  # fmt: skip
    ax[1].axhline(gd_threshold(lr), ls=":", color="C7")
    ax[1].set_xticks(np.arange(len(kinds)), ["cascade entries", "restarts", "inner ends", "exits"])
    ax[1].set_ylabel(r"mean branch midpoint (numbers: marks per run)")
    ax[1].set_title("(b) the marks by kind, jump 0.1")
    for w, width in enumerate(arrays["widths"]):
        for scaled in (0, 1):
            x = arrays["fig5_exponent"][w, :, scaled]
            ax[2].errorbar(jumps * (1 + 0.03 * (2 * w + scaled)), x[:, 0],
                           yerr=[x[:, 0] - x[:, 1], x[:, 2] - x[:, 0]], capsize=3,
                           fmt=("o-", "s--")[scaled], color=f"C{w}",
                           label=f"width {width}, " + (r"$\eta$|jump| $\geq$ j" if scaled
                                                       else r"|jump| $\geq$ j"))  # fmt: skip
    ax[2].axhline(-1.0, ls=":", color="C7", label=r"$2/\eta$: -1")
    ax[2].axhline(-0.9, ls="--", color="C7", lw=0.6, label="the paper: -0.9")
    _log_ticks(ax[2], jumps)
    ax[2].set_xlabel("the rule's jump j")
    ax[2].set_ylabel(r"exponent x of threshold $\propto \eta^x$ (Fig. 5 runs)")
    ax[2].set_title("(c) the Fig. 5 exponent against the jump")
    for a in ax:
        a.legend(fontsize=7)
    _save(fig, path)
