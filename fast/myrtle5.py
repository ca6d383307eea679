"""The fused Myrtle5: the reference of models.py with layers fused for speed, on the CPU (NumPy)
and, through fast/layers.py's table, on a GPU (our CUDA kernels).

The functions below are a copy of models.myrtle5_forward, myrtle5_backward,
myrtle5_loss_and_grads and myrtle5_hvp_operator that call their layers through a table
(``layers``; cs231n's ``fast_layers``) and call fused layers where the reference calls two:

    this module (the table's entry)     the reference lines it replaces (models.py)
    conv3x3_relu_forward(x, W, b)       conv3x3_forward, then relu_forward
    relu_conv3x3_backward(d, h, cache)  conv3x3_backward, then relu_backward on its dx
    relu_avgpool2_backward(d, s, h)     avgpool2_backward, then relu_backward (one broadcast
                                        product, no upsampled gradient written)
    conv3x3_cached_forward(cache, V)    conv3x3_forward(a, V, None) of a cached input a, reusing
                                        its im2col columns (the R-operator's R{z} = conv(a, V))
    conv3x3_backward, dense_backward    the same, with the bias gradient sum as one GEMV
                                        (column_sums: ones @ a) instead of a.sum(axis=0)

:data:`CPU_LAYERS` is the table on NumPy; fast/layers.py's GPU_LAYERS has the same entries with
our CUDA kernels where they apply. :func:`net` packs a table into what the Fig. 1 protocol calls
(protocol.train_epoch's ``net``), as models.MYRTLE5 packs the reference. The fused and the
reference numbers agree to float64 rounding (the GEMV sums in another order), and the NumPy
commands run this copy (run_cifar.py, through :func:`net_for`); tests/test_myrtle5.py ties every
fused layer and the whole network to the reference.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace

import numpy as np

from dynloss import apply_logit_hessian, get_array_module, logit_curvature, loss_forward
from models import (
    MYRTLE5_PARAM_NAMES,
    _check_image,
    avgpool2_forward,
    conv3x3_forward,
    conv3x3_input_grad,
    dense_forward,
    global_avgpool_backward,
    global_avgpool_forward,
    loss_on_batch,
    myrtle5_flatten,
    myrtle5_unflatten,
    nesterov_step,
    relu_backward,
    relu_forward,
)

# ---------------------------------------------------------------------------------------------
# The fused layers (NumPy; CuPy arrays take the same lines)
# ---------------------------------------------------------------------------------------------


def column_sums(a):
    """a (R, C) -> (C,), the sum over rows, as the product ones (R,) @ a (one GEMV)."""
    return get_array_module(a).ones(a.shape[0], dtype=a.dtype) @ a  # (C,)


def conv3x3_backward(dout, cache, need_dx=True):
    """models.conv3x3_backward with db = column_sums(dout): (dx or None, dW, db)."""
    x, W, cols = cache
    dout2 = dout.reshape(-1, W.shape[3])  # (N*Hx*Wx, C_out)
    db = column_sums(dout2)  # (C_out,)  dF/db = sum_{n,i,j} dout
    dW = (cols.T @ dout2).reshape(W.shape)  # (3, 3, C, C_out)  dF/dW = cols^T dout
    dx = conv3x3_input_grad(dout, W) if need_dx else None  # (N, Hx, Wx, C)
    return dx, dW, db


def dense_backward(dout, cache):
    """models.dense_backward with db = column_sums(dout): dx (N, Din), dW, db (Dout,)."""
    x, W = cache
    return dout @ W.T, x.T @ dout, column_sums(dout)  # dF/dx = dout W^T, x^T dout, sum_n dout


def conv3x3_relu_forward(x, W, b):
    """h = relu(conv3x3(x, W) + b): models.conv3x3_forward then relu_forward.

    x : (N, Hx, Wx, C);  W : (3, 3, C, C_out);  b : (C_out,)
    Returns h (N, Hx, Wx, C_out) and the caches (conv cache, relu cache = h).
    """
    z, conv_cache = conv3x3_forward(x, W, b)
    h, relu_cache = relu_forward(z)
    return h, (conv_cache, relu_cache)


def relu_conv3x3_backward(dout, relu_cache, conv_cache):
    """The backward pass of h -> conv3x3(h, W) + b where h = relu(z) is the layer below:
    :func:`conv3x3_backward` then relu_backward on its dx.

    dout : (N, Hx, Wx, C_out);  relu_cache : h (N, Hx, Wx, C);  conv_cache : (h, W, cols)
    Returns dz (N, Hx, Wx, C), dW (3, 3, C, C_out), db (C_out,).
    """
    dh, dW, db = conv3x3_backward(dout, conv_cache)
    return relu_backward(dh, relu_cache), dW, db  # dF/dz = dF/dh * 1[z > 0]


def relu_avgpool2_backward(dout, pool_cache, relu_cache):
    """dz of z -> relu -> avgpool2 in one broadcast product: the same numbers as
    relu_backward(avgpool2_backward(dout, pool_cache), relu_cache), without writing the upsampled
    gradient.

    dout : (N, Hx/2, Wx/2, C);  relu_cache : h (N, Hx, Wx, C).  Returns dz (N, Hx, Wx, C).
    """
    N, Hx, Wx, C = pool_cache
    mask = relu_cache.reshape(N, Hx // 2, 2, Wx // 2, 2, C) > 0  # (N, Hx/2, 2, Wx/2, 2, C)
    dz = mask * (0.25 * dout)[:, :, None, :, None, :]  # dF/dz = 1[z > 0] dout / 4
    return dz.reshape(pool_cache)  # (N, Hx, Wx, C)


def conv3x3_cached_forward(cache, V):
    """conv3x3 (no bias) of the input a of a cached convolution with another kernel V
    (3, 3, C, C_out), reusing the cached cols: (N, Hx, Wx, C_out)."""
    a, _, cols = cache
    return (cols @ V.reshape(-1, V.shape[3])).reshape(a.shape[:3] + (V.shape[3],))  # cols V


CPU_LAYERS = SimpleNamespace(
    conv3x3_forward=conv3x3_forward,
    conv3x3_relu_forward=conv3x3_relu_forward,
    conv3x3_backward=conv3x3_backward,
    relu_conv3x3_backward=relu_conv3x3_backward,
    conv3x3_input_grad=conv3x3_input_grad,
    conv3x3_cached_forward=conv3x3_cached_forward,
    relu_backward=relu_backward,
    avgpool2_forward=avgpool2_forward,
    relu_avgpool2_backward=relu_avgpool2_backward,
    global_avgpool_forward=global_avgpool_forward,
    global_avgpool_backward=global_avgpool_backward,
    dense_forward=dense_forward,
    dense_backward=dense_backward,
    loss_on_batch=loss_on_batch,
    nesterov_step=nesterov_step,
)


# ---------------------------------------------------------------------------------------------
# The network through a table (a copy of models.py's Myrtle5, with the fused layers)
# ---------------------------------------------------------------------------------------------


def myrtle5_forward(x, params, layers=None):
    """Logits of one Myrtle5 network.

    x : (N, Hx, Wx, C_in), Hx and Wx multiples of 8;  params : see :func:`init_myrtle5`
    layers : the layer table (module docstring); None: :data:`CPU_LAYERS`
    Returns logits (N, K) and the cache for :func:`myrtle5_backward` (a dict of layer caches).
    """
    _check_image(x)
    P, L = params, layers or CPU_LAYERS
    h1, (conv1, relu1) = L.conv3x3_relu_forward(x, P["W1"], P["b1"])  # (N, Hx, Wx, c)
    h2, (conv2, relu2) = L.conv3x3_relu_forward(h1, P["W2"], P["b2"])  # (N, Hx, Wx, c)
    p2, pool2 = L.avgpool2_forward(h2)  # (N, Hx/2, Wx/2, c)
    h3, (conv3, relu3) = L.conv3x3_relu_forward(p2, P["W3"], P["b3"])
    p3, pool3 = L.avgpool2_forward(h3)  # (N, Hx/4, Wx/4, c)
    h4, (conv4, relu4) = L.conv3x3_relu_forward(p3, P["W4"], P["b4"])
    q, pool4 = L.global_avgpool_forward(h4)  # (N, c)  pooled features
    logits, dense5 = L.dense_forward(q, P["W5"], P["b5"])  # (N, K)
    cache = dict(conv1=conv1, relu1=relu1, conv2=conv2, relu2=relu2, pool2=pool2, conv3=conv3)
    cache.update(relu3=relu3, pool3=pool3, conv4=conv4, relu4=relu4, pool4=pool4, dense5=dense5)
    return logits, cache


def _myrtle5_backward(dlogits, cache, L):
    """The backward pass, returning the grads and the pre-activation gradients dz1..dz4."""
    c = cache
    dq, dW5, db5 = L.dense_backward(dlogits, c["dense5"])  # (N, c)
    dh4 = L.global_avgpool_backward(dq, c["pool4"])  # (N, Hx/4, Wx/4, c)
    dz4 = L.relu_backward(dh4, c["relu4"])
    dp3, dW4, db4 = L.conv3x3_backward(dz4, c["conv4"])
    dz3 = L.relu_avgpool2_backward(dp3, c["pool3"], c["relu3"])  # (N, Hx/2, Wx/2, c)
    dp2, dW3, db3 = L.conv3x3_backward(dz3, c["conv3"])
    dz2 = L.relu_avgpool2_backward(dp2, c["pool2"], c["relu2"])  # (N, Hx, Wx, c)
    dz1, dW2, db2 = L.relu_conv3x3_backward(dz2, c["relu1"], c["conv2"])  # dz1 = dh1 1[h1 > 0]
    _, dW1, db1 = L.conv3x3_backward(dz1, c["conv1"], need_dx=False)
    grads = dict(W1=dW1, b1=db1, W2=dW2, b2=db2, W3=dW3, b3=db3, W4=dW4, b4=db4, W5=dW5, b5=db5)
    return grads, dict(dz1=dz1, dz2=dz2, dz3=dz3, dz4=dz4)


def myrtle5_backward(dlogits, cache, layers=None):
    """Parameter gradients of :func:`myrtle5_forward`, the chain rule in reverse order.

    dlogits : (N, K);  layers : the table the forward pass used (None: :data:`CPU_LAYERS`)
    Returns grads, a dict with the shapes of params (order ``MYRTLE5_PARAM_NAMES``).
    """
    grads, _ = _myrtle5_backward(dlogits, cache, layers or CPU_LAYERS)
    return {k: grads[k] for k in MYRTLE5_PARAM_NAMES}


def myrtle5_loss_and_grads(params, x, y, gamma, loss="ce", layers=None):
    """Dynamical loss F (eq. 1, mean over the batch) of one Myrtle5 network and its gradient.

    x : (N, Hx, Wx, C_in);  y : (N,) ints;  gamma : (K,) class weights at the current step
    layers : the layer table (None: :data:`CPU_LAYERS`)
    Returns F (a 0-d array on the backend of x: no device-to-host sync), grads (shapes of params),
    logits (N, K).
    """
    L = layers or CPU_LAYERS
    logits, cache = myrtle5_forward(x, params, L)
    F, dlogits = L.loss_on_batch(logits, y, gamma, loss)
    return F, myrtle5_backward(dlogits, cache, L), logits


# The exact Hessian-vector product (R-operator; models.py's derivation), through the table


def _conv_rop_backward(dz, Rdz, cache, V, cache_R, L, need_dx=True):
    """R of conv3x3_backward: (R{dx} or None, R{dW}, R{db}) from dz = dF/dout and R{dz}.

    cache: the forward cache of the input a; cache_R: the cache of a convolution whose input was
    R{a}, or None where R{a} = 0 (the data); V: the direction's kernel (3, 3, C, C_out).
    """
    Rdx, RdW, Rdb = L.conv3x3_backward(Rdz, cache, need_dx)  # R{dz} * W~, a^T R{dz}, sum R{dz}
    if cache_R is not None:
        RdW = RdW + L.conv3x3_backward(dz, cache_R, need_dx=False)[1]  # + R{a}^T dz
    if need_dx:
        Rdx = Rdx + L.conv3x3_input_grad(dz, V)  # + dz * V~
    return Rdx, RdW, Rdb


def _myrtle5_rop(params, cache, curvature, dlogits, dz, V, L):
    """R{grads} for the direction V (a params-shaped dict): the Hessian applied to V."""
    P, c = params, cache
    # R forward pass: R{z} = conv(R{a}, W) + conv(a, V) + v_b; R{h} = 1[z > 0] R{z}
    conv1, conv2, conv3, conv4 = c["conv1"], c["conv2"], c["conv3"], c["conv4"]
    Rz1 = L.conv3x3_cached_forward(conv1, V["W1"]) + V["b1"]  # (N, Hx, Wx, c)  R{x} = 0
    Rh1 = L.relu_backward(Rz1, c["relu1"])
    Rz2, convR2 = L.conv3x3_forward(Rh1, P["W2"], V["b2"])
    Rz2 += L.conv3x3_cached_forward(conv2, V["W2"])  # (N, Hx, Wx, c)
    Rp2, _ = L.avgpool2_forward(L.relu_backward(Rz2, c["relu2"]))  # (N, Hx/2, Wx/2, c)
    Rz3, convR3 = L.conv3x3_forward(Rp2, P["W3"], V["b3"])
    Rz3 += L.conv3x3_cached_forward(conv3, V["W3"])
    Rp3, _ = L.avgpool2_forward(L.relu_backward(Rz3, c["relu3"]))  # (N, Hx/4, Wx/4, c)
    Rz4, convR4 = L.conv3x3_forward(Rp3, P["W4"], V["b4"])
    Rz4 += L.conv3x3_cached_forward(conv4, V["W4"])
    Rq, _ = L.global_avgpool_forward(L.relu_backward(Rz4, c["relu4"]))  # (N, c)
    q, W5 = c["dense5"]
    Rlogits = Rq @ W5 + q @ V["W5"] + V["b5"]  # (N, K)
    Rdlogits = apply_logit_hessian(curvature, Rlogits[None])[0]  # (N, K)  R{dF/dz}, dynloss
    # R backward pass: R{dW} = R{a}^T dz + a^T R{dz};  R{da} = R{dz} W^T + dz V^T
    Rdq, RdW5, Rdb5 = L.dense_backward(Rdlogits, c["dense5"])
    RdW5 = RdW5 + Rq.T @ dlogits  # (c, K)
    Rdq = Rdq + dlogits @ V["W5"].T  # (N, c)
    Rdz4 = L.relu_backward(L.global_avgpool_backward(Rdq, c["pool4"]), c["relu4"])
    Rdp3, RdW4, Rdb4 = _conv_rop_backward(dz["dz4"], Rdz4, conv4, V["W4"], convR4, L)
    Rdz3 = L.relu_avgpool2_backward(Rdp3, c["pool3"], c["relu3"])
    Rdp2, RdW3, Rdb3 = _conv_rop_backward(dz["dz3"], Rdz3, conv3, V["W3"], convR3, L)
    Rdz2 = L.relu_avgpool2_backward(Rdp2, c["pool2"], c["relu2"])
    Rdh1, RdW2, Rdb2 = _conv_rop_backward(dz["dz2"], Rdz2, conv2, V["W2"], convR2, L)
    Rdz1 = L.relu_backward(Rdh1, c["relu1"])
    _, RdW1, Rdb1 = _conv_rop_backward(dz["dz1"], Rdz1, conv1, V["W1"], None, L, need_dx=False)
    return dict(
        W1=RdW1, b1=Rdb1, W2=RdW2, b2=Rdb2, W3=RdW3, b3=Rdb3, W4=RdW4, b4=Rdb4, W5=RdW5, b5=Rdb5
    )


def myrtle5_hvp_operator(params, x, y, gamma, loss="ce", layers=None):
    """The exact Hessian of the batch loss as a function v (P,) -> Hv (P,), for Lanczos.

    Runs the forward and backward pass once and keeps them; each call then costs about two
    gradient evaluations. v may be a NumPy array (it is moved to the backend of params); Hv is on
    that backend, in the dtype of params. x : (N, Hx, Wx, C_in); y : (N,); gamma : (K,).
    layers : the layer table (None: :data:`CPU_LAYERS`).
    """
    xp = get_array_module(*params.values())
    L = layers or CPU_LAYERS
    logits, cache = myrtle5_forward(x, params, L)
    _, dlogits = L.loss_on_batch(logits, y, gamma, loss)
    _, dz = _myrtle5_backward(dlogits, cache, L)
    gamma_row = xp.asarray(gamma, dtype=logits.dtype)[None, :]  # (1, K)
    _, lcache = loss_forward(logits[None], xp.asarray(y), gamma_row, loss)
    curvature = logit_curvature(lcache)  # the logit Hessian's pieces, computed once
    dtype = params["W1"].dtype

    def matvec(v):
        V = myrtle5_unflatten(xp.asarray(v, dtype=dtype).reshape(-1), params)
        Hv = _myrtle5_rop(params, cache, curvature, dlogits, dz, V, L)
        return myrtle5_flatten(Hv)  # (P,)

    return matvec


def myrtle5_hvp(params, x, y, gamma, v, loss="ce", layers=None):
    """Exact Hessian-vector product of the Myrtle5 loss on a batch, by the R-operator.

    x : (N, Hx, Wx, C_in);  y : (N,);  gamma : (K,);  v : (P,) in ``myrtle5_flatten`` order
    Returns Hv (P,) = (d^2 F / d theta^2) v (derivation in the module docstring).
    """
    return myrtle5_hvp_operator(params, x, y, gamma, loss, layers)(v)


def net(layers):
    """What the Fig. 1 protocol calls (protocol.train_epoch's ``net``, as models.MYRTLE5), with
    this module's network on the layer table ``layers``."""
    return SimpleNamespace(
        forward=partial(myrtle5_forward, layers=layers),
        loss_and_grads=partial(myrtle5_loss_and_grads, layers=layers),
        nesterov_step=layers.nesterov_step,
    )


CPU_NET = net(CPU_LAYERS)


def net_for(xp):
    """The fused network for the backend ``xp``: CPU_NET on NumPy, fast/layers.py's GPU table on
    CuPy (the CUDA code is imported only then)."""
    if xp is np:
        return CPU_NET
    from fast.layers import GPU_LAYERS

    return net(GPU_LAYERS)
