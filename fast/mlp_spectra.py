"""The spectra tracker's hot path: Hessian-vector and NTK-vector products of one spiral MLP at
a stored forward state, fused for speed (the Figs. 4-5 runs call them every few steps).

Every function here copies a reference and is tied to it by a test (tests/test_spectra.py):

    this module                    the reference it copies
    net_state                      models.mlp_forward (the forward pass into reused buffers)
    hessian_matvec                 models.mlp_hvp (the R-operator), with the network's own
                                   term C v summed once per state (models.mlp_network_term);
                                   ReLU, or softplus with its activation-curvature term
    ntk_matvec                     spectra.ntk (J J^T u, through _vjp_hidden and _jvp_hidden:
                                   models.mlp_backward and models.mlp_jvp)
    ntk_traced_matvec              spectra.ntk_traced_matvec (spectra.ntk_traced u), in the
                                   closed form below

Symbols: N samples, D inputs, H hidden units, K classes, P parameters of one network. ``params``
is a models.py dict with M = 1; vectors are flat float64 (P,) in the order of models.flatten.
Because W1 is followed by b1 in that order, the first (D+1)*H entries of theta are
W1a = [W1; b1] (D+1, H) row-major, acting on xa = [x, 1] (N, D+1): the formulas below use that
block, which is the flattened order itself, not another layout.

Closed forms used here (derivations: models.py)
-----------------------------------------------
J v, hidden layer:   (m * (xa V1a)) W2  = sum_d xa_nd [m (V1a_d * W2)]_nk   (one GEMM)
J^T u, hidden layer: xa^T (m * (u W2^T)) = sum_k W2_jk [m^T (xa_d * u_k)]_j (one GEMM)
Hv = J^T Hz J v + Q v with Q_djl = sum_n xa_nd m_nj g_nl, Hz the logit curvature (dynloss)
Theta_traced = (1/K) (xa xa^T) * (m diag(s) m^T) + h1 h1^T + 1, s_j = sum_k W2_jk^2 (eq. 11)
"""

from __future__ import annotations

import numpy as np

from dynloss import apply_logit_hessian, logit_curvature, loss_backward, loss_forward
from models import RELU, mlp_forward


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


def net_state(params, X, work=None, act=RELU):
    """Forward pass of one MLP, kept for Jacobians, HVPs and NTKs.

    X : (N, D) inputs
    work : None: the forward pass is ``models.mlp_forward``. Or a dict of two (N, H) float64
        buffers "h1" and "mask": the same pass written into them as xa W1a (the tracker's hot
        path, where fresh (N, H) arrays at every call cost as much as the products, in page
        faults); tests/test_spectra.py ties the two to 1e-12.
    act : the hidden activation (models.RELU); another one (beyond/smooth.py's softplus): then
        "mask" holds the slope sigma'(z1) and "sigma2" the curvature sigma''(z1) (act.slope and
        act.curvature), and ``work`` is not used.
    Returns a dict: xa (N, D+1) inputs with a ones column, mask (N, H) float 1[z1 > 0] (the
    slope sigma'(z1)), sigma2 (N, H) or None, h1 (N, H), logits (N, K), W1a (D+1, H), W2 (H, K),
    b2 (K,).
    """
    W1a, W2, b2 = single_net(params)
    X = np.asarray(X, dtype=np.float64)
    xa = np.concatenate([X, np.ones((len(X), 1))], axis=1)  # (N, D+1)
    if act is not RELU:  # a smooth activation: the reference forward pass, slope and curvature
        one = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        logits, (_, (_, c2), (h1, _)) = mlp_forward(X, one, act)
        mask = act.slope(c2)[0]  # (N, H)
        sigma2 = act.curvature(c2)[0] if act.curvature else None  # (N, H)
        return {"xa": xa, "mask": mask, "sigma2": sigma2, "h1": h1[0], "logits": logits[0],
                "W1a": W1a, "W2": W2, "b2": b2}  # fmt: skip
    if work is None:
        one = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        logits, (_, (_, h1), _) = mlp_forward(X, one)  # (1, N, K); ReLU's cache is h1 (1, N, H)
        h1, logits = h1[0], logits[0]  # (N, H), (N, K)
        mask = (h1 > 0).astype(np.float64)  # (N, H)  1[z1 > 0]
    else:
        z1 = np.matmul(xa, W1a, out=work["h1"])  # (N, H)  z1 = xa W1a = X W1 + b1
        mask = work["mask"]
        np.greater(z1, 0.0, out=mask, casting="unsafe")  # (N, H)  1[z1 > 0] as floats
        h1 = np.multiply(z1, mask, out=z1)  # (N, H)  h1 = m * z1, in place
        logits = h1 @ W2 + b2  # (N, K)
    return {"xa": xa, "mask": mask, "sigma2": None, "h1": h1, "logits": logits, "W1a": W1a,
            "W2": W2, "b2": b2}  # fmt: skip


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
    """The network's second-derivative term Q_djl = sum_n xa_nd m_nj g_nl: (D+1, H, K)."""
    (N, D1), K = xa.shape, g.shape[1]
    xg = (xa[:, :, None] * g[:, None, :]).reshape(N, D1 * K)  # (N, (D+1)*K)  xa_nd g_nl
    return (xg.T @ mask).reshape(D1, K, -1).transpose(0, 2, 1)  # (D+1, H, K)


def _split(v, D1, H, K):
    """Flat (P,) -> V1a (D+1, H), V2 (H, K), vb2 (K,) views."""
    n1, n2 = D1 * H, D1 * H + H * K
    return v[:n1].reshape(D1, H), v[n1:n2].reshape(H, K), v[n2:]


def n_params(s):
    """P of one network, from its forward state ``s`` (:func:`net_state`)."""
    return s["W1a"].size + s["W2"].size + s["b2"].size


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


def _hvp_state(s, curvature, C, v, dh_sigma2=None):
    """Hv at a stored forward state: v (P,) -> (P,).

    The R-operator of the module docstring with its two g-terms, (R h1)^T g and g V2^T, summed
    over the samples once and for all into C (D+1, H, K): they are the cross terms C v. For
    softplus, dh_sigma2 = dh1 * sigma''(z1) (N, H) adds the activation-curvature term
    xa^T (sigma'' R{z1} dh1) (models.mlp_hvp_operator).
    """
    h1, W2 = s["h1"], s["W2"]
    H, K = W2.shape
    V1a, V2, vb2 = _split(v, s["xa"].shape[1], H, K)
    Rz = _jvp_hidden(s, V1a) + h1 @ V2 + vb2  # (N, K)   R z = J v,  R h1 = m * (xa V1a)
    Rg = apply_logit_hessian(curvature, Rz[None])[0]  # (N, K)   R g = Hz R z (dynloss)
    RdW2 = h1.T @ Rg + np.einsum("djl,dj->jl", C, V1a)  # (H, K)  h1^T R g + (R h1)^T g
    Rdb2 = Rg.sum(axis=0)  # (K,)
    RdW1a = _vjp_hidden(s, Rg) + np.einsum("djl,jl->dj", C, V2)  # (D+1, H)  xa^T R dz1
    if dh_sigma2 is not None:  # softplus: + xa^T (sigma''(z1) R{z1} dh1), R{z1} = xa V1a
        RdW1a += s["xa"].T @ (dh_sigma2 * (s["xa"] @ V1a))
    return np.concatenate([RdW1a.ravel(), RdW2.ravel(), Rdb2])


def hessian_matvec(s, y, gamma, loss="ce"):
    """The exact HVP v (P,) -> H v (P,) at a forward state ``s`` of :func:`net_state` (ReLU or
    softplus)."""
    g, w, p, _ = loss_terms(s, y, gamma, loss)
    curvature = (w[None], None if p is None else p[None])  # w (1, N), softmax (1, N, K)
    C = cross_terms(s["xa"], s["mask"], g)  # (D+1, H, K)
    dh_sigma2 = None if s.get("sigma2") is None else (g @ s["W2"].T) * s["sigma2"]  # (N, H)
    P = n_params(s)
    return lambda v: _hvp_state(
        s, curvature, C, np.asarray(v, dtype=np.float64).reshape(P), dh_sigma2
    )


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
