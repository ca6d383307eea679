"""Where the instabilities begin: the onset analysis of stability.py on synthetic series, the
softplus network's derivatives, the reference loop's float32, perturbed and softplus runs, and
the onset command end to end; docs/onset.md's tables against the committed results."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_problem

import run_spiral as rs
import spectra
import spiral as sp
import stability
from apparatus import onset
from dynloss import class_weights
from fast import spiral_trainer as ft
from models import flatten, init_mlp, mlp_loss_and_grads, unflatten

K = 3
BETA = 4.0  # a softplus smooth on the scale of the pre-activations
FD_STEP = 1e-6
FD_RTOL = 1e-6  # central differences in float64 against the analytic derivatives
EXACT_RTOL = 1e-12
GAMMA = class_weights(30, 10.0, 50.0, K)  # a tilted loss


def rel_err(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-300)


# ---------------------------------------------------------------------------------------------
# The softplus control: its gradient, Hessian (with the activation-curvature term) and HVP
# ---------------------------------------------------------------------------------------------


def test_softplus_gradient_hessian_and_hvp_match_central_differences():
    params, X, y = tiny_problem(seed=3, kink=0.0)  # no kinks to avoid: softplus is smooth
    theta = flatten(params)[0]
    grad = lambda t: flatten(
        mlp_loss_and_grads(unflatten(t[None], params), X, y, GAMMA[None], "ce", BETA)[1]
    )[0]
    F = lambda t: mlp_loss_and_grads(unflatten(t[None], params), X, y, GAMMA[None], "ce", BETA)[0][
        0
    ]
    e = np.eye(len(theta))
    numeric_grad = np.array(
        [(F(theta + FD_STEP * v) - F(theta - FD_STEP * v)) / (2 * FD_STEP) for v in e]
    )
    assert rel_err(grad(theta), numeric_grad) < FD_RTOL
    hess = spectra.hessian(params, X, y, GAMMA, beta=BETA)
    numeric = np.stack(
        [(grad(theta + FD_STEP * v) - grad(theta - FD_STEP * v)) / (2 * FD_STEP) for v in e], axis=1
    )
    assert rel_err(hess, numeric) < FD_RTOL and rel_err(hess, hess.T) < EXACT_RTOL
    v = np.random.default_rng(0).normal(size=len(theta))
    assert rel_err(spectra.hvp(params, X, y, GAMMA, v, beta=BETA), hess @ v) < EXACT_RTOL
    # the activation-curvature blocks (W1a-W1a) are there and matter
    _, network = spectra.hessian(params, X, y, GAMMA, parts=True, beta=BETA)
    D1H = (X.shape[1] + 1) * params["W1"].shape[2]
    assert np.abs(network[:D1H, :D1H]).max() > 1e3 * FD_RTOL * np.abs(hess).max()
    _, relu_network = spectra.hessian(params, X, y, GAMMA, parts=True)
    assert not relu_network[:D1H, :D1H].any()  # ReLU has none


def test_large_beta_approaches_relu():
    params, X, y = tiny_problem(seed=4)
    relu = mlp_loss_and_grads(params, X, y, GAMMA[None])
    smooth = mlp_loss_and_grads(params, X, y, GAMMA[None], "ce", 1e6)
    assert abs(smooth[0][0] - relu[0][0]) < 1e-5
    assert rel_err(flatten(smooth[1]), flatten(relu[1])) < 1e-4


# ---------------------------------------------------------------------------------------------
# The reference loop beyond the paper: float32, perturbations, softplus
# ---------------------------------------------------------------------------------------------


def spec_for(M, steps, **kw):
    return sp.TrainSpec(
        np.full(M, 5.0), np.full(M, 20.0), np.full(M, steps + 1), 0.5, steps, 1, **kw
    )


def test_perturbation_has_its_norm_and_is_each_networks_own():
    params = init_mlp([0, 1], 2, 10, K)
    moved = {k: v.copy() for k, v in params.items()}
    rngs = [np.random.default_rng([sp.NOISE_STREAM, s]) for s in (5, 6)]
    sp.perturb(moved, 1e-3, rngs)
    diff = flatten(moved) - flatten(params)
    np.testing.assert_allclose(np.linalg.norm(diff, axis=1), 1e-3, rtol=1e-12)
    alone = {k: v[1:].copy() for k, v in params.items()}
    sp.perturb(alone, 1e-3, [np.random.default_rng([sp.NOISE_STREAM, 6])])
    np.testing.assert_array_equal(flatten(alone)[0], flatten(moved)[1])


def test_float32_noise_and_softplus_runs_and_the_fast_trainer_refuses_them():
    data = sp.spiral_data()
    params = init_mlp([0, 1], 2, 10, K)
    base = sp.train_reference(params, data, spec_for(2, 20))
    f32 = sp.train_reference(params, data, spec_for(2, 20, dtype="float32"))
    assert all(v.dtype == np.float32 for v in f32["params"].values())
    assert 1e-8 < rel_err(f32["loss"], base["loss"]) < 1e-4  # float32 rounding, not another run
    noisy = sp.train_reference(
        params, data, spec_for(2, 20, noise=1e-8, noise_seed=np.array([0, 1]))
    )
    assert 0 < rel_err(flatten(noisy["params"]), flatten(base["params"])) < 1e-5
    smooth = sp.train_reference(params, data, spec_for(2, 20, beta=BETA))
    assert np.isfinite(smooth["loss"]).all() and not np.allclose(smooth["loss"], base["loss"])
    for kw in ({"dtype": "float32"}, {"noise": 1e-8}, {"beta": BETA}):
        with pytest.raises(ValueError, match="fast trainer"):
            ft.train_block(params, data, spec_for(2, 5, **kw))


# ---------------------------------------------------------------------------------------------
# The onset analysis on synthetic series
# ---------------------------------------------------------------------------------------------


def test_branch_midpoint_upward_crossing_and_cascade_entries():
    lam = np.r_[np.linspace(1.5, 1.8, 50), np.full(30, 2.3), [1.5], np.full(20, 2.2)]
    mid = stability.branch_midpoint(lam)
    assert np.isnan(mid[0]) and mid[1] == (lam[0] + lam[1]) / 2
    # (1.8 + 2.3) / 2 reaches 2 at step 50; the dip to 1.5 makes a second crossing at 82
    assert stability.upward_crossing(mid, 2.0, 0, len(mid), last=False) == 50
    assert stability.upward_crossing(mid, 2.0, 0, len(mid)) == 82
    assert stability.upward_crossing(mid, 2.0, 0, 50) == -1  # none before
    assert stability.upward_crossing(mid, 3.0, 0, len(mid)) == -1  # never reached
    starts, ends = np.array([10, 30, 40, 500, 520]), np.array([20, 35, 60, 510, 600])
    np.testing.assert_array_equal(stability.cascade_entries(starts, ends, 100), [0, 3])
    np.testing.assert_array_equal(stability.cascade_entries(starts, ends, 5), [0, 1, 3, 4])
    assert len(stability.cascade_entries(starts[:0], ends[:0], 5)) == 0


def synthetic_unit(S=4000, period=2000, rise=(400, 1000)):
    """An onset unit whose lambda ramps up in each period and alternates by 0.3 from eta lambda
    = 1.8 on (the rule enters below 2 / eta), with a period-two mode that grows from there."""
    t = np.arange(S)
    phase = t % period
    lam = 1.0 + 1.5 * np.clip((phase - rise[0]) / (rise[1] - rise[0]), 0, 1)  # 1 -> 2.5
    bounce = lam >= 1.8
    lam = lam + np.where(bounce, 0.15 * (-1.0) ** t, 0.0)
    amp = 1e-3 * np.exp(0.01 * np.clip(phase - rise[0], 0, None))
    unit = {f: np.full(S, 10.0) for f in onset.SERIES}
    unit.update(lam=lam, amp_logits=amp, flipbacks=np.full(S, 5.0), cos=np.full(S, -0.5))
    unit["events"] = np.zeros((0, 2 + len(onset.EVENT_FIELDS)))
    return unit


def test_analyze_unit_finds_each_cascade_where_the_rule_enters_it():
    u = synthetic_unit()
    rows, run = onset.analyze_unit(u, 1.0, 2000.0)
    assert run["entries"] == 2 == run["entries_below"]  # one cascade per period, entered below 2
    mid = stability.branch_midpoint(u["lam"])
    for k, base in enumerate((0, 2000)):
        entry = int(rows["entry_step"][k])  # the stride-5 rule's: within two samples
        assert 1.8 <= rows["entry_lambda"][k] < 2.0 and entry % onset.COLD_EVERY == 0
        assert 0 <= entry - base - np.argmax(u["lam"][base:] >= 1.8) <= 2 * onset.COLD_EVERY
        onset_step = int(rows["onset_step"][k])
        assert mid[onset_step - 1] < 2.0 <= mid[onset_step] and onset_step > entry
        assert rows["lag_steps"][k] == entry - onset_step < 0
    # the mode grows by 0.01 per step; eta lambda from 1.5 to 2 the linear map decays
    np.testing.assert_allclose(rows["growth_measured"], 0.01, rtol=1e-9)
    assert (rows["growth_linear"] < 0).all()
    np.testing.assert_allclose(rows["flipback_level"], 0.5)
    assert np.isnan(rows["onset_lam_dense"]).all()  # no dense spectra stored: NaN, not 0
    gappy = dict(u, lam=u["lam"].copy())  # a lower branch below 2 HOT_FRACTION: measured only
    inside = np.arange(1100, 1900)  # every COLD_EVERY-th step for 800 steps inside the cascade
    gappy["lam"][inside[inside % onset.COLD_EVERY != 0]] = np.nan
    gappy_rows, gappy_run = onset.analyze_unit(gappy, 1.0, 2000.0)
    assert gappy_run == run  # no cascade made up of the gap
    np.testing.assert_array_equal(gappy_rows["entry_step"], rows["entry_step"])
    halved = dict(u, lam=u["lam"] / 2)  # the scale-free rule: lambda / 2 at eta = 2
    _, run2 = onset.analyze_unit(halved, 2.0, 2000.0)
    assert run2["threshold_scaled"] == pytest.approx(run["threshold_scaled"] / 2, rel=1e-12)
    assert run2["entries"] == run["entries"]
    assert 1.8 <= run["threshold_entries"] < 2.0  # the stride-25 rule's first starts ...
    assert run["threshold"] > 2.0  # ... while its ends, at the top of the ramp, sit higher
    assert run["threshold_entries"] < run["threshold"] < run["threshold_ends"]
    assert run["lam_max"] > run["threshold_ends"]  # the top of the ramp, above every end


def test_period_two_amplitude_reads_the_alternating_part():
    t = np.arange(200)
    c = 1e-3 * 1.05**t
    x = np.c_[0.5 + 1e-4 * t, 2.0 - 1e-5 * t**1.0] + (c * (-1.0) ** t)[:, None] * np.array(
        [3.0, 4.0]
    )
    a = stability.period_two_amplitude(x)
    np.testing.assert_allclose(a[1:-1], 5 * c[1:-1] * (1.05 + 2 + 1 / 1.05) / 4, rtol=1e-9)
    assert np.isnan(a[0]) and np.isnan(a[-1])


def test_a_slow_passage_grows_as_the_linear_map_predicts():
    """x(t+1) = (1 - eta lambda(t)) x(t) with eta lambda ramping through 2: the growth fit gives
    slope 1 and intercept 0, and the excess at which x reaches a1 is the slow-passage law's."""
    rho, a1 = 2e-4, 1e-3
    lam = 1.9 + rho * np.arange(1800)  # eta = 1 (a longer ramp overflows float64)
    x = np.empty(len(lam))
    x[0] = 1e-6
    for t in range(len(lam) - 1):
        x[t + 1] = (1 - lam[t]) * x[t]
    amp = stability.period_two_amplitude(x[:, None])
    onset = int(np.argmax(stability.branch_midpoint(lam) > 2))
    seen = int(np.argmax(amp > a1))
    b, c, _, n = stability.growth_fit(amp, lam, 1.0, onset - 200, seen - 5, smooth=1)
    assert n > 100 and abs(b - 1) < 0.02 and abs(c) < 1e-3
    excess = stability.branch_midpoint(lam)[seen] - 2
    predicted = stability.slow_passage_excess(rho, amp[onset], a1)
    assert abs(excess / predicted - 1) < 0.1
    assert abs(stability.ramp_rate(lam, 1.0, onset) - rho) < 1e-9


# ---------------------------------------------------------------------------------------------
# The onset command
# ---------------------------------------------------------------------------------------------


def test_fits_recover_known_laws_each_from_its_own_draws():
    """Per-seed numbers built from known laws: the excess over 2/eta = 0.3 ramp^0.5 across T0,
    the threshold = 2.6 eta^-0.9 across eta, with seed scatter; the fits find the exponents,
    and a family's interval is the same with or without another."""
    rng = np.random.default_rng(5)
    S = 10
    base = dict(dtype="float64", noise=0.0, beta=None)
    t_family = [dict(base, T0=t, lr=1.0) for t in (1250.0, 2500.0, 5000.0, 10000.0)]
    lr_family = [dict(base, T0=5000.0, lr=r) for r in (0.5, 2.0, 4.0)]
    other = [dict(c, dtype="float32") for c in t_family]  # a family fitted before it
    ramp = np.outer(1.0 / np.array([1250.0, 2500.0, 5000.0, 10000.0]), np.ones(S))
    ramp = ramp * np.exp(rng.normal(0, 0.05, ramp.shape))  # (4, S)
    excess = 0.3 * ramp**0.5 * np.exp(rng.normal(0, 0.05, ramp.shape))
    lrs = np.array([1.0, 0.5, 2.0, 4.0])  # the T family's T0 = 5000 is the lr family's eta = 1
    law = 2.6 * lrs[:, None] ** -0.9 * np.exp(rng.normal(0, 0.05, (4, S)))  # (4, S)

    def per_seed(conds):
        out = {f: np.full((len(conds), S), np.nan) for f in onset.SUMMARY_FIELDS}
        for i, c in enumerate(conds):
            j = [1250.0, 2500.0, 5000.0, 10000.0].index(c["T0"]) if c["lr"] == 1.0 else None
            if j is not None:
                out["ramp"][i], out["threshold"][i] = ramp[j], 2.0 + excess[j]
                out["entry_excess"][i] = excess[j] / 2
            if c["T0"] == 5000.0:
                k = list(lrs).index(c["lr"])
                for f in ("threshold_scaled", "threshold_entries", "entry_lambda"):
                    out[f][i] = law[k]
                if c["lr"] != 1.0:
                    out["threshold"][i] = law[k]
        return out

    every = other + t_family + lr_family
    fits = {(f["family"], f["fit"]): f for f in onset._fits(every, per_seed(every))}
    t_label, lr_label = "T0*_lr1.0_float64_noise0.0_relu", "T05000.0_lr*_float64_noise0.0_relu"
    slow = fits[(t_label, "threshold - 2/lr = k ramp^alpha")]
    assert slow["alpha"] == pytest.approx(0.5, abs=0.05) and slow["runs"] == 4 * S
    assert slow["alpha_lo"] < slow["alpha"] < slow["alpha_hi"] < 1.0
    assert fits[(t_label, "entry_excess = k ramp^alpha")]["k"] == pytest.approx(0.15, rel=0.1)
    for f in ("threshold_scaled", "threshold_entries", "entry_lambda"):
        x = fits[(lr_label, f"{f} ~ lr^x")]
        assert x["x"] == pytest.approx(-0.9, abs=0.05) and x["x_lo"] < x["x"] < x["x_hi"] < -0.8
    alone = {(f["family"], f["fit"]): f for f in onset._fits(t_family, per_seed(t_family))}
    assert alone[(t_label, "threshold - 2/lr = k ramp^alpha")] == slow  # its own draws


def test_onset_command_writes_units_resumes_and_merges(tmp_path, capsys):
    out = tmp_path / "onset"
    argv = ["onset", "--T0", "400", "--seed", "0-1", "--periods", "3", "--width", "30"]
    argv += ["--quiet", "--out", str(out)]
    assert rs.main(argv) == 0
    units = sorted((out / "units").glob("*.npz"))
    assert len(units) == 2
    z = np.load(units[0])
    lam = z["lam"]
    assert lam.shape == (1201,) and np.isfinite(lam[:: onset.COLD_EVERY]).all()
    hot = np.flatnonzero(lam >= 2 * onset.HOT_FRACTION)  # measured at every step after these
    assert np.isfinite(lam[hot[hot < 1200] + 1]).all()
    assert int(z["replaced"]) == 0  # the warm-started values agreed with the dense ones
    before = [u.stat().st_mtime_ns for u in units]
    capsys.readouterr()
    assert rs.main(argv) == 0  # a rerun trains nothing
    assert "0 of 2 runs to do" in capsys.readouterr().out
    assert [u.stat().st_mtime_ns for u in units] == before
    assert rs.main([*argv[:3], "--lrs", "2", *argv[3:]]) == 0  # another condition joins
    report = json.loads((out / "onset.json").read_text())
    assert len(report["per_condition"]) == 2 and (out / "onset.png").exists()
    assert json.loads((out / "sweep.json").read_text())["conditions"][1]["lr"] == 2.0


# ---------------------------------------------------------------------------------------------
# docs/onset.md's tables are the committed results, row by row
# ---------------------------------------------------------------------------------------------

ONSET_RESULTS = Path(__file__).resolve().parents[1] / "results" / "onset" / "onset.json"
ONSET_DOC = Path(__file__).resolve().parents[1] / "docs" / "onset.md"


def condition_label(c):
    """'η=1, T=5000, ReLU' (then softplus β, float32, ε where they differ from the default)."""
    act = "ReLU" if c["beta"] is None else f"softplus β={c['beta']:g}"
    extra = ([] if c["dtype"] == "float64" else [c["dtype"]]) + (
        [f"ε={c['noise']:g}"] if c["noise"] else []
    )
    return ", ".join([f"η={c['lr']:g}", f"T={c['T']:g}", act, *extra])


def with_interval(v, fmt="{:.2f}", scale=1.0):
    """'2.07 [2.01, 2.12]' from onset.json's [mean, lo, hi] (lo None: one value, no interval;
    mean None: nothing measured, '—')."""
    mean, lo, hi = v
    if mean is None:
        return "—"
    if lo is None:
        return fmt.format(scale * mean)
    return f"{fmt} [{fmt}, {fmt}]".format(scale * mean, scale * lo, scale * hi)


def onset_table_rows(report):
    """docs/onset.md's two tables: per condition, eta times the thresholds and the entries,
    the mode's growth and the chattering; eta times lambda_max of each operator at the onset."""
    n_train = sp.N_PER_CLASS * sp.K_SPIRAL
    rows = []
    for c, p in zip(report["conditions"], report["per_condition"], strict=True):
        eta = c["lr"]
        cells = [
            *(with_interval(p[f], scale=eta) for f in ("threshold", "threshold_entries")),
            *(with_interval(p[f], scale=eta) for f in ("threshold_restarts", "threshold_ends")),
            with_interval(p["entry_lambda"], scale=eta),
            f"{p['cascades_entered_below_2_over_eta']}/{p['cascades']}",
            with_interval(p["growth_measured"], "{:+.3f}"),
            f"{p['flips_level'][0]:.0f}, {p['flipback_level'][0]:.2f}, {p['cos_level'][0]:+.2f}",
            f"{p['lam_max'][0] * eta:.1f}",
        ]
        rows.append("| " + " | ".join([condition_label(c), *cells]) + " |")
    for c, p in zip(report["conditions"], report["per_condition"], strict=True):
        eta = c["lr"]
        cells = [f"{eta * p[f'onset_lam_{k}'][0]:.3f}" for k in ("dense", "gn", "wntk")]
        ntk = p["onset_lam_ntk"]
        cells += [with_interval(ntk, "{:,.0f}"), f"{stability.ntk_threshold(eta, n_train):,.0f}"]
        rows.append("| " + " | ".join([condition_label(c), *cells]) + " |")
    return rows


def test_the_documented_onset_tables_are_the_committed_results():
    report = json.loads(ONSET_RESULTS.read_text(encoding="utf-8"))
    rows = onset_table_rows(report)
    doc = ONSET_DOC.read_text(encoding="utf-8")
    missing = [r for r in rows if r not in doc]
    assert not missing, f"docs/onset.md rows that are not results/onset/onset.json's: {missing[:2]}"
    assert len(rows) == 2 * len(report["conditions"]) > 0
