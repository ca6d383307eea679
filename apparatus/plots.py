"""Every figure of the project, drawn with matplotlib from the arrays the commands save.

plot_spiral_run      Fig. 4 (a)-(d) for one spiral run: Gamma_i(t), F(t), F(t) - F(t-1), accuracies
plot_dynamics        Fig. 4: the same with the Hessian and NTK lambda_max, and a zoomed cascade
plot_threshold       Fig. 5: the Hessian threshold against the learning rate; static runs
plot_phase           Figs. 1 and 3: mean training and validation accuracy over (T, A)
plot_cifar_run       one Myrtle5 run of the Fig. 1 protocol against epoch
plot_density         the Hessian's spectral density (stochastic Lanczos quadrature) at chosen steps
plot_onset           where the instabilities begin: thresholds against T, noise, activation, eta
plot_onset_zoom      one cascade's entry step by step: lambda_max, the period-two mode, the kinks
"""

from __future__ import annotations

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
    """Lay the figure out, write it to ``path`` (PNG) and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


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
    """A short name of condition i's kind: relu / softplus beta, dtype, noise."""
    beta = arrays["beta"][i]
    act = "ReLU" if not np.isfinite(beta) else f"softplus beta {beta:g}"
    noise = f", noise {arrays['noise'][i]:g}" if arrays["noise"][i] else ""
    return f"{act}, {arrays['dtype'][i]}{noise}"


def _log_ticks(ax, values):
    """A log x axis with a labelled tick at each of ``values`` and no others."""
    ax.set_xscale("log")
    ticks = np.unique(values)
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.xaxis.set_minor_locator(NullLocator())


def plot_onset(arrays, cfg, path):
    """Where the instabilities begin: (a) against the period T at lr 1, the paper's threshold
    (the rule at stride 25), the rule at stride 5, the rule's first starts of cascades only,
    and 2/eta; (b) the same at T0 = 5000, lr 1 for every arithmetic, noise and activation;
    (c) eta times the thresholds (and the scale-free rule's, eta |jump| >= 0.1) against the
    learning rate at T0 = 5000; (d) every cascade's measured growth
    per step of the period-two mode between eta lambda = 1.5 and 2 against the linear map's
    log|1 - eta lambda|."""
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.3))
    kinds = sorted({_onset_label(arrays, i) for i in range(len(arrays["lr"]))})
    marks = dict(zip(kinds, "os^vDP<>", strict=False))
    lr1, t5000 = np.isclose(arrays["lr"], 1.0), np.isclose(arrays["T0"], 5000.0)
    names = {
        "threshold": "paper's rule (stride 25)",
        "threshold_5": "rule at stride 5",
        "threshold_entries": "first starts of cascades",
        "threshold_scaled": r"rule with $\eta$|jump| $\geq$ 0.1",
    }
    fields = ("threshold", "threshold_5", "threshold_entries")  # panels (a), (b)
    for kind in kinds:
        same = np.array([_onset_label(arrays, i) == kind for i in range(len(arrays["lr"]))])
        style = dict(fmt=marks[kind] + "-", ms=4, lw=0.8, capsize=2,
                     alpha=1 if "ReLU, float64" == kind else 0.5)  # fmt: skip
        for j, field in enumerate(names):
            for a, sel, key in ((ax[0], same & lr1, "T"), (ax[2], same & t5000, "lr")):
                if sel.sum() < 2 or field == ("threshold_5" if a is ax[2] else "threshold_scaled"):
                    continue
                x, m, lo, hi = _family_points(arrays, sel, key, field)
                k = x if a is ax[2] else 1.0  # (c) shows eta lambda: 2/eta is flat at 2
                a.errorbar(x, k * m, yerr=[k * (m - lo), k * (hi - m)], color=f"C{j}",
                           label=f"{names[field]}: {kind}", **style)  # fmt: skip
    ax[0].axhline(2.0, ls=":", color="C7", label=r"$2/\eta$")
    _log_ticks(ax[0], arrays["T"][lr1])
    ax[0].set_xlabel("period T (steps), lr 1")
    ax[0].set_ylabel(r"Hessian $\lambda_{max}$ (branch midpoint)")
    ax[0].set_title("(a) the thresholds against T")
    idx = np.flatnonzero(lr1 & t5000)
    for j, field in enumerate(fields):
        m, lo, hi = (arrays[field + s][idx] for s in ("", "_lo", "_hi"))
        ax[1].errorbar(np.arange(len(idx)) + 0.1 * j, m, yerr=[m - lo, hi - m], fmt="o",
                       color=f"C{j}", capsize=3, label=names[field])  # fmt: skip
    ax[1].axhline(2.0, ls=":", color="C7", label=r"$2/\eta$")
    ax[1].set_xticks(np.arange(len(idx)), [_onset_label(arrays, i) for i in idx], rotation=20,
                     fontsize=7, ha="right")  # fmt: skip
    ax[1].set_xlim(-0.5, max(len(idx), 2) - 0.5)
    ax[1].set_title("(b) arithmetic, noise, activation: T = 5000, lr 1")
    ax[2].axhline(2.0, ls=":", color="C7", label=r"$2/\eta$")
    _log_ticks(ax[2], arrays["lr"][t5000])
    ax[2].set_xlabel(r"learning rate $\eta$ (T = 5000/$\eta$)")
    ax[2].set_ylabel(r"$\eta\,\lambda_{max}$: a threshold $\propto \eta^{-1}$ is flat")
    ax[2].set_title(r"(c) the thresholds times $\eta$ against $\eta$")
    linear, measured = arrays["episode_growth_linear"], arrays["episode_growth_measured"]
    cond = arrays["episode_condition"].astype(int)
    for kind in kinds:
        sel = np.array([_onset_label(arrays, i) == kind for i in cond], dtype=bool)
        smooth = "softplus" in kind  # few points: drawn larger, on top of the ReLU cloud
        ax[3].plot(linear[sel], measured[sel], marks[kind], ms=3 if smooth else 2, alpha=0.6,
                   label=kind, zorder=3 if smooth else 2)  # fmt: skip
    ok = np.isfinite(linear)
    lo = np.nanmin(np.r_[linear[ok], -1.0])
    ax[3].plot([lo, 0], [lo, 0], "k:", lw=0.8, label="the linear map: measured = predicted")
    ax[3].axhline(0.0, color="C7", lw=0.6)
    ax[3].set_xlabel(r"linear map: mean of $\ln|1 - \eta\bar\lambda|$ per step from"
                     r" $\eta\bar\lambda$ = 1.5 to 2")  # fmt: skip
    ax[3].set_ylabel("measured growth per step of ln(period-two amplitude)")
    ax[3].set_title("(d) the period-two mode, every cascade")
    for a in ax:
        a.legend(fontsize=6)
    fig.suptitle(
        f"Onset of the instabilities: width {cfg['width']}, A = {cfg['A']:g}, "
        f"{cfg['periods']} periods, {len(arrays['seeds'])} seeds per point; means and "
        f"{CONFIDENCE:.0%} intervals over seeds",
        fontsize=10,
    )
    _save(fig, path)


def plot_onset_zoom(unit, lr, entry, onset, path, title, before=600, after=150):
    """One cascade's entry, step by step, from ``before`` steps before the rule's entry to
    ``after`` steps after the later of it and the onset: (top) lambda_max at every step and the
    branch midpoint, the samples the stride-25 rule sees, 2/eta; (middle) the period-two
    amplitude of the logits (log) and the hidden units that change sign per step; (bottom) the
    cosine of consecutive updates. unit: a stored onset unit (its per-step series); entry,
    onset: steps (onset -1 if none)."""
    lam = unit["lam"]
    t = np.arange(max(1, entry - before), min(len(lam), max(entry, onset) + after))
    mid = 0.5 * (lam[t] + lam[t - 1])
    ok = np.isfinite(lam[t])  # below eta lambda = 1.2 measured every 5th step only
    fig, ax = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    ax[0].plot(t[ok], lam[t][ok], lw=0.5, color="C0", label=r"$\lambda_{max}$ (every step)")
    ax[0].plot(t, mid, lw=1.0, color="C1", label=r"branch midpoint $\bar\lambda$")
    every = t[t % 25 == 0]
    ax[0].plot(every, lam[every], "k.", ms=4, label="the stride-25 samples")
    ax[0].axhline(gd_threshold(lr), ls=":", color="C7", label=r"$2/\eta$")
    ax[1].semilogy(t, unit["amp_logits"][t], lw=0.8, color="C3", label="period-two amplitude")
    twin = ax[1].twinx()
    twin.plot(t, unit["flips"][t], lw=0.5, color="C2", alpha=0.6)
    twin.set_ylabel("hidden units changing sign per step", color="C2", fontsize=8)
    ax[2].plot(t, unit["cos"][t], lw=0.6, color="C4")
    ax[2].set_ylabel("cos of consecutive updates")
    ax[2].set_xlabel("step")
    for a in ax:
        a.axvline(entry, color="C2", lw=1, label="the rule enters the cascade")
        if onset >= 0:
            a.axvline(onset, color="C3", ls="--", lw=1, label=r"$\eta\bar\lambda$ reaches 2")
    ax[0].legend(fontsize=7, loc="upper left")
    ax[1].legend(fontsize=7, loc="upper left")
    ax[0].set_title(title, fontsize=9)
    _save(fig, path)
