"""Hessian, Hessian-vector products, NTK and spectral tools for one spiral MLP (Figs. 4 and 5).

Symbols
-------
N  samples;  D  input dimension;  H  hidden units;  K  classes
P  parameters of one network, D*H + H + H*K + K, flattened by ``models.flatten`` in the order
   W1 (D, H) row-major, b1 (H,), W2 (H, K) row-major, b2 (K,)
k  eigenpairs;  m  Lanczos steps;  S  tracked steps

Everything here is for ONE network: ``params`` is a models.py dict with a leading axis M = 1
(W1 (1, D, H), b1 (1, H), W2 (1, H, K), b2 (1, K)); vectors over parameters are flat float64
(P,) arrays in the order of ``models.flatten(params)[0]``. Host (NumPy) only: these feed scipy.
Because W1 is followed by b1, the first (D+1)*H entries of theta are W1a = [W1; b1] (D+1, H)
row-major, acting on the inputs with a column of ones xa = [x, 1] (N, D+1).

Derivation
----------
Forward pass: z1 = xa W1a (N, H), mask m = 1[z1 > 0], h1 = m * z1, z = h1 W2 + b2 (N, K).
(At z1 = 0 exactly, e.g. the spiral's points at the origin while b1 = 0, m = 0 as in the
trainer's backward pass: there the one-sided derivative is used.)
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
divided by N, and gradient descent on a quadratic is unstable once lambda_max > 2/eta.
"""

from __future__ import annotations

import time

import numpy as np
from scipy.linalg.lapack import dstev
from scipy.sparse.linalg import LinearOperator, eigsh

from dynloss import LOSSES, class_weights

EIGSH_TOL = 1e-6  # eigsh's relative residual: eigenvalue error <= tol*|lambda|, typically tol^2
EIGSH_NCV_MIN = 8  # a short Lanczos basis: warm starts converge within one or two restarts
SLQ_STEPS = 80  # Lanczos steps per probe (Ghorbani et al. use 90)
SLQ_PROBES = 10  # random probes (Ghorbani et al.: 10)
SLQ_GRID = 10000  # density grid points (google/spectral-density's default)
SLQ_SIGMA = 1e-3  # Gaussian broadening in units of the spectral width
LANCZOS_BREAKDOWN = 1e-10  # beta below this times |A q|: the Krylov space is invariant, stop
TRACK_TOL = 1e-3  # tracker's relative residual: measured eigenvalue errors <= 1e-5 (benchmark)
TRACK_MIX = 0.03  # weight of a random unit vector added to each warm start (see SpectraTracker)
TRACK_COLD_TOL = 1e-10  # eigsh's tolerance for the tracker's first (cold) call
TRACK_COLD_NCV = 20  # eigsh's Lanczos basis for a cold start (its usual default)
TRACK_STEPS = 8  # warm_top_eig's Lanczos steps before a restart
BIF_MIN_FLIPS = 4  # consecutive sign changes of F(t) - F(t-1) that make a bifurcation episode
BIF_MIN_JUMP = 1e-12  # |F(t) - F(t-1)| at or below this is roundoff, not a bounce
GAMMA_BLOCK = 4096  # the tracker evaluates Gamma(t) for this many steps at once
HESS_JUMP = 0.1  # Fig. 4 caption: lambda_max(t) - lambda_max(t-1) ~ 0.1 marks an instability


# ---------------------------------------------------------------------------------------------
# One network's forward pass and loss curvature
# ---------------------------------------------------------------------------------------------


def single_net(params):
    """The M = 1 parameters as W1a (D+1, H) = [W1; b1], W2 (H, K), b2 (K,) float64 arrays."""
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

    X : (N, D) inputs, or (N, D+1) inputs already followed by a ones column (saves a copy when
        the same data is used at every step)
    work : optional dict of two (N, H) float64 arrays "h1" and "mask" to write into (a caller
        that runs this at every step avoids allocating, and page-faulting, fresh (N, H) arrays)
    Returns a dict: xa (N, D+1) inputs with a ones column, mask (N, H) float 1[z1 > 0],
    h1 (N, H), logits (N, K), W1a (D+1, H), W2 (H, K), b2 (K,).
    """
    W1a, W2, b2 = single_net(params)
    xa = np.asarray(X, dtype=np.float64)
    if xa.shape[1] != W1a.shape[0]:
        xa = np.concatenate([xa, np.ones((len(xa), 1))], axis=1)  # (N, D+1)
    work = work or {}
    z1 = np.matmul(xa, W1a, out=work.get("h1"))  # (N, H)  z1 = xa W1a
    mask = work.get("mask", np.empty_like(z1))
    np.greater(z1, 0.0, out=mask, casting="unsafe")  # (N, H)  1[z1 > 0] as floats
    h1 = np.multiply(z1, mask, out=z1)  # (N, H)  h1 = m * z1, in place
    logits = h1 @ W2 + b2  # (N, K)
    return {"xa": xa, "mask": mask, "h1": h1, "logits": logits, "W1a": W1a, "W2": W2, "b2": b2}


def loss_curvature(logits, y, gamma, loss="ce"):
    """Gradient and curvature of F (eq. 1) with respect to the logits of one network.

    logits : (N, K);  y : (N,) ints;  gamma : (K,) class weights
    Returns g = dF/dz (N, K) (what dynloss.loss_backward gives), w = Gamma_y / N (N,), and
    p = softmax(z) (N, K) for "ce" (None for "mse"); the curvature is Hz_n = w_n (diag p_n -
    p_n p_n^T) for "ce", w_n I_K for "mse".
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    N, K = logits.shape
    w = np.asarray(gamma, dtype=np.float64).reshape(K)[y] / N  # (N,)  Gamma_{y_n} / N
    onehot = y[:, None] == np.arange(K)  # (N, K)
    if loss == "mse":
        return w[:, None] * (logits - onehot), w, None  # dF/dz = w (z - onehot(y))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))  # (N, K)
    p = e / e.sum(axis=1, keepdims=True)  # (N, K)  softmax(z)
    return w[:, None] * (p - onehot), w, p  # dF/dz = w (softmax(z) - onehot(y))


def _apply_hz(Rz, w, p):
    """R g = Hz R z row by row: (N, K) -> (N, K)."""
    if p is None:
        return w[:, None] * Rz  # MSE: Hz_n = w_n I
    return w[:, None] * p * (Rz - (p * Rz).sum(axis=1, keepdims=True))  # w (diag p - p p^T) Rz


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
    return _jacobian(net_state(params, X)).reshape(-1, _n_params(params))


def _n_params(params):
    """P of one network."""
    return sum(a[0].size for a in params.values())


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
    y = np.asarray(y)
    g, w, p = loss_curvature(s["logits"], y, gamma, loss)
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


def _hvp_state(s, g, w, p, C, v):
    """Hv at a stored forward state: v (P,) -> (P,).

    The R-operator of the module docstring with its two g-terms, (R h1)^T g and g V2^T, summed
    over the samples once and for all into C (D+1, H, K): they are the cross terms C v.
    """
    h1, W2 = s["h1"], s["W2"]
    H, K = W2.shape
    V1a, V2, vb2 = _split(v, s["xa"].shape[1], H, K)
    Rz = _jvp_hidden(s, V1a) + h1 @ V2 + vb2  # (N, K)   R z = J v,  R h1 = m * (xa V1a)
    Rg = _apply_hz(Rz, w, p)  # (N, K)   R g = Hz R z
    RdW2 = h1.T @ Rg + np.einsum("djl,dj->jl", C, V1a)  # (H, K)  h1^T R g + (R h1)^T g
    Rdb2 = Rg.sum(axis=0)  # (K,)
    RdW1a = _vjp_hidden(s, Rg) + np.einsum("djl,jl->dj", C, V2)  # (D+1, H)  xa^T R dz1
    return np.concatenate([RdW1a.ravel(), RdW2.ravel(), Rdb2])


def hessian_matvec(s, y, gamma, loss="ce"):
    """The exact HVP v (P,) -> H v (P,) at a forward state ``s`` of :func:`net_state`."""
    g, w, p = loss_curvature(s["logits"], np.asarray(y), gamma, loss)
    C = cross_terms(s["xa"], s["mask"], g)  # (D+1, H, K)
    P = s["W1a"].size + s["W2"].size + s["b2"].size
    return lambda v: _hvp_state(s, g, w, p, C, np.asarray(v, dtype=np.float64).reshape(P))


def hessian_operator(params, X, y, gamma, loss="ce"):
    """The Hessian of F as a scipy LinearOperator (P, P), float64; the forward pass is done once."""
    s = net_state(params, X)
    P = s["W1a"].size + s["W2"].size + s["b2"].size
    mv = hessian_matvec(s, y, gamma, loss)
    return LinearOperator((P, P), matvec=mv, rmatvec=mv, dtype=np.float64)


def hvp(params, X, y, gamma, v, loss="ce"):
    """Exact Hessian-vector product H v of F (eq. 1, weights gamma (K,)): v (P,) -> (P,)."""
    return hessian_operator(params, X, y, gamma, loss).matvec(v)


# ---------------------------------------------------------------------------------------------
# Top eigenpairs
# ---------------------------------------------------------------------------------------------


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
        v0 = np.random.default_rng(0).normal(size=P)
    if ncv is None:
        ncv = max(2 * k + 1, EIGSH_NCV_MIN)
    ncv = min(ncv, P)
    op = LinearOperator((P, P), matvec=matvec, dtype=np.float64)
    vals, vecs = eigsh(op, k=k, which="LA", v0=v0, tol=tol, ncv=ncv, maxiter=maxiter)
    order = np.argsort(vals)[::-1]
    return vals[order], vecs[:, order]


def _ritz(alpha, beta):
    """Eigenpairs of the tridiagonal T (diagonal alpha (j,), off-diagonal beta (j-1,)), by
    LAPACK dstev (a few microseconds): theta (j,) ascending, S (j, j)."""
    if len(alpha) == 1:
        return alpha.copy(), np.ones((1, 1))
    theta, S, info = dstev(alpha, beta, compute_v=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dstev failed with info {info}")
    return theta, S


def warm_top_eig(matvec, P, v0=None, tol=TRACK_TOL, steps=TRACK_STEPS, max_restarts=100):
    """The largest (algebraic) eigenpair of a symmetric operator, cheap when warm-started.

    Lanczos from v0 with full reorthogonalisation, stopped at the first step whose top Ritz
    pair (theta, x) has residual |A x - theta x| = beta_j |s_j| <= tol*|theta| (the criterion
    of eigsh/ARPACK); after ``steps`` steps without convergence it restarts from the top Ritz
    vector. From the previous step's eigenvector the Krylov space needs only a few products, and
    none of eigsh's per-call overhead is paid. The Ritz value is a lower bound on lambda_max
    within tol*|theta| of an eigenvalue, and within about (tol*theta)^2 / gap of lambda_max
    when it is separated by a gap and v0 is close to its eigenvector. Near-degenerate top
    eigenvalues and cold starts need a tight tol or :func:`top_eigs`.

    matvec : callable (P,) -> (P,);  v0 : (P,) start (None: a fixed random vector)
    Returns lam (float), vec (P,) unit norm, n_products (int).
    """
    v = None if v0 is None else np.asarray(v0, dtype=np.float64).reshape(P)
    if v is None or not (np.all(np.isfinite(v)) and np.linalg.norm(v) > 0):
        v = np.random.default_rng(0).normal(size=P)
    steps = min(steps, P)
    Q = np.empty((steps, P))  # Lanczos vectors as rows
    alpha, beta = np.zeros(steps), np.zeros(steps)
    n = 0
    for _ in range(max_restarts):
        q = v / np.linalg.norm(v)
        for j in range(steps):
            Q[j] = q
            w = matvec(q)
            n += 1
            alpha[j] = q @ w
            w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)  # full reorthogonalisation
            beta[j] = np.sqrt(w @ w)
            theta, S = _ritz(alpha[: j + 1], beta[:j])  # (j+1,), (j+1, j+1) ascending
            invariant = beta[j] <= LANCZOS_BREAKDOWN * max(abs(theta).max(), 1e-300)
            if beta[j] * abs(S[-1, -1]) <= tol * abs(theta[-1]) or invariant or j + 1 == P:
                v = Q[: j + 1].T @ S[:, -1]  # top Ritz vector (P,)
                return theta[-1], v / np.linalg.norm(v), n
            q = w / beta[j]
        v = Q.T @ S[:, -1]  # restart from the top Ritz vector
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
    return same * (B @ B.T) + np.kron(h1 @ h1.T + 1.0, np.eye(K))


def ntk_traced(params, X):
    """The NTK averaged over the K logit blocks, (1/K) sum_k Theta[(n,k), (n',k)]: (N, N).

    This is the kernel the authors' notebook plotted (on its first 50 points).
    """
    s = net_state(params, X)
    xa, mask, h1, W2 = s["xa"], s["mask"], s["h1"], s["W2"]
    K = W2.shape[1]
    sq = (W2**2).sum(axis=1)  # (H,)  s_j = sum_k W2_jk^2
    return (xa @ xa.T) * ((mask * sq) @ mask.T) / K + h1 @ h1.T + 1.0


def ntk_matvec(s):
    """The full NTK product u (N*K,) -> J (J^T u) (N*K,) at a forward state ``s``, never formed."""
    h1 = s["h1"]
    N, K = s["logits"].shape

    def matvec(u):
        U = np.asarray(u, dtype=np.float64).reshape(N, K)  # (N, K) upstream on the logits
        dW2, db2 = h1.T @ U, U.sum(axis=0)  # (H, K), (K,)   J^T u, output layer
        dW1a = _vjp_hidden(s, U)  # (D+1, H)       J^T u, hidden layer
        out = _jvp_hidden(s, dW1a) + h1 @ dW2 + db2  # (N, K)  J (J^T u)
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
        return hidden + h1 @ (h1.T @ u) + u.sum()

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
# Spectral density: Lanczos, stochastic Lanczos quadrature, Hutchinson's trace
# ---------------------------------------------------------------------------------------------


def lanczos(matvec, v0, m, breakdown=LANCZOS_BREAKDOWN):
    """m Lanczos steps with full reorthogonalisation (Gram-Schmidt twice per step).

    matvec : symmetric (P,) -> (P,);  v0 : (P,) start (normalised here)
    Stops early at an invariant subspace (beta_i <= breakdown * |A q_i|).
    Returns alpha (m',), beta (m'-1,) (the tridiagonal T = Q^T A Q), Q (P, m'), m' <= m.
    """
    v0 = np.asarray(v0, dtype=np.float64)
    P = len(v0)
    m = min(m, P)
    Q = np.zeros((P, m))
    alpha, beta = np.zeros(m), np.zeros(m)
    q = v0 / np.linalg.norm(v0)
    for i in range(m):
        Q[:, i] = q
        Aq = matvec(q)
        alpha[i] = q @ Aq
        r = Aq - Q[:, : i + 1] @ (Q[:, : i + 1].T @ Aq)  # Gram-Schmidt against every q so far
        r -= Q[:, : i + 1] @ (Q[:, : i + 1].T @ r)  # ... twice, for orthogonality to roundoff
        beta[i] = np.linalg.norm(r)
        if i == m - 1 or beta[i] <= breakdown * max(np.linalg.norm(Aq), 1e-300):
            return alpha[: i + 1], beta[:i], Q[:, : i + 1]
        q = r / beta[i]
    return alpha, beta[: m - 1], Q


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
        theta, S = _ritz(alpha, beta)  # nodes ascending, (m', m')
        nodes[i, : len(theta)], nodes[i, len(theta) :] = theta, theta[-1]
        weights[i, : len(theta)] = S[0] ** 2
    return nodes, weights


def slq_density(nodes, weights, sigma=None, grid_len=SLQ_GRID):
    """Gaussian-broadened spectral density from SLQ nodes and weights (n_probes, m).

    sigma : broadening (eigenvalue units); default SLQ_SIGMA times the span of the nodes.
    The grid spans the nodes plus 6 sigma on each side and the density is normalised to
    integrate to 1 on it (a correction of order exp(-18) to the Gaussians' own mass).

    Returns grid (grid_len,), density (grid_len,).
    """
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = SLQ_SIGMA * (hi - lo if hi > lo else max(abs(lo), 1.0))  # one node: |node|
    grid = np.linspace(lo - 6 * sigma, hi + 6 * sigma, grid_len)  # (grid_len,)
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


def hutchinson_trace(matvec, P, rng, n_probes=100):
    """Hutchinson's trace estimate with Rademacher probes z: mean of z^T A z.

    Returns (estimate, standard error from the probes' spread).
    """
    samples = np.empty(n_probes)
    for i in range(n_probes):
        z = rng.choice([-1.0, 1.0], size=P)  # Rademacher
        samples[i] = z @ matvec(z)
    return samples.mean(), samples.std(ddof=1) / np.sqrt(n_probes)


# ---------------------------------------------------------------------------------------------
# The stability picture: bifurcations, the Hessian threshold (Figs. 4, 5), eq. (14)
# ---------------------------------------------------------------------------------------------


def _runs(flags):
    """Maximal runs of True in a boolean (S,) array: first (E,), last (E,) indices."""
    f = np.concatenate([[False], np.asarray(flags, dtype=bool), [False]])
    edges = np.flatnonzero(f[1:] != f[:-1])
    return edges[::2], edges[1::2] - 1


def bifurcation_episodes(F, step=None, min_flips=BIF_MIN_FLIPS, min_jump=BIF_MIN_JUMP):
    """Period-two bouncing in a loss series: dF(t) = F(t) - F(t-1) alternating in sign step
    after step (Fig. 4 (c)).

    F : (S,) loss logged at consecutive steps (log every step: with an even stride a period-two
        oscillation is invisible)
    step : (S,) steps (default 0..S-1); differences across a gap (step jump != 1) are not used
    min_flips : an episode needs at least this many consecutive sign flips
    min_jump : |dF| at or below this counts as no change (roundoff) and breaks an episode

    A flip at step t means sign dF(t) != sign dF(t-1). For a loss that bounces by +-a from step
    s to step e on top of a smooth descent, the flips run from t = s to t = e + 1.
    Returns starts (E,), ends (E,): the first and the last flip step of each episode.
    """
    F = np.asarray(F, dtype=np.float64)
    step = np.arange(len(F)) if step is None else np.asarray(step)
    dF = np.diff(F)  # (S-1,)  dF at step[1:]
    ok = (np.diff(step) == 1) & (np.abs(dF) > min_jump) & np.isfinite(dF)
    flip = ok[1:] & ok[:-1] & (np.sign(dF[1:]) != np.sign(dF[:-1]))  # (S-2,)  at step[2:]
    first, last = _runs(flip)
    keep = last - first + 1 >= min_flips
    return step[first[keep] + 2], step[last[keep] + 2]


def hessian_threshold(step, lmax, jump=HESS_JUMP, min_length=2):
    """The curvature threshold of the Fig. 4 caption, from a tracked Hessian lambda_max.

    Times where |lambda_max(t) - lambda_max(t-1)| >= jump (consecutive tracked values; the
    caption's "~ 0.1") next to a jump of the opposite sign (bouncing between two branches, not
    a fast but smooth change such as the first steps from the initialisation) form runs; a run
    of at least ``min_length`` such times is an instability, its first time the start (green
    line) and its last the end (red line). The threshold is the average of lambda_max at all
    starts and ends, each taken as the midpoint (lambda(t) + lambda(t-1))/2 of the two
    branches the system alternates between. Track at an odd stride (the authors' notebook: 25
    steps) or every step, or the bouncing is invisible.

    Returns threshold (nan when no instability), starts (E,), ends (E,) steps.
    """
    step, lmax = np.asarray(step), np.asarray(lmax, dtype=np.float64)
    d = np.diff(lmax)  # (S-1,) at step[1:]
    big = np.abs(d) >= jump
    flip = big[1:] & big[:-1] & (np.sign(d[1:]) != np.sign(d[:-1]))  # (S-2,) between d's
    bouncing = big & (np.r_[False, flip] | np.r_[flip, False])  # a jump next to a reversed one
    first, last = _runs(bouncing)
    keep = last - first + 1 >= min_length
    first, last = first[keep], last[keep]
    mid = 0.5 * (lmax[1:] + lmax[:-1])  # (S-1,)
    marks = np.concatenate([first, last])
    threshold = mid[marks].mean() if len(marks) else np.nan
    return threshold, step[first + 1], step[last + 1]


def gd_threshold(lr):
    """Gradient descent on a quadratic diverges along curvature lambda > 2/eta."""
    return 2.0 / lr


def ntk_threshold(lr, N):
    """Eq. (14): the mode of NTK eigenvalue lambda is unstable when 1 - (eta/N) lambda < -1."""
    return 2.0 * N / lr


def ntk_multiplier(lam, lr, N):
    """The factor 1 - (eta/N) lambda of eq. (14) multiplying an NTK eigenmode each step.

    In (0, 1): smooth decay; in (-1, 0): decay flipping sign each step; below -1: period-two
    divergence (the bifurcation branches).
    """
    return 1.0 - lr / N * np.asarray(lam)


# ---------------------------------------------------------------------------------------------
# Following lambda_max during training
# ---------------------------------------------------------------------------------------------


class SpectraTracker:
    """An ``on_log(step, params_host)`` callback for run_spiral.train_block.

    At steps that are multiples of ``every`` it computes, for network ``net`` of the block and
    the current Gamma = dynloss.class_weights(step, A, T, K, stop_step), the top-k Hessian
    eigenvalues, and at multiples of ``ntk_every`` (default: ``every``; 0: never) lambda_max of
    the full and of the traced NTK, on one shared forward pass. ``force=True`` measures what
    was not measured at this step yet, whatever the step (used for the final parameters).
    The first call (and the first after a divergence) is a cold eigsh to TRACK_COLD_TOL;
    later calls start from the previous eigenvectors plus ``mix`` times a random unit vector
    (so that an eigenvalue rising past the previous top one still appears in the Krylov space)
    and stop at relative residual ``tol``: :func:`warm_top_eig` for k = 1, :func:`top_eigs`
    (eigsh) for k > 1. At the defaults the eigenvalues are within tol = 1e-3 of an eigenvalue
    by construction and measured within 1e-5 (relative) of the exact lambda_max (tests,
    benchmarks/bench_spectra.py), about 3 Hessian and 4 NTK products per call. Results:

    hess_step (S,), hess_lmax (S,), hess_topk (S, k), ntk_step (S,), ntk_lmax (S,),
    ntk_traced_lmax (S,); ``seconds``: time spent in the callback; ``products``: operator
    products per operator, all calls. A network whose logits are not finite gets NaN rows and
    cold starts afterwards. For the Fig. 4 threshold (:func:`hessian_threshold`) track at an odd
    stride: at an even one the two branches of a period-two bounce are never both seen.
    """

    def __init__(
        self,
        X,
        y,
        spec,
        net=0,
        k=1,
        every=1,
        tol=TRACK_TOL,
        mix=TRACK_MIX,
        ntk=True,
        ntk_every=None,
    ):
        """X (N, D), y (N,) training data; spec: any object with A, T, stop_step ((M,) arrays
        or scalars) and loss, e.g. run_spiral.TrainSpec."""
        X = np.asarray(X, dtype=np.float64)
        self.xa = np.concatenate([X, np.ones((len(X), 1))], axis=1)  # (N, D+1)
        self.y = np.asarray(y)
        pick = lambda a: None if a is None else float(np.atleast_1d(a)[net])
        self.A, self.T, self.stop_step = pick(spec.A), pick(spec.T), pick(spec.stop_step)
        self.loss = getattr(spec, "loss", "ce")
        self.net, self.k, self.every, self.tol = net, k, every, tol
        self.ntk_every = (every if ntk_every is None else ntk_every) if ntk else 0
        self.with_ntk = self.ntk_every > 0
        self.products = {"hess": 0, "ntk": 0, "traced": 0}
        self.mix, self._rng = mix, np.random.default_rng(0)
        self.seconds = 0.0
        self._rows = {"hess": [], "ntk": []}
        self._vecs = {"hess": None, "ntk": None, "traced": None}
        self._work = {"h1": None, "mask": None}  # (N, H) buffers reused at every call
        self._gamma = (None, None)  # (first step, (GAMMA_BLOCK, K)) class weights ahead

    def gamma_at(self, step, K):
        """Gamma(step) (K,), from class_weights evaluated for GAMMA_BLOCK steps at a time."""
        start, block = self._gamma
        if start is None or not 0 <= step - start < len(block) or block.shape[1] != K:
            start = step
            steps = np.arange(step, step + GAMMA_BLOCK)
            block = class_weights(steps, self.A, self.T, K, self.stop_step)  # (GAMMA_BLOCK, K)
            self._gamma = (start, block)
        return block[step - start]

    def __call__(self, step, params_host, force=False):
        last = lambda which: self._rows[which][-1][0] if self._rows[which] else None
        do_hess = (force or step % self.every == 0) and last("hess") != step
        do_ntk = self.with_ntk and (force or step % self.ntk_every == 0) and last("ntk") != step
        if not (do_hess or do_ntk):
            return
        t0 = time.perf_counter()
        one = {name: np.asarray(a)[self.net : self.net + 1] for name, a in params_host.items()}
        K = one["W2"].shape[2]
        gamma = self.gamma_at(step, K)  # (K,)
        shape = (len(self.xa), one["W2"].shape[1])
        if self._work["h1"] is None or self._work["h1"].shape != shape:
            self._work = {"h1": np.empty(shape), "mask": np.empty(shape)}
        s = net_state(one, self.xa, work=self._work)
        if not np.all(np.isfinite(s["logits"])):
            self._vecs = dict.fromkeys(self._vecs)
            if do_hess:
                self._rows["hess"].append((step, np.full(self.k, np.nan)))
            if do_ntk:
                self._rows["ntk"].append((step, np.nan, np.nan))
            self.seconds += time.perf_counter() - t0
            return
        if do_hess:
            matvec = hessian_matvec(s, self.y, gamma, self.loss)
            vals, self._vecs["hess"] = self._top(matvec, "hess", s)
            self._rows["hess"].append((step, vals))
        if do_ntk:
            lam, self._vecs["ntk"] = self._top(ntk_matvec(s), "ntk", s)
            lam_tr, self._vecs["traced"] = self._top(ntk_traced_matvec(s), "traced", s)
            self._rows["ntk"].append((step, lam[0], lam_tr[0]))
        self.seconds += time.perf_counter() - t0

    def _top(self, matvec, which, s):
        """Top eigenpair(s) of one operator, cold or warm (class docstring): (k,), (n, k)."""
        N, K = s["logits"].shape
        n = {"hess": s["W1a"].size + s["W2"].size + K, "ntk": N * K, "traced": N}[which]
        k = self.k if which == "hess" else 1
        v0 = self._vecs[which]

        def counted(v):
            self.products[which] += 1
            return matvec(v)

        if v0 is None:
            return top_eigs(counted, n, k=k, tol=TRACK_COLD_TOL, ncv=min(n, TRACK_COLD_NCV))
        if self.mix > 0:
            r = self._rng.normal(size=(n, v0.shape[1]))
            v0 = v0 + self.mix * r / np.linalg.norm(r, axis=0)
        if k == 1:
            lam, vec, _ = warm_top_eig(counted, n, v0=v0, tol=self.tol)
            return np.array([lam]), vec[:, None]
        return top_eigs(counted, n, k=k, v0=v0, tol=self.tol)

    @property
    def hess_step(self):
        return np.array([r[0] for r in self._rows["hess"]], dtype=np.int64)

    @property
    def hess_topk(self):
        return np.array([r[1] for r in self._rows["hess"]]).reshape(-1, self.k)

    @property
    def hess_lmax(self):
        return self.hess_topk[:, 0]

    @property
    def ntk_step(self):
        return np.array([r[0] for r in self._rows["ntk"]], dtype=np.int64)

    @property
    def ntk_lmax(self):
        return np.array([r[1] for r in self._rows["ntk"]], dtype=np.float64)

    @property
    def ntk_traced_lmax(self):
        return np.array([r[2] for r in self._rows["ntk"]], dtype=np.float64)

    def arrays(self):
        """Every tracked series in a dict (for np.savez)."""
        names = ("hess_step", "hess_lmax", "hess_topk", "ntk_step", "ntk_lmax", "ntk_traced_lmax")
        return {name: getattr(self, name) for name in names}
