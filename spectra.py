"""Hessian, Hessian-vector products, NTK and spectral tools for one spiral MLP (Figs. 4 and 5).

Symbols
-------
N  samples;  D  input dimension;  H  hidden units;  K  classes
P  parameters of one network, D*H + H + H*K + K, flattened by ``models.flatten`` in the order
   W1 (D, H) row-major, b1 (H,), W2 (H, K) row-major, b2 (K,)
k  eigenpairs;  m  Lanczos steps

Everything here is for ONE network: ``params`` is a models.py dict with a leading axis M = 1
(W1 (1, D, H), b1 (1, H), W2 (1, H, K), b2 (1, K)); vectors over parameters are flat float64
(P,) arrays in the order of ``models.flatten(params)[0]``. Host (NumPy) only: these feed scipy.
The forward pass is ``models.mlp_forward`` and the loss's derivatives come from dynloss.py
(``loss_backward``, ``loss_rop``, ``logit_curvature``). Because W1 is followed by b1 in that
order, the first (D+1)*H entries of theta are W1a = [W1; b1] (D+1, H) row-major, acting on the
inputs with a column of ones xa = [x, 1] (N, D+1): the formulas below use that block, which is
the flattened order itself, not another parameter layout.

Derivation
----------
Forward pass: z1 = xa W1a (N, H), mask m = 1[z1 > 0], h1 = m * z1, z = h1 W2 + b2 (N, K).
(At z1 = 0 exactly, e.g. the spiral's points at the origin while b1 = 0, m = 0 as in
models.relu_backward: there the one-sided derivative is used.)
Loss (eq. 1, mean over samples): F = sum_n w_n CE_n(z_n) with w_n = Gamma_{y_n} / N, so

    g_n  = dF/dz_n       = w_n (p_n - e_{y_n}),         p_n = softmax(z_n)
    Hz_n = d2F/dz_n dz_n = w_n (diag(p_n) - p_n p_n^T)   (MSE: g_n = w_n (z_n - e_{y_n}), w_n I_K).

The logit Jacobian J = dz/dtheta (N*K, P), row n*K + k:

    dz_nk/dW1a[d,j] = xa_nd m_nj W2_jk,   dz_nk/dW2[j,l] = h1_nj [k=l],   dz_nk/db2_l = [k=l].

The chain rule twice gives the exact Hessian

    d2F/dtheta2 = J^T Hz J + sum_{n,k} g_nk d2 z_nk/dtheta2.

ReLU's second derivative is zero away from the kinks (m is locally constant), z is linear in W2
and b2, and linear in W1a at fixed W2, so the only nonzero second derivatives of z are the mixed
d2 z_nk/dW1a[d,j] dW2[j',l] = xa_nd m_nj [j=j'][k=l]. The network's own term therefore lives in
the W1a-W2 blocks only:

    H[W1a[d,j], W2[j,l]] += C_djl,   C_djl = sum_n xa_nd m_nj g_nl    ((D+1), H, K).

Gauss-Newton term: diag(p) - p p^T = L L^T with L = (I - p 1^T) diag(sqrt p) (multiply out and
use 1^T p = 1), so J^T Hz J = V^T V with the rows V_n = sqrt(w_n) diag(sqrt p_n) (J_n - p_n^T J_n)
(MSE: V_n = sqrt(w_n) J_n): one symmetric (N*K)-rank product, no loop over parameters.

R-operator (Pearlmutter 1994), forward-over-reverse: R{f} = d/dr f(theta + r v) at r = 0 for a
direction v = (V1a, V2, vb2), pushed through the forward and then the backward pass:

    R z1 = xa V1a;  R h1 = m * R z1;  R z = R h1 W2 + h1 V2 + vb2
    R g_n = Hz_n R z_n = w_n p_n * (R z_n - p_n . R z_n)      (MSE: w_n R z_n)
    dW2 = h1^T g      ->  R dW2 = (R h1)^T g + h1^T R g;     R db2 = sum_n R g_n
    dh1 = g W2^T      ->  R dh1 = R g W2^T + g V2^T
    dz1 = m * dh1     ->  R dz1 = m * R dh1                  (R m = 0 a.e.)
    dW1a = xa^T dz1   ->  R dW1a = xa^T R dz1;   Hv = (R dW1a, R dW2, R db2), flattened.

NTK (eq. 11) in closed form, Theta = J J^T (N*K, N*K), sample-major (row n*K + k):

    Theta[(n,k), (n',l)] = (xa_n . xa_n') sum_j m_nj m_n'j W2_jk W2_jl + [k=l] (h1_n . h1_n' + 1),

i.e. Theta = (h1 h1^T + 1) (x) I_K + (xa xa^T (x) 1_KK) * (B B^T) with B[(n,k), j] = m_nj W2_jk.
Averaged over the K logit blocks (what the authors' notebook plotted), with s_j = sum_k W2_jk^2:

    Theta_traced = (1/K) (xa xa^T) * (m diag(s) m^T) + h1 h1^T + 1      (N, N).

Under gradient descent with learning rate eta the logits move by dz = -eta Theta dF/dz to first
order; for MSE and Gamma = 1 that is eq. (13)-(14), g <- (1 - (eta/N) Theta) g, unstable once an
NTK eigenvalue exceeds 2N/eta; the Hessian's Gauss-Newton part is then Theta's nonzero spectrum
divided by N, and gradient descent on a quadratic is unstable once lambda_max > 2/eta
(stability.py has these thresholds).

Spectral density: stochastic Lanczos quadrature (Ghorbani et al. 2019) gives the density of the
Hessian's eigenvalues from a few Lanczos runs, Hutchinson's estimator its trace.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg.lapack import dstev
from scipy.sparse.linalg import LinearOperator, eigsh

from dynloss import apply_logit_hessian, logit_curvature, loss_backward, loss_forward
from models import mlp_forward

EIGSH_TOL = 1e-6  # eigsh's relative residual: eigenvalue error <= tol*|lambda|, typically tol^2
EIGSH_NCV_MIN = 8  # a short Lanczos basis: warm starts converge within one or two restarts
SLQ_STEPS = 80  # Lanczos steps per probe (Ghorbani et al. use 90)
SLQ_PROBES = 10  # random probes (Ghorbani et al.: 10)
SLQ_GRID = 10000  # density grid points (google/spectral-density's default)
SLQ_SIGMA = 1e-3  # Gaussian broadening in units of the spectral width
SLQ_PAD_SIGMAS = 6  # the density grid extends this many sigmas beyond the extreme nodes
HUTCHINSON_PROBES = 100  # Rademacher probes of the trace estimate
LANCZOS_BREAKDOWN = 1e-10  # beta below this times |A q|: the Krylov space is invariant, stop
WARM_STEPS = 8  # warm_top_eig's Lanczos steps before a restart
WARM_RESTARTS = 100  # warm_top_eig gives up after this many restarts
START_SEED = 0  # the fixed random start vector of the eigen-solvers when none is given
TINY = np.finfo(np.float64).tiny  # guards a relative test against a zero scale


# ---------------------------------------------------------------------------------------------
# One network's forward pass and the loss's derivatives in its logits
# ---------------------------------------------------------------------------------------------


def single_net(params):
    """The M = 1 parameters as float64 arrays W1a (D+1, H) = [W1; b1], W2 (H, K), b2 (K,)."""
    if params["W1"].shape[0] != 1:
        raise ValueError(f"spectra works on one network (M = 1), got M = {params['W1'].shape[0]}")
    W1 = np.asarray(params["W1"][0], dtype=np.float64)
    b1 = np.asarray(params["b1"][0], dtype=np.float64)
    W1a = np.concatenate([W1, b1[None, :]], axis=0)  # (D+1, H)
    W2 = np.asarray(params["W2"][0], dtype=np.float64)  # (H, K)
    b2 = np.asarray(params["b2"][0], dtype=np.float64)  # (K,)
    return W1a, W2, b2


def net_state(params, X, work=None):
    """Forward pass of one MLP, kept for Jacobians, HVPs and NTKs.

    X : (N, D) inputs
    work : None: the forward pass is ``models.mlp_forward``. Or a dict of two (N, H) float64
        buffers "h1" and "mask": the same pass written into them as xa W1a (the tracker's hot
        path, where fresh (N, H) arrays at every call cost as much as the products, in page
        faults); tests/test_spectra.py ties the two to 1e-12.
    Returns a dict: xa (N, D+1) inputs with a ones column, mask (N, H) float 1[z1 > 0],
    h1 (N, H), logits (N, K), W1a (D+1, H), W2 (H, K), b2 (K,).
    """
    W1a, W2, b2 = single_net(params)
    X = np.asarray(X, dtype=np.float64)
    xa = np.concatenate([X, np.ones((len(X), 1))], axis=1)  # (N, D+1)
    if work is None:
        one = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        logits, (_, h1, _) = mlp_forward(X, one)  # (1, N, K); the ReLU cache is h1 (1, N, H)
        h1, logits = h1[0], logits[0]  # (N, H), (N, K)
        mask = (h1 > 0).astype(np.float64)  # (N, H)  1[z1 > 0]
    else:
        z1 = np.matmul(xa, W1a, out=work["h1"])  # (N, H)  z1 = xa W1a = X W1 + b1
        mask = work["mask"]
        np.greater(z1, 0.0, out=mask, casting="unsafe")  # (N, H)  1[z1 > 0] as floats
        h1 = np.multiply(z1, mask, out=z1)  # (N, H)  h1 = m * z1, in place
        logits = h1 @ W2 + b2  # (N, K)
    return {"xa": xa, "mask": mask, "h1": h1, "logits": logits, "W1a": W1a, "W2": W2, "b2": b2}


def loss_terms(s, y, gamma, loss="ce"):
    """The loss's derivatives in the logits of a forward state ``s`` (dynloss.py).

    y : (N,) ints;  gamma : (K,) class weights
    Returns g = dF/dz (N, K), w = Gamma_y / N (N,), p = softmax(z) (N, K) (None for "mse"),
    and the dynloss cache for ``loss_rop``.
    """
    y = np.asarray(y)
    K = s["logits"].shape[1]
    gamma = np.asarray(gamma, dtype=np.float64).reshape(1, K)  # (1, K)
    _, lcache = loss_forward(s["logits"][None], y, gamma, loss)
    w, p = logit_curvature(lcache)  # (1, N), (1, N, K) or None
    return loss_backward(lcache)[0], w[0], (None if p is None else p[0]), lcache


def cross_terms(xa, mask, g):
    """The network's second-derivative term C_djl = sum_n xa_nd m_nj g_nl: (D+1, H, K)."""
    (N, D1), K = xa.shape, g.shape[1]
    xg = (xa[:, :, None] * g[:, None, :]).reshape(N, D1 * K)  # (N, (D+1)*K)  xa_nd g_nl
    return (xg.T @ mask).reshape(D1, K, -1).transpose(0, 2, 1)  # (D+1, H, K)


def _split(v, D1, H, K):
    """Flat (P,) -> V1a (D+1, H), V2 (H, K), vb2 (K,) views."""
    n1, n2 = D1 * H, D1 * H + H * K
    return v[:n1].reshape(D1, H), v[n1:n2].reshape(H, K), v[n2:]


# ---------------------------------------------------------------------------------------------
# Jacobian, exact Hessian, Hessian-vector products
# ---------------------------------------------------------------------------------------------


def logits_jacobian(params, X):
    """J = d logits / d theta of one MLP, (N*K, P), row n*K + k (sample-major)."""
    return _jacobian(net_state(params, X)).reshape(-1, n_params(params))


def n_params(s):
    """P of one network, from its forward state ``s`` (:func:`net_state`) or its params dict."""
    if "W1a" in s:
        return s["W1a"].size + s["W2"].size + s["b2"].size
    return sum(a[0].size for a in s.values())


def _jacobian(s):
    """The logit Jacobian at a forward state, (N, K, P) (module docstring)."""
    xa, mask, h1, W2 = s["xa"], s["mask"], s["h1"], s["W2"]
    N, K = len(xa), W2.shape[1]
    J1 = np.einsum("nd,nj,jk->nkdj", xa, mask, W2)  # (N, K, D+1, H)  xa_nd m_nj W2_jk
    J2 = np.einsum("nj,kl->nkjl", h1, np.eye(K))  # (N, K, H, K)  h1_nj [k=l]
    J3 = np.broadcast_to(np.eye(K), (N, K, K))  # (N, K, K)  [k=l]
    return np.concatenate([J1.reshape(N, K, -1), J2.reshape(N, K, -1), J3], axis=2)


def hessian(params, X, y, gamma, loss="ce"):
    """The exact Hessian of F (eq. 1, weights gamma (K,)) with respect to theta: (P, P).

    Gauss-Newton term V^T V plus the W1a-W2 cross terms C (module docstring). Dense: P = 6003
    at H = 1000 costs a (N*K) x P x P product (seconds) and 0.3 GB.
    """
    s = net_state(params, X)
    xa, mask, W2 = s["xa"], s["mask"], s["W2"]
    N, D1 = xa.shape
    H, K = W2.shape
    g, w, p, _ = loss_terms(s, y, gamma, loss)
    J = _jacobian(s)  # (N, K, P)
    if p is None:
        V = np.sqrt(w)[:, None, None] * J  # (N, K, P)  MSE: sqrt(w_n) J_n
    else:
        pJ = np.einsum("nk,nkp->np", p, J)  # (N, P)  p_n^T J_n
        V = np.sqrt(w[:, None] * p)[:, :, None] * (J - pJ[:, None, :])  # (N, K, P)
    V = V.reshape(N * K, -1)
    hess = V.T @ V  # (P, P)  J^T Hz J
    C = cross_terms(xa, mask, g)  # (D+1, H, K)
    d, j, l = np.meshgrid(np.arange(D1), np.arange(H), np.arange(K), indexing="ij")
    rows = (d * H + j).ravel()  # W1a[d, j]
    cols = (D1 * H + j * K + l).ravel()  # W2[j, l]
    hess[rows, cols] += C.ravel()
    hess[cols, rows] += C.ravel()
    return hess


def _jvp_hidden(s, V1a):
    """The hidden layer's part of J v, (m * (xa V1a)) W2: V1a (D+1, H) -> (N, K).

    Summed in the order sum_d xa_nd [m (V1a_d * W2)]_nk, so that the (N, H) products are one
    matrix product with (D+1)*K columns instead of elementwise passes over (N, H) arrays.
    """
    xa, mask, W2 = s["xa"], s["mask"], s["W2"]
    (N, D1), (H, K) = xa.shape, W2.shape
    Z = (V1a.T[:, :, None] * W2[:, None, :]).reshape(H, D1 * K)  # (H, (D+1)*K)  V1a_dj W2_jk
    return np.einsum("nd,ndk->nk", xa, (mask @ Z).reshape(N, D1, K))  # (N, K)


def _vjp_hidden(s, U):
    """The hidden layer's part of J^T u, xa^T (m * (U W2^T)): U (N, K) -> (D+1, H).

    Summed as sum_k W2_jk [m^T (xa_d * U_k)]_j: one (H, N) x (N, (D+1)*K) matrix product.
    """
    xa, mask, W2 = s["xa"], s["mask"], s["W2"]
    (N, D1), (H, K) = xa.shape, W2.shape
    XU = (xa[:, :, None] * U[:, None, :]).reshape(N, D1 * K)  # (N, (D+1)*K)  xa_nd U_nk
    return np.einsum("jdk,jk->dj", (mask.T @ XU).reshape(H, D1, K), W2)  # (D+1, H)


def _hvp_state(s, curvature, C, v):
    """Hv at a stored forward state: v (P,) -> (P,).

    The R-operator of the module docstring with its two g-terms, (R h1)^T g and g V2^T, summed
    over the samples once and for all into C (D+1, H, K): they are the cross terms C v.
    """
    h1, W2 = s["h1"], s["W2"]
    H, K = W2.shape
    V1a, V2, vb2 = _split(v, s["xa"].shape[1], H, K)
    Rz = _jvp_hidden(s, V1a) + h1 @ V2 + vb2  # (N, K)   R z = J v,  R h1 = m * (xa V1a)
    Rg = apply_logit_hessian(curvature, Rz[None])[0]  # (N, K)   R g = Hz R z (dynloss)
    RdW2 = h1.T @ Rg + np.einsum("djl,dj->jl", C, V1a)  # (H, K)  h1^T R g + (R h1)^T g
    Rdb2 = Rg.sum(axis=0)  # (K,)
    RdW1a = _vjp_hidden(s, Rg) + np.einsum("djl,jl->dj", C, V2)  # (D+1, H)  xa^T R dz1
    return np.concatenate([RdW1a.ravel(), RdW2.ravel(), Rdb2])


def hessian_matvec(s, y, gamma, loss="ce"):
    """The exact HVP v (P,) -> H v (P,) at a forward state ``s`` of :func:`net_state`."""
    g, _, _, lcache = loss_terms(s, y, gamma, loss)
    curvature = logit_curvature(lcache)  # w (1, N), softmax (1, N, K): computed once
    C = cross_terms(s["xa"], s["mask"], g)  # (D+1, H, K)
    P = n_params(s)
    return lambda v: _hvp_state(s, curvature, C, np.asarray(v, dtype=np.float64).reshape(P))


def hessian_operator(params, X, y, gamma, loss="ce"):
    """The Hessian of F as a scipy LinearOperator (P, P), float64; the forward pass is done once."""
    s = net_state(params, X)
    P = n_params(s)
    mv = hessian_matvec(s, y, gamma, loss)
    return LinearOperator((P, P), matvec=mv, rmatvec=mv, dtype=np.float64)


def hvp(params, X, y, gamma, v, loss="ce"):
    """Exact Hessian-vector product H v of F (eq. 1, weights gamma (K,)): v (P,) -> (P,)."""
    return hessian_operator(params, X, y, gamma, loss).matvec(v)


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


def _ritz(alpha, beta):
    """Eigenpairs of the tridiagonal T (diagonal alpha (j,), off-diagonal beta (j-1,)), by
    LAPACK dstev (a few microseconds): theta (j,) ascending, S (j, j)."""
    if len(alpha) == 1:
        return alpha.copy(), np.ones((1, 1))
    theta, S, info = dstev(alpha, beta, compute_v=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dstev failed with info {info}")
    return theta, S


def top_eigs(matvec, P, k=1, v0=None, tol=EIGSH_TOL, ncv=None, maxiter=None):
    """The k largest (algebraic) eigenpairs of a symmetric operator, by eigsh(which='LA').

    matvec : callable (P,) -> (P,), a symmetric linear map (any model's HVP, an NTK product)
    v0 : warm start, e.g. the previous top eigenvector (P,), or previous eigenvectors (P, j)
        (summed into one start); None starts from a fixed random vector.
    tol : eigsh's relative residual; the eigenvalue error is below tol*|lambda|, and below
        about (tol*|lambda|)^2 / gap for a separated eigenvalue.
    ncv : Lanczos basis size per restart; default max(2k+1, EIGSH_NCV_MIN), at most P.

    Returns vals (k,) descending, vecs (P, k) orthonormal columns.
    """
    if not 0 < k < P:
        raise ValueError(f"need 0 < k < P, got k = {k}, P = {P}")
    if v0 is not None:
        v0 = np.asarray(v0, dtype=np.float64).reshape(P, -1).sum(axis=1)  # (P,)
        if not (np.all(np.isfinite(v0)) and np.linalg.norm(v0) > 0):
            v0 = None
    if v0 is None:
        v0 = np.random.default_rng(START_SEED).normal(size=P)
    if ncv is None:
        ncv = max(2 * k + 1, EIGSH_NCV_MIN)
    ncv = min(ncv, P)
    op = LinearOperator((P, P), matvec=matvec, dtype=np.float64)
    vals, vecs = eigsh(op, k=k, which="LA", v0=v0, tol=tol, ncv=ncv, maxiter=maxiter)
    order = np.argsort(vals)[::-1]
    return vals[order], vecs[:, order]


def warm_top_eig(matvec, P, v0=None, tol=EIGSH_TOL, steps=WARM_STEPS, max_restarts=WARM_RESTARTS):
    """The largest (algebraic) eigenpair of a symmetric operator, cheap when warm-started.

    :func:`lanczos` from v0, stopped at the first step whose top Ritz pair (theta, x) has
    residual |A x - theta x| = beta_j |s_j| <= tol*|theta| (the criterion of eigsh/ARPACK);
    after ``steps`` steps without convergence it restarts from the top Ritz vector. From the
    previous step's eigenvector the Krylov space needs only a few products, and none of eigsh's
    per-call overhead is paid. The Ritz value is a lower bound on lambda_max within tol*|theta|
    of an eigenvalue, and within about (tol*theta)^2 / gap of lambda_max when it is separated by
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
        ritz["theta"], ritz["S"] = _ritz(alpha, beta[:-1])  # ascending
        return beta[-1] * abs(ritz["S"][-1, -1]) <= tol * abs(ritz["theta"][-1])

    n = 0
    for _ in range(max_restarts):
        alpha, beta, Q = lanczos(matvec, v, steps, stop=converged, passes=1)
        n += len(alpha)
        theta, S = ritz["theta"], ritz["S"]  # of the last step: the test runs at every step
        v = Q @ S[:, -1]  # top Ritz vector (P,)
        invariant = len(alpha) < min(steps, P) or len(alpha) == P
        if invariant or beta[-1] * abs(S[-1, -1]) <= tol * abs(theta[-1]):
            return theta[-1], v / np.linalg.norm(v), n
    raise RuntimeError(f"warm_top_eig: no convergence in {n} products (tol {tol})")


def hessian_top_eigs(params, X, y, gamma, k=1, v0=None, loss="ce", tol=EIGSH_TOL):
    """The k largest Hessian eigenpairs of F for one MLP: vals (k,) descending, vecs (P, k)."""
    op = hessian_operator(params, X, y, gamma, loss)
    return top_eigs(op.matvec, op.shape[0], k=k, v0=v0, tol=tol)


# ---------------------------------------------------------------------------------------------
# Empirical NTK (eq. 11)
# ---------------------------------------------------------------------------------------------


def ntk(params, X):
    """The full empirical NTK Theta = J J^T of eq. (11), (N*K, N*K), row/column n*K + k.

    Closed form (module docstring), costing N^2 K^2 H instead of N^2 K^2 P.
    """
    s = net_state(params, X)
    xa, mask, h1, W2 = s["xa"], s["mask"], s["h1"], s["W2"]
    N, K = len(xa), W2.shape[1]
    B = (mask[:, None, :] * W2.T[None, :, :]).reshape(N * K, -1)  # (N*K, H)  m_nj W2_jk
    same = np.kron(xa @ xa.T, np.ones((K, K)))  # (N*K, N*K)  xa_n . xa_n'
    return same * (B @ B.T) + np.kron(h1 @ h1.T + 1.0, np.eye(K))  # eq. (11): hidden + output


def ntk_traced(params, X):
    """The NTK averaged over the K logit blocks, (1/K) sum_k Theta[(n,k), (n',k)]: (N, N).

    This is the kernel the authors' notebook plotted (on its first 50 points).
    """
    s = net_state(params, X)
    xa, mask, h1, W2 = s["xa"], s["mask"], s["h1"], s["W2"]
    K = W2.shape[1]
    sq = (W2**2).sum(axis=1)  # (H,)  s_j = sum_k W2_jk^2
    return (xa @ xa.T) * ((mask * sq) @ mask.T) / K + h1 @ h1.T + 1.0  # eq. (11), traced over k


def ntk_matvec(s):
    """The full NTK product u (N*K,) -> J (J^T u) (N*K,) at a forward state ``s``, never formed."""
    h1 = s["h1"]
    N, K = s["logits"].shape

    def matvec(u):
        U = np.asarray(u, dtype=np.float64).reshape(N, K)  # (N, K) upstream on the logits
        dW2, db2 = h1.T @ U, U.sum(axis=0)  # (H, K), (K,)   J^T u, output layer
        dW1a = _vjp_hidden(s, U)  # (D+1, H)       J^T u, hidden layer
        out = _jvp_hidden(s, dW1a) + h1 @ dW2 + db2  # (N, K)  Theta u = J (J^T u), eq. (11)
        return out.ravel()

    return matvec


def ntk_traced_matvec(s):
    """The traced NTK product u (N,) -> Theta_traced u (N,) at a forward state ``s`` (closed
    form of the module docstring, never formed)."""
    xa, mask, h1, W2 = s["xa"], s["mask"], s["h1"], s["W2"]
    N, K = len(xa), W2.shape[1]
    sq = (W2**2).sum(axis=1)[:, None] / K  # (H, 1)  s_j / K

    def matvec(u):
        u = np.asarray(u, dtype=np.float64).reshape(N)
        inner = mask.T @ (xa * u[:, None])  # (H, D+1)  sum_n' m_n'j xa_n'd u_n'
        hidden = ((mask @ (sq * inner)) * xa).sum(axis=1)  # (N,)
        return hidden + h1 @ (h1.T @ u) + u.sum()  # eq. (11), traced: hidden + output layer

    return matvec


def ntk_operator(params, X):
    """The full NTK J J^T as a LinearOperator (N*K, N*K), row n*K + k, never formed."""
    s = net_state(params, X)
    n = s["logits"].size
    mv = ntk_matvec(s)
    return LinearOperator((n, n), matvec=mv, rmatvec=mv, dtype=np.float64)


def ntk_traced_operator(params, X):
    """The traced NTK (N, N) as a LinearOperator, never formed."""
    s = net_state(params, X)
    n = len(s["logits"])
    mv = ntk_traced_matvec(s)
    return LinearOperator((n, n), matvec=mv, rmatvec=mv, dtype=np.float64)


def ntk_top_eig(params, X, v0=None, tol=EIGSH_TOL):
    """lambda_max of the full NTK and its eigenvector (N*K,), by warm-startable Lanczos."""
    op = ntk_operator(params, X)
    vals, vecs = top_eigs(op.matvec, op.shape[0], k=1, v0=v0, tol=tol)
    return vals[0], vecs[:, 0]


def ntk_traced_top_eig(params, X, v0=None, tol=EIGSH_TOL):
    """lambda_max of the traced NTK (N, N) and its eigenvector (N,), by warm-startable Lanczos."""
    op = ntk_traced_operator(params, X)
    vals, vecs = top_eigs(op.matvec, op.shape[0], k=1, v0=v0, tol=tol)
    return vals[0], vecs[:, 0]


# ---------------------------------------------------------------------------------------------
# Spectral density: stochastic Lanczos quadrature, Hutchinson's trace
# ---------------------------------------------------------------------------------------------


def slq_nodes(matvec, P, rng, m=SLQ_STEPS, n_probes=SLQ_PROBES):
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019; google/spectral-density).

    For each of n_probes Gaussian probes v, m Lanczos steps give T = Q^T A Q; its eigenvalues
    are the quadrature nodes and the squared first components of its eigenvectors the weights:
    sum_i w_i f(node_i) ~ v^T f(A) v / |v|^2, whose mean over probes estimates (1/P) tr f(A).

    rng : np.random.Generator
    Returns nodes (n_probes, m), weights (n_probes, m); each probe's weights sum to 1 (probes
    whose Lanczos run stopped early are padded with weight 0).
    """
    m = min(m, P)
    nodes, weights = np.zeros((n_probes, m)), np.zeros((n_probes, m))
    for i in range(n_probes):
        alpha, beta, _ = lanczos(matvec, rng.normal(size=P), m)
        theta, S = _ritz(alpha, beta[:-1])  # nodes ascending, (m', m')
        nodes[i, : len(theta)], nodes[i, len(theta) :] = theta, theta[-1]
        weights[i, : len(theta)] = S[0] ** 2
    return nodes, weights


def slq_density(nodes, weights, sigma=None, grid_len=SLQ_GRID):
    """Gaussian-broadened spectral density from SLQ nodes and weights (n_probes, m).

    sigma : broadening (eigenvalue units); default SLQ_SIGMA times the span of the nodes.
    The grid spans the nodes plus SLQ_PAD_SIGMAS sigma on each side and the density is normalised to
    integrate to 1 on it (a correction of order exp(-18) to the Gaussians' own mass).

    Returns grid (grid_len,), density (grid_len,).
    """
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = SLQ_SIGMA * (hi - lo if hi > lo else max(abs(lo), 1.0))  # one node: |node|
    pad = SLQ_PAD_SIGMAS * sigma
    grid = np.linspace(lo - pad, hi + pad, grid_len)  # (grid_len,)
    density = np.zeros(grid_len)
    for nd, wt in zip(nodes, weights, strict=True):  # one probe at a time: (m, grid_len)
        gauss = np.exp(-0.5 * ((grid[None, :] - nd[:, None]) / sigma) ** 2)
        density += wt @ gauss / (sigma * np.sqrt(2 * np.pi))
    density /= (0.5 * (density[1:] + density[:-1]) * np.diff(grid)).sum()  # trapezoid rule
    return grid, density


def spectral_density(matvec, P, rng, m=SLQ_STEPS, n_probes=SLQ_PROBES, sigma=None):
    """SLQ spectral density of a symmetric operator: grid, density, nodes, weights.

    See :func:`slq_nodes` and :func:`slq_density`; density integrates to 1 over grid.
    """
    nodes, weights = slq_nodes(matvec, P, rng, m=m, n_probes=n_probes)
    grid, density = slq_density(nodes, weights, sigma=sigma)
    return grid, density, nodes, weights


def hutchinson_trace(matvec, P, rng, n_probes=HUTCHINSON_PROBES):
    """Hutchinson's trace estimate with Rademacher probes z: mean of z^T A z.

    Returns (estimate, standard error from the probes' spread).
    """
    samples = np.empty(n_probes)
    for i in range(n_probes):
        z = rng.choice([-1.0, 1.0], size=P)  # Rademacher
        samples[i] = z @ matvec(z)
    return samples.mean(), samples.std(ddof=1) / np.sqrt(n_probes)
