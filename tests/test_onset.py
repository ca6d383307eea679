"""Where the instabilities begin: the onset analysis of stability.py on synthetic series, the
softplus network's derivatives, the reference loop's float32, perturbed and softplus runs, and
the onset command end to end; docs/onset.md's tables against the committed results."""

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_problem

import beyond.onset as bo
import run_spiral as rs
import spectra
import spiral as sp
import stability
from apparatus import onset
from apparatus import onset_analysis as oa
from beyond.smooth import softplus
from dynloss import class_weights
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
    act = softplus(BETA)
    grad = lambda t: flatten(
        mlp_loss_and_grads(unflatten(t[None], params), X, y, GAMMA[None], "ce", act)[1]
    )[0]
    F = lambda t: mlp_loss_and_grads(unflatten(t[None], params), X, y, GAMMA[None], "ce", act)[0][0]
    e = np.eye(len(theta))
    numeric_grad = np.array(
        [(F(theta + FD_STEP * v) - F(theta - FD_STEP * v)) / (2 * FD_STEP) for v in e]
    )
    assert rel_err(grad(theta), numeric_grad) < FD_RTOL
    hess = spectra.hessian(params, X, y, GAMMA, act=act)
    numeric = np.stack(
        [(grad(theta + FD_STEP * v) - grad(theta - FD_STEP * v)) / (2 * FD_STEP) for v in e], axis=1
    )
    assert rel_err(hess, numeric) < FD_RTOL and rel_err(hess, hess.T) < EXACT_RTOL
    v = np.random.default_rng(0).normal(size=len(theta))
    assert rel_err(spectra.hvp(params, X, y, GAMMA, v, act=act), hess @ v) < EXACT_RTOL
    # the activation-curvature blocks (W1a-W1a) are there and matter
    _, network = spectra.hessian(params, X, y, GAMMA, parts=True, act=act)
    D1H = (X.shape[1] + 1) * params["W1"].shape[2]
    assert np.abs(network[:D1H, :D1H]).max() > 1e3 * FD_RTOL * np.abs(hess).max()
    _, relu_network = spectra.hessian(params, X, y, GAMMA, parts=True)
    assert not relu_network[:D1H, :D1H].any()  # ReLU has none


def test_large_beta_approaches_relu():
    params, X, y = tiny_problem(seed=4)
    relu = mlp_loss_and_grads(params, X, y, GAMMA[None])
    smooth = mlp_loss_and_grads(params, X, y, GAMMA[None], "ce", softplus(1e6))
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
    rngs = [np.random.default_rng([onset.NOISE_STREAM, s]) for s in (5, 6)]
    onset.perturb(moved, 1e-3, rngs)
    diff = flatten(moved) - flatten(params)
    np.testing.assert_allclose(np.linalg.norm(diff, axis=1), 1e-3, rtol=1e-12)
    alone = {k: v[1:].copy() for k, v in params.items()}
    onset.perturb(alone, 1e-3, [np.random.default_rng([onset.NOISE_STREAM, 6])])
    np.testing.assert_array_equal(flatten(alone)[0], flatten(moved)[1])


def test_float32_perturbed_and_softplus_runs_of_the_reference_loop():
    data = sp.spiral_data()
    params = init_mlp([0, 1], 2, 10, K)
    base = sp.train_reference(params, data, spec_for(2, 20))
    f32 = sp.train_reference(params, data, spec_for(2, 20), dtype="float32")
    assert all(v.dtype == np.float32 for v in f32["params"].values())
    assert 1e-8 < rel_err(f32["loss"], base["loss"]) < 1e-4  # float32 rounding, not another run
    rngs = [np.random.default_rng([onset.NOISE_STREAM, s]) for s in (0, 1)]
    kick = lambda t, p: onset.perturb(p, 1e-8, rngs)
    noisy = sp.train_reference(params, data, spec_for(2, 20), after_update=kick)
    assert 0 < rel_err(flatten(noisy["params"]), flatten(base["params"])) < 1e-5
    smooth = sp.train_reference(params, data, spec_for(2, 20), act=softplus(BETA))
    assert np.isfinite(smooth["loss"]).all() and not np.allclose(smooth["loss"], base["loss"])


# ---------------------------------------------------------------------------------------------
# The onset analysis on synthetic series
# ---------------------------------------------------------------------------------------------


def test_branch_midpoint_upward_crossing_and_cascade_entries():
    lam = np.r_[np.linspace(1.5, 1.8, 50), np.full(30, 2.3), [1.5], np.full(20, 2.2)]
    mid = bo.branch_midpoint(lam)
    assert np.isnan(mid[0]) and mid[1] == (lam[0] + lam[1]) / 2
    # (1.8 + 2.3) / 2 reaches 2 at step 50; the dip to 1.5 makes a second crossing at 82
    assert bo.upward_crossing(mid, 2.0, 0, len(mid), last=False) == 50
    assert bo.upward_crossing(mid, 2.0, 0, len(mid)) == 82
    assert bo.upward_crossing(mid, 2.0, 0, 50) == -1  # none before
    assert bo.upward_crossing(mid, 3.0, 0, len(mid)) == -1  # never reached
    starts, ends = np.array([10, 30, 40, 500, 520]), np.array([20, 35, 60, 510, 600])
    np.testing.assert_array_equal(bo.cascade_entries(starts, ends, 100), [0, 3])
    began_inside = bo.cascade_entries(starts, ends, 100, begin=0)  # unstable at step 0
    np.testing.assert_array_equal(began_inside, [3])  # the first: inside a cascade not seen
    np.testing.assert_array_equal(bo.cascade_entries(starts + 200, ends + 200, 100, 0), [0, 3])
    np.testing.assert_array_equal(bo.cascade_entries(starts, ends, 5), [0, 1, 3, 4])
    assert len(bo.cascade_entries(starts[:0], ends[:0], 5)) == 0
    assert bo.first_reaching(np.r_[1.0, 3.0, 2.0, 5.0], 2.5, 0, 4) == 1
    assert bo.first_reaching(np.r_[1.0, 3.0, 2.0, 5.0], 2.5, 2, 4) == 3
    assert bo.first_reaching(np.r_[1.0, 3.0], 9.0, 0, 2) == -1


def test_the_rules_first_entry_counts_unless_the_run_began_unstable():
    """apparatus/rule.rule_readings: a run that starts below 2/eta and bounces within the quiet
    gap of its start enters a cascade there; one that starts above 2/eta began inside one."""
    from apparatus.rule import rule_readings

    lam = np.full(3000, 1.5)
    t = np.arange(3000)
    for a, b in ((150, 400), (2000, 2200)):  # two bouncing stretches, 1,600 quiet steps apart
        lam[a:b] = 2.1 + 0.2 * (-1.0) ** t[a:b]
    _, starts, _, firsts, _, marks = rule_readings(lam, 5000, 1, 0.1)  # quiet: 1000 steps
    assert len(firsts) == 2 and starts[firsts[0]] < 200 and len(marks["entries"]) == 2
    lam[0] = 2.5  # eta lambda_max >= 2 at step 0: the first bounce is inside a cascade
    _, starts, _, firsts, _, marks = rule_readings(lam, 5000, 1, 0.1)
    assert len(firsts) == 1 and starts[firsts[0]] >= 2000
    assert len(rule_readings(lam, 5000, 1, 0.1, lr=0.5)[3]) == 2  # 2.5 < 2/0.5: stable


def test_alternating_amplitude_ignores_a_smooth_drift_up_to_cubic():
    t = np.arange(5.0)
    drift = 0.3 + 2e-2 * t - 1e-3 * t**2 + 4e-5 * t**3  # its 4th difference is 0
    for c in (1e-12, 1e-6, 0.1):
        x = drift + c * (-1.0) ** t
        assert bo.alternating_amplitude(x, 4) == pytest.approx(c, rel=1e-3 if c < 1e-9 else 1e-9)
    both = np.c_[3 * (-1.0) ** t, 4 * (-1.0) ** t]  # trailing axes: their norm
    assert bo.alternating_amplitude(both[:3], 2) == pytest.approx(5.0)


def test_entry_exit_sums_and_the_forced_precursor():
    """x(t+1) = (1 - eta lambda(t)) x(t) + f (-1)^t: below the edge c (2 - eta lambda) = f; a
    free mode above it grows by the e-folds sum ln(eta lambda - 1)."""
    f, T = 1e-4, 3000
    lam = 1.0 + 0.9 * np.arange(T) / T  # up to 1.9, slowly
    x = np.zeros(T)
    for t in range(T - 1):
        x[t + 1] = (1 - lam[t]) * x[t] + f * (-1.0) ** t
    c = np.abs(x)
    F = bo.forcing_estimate(c[1000:2500], lam[1000:2500])  # eta lambda 1.3-1.75
    np.testing.assert_allclose(F, f, rtol=1e-2)  # settled: the slow ramp lags by < 1% there
    eta_mid = np.r_[np.full(10, 2.5), [np.nan]]
    assert bo.multiplier_sum(eta_mid, 0, 10) == pytest.approx(10 * np.log(1.5))
    assert np.isnan(bo.multiplier_sum(eta_mid, 5, 11)) and np.isnan(
        bo.multiplier_sum(eta_mid, 5, 4)
    )
    growth = np.exp(np.arange(11) * np.log(1.5))
    assert bo.growth_rate(growth, eta_mid, 2, 8) == pytest.approx((np.log(1.5), np.log(1.5)))


def synthetic_unit(S=4000, period=2000, rise=(400, 1000), force=1e-3, floor=None):
    """An onset unit whose lambda ramps from 1 to 2.5 in each period. ``force``: a mode held at
    c = force / (2 - eta lambda-bar) below the edge, lambda alternating by 0.3 from eta lambda
    = 1.8 on (the rule enters below 2 / eta, as in the ReLU network); ``floor``: instead a mode
    at a floor that grows by eta lambda-bar - 1 per step from the onset, lambda alternating once
    it passes 1e-2 (a delayed flip, as in the smooth network)."""
    t = np.arange(S)
    phase = t % period
    lam = 1.0 + 1.5 * np.clip((phase - rise[0]) / (rise[1] - rise[0]), 0, 1)  # 1 -> 2.5
    mid = bo.branch_midpoint(lam)
    if floor is None:
        c = force / np.clip(2.0 - mid, 0.02, None)
        bounce = lam >= 1.8
    else:
        c = np.full(S, floor)
        for k in range(1, S):
            if mid[k - 1] > 2.0:
                c[k] = c[k - 1] * (mid[k - 1] - 1.0)
        c = np.minimum(c, 1.0)
        bounce = c >= 1e-2
    lam = lam + np.where(bounce, 0.15 * (-1.0) ** t, 0.0)
    unit = {f: np.full(S, 10.0) for f in onset.SERIES}
    unit.update(lam=lam, mode=c, flipbacks=np.full(S, 5.0), cos=np.full(S, -0.5))
    unit["events"] = np.zeros((0, 2 + len(onset.EVENT_FIELDS)))
    return unit


def test_analyze_unit_finds_each_cascade_where_the_rule_enters_it():
    u = synthetic_unit()
    rows, run = oa.analyze_unit(u, 1.0, 2000.0)
    assert run["entries"] == 2 == run["entries_below"]  # one cascade per period, entered below 2
    mid = bo.branch_midpoint(u["lam"])
    for k, base in enumerate((0, 2000)):
        entry = int(rows["entry_step"][k])  # the stride-5 rule's: within two samples
        assert 1.8 <= rows["entry_lambda"][k] < 2.0 and entry % onset.COLD_EVERY == 0
        assert 0 <= entry - base - np.argmax(u["lam"][base:] >= 1.8) <= 2 * onset.COLD_EVERY
        onset_step = int(rows["onset_step"][k])
        assert mid[onset_step - 1] < 2.0 <= mid[onset_step] and onset_step > entry
        assert rows["lag_steps"][k] == entry - onset_step < 0
    # eta lambda-bar rises 1.5 / 600 per step; the mode is forced by 1e-3 (the rule enters at
    # 1.8, so the 1.5-1.9 band ends where lambda-bar still follows the ramp: 1.5-1.8)
    np.testing.assert_allclose(rows["ramp"], 1.5 / 600, rtol=0.05)
    np.testing.assert_allclose(rows["forcing_low"], 1e-3, rtol=1e-6)
    np.testing.assert_allclose(rows["forcing_high"], 1e-3, rtol=0.05)
    assert (rows["seen_before_onset"] == 1).all() and np.isnan(rows["efolds_seen"]).all()
    assert (rows["seen_censored"] == 1).all()  # c = 1e-3/0.8 > MODE_SEEN at the first tracked step
    weak, _ = oa.analyze_unit(synthetic_unit(force=1e-5), 1.0, 2000.0)  # seen at 1.9, measured
    assert (weak["seen_censored"] == 0).all() and (weak["seen_before_onset"] == 1).all()
    np.testing.assert_allclose(weak["seen_lambda"], 1.9, atol=0.01)
    np.testing.assert_allclose(rows["flipback_level"], 0.5)
    assert np.isnan(rows["onset_lam_dense"]).all()  # no dense spectra stored: NaN, not 0
    assert run["coverage"] == 1.0
    gappy = dict(u, lam=u["lam"].copy())  # every COLD_EVERY-th step only, inside a cascade
    inside = np.arange(1100, 1900)
    gappy["lam"][inside[inside % onset.COLD_EVERY != 0]] = np.nan
    gappy_rows, gappy_run = oa.analyze_unit(gappy, 1.0, 2000.0)
    assert gappy_run["entries"] == run["entries"] and gappy_run["coverage"] < 1.0
    assert gappy_run["threshold_5"] == run["threshold_5"]  # the stride-5 series is complete
    np.testing.assert_array_equal(gappy_rows["entry_step"], rows["entry_step"])
    halved = dict(u, lam=u["lam"] / 2)  # the scale-free rule: lambda / 2 at eta = 2
    _, run2 = oa.analyze_unit(halved, 2.0, 2000.0)
    assert run2["threshold_scaled"] == pytest.approx(run["threshold_scaled"] / 2, rel=1e-12)
    assert run2["entries"] == run["entries"]
    assert 1.8 <= run["threshold_entries"] < 2.0  # the stride-25 rule's first starts ...
    assert run["threshold_entries"] < run["threshold_ends"]  # ... its ends at the ramp's top
    assert run["lam_max"] > run["threshold_ends"]


def test_analyze_unit_reads_a_delayed_flip_by_the_entry_exit_relation():
    for floor in (1e-15, 1e-10):
        rows, run = oa.analyze_unit(synthetic_unit(floor=floor), 1.0, 2000.0)
        assert run["entries"] == 2 and run["entries_below"] == 0
        assert (rows["seen_before_onset"] == 0).all() and (rows["seen_lambda"] > 2.0).all()
        assert (rows["seen_censored"] == 0).all()
        # the e-folds from the onset to c = MODE_SEEN are ln(MODE_SEEN / floor), to one step's
        np.testing.assert_allclose(rows["efolds_seen"], np.log(oa.MODE_SEEN / floor), atol=0.6)
        np.testing.assert_allclose(rows["seed_implied"], np.log10(floor), atol=0.3)
        np.testing.assert_allclose(rows["growth_measured"], rows["growth_linear"], rtol=1e-9)
        assert (rows["entry_lambda"] > rows["seen_lambda"]).all()
    seen = [oa.analyze_unit(synthetic_unit(floor=f), 1.0, 2000.0)[0]["seen_lambda"][0]
            for f in (1e-15, 1e-10, 1e-6)]  # fmt: skip
    assert seen[0] > seen[1] > seen[2] > 2.0  # the lower the floor, the later it is seen


def test_a_cascade_begins_after_max_min_quiet_quiet_fraction_T_without_an_instability():
    u = synthetic_unit()
    lam = u["lam"].copy()
    bouncing = np.flatnonzero(np.abs(np.diff(lam)) > 0.2)
    assert len(bouncing)  # the rule's instabilities, from step 1000 on in each period
    quiet = max(oa.MIN_QUIET, oa.QUIET_FRACTION * 2000.0)  # 400 steps
    for gap, cascades in ((quiet - 50, 2), (quiet + 50, 3)):
        cut = dict(u, lam=lam.copy())
        calm = slice(1300, 1300 + int(gap))  # a calm stretch inside the first cascade
        cut["lam"][calm] = 2.2
        assert oa.analyze_unit(cut, 1.0, 2000.0)[1]["entries"] == cascades


# ---------------------------------------------------------------------------------------------
# The onset command
# ---------------------------------------------------------------------------------------------


def test_fits_recover_known_laws_each_from_its_own_draws():
    """Per-seed numbers built from known laws, with seed scatter: across T0 the excess over 2/eta
    = 0.3 ramp^0.5 (one run's excess negative: kept), across the perturbation the e-folds
    = -ln(eps / sqrt(P)) + 3, across eta the thresholds = 2.6 eta^-0.9, across beta log10 of
    the forcing = 0.8 log10 flips - 5. The fits find them, count every run, and a family's
    interval is the same with or without another."""
    rng = np.random.default_rng(5)
    S, width = 10, 100
    P = sp.spiral_params(width)
    base = dict(dtype="float64", noise=0.0, beta=None, force=0.0)
    Ts = [1250.0, 2500.0, 5000.0, 10000.0]
    t_family = [dict(base, T0=t, lr=1.0) for t in Ts]
    lr_family = [dict(base, T0=5000.0, lr=r) for r in (0.5, 2.0, 4.0)]
    eps_family = [dict(base, T0=5000.0, lr=1.0, noise=e) for e in (1e-12, 1e-8, 1e-6, 1e-4)]
    betas = [dict(base, T0=5000.0, lr=1.0, beta=b) for b in (5.0, 20.0, 100.0)]
    other = [dict(c, dtype="float32") for c in t_family]  # a family fitted before it
    ramp = np.outer(1.0 / np.array(Ts), np.ones(S)) * np.exp(rng.normal(0, 0.05, (4, S)))
    excess = 0.3 * ramp**0.5 * np.exp(rng.normal(0, 0.05, ramp.shape))
    excess[3, 0] = -0.0001  # a run entered below 2/eta
    lrs = np.array([1.0, 0.5, 2.0, 4.0])  # the T family's T0 = 5000 is the lr family's eta = 1
    law = 2.6 * lrs[:, None] ** -0.9 * np.exp(rng.normal(0, 0.05, (4, S)))  # (4, S)

    def per_seed(conds):
        out = {f: np.full((len(conds), S), np.nan) for f in oa.SUMMARY_FIELDS}
        for i, c in enumerate(conds):
            if c["lr"] == 1.0 and c["noise"] == 0 and c["beta"] is None:
                j = Ts.index(c["T0"])
                out["ramp"][i], out["threshold"][i] = ramp[j], 2.0 + excess[j]
                out["entry_excess"][i] = excess[j] / 2
            if c["T0"] == 5000.0 and c["noise"] == 0 and c["beta"] is None:
                k = list(lrs).index(c["lr"])
                for f in ("threshold_scaled", "threshold_entries", "entry_lambda"):
                    out[f][i] = law[k]
                if c["lr"] != 1.0:
                    out["threshold"][i] = law[k]
            if c["noise"]:
                out["efolds_seen"][i] = -np.log(c["noise"] / np.sqrt(P)) + 3 + rng.normal(0, 0.3, S)
        return out

    every = other + t_family + lr_family + eps_family + betas
    fits = {(f["family"], f["fit"]): f for f in oa.onset_fits(every, per_seed(every), width)}
    t_label = "T0*_lr1.0_float64_noise0.0_relu"
    lr_label = "T05000.0_lr*_float64_noise0.0_relu"
    slow = fits[(t_label, "threshold - 2/lr = k ramp^alpha")]
    assert slow["alpha"] == pytest.approx(0.5, abs=0.1) and slow["runs"] == 4 * S  # none dropped
    assert slow["alpha_lo"] < slow["alpha"] < slow["alpha_hi"] < 1.0
    entry = fits[(t_label, "entry_excess = k ramp^alpha")]
    assert entry["alpha"] == pytest.approx(0.5, abs=0.1) and entry["runs"] == 4 * S
    for f in ("threshold_scaled", "threshold_entries", "entry_lambda"):
        x = fits[(lr_label, f"{f} ~ lr^x")]
        assert x["x"] == pytest.approx(-0.9, abs=0.05) and x["x_lo"] < x["x"] < x["x_hi"] < -0.8
    ee = fits[("T05000.0_lr1.0_float64_noise*_relu", "efolds_seen = slope ln(eps / sqrt(P)) + c")]
    assert ee["slope"] == pytest.approx(-1, abs=0.05) and ee["runs"] == 4 * S
    assert ee["slope_lo"] < -1 < ee["slope_hi"]
    assert not any("softplus*" in family for family, _ in fits)  # no line through two clusters
    x = np.r_[np.arange(9.0), np.nan]
    assert oa._rank_correlation(x, -(x**3))[::2] == [pytest.approx(-1.0), 9]  # NaN left out
    assert oa._rank_correlation(x[:5], x[:5]) == [None, None, 5]  # too few cascades
    seen_early = per_seed(eps_family)
    seen_early["efolds_seen"][:] = np.nan  # every cascade saw the mode before its onset
    (none,) = oa.onset_fits(eps_family, seen_early, width)
    assert none["runs"] == 0 and np.isnan(none["slope"]) and none["why"] == oa.NO_GROWTH_RUNS
    alone = {(f["family"], f["fit"]): f for f in oa.onset_fits(t_family, per_seed(t_family), width)}
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
    hot = np.flatnonzero(lam >= 2 * onset.HOT_FRACTION)  # every step after these is measured,
    assert len(hot)  # for HOT_MEMORY steps (a cascade's lower branch included)
    after = np.unique(np.minimum((hot[:, None] + np.arange(1, onset.HOT_MEMORY + 1)).ravel(), 1200))
    assert np.isfinite(lam[after]).all()
    c = z["mode"]
    assert np.isfinite(c[2:-2]).all() and (c[2:-2] >= 0).all()  # at every step but the edges
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


def test_the_tracked_lambda_max_is_the_dense_one_at_every_measured_step():
    """The tracker's warm-started Lanczos against numpy's eigh of the dense Hessian built
    independently at every measured step of a run through the edge (ReLU, then softplus), and
    the mode against the 4th difference of theta along the dense top eigenvector."""
    from beyond.smooth import activation

    data = sp.spiral_data()
    spec = sp.TrainSpec(np.full(1, 70.0), np.full(1, 400.0), np.full(1, 1201), 1.0, 1200, 1)
    for beta in (None, 20.0):
        act = activation(beta)
        tracker = onset.OnsetTracker(data[0], data[1], spec, act=act)
        seen = {}

        def on_log(step, params, tracker=tracker, seen=seen):
            tracker(step, params)
            seen[step] = {k: np.array(a[:1], dtype=np.float64) for k, a in params.items()}

        sp.train_reference(init_mlp([0], 2, 30, K), data, spec, on_log, act=act)
        lam, mode = tracker.arrays()["lam"], tracker.arrays()["mode"]
        measured = np.flatnonzero(np.isfinite(lam))
        assert (lam[measured] >= 2 * onset.HOT_FRACTION).sum() > 50  # at every step near the edge
        hot = lam[measured] >= 2 * onset.HOT_FRACTION
        measured = np.union1d(measured[hot][::2], measured[~hot][::8])  # a sample of both kinds
        dense = {}
        for t in measured:
            g = class_weights(t, 70.0, 400.0, K, 1201)
            w, V = np.linalg.eigh(spectra.hessian(seen[t], data[0], data[1], g, "ce", act=act))
            dense[t] = w[-1], V[:, -1]
        np.testing.assert_allclose(lam[measured], [dense[t][0] for t in measured], rtol=1e-4)
        centres = [t for t in measured if t + 2 in dense and t - 2 in seen]
        assert len(centres) > 20
        for t in centres:  # the window t-2 .. t+2 on the eigenvector measured at t+2
            x = [flatten(seen[t + i])[0] @ dense[t + 2][1] for i in range(-2, 3)]
            np.testing.assert_allclose(mode[t], bo.alternating_amplitude(x, 4), rtol=1e-3,
                                       atol=1e-9)  # fmt: skip


def test_a_forced_smooth_network_shows_its_forcing_below_the_edge():
    """The tracker's forcing f (-1)^t v after every update: the mode's amplitude times
    (2 - eta lambda-bar) reads f back, where eta lambda-bar is from 1.2 to 1.8."""
    data = sp.spiral_data()
    params = init_mlp([0], 2, 30, K)
    f = 1e-4
    spec = sp.TrainSpec(np.full(1, 70.0), np.full(1, 400.0), np.full(1, 1201), 1.0, 900, 1)
    c = dict(beta=20.0, dtype="float64", noise=0.0, force=f)
    _, (arrays,) = onset.track_onsets(params, data, spec, c, [0])
    mid = bo.branch_midpoint(arrays["lam"])
    band = (mid >= 1.2) & (mid < 1.8) & np.isfinite(arrays["mode"])
    assert band.sum() > 20
    np.testing.assert_allclose(np.median(bo.forcing_estimate(arrays["mode"], mid)[band]), f,
                               rtol=0.05)  # fmt: skip
    _, (free,) = onset.track_onsets(params, data, spec, dict(c, force=0.0), [0])
    assert np.nanmedian(free["mode"][band]) < 0.1 * np.median(arrays["mode"][band])


# ---------------------------------------------------------------------------------------------
# docs/onset.md's tables are the committed results, row by row
# ---------------------------------------------------------------------------------------------

ONSET_RESULTS = Path(__file__).resolve().parents[1] / "results" / "onset" / "onset.json"
ONSET_DOC = Path(__file__).resolve().parents[1] / "docs" / "onset.md"


def condition_label(c):
    """'η=1, T=5000, ReLU' (then softplus β, float32, ε, forcing where they differ)."""
    act = "ReLU" if c["beta"] is None else f"softplus β={c['beta']:g}"
    extra = ([] if c["dtype"] == "float64" else [c["dtype"]]) + (
        [f"ε={c['noise']:g}"] if c["noise"] else []
    )
    extra += [f"forced {c['force']:g}"] if c.get("force") else []
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


def rank_cell(v):
    """'+0.52 (p 0.02, 25)' from [rho, p, n]; '— (n)' when not computed."""
    rho, p, n = v
    return f"— ({n})" if rho is None else f"{rho:+.2f} (p {p:.2g}, {n})"


def onset_tables(report):
    """docs/onset.md's tables, {name: rows}, every row from results/onset/onset.json: 'mode'
    (where the period-two mode is seen, its e-folds, the seed they imply, its growth against the
    linear map's, where the rule enters), 'forcing' (the forcing that holds the mode below the
    edge, the chattering at eta lambda-bar = 1.5), 'thresholds' (eta times the rule's threshold
    and its parts, scale-free, the largest lambda_max), 'spectra' (eta lambda_max of each
    operator at the onset) and 'fits'."""
    n_train = sp.N_PER_CLASS * sp.K_SPIRAL
    tables = {"mode": [], "forcing": [], "thresholds": [], "spectra": [], "fits": []}
    row = lambda cells: "| " + " | ".join(cells) + " |"
    for c, p in zip(report["conditions"], report["per_condition"], strict=True):
        eta, name = c["lr"], condition_label(c)
        n = p["cascades"]
        tables["mode"].append(row([
            name, with_interval(p["seen_lambda"], scale=eta),
            f"{p['cascades_seen_censored']}/{n}", f"{p['cascades_seen_before_onset']}/{n}",
            with_interval(p["efolds_seen"], "{:.1f}"), with_interval(p["seed_implied"], "{:.1f}"),
            with_interval(p["growth_measured"], "{:.3f}"), with_interval(p["growth_linear"], "{:.3f}"),
            with_interval(p["entry_lambda"], scale=eta),
            "—" if p["entry_lambda_median"] is None else f"{eta * p['entry_lambda_median']:.2f}",
            f"{p['cascades_entered_below_2_over_eta']}/{n}",
        ]))  # fmt: skip
        tables["forcing"].append(row([
            name, with_interval(p["forcing_low"]), with_interval(p["forcing_high"]),
            with_interval(p["mode_exponent"]),
            with_interval(p["flips_level"], "{:.0f}"), with_interval(p["flipback_level"]),
            with_interval(p["cos_level"], "{:+.2f}"), rank_cell(p["forcing_vs_flips"]),
        ]))  # fmt: skip
        tables["thresholds"].append(row([
            name, *(with_interval(p[f], scale=eta) for f in (
                "threshold", "threshold_entries", "threshold_restarts", "threshold_ends",
                "threshold_scaled")),
            f"{p['lam_max'][0] * eta:.1f}", f"{p['coverage'][0]:.3f}",
        ]))  # fmt: skip
        cells = [f"{eta * p[f'onset_lam_{k}'][0]:.3f}" if p[f"onset_lam_{k}"][0] is not None
                 else "—" for k in ("dense", "gn", "wntk")]  # fmt: skip
        cells += [with_interval(p["onset_lam_ntk"], "{:,.0f}"),
                  f"{stability.ntk_threshold(eta, n_train):,.0f}",
                  f"{p['cascades_with_spectra']}/{n}"]  # fmt: skip
        tables["spectra"].append(row([name, *cells]))
    for fit in report["fits"]:
        if "alpha" in fit:
            est = (fit["alpha"], fit["alpha_lo"], fit["alpha_hi"])
        elif "x" in fit:
            est = (fit["x"], fit["x_lo"], fit["x_hi"])
        else:
            est = (fit["slope"], fit["slope_lo"], fit["slope_hi"])
        shown = "—" if est[0] is None else with_interval(list(est), "{:+.3f}")
        tables["fits"].append(row([f"`{fit['family']}`", fit["fit"], shown, str(fit["runs"]),
                                   fit["law"]]))  # fmt: skip
    return tables


def test_the_documented_onset_tables_are_the_committed_results():
    """Every row of docs/onset.md's tables is results/onset/onset.json's, and every condition and
    fit of the committed results is in the document."""
    report = json.loads(ONSET_RESULTS.read_text(encoding="utf-8"))
    doc = ONSET_DOC.read_text(encoding="utf-8")
    tables = onset_tables(report)
    for name, rows in tables.items():
        missing = [r for r in rows if r not in doc]
        assert not missing, (
            f"docs/onset.md's {name} rows not in results/onset/onset.json: {missing[:2]}"
        )
    assert len(tables["thresholds"]) == len(report["conditions"]) >= 30
    assert len(tables["fits"]) == len(report["fits"]) > 0
