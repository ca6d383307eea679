"""Spectra of one spiral MLP (Figs. 4 and 5): the exact Hessian, its Gauss-Newton part, the NTK
(eqs. 11-14), and Lanczos for the top eigenpairs.

Symbols
-------
N  samples;  D  input dimension;  H  hidden units;  K  classes
P  parameters of one network, D*H + H + H*K + K, flattened by ``models.flatten`` in the order
   W1 (D, H) row-major, b1 (H,), W2 (H, K) row-major, b2 (K,)
k  a logit (0..K-1);  n_eig  eigenpairs;  m  Lanczos steps
G  the Gauss-Newton factor, G^T G = J^T Hz J;  v, V  a direction (flat (P,), or a params dict)

Everything here is for ONE network: ``params`` is a models.py dict with a leading axis M = 1
(W1 (1, D, H), ...); vectors over parameters are flat float64 (P,) arrays in the order of
``models.flatten(params)[0]``. Host (NumPy) only: these feed scipy. The derivatives come from
models.py (the MLP's Jacobian, R-operator and network term) and dynloss.py (the loss's curvature
in the logits); this module assembles them into matrices and operators and finds their spectra.

The Hessian and its Gauss-Newton part
-------------------------------------
d2F/dtheta2 = J^T Hz J + (the network term, models.mlp_network_term), with J the logit Jacobian
(N*K, P) and Hz the block-diagonal logit curvature, Hz_n = w_n (diag(s_n) - s_n s_n^T) with
w_n = Gamma_{y_n} / N, s_n = softmax(z_n) (MSE: w_n I_K). Since diag(s) - s s^T = L L^T with
L = (I - s 1^T) diag(sqrt s) (multiply out and use 1^T s = 1), J^T Hz J = G^T G with the blocks
G_n = sqrt(w_n) diag(sqrt s_n) (J_n - 1 (s_n^T J_n)) (K, P), J_n (K, P) the rows of sample n and
1 (K,) ones: one product of rank N*K, no loop over samples.

The NTK (eq. 11) and its links to the Hessian
---------------------------------------------
Theta = J J^T (N*K, N*K), sample-major (row n*K + k); the traced NTK averages its K logit blocks,
(1/K) sum_k Theta[(n,k), (n',k)] (N, N), the kernel the authors' notebook plotted. Under gradient
descent with learning rate eta the parameters move by dtheta = -eta J^T dF/dz, so the logits move
by dz = J dtheta = -eta Theta dF/dz to first order; for MSE
and Gamma = 1 that is eqs. (13)-(14), g <- (1 - (eta/N) Theta) g, unstable once an NTK eigenvalue
exceeds 2N/eta. J^T Hz J and Hz^(1/2) Theta Hz^(1/2) share their nonzero eigenvalues (the loss-
weighted NTK, :func:`weighted_ntk`): linearising dF/dz around the trajectory, a deviation of
the logits obeys dz <- (I - eta Theta Hz) dz, whose multipliers are 1 - eta times those
eigenvalues, so eq. (14)'s condition with this kernel reads eta lambda_max > 2, the Gauss-Newton
part's own threshold. For MSE with Gamma = 1 it is Theta / N (eq. 14 as printed), and gradient
descent on a quadratic is unstable once lambda_max > 2/eta (stability.py has these thresholds).

The Hessian's whole density (stochastic Lanczos quadrature) and trace go beyond the paper:
beyond/density.py.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg.lapack import dstev
from scipy.sparse.linalg import LinearOperator, eigsh

from dynloss import logit_curvature, loss_backward, loss_forward
from models import (
    RELU,
    flatten,
    mlp_backward,
    mlp_forward,
    mlp_hvp_operator,
    mlp_jacobian,
    mlp_jvp,
    mlp_network_term,
    unflatten,
)

EIGSH_TOL = 1e-6  # eigsh's relative residual: eigenvalue error <= tol*|lambda|, typically tol^2
EIGSH_NCV_MIN = 8  # a short Lanczos basis: warm starts converge within one or two restarts
LANCZOS_BREAKDOWN = 1e-10  # beta below this times |A q|: the Krylov space is invariant, stop
WARM_STEPS = 8  # warm_top_eig's Lanczos steps before a restart
WARM_RESTARTS = 100  # warm_top_eig gives up after this many restarts
START_SEED = 0  # the fixed random start vector of the eigen-solvers when none is given
TINY = np.finfo(np.float64).tiny  # guards a relative test against a zero scale


# ---------------------------------------------------------------------------------------------
# The Hessian: dense, its Gauss-Newton part, and as an operator
# ---------------------------------------------------------------------------------------------


def _one(params):
    """The M = 1 parameters as float64 arrays (a ValueError for any other M)."""
    if params["W1"].shape[0] != 1:
        raise ValueError(f"spectra works on one network (M = 1), got M = {params['W1'].shape[0]}")
    return {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}


def loss_state(params, X, y, gamma, loss="ce", act=RELU):
    """The forward pass and the loss's pieces in the logits: (cache, g = dF/dz (1, N, K),
    curvature (w (1, N), s (1, N, K) or None), lcache). X (N, D), y (N,), gamma (K,) class
    weights; act : the hidden activation (models.RELU)."""
    logits, cache = mlp_forward(np.asarray(X, dtype=np.float64), params, act)
    gamma = np.asarray(gamma, dtype=np.float64).reshape(1, -1)  # (1, K)
    _, lcache = loss_forward(logits, np.asarray(y), gamma, loss)
    return cache, loss_backward(lcache), logit_curvature(lcache), lcache


def logits_jacobian(params, X, act=RELU):
    """J = d logits / d theta of one MLP, (N*K, P), row n*K + k (models.mlp_jacobian).
    X : (N, D);  act : the hidden activation (models.RELU)."""
    one = _one(params)
    return mlp_jacobian(one, np.asarray(X, dtype=np.float64), act)[0]


def gn_factor(J, curvature):
    """G (N*K, P) with G^T G = J^T Hz J, from the Jacobian J (N*K, P) and the logit curvature
    (w (1, N), s (1, N, K) or None for MSE) of dynloss.logit_curvature (module docstring)."""
    w, s = curvature[0][0], None if curvature[1] is None else curvature[1][0]
    N = len(w)
    J = J.reshape(N, -1, J.shape[1])  # (N, K, P)
    if s is None:
        G = np.sqrt(w)[:, None, None] * J  # (N, K, P)  MSE: sqrt(w_n) J_n
    else:
        sJ = np.einsum("nk,nkp->np", s, J)  # (N, P)  s_n^T J_n
        G = np.sqrt(w[:, None] * s)[:, :, None] * (J - sJ[:, None, :])  # (N, K, P)
    return G.reshape(-1, J.shape[2])


def gauss_newton(J, curvature):
    """The Gauss-Newton part J^T Hz J (P, P) of the Hessian, as G^T G (:func:`gn_factor`)."""
    G = gn_factor(J, curvature)
    return G.T @ G  # (P, P)


def hessian(params, X, y, gamma, loss="ce", parts=False, act=RELU):
    """The exact Hessian of F (eq. 1, weights gamma (K,)) with respect to theta: (P, P);
    X (N, D), y (N,).

    The Gauss-Newton part J^T Hz J plus the network's own term (module docstring); with
    ``parts`` returns the two (P, P) terms instead of their sum; act : the hidden activation.
    Dense: P = 6003 at H = 1000 costs a (N*K) x P x P product (seconds) and 0.3 GB per matrix.
    """
    one = _one(params)
    X = np.asarray(X, dtype=np.float64)
    _, g, curvature, _ = loss_state(one, X, y, gamma, loss, act)
    gn = gauss_newton(mlp_jacobian(one, X, act)[0], curvature)
    network = mlp_network_term(one, X, g, act)[0]
    return (gn, network) if parts else gn + network


def hessian_matvec(params, X, y, gamma, loss="ce", act=RELU):
    """The exact HVP v (P,) -> H v (P,), by the R-operator (models.mlp_hvp_operator: the
    forward pass once, about two gradients per product). X (N, D), y (N,), gamma (K,)."""
    one = _one(params)
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    gamma = np.asarray(gamma, dtype=np.float64).reshape(1, -1)  # (1, K)
    hvp_of = mlp_hvp_operator(one, X, y, gamma, loss, act)

    def matvec(v):
        V = unflatten(np.asarray(v, dtype=np.float64).reshape(1, -1), one)
        return flatten(hvp_of(V))[0]  # (P,)

    return matvec


def n_params(params):
    """P of one network from its params dict (M = 1)."""
    return sum(a[0].size for a in params.values())


def hessian_operator(params, X, y, gamma, loss="ce", act=RELU):
    """The Hessian of F as a scipy LinearOperator (P, P), float64. X (N, D), y (N,),
    gamma (K,)."""
    P = n_params(params)
    mv = hessian_matvec(params, X, y, gamma, loss, act)
    return LinearOperator((P, P), matvec=mv, rmatvec=mv, dtype=np.float64)


def hvp(params, X, y, gamma, v, loss="ce", act=RELU):
    """Exact Hessian-vector product H v of F (eq. 1, weights gamma (K,)): v (P,) -> (P,).
    X (N, D), y (N,)."""
    return hessian_matvec(params, X, y, gamma, loss, act)(v)


# ---------------------------------------------------------------------------------------------
# Lanczos and the top eigenpairs
# ---------------------------------------------------------------------------------------------


def lanczos(matvec, v0, m, stop=None, passes=2, breakdown=LANCZOS_BREAKDOWN):
    """m Lanczos steps with full reorthogonalisation (Gram-Schmidt ``passes`` times per step).

    matvec : symmetric (P,) -> (P,);  v0 : (P,) start (normalised here)
    stop : optional callable(alpha (j,), beta (j,)) -> bool, asked after every step j, the last
        one included (beta[-1] is the norm of the new residual); True ends the run there.
    passes : Gram-Schmidt passes against all previous vectors: 2 keeps long runs (SLQ)
        orthogonal to roundoff, 1 is enough for a few steps from a warm start.
    Also stops at an invariant subspace (beta_i <= breakdown * |A q_i|).
    Returns alpha (m',), beta (m',), Q (P, m'), m' <= m: the tridiagonal T = Q^T A Q has the
    diagonal alpha and the off-diagonal beta[:-1]; beta[-1] is the residual norm after the last
    step (the Ritz residual of an eigenvector s of T is beta[-1] |s[-1]|).
    """
    v0 = np.asarray(v0, dtype=np.float64)
    P = len(v0)
    m = min(m, P)
    Q = np.zeros((P, m))
    alpha, beta = np.zeros(m), np.zeros(m)
    q = v0 / np.sqrt(v0 @ v0)
    for i in range(m):
        Q[:, i] = q
        Aq = matvec(q)
        alpha[i] = q @ Aq
        r = Aq
        for _ in range(passes):  # Gram-Schmidt against every q so far
            r = r - Q[:, : i + 1] @ (Q[:, : i + 1].T @ r)
        beta[i] = np.sqrt(r @ r)
        stopped = stop is not None and stop(alpha[: i + 1], beta[: i + 1])
        if stopped or i == m - 1 or beta[i] <= breakdown * max(np.sqrt(Aq @ Aq), TINY):
            return alpha[: i + 1], beta[: i + 1], Q[:, : i + 1]
        q = r / beta[i]
    raise AssertionError("unreachable: the last step returns")


def ritz_pairs(alpha, beta):
    """Eigenpairs of the tridiagonal T (diagonal alpha (j,), off-diagonal beta (j-1,)), by
    LAPACK dstev (a few microseconds): lam (j,) ascending, S (j, j)."""
    if len(alpha) == 1:
        return alpha.copy(), np.ones((1, 1))
    lam, S, info = dstev(alpha, beta, compute_v=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dstev failed with info {info}")
    return lam, S


def top_eigs(matvec, P, n_eig=1, v0=None, tol=EIGSH_TOL, ncv=None, maxiter=None):
    """The n_eig largest (algebraic) eigenpairs of a symmetric operator, by eigsh(which='LA').

    matvec : callable (P,) -> (P,), a symmetric linear map (any model's HVP, an NTK product)
    v0 : warm start, e.g. the previous top eigenvector (P,), or previous eigenvectors (P, j)
        (summed into one start); None starts from a fixed random vector.
    tol : eigsh's relative residual; the eigenvalue error is below tol*|lambda|, and below
        about (tol*|lambda|)^2 / gap for a separated eigenvalue.
    ncv : Lanczos basis size per restart; default max(2 n_eig + 1, EIGSH_NCV_MIN), at most P.

    Returns vals (n_eig,) descending, vecs (P, n_eig) orthonormal columns.
    """
    if not 0 < n_eig < P:
        raise ValueError(f"need 0 < n_eig < P, got n_eig = {n_eig}, P = {P}")
    if v0 is not None:
        v0 = np.asarray(v0, dtype=np.float64).reshape(P, -1).sum(axis=1)  # (P,)
        if not (np.all(np.isfinite(v0)) and np.linalg.norm(v0) > 0):
            v0 = None
    if v0 is None:
        v0 = np.random.default_rng(START_SEED).normal(size=P)
    if ncv is None:
        ncv = max(2 * n_eig + 1, EIGSH_NCV_MIN)
    ncv = min(ncv, P)
    op = LinearOperator((P, P), matvec=matvec, dtype=np.float64)
    vals, vecs = eigsh(op, k=n_eig, which="LA", v0=v0, tol=tol, ncv=ncv, maxiter=maxiter)
    order = np.argsort(vals)[::-1]
    return vals[order], vecs[:, order]


def warm_top_eig(matvec, P, v0=None, tol=EIGSH_TOL, steps=WARM_STEPS, max_restarts=WARM_RESTARTS):
    """The largest (algebraic) eigenpair of a symmetric operator, cheap when warm-started.

    :func:`lanczos` from v0, stopped at the first step whose top Ritz pair (lam, x) has
    residual |A x - lam x| = beta_j |S_j| <= tol*|lam| (the criterion of eigsh/ARPACK);
    after ``steps`` steps without convergence it restarts from the top Ritz vector. From the
    previous step's eigenvector the Krylov space needs only a few products, and none of eigsh's
    per-call overhead is paid. The Ritz value is a lower bound on lambda_max within tol*|lam|
    of an eigenvalue, and within about (tol*lam)^2 / gap of lambda_max when it is separated by
    a gap and v0 is close to its eigenvector. Near-degenerate top eigenvalues and cold starts need
    a tight tol or :func:`top_eigs`.

    matvec : callable (P,) -> (P,);  v0 : (P,) start (None: a fixed random vector)
    Returns lam (float), vec (P,) unit norm, n_products (int).
    """
    v = None if v0 is None else np.asarray(v0, dtype=np.float64).reshape(P)
    if v is None or not (np.all(np.isfinite(v)) and np.linalg.norm(v) > 0):
        v = np.random.default_rng(START_SEED).normal(size=P)

    ritz = {}  # the last step's top Ritz pair, kept by the stopping test

    def converged(alpha, beta):
        ritz["lam"], ritz["S"] = ritz_pairs(alpha, beta[:-1])  # ascending
        return beta[-1] * abs(ritz["S"][-1, -1]) <= tol * abs(ritz["lam"][-1])

    n = 0
    for _ in range(max_restarts):
        alpha, beta, Q = lanczos(matvec, v, steps, stop=converged, passes=1)
        n += len(alpha)
        lam, S = ritz["lam"], ritz["S"]  # of the last step: the test runs at every step
        v = Q @ S[:, -1]  # top Ritz vector (P,)
        # lanczos stopped before ``steps`` (the test above held, or the Krylov space became
        # invariant) or it spanned the whole space: lam is the answer
        stopped = len(alpha) < min(steps, P) or len(alpha) == P
        if stopped or beta[-1] * abs(S[-1, -1]) <= tol * abs(lam[-1]):
            return lam[-1], v / np.linalg.norm(v), n
    raise RuntimeError(f"warm_top_eig: no convergence in {n} products (tol {tol})")


def hessian_top_eigs(params, X, y, gamma, n_eig=1, v0=None, loss="ce", tol=EIGSH_TOL, act=RELU):
    """The n_eig largest Hessian eigenpairs of F for one MLP: vals (n_eig,), vecs (P, n_eig).
    X (N, D), y (N,), gamma (K,)."""
    op = hessian_operator(params, X, y, gamma, loss, act)
    return top_eigs(op.matvec, op.shape[0], n_eig=n_eig, v0=v0, tol=tol)


# ---------------------------------------------------------------------------------------------
# Empirical NTK (eq. 11)
# ---------------------------------------------------------------------------------------------


def ntk(params, X, act=RELU):
    """The full empirical NTK Theta = J J^T of eq. (11), (N*K, N*K), row/column n*K + k.
    X : (N, D);  act : the hidden activation."""
    J = logits_jacobian(params, X, act)  # (N*K, P)
    return J @ J.T  # Eq. (11)


def ntk_traced(params, X, act=RELU):
    """The NTK averaged over the K logit blocks, (1/K) sum_k Theta[(n,k), (n',k)]: (N, N);
    X (N, D).

    This is the kernel the authors' notebook plotted (on its first 50 points).
    """
    K = params["W2"].shape[2]
    full = ntk(params, X, act)  # (N*K, N*K)
    N = full.shape[0] // K
    return np.einsum("akbk->ab", full.reshape(N, K, N, K)) / K  # eq. (11), traced over k


def weighted_ntk(params, X, y, gamma, loss="ce", act=RELU):
    """The loss-weighted NTK V V^T (N*K, N*K), V = Hz^(1/2) J in the factored form of
    :func:`gn_factor`: Theta weighted by the logit curvature and Gamma. Its nonzero eigenvalues
    are those of the Gauss-Newton part V^T V (module docstring). X (N, D), y (N,), gamma (K,)."""
    one = _one(params)
    _, _, curvature, _ = loss_state(one, X, y, gamma, loss, act)
    V = gn_factor(logits_jacobian(one, X, act), curvature)  # (N*K, P)
    return V @ V.T


def ntk_matvec(params, X, act=RELU):
    """The full NTK product u (N*K,) -> J (J^T u) (N*K,), never formed: models.mlp_backward
    (J^T u) then models.mlp_jvp (J v). X : (N, D);  act : the hidden activation."""
    one = _one(params)
    X = np.asarray(X, dtype=np.float64)
    _, cache = mlp_forward(X, one, act)
    shape = (1, len(X), one["W2"].shape[2])  # (1, N, K)

    def matvec(u):
        Jt_u = mlp_backward(np.asarray(u, dtype=np.float64).reshape(shape), cache)  # J^T u
        return mlp_jvp(one, cache, Jt_u).ravel()  # (N*K,)  Theta u, eq. (11)

    return matvec


def ntk_traced_matvec(params, X, act=RELU):
    """The traced NTK product u (N,) -> Theta_traced u (N,), never formed: (1/K) sum_k
    J_k (J_k^T u) with J_k the rows of logit k (models.mlp_backward with u in column k, then
    models.mlp_jvp). X : (N, D);  act : the hidden activation."""
    one = _one(params)
    X = np.asarray(X, dtype=np.float64)
    _, cache = mlp_forward(X, one, act)
    N, K = len(X), one["W2"].shape[2]

    def matvec(u):
        out = np.zeros(N)
        for k in range(K):
            U = np.zeros((1, N, K))  # the upstream u on logit k only
            U[0, :, k] = np.asarray(u, dtype=np.float64).reshape(N)
            out += mlp_jvp(one, cache, mlp_backward(U, cache))[0, :, k]  # J_k (J_k^T u)
        return out / K  # eq. (11), traced over k

    return matvec


def ntk_operator(params, X, act=RELU):
    """The full NTK J J^T as a LinearOperator (N*K, N*K), row n*K + k, never formed; X (N, D)."""
    n = len(X) * params["W2"].shape[2]
    mv = ntk_matvec(params, X, act)
    return LinearOperator((n, n), matvec=mv, rmatvec=mv, dtype=np.float64)


def ntk_top_eig(params, X, v0=None, tol=EIGSH_TOL, act=RELU):
    """lambda_max of the full NTK and its eigenvector (N*K,), by warm-startable Lanczos;
    X (N, D), v0 (N*K,) or None."""
    op = ntk_operator(params, X, act)
    vals, vecs = top_eigs(op.matvec, op.shape[0], n_eig=1, v0=v0, tol=tol)
    return vals[0], vecs[:, 0]
