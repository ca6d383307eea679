"""Second-order tools of spectra.py: exact Hessian, R-operator, NTK, eigensolvers, SLQ, stability."""

import numpy as np
import pytest

import spectra
from dynloss import class_weights, loss_backward, loss_forward
from models import flatten, init_mlp, mlp_loss_and_grads, unflatten
from run_spiral import TrainSpec, train_block

N, D, H, K = 20, 2, 8, 3
P = D * H + H + H * K + K  # 51
FD_STEP = 1e-6  # central-difference step in float64
FD_RTOL = 1e-6  # relative error allowed against central differences (truncation ~ h^2, roundoff)
EXACT_RTOL = 1e-12  # two exact float64 evaluations of the same quantity in different orders
KINK = 1e-3  # pre-activations closer than this to 0 would make central differences cross the kink
EIG_RTOL = 1e-8  # eigsh / Lanczos at tol 1e-10 against dense eigh (error ~ tol^2 / gap)
TRACK_RTOL = 1e-5  # the tracker runs at residual 1e-3; its eigenvalue error ~ residual^2 / gap
GAMMA_A10 = class_weights(30, 10.0, 50.0, K)  # A = 10: class 0 emphasised, weights ~(1.9, .6, .6)


def rel_err(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-300)


def tiny_problem(seed=0, kink=KINK):
    """One glorot MLP (M = 1) 2 -> 8 -> 3 and N = 20 inputs whose pre-activations avoid the kink."""
    params = init_mlp([seed], D, H, K, init="glorot")
    rng = np.random.default_rng(seed)
    while True:
        X = rng.normal(size=(N, D))
        if np.abs(X @ params["W1"][0] + params["b1"][0]).min() > kink:
            break
    y = np.arange(N) % K
    return params, X, y


def analytic_grad(theta, like, X, y, gamma, loss):
    """Flat gradient (P,) of F at theta (P,) from models.mlp_loss_and_grads."""
    params = unflatten(theta[None], like)
    return flatten(mlp_loss_and_grads(params, X, y, gamma[None], loss)[1])[0]


def logits_at(theta, like, X):
    """Flat logits (N*K,), row n*K + k, at theta (P,)."""
    return spectra.net_state(unflatten(theta[None], like), X)["logits"].ravel()


def central_jacobian(f, theta):
    """Central differences of the vector function f at theta: (len(f), P), column by column."""
    cols = []
    for i in range(len(theta)):
        e = np.zeros_like(theta)
        e[i] = FD_STEP
        cols.append((f(theta + e) - f(theta - e)) / (2 * FD_STEP))
    return np.stack(cols, axis=1)


# ---------------------------------------------------------------------------------------------
# Exact Hessian and R-operator
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_exact_hessian_matches_central_differences_of_the_gradient(loss):
    params, X, y = tiny_problem()
    theta = flatten(params)[0]
    hess = spectra.hessian(params, X, y, GAMMA_A10, loss)
    assert hess.shape == (P, P)
    assert rel_err(hess, hess.T) < EXACT_RTOL
    numeric = central_jacobian(lambda t: analytic_grad(t, params, X, y, GAMMA_A10, loss), theta)
    assert rel_err(hess, numeric) < FD_RTOL
    # the network's own second-derivative term (the W1a-W2 cross blocks) is not negligible, so
    # a Gauss-Newton-only Hessian would fail the check above
    s = spectra.net_state(params, X)
    g, _, _ = spectra.loss_curvature(s["logits"], y, GAMMA_A10, loss)
    cross = spectra.cross_terms(s["xa"], s["mask"], g)
    assert np.abs(cross).max() > 1e3 * FD_RTOL * np.abs(hess).max()


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_loss_curvature_gradient_is_dynloss_gradient(loss):
    params, X, y = tiny_problem(seed=1)
    logits = spectra.net_state(params, X)["logits"]
    g, w, p = spectra.loss_curvature(logits, y, GAMMA_A10, loss)
    _, cache = loss_forward(logits[None], y, GAMMA_A10[None], loss)
    np.testing.assert_allclose(g, loss_backward(cache)[0], rtol=EXACT_RTOL, atol=1e-17)
    np.testing.assert_allclose(w, GAMMA_A10[y] / N, rtol=EXACT_RTOL)
    with pytest.raises(ValueError, match="unknown loss"):
        spectra.loss_curvature(logits, y, GAMMA_A10, "hinge")


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_hvp_on_identity_columns_reproduces_the_hessian(loss):
    params, X, y = tiny_problem(seed=2)
    hess = spectra.hessian(params, X, y, GAMMA_A10, loss)
    cols = [spectra.hvp(params, X, y, GAMMA_A10, e, loss) for e in np.eye(P)]
    assert rel_err(np.stack(cols, axis=1), hess) < EXACT_RTOL
    op = spectra.hessian_operator(params, X, y, GAMMA_A10, loss)
    assert op.shape == (P, P) and op.dtype == np.float64
    v = np.random.default_rng(0).normal(size=P)
    assert rel_err(op.matvec(v), hess @ v) < EXACT_RTOL


def test_single_network_only():
    params = init_mlp([0, 1], D, H, K)
    with pytest.raises(ValueError, match="one network"):
        spectra.hessian(params, np.zeros((3, D)), np.zeros(3, dtype=int), np.ones(K))


# ---------------------------------------------------------------------------------------------
# Top eigenpairs
# ---------------------------------------------------------------------------------------------


def test_hessian_top_eigs_match_eigh_and_warm_start():
    params, X, y = tiny_problem(seed=3)
    hess = spectra.hessian(params, X, y, GAMMA_A10)
    exact_vals, exact_vecs = np.linalg.eigh(hess)
    vals, vecs = spectra.hessian_top_eigs(params, X, y, GAMMA_A10, k=3, tol=1e-10)
    np.testing.assert_allclose(vals, exact_vals[::-1][:3], rtol=EIG_RTOL)
    overlap = np.abs(np.sum(vecs * exact_vecs[:, ::-1][:, :3], axis=0))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-6)

    # warm start from a slightly different Gamma's eigenvector: same value, fewer products
    count = {"cold": 0, "warm": 0}
    op = spectra.hessian_operator(params, X, y, GAMMA_A10)

    def counted(which):
        def mv(v):
            count[which] += 1
            return op.matvec(v)

        return mv

    prev = spectra.hessian_top_eigs(params, X, y, class_weights(29, 10.0, 50.0, K), k=1)[1]
    cold = spectra.top_eigs(counted("cold"), P, k=1, tol=1e-10)[0]
    warm = spectra.top_eigs(counted("warm"), P, k=1, v0=prev, tol=1e-10)[0]
    np.testing.assert_allclose([cold[0], warm[0]], exact_vals[-1], rtol=EIG_RTOL)
    assert count["warm"] < count["cold"]
    lam, vec, used = spectra.warm_top_eig(op.matvec, P, v0=prev, tol=1e-10)
    np.testing.assert_allclose(lam, exact_vals[-1], rtol=EIG_RTOL)
    assert abs(vec @ exact_vecs[:, -1]) > 1 - 1e-8


def test_top_eigs_is_largest_algebraic_for_any_matvec():
    # a dominant negative eigenvalue: which='LM' would return -50 first
    rng = np.random.default_rng(4)
    Q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    spectrum = np.concatenate([[-50.0], np.linspace(-1.0, 3.0, 39)])
    A = (Q * spectrum) @ Q.T
    vals, vecs = spectra.top_eigs(lambda v: A @ v, 40, k=2, tol=1e-12)
    np.testing.assert_allclose(vals, [3.0, spectrum[-2]], rtol=EIG_RTOL)
    assert vecs.shape == (40, 2)
    lam, _, _ = spectra.warm_top_eig(lambda v: A @ v, 40, tol=1e-10)
    np.testing.assert_allclose(lam, 3.0, rtol=EIG_RTOL)


# ---------------------------------------------------------------------------------------------
# NTK (eq. 11) and the output dynamics (eq. 13)
# ---------------------------------------------------------------------------------------------


def test_ntk_is_jacobian_gram_psd_and_traced_is_block_average():
    params, X, y = tiny_problem(seed=5)
    theta = flatten(params)[0]
    J_num = central_jacobian(lambda t: logits_at(t, params, X), theta)  # (N*K, P)
    J = spectra.logits_jacobian(params, X)
    assert J.shape == (N * K, P)
    assert rel_err(J, J_num) < FD_RTOL
    theta_ntk = spectra.ntk(params, X)
    assert theta_ntk.shape == (N * K, N * K)
    assert rel_err(theta_ntk, J_num @ J_num.T) < FD_RTOL
    assert rel_err(theta_ntk, J @ J.T) < EXACT_RTOL
    eig = np.linalg.eigvalsh(theta_ntk)
    assert eig.min() > -EXACT_RTOL * eig.max()
    blocks = theta_ntk.reshape(N, K, N, K)
    traced = spectra.ntk_traced(params, X)
    average = np.mean([blocks[:, k, :, k] for k in range(K)], axis=0)
    assert rel_err(traced, average) < EXACT_RTOL
    # operators and warm-startable top eigenvalues
    u = np.random.default_rng(0).normal(size=N * K)
    assert rel_err(spectra.ntk_operator(params, X).matvec(u), theta_ntk @ u) < EXACT_RTOL
    assert rel_err(spectra.ntk_traced_operator(params, X).matvec(u[:N]), traced @ u[:N]) < (
        EXACT_RTOL
    )
    lam, vec = spectra.ntk_top_eig(params, X, tol=1e-10)
    np.testing.assert_allclose(lam, eig[-1], rtol=EIG_RTOL)
    lam_tr, _ = spectra.ntk_traced_top_eig(params, X, tol=1e-10)
    np.testing.assert_allclose(lam_tr, np.linalg.eigvalsh(traced)[-1], rtol=EIG_RTOL)
    lam_warm, _ = spectra.ntk_top_eig(params, X, v0=vec, tol=1e-10)
    np.testing.assert_allclose(lam_warm, eig[-1], rtol=EIG_RTOL)


@pytest.mark.parametrize("gamma", [np.ones(K), GAMMA_A10], ids=["A=1", "A=10"])
def test_one_mse_gradient_step_moves_outputs_by_minus_eta_over_n_theta_g(gamma):
    """Eq. (13)-(14): z(t+1) - z(t) = -(eta/N) Theta (Gamma_y g) + O(eta^2), g = z - onehot(y)."""
    params, X, y = tiny_problem(seed=6, kink=0.05)
    theta = flatten(params)[0]
    z = logits_at(theta, params, X).reshape(N, K)
    g = z - np.eye(K)[y]  # eq. (12)
    predicted_per_eta = -(spectra.ntk(params, X) @ (gamma[y][:, None] * g).ravel()) / N
    mask0 = spectra.net_state(params, X)["mask"]
    residuals = []
    for eta in (4e-3, 2e-3, 1e-3):
        step = theta - eta * analytic_grad(theta, params, X, y, gamma, "mse")
        moved = unflatten(step[None], params)
        assert np.array_equal(spectra.net_state(moved, X)["mask"], mask0)  # no kink crossed
        dz = logits_at(step, params, X) - z.ravel()
        residuals.append(np.linalg.norm(dz - eta * predicted_per_eta))
        assert residuals[-1] < 1e-2 * np.linalg.norm(dz)
    ratios = np.array(residuals[:-1]) / np.array(residuals[1:])
    np.testing.assert_allclose(ratios, 4.0, rtol=0.05)  # halving eta quarters the residual


# ---------------------------------------------------------------------------------------------
# Spectral density (SLQ) and Hutchinson's trace
# ---------------------------------------------------------------------------------------------


def sphere_quadratic_std(A, n_probes):
    """Standard error of the mean of v^T A v / |v|^2 over n_probes Gaussian probes."""
    ev = np.linalg.eigvalsh(A)
    n = len(ev)
    return np.sqrt(2.0 / (n + 2) * ((ev**2).mean() - ev.mean() ** 2) / n_probes)


def test_slq_density_integrates_to_one_and_matches_the_moments():
    params, X, y = tiny_problem(seed=7)
    hess = spectra.hessian(params, X, y, GAMMA_A10)
    exact = np.linalg.eigvalsh(hess)
    probes, steps = 30, 20
    grid, density, nodes, weights = spectra.spectral_density(
        lambda v: hess @ v, P, np.random.default_rng(0), m=steps, n_probes=probes
    )
    assert nodes.shape == weights.shape == (probes, steps)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
    dx = np.diff(grid)
    integrate = lambda f: np.sum(0.5 * (f[1:] + f[:-1]) * dx)
    np.testing.assert_allclose(integrate(density), 1.0, rtol=1e-12)
    # m Lanczos nodes integrate polynomials up to degree 2m - 1 exactly for each probe, so the
    # moments differ from the exact ones only by the probes' sampling error (4 standard errors)
    sigma = spectra.SLQ_SIGMA * (nodes.max() - nodes.min())
    mean, second = integrate(grid * density), integrate(grid**2 * density) - sigma**2
    assert abs(mean - exact.mean()) < 4 * sphere_quadratic_std(hess, probes)
    assert abs(second - (exact**2).mean()) < 4 * sphere_quadratic_std(hess @ hess, probes)
    # the quadrature nodes reach the extreme eigenvalues
    np.testing.assert_allclose([nodes.max(), nodes.min()], exact[[-1, 0]], rtol=1e-6)


def test_lanczos_is_orthonormal_and_stops_at_an_invariant_subspace():
    A = np.diag(np.repeat([1.0, 2.0, 5.0], 4))  # three distinct eigenvalues: Krylov dimension 3
    alpha, beta, Q = spectra.lanczos(lambda v: A @ v, np.ones(12), 10)
    assert len(alpha) == 3 and len(beta) == 2
    np.testing.assert_allclose(Q.T @ Q, np.eye(3), atol=1e-14)
    T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
    np.testing.assert_allclose(np.linalg.eigvalsh(T), [1.0, 2.0, 5.0], rtol=1e-12)


def test_hutchinson_trace_is_within_its_standard_error():
    params, X, y = tiny_problem(seed=8)
    hess = spectra.hessian(params, X, y, GAMMA_A10)
    n_probes = 200
    est, stderr = spectra.hutchinson_trace(
        lambda v: hess @ v, P, np.random.default_rng(1), n_probes
    )
    # Rademacher probes: Var(z^T A z) = 2 (|A|_F^2 - sum_i A_ii^2)
    std = np.sqrt(2 * ((hess**2).sum() - (np.diag(hess) ** 2).sum()) / n_probes)
    assert abs(est - np.trace(hess)) < 4 * std
    np.testing.assert_allclose(stderr, std, rtol=0.3)


# ---------------------------------------------------------------------------------------------
# Stability picture
# ---------------------------------------------------------------------------------------------


def test_bifurcation_episodes_on_a_synthetic_loss():
    t = np.arange(400)
    F = 1.0 / (1.0 + 0.01 * t)  # smooth descent: no flips
    assert len(spectra.bifurcation_episodes(F)[0]) == 0
    bounce = np.zeros_like(F)
    bounce[100:161] = 0.05 * (-1.0) ** t[100:161]  # period two from step 100 to 160
    bounce[250:301] = 0.02 * (-1.0) ** t[250:301]  # and from 250 to 300
    starts, ends = spectra.bifurcation_episodes(F + bounce)
    np.testing.assert_array_equal(starts, [100, 250])
    np.testing.assert_array_equal(ends, [161, 301])
    # logged steps with offsets; a gap in the log breaks the episode
    starts, ends = spectra.bifurcation_episodes(F + bounce, step=t + 1000)
    np.testing.assert_array_equal(starts, [1100, 1250])
    keep = t != 130
    starts, ends = spectra.bifurcation_episodes((F + bounce)[keep], step=t[keep])
    np.testing.assert_array_equal(starts, [100, 133, 250])  # dF(131) needs F(130)
    np.testing.assert_array_equal(ends, [129, 161, 301])
    # roundoff-level wiggles are not bounces
    wiggle = 1e-14 * (-1.0) ** t
    assert len(spectra.bifurcation_episodes(np.full(400, 0.3) + wiggle)[0]) == 0


def test_hessian_threshold_on_synthetic_lambda_max():
    t = np.arange(600) * 25  # tracked every 25 steps, as in the authors' notebook
    base = 1.0 + 0.004 * np.arange(600)  # smooth growth: steps of 0.004 < 0.1
    bounce = np.zeros(600)
    bounce[100:152] = 0.3 * (-1.0) ** np.arange(100, 152)  # +0.3 at 100 ... -0.3 at 151
    bounce[400:461] = 0.3 * (-1.0) ** np.arange(400, 461)  # +0.3 at 400 ... +0.3 at 460
    threshold, starts, ends = spectra.hessian_threshold(t, base + bounce)
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
    assert np.isnan(spectra.hessian_threshold(t, base)[0])
    # a fast but smooth fall (steps of -0.2, no bouncing) is not an instability
    assert np.isnan(spectra.hessian_threshold(t, 200.0 - 0.2 * np.arange(600))[0])


def test_stability_helpers():
    assert spectra.gd_threshold(0.5) == 4.0
    assert spectra.ntk_threshold(1.0, 300) == 600.0
    np.testing.assert_allclose(
        spectra.ntk_multiplier([150.0, 600.0, 900.0], 1.0, 300), [0.5, -1, -2]
    )


def test_mse_hessian_top_equals_ntk_top_over_n_without_the_network_term():
    """Gauss-Newton part of the MSE Hessian at Gamma = 1 is J^T J / N: same top as Theta / N."""
    params, X, y = tiny_problem(seed=9)
    s = spectra.net_state(params, X)
    hess = spectra.hessian(params, X, y, np.ones(K), "mse")
    g, _, _ = spectra.loss_curvature(s["logits"], y, np.ones(K), "mse")
    cross = spectra.cross_terms(s["xa"], s["mask"], g)  # (D+1, H, K)
    rows = (np.arange(D + 1)[:, None, None] * H + np.arange(H)[None, :, None]).repeat(K, 2)
    cols = D * H + H + np.arange(H)[None, :, None] * K + np.arange(K)[None, None, :]
    cols = np.broadcast_to(cols, rows.shape)
    hess[rows.ravel(), cols.ravel()] -= cross.ravel()
    hess[cols.ravel(), rows.ravel()] -= cross.ravel()
    np.testing.assert_allclose(
        np.linalg.eigvalsh(hess)[-1], np.linalg.eigvalsh(spectra.ntk(params, X))[-1] / N, rtol=1e-10
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
    tracker = spectra.SpectraTracker(X, y, spec, k=k)
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
    tracker = spectra.SpectraTracker(X, y, spec)
    bad = {name: np.full_like(a, np.nan) for name, a in params.items()}
    tracker(0, params)
    tracker(1, bad)
    tracker(2, params)
    assert np.isnan(tracker.hess_lmax[1]) and np.isnan(tracker.ntk_lmax[1])
    np.testing.assert_allclose(tracker.hess_lmax[2], tracker.hess_lmax[0], rtol=EIG_RTOL)
