"""The dynamical loss of Ruiz-Garcia et al. (ICML 2021), eqs. (1)-(5), its gradient and R-operator.

Symbols
-------
M  networks trained side by side (each may have its own amplitude A and period T)
S  steps at which Gamma is evaluated at once
N  samples
K  classes (the paper's C);  z  the logits (M, N, K) (the paper's f)
t  update step (full-batch steps for the spiral, minibatch steps for CIFAR-10)

The class weights Gamma_i(t) (eqs. 2-5) emphasise one class per period T, cycling through the K
classes, so one full cycle lasts K*T steps. The loss (eq. 1) is the Gamma-weighted cross-entropy,
averaged over the samples as in the authors' code, so that learning rate 1 means what it means
there:

    F = (1/N) sum_j Gamma_{y_j}(t) * CE_j,     CE_j = -log softmax(z_j)_{y_j}.

Derivation (gradient with respect to the logits z, shape (M, N, K))
--------------------------------------------------------------------
CE_j = logsumexp(z_j) - z_{j, y_j}, so dCE_j/dz_{jk} = softmax(z_j)_k - [k == y_j]; Gamma does not
depend on z, hence

    dF/dz_{jk} = Gamma_{y_j} * (softmax(z_j)_k - onehot(y_j)_k) / N.

The MSE base loss (a second option; the paper's discussion asks how it compares) is eq. (8)
weighted the same way, F = (1/(2N)) sum_j Gamma_{y_j} sum_k (z_jk - onehot(y_j)_k)^2, with
dF/dz_{jk} = Gamma_{y_j} (z_jk - onehot(y_j)_k) / N.

Derivation (second order: the R-operator, for Hessian-vector products)
----------------------------------------------------------------------
For a direction R{z} of the logits, R{dF/dz} = (d^2F/dz^2) R{z} (Pearlmutter 1994). The logit
Hessian is block diagonal over samples: with w_j = Gamma_{y_j} / N and s = softmax(z_j),
ds_k/dz_l = s_k (delta_kl - s_l), so

    d^2F/dz_j dz_j = w_j (diag(s) - s s^T),   R{dF/dz}_jk = w_j s_k (R{z}_jk - sum_l s_l R{z}_jl)

(MSE: w_j I_K and R{dF/dz} = w_j R{z}). models.py pushes this through its networks (the
R-operators of the MLP and of Myrtle5) and spectra.py builds the Gauss-Newton matrix from
:func:`logit_curvature`.

Every function here works on NumPy and on CuPy arrays alike (``get_array_module`` picks ``xp``;
:func:`to_device` and :func:`to_host` move dicts of arrays across).
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

LOSSES = ("ce", "mse")
LossCache = namedtuple("LossCache", "loss logp resid y gamma_y")  # what loss_forward keeps
DIVERGENCE_FACTOR = 1e3  # a run has diverged once F is not finite or above this times F(0)


def get_array_module(*arrays):
    """numpy, or cupy when any of ``arrays`` is a CuPy array (CuPy is optional)."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy

            return cupy
    return np


def to_device(tree, xp):
    """Copy a dict of host arrays to the backend ``xp`` (identity for NumPy)."""
    return {k: xp.asarray(v) for k, v in tree.items()}


def to_host(tree):
    """Copy a dict of arrays (NumPy or CuPy) to NumPy."""
    return {k: (v.get() if hasattr(v, "get") else np.asarray(v)) for k, v in tree.items()}


def class_weights(t, A, T, K, stop_step=None, xp=np):
    """The normalised class weights Gamma_i(t) of eqs. (2)-(5).

    Parameters
    ----------
    t : int or array (S,)
        Update step(s), t >= 0.
    A : float or array (M,)
        Amplitude, A >= 1 (A = 1: no oscillation, plain cross-entropy).
    T : float or array (M,)
        Period in steps, T >= 1.
    K : int
        Number of classes.
    stop_step : None, int or array (M,)
        From this step on the oscillations are off (Gamma = 1). None: never stopped.

    Returns
    -------
    gamma : array (M, K), or (S, M, K) when t is an array; (K,) / (S, K) when A and T are
        scalars. The weights are positive and sum to K over the last axis.
    """
    scalar_net = np.ndim(A) == 0 and np.ndim(T) == 0 and np.ndim(stop_step) == 0
    A = xp.atleast_1d(xp.asarray(A, dtype=xp.float64))  # (M,)
    T = xp.atleast_1d(xp.asarray(T, dtype=xp.float64))  # (M,)
    scalar_t = np.ndim(t) == 0
    t = xp.atleast_1d(xp.asarray(t, dtype=xp.float64))[:, None]  # (S, 1)
    t_T = t - T * xp.floor(t / T)  # (S, M)  Eq. (2): t_T = t mod T
    slope = 2.0 * (A - 1.0) / T  # (M,)  of eq. (3)'s triangle
    f = xp.where(t_T <= T / 2, 1.0 + slope * t_T, 2.0 * A - slope * t_T - 1.0)  # (S, M)  Eq. (3)
    chosen = xp.floor(t / T).astype(xp.int64) % K  # (S, M)  Eq. (4): floor(t/T) mod K
    is_chosen = chosen[..., None] == xp.arange(K)  # (S, M, K)
    gamma_hat = xp.where(is_chosen, f[..., None], 1.0)  # (S, M, K)  Eq. (4)
    gamma = K * gamma_hat / gamma_hat.sum(axis=-1, keepdims=True)  # (S, M, K)  Eq. (5)
    if stop_step is not None:
        stop = xp.atleast_1d(xp.asarray(stop_step, dtype=xp.float64))  # (M,)
        gamma = xp.where((t >= stop)[..., None], 1.0, gamma)  # (S, M, K)
    if scalar_net:
        gamma = gamma[:, 0, :]  # (S, K)
    return gamma[0] if scalar_t else gamma


def _onehot(y, K, xp):
    """One-hot rows: y (N,) ints -> (N, K) floats."""
    return (y[:, None] == xp.arange(K)).astype(xp.float64)


def log_softmax(logits):
    """Numerically stable log-softmax over the last axis: (..., K) -> (..., K)."""
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def loss_forward(logits, y, gamma, loss="ce"):
    """The dynamical loss F of eq. (1) (mean over samples) for M networks at once.

    Parameters
    ----------
    logits : array (M, N, K)
    y : int array (N,)
        Labels in 0..K-1, shared by the M networks.
    gamma : array (M, K)
        Class weights Gamma_i(t) from :func:`class_weights`.
    loss : "ce" (cross-entropy, the paper's) or "mse" (eq. 8, weighted the same way).

    Returns
    -------
    F : array (M,)
    cache : a :class:`LossCache` for :func:`loss_backward`: the loss, logp = log softmax(z)
        (M, N, K) ("ce"; None for "mse"), resid = z - onehot(y) (M, N, K) ("mse"; None for
        "ce"), y, and gamma_y (M, N) = Gamma_{y_j}.
    """
    xp = get_array_module(logits, gamma)
    M, N, K = logits.shape
    gamma_y = gamma[:, y]  # (M, N)  Gamma_{y_j}
    if loss == "ce":
        logp = log_softmax(logits)  # (M, N, K)
        ce = -xp.take_along_axis(logp, y[None, :, None], axis=-1)[..., 0]  # (M, N)
        F = (gamma_y * ce).sum(axis=1) / N  # (M,)  Eq. (1) / N
        return F, LossCache(loss, logp, None, y, gamma_y)
    if loss == "mse":
        resid = logits - _onehot(y, K, xp)  # (M, N, K)  g_k(x) of eq. (12)
        F = (gamma_y * (resid**2).sum(axis=-1)).sum(axis=1) / (2 * N)  # (M,)  Eq. (8), weighted
        return F, LossCache(loss, None, resid, y, gamma_y)
    raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")


def loss_backward(cache):
    """Gradient of :func:`loss_forward` with respect to the logits.

    Returns
    -------
    dlogits : array (M, N, K)
    """
    c = cache
    N = c.gamma_y.shape[1]
    if c.loss == "ce":
        xp = get_array_module(c.logp)
        dz = xp.exp(c.logp)  # (M, N, K)  softmax(z)
        dz[:, xp.arange(N), c.y] -= 1.0  # softmax(z) - onehot(y)
        return dz * (c.gamma_y[..., None] / N)  # eq. (1): dF/dz = Gamma_y (softmax - onehot) / N
    return c.resid * (c.gamma_y[..., None] / N)  # eq. (8): dF/dz = Gamma_y (z - onehot(y)) / N


def logit_curvature(cache):
    """The pieces of the logit Hessian d^2F/dz^2 at a :func:`loss_forward` cache.

    Returns w (M, N), the weights Gamma_{y_j} / N, and s (M, N, K) = softmax(z) for "ce" (None
    for "mse"): d^2F/dz_j dz_j = w_j (diag(s_j) - s_j s_j^T), or w_j I_K for "mse".
    """
    c = cache
    w = c.gamma_y / c.gamma_y.shape[1]  # (M, N)  Gamma_y / N
    return w, (get_array_module(c.logp).exp(c.logp) if c.loss == "ce" else None)  # softmax(z)


def apply_logit_hessian(curvature, Rlogits):
    """(d^2F/dz^2) R{z} from the pieces ``curvature = (w, s)`` of :func:`logit_curvature`.

    Rlogits : (M, N, K) a direction R{z} of the logits.  Returns R{dF/dz} (M, N, K).
    """
    w, s = curvature
    if s is None:
        return w[..., None] * Rlogits  # MSE: R{dF/dz} = w R{z}
    sR = (s * Rlogits).sum(axis=-1, keepdims=True)  # (M, N, 1)  s . R{z}
    return w[..., None] * s * (Rlogits - sR)  # w s (R{z} - s . R{z})


def loss_rop(cache, Rlogits):
    """R{dF/dz} = (d^2F/dz^2) R{z}: the Hessian of F in the logits applied to a direction.

    cache : from :func:`loss_forward`;  Rlogits : (M, N, K) the direction R{z}
    Returns (M, N, K) (derivation in the module docstring).
    """
    return apply_logit_hessian(logit_curvature(cache), Rlogits)


def per_sample_cross_entropy(logits, y):
    """CE_j = -log softmax(z_j)_{y_j} of every sample: (M, N, K), (N,) -> (M, N)."""
    xp = get_array_module(logits)
    return -xp.take_along_axis(log_softmax(logits), y[None, :, None], axis=-1)[..., 0]


def cross_entropy(logits, y):
    """Plain (static) cross-entropy, the mean over samples: (M, N, K), (N,) -> (M,)."""
    return per_sample_cross_entropy(logits, y).mean(axis=1)


def diverged(F, F0):
    """Whether a loss F has diverged from its initial value F0 (arrays or floats): it is not
    finite, or above DIVERGENCE_FACTOR times F0. The one criterion of every trainer here: a
    blow-up to a large finite loss at chance accuracy counts, not only an overflow.

    F : float or array (M,);  F0 : float or (M,) (broadcast). Returns bool or bool array (M,).
    """
    xp = get_array_module(F)
    return ~xp.isfinite(F) | (F > DIVERGENCE_FACTOR * F0)


def accuracy(logits, y):
    """Fraction of samples whose largest logit is the label: (M, N, K), (N,) -> (M,)."""
    return (logits.argmax(axis=-1) == y[None, :]).mean(axis=1)
