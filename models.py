"""The networks of the paper by hand: the one-hidden-layer MLP (Figs. 2-5) and Myrtle5 (Fig. 1).

This module is the reference: layers as pure forward/backward pairs, the two models built from
them line by line, their exact Hessian-vector products (R-operator), the MLP's Jacobian and the
Nesterov step, in plain NumPy (the same lines run on CuPy arrays: ``xp`` is picked from the
arguments). It imports no GPU code. The fast paths live in ``fast/``: the batched spiral trainer
(a fused copy of the MLP lines below) and the fused Myrtle5 (fast/myrtle5.py: a convolution and
its ReLU in one layer, on NumPy or on our CUDA kernels), each tied to this reference by tests.
The loss itself (eqs. 1-5, its gradient and its curvature) is in dynloss.py.

Symbols
-------
M  networks trained side by side (a leading axis on every MLP parameter and activation)
N  samples
D  input dimension (2 for the spiral)
H  hidden width (100 "narrow", 1000 "wide")
K  classes
P  parameters of one network (D*H + H + H*K + K; 603 at H = 100)
C  channels of an image or feature map (c: the Myrtle5 width, 64 in the paper; the paper's C
   is our K)
Hx, Wx  image height and width (32 for CIFAR-10; Hx, not H, so as not to clash with the MLP's H)
z  pre-activations (z1) and logits (z; the paper's f)
m  the ReLU mask 1[z1 > 0]; for another activation its slope sigma'(z1) (``act.slope``)
g  dF/dz, the gradient of the loss in the logits (the paper's g of eq. 12 is the MSE residual
   z - onehot(y), which dF/dz equals up to the factor Gamma_y / N); d a parameter's gradient
v, V  a direction in parameter space (flat, or a params-shaped dict); u the Nesterov velocity

Conventions
-----------
Row vectors: ``z1 = x @ W1 + b1`` with W1 of shape (D, H) and W2 of shape (H, K); every MLP
parameter carries the leading M axis, so W1 is stored as (M, D, H). The inputs X (N, D) are shared
by the M networks. float64 unless a dtype is given. The forward returns ``(out, cache)``, the
backward takes ``(dout, cache)`` and returns the gradients; nothing is edited in place except
arrays the function itself just allocated.

Initialisations (``init=`` name)
--------------------------------
standard  W ~ N(0, 1/fan_in), b = 0 (trained): neural-tangents' 'standard' parameterisation with
          W_std = 1, b_std = 0, which produced the paper's results (2020-21). The default.
glorot    W ~ N(0, 2/(fan_in + fan_out)), b ~ N(0, 0.01^2): jax.example_libraries.stax defaults,
          used by the authors' 2022 notebook.

The MLP D -> H -> K (Figs. 2-5)
-------------------------------
    z1 = X W1 + b1 (M, N, H),   h1 = relu(z1),   logits = h1 W2 + b2 (M, N, K).

spiral.train_reference trains it with these functions; fast/spiral_trainer.py is a fused copy
tied to them by tests.

Derivation: the MLP's Jacobian and exact Hessian
------------------------------------------------
For one network (the M axis dropped), with the mask m = 1[z1 > 0] (N, H) and g = dF/dz (N, K)
from dynloss, the logit Jacobian J = dz/dtheta (N*K, P), row n*K + k, in the parameter order
W1, b1, W2, b2 (:func:`flatten`):

    dz_nk/dW1[d,j] = x_nd m_nj W2_jk,   dz_nk/db1_j = m_nj W2_jk,
    dz_nk/dW2[j,l] = h1_nj [k=l],        dz_nk/db2_l = [k=l].

The chain rule twice gives the exact Hessian of F:

    d2F/dtheta2 = J^T (d2F/dz2) J + sum_{n,k} g_nk d2 z_nk/dtheta2.

The first term is the Gauss-Newton part (spectra.gauss_newton). In the second, ReLU's second
derivative vanishes away from the kinks (m is locally constant) and z is linear in W2 and b2, and
linear in (W1, b1) at fixed W2, so the only nonzero second derivatives of z are mixed:
d2 z_nk / dW1a[d,j] dW2[j,l] = xa_nd m_nj [k=l], with W1a = [W1; b1] (D+1, H) acting on
xa = [x, 1]. The network's own term therefore lives in the W1a-W2 blocks (:func:`mlp_network_term`):

    H[W1a[d,j], W2[j,l]] += Q_djl,   Q_djl = sum_n xa_nd m_nj g_nl.

A smooth activation (beyond the paper: beyond/smooth.py's softplus)
--------------------------------------------------------------------
Everything above holds for any activation sigma with m replaced by sigma'(z1) (``act.slope``).
Where sigma'' is not zero, z is no longer linear in W1a at fixed W2: d2 z_nk / dW1a[d,j]
dW1a[d',j] = W2_jk sigma''(z1_nj) xa_nd xa_nd', and the network term gains the blocks

    H[W1a[d,j], W1a[d',j]] += B_jdd',   B_jdd' = sum_n dh1_nj sigma''(z1_nj) xa_nd xa_nd',

with dh1 = g W2^T; the R-operator gains R{dz1} += sigma''(z1) R{z1} dh1 (``act.curvature``).

Derivation: exact Hessian-vector products (the R-operator, forward-over-reverse)
-------------------------------------------------------------------------------
For a direction v (P,) write R{f} = d/de f(theta + e v) at e = 0 (Pearlmutter 1994). Then
Hv = R{dF/dtheta}: apply R to every line of the forward and then the backward pass. R is linear
and obeys the product rule; R{W_l} = V_l, R{b_l} = v_bl (v unflattened), R{x} = 0.

- affine, conv3x3 and dense (Myrtle5, below) are bilinear in (input a, weight W):
  R{z} = f(R{a}, W) + f(a, V) + v_b.
- ReLU: h = 1[z > 0] z with the mask locally constant (away from the kinks, where F is not twice
  differentiable), so R{h} = 1[z > 0] R{z}: the same product as relu_backward. (A smooth
  activation: R{h} = sigma'(z) R{z}, and R{dz} gains sigma''(z) R{z} dh, above.)
- pools are linear: R{pool(a)} = pool(R{a}).
- loss: R{dF/dz} = (d^2F/dz^2) R{z}, dynloss.loss_rop (derived there).
- backward lines: dW = a^T dz gives R{dW} = R{a}^T dz + a^T R{dz}; da = dz W^T (a flipped conv
  for conv3x3) gives R{da} = R{dz} W^T + dz V^T; db = sum dz gives R{db} = sum R{dz};
  dz = 1[z > 0] dh gives R{dz} = 1[z > 0] R{dh}; pool backward is linear.

The R forward pass alone is the Jacobian-vector product R{logits} = J v (:func:`mlp_jvp`); the
backward pass alone is J^T r (:func:`mlp_backward` with r as dlogits). Hv is the exact Hessian of
the batch loss applied to v (no Gauss-Newton approximation), at about twice the cost of a gradient.

Myrtle5 (Fig. 1; Shankar et al. 2020, the neural-tangents example at depth 5)
-------------------------------------------------------------------------------
One network, no M axis (the CIFAR runs train one network at a time)::

    x (N, Hx, Wx, C_in)
    z1 = conv3x3(x,  W1) + b1   h1 = relu(z1)                       (N, Hx, Wx, c)
    z2 = conv3x3(h1, W2) + b2   h2 = relu(z2)   p2 = avgpool2(h2)   (N, Hx/2, Wx/2, c)
    z3 = conv3x3(p2, W3) + b3   h3 = relu(z3)   p3 = avgpool2(h3)   (N, Hx/4, Wx/4, c)
    z4 = conv3x3(p3, W4) + b4   h4 = relu(z4)   q = global_avgpool(h4)   (N, c)
    logits = q @ W5 + b5                                              (N, K)

Parameters, in the fixed order of ``MYRTLE5_PARAM_NAMES``: W1 (3, 3, C_in, c), W2..W4
(3, 3, c, c) (kernel row, kernel column, input channel, output channel), b1..b4 (c,), W5 (c, K),
b5 (K,); P = 9 C_in c + 27 c^2 + 4c + cK + K (113,226 at c = 64, C_in = 3, K = 10). Convolutions
are 3x3, stride 1, SAME (zero) padding. The global average pool over the last (Hx/4, Wx/4) map
equals neural-tangents' three further 2x2 average pools (8x8 -> 1x1) at 32x32: a mean of means of
equal blocks is the mean. Image sides must be multiples of 8, as for that definition.

Layout: NHWC, x[n, row, col, channel]. With channels last the 3x3xC patch of every pixel is nine
runs of C contiguous values, the GEMM's (N*Hx*Wx, C_out) result already is the NHWC output, and
biases and pools broadcast over the last axis: no transpose anywhere.

Convolution: im2col + one GEMM. :func:`im2col3x3` pads the input with zeros and copies the nine
shifted views (one slice per kernel tap) into cols (N*Hx*Wx, 9C); the kernel reshaped to
(9C, C_out) (a free view of (3, 3, C, C_out)) multiplies it.

Initialisation (``init_myrtle5``): He scale W ~ N(0, 2/fan_in) with fan_in = 9 C_in for the
convolutions and fan_in = c for the dense layer, zero (trainable) biases. This is neural-tangents'
MyrtleNetwork, which passes W_std = sqrt(2) to every layer, the final Dense included; at
initialisation 'standard' and 'ntk' parameterisations give the same function.

Derivation: the convolution's backward pass
-------------------------------------------
With xp the input padded by one zero row/column on each side,
out[n,i,j,o] = sum_{a,b,c} xp[n,i+a,j+b,c] W[a,b,c,o], i.e. out = cols @ W.reshape(9C, C_out).

- dF/dW = cols^T @ dout, reshaped to (3, 3, C, C_out); dF/db = dout summed over n, i, j.
- dF/dx[n,p,q,c] = sum_{i,j,o} dout[n,i,j,o] W[p+1-i, q+1-j, c, o] over the i, j where the
  kernel index lies in 0..2. Writing a = p+1-i gives sum_{a',b',o} doutp[n,p+a',q+b',o]
  W[2-a',2-b',c,o] with a' = 2-a and doutp the zero-padded dout: the SAME convolution of dout
  with the kernel flipped in both spatial axes and its channel axes swapped. That is the col2im
  of dcols = dout @ W^T, computed as im2col + one GEMM instead of nine strided scatter-adds.
"""

from __future__ import annotations

from collections import namedtuple
from types import SimpleNamespace

import numpy as np

from dynloss import (
    apply_logit_hessian,
    get_array_module,
    logit_curvature,
    loss_backward,
    loss_forward,
    loss_rop,
)

INITS = ("standard", "glorot")
MLP_PARAM_NAMES = ("W1", "b1", "W2", "b2")
MYRTLE5_PARAM_NAMES = ("W1", "b1", "W2", "b2", "W3", "b3", "W4", "b4", "W5", "b5")
MYRTLE5_DIVISOR = 8  # image sides must be multiples of this (2x2 pools down to 8x8 -> 1x1)
NESTEROV_MOMENTUM = 0.9  # the Fig. 1 protocol's momentum


# ---------------------------------------------------------------------------------------------
# Layers of the MLP (a leading M axis of networks)
# ---------------------------------------------------------------------------------------------


def affine_forward(x, W, b):
    """out = x @ W + b for M networks.

    x : (N, Din) shared by all networks, or (M, N, Din);  W : (M, Din, Dout);  b : (M, Dout)
    Returns out (M, N, Dout) and the cache (x, W).
    """
    out = x @ W  # (M, N, Dout)
    out += b[:, None, :]  # (M, N, Dout)
    return out, (x, W)


def affine_backward(dout, cache):
    """Gradients of :func:`affine_forward`.

    dout : (M, N, Dout)
    Returns dx (M, N, Din), or None when x was shared (it is data, not trained); dW (M, Din, Dout);
    db (M, Dout).
    """
    x, W = cache
    xp = get_array_module(dout)
    dW = xp.swapaxes(x, -1, -2) @ dout  # (M, Din, Dout)  dF/dW = x^T dout
    db = dout.sum(axis=1)  # (M, Dout)        dF/db = sum_n dout
    dx = None if x.ndim == 2 else dout @ xp.swapaxes(W, -1, -2)  # (M, N, Din)  dF/dx = dout W^T
    return dx, dW, db


def relu_forward(z):
    """h = max(z, 0), elementwise, any shape (MLP: (M, N, H)); the cache is h itself."""
    xp = get_array_module(z)
    h = xp.maximum(z, 0.0)
    return h, h


def relu_backward(dh, cache):
    """dz = dh * 1[z > 0], the shape of dh; ``cache`` is the forward output h (h > 0 exactly
    where z > 0)."""
    return dh * (cache > 0)  # dF/dz = dF/dh * 1[z > 0]


def relu_slope(cache):
    """ReLU's slope 1[z > 0] from its cache h (the shape of z): the mask of the MLP's Jacobian."""
    return (cache > 0).astype(cache.dtype)


Activation = namedtuple("Activation", "name forward backward slope curvature")
Activation.__doc__ = """The hidden activation of the MLP, as four pure functions: forward(z) ->
(h, cache), backward(dh, cache) -> dz = dh sigma'(z), slope(cache) -> sigma'(z), and
curvature(cache) -> sigma''(z) (None: zero, as for ReLU away from its kink). The MLP functions
take one as ``act`` (RELU by default: the paper's); beyond/smooth.py builds the softplus one."""
RELU = Activation("relu", relu_forward, relu_backward, relu_slope, None)


# ---------------------------------------------------------------------------------------------
# The MLP D -> H -> K
# ---------------------------------------------------------------------------------------------


def init_mlp(seeds, D, H, K, init="standard", dtype=np.float64):
    """Initial parameters of M = len(seeds) MLPs, network m drawn from default_rng(seeds[m]).

    Each network's parameters depend only on its own seed, so a network initialised inside a
    batch equals the one initialised alone. Drawn on the host (NumPy) in the order W1, b1, W2, b2.

    Returns params {"W1": (M, D, H), "b1": (M, H), "W2": (M, H, K), "b2": (M, K)} as NumPy arrays.
    """
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {INITS}")
    out = {name: [] for name in MLP_PARAM_NAMES}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for name, (fan_in, fan_out) in (("1", (D, H)), ("2", (H, K))):
            if init == "standard":
                W = rng.normal(0.0, np.sqrt(1.0 / fan_in), size=(fan_in, fan_out))
                b = np.zeros(fan_out)
            else:
                W = rng.normal(0.0, np.sqrt(2.0 / (fan_in + fan_out)), size=(fan_in, fan_out))
                b = rng.normal(0.0, 0.01, size=fan_out)
            out["W" + name].append(W)
            out["b" + name].append(b)
    return {k: np.stack(v).astype(dtype) for k, v in out.items()}


def mlp_forward(X, params, act=RELU):
    """Logits of M MLPs on shared inputs.

    X : (N, D);  params : W1 (M, D, H), b1 (M, H), W2 (M, H, K), b2 (M, K)
    act : the hidden activation (:data:`RELU`, the paper's)
    Returns logits (M, N, K) and the cache for :func:`mlp_backward` (it holds ``act``).
    """
    z1, c1 = affine_forward(X, params["W1"], params["b1"])  # (M, N, H)
    h1, c2 = act.forward(z1)  # (M, N, H)
    logits, c3 = affine_forward(h1, params["W2"], params["b2"])  # (M, N, K)
    return logits, (c1, (act, c2), c3)


def mlp_backward(dlogits, cache):
    """Parameter gradients of :func:`mlp_forward`, the chain rule in reverse order.

    dlogits : (M, N, K) (dF/dz; any upstream u gives J^T u)
    Returns grads with the shapes of params.
    """
    c1, (act, c2), c3 = cache
    dh1, dW2, db2 = affine_backward(dlogits, c3)  # (M, N, H), (M, H, K), (M, K)
    dz1 = act.backward(dh1, c2)  # (M, N, H)  dF/dz1 = dF/dh1 * sigma'(z1)
    _, dW1, db1 = affine_backward(dz1, c1)  # (M, D, H), (M, H)
    return {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}


def mlp_loss_and_grads(params, X, y, gamma, loss="ce", act=RELU):
    """Dynamical loss F (eq. 1) of M MLPs and its gradient with respect to every parameter.

    X : (N, D);  y : (N,) ints;  gamma : (M, K) class weights at the current step;
    act : the hidden activation (:data:`RELU`)
    Returns F (M,), grads (shapes of params), logits (M, N, K).
    """
    logits, cache = mlp_forward(X, params, act)
    F, lcache = loss_forward(logits, y, gamma, loss)  # (M,)  Eq. (1)
    grads = mlp_backward(loss_backward(lcache), cache)
    return F, grads, logits


def _mlp_rforward(params, cache, V):
    """The R forward pass: R{z1} and R{h1} (M, N, H), R{logits} (M, N, K) for the direction V."""
    (X, _), (act, c2), (h1, _) = cache
    Rz1 = X @ V["W1"] + V["b1"][:, None, :]  # (M, N, H)  R{z1} = X V1 + v_b1  (R{X} = 0)
    Rh1 = act.backward(Rz1, c2)  # R{h1} = sigma'(z1) R{z1}
    Rlogits = Rh1 @ params["W2"] + h1 @ V["W2"] + V["b2"][:, None, :]  # R{h1} W2 + h1 V2 + v_b2
    return Rz1, Rh1, Rlogits


def mlp_jvp(params, cache, V):
    """The Jacobian-vector product J v = R{logits} at a :func:`mlp_forward` cache.

    V : a direction, dict with the shapes of params.  Returns (M, N, K).
    """
    return _mlp_rforward(params, cache, V)[2]  # Eq. (10): df/dt = J dtheta/dt, here J V


def mlp_hvp_operator(params, X, y, gamma, loss="ce", act=RELU):
    """The exact Hessian of F as a function V -> HV by the R-operator (module docstring): the
    forward pass and the loss's pieces are computed once, each call costs about two gradients.

    X : (N, D);  y : (N,);  gamma : (M, K);  act : the hidden activation (:data:`RELU`)
    The function takes V, a dict with the shapes of params, and returns HV = R{dF/dtheta}.
    """
    xp = get_array_module(X)
    logits, cache = mlp_forward(X, params, act)
    _, lcache = loss_forward(logits, y, gamma, loss)
    g = loss_backward(lcache)  # (M, N, K)  dF/dz
    c1, (_, c2), c3 = cache
    sigma2 = act.curvature(c2) if act.curvature else None  # sigma''(z1) (M, N, H); ReLU: 0
    dh1 = g @ xp.swapaxes(params["W2"], -1, -2)  # (M, N, H)  dF/dh1

    def hvp(V):
        Rz1, Rh1, Rlogits = _mlp_rforward(params, cache, V)
        Rg = loss_rop(lcache, Rlogits)  # (M, N, K)  R{dF/dz} = (d2F/dz2) R{z}
        Rdh1, RdW2, Rdb2 = affine_backward(Rg, c3)  # R{g} W2^T, h1^T R{g}, sum R{g}
        RdW2 = RdW2 + xp.swapaxes(Rh1, -1, -2) @ g  # + R{h1}^T g
        Rdh1 = Rdh1 + g @ xp.swapaxes(V["W2"], -1, -2)  # + g V2^T
        Rdz1 = act.backward(Rdh1, c2)  # R{dz1} = sigma'(z1) R{dh1} ...
        if sigma2 is not None:
            Rdz1 = Rdz1 + sigma2 * Rz1 * dh1  # ... + sigma''(z1) R{z1} dh1 (a smooth act)
        _, RdW1, Rdb1 = affine_backward(Rdz1, c1)  # X^T R{dz1}, sum R{dz1}
        return {"W1": RdW1, "b1": Rdb1, "W2": RdW2, "b2": Rdb2}

    return hvp


def mlp_hvp(params, X, y, gamma, V, loss="ce", act=RELU):
    """The exact Hessian of F applied to V (:func:`mlp_hvp_operator`): a dict shaped like V."""
    return mlp_hvp_operator(params, X, y, gamma, loss, act)(V)


def mlp_jacobian(params, X, act=RELU):
    """The logit Jacobian J = dz/dtheta of M MLPs (module docstring), row n*K + k, columns in
    the order of :func:`flatten`: (M, N*K, P). Dense: N*K*P values per network."""
    xp = get_array_module(X)
    _, (_, (_, c2), (h1, _)) = mlp_forward(X, params, act)
    slope = act.slope(c2)  # (M, N, H)  sigma'(z1): the mask 1[z1 > 0] for ReLU
    W2 = params["W2"]  # (M, H, K)
    M, N, H = h1.shape
    K = W2.shape[2]
    eye = xp.eye(K)
    dW1 = xp.einsum("nd,mnj,mjk->mnkdj", X, slope, W2)  # (M, N, K, D, H)  x_nd m_nj W2_jk
    db1 = xp.einsum("mnj,mjk->mnkj", slope, W2)  # (M, N, K, H)  m_nj W2_jk
    dW2 = xp.einsum("mnj,kl->mnkjl", h1, eye)  # (M, N, K, H, K)  h1_nj [k=l]
    db2 = xp.broadcast_to(eye, (M, N, K, K))  # (M, N, K, K)  [k=l]
    parts = [a.reshape(M, N, K, -1) for a in (dW1, db1, dW2, db2)]
    return xp.concatenate(parts, axis=3).reshape(M, N * K, -1)  # (M, N*K, P)


def mlp_network_term(params, X, dlogits, act=RELU):
    """The network's own part of the exact Hessian, sum_{n,k} g_nk d2 z_nk/dtheta2 (module
    docstring): Q_djl in the W1a-W2 blocks and their transpose, and for a smooth activation the
    activation-curvature blocks B_j in W1a-W1a. dlogits : g = dF/dz (M, N, K).
    Returns (M, P, P), zero elsewhere."""
    xp = get_array_module(X)
    _, (_, (_, c2), _) = mlp_forward(X, params, act)
    slope = act.slope(c2)  # (M, N, H)
    M, N, H = slope.shape
    D, K = X.shape[1], dlogits.shape[2]
    xa = xp.concatenate([X, xp.ones((N, 1))], axis=1)  # (N, D+1)  [x, 1]: W1a = [W1; b1]
    Q = xp.einsum("nd,mnj,mnl->mdjl", xa, slope, dlogits)  # (M, D+1, H, K)  Q_djl
    P = (D + 1) * H + H * K + K
    d, j, l = np.meshgrid(np.arange(D + 1), np.arange(H), np.arange(K), indexing="ij")
    rows = (d * H + j).ravel()  # W1a[d, j] in the flat order (W1 rows, then b1)
    cols = ((D + 1) * H + j * K + l).ravel()  # W2[j, l]
    term = xp.zeros((M, P, P))
    term[:, rows, cols] = Q.reshape(M, -1)
    term[:, cols, rows] = Q.reshape(M, -1)
    sigma2 = act.curvature(c2) if act.curvature else None  # sigma''(z1) (M, N, H); ReLU: 0
    if sigma2 is not None:  # B_j[d, d'] = sum_n dh1_nj sigma''_nj xa_nd xa_nd'
        dh1 = dlogits @ xp.swapaxes(params["W2"], -1, -2)  # (M, N, H)
        B = xp.einsum("mnj,nd,ne->mjde", dh1 * sigma2, xa, xa)  # (M, H, D+1, D+1)
        d, e, j = np.meshgrid(np.arange(D + 1), np.arange(D + 1), np.arange(H), indexing="ij")
        term[:, (d * H + j).ravel(), (e * H + j).ravel()] += B.transpose(0, 2, 3, 1).reshape(M, -1)
    return term


# ---------------------------------------------------------------------------------------------
# One flat parameter vector per network, for spectra
# ---------------------------------------------------------------------------------------------


def flatten(params, names=MLP_PARAM_NAMES):
    """Concatenate parameters in the fixed order ``names``: each (M, ...) -> theta (M, P)."""
    xp = get_array_module(*params.values())
    M = params[names[0]].shape[0]
    return xp.concatenate([params[k].reshape(M, -1) for k in names], axis=1)


def unflatten(theta, like, names=MLP_PARAM_NAMES):
    """Inverse of :func:`flatten`: theta (M, P) -> dict shaped like ``like`` (leading M)."""
    out, start = {}, 0
    M = theta.shape[0]
    for k in names:
        shape = like[k].shape[1:]
        size = int(np.prod(shape))
        out[k] = theta[:, start : start + size].reshape((M,) + shape)
        start += size
    if start != theta.shape[1]:
        raise ValueError(f"theta has {theta.shape[1]} parameters, the template {start}")
    return out


# ---------------------------------------------------------------------------------------------
# Myrtle5 layers (NHWC, one network, no M axis): see "Myrtle5" in the module docstring
# ---------------------------------------------------------------------------------------------


def im2col3x3(x):
    """The 3x3 patches of the zero-padded x, one row per output pixel.

    x : (N, Hx, Wx, C)
    Returns cols (N*Hx*Wx, 9C), row (n, i, j) = xpad[n, i:i+3, j:j+3, :] flattened in the
    order (kernel row a, kernel column b, channel), in the dtype of x.
    """
    xp = get_array_module(x)
    N, Hx, Wx, C = x.shape
    xpad = xp.zeros((N, Hx + 2, Wx + 2, C), dtype=x.dtype)  # (N, Hx+2, Wx+2, C)  SAME zeros
    xpad[:, 1:-1, 1:-1, :] = x
    cols = xp.empty((N, Hx, Wx, 3, 3, C), dtype=x.dtype)  # (N, Hx, Wx, 3, 3, C)
    for a in range(3):
        for b in range(3):
            cols[:, :, :, a, b, :] = xpad[:, a : a + Hx, b : b + Wx, :]  # tap (a, b) of each pixel
    return cols.reshape(N * Hx * Wx, 9 * C)  # (N*Hx*Wx, 9C)


def _check_conv_shapes(x, W):
    if x.ndim != 4 or W.ndim != 4 or W.shape[:2] != (3, 3) or W.shape[2] != x.shape[3]:
        raise ValueError(
            f"conv3x3 needs x (N, Hx, Wx, C) and W (3, 3, C, C_out); got x {x.shape}, W {W.shape}"
        )


def conv3x3_forward(x, W, b):
    """3x3 convolution, stride 1, SAME zero padding, NHWC (cross-correlation, as in deep learning).

    x : (N, Hx, Wx, C);  W : (3, 3, C, C_out);  b : (C_out,), or None for no bias
    Returns out (N, Hx, Wx, C_out) and the cache (x, W, cols) with cols (N*Hx*Wx, 9C).
    """
    _check_conv_shapes(x, W)
    cols = im2col3x3(x)  # (N*Hx*Wx, 9C)
    out = (cols @ W.reshape(-1, W.shape[3])).reshape(x.shape[:3] + (W.shape[3],))  # cols W
    if b is not None:
        out += b  # (N, Hx, Wx, C_out)
    return out, (x, W, cols)


def conv3x3_backward(dout, cache, need_dx=True):
    """Gradients of :func:`conv3x3_forward` (derivation in the module docstring).

    dout : (N, Hx, Wx, C_out);  cache : (x, W, cols) from the forward pass
    Returns dx (N, Hx, Wx, C), or None when ``need_dx`` is False (the input is data);
    dW (3, 3, C, C_out); db (C_out,).
    """
    x, W, cols = cache
    dout2 = dout.reshape(-1, W.shape[3])  # (N*Hx*Wx, C_out)
    db = dout2.sum(axis=0)  # (C_out,)  dF/db = sum_{n,i,j} dout
    dW = (cols.T @ dout2).reshape(W.shape)  # (3, 3, C, C_out)  dF/dW = cols^T dout
    dx = conv3x3_input_grad(dout, W) if need_dx else None  # (N, Hx, Wx, C)
    return dx, dW, db


def conv3x3_input_grad(dout, W):
    """dF/dx of a SAME 3x3 conv: the SAME conv of dout (N, Hx, Wx, C_out) with W flipped in both
    spatial axes and C, C_out swapped (module docstring). Returns (N, Hx, Wx, C)."""
    xp = get_array_module(W)
    W_flip = xp.ascontiguousarray(W[::-1, ::-1].transpose(0, 1, 3, 2))  # (3, 3, C_out, C)
    return conv3x3_forward(dout, W_flip, None)[0]


def avgpool2_forward(x):
    """2x2 average pooling, stride 2: (N, Hx, Wx, C) -> (N, Hx/2, Wx/2, C); cache x.shape."""
    N, Hx, Wx, C = x.shape
    if Hx % 2 or Wx % 2:
        raise ValueError(f"avgpool2 needs even image sides, got {Hx}x{Wx}")
    out = x.reshape(N, Hx // 2, 2, Wx // 2, 2, C).mean(axis=(2, 4))  # (N, Hx/2, Wx/2, C)
    return out, x.shape


def avgpool2_backward(dout, cache):
    """dx (N, Hx, Wx, C): each input pixel gets a quarter of its block's dout."""
    xp = get_array_module(dout)
    N, Hx, Wx, C = cache
    d6 = (0.25 * dout)[:, :, None, :, None, :]  # (N, Hx/2, 1, Wx/2, 1, C)  dF/dx = dout / 4
    return xp.broadcast_to(d6, (N, Hx // 2, 2, Wx // 2, 2, C)).reshape(cache)  # (N, Hx, Wx, C)


def global_avgpool_forward(x):
    """Mean over the image: (N, Hx, Wx, C) -> (N, C); cache x.shape."""
    return x.mean(axis=(1, 2)), x.shape  # (N, C)


def global_avgpool_backward(dout, cache):
    """dx (N, Hx, Wx, C) = dout / (Hx Wx) at every pixel."""
    xp = get_array_module(dout)
    N, Hx, Wx, C = cache
    d4 = (dout * (1.0 / (Hx * Wx)))[:, None, None, :]  # (N, 1, 1, C)
    return xp.ascontiguousarray(xp.broadcast_to(d4, cache))  # (N, Hx, Wx, C)


def dense_forward(x, W, b):
    """out = x @ W + b for one network: x (N, Din), W (Din, Dout), b (Dout,) -> (N, Dout)."""
    out = x @ W  # (N, Dout)
    out += b
    return out, (x, W)


def dense_backward(dout, cache):
    """dout (N, Dout) -> dx (N, Din), dW (Din, Dout), db (Dout,)."""
    x, W = cache
    return dout @ W.T, x.T @ dout, dout.sum(axis=0)  # dF/dx = dout W^T, x^T dout, sum_n dout


# ---------------------------------------------------------------------------------------------
# Myrtle5
# ---------------------------------------------------------------------------------------------


def myrtle5_shapes(c=64, in_channels=3, n_classes=10):
    """The shape of every Myrtle5 parameter, in the order MYRTLE5_PARAM_NAMES: W1 (3, 3, C_in, c),
    b1 (c,), W2..W4 (3, 3, c, c), b2..b4 (c,), W5 (c, K), b5 (K,)."""
    weights = {"W1": (3, 3, in_channels, c), "W2": (3, 3, c, c), "W3": (3, 3, c, c)}
    weights.update(W4=(3, 3, c, c), W5=(c, n_classes))
    shapes = {}
    for layer, shape in enumerate(weights.values(), start=1):
        shapes[f"W{layer}"], shapes[f"b{layer}"] = shape, shape[-1:]
    return {k: shapes[k] for k in MYRTLE5_PARAM_NAMES}


def init_myrtle5(rng, c=64, in_channels=3, n_classes=10, dtype=np.float64):
    """Initial Myrtle5 parameters on the host: W ~ N(0, 2/fan_in), zero biases (module docstring).

    rng : np.random.Generator, or an int seed for np.random.default_rng. Drawn in the order
    W1, W2, W3, W4, W5. fan_in = 9 C_in for the convolutions, c for the dense layer.
    Returns params {"W1": (3, 3, C_in, c), "b1": (c,), ..., "W5": (c, K), "b5": (K,)} (NumPy,
    ``dtype``; pass float32 for GPU training, keep float64 for every check).
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    shapes = myrtle5_shapes(c, in_channels, n_classes)
    params = {}
    for layer, shape in enumerate((shapes[f"W{i}"] for i in range(1, 6)), start=1):
        fan_in = int(np.prod(shape[:-1]))
        params[f"W{layer}"] = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(dtype)
        params[f"b{layer}"] = np.zeros(shape[-1], dtype=dtype)
    return {k: params[k] for k in MYRTLE5_PARAM_NAMES}


def _check_image(x):
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"Myrtle5 takes a non-empty NHWC batch (N, Hx, Wx, C); got {x.shape}")
    Hx, Wx = x.shape[1:3]
    if Hx % MYRTLE5_DIVISOR or Wx % MYRTLE5_DIVISOR:
        raise ValueError(
            f"Myrtle5 needs image height and width divisible by {MYRTLE5_DIVISOR} "
            f"(2x2 average pools down to 1x1); got {Hx}x{Wx}"
        )


def myrtle5_forward(x, params):
    """Logits of one Myrtle5 network (module docstring), layer by layer.

    x : (N, Hx, Wx, C_in), Hx and Wx multiples of 8;  params : see :func:`init_myrtle5`
    Returns logits (N, K) and the cache for :func:`myrtle5_backward` (a dict of layer caches).
    """
    _check_image(x)
    W = params
    z1, conv1 = conv3x3_forward(x, W["W1"], W["b1"])  # (N, Hx, Wx, c)
    h1, relu1 = relu_forward(z1)
    z2, conv2 = conv3x3_forward(h1, W["W2"], W["b2"])  # (N, Hx, Wx, c)
    h2, relu2 = relu_forward(z2)
    p2, pool2 = avgpool2_forward(h2)  # (N, Hx/2, Wx/2, c)
    z3, conv3 = conv3x3_forward(p2, W["W3"], W["b3"])
    h3, relu3 = relu_forward(z3)
    p3, pool3 = avgpool2_forward(h3)  # (N, Hx/4, Wx/4, c)
    z4, conv4 = conv3x3_forward(p3, W["W4"], W["b4"])
    h4, relu4 = relu_forward(z4)
    q, pool4 = global_avgpool_forward(h4)  # (N, c)  pooled features
    logits, dense5 = dense_forward(q, W["W5"], W["b5"])  # (N, K)
    cache = dict(conv1=conv1, relu1=relu1, conv2=conv2, relu2=relu2, pool2=pool2, conv3=conv3)
    cache.update(relu3=relu3, pool3=pool3, conv4=conv4, relu4=relu4, pool4=pool4, dense5=dense5)
    return logits, cache


def _myrtle5_backward(dlogits, cache):
    """The backward pass, returning the grads and the pre-activation gradients dz1..dz4."""
    cc = cache  # c is the width
    dq, dW5, db5 = dense_backward(dlogits, cc["dense5"])  # (N, c)
    dh4 = global_avgpool_backward(dq, cc["pool4"])  # (N, Hx/4, Wx/4, c)
    dz4 = relu_backward(dh4, cc["relu4"])
    dp3, dW4, db4 = conv3x3_backward(dz4, cc["conv4"])
    dz3 = relu_backward(avgpool2_backward(dp3, cc["pool3"]), cc["relu3"])  # (N, Hx/2, Wx/2, c)
    dp2, dW3, db3 = conv3x3_backward(dz3, cc["conv3"])
    dz2 = relu_backward(avgpool2_backward(dp2, cc["pool2"]), cc["relu2"])  # (N, Hx, Wx, c)
    dh1, dW2, db2 = conv3x3_backward(dz2, cc["conv2"])
    dz1 = relu_backward(dh1, cc["relu1"])
    _, dW1, db1 = conv3x3_backward(dz1, cc["conv1"], need_dx=False)
    grads = dict(W1=dW1, b1=db1, W2=dW2, b2=db2, W3=dW3, b3=db3, W4=dW4, b4=db4, W5=dW5, b5=db5)
    return grads, dict(dz1=dz1, dz2=dz2, dz3=dz3, dz4=dz4)


def myrtle5_backward(dlogits, cache):
    """Parameter gradients of :func:`myrtle5_forward`, the chain rule in reverse order.

    dlogits : (N, K).  Returns grads, a dict with the shapes of params (order
    ``MYRTLE5_PARAM_NAMES``).
    """
    grads, _ = _myrtle5_backward(dlogits, cache)
    return {k: grads[k] for k in MYRTLE5_PARAM_NAMES}


def loss_on_batch(logits, y, gamma, loss="ce"):
    """dynloss on one network: F (0-d) and dF/dlogits (N, K) in the dtype of logits (N, K);
    adds and removes the leading M = 1 axis that dynloss works with. gamma : (K,)."""
    xp = get_array_module(logits)
    gamma = xp.asarray(gamma, dtype=logits.dtype)[None, :]  # (1, K)
    F, lcache = loss_forward(logits[None], xp.asarray(y), gamma, loss)  # (1,)  Eq. (1)
    dlogits = loss_backward(lcache)[0].astype(logits.dtype, copy=False)  # (N, K)
    return F[0], dlogits


def myrtle5_loss_and_grads(params, x, y, gamma, loss="ce"):
    """Dynamical loss F (eq. 1, mean over the batch) of one Myrtle5 network and its gradient.

    x : (N, Hx, Wx, C_in);  y : (N,) ints;  gamma : (K,) class weights at the current step
    Returns F (a 0-d array on the backend of x: no device-to-host sync), grads (shapes of params),
    logits (N, K).
    """
    logits, cache = myrtle5_forward(x, params)
    F, dlogits = loss_on_batch(logits, y, gamma, loss)
    return F, myrtle5_backward(dlogits, cache), logits


def myrtle5_flatten(params):
    """Concatenate one network's parameters in the order ``MYRTLE5_PARAM_NAMES``: theta (P,)."""
    return flatten({k: params[k][None] for k in MYRTLE5_PARAM_NAMES}, MYRTLE5_PARAM_NAMES)[0]


def myrtle5_unflatten(theta, like):
    """Inverse of :func:`myrtle5_flatten`: theta (P,) -> dict of views shaped like ``like``."""
    template = {k: like[k][None] for k in MYRTLE5_PARAM_NAMES}
    out = unflatten(theta[None], template, MYRTLE5_PARAM_NAMES)
    return {k: out[k][0] for k in MYRTLE5_PARAM_NAMES}


# ---------------------------------------------------------------------------------------------
# The exact Hessian-vector product of the Myrtle5 loss (R-operator; module docstring)
# ---------------------------------------------------------------------------------------------


def _conv_rop_backward(dz, Rdz, cache, V, cache_R, need_dx=True):
    """R of conv3x3_backward: (R{dx} or None, R{dW}, R{db}) from dz = dF/dout and R{dz}.

    cache: the forward cache of the input a; cache_R: the cache of a convolution whose input was
    R{a}, or None where R{a} = 0 (the data); V: the direction's kernel (3, 3, C, C_out).
    """
    Rdx, RdW, Rdb = conv3x3_backward(Rdz, cache, need_dx)  # R{dz} * W~, a^T R{dz}, sum R{dz}
    if cache_R is not None:
        RdW = RdW + conv3x3_backward(dz, cache_R, need_dx=False)[1]  # + R{a}^T dz
    if need_dx:
        Rdx = Rdx + conv3x3_input_grad(dz, V)  # + dz * V~
    return Rdx, RdW, Rdb


def _myrtle5_rop(params, cache, curvature, dlogits, dz, V):
    """R{grads} for the direction V (a params-shaped dict): the Hessian applied to V."""
    W, cc = params, cache  # c is the width
    conv1, conv2, conv3, conv4 = cc["conv1"], cc["conv2"], cc["conv3"], cc["conv4"]
    # R forward pass: R{z} = conv(R{a}, W) + conv(a, V) + v_b;  R{h} = 1[z > 0] R{z}
    Rz1 = conv3x3_forward(conv1[0], V["W1"], V["b1"])[0]  # (N, Hx, Wx, c)  R{x} = 0
    Rh1 = relu_backward(Rz1, cc["relu1"])
    Rz2, convR2 = conv3x3_forward(Rh1, W["W2"], V["b2"])
    Rz2 += conv3x3_forward(conv2[0], V["W2"], None)[0]  # (N, Hx, Wx, c)
    Rp2, _ = avgpool2_forward(relu_backward(Rz2, cc["relu2"]))  # (N, Hx/2, Wx/2, c)
    Rz3, convR3 = conv3x3_forward(Rp2, W["W3"], V["b3"])
    Rz3 += conv3x3_forward(conv3[0], V["W3"], None)[0]
    Rp3, _ = avgpool2_forward(relu_backward(Rz3, cc["relu3"]))  # (N, Hx/4, Wx/4, c)
    Rz4, convR4 = conv3x3_forward(Rp3, W["W4"], V["b4"])
    Rz4 += conv3x3_forward(conv4[0], V["W4"], None)[0]
    Rq, _ = global_avgpool_forward(relu_backward(Rz4, cc["relu4"]))  # (N, c)
    q, W5 = cc["dense5"]
    Rlogits = Rq @ W5 + q @ V["W5"] + V["b5"]  # (N, K)
    Rdlogits = apply_logit_hessian(curvature, Rlogits[None])[0]  # (N, K)  R{dF/dz}, dynloss
    # R backward pass: R{dW} = R{a}^T dz + a^T R{dz};  R{da} = R{dz} W^T + dz V^T
    Rdq, RdW5, Rdb5 = dense_backward(Rdlogits, cc["dense5"])
    RdW5 = RdW5 + Rq.T @ dlogits  # (c, K)
    Rdq = Rdq + dlogits @ V["W5"].T  # (N, c)
    Rdz4 = relu_backward(global_avgpool_backward(Rdq, cc["pool4"]), cc["relu4"])
    Rdp3, RdW4, Rdb4 = _conv_rop_backward(dz["dz4"], Rdz4, conv4, V["W4"], convR4)
    Rdz3 = relu_backward(avgpool2_backward(Rdp3, cc["pool3"]), cc["relu3"])
    Rdp2, RdW3, Rdb3 = _conv_rop_backward(dz["dz3"], Rdz3, conv3, V["W3"], convR3)
    Rdz2 = relu_backward(avgpool2_backward(Rdp2, cc["pool2"]), cc["relu2"])
    Rdh1, RdW2, Rdb2 = _conv_rop_backward(dz["dz2"], Rdz2, conv2, V["W2"], convR2)
    Rdz1 = relu_backward(Rdh1, cc["relu1"])
    _, RdW1, Rdb1 = _conv_rop_backward(dz["dz1"], Rdz1, conv1, V["W1"], None, need_dx=False)
    return dict(
        W1=RdW1, b1=Rdb1, W2=RdW2, b2=Rdb2, W3=RdW3, b3=Rdb3, W4=RdW4, b4=Rdb4, W5=RdW5, b5=Rdb5
    )


def myrtle5_hvp_operator(params, x, y, gamma, loss="ce"):
    """The exact Hessian of the batch loss as a function v (P,) -> Hv (P,), for Lanczos.

    Runs the forward and backward pass once and keeps them; each call then costs about two
    gradient evaluations. v may be a NumPy array (it is moved to the backend of params); Hv is on
    that backend, in the dtype of params. x : (N, Hx, Wx, C_in); y : (N,); gamma : (K,).
    """
    xp = get_array_module(*params.values())
    logits, cache = myrtle5_forward(x, params)
    _, dlogits = loss_on_batch(logits, y, gamma, loss)
    _, dz = _myrtle5_backward(dlogits, cache)
    gamma_row = xp.asarray(gamma, dtype=logits.dtype)[None, :]  # (1, K)
    _, lcache = loss_forward(logits[None], xp.asarray(y), gamma_row, loss)
    curvature = logit_curvature(lcache)  # the logit Hessian's pieces, computed once
    dtype = params["W1"].dtype

    def matvec(v):
        V = myrtle5_unflatten(xp.asarray(v, dtype=dtype).reshape(-1), params)
        Hv = _myrtle5_rop(params, cache, curvature, dlogits, dz, V)
        return myrtle5_flatten(Hv)  # (P,)

    return matvec


def myrtle5_hvp(params, x, y, gamma, v, loss="ce"):
    """Exact Hessian-vector product of the Myrtle5 loss on a batch, by the R-operator.

    x : (N, Hx, Wx, C_in);  y : (N,);  gamma : (K,);  v : (P,) in ``myrtle5_flatten`` order
    Returns Hv (P,) = (d^2 F / d theta^2) v (derivation in the module docstring).
    """
    return myrtle5_hvp_operator(params, x, y, gamma, loss)(v)


# ---------------------------------------------------------------------------------------------
# Training step
# ---------------------------------------------------------------------------------------------


def nesterov_step(params, grads, velocity, lr, momentum=NESTEROV_MOMENTUM):
    """One SGD step with Nesterov momentum, in place on ``params`` and ``velocity``.

    PyTorch's formulation (torch.optim.SGD(nesterov=True), dampening 0, weight decay 0):

        u     <- momentum * u + d
        theta <- theta - lr * (d + momentum * u)

    with d the gradient, u the velocity, u = 0 before the first step (PyTorch's first buffer, d,
    is the same thing). ``params``,
    ``grads`` and ``velocity`` are dicts with the same keys (or three arrays); the trainer owns
    params and velocity, which are edited in place; grads is only read.
    """
    if not isinstance(params, dict):
        params, grads, velocity = {"": params}, {"": grads}, {"": velocity}
    for k, theta in params.items():
        u, d = velocity[k], grads[k]
        u *= momentum
        u += d  # u <- momentum u + d
        theta -= lr * (d + momentum * u)  # theta <- theta - lr (d + momentum u)


# The reference network as the Fig. 1 protocol takes it (protocol.train_epoch's ``net``);
# fast/myrtle5.py packs its fused copy (NumPy, or our CUDA kernels) the same way.
MYRTLE5 = SimpleNamespace(
    forward=myrtle5_forward, loss_and_grads=myrtle5_loss_and_grads, nesterov_step=nesterov_step
)
