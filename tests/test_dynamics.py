"""The ``dynamics`` (Fig. 4) and ``threshold`` (Fig. 5) commands."""

import json

import numpy as np
import pytest
from helpers import load
from scipy.stats import ttest_ind

import run_spiral as rs
import spectra
from apparatus import tracker
from dynloss import class_weights
from spiral import make_spiral_train

EIG_RTOL = 1e-5  # the tracker's warm Lanczos stops at residual 1e-3; measured within 1e-5
SMALL = ["--width", "12", "--A", "20", "--T", "60", "--steps", "300", "--quiet"]


@pytest.fixture(scope="module")
def dyn(tmp_path_factory):
    out = tmp_path_factory.mktemp("dyn")
    assert (
        rs.main(
            [
                "dynamics",
                *SMALL,
                "--hess-every",
                "7",
                "--ntk-every",
                "5",
                "--zoom-every",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out, load(out / "run.npz"), json.loads((out / "config.json").read_text())


def test_dynamics_writes_the_spectra_and_the_figure(dyn):
    out, z, cfg = dyn
    for k in (
        *tracker.SPECTRA_FIELDS,
        "threshold",
        "bif_start",
        "thr_start",
        "zoom_hess_step",
        "zoom_hess_lmax",
    ):
        assert k in z, k
    np.testing.assert_array_equal(z["hess_step"][:-1], np.arange(0, 300, 7))
    np.testing.assert_array_equal(z["ntk_step"], np.arange(0, 301, 5))  # 300 measured once
    assert z["hess_step"][-1] == 300 and z["ntk_step"][-1] == 300  # the final parameters
    np.testing.assert_array_equal(z["step"], np.arange(301))  # F at every step (log-every 1)
    zs = z["zoom_hess_step"]
    assert len(zs) > 1 and np.all(np.diff(zs) == 1)  # the zoomed window, every step
    assert (out / "dynamics.png").stat().st_size > 10000
    assert cfg["hess_every"] == 7 and "threshold" in cfg


def test_last_entries_are_the_exact_spectra_of_the_saved_final_parameters(dyn):
    _, z, cfg = dyn
    params = {k: z[k][None] for k in ("W1", "b1", "W2", "b2")}
    gamma = class_weights(300, cfg["A"], cfg["T"], 3, cfg["stop_step"])
    H = spectra.hessian(params, z["X_train"], z["y_train"], gamma)
    np.testing.assert_allclose(z["hess_lmax"][-1], np.linalg.eigvalsh(H)[-1], rtol=EIG_RTOL)
    Theta = spectra.ntk(params, z["X_train"])
    np.testing.assert_allclose(z["ntk_lmax"][-1], np.linalg.eigvalsh(Theta)[-1], rtol=EIG_RTOL)
    traced = spectra.ntk_traced(params, z["X_train"])
    np.testing.assert_allclose(
        z["ntk_traced_lmax"][-1], np.linalg.eigvalsh(traced)[-1], rtol=EIG_RTOL
    )


def test_zoom_replay_reproduces_the_run(dyn):
    _, z, _ = dyn
    common = np.intersect1d(z["zoom_hess_step"], z["hess_step"][:-1])
    assert len(common)  # steps measured in both passes agree: the replay is the same run
    a = z["hess_lmax"][np.searchsorted(z["hess_step"][:-1], common)]
    b = z["zoom_hess_lmax"][np.searchsorted(z["zoom_hess_step"], common)]
    np.testing.assert_allclose(a, b, rtol=EIG_RTOL)


@pytest.mark.parametrize(
    "bad,msg",
    [
        (["--hess-every", "0"], "argument --hess-every: must be an integer >= 1"),
        (["--ntk-every", "-1"], "argument --ntk-every: must be an integer >= 0"),
        (["--seed", "a"], "--seed"),
        (["--A", "0.2"], "argument --A: must be a finite number >= 1"),
        (["--quick"], "--quick sets --T and --steps"),
    ],
)
def test_dynamics_refuses_bad_input(tmp_path, capsys, bad, msg):
    with pytest.raises(SystemExit):
        rs.main(["dynamics", *SMALL, *bad, "--out", str(tmp_path / "o")])
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_threshold_over_seeds_fits_the_exponent_and_resumes(tmp_path, capsys):
    args = ["threshold", "--widths", "10,14", "--lrs", "1,2,4", "--T0", "200", "--steps0", "1200"]
    args += ["--static-steps", "300", "--hess-every", "5", "--seed", "0-2", "--quiet"]
    args += ["--out", str(tmp_path / "f5")]
    assert rs.main(args) == 0
    z = load(tmp_path / "f5" / "threshold.npz")
    assert z["threshold"].shape == (2, 3, 3)  # (widths, lrs, seeds)
    thr = z["threshold"][0]  # width 10: (lrs, seeds)
    assert np.isfinite(thr).all()  # width 10 bounces at every learning rate here
    x = np.log(np.repeat(z["lrs"], 3))
    np.testing.assert_allclose(z["slope_10"], np.polyfit(x, np.log(thr.ravel()), 1)[0], rtol=1e-10)
    assert z["slope_10_lo"] <= z["slope_10"] <= z["slope_10_hi"]  # the bootstrap interval
    mean, sd = thr.mean(axis=1), thr.std(axis=1, ddof=1)
    np.testing.assert_allclose(z["threshold_mean"][0], mean, rtol=1e-12)
    np.testing.assert_allclose(z["threshold_hi"][0] - mean, 4.302653 * sd / np.sqrt(3), rtol=1e-5)
    np.testing.assert_allclose(z["slope_diff"], z["slope_14"] - z["slope_10"], rtol=1e-12)
    for j in range(3):  # scipy's Welch interval per learning rate, over the finite thresholds
        wide, narrow = z["threshold"][1, j], z["threshold"][0, j]
        wide, narrow = wide[np.isfinite(wide)], narrow[np.isfinite(narrow)]
        if min(len(wide), len(narrow)) < 2:
            assert np.isnan(z["threshold_diff_lo"][j])
            continue
        ci = ttest_ind(wide, narrow, equal_var=False).confidence_interval(0.95)
        np.testing.assert_allclose(z["threshold_diff_lo"][j], ci.low, rtol=1e-10)
        np.testing.assert_allclose(z["threshold_diff_hi"][j], ci.high, rtol=1e-10)
    assert z["static_w10_hess_lmax"].shape == (3, len(z["static_w10_hess_step"]))
    assert (tmp_path / "f5" / "threshold.png").stat().st_size > 10000
    # each (width, lr, seed) is a unit: one seed alone gives the same thresholds as in the sweep
    one = [*args[:-2], "--seed", "1", "--out", str(tmp_path / "one")]
    assert rs.main(one) == 0
    np.testing.assert_array_equal(
        load(tmp_path / "one" / "threshold.npz")["threshold"][..., 0], z["threshold"][..., 1]
    )
    capsys.readouterr()
    assert rs.main(args) == 0  # every unit on disk: nothing is trained again
    assert "0 of 24 runs to do" in capsys.readouterr().out


def test_dynamics_over_seeds_summarises_the_thresholds(tmp_path, capsys):
    out = tmp_path / "d"
    argv = ["dynamics", *SMALL, "--hess-every", "7", "--ntk-every", "0", "--zoom-every", "0"]
    assert rs.main([*argv, "--seed", "0-2", "--out", str(out)]) == 0
    s = load(out / "seeds.npz")
    assert s["threshold"].shape == (3,) and list(s["seeds"]) == [0, 1, 2]
    assert "over 3 seeds" in capsys.readouterr().out
    for seed in range(3):  # each seed's unit is the run of that seed alone
        assert rs.main([*argv, "--seed", str(seed), "--out", str(tmp_path / f"s{seed}")]) == 0
        alone = load(tmp_path / f"s{seed}" / "run.npz")
        unit = load(out / "units" / f"seed_{seed:05d}.npz")
        for k in ("loss", "hess_lmax", "W1"):
            np.testing.assert_array_equal(unit[k], alone[k], err_msg=k)
        assert unit["threshold"] == s["threshold"][seed] or np.isnan(s["threshold"][seed])


@pytest.mark.parametrize(
    "bad",
    [["--T0", "100", "--steps0", "50"], ["--T0", "2", "--lrs", "1,4"]],
)
def test_threshold_refuses_settings_without_oscillations(tmp_path, capsys, bad):
    with pytest.raises(SystemExit):
        rs.main(["threshold", "--widths", "10", "--quiet", *bad, "--out", str(tmp_path / "o")])
    assert "need T0/eta >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_density_command_gives_the_exact_extremes_and_trace(tmp_path):
    """SLQ with as many Lanczos steps as parameters sees the whole spectrum: its extreme nodes
    are the Hessian's extreme eigenvalues; Hutchinson's trace is within 4 standard errors."""
    out = tmp_path / "d"
    argv = ["density", "--width", "6", "--A", "10", "--T", "40", "--steps", "120"]
    argv += ["--at", "0,60,120", "--lanczos-steps", "40", "--quiet", "--out", str(out)]
    assert rs.main(argv) == 0
    z = load(out / "density.npz")
    np.testing.assert_array_equal(z["at"], [0, 60, 120])
    assert (out / "density.png").stat().st_size > 1000
    run = load_run_params(out)
    gamma = class_weights(120, 10.0, 40.0, 3, 80)
    H = spectra.hessian(run, *make_spiral_train(), gamma)
    exact = np.linalg.eigvalsh(H)
    np.testing.assert_allclose(z["lmax"][-1], exact[-1], rtol=EIG_RTOL)
    np.testing.assert_allclose(z["nodes"][-1].min(), exact[0], rtol=EIG_RTOL, atol=1e-10)
    assert abs(z["trace"][-1] - np.trace(H)) < 4 * z["trace_stderr"][-1]
    for grid, dens in zip(z["grid"], z["density"], strict=True):
        assert abs(np.sum(0.5 * (dens[1:] + dens[:-1]) * np.diff(grid)) - 1) < 1e-12


def load_run_params(out):
    """The final parameters of the density command's run, by replaying it with ``train``."""
    rs.main(
        ["train", "--width", "6", "--A", "10", "--T", "40", "--steps", "120", "--quiet"]
        + ["--out", str(out / "replay")]
    )
    z = load(out / "replay" / "run.npz")
    return {k: z[k][None] for k in ("W1", "b1", "W2", "b2")}
