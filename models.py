"""Hand-written forward and backward passes: the one-hidden-layer MLP of the spiral experiments.

Symbols
-------
M  networks trained side by side (a leading axis on every parameter and activation)
N  samples
D  input dimension (2 for the spiral)
H  hidden width (100 "narrow", 1000 "wide")
K  classes
P  parameters of one network (D*H + H + H*K + K; 603 at H = 100)

Conventions
-----------
Row vectors: ``z1 = x @ W1 + b1`` with W1 of shape (D, H) and W2 of shape (H, K); every parameter
carries the leading M axis, so W1 is stored as (M, D, H). The inputs X (N, D) are shared by the M
networks. float64 unless a dtype is given. Layers are pure forward/backward pairs: the forward
returns ``(out, cache)``, the backward takes ``(dout, cache)`` and returns the gradients; nothing is
edited in place except arrays the function itself just allocated.

One code path serves NumPy and CuPy: :func:`get_array_module` picks ``xp`` from the arrays, and
:func:`to_device` moves host arrays to the chosen backend.

Initialisations (``init=`` name)
--------------------------------
standard  W ~ N(0, 1/fan_in), b = 0 (trained): neural-tangents' 'standard' parameterisation with
          W_std = 1, b_std = 0, which produced the paper's results (2020-21). The default.
glorot    W ~ N(0, 2/(fan_in + fan_out)), b ~ N(0, 0.01^2): jax.example_libraries.stax defaults,
          used by the authors' 2022 notebook.
"""

from __future__ import annotations

import numpy as np

from dynloss import loss_backward, loss_forward

INITS = ("standard", "glorot")
MLP_PARAM_NAMES = ("W1", "b1", "W2", "b2")


def get_array_module(*arrays):
    """numpy, or cupy when any of ``arrays`` is a CuPy array (CuPy is optional)."""
    for a in arrays:
        if type(a).__module__.split(".")[0] == "cupy":
            import cupy

            return cupy
    return np


def backend(device):
    """The array module for ``device`` in {"cpu", "gpu"}; "gpu" needs CuPy and a GPU."""
    if device == "cpu":
        return np
    if device == "gpu":
        try:
            import cupy
        except ImportError as err:
            raise RuntimeError(
                "--device gpu needs CuPy: pip install -r requirements-gpu.txt"
            ) from err
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("--device gpu: CuPy found no GPU")
        return cupy
    raise ValueError(f"unknown device {device!r}; choose cpu or gpu")


def to_device(tree, xp):
    """Copy a dict of host arrays to the backend ``xp`` (identity for NumPy)."""
    return {k: xp.asarray(v) for k, v in tree.items()}


def to_host(tree):
    """Copy a dict of arrays (NumPy or CuPy) to NumPy."""
    return {k: (v.get() if hasattr(v, "get") else np.asarray(v)) for k, v in tree.items()}


# ---------------------------------------------------------------------------------------------
# Layers
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
    """h = max(z, 0), elementwise; the cache is h itself (h > 0 exactly where z > 0)."""
    xp = get_array_module(z)
    h = xp.maximum(z, 0.0)
    return h, h


def relu_backward(dh, cache):
    """dz = dh * [z > 0]; ``cache`` is the forward output h."""
    return dh * (cache > 0)  # dF/dz = dF/dh * 1[z > 0]


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


def mlp_forward(X, params):
    """Logits of M MLPs on shared inputs.

    X : (N, D);  params : W1 (M, D, H), b1 (M, H), W2 (M, H, K), b2 (M, K)
    Returns logits (M, N, K) and the cache for :func:`mlp_backward`.
    """
    z1, c1 = affine_forward(X, params["W1"], params["b1"])  # (M, N, H)
    h1, c2 = relu_forward(z1)  # (M, N, H)
    logits, c3 = affine_forward(h1, params["W2"], params["b2"])  # (M, N, K)
    return logits, (c1, c2, c3)


def mlp_backward(dlogits, cache):
    """Parameter gradients of :func:`mlp_forward`, the chain rule in reverse order.

    dlogits : (M, N, K)
    Returns grads with the shapes of params.
    """
    c1, c2, c3 = cache
    dh1, dW2, db2 = affine_backward(dlogits, c3)  # (M, N, H), (M, H, K), (M, K)
    dz1 = relu_backward(dh1, c2)  # (M, N, H)
    _, dW1, db1 = affine_backward(dz1, c1)  # (M, D, H), (M, H)
    return {"W1": dW1, "b1": db1, "W2": dW2, "b2": db2}


def mlp_loss_and_grads(params, X, y, gamma, loss="ce"):
    """Dynamical loss F (eq. 1) of M MLPs and its gradient with respect to every parameter.

    X : (N, D);  y : (N,) ints;  gamma : (M, K) class weights at the current step
    Returns F (M,), grads (shapes of params), logits (M, N, K).
    """
    logits, cache = mlp_forward(X, params)
    F, lcache = loss_forward(logits, y, gamma, loss)  # (M,)
    grads = mlp_backward(loss_backward(lcache), cache)
    return F, grads, logits


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
