"""stability.py (bifurcations, the Hessian threshold, the bounds) and the spectra tracker of
apparatus/tracker.py."""

import numpy as np
import pytest
from helpers import tiny_problem

import spectra
import stability
from apparatus import tracker as trk
from dynloss import class_weights
from fast.spiral_trainer import train_block
from spiral import TrainSpec

K = 3  # classes of helpers.tiny_problem
EIG_RTOL = 1e-8  # eigsh / Lanczos at tol 1e-10 against dense eigh (error ~ tol^2 / gap)
TRACK_RTOL = 1e-5  # the tracker runs at residual 1e-3; its eigenvalue error ~ residual^2 / gap


# ---------------------------------------------------------------------------------------------
# Stability picture
# ---------------------------------------------------------------------------------------------


def test_bifurcation_episodes_on_a_synthetic_loss():
    t = np.arange(400)
    F = 1.0 / (1.0 + 0.01 * t)  # smooth descent: no flips
    assert len(stability.bifurcation_episodes(F)[0]) == 0
    bounce = np.zeros_like(F)
    bounce[100:161] = 0.05 * (-1.0) ** t[100:161]  # period two from step 100 to 160
    bounce[250:301] = 0.02 * (-1.0) ** t[250:301]  # and from 250 to 300
    starts, ends = stability.bifurcation_episodes(F + bounce)
    np.testing.assert_array_equal(starts, [100, 250])
    np.testing.assert_array_equal(ends, [161, 301])
    # logged steps with offsets; a gap in the log breaks the episode
    starts, ends = stability.bifurcation_episodes(F + bounce, step=t + 1000)
    np.testing.assert_array_equal(starts, [1100, 1250])
    keep = t != 130
    starts, ends = stability.bifurcation_episodes((F + bounce)[keep], step=t[keep])
    np.testing.assert_array_equal(starts, [100, 133, 250])  # dF(131) needs F(130)
    np.testing.assert_array_equal(ends, [129, 161, 301])
    # roundoff-level wiggles are not bounces
    wiggle = 1e-14 * (-1.0) ** t
    assert len(stability.bifurcation_episodes(np.full(400, 0.3) + wiggle)[0]) == 0


def test_hessian_threshold_on_synthetic_lambda_max():
    t = np.arange(600) * 25  # tracked every 25 steps, as in the authors' notebook
    base = 1.0 + 0.004 * np.arange(600)  # smooth growth: steps of 0.004 < 0.1
    bounce = np.zeros(600)
    bounce[100:152] = 0.3 * (-1.0) ** np.arange(100, 152)  # +0.3 at 100 ... -0.3 at 151
    bounce[400:461] = 0.3 * (-1.0) ** np.arange(400, 461)  # +0.3 at 400 ... +0.3 at 460
    threshold, starts, ends = stability.hessian_threshold(t, base + bounce)
    np.testing.assert_array_equal(starts, t[[100, 400]])
    np.testing.assert_array_equal(ends, t[[152, 461]])  # the first step back on the smooth branch
    # each mark is the midpoint (lambda(t) + lambda(t-1)) / 2: base there plus half the bounce
    marks = [
        0.5 * (base[100] + base[99]) + 0.15,
        0.5 * (base[152] + base[151]) - 0.15,
        0.5 * (base[400] + base[399]) + 0.15,
        0.5 * (base[461] + base[460]) + 0.15,
    ]
    np.testing.assert_allclose(threshold, np.mean(marks), rtol=1e-12)
    assert np.isnan(stability.hessian_threshold(t, base)[0])
    # a fast but smooth fall (steps of -0.2, no bouncing) is not an instability
    assert np.isnan(stability.hessian_threshold(t, 200.0 - 0.2 * np.arange(600))[0])


def test_an_instability_cut_by_the_end_of_the_series_gives_no_end_mark():
    t = np.arange(300) * 25
    base = 1.0 + 0.004 * np.arange(300)
    bounce = np.zeros(300)
    bounce[100:152] = 0.3 * (-1.0) ** np.arange(100, 152)  # a whole instability
    bounce[250:] = 0.3 * (-1.0) ** np.arange(250, 300)  # still bouncing at the last sample
    lam = base + bounce
    threshold, starts, ends = stability.hessian_threshold(t, lam)
    np.testing.assert_array_equal(starts, t[[100, 250]])
    np.testing.assert_array_equal(ends, t[[152, 299]])  # the cut one: its last sample seen
    mid = lambda i: 0.5 * (lam[i] + lam[i - 1])
    np.testing.assert_allclose(threshold, np.mean([mid(100), mid(152), mid(250)]), rtol=1e-12)
    first, last, open_start, open_end = stability.instabilities(lam)
    np.testing.assert_array_equal(open_end, [False, True])
    np.testing.assert_array_equal(open_start, [False, False])
    # a sample not measured cuts the same way, on both sides of the gap
    gap = lam.copy()
    gap[130] = np.nan
    threshold, starts, ends = stability.hessian_threshold(t, gap)
    np.testing.assert_array_equal(starts, t[[100, 132, 250]])  # jumps 129, 130 unmeasured
    np.testing.assert_allclose(threshold, np.mean([mid(100), mid(152), mid(250)]), rtol=1e-12)
    # a series bouncing from its first sample has no start mark either
    first, last, open_start, open_end = stability.instabilities(lam[250:])
    np.testing.assert_array_equal(open_start, [True])
    assert np.isnan(stability.hessian_threshold(t[250:], lam[250:])[0])


def test_stability_helpers():
    assert stability.gd_threshold(0.5) == 4.0
    assert stability.ntk_threshold(1.0, 300) == 600.0
    np.testing.assert_allclose(
        stability.ntk_multiplier([150.0, 600.0, 900.0], 1.0, 300), [0.5, -1, -2]
    )


# ---------------------------------------------------------------------------------------------
# Following lambda_max during training
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_tracker_follows_the_exact_top_eigenvalues_during_training(k):
    params, X, y = tiny_problem(seed=10)
    spec = TrainSpec(
        A=np.array([20.0]),
        T=np.array([40.0]),
        stop_step=np.array([100]),
        lr=1.0,
        steps=120,
        log_every=5,
    )
    tracker = trk.SpectraTracker(X, y, spec, k=k)
    snaps = {}

    def on_log(step, params_host):
        tracker(step, params_host)
        snaps[step] = {name: a.copy() for name, a in params_host.items()}  # live views

    train_block(params, (X, y, X, y), spec, on_log=on_log)
    assert tracker.hess_topk.shape == (len(snaps), k)
    np.testing.assert_array_equal(tracker.hess_step, sorted(snaps))
    np.testing.assert_array_equal(tracker.ntk_step, sorted(snaps))
    for i, step in enumerate(tracker.hess_step):
        gamma = class_weights(step, 20.0, 40.0, K, 100)
        hess = spectra.hessian(snaps[step], X, y, gamma)
        np.testing.assert_allclose(
            tracker.hess_topk[i], np.linalg.eigvalsh(hess)[::-1][:k], rtol=TRACK_RTOL
        )
        lam = np.linalg.eigvalsh(spectra.ntk(snaps[step], X))[-1]
        lam_tr = np.linalg.eigvalsh(spectra.ntk_traced(snaps[step], X))[-1]
        np.testing.assert_allclose(tracker.ntk_lmax[i], lam, rtol=TRACK_RTOL)
        np.testing.assert_allclose(tracker.ntk_traced_lmax[i], lam_tr, rtol=TRACK_RTOL)
    np.testing.assert_array_equal(tracker.hess_lmax, tracker.hess_topk[:, 0])
    assert set(tracker.arrays()) == {
        "hess_step",
        "hess_lmax",
        "hess_topk",
        "ntk_step",
        "ntk_lmax",
        "ntk_traced_lmax",
    }


def test_tracker_records_nan_for_a_diverged_network_and_recovers():
    params, X, y = tiny_problem(seed=11)
    spec = TrainSpec(np.array([1.0]), np.array([10.0]), np.array([100]), 1.0, 10, 1)
    tracker = trk.SpectraTracker(X, y, spec)
    bad = {name: np.full_like(a, np.nan) for name, a in params.items()}
    tracker(0, params)
    tracker(1, bad)
    tracker(2, params)
    assert np.isnan(tracker.hess_lmax[1]) and np.isnan(tracker.ntk_lmax[1])
    np.testing.assert_allclose(tracker.hess_lmax[2], tracker.hess_lmax[0], rtol=EIG_RTOL)


def test_track_refuses_spectra_strides_that_are_not_logged_steps():
    params, X, y = tiny_problem(seed=11)
    spec = TrainSpec(np.array([1.0]), np.array([10.0]), np.array([100]), 1.0, 20, 10)  # log 10
    data = (X, y, X, y)
    with pytest.raises(ValueError, match="--hess-every 15 must be a multiple of --log-every 10"):
        trk.track(params, data, spec, every=15, ntk_every=0)
    with pytest.raises(ValueError, match="--ntk-every 5"):
        trk.track(params, data, spec, every=10, ntk_every=5)
    res, (arrays,) = trk.track(params, data, spec, every=10, ntk_every=20)
    assert arrays["hess_step"].tolist() == [0, 10, 20]  # every logged step, the final one too
