"""spiral.py (the data and the reference loop) and the fast trainer of fast/spiral_trainer.py,
tied to the reference loop and to the layer-by-layer MLP of models.py."""

import numpy as np
import pytest

import spiral as sp
from apparatus import workers
from dynloss import DIVERGENCE_FACTOR, class_weights
from fast import spiral_trainer as ft
from models import init_mlp, mlp_loss_and_grads

EXACT = 1e-13  # fused trainer against the layer-by-layer reference: equal up to rounding
LOGS_RTOL = 1e-9  # reference loop against the fast trainer over a few hundred steps: the sums
# run in another order (1e-16 per step), which the dynamics amplify, but not to 1e-9 this soon
TRAINERS = {"fast": ft.train_block, "reference": sp.train_reference}


def spec_for(M, A, T, steps, lr=1.0, log_every=5, stop=None, loss="ce"):
    stop = np.full(M, steps + 1) if stop is None else np.full(M, stop)
    return sp.TrainSpec(
        np.full(M, float(A)), np.full(M, float(T)), stop, lr, steps, log_every, loss
    )


@pytest.fixture(scope="module")
def data():
    return (*sp.make_spiral_train(), *sp.make_spiral_val())


def test_spiral_data(data):
    X, y, Xv, yv = data
    assert X.shape == (300, 2) and Xv.shape == (300, 2)
    assert (np.bincount(y) == 100).all() and (np.bincount(yv) == 100).all()
    # one point of each class sits at the origin (radius 0): at most 298/300 can be right
    assert (np.linalg.norm(X, axis=1) == 0).sum() == 3
    # the notebook's legacy seed 0: the first class's noise is RandomState(0).randn(100) * 0.2
    noise = np.random.RandomState(0).randn(100) * 0.2
    a = np.linspace(0, 4 * np.pi, 100)[99] + noise[99]  # the last point: radius 1
    np.testing.assert_allclose(X[99], [np.cos(a), np.sin(a)], rtol=1e-12)
    # validation: the same arms, but no point at a training radius
    rt = np.unique(np.linalg.norm(X, axis=1).round(12))
    rv = np.linalg.norm(Xv, axis=1).round(12)
    assert not np.isin(rv, rt).any()
    assert rv.max() <= 1.0


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("width", [16, ft.CPU_TILE + 50])  # one tile; two, the second partial
def test_one_fused_step_equals_the_layer_by_layer_gradient(data, loss, width):
    X, y, _, _ = data
    params = init_mlp([0, 1], 2, width, 3)
    spec = spec_for(2, 8.0, 10, steps=1, lr=0.3, log_every=1, loss=loss)
    spec.T = np.array([10.0, 7.0])
    out = ft.train_block(params, data, spec)
    gamma = class_weights(0, spec.A, spec.T, 3)
    F, grads, logits = mlp_loss_and_grads(params, X, y, gamma, loss)
    for k in params:
        np.testing.assert_allclose(
            out["params"][k], params[k] - 0.3 * grads[k], rtol=EXACT, atol=EXACT
        )
    np.testing.assert_allclose(out["loss"][0], F, rtol=EXACT)


def test_batched_training_equals_networks_trained_alone(data):
    seeds = [3, 4, 5, 6]
    params = init_mlp(seeds, 2, 20, 3)
    spec = spec_for(4, 1.0, 10, steps=60)
    spec.A = np.array([1.0, 5.0, 20.0, 3.0])
    spec.T = np.array([10.0, 8.0, 30.0, 5.0])
    spec.stop_step = np.array([50, 52, 61, 40])
    together = ft.train_many(params, data, spec, block=3, workers=2, progress=False)
    for m, s in enumerate(seeds):
        one = ft.train_block(
            init_mlp([s], 2, 20, 3),
            data,
            sp.TrainSpec(
                spec.A[m : m + 1], spec.T[m : m + 1], spec.stop_step[m : m + 1], 1.0, 60, 5
            ),
        )
        for k in params:
            np.testing.assert_allclose(
                together["params"][k][m], one["params"][k][0], rtol=EXACT, atol=EXACT
            )
        for f in sp.LOG_FIELDS:
            np.testing.assert_allclose(together[f][:, m], one[f][:, 0], rtol=EXACT, atol=EXACT)


def test_logged_rows_and_gamma(data):
    out = ft.train_block(
        init_mlp([0], 2, 8, 3), data, spec_for(1, 5.0, 4, steps=23, log_every=5, stop=20)
    )
    np.testing.assert_array_equal(out["step"], [0, 5, 10, 15, 20, 23])
    np.testing.assert_allclose(out["gamma"][:, 0], class_weights(out["step"], 5.0, 4.0, 3, 20))
    assert (out["gamma"][-2:] == 1.0).all()
    assert np.isnan(out["dloss"][0]).all() and np.isfinite(out["dloss"][1:]).all()


@pytest.mark.parametrize("trainer", TRAINERS)
def test_divergence_is_recorded_and_history_kept(data, trainer):
    out = TRAINERS[trainer](
        init_mlp([0, 1], 2, 30, 3),
        data,
        spec_for(2, 1.0, 10, steps=200, lr=1e4, log_every=1, loss="mse"),
    )
    assert (out["diverged_step"] >= 0).all()
    d = out["diverged_step"]
    assert out["logged"] == d.max() + 1 < 201  # stopped once every network diverged
    F0 = out["loss"][0]
    for m in range(2):  # what was logged before the divergence is kept, NaN after
        assert np.isfinite(out["loss"][: d[m], m]).all()
        assert (out["loss"][: d[m], m] <= DIVERGENCE_FACTOR * F0[m]).all()
        at = out["loss"][d[m], m]  # the diverging value itself is kept
        assert not np.isfinite(at) or at > DIVERGENCE_FACTOR * F0[m]
        assert not np.isfinite(out["loss"][d[m] + 1 :, m]).any()
        assert np.isnan(out["train_acc"][d[m] :, m]).all()


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_finite_blow_up_is_divergence_too(data, trainer):
    """lr 1e6 sends the cross-entropy to ~1e5 at chance accuracy without overflowing: diverged."""
    out = TRAINERS[trainer](
        init_mlp([0], 2, 20, 3), data, spec_for(1, 1.0, 10, steps=400, lr=1e6, log_every=1)
    )
    d = int(out["diverged_step"][0])
    assert 0 < d < ft.GAMMA_CHUNK and np.isfinite(out["loss"][d, 0])


def test_logging_interval_and_buffer_do_not_change_the_numbers(data, monkeypatch):
    """Rows are the same numbers whatever the logging interval, the validation interval and the
    size of the buffer that batches their metrics (a one-row buffer flushes at every row)."""
    params = init_mlp([0, 1], 2, 10, 3)
    every = ft.train_block(params, data, spec_for(2, 6.0, 9, steps=300, log_every=1))
    spec = spec_for(2, 6.0, 9, steps=300, log_every=7)
    spec.val_every = 21
    monkeypatch.setattr(ft, "LOG_BUFFER_BYTES", 1)
    sparse = ft.train_block(params, data, spec)
    rows = np.searchsorted(every["step"], sparse["step"])
    np.testing.assert_array_equal(sparse["step"], every["step"][rows])
    for f in ("loss", "dloss", "loss_static", "train_acc"):
        np.testing.assert_array_equal(sparse[f], every[f][rows], err_msg=f)
    for f in ("val_acc", "val_loss"):  # at multiples of 21 and at the last step; NaN elsewhere
        seen = (sparse["step"] % 21 == 0) | (sparse["step"] == 300)
        np.testing.assert_array_equal(sparse[f][seen], every[f][rows][seen], err_msg=f)
        assert np.isnan(sparse[f][~seen]).all()
    for k in params:
        np.testing.assert_array_equal(sparse["params"][k], every["params"][k])


def test_validation_sets_share_the_arms_and_differ_along_them():
    X, y = sp.make_spiral_train()
    radius = {n: np.linalg.norm(sp.make_spiral_val(n)[0], axis=1) for n in sp.VAL_SETS}
    assert radius["inner"].mean() < radius["uniform"].mean() < radius["outer"].mean()
    np.testing.assert_allclose(np.sort(radius["reseed"]), np.sort(np.linalg.norm(X, axis=1)))
    for name in sp.VAL_SETS:  # the same arms: a point's angle is its class's start + 4 pi r + noise
        Xv, yv = sp.make_spiral_val(name)
        assert (np.bincount(yv) == 100).all()
        r = np.linalg.norm(Xv, axis=1)
        resid = np.arctan2(Xv[:, 1], Xv[:, 0]) - 2 * np.pi * yv / 3 - 4 * np.pi * r
        resid = (resid + np.pi) % (2 * np.pi) - np.pi  # wrapped to (-pi, pi]
        assert (np.abs(resid[r > 0]) < 5 * sp.SPIRAL_NOISE).mean() > 0.99
    nn = {n: sp.nearest_neighbour_accuracy(X, y, *sp.make_spiral_val(n)) for n in sp.VAL_SETS}
    assert nn["inner"] < min(nn["uniform"], nn["outer"], nn["reseed"])  # the centre is harder
    with pytest.raises(ValueError, match="unknown validation set"):
        sp.make_spiral_val("middle")


def _die(*args, xp=None, progress=None):
    """A job whose worker is killed (as by the kernel's out-of-memory killer)."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def test_a_worker_that_dies_ends_the_run_instead_of_hanging():
    with pytest.raises(ChildProcessError, match="worker process died"):
        workers.run_jobs(_die, [(1,), (2,)], workers=2)


def _pausable(k, xp=None, progress=None, should_pause=None):
    """A job that takes should_pause (run_jobs' pause=True), as the phase batches do."""
    return ("paused" if should_pause() else "done", k)


@pytest.mark.parametrize("fork", [True, False], ids=["processes", "threads"])
def test_pausable_jobs_run_in_processes_and_in_threads(monkeypatch, fork):
    """Where fork is unavailable the jobs run in threads: they get should_pause there too."""
    monkeypatch.setattr(workers, "_can_fork", lambda: fork)
    got = workers.run_jobs(_pausable, [(1,), (2,), (3,)], workers=2, pause=True)
    assert got == [("done", 1), ("done", 2), ("done", 3)]


def test_stop_steps_make_the_final_period_static():
    assert sp.stop_steps(100, 30.0) == 70 and sp.stop_steps(100, 300.0) == 0
    np.testing.assert_array_equal(sp.stop_steps(100, np.array([10.0, 200.0])), [90, 0])
    assert sp.stop_steps(100, 30.0, oscillate_to_end=True) == 101


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_the_reference_loop_and_the_fast_trainer_log_the_same_run(data, loss):
    """Every logged array of spiral.train_reference equals the fast trainer's to LOGS_RTOL: three
    networks with their own A, T and stop steps, validation every third logged step."""
    params = init_mlp([0, 1, 2], 2, 30, 3)
    spec = spec_for(3, 1.0, 10, steps=400, log_every=4, loss=loss)
    spec.A, spec.T = np.array([1.0, 10.0, 30.0]), np.array([50.0, 40.0, 90.0])
    spec.stop_step, spec.val_every = np.array([401, 300, 350]), 12
    seen = []
    fast = ft.train_block(params, data, spec)
    ref = sp.train_reference(params, data, spec, on_log=lambda t, p: seen.append(t))
    assert sorted(fast) == sorted(ref) and ref["logged"] == fast["logged"] == 101
    np.testing.assert_array_equal(seen, fast["step"])  # on_log at every logged step
    for f in ("step", "gamma", "diverged_step"):
        np.testing.assert_array_equal(ref[f], fast[f], err_msg=f)
    for f in sp.LOG_FIELDS:  # NaN where nothing was measured, in both
        np.testing.assert_array_equal(np.isnan(ref[f]), np.isnan(fast[f]), err_msg=f)
        ok = np.isfinite(fast[f])
        np.testing.assert_allclose(ref[f][ok], fast[f][ok], rtol=LOGS_RTOL, atol=0, err_msg=f)
    for k in params:
        np.testing.assert_allclose(ref["params"][k], fast["params"][k], rtol=LOGS_RTOL, atol=1e-12)
