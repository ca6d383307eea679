"""Second-order tools: the MLP's Jacobian and R-operator (models.py), the exact Hessian, its
Gauss-Newton part, the NTK, eigensolvers, SLQ and the trace (spectra.py), and the tracker's fused
copies of them (fast/mlp_spectra.py) tied to those references."""

import numpy as np
import pytest
from helpers import tiny_problem

import spectra
from beyond import density as slq
from beyond.smooth import softplus
from dynloss import class_weights, logit_curvature, loss_backward, loss_forward
from fast import mlp_spectra as fs
from models import (
    flatten,
    init_mlp,
    mlp_forward,
    mlp_hvp,
    mlp_jvp,
    mlp_loss_and_grads,
    unflatten,
)

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


def analytic_grad(theta, like, X, y, gamma, loss):
    """Flat gradient (P,) of F at theta (P,) from models.mlp_loss_and_grads."""
    params = unflatten(theta[None], like)
    return flatten(mlp_loss_and_grads(params, X, y, gamma[None], loss)[1])[0]


def logits_at(theta, like, X):
    """Flat logits (N*K,), row n*K + k, at theta (P,)."""
    return mlp_forward(X, unflatten(theta[None], like))[0].ravel()


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
    gn, network = spectra.hessian(params, X, y, GAMMA_A10, loss, parts=True)
    assert np.abs(network).max() > 1e3 * FD_RTOL * np.abs(hess).max()
    assert rel_err(gn + network, hess) == 0


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_gauss_newton_is_j_transpose_logit_hessian_j(loss):
    """spectra.gauss_newton's factored V^T V against J^T (d2F/dz2) J with the logit Hessian
    written out block by block from dynloss.logit_curvature."""
    params, X, y = tiny_problem(seed=11)
    J = spectra.logits_jacobian(params, X)  # (N*K, P)
    logits, _ = mlp_forward(X, params)
    _, lcache = loss_forward(logits, y, GAMMA_A10[None], loss)
    w, p = logit_curvature(lcache)
    hz = np.zeros((N * K, N * K))
    for n in range(N):
        block = np.eye(K) if p is None else np.diag(p[0, n]) - np.outer(p[0, n], p[0, n])
        hz[n * K : (n + 1) * K, n * K : (n + 1) * K] = w[0, n] * block
    gn = spectra.gauss_newton(J, (w, p))
    assert rel_err(gn, J.T @ hz @ J) < EXACT_RTOL
    assert rel_err(gn, spectra.hessian(params, X, y, GAMMA_A10, loss, parts=True)[0]) == 0
    # the loss-weighted NTK has the Gauss-Newton part's nonzero spectrum
    top = np.linalg.eigvalsh(spectra.weighted_ntk(params, X, y, GAMMA_A10, loss))[-5:]
    np.testing.assert_allclose(top, np.linalg.eigvalsh(gn)[-5:], rtol=1e-10)


def test_jvp_matches_central_differences_of_the_logits_and_networks_are_independent():
    params, X, y = tiny_problem(seed=12)
    theta = flatten(params)[0]
    v = np.random.default_rng(3).normal(size=P)
    _, cache = mlp_forward(X, params)
    Jv = mlp_jvp(params, cache, unflatten(v[None], params)).ravel()
    numeric = logits_at(theta + FD_STEP * v, params, X) - logits_at(theta - FD_STEP * v, params, X)
    assert rel_err(Jv, numeric / (2 * FD_STEP)) < FD_RTOL
    assert rel_err(Jv, spectra.logits_jacobian(params, X) @ v) < EXACT_RTOL
    # two networks at once (a leading M axis): each network's HVP is its own
    two = init_mlp([0, 1], D, H, K, init="glorot")
    V = {k: np.random.default_rng(4).normal(size=a.shape) for k, a in two.items()}
    gamma2 = np.stack([GAMMA_A10, np.ones(K)])
    both = mlp_hvp(two, X, y, gamma2, V)
    for m in range(2):
        one = mlp_hvp({k: a[m : m + 1] for k, a in two.items()}, X, y, gamma2[m : m + 1],
                      {k: a[m : m + 1] for k, a in V.items()})  # fmt: skip
        for k in one:
            np.testing.assert_allclose(both[k][m], one[k][0], rtol=EXACT_RTOL, atol=EXACT_RTOL)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_fast_forward_state_and_loss_terms_are_models_and_dynloss(loss):
    params, X, y = tiny_problem(seed=1)
    s = fs.net_state(params, X)
    logits, (_, (_, h1), _) = mlp_forward(X, params)
    np.testing.assert_array_equal(s["logits"], logits[0])  # the same forward pass, bit for bit
    np.testing.assert_array_equal(s["mask"], h1[0] > 0)
    np.testing.assert_array_equal(s["W1a"], np.vstack([params["W1"][0], params["b1"][0]]))
    H = params["W1"].shape[2]
    fast = fs.net_state(params, X, work={"h1": np.empty((N, H)), "mask": np.empty((N, H))})
    for k in ("mask", "h1", "logits"):  # the tracker's buffered pass: the same up to rounding
        np.testing.assert_allclose(fast[k], s[k], rtol=EXACT_RTOL, atol=EXACT_RTOL, err_msg=k)
    g, w, p, _ = fs.loss_terms(s, y, GAMMA_A10, loss)
    _, cache = loss_forward(logits, y, GAMMA_A10[None], loss)
    np.testing.assert_array_equal(g, loss_backward(cache)[0])
    np.testing.assert_allclose(w, GAMMA_A10[y] / N, rtol=EXACT_RTOL)
    assert (p is None) == (loss == "mse")
    with pytest.raises(ValueError, match="unknown loss"):
        fs.loss_terms(s, y, GAMMA_A10, "hinge")


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
    # the tracker's fused HVP (fast/mlp_spectra.py) against the R-operator of models.mlp_hvp
    fused = fs.hessian_matvec(fs.net_state(params, X), y, GAMMA_A10, loss)
    assert rel_err(fused(v), spectra.hvp(params, X, y, GAMMA_A10, v, loss)) < EXACT_RTOL
    for beta in (4.0, 20.0):  # softplus: the fused copy with the activation-curvature term
        act = softplus(beta)
        fused = fs.hessian_matvec(fs.net_state(params, X, act=act), y, GAMMA_A10, loss)
        reference = spectra.hvp(params, X, y, GAMMA_A10, v, loss, act=act)
        assert rel_err(fused(v), reference) < EXACT_RTOL


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
    vals, vecs = spectra.hessian_top_eigs(params, X, y, GAMMA_A10, n_eig=3, tol=1e-10)
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

    prev = spectra.hessian_top_eigs(params, X, y, class_weights(29, 10.0, 50.0, K), n_eig=1)[1]
    cold = spectra.top_eigs(counted("cold"), P, n_eig=1, tol=1e-10)[0]
    warm = spectra.top_eigs(counted("warm"), P, n_eig=1, v0=prev, tol=1e-10)[0]
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
    vals, vecs = spectra.top_eigs(lambda v: A @ v, 40, n_eig=2, tol=1e-12)
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
    # the tracker's fused NTK products (fast/mlp_spectra.py) against the references
    s = fs.net_state(params, X)
    assert rel_err(fs.ntk_matvec(s)(u), theta_ntk @ u) < EXACT_RTOL
    assert rel_err(fs.ntk_traced_matvec(s)(u[:N]), traced @ u[:N]) < EXACT_RTOL
    # ... and the reference product that `tracker --reference` uses in its place
    assert rel_err(spectra.ntk_traced_matvec(params, X)(u[:N]), traced @ u[:N]) < EXACT_RTOL
    lam, vec = spectra.ntk_top_eig(params, X, tol=1e-10)
    np.testing.assert_allclose(lam, eig[-1], rtol=EIG_RTOL)
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
    mask0 = mlp_forward(X, params)[1][1][1] > 0  # the ReLU's cache h1: 1[z1 > 0]
    residuals = []
    for eta in (4e-3, 2e-3, 1e-3):
        step = theta - eta * analytic_grad(theta, params, X, y, gamma, "mse")
        moved = unflatten(step[None], params)
        assert np.array_equal(mlp_forward(X, moved)[1][1][1] > 0, mask0)  # no kink crossed
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
    grid, density, nodes, weights = slq.spectral_density(
        lambda v: hess @ v, P, np.random.default_rng(0), m=steps, n_probes=probes
    )
    assert nodes.shape == weights.shape == (probes, steps)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
    dx = np.diff(grid)
    integrate = lambda f: np.sum(0.5 * (f[1:] + f[:-1]) * dx)
    np.testing.assert_allclose(integrate(density), 1.0, rtol=1e-12)
    # m Lanczos nodes integrate polynomials up to degree 2m - 1 exactly for each probe, so the
    # moments differ from the exact ones only by the probes' sampling error (4 standard errors)
    sigma = slq.SLQ_SIGMA * (nodes.max() - nodes.min())
    mean, second = integrate(grid * density), integrate(grid**2 * density) - sigma**2
    assert abs(mean - exact.mean()) < 4 * sphere_quadratic_std(hess, probes)
    assert abs(second - (exact**2).mean()) < 4 * sphere_quadratic_std(hess @ hess, probes)
    # the quadrature nodes reach the extreme eigenvalues
    np.testing.assert_allclose([nodes.max(), nodes.min()], exact[[-1, 0]], rtol=1e-6)


def test_lanczos_is_orthonormal_and_stops_at_an_invariant_subspace():
    A = np.diag(np.repeat([1.0, 2.0, 5.0], 4))  # three distinct eigenvalues: Krylov dimension 3
    alpha, beta, Q = spectra.lanczos(lambda v: A @ v, np.ones(12), 10)
    assert len(alpha) == 3 and len(beta) == 3 and beta[-1] < 1e-10  # the residual vanishes
    np.testing.assert_allclose(Q.T @ Q, np.eye(3), atol=1e-14)
    T = np.diag(alpha) + np.diag(beta[:-1], 1) + np.diag(beta[:-1], -1)
    np.testing.assert_allclose(np.linalg.eigvalsh(T), [1.0, 2.0, 5.0], rtol=1e-12)


def test_hutchinson_trace_is_within_its_standard_error():
    params, X, y = tiny_problem(seed=8)
    hess = spectra.hessian(params, X, y, GAMMA_A10)
    n_probes = 200
    est, stderr = slq.hutchinson_trace(lambda v: hess @ v, P, np.random.default_rng(1), n_probes)
    # Rademacher probes: Var(z^T A z) = 2 (|A|_F^2 - sum_i A_ii^2)
    std = np.sqrt(2 * ((hess**2).sum() - (np.diag(hess) ** 2).sum()) / n_probes)
    assert abs(est - np.trace(hess)) < 4 * std
    np.testing.assert_allclose(stderr, std, rtol=0.3)


def test_mse_hessian_top_equals_ntk_top_over_n_without_the_network_term():
    """Gauss-Newton part of the MSE Hessian at Gamma = 1 is J^T J / N: same top as Theta / N."""
    params, X, y = tiny_problem(seed=9)
    gn, _ = spectra.hessian(params, X, y, np.ones(K), "mse", parts=True)
    np.testing.assert_allclose(
        np.linalg.eigvalsh(gn)[-1], np.linalg.eigvalsh(spectra.ntk(params, X))[-1] / N, rtol=1e-10
    )


def test_every_spectra_operator_takes_the_activation():
    """The NTK and Hessian operators of a softplus network equal the dense matrices of the same
    network (a silent ReLU inside an operator would be off by tens of percent at beta 5)."""
    params, X, y = tiny_problem(seed=11, kink=0.0)
    act = softplus(5.0)
    theta = spectra.ntk(params, X, act=act)
    traced = spectra.ntk_traced(params, X, act=act)
    hess = spectra.hessian(params, X, y, GAMMA_A10, act=act)
    rng = np.random.default_rng(3)
    u, w = rng.normal(size=len(theta)), rng.normal(size=len(traced))
    assert rel_err(spectra.ntk_matvec(params, X, act)(u), theta @ u) < EXACT_RTOL
    assert rel_err(spectra.ntk_operator(params, X, act).matvec(u), theta @ u) < EXACT_RTOL
    assert rel_err(spectra.ntk_traced_matvec(params, X, act)(w), traced @ w) < EXACT_RTOL
    lam, _ = spectra.ntk_top_eig(params, X, act=act, tol=1e-12)
    assert lam == pytest.approx(np.linalg.eigvalsh(theta)[-1], rel=1e-8)
    vals, _ = spectra.hessian_top_eigs(params, X, y, GAMMA_A10, act=act, tol=1e-12)
    assert vals[0] == pytest.approx(np.linalg.eigvalsh(hess)[-1], rel=1e-8)
    relu = spectra.ntk_matvec(params, X)(u)  # the same network read with ReLU: another answer
    assert rel_err(relu, theta @ u) > 1e-3
