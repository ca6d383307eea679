"""Hand-written forward and backward passes: the one-hidden-layer MLP of the spiral experiments.

Symbols
-------
M  networks trained side by side (a leading axis on every parameter and activation)
N  samples
D  input dimension (2 for the spiral)
H  hidden width (100 "narrow", 1000 "wide")
K  classes
P  parameters of one network (D*H + H + H*K + K; 603 at H = 100)
C  channels of an image or feature map (c: the Myrtle5 width, 64 in the paper)
Hx, Wx  image height and width (32 for CIFAR-10; Hx, not H, so as not to clash with the MLP's H)

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

Myrtle5 (Fig. 1; Shankar et al. 2020, the neural-tangents example at depth 5)
-------------------------------------------------------------------------------
One network, no M axis (the CIFAR runs train one network at a time)::

    x (N, Hx, Wx, C_in)
    z1 = conv3x3(x,  W1) + b1   h1 = relu(z1)                       (N, Hx, Wx, c)
    z2 = conv3x3(h1, W2) + b2   h2 = relu(z2)   p2 = avgpool2(h2)   (N, Hx/2, Wx/2, c)
    z3 = conv3x3(p2, W3) + b3   h3 = relu(z3)   p3 = avgpool2(h3)   (N, Hx/4, Wx/4, c)
    z4 = conv3x3(p3, W4) + b4   h4 = relu(z4)   g = global_avgpool(h4)   (N, c)
    logits = g @ W5 + b5                                              (N, K)

Parameters, in the fixed order of ``MYRTLE5_PARAM_NAMES``: W1 (3, 3, C_in, c), W2..W4
(3, 3, c, c) (kernel row, kernel column, input channel, output channel), b1..b4 (c,), W5 (c, K),
b5 (K,); P = 9 C_in c + 27 c^2 + 4c + cK + K (113,226 at c = 64, C_in = 3, K = 10). Convolutions
are 3x3, stride 1, SAME (zero) padding. The global average pool over the last (Hx/4, Wx/4) map
equals neural-tangents' three further 2x2 average pools (8x8 -> 1x1) at 32x32: a mean of means of
equal blocks is the mean. Image sides must be multiples of 8, as for that definition.

Layout: NHWC, x[n, row, col, channel]. cifar.py returns NHWC, and with channels last the
3x3xC patch of every pixel is nine contiguous runs of C values, so im2col is a single strided
copy, the GEMM's (N*Hx*Wx, C_out) result already is the NHWC output, and biases and pools
broadcast over the last axis: no transpose anywhere in the forward or backward pass.

Convolution method: im2col + one GEMM. The padded input is viewed (``as_strided``, no copy) as
(N, Hx, Wx, 3, 3, C) patches, copied once into cols (N*Hx*Wx, 9C), and multiplied by W reshaped
to (9C, C_out) (a free view of the (3, 3, C, C_out) kernel), so on a GPU the work is one cuBLAS
GEMM with K = 9C. The backward pass needs no scatter-adding col2im: see the derivation. On the
GPU, see "GPU kernels" below.

GPU kernels (CuPy; the CUDA source is ``CONV_CUDA_SOURCE``, compiled by CuPy with NVRTC)
--------------------------------------------------------------------------------------
CuPy 14 has no cuDNN, so on the GPU the convolutions are ours. The NumPy code above is the
reference; every kernel is checked against it (tests/test_igemm.py: on a GPU through CuPy, and
without one by running the same source on the CPU in tests/cuda_emulator.cpp).

- TF32 implicit GEMM (float32 with CUPY_TF32=1, input and output channels multiples of 64): out =
  cols @ W without writing cols. A block of ``IGEMM_TILES`` computes 128 pixels x 64 output
  channels; for each 32-wide slice of the K = 9C reduction it gathers the shifted input pixels
  (zeros outside the image) and the weight rows into shared memory, rounded to TF32, and the warps
  multiply them with ``mma.sync.m16n8k8`` (float32 accumulators). The epilogue adds the bias and
  the ReLU (forward) or multiplies by the ReLU mask of the layer below (input gradient: the same
  kernel with the flipped kernel). dW = cols^T dout is a second kernel: pixels are split into
  chunks (``WGRAD_BLOCKS_PER_SM`` blocks per SM), each block writes the partial sum of one
  (tap, 64 x 64) tile, and one kernel adds the partials in a fixed order: deterministic.
- 3xTF32 (DYNLOSS_CONV=3xtf32, float32 without TF32): the same kernels with every operand split
  into big = tf32(v) and small = tf32(v - big), three MMAs per step; float32-level accuracy (not
  IEEE float32) on the tensor cores.
- float32 (default): im2col + cuBLAS SGEMM, with the memory-bound pieces fused: im2col written
  straight from x in one kernel (no padded copy), bias + ReLU in place on the GEMM output, one
  kernel each for the 2x2 pool and for the ReLU + pool backward pass, conv1 (at most 4 input
  channels) as a direct float32 kernel, and the weighted cross-entropy with its gradient in one
  kernel (the host, not the GPU, is near the limit of a Myrtle5 step: about 90 CuPy calls).
- DYNLOSS_CONV=im2col turns the implicit-GEMM and direct kernels off (im2col + CuPy GEMMs).
  float64 on the GPU always takes im2col + cuBLAS: the implicit, direct and pool kernels are
  float32 only, while the im2col, bias + ReLU and loss kernels serve float64 too (the float64
  checks against NumPy, to 1e-10, cover them).

Initialisation (``init_myrtle5``): He scale W ~ N(0, 2/fan_in) with fan_in = 9 C_in for the
convolutions and fan_in = c for the dense layer, zero (trainable) biases. This is neural-tangents'
MyrtleNetwork, which passes W_std = sqrt(2) to every layer, the final Dense included; at
initialisation 'standard' and 'ntk' parameterisations give the same function. (The last layer's
input is post-ReLU, so 2/fan_in is the He choice there too; 1/fan_in would only halve the initial
logit variance.)

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

Derivation: the exact Hessian-vector product (R-operator, forward-over-reverse)
-------------------------------------------------------------------------------
For a direction v (P,) write R{f} = d/de f(theta + e v) at e = 0 (Pearlmutter 1994). Then
Hv = R{dF/dtheta}: apply R to every line of the forward and then the backward pass. R is linear
and obeys the product rule; R{W_l} = V_l, R{b_l} = v_bl (v unflattened), R{x} = 0.

- conv3x3 and dense are bilinear in (input a, weight W): R{z} = f(R{a}, W) + f(a, V) + v_b.
- ReLU: h = 1[z > 0] z with the mask locally constant (away from the kinks, where F is not twice
  differentiable), so R{h} = 1[z > 0] R{z}: the same product as relu_backward.
- pools are linear: R{pool(a)} = pool(R{a}).
- loss (weights w_j = Gamma_{y_j}, s = softmax(z)): dF/dz_jk = w_j (s_jk - onehot_jk)/N and
  ds_jk/dz_jl = s_jk (delta_kl - s_jl), so
  R{dF/dz}_jk = (w_j/N) s_jk (R{z}_jk - sum_l s_jl R{z}_jl); for the weighted MSE
  R{dF/dz} = (w_j/N) R{z}.
- backward lines: dW = a^T dz gives R{dW} = R{a}^T dz + a^T R{dz}; da = dz W^T (a flipped conv
  for conv3x3) gives R{da} = R{dz} W^T + dz V^T; db = sum dz gives R{db} = sum R{dz};
  dz = 1[z > 0] dh gives R{dz} = 1[z > 0] R{dh}; pool backward is linear.

Hv = (R{dW1}, R{db1}, ..., R{dW5}, R{db5}) is the exact Hessian of the batch loss applied to v (no
Gauss-Newton approximation), at about twice the cost of a gradient given the cached forward pass.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from dynloss import get_array_module, log_softmax, loss_backward, loss_forward

INITS = ("standard", "glorot")
MLP_PARAM_NAMES = ("W1", "b1", "W2", "b2")


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


# ---------------------------------------------------------------------------------------------
# Myrtle5 layers (NHWC, one network, no M axis): see "Myrtle5" in the module docstring
# ---------------------------------------------------------------------------------------------

MYRTLE5_PARAM_NAMES = ("W1", "b1", "W2", "b2", "W3", "b3", "W4", "b4", "W5", "b5")
MYRTLE5_DIVISOR = 8  # image sides must be multiples of this (2x2 pools down to 8x8 -> 1x1)


def im2col3x3(x):
    """The 3x3 patches of the zero-padded x, one row per output pixel.

    x : (N, Hx, Wx, C)
    Returns cols (N*Hx*Wx, 9C), row (n, i, j) = xpad[n, i:i+3, j:j+3, :] flattened in the
    order (kernel row, kernel column, channel). One copy from a strided view; dtype of x.
    The copies move each pixel's C values as the widest machine words that tile them (16-byte
    complex128 for float32 with C % 4 == 0): the bytes are unchanged, the copy kernels do a
    quarter of the index arithmetic (1.7 -> about 0.5 ms for c = 64, batch 512, on an H200).
    On CuPy, where the C values of a pixel are whole 4-byte words, one CUDA kernel writes cols
    straight from x in the widest of 16-, 8- or 4-byte words (``dynloss_im2col3x3_*``), without
    the padded copy.
    """
    xp = get_array_module(x)
    N, Hx, Wx, C = x.shape
    if (
        xp is not np
        and (C * x.itemsize) % 4 == 0
        and N * Hx * Wx * 9 * C * x.itemsize < 2**33 - 2**10
    ):
        return _gpu_im2col3x3(x)  # (< 2^31 - 256 words: the kernel's indices are 32-bit)
    word = _copy_word(C * x.itemsize)
    xw = xp.ascontiguousarray(x).view(word)  # (N, Hx, Wx, Cw), the same bytes
    xpad = xp.zeros((N, Hx + 2, Wx + 2, xw.shape[3]), dtype=word)  # (N, Hx+2, Wx+2, Cw)
    xpad[:, 1:-1, 1:-1, :] = xw
    sn, sh, sw, sc = xpad.strides
    patches = xp.lib.stride_tricks.as_strided(
        xpad, shape=(N, Hx, Wx, 3, 3, xw.shape[3]), strides=(sn, sh, sw, sh, sw, sc)
    )  # (N, Hx, Wx, 3, 3, Cw), a view
    cols = xp.ascontiguousarray(patches).view(x.dtype)  # (N, Hx, Wx, 3, 3, C)
    return cols.reshape(N * Hx * Wx, 9 * C)  # (N*Hx*Wx, 9C)


def _copy_word(row_bytes):
    """The widest of complex128 / float64 / float32 / uint8 whose size divides row_bytes."""
    for word in (np.complex128, np.float64, np.float32, np.uint8):
        if row_bytes % np.dtype(word).itemsize == 0:
            return word
    raise AssertionError("unreachable: uint8 divides every size")


def _check_conv_shapes(x, W):
    if x.ndim != 4 or W.ndim != 4 or W.shape[:2] != (3, 3) or W.shape[2] != x.shape[3]:
        raise ValueError(
            f"conv3x3 needs x (N, Hx, Wx, C) and W (3, 3, C, C_out); got x {x.shape}, W {W.shape}"
        )


def conv3x3_forward(x, W, b):
    """3x3 convolution, stride 1, SAME zero padding, NHWC (cross-correlation, as in deep learning).

    x : (N, Hx, Wx, C);  W : (3, 3, C, C_out);  b : (C_out,)
    Returns out (N, Hx, Wx, C_out) and the cache (x, W, cols); cols (N*Hx*Wx, 9C) is None on
    the GPU kernels that never write it (implicit GEMM, direct conv; see "GPU kernels").
    """
    _check_conv_shapes(x, W)
    if _implicit_conv_ok(x, W):
        return _implicit_conv(x, W, b), (x, W, None)
    if _direct_conv_ok(x, W):
        return _direct_conv(x, W, b), (x, W, None)
    cols = im2col3x3(x)  # (N*Hx*Wx, 9C)
    out = _conv_apply(cols, W, x.shape)  # (N, Hx, Wx, C_out)
    out += b
    return out, (x, W, cols)


def conv3x3_relu_forward(x, W, b):
    """h = relu(conv3x3(x, W) + b): :func:`conv3x3_forward` then :func:`relu_forward`.

    x : (N, Hx, Wx, C);  W : (3, 3, C, C_out);  b : (C_out,)
    Returns h (N, Hx, Wx, C_out) and the caches (conv cache, relu cache = h). On the GPU the bias
    and the ReLU are applied to the GEMM's fresh output in one pass (or inside the implicit-GEMM
    kernel), so the pre-activation z is never stored: the ReLU's backward pass needs only h > 0.
    """
    _check_conv_shapes(x, W)
    xp = get_array_module(x)
    if _implicit_conv_ok(x, W):
        h = _implicit_conv(x, W, b, relu=True)
        return h, ((x, W, None), h)
    if _direct_conv_ok(x, W):
        h = _direct_conv(x, W, b, relu=True)
        return h, ((x, W, None), h)
    if xp is np:
        z, conv_cache = conv3x3_forward(x, W, b)
        h, relu_cache = relu_forward(z)
        return h, (conv_cache, relu_cache)
    cols = im2col3x3(x)  # (N*Hx*Wx, 9C)
    h = _conv_apply(cols, W, x.shape)  # (N, Hx, Wx, C_out): cols W, no bias yet
    _bias_relu_kernel()(b, h)  # h = max(cols W + b, 0), in place on the array just made
    return h, ((x, W, cols), h)


def _column_sums(a):
    """a (R, C) -> (C,) summed over rows, as ones (R,) @ a: one GEMV. (CuPy's generic reduction
    over the leading axis of a tall (N*Hx*Wx, c) array took 12 ms against 0.08 ms on an H200 at
    batch 512, c = 64, 32x32.)"""
    xp = get_array_module(a)
    if xp is np:
        return np.ones(a.shape[0], dtype=a.dtype) @ a  # (C,)
    return _gpu_constant(1, a.shape[0], a.dtype.str, a.device.id) @ a  # (C,)


def _conv_apply(cols, W, x_shape):
    """cols (N*Hx*Wx, 9C) @ W (3, 3, C, C_out) reshaped to (9C, C_out) -> (N, Hx, Wx, C_out)."""
    C_out = W.shape[3]
    out = cols @ W.reshape(-1, C_out)  # (N*Hx*Wx, C_out)  out = cols W
    return out.reshape(x_shape[:3] + (C_out,))


def conv3x3_backward(dout, cache, need_dx=True, gate=None):
    """Gradients of :func:`conv3x3_forward` (derivation in the module docstring).

    dout : (N, Hx, Wx, C_out);  cache : (x, W, cols) from the forward pass
    gate : None, or the ReLU output h (N, Hx, Wx, C) that was this convolution's input x: then
    dx is returned already multiplied by 1[h > 0], the ReLU's backward pass (one kernel on the
    GPU's implicit-GEMM path).
    Returns dx (N, Hx, Wx, C), or None when ``need_dx`` is False (the input is data);
    dW (3, 3, C, C_out); db (C_out,).
    """
    x, W, cols = cache
    C_out = W.shape[3]
    dout2 = dout.reshape(-1, C_out)  # (N*Hx*Wx, C_out)
    db = _column_sums(dout2)  # (C_out,)  dF/db = sum_{n,i,j} dout
    split = _implicit_split(x, W)
    if split is not None:
        dW = _implicit_wgrad(x, dout, W.shape, split)  # (3, 3, C, C_out)  dF/dW = cols^T dout
        dx = _implicit_conv(dout, _flipped_kernel(W), gate=gate) if need_dx else None
        return dx, dW, db
    if cols is None:
        cols = im2col3x3(x)
    dW = (cols.T @ dout2).reshape(W.shape)  # (3, 3, C, C_out)  dF/dW = cols^T dout
    dx = None
    if need_dx:
        dx = _conv_input_grad(dout, W, x.shape)  # (N, Hx, Wx, C)
        if gate is not None:
            dx = relu_backward(dx, gate)  # dF/dz = dF/dx * 1[h > 0] for the ReLU below
    return dx, dW, db


def _flipped_kernel(W):
    """W (3, 3, C, C_out) flipped in both spatial axes, C and C_out swapped: (3, 3, C_out, C)."""
    xp = get_array_module(W)
    return xp.ascontiguousarray(W[::-1, ::-1].transpose(0, 1, 3, 2))


def _conv_input_grad(dout, W, x_shape):
    """dF/dx of a SAME 3x3 conv: the SAME conv of dout with W flipped and C/C_out swapped."""
    W_flip = _flipped_kernel(W)  # (3, 3, C_out, C)
    if _implicit_conv_ok(dout, W_flip):
        return _implicit_conv(dout, W_flip)  # (N, Hx, Wx, C)
    C = W.shape[2]
    dx = im2col3x3(dout) @ W_flip.reshape(-1, C)  # (N*Hx*Wx, C)
    return dx.reshape(x_shape)


def avgpool2_forward(x):
    """2x2 average pooling, stride 2: (N, Hx, Wx, C) -> (N, Hx/2, Wx/2, C); cache x.shape."""
    N, Hx, Wx, C = x.shape
    if Hx % 2 or Wx % 2:
        raise ValueError(f"avgpool2 needs even image sides, got {Hx}x{Wx}")
    if _gpu_float32(x) and x.size < 2**31 - 256:  # the kernel's indices are 32-bit
        return _gpu_avgpool2(x), x.shape  # the same four-term mean as one CUDA kernel
    out = x.reshape(N, Hx // 2, 2, Wx // 2, 2, C).mean(axis=(2, 4))  # (N, Hx/2, Wx/2, C)
    return out, x.shape


def avgpool2_backward(dout, cache):
    """dx (N, Hx, Wx, C): each input pixel gets a quarter of its block's dout."""
    xp = get_array_module(dout)
    N, Hx, Wx, C = cache
    d6 = (0.25 * dout)[:, :, None, :, None, :]  # (N, Hx/2, 1, Wx/2, 1, C)  dF/dx = dout / 4
    return xp.broadcast_to(d6, (N, Hx // 2, 2, Wx // 2, 2, C)).reshape(cache)  # (N, Hx, Wx, C)


def relu_avgpool2_backward(dout, pool_cache, relu_cache):
    """dz of z -> relu -> avgpool2 in one broadcast product: the same numbers as
    relu_backward(avgpool2_backward(dout, pool_cache), relu_cache), without writing the upsampled
    gradient (0.53 -> 0.37 ms at batch 512, c = 64, 32x32 on an H200; one CUDA kernel for
    float32 on the GPU).

    dout : (N, Hx/2, Wx/2, C);  relu_cache : h (N, Hx, Wx, C).  Returns dz (N, Hx, Wx, C).
    """
    N, Hx, Wx, C = pool_cache
    if _gpu_float32(dout, relu_cache) and relu_cache.size < 2**31 - 256:  # 32-bit indices
        return _gpu_relu_avgpool2_backward(dout, relu_cache)
    mask = relu_cache.reshape(N, Hx // 2, 2, Wx // 2, 2, C) > 0  # (N, Hx/2, 2, Wx/2, 2, C)
    dz = mask * (0.25 * dout)[:, :, None, :, None, :]  # dF/dz = 1[z > 0] dout / 4
    return dz.reshape(pool_cache)  # (N, Hx, Wx, C)


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
    return dout @ W.T, x.T @ dout, _column_sums(dout)  # dF/dx = dout W^T, x^T dout, sum_n dout


# ---------------------------------------------------------------------------------------------
# Myrtle5
# ---------------------------------------------------------------------------------------------


def init_myrtle5(rng, c=64, in_channels=3, n_classes=10, dtype=np.float64):
    """Initial Myrtle5 parameters on the host: W ~ N(0, 2/fan_in), zero biases (module docstring).

    rng : np.random.Generator, or an int seed for np.random.default_rng. Drawn in the order
    W1, W2, W3, W4, W5. fan_in = 9 C_in for the convolutions, c for the dense layer.
    Returns params {"W1": (3, 3, C_in, c), "b1": (c,), ..., "W5": (c, K), "b5": (K,)} (NumPy,
    ``dtype``; pass float32 for GPU training, keep float64 for every check).
    """
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    shapes = {
        "W1": (3, 3, in_channels, c),
        "W2": (3, 3, c, c),
        "W3": (3, 3, c, c),
        "W4": (3, 3, c, c),
        "W5": (c, n_classes),
    }
    params = {}
    for layer, shape in enumerate(shapes.values(), start=1):
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
    """Logits of one Myrtle5 network.

    x : (N, Hx, Wx, C_in), Hx and Wx multiples of 8;  params : see :func:`init_myrtle5`
    Returns logits (N, K) and the cache for :func:`myrtle5_backward` (a dict of layer caches).
    """
    _check_image(x)
    P = params
    h1, (conv1, relu1) = conv3x3_relu_forward(x, P["W1"], P["b1"])  # (N, Hx, Wx, c)
    h2, (conv2, relu2) = conv3x3_relu_forward(h1, P["W2"], P["b2"])  # (N, Hx, Wx, c)
    p2, pool2 = avgpool2_forward(h2)  # (N, Hx/2, Wx/2, c)
    h3, (conv3, relu3) = conv3x3_relu_forward(p2, P["W3"], P["b3"])
    p3, pool3 = avgpool2_forward(h3)  # (N, Hx/4, Wx/4, c)
    h4, (conv4, relu4) = conv3x3_relu_forward(p3, P["W4"], P["b4"])
    g, pool4 = global_avgpool_forward(h4)  # (N, c)
    logits, dense5 = dense_forward(g, P["W5"], P["b5"])  # (N, K)
    cache = dict(conv1=conv1, relu1=relu1, conv2=conv2, relu2=relu2, pool2=pool2, conv3=conv3)
    cache.update(relu3=relu3, pool3=pool3, conv4=conv4, relu4=relu4, pool4=pool4, dense5=dense5)
    return logits, cache


def _myrtle5_backward(dlogits, cache):
    """The backward pass, returning the grads and the pre-activation gradients dz1..dz4."""
    c = cache
    dg, dW5, db5 = dense_backward(dlogits, c["dense5"])  # (N, c)
    dz4 = relu_backward(global_avgpool_backward(dg, c["pool4"]), c["relu4"])  # (N, Hx/4, Wx/4, c)
    dp3, dW4, db4 = conv3x3_backward(dz4, c["conv4"])
    dz3 = relu_avgpool2_backward(dp3, c["pool3"], c["relu3"])  # (N, Hx/2, Wx/2, c)
    dp2, dW3, db3 = conv3x3_backward(dz3, c["conv3"])
    dz2 = relu_avgpool2_backward(dp2, c["pool2"], c["relu2"])  # (N, Hx, Wx, c)
    dz1, dW2, db2 = conv3x3_backward(dz2, c["conv2"], gate=c["relu1"])  # dz1 = dh1 1[h1 > 0]
    _, dW1, db1 = conv3x3_backward(dz1, c["conv1"], need_dx=False)
    grads = dict(W1=dW1, b1=db1, W2=dW2, b2=db2, W3=dW3, b3=db3, W4=dW4, b4=db4, W5=dW5, b5=db5)
    return grads, dict(dz1=dz1, dz2=dz2, dz3=dz3, dz4=dz4)


def myrtle5_backward(dlogits, cache):
    """Parameter gradients of :func:`myrtle5_forward`, the chain rule in reverse order.

    dlogits : (N, K)
    Returns grads, a dict with the shapes of params (order ``MYRTLE5_PARAM_NAMES``).
    """
    grads, _ = _myrtle5_backward(dlogits, cache)
    return {k: grads[k] for k in MYRTLE5_PARAM_NAMES}


def _loss_on_batch(logits, y, gamma, loss):
    """dynloss on one network: adds and removes the leading M = 1 axis; keeps logits' dtype.
    On CuPy the cross-entropy and its gradient are one kernel (``dynloss_ce_rows_*``, checked
    against dynloss.loss_forward/loss_backward) plus one sum, instead of about twenty calls."""
    xp = get_array_module(logits)
    if xp is not np and loss == "ce" and logits.dtype in (np.float32, np.float64):
        return _gpu_ce_loss(logits, y, gamma)
    gamma = xp.asarray(gamma, dtype=logits.dtype)[None, :]  # (1, K)
    F, lcache = loss_forward(logits[None], xp.asarray(y), gamma, loss)  # (1,)
    dlogits = loss_backward(lcache)[0].astype(logits.dtype, copy=False)  # (N, K)
    return F[0], dlogits


def myrtle5_loss_and_grads(params, x, y, gamma, loss="ce"):
    """Dynamical loss F (eq. 1, mean over the batch) of one Myrtle5 network and its gradient.

    x : (N, Hx, Wx, C_in);  y : (N,) ints;  gamma : (K,) class weights at the current step
    Returns F (a 0-d array on the backend of x: no device-to-host sync), grads (shapes of params),
    logits (N, K).
    """
    logits, cache = myrtle5_forward(x, params)
    F, dlogits = _loss_on_batch(logits, y, gamma, loss)
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


def _loss_rop(logits, y, gamma, Rlogits, loss):
    """R{dF/dlogits} (N, K) for the weighted loss (derivation in the module docstring)."""
    xp = get_array_module(logits)
    N = logits.shape[0]
    w = xp.asarray(gamma, dtype=logits.dtype)[xp.asarray(y)][:, None] / N  # (N, 1)  Gamma_y / N
    if loss == "mse":
        return w * Rlogits  # (N, K)
    s = xp.exp(log_softmax(logits))  # (N, K)  softmax
    return w * s * (Rlogits - (s * Rlogits).sum(axis=1, keepdims=True))  # (N, K)


def _conv_rop_backward(dz, Rdz, cache, V, cache_R, need_dx=True):
    """R of conv3x3_backward: (R{dx} or None, R{dW}, R{db}) from dz = dF/dout and R{dz}.

    cache: the forward cache (a, W, cols) of the input a; cache_R: the cache of a convolution
    whose input was R{a}, or None where R{a} = 0 (the data); V: the direction's kernel
    (3, 3, C, C_out).
    """
    Rdx, RdW, Rdb = conv3x3_backward(Rdz, cache, need_dx)  # R{dz} * W~, a^T R{dz}, sum R{dz}
    if cache_R is not None:
        RdW = RdW + conv3x3_backward(dz, cache_R, need_dx=False)[1]  # + R{a}^T dz
    if need_dx:
        Rdx = Rdx + _conv_input_grad(dz, V, cache[0].shape)  # + dz * V~
    return Rdx, RdW, Rdb


def _conv_of_cached_input(cache, V):
    """conv3x3 (no bias) of the input a of a cached convolution with another kernel V
    (3, 3, C, C_out): reuses the cached cols where there are any. Returns (N, Hx, Wx, C_out)."""
    a, _, cols = cache
    if cols is not None:
        return _conv_apply(cols, V, a.shape)
    xp = get_array_module(a)
    return conv3x3_forward(a, V, xp.zeros(V.shape[3], dtype=V.dtype))[0]


def _myrtle5_rop(params, cache, logits, dlogits, dz, y, gamma, loss, V):
    """R{grads} for the direction V (a params-shaped dict): the Hessian applied to V."""
    P, c = params, cache
    # R forward pass: R{z} = conv(R{a}, W) + conv(a, V) + v_b; R{h} = 1[z > 0] R{z}
    conv1, conv2, conv3, conv4 = c["conv1"], c["conv2"], c["conv3"], c["conv4"]
    Rz1 = _conv_of_cached_input(conv1, V["W1"]) + V["b1"]  # (N, Hx, Wx, c)  R{x} = 0
    Rh1 = relu_backward(Rz1, c["relu1"])
    Rz2, convR2 = conv3x3_forward(Rh1, P["W2"], V["b2"])
    Rz2 += _conv_of_cached_input(conv2, V["W2"])  # (N, Hx, Wx, c)
    Rp2, _ = avgpool2_forward(relu_backward(Rz2, c["relu2"]))  # (N, Hx/2, Wx/2, c)
    Rz3, convR3 = conv3x3_forward(Rp2, P["W3"], V["b3"])
    Rz3 += _conv_of_cached_input(conv3, V["W3"])
    Rp3, _ = avgpool2_forward(relu_backward(Rz3, c["relu3"]))  # (N, Hx/4, Wx/4, c)
    Rz4, convR4 = conv3x3_forward(Rp3, P["W4"], V["b4"])
    Rz4 += _conv_of_cached_input(conv4, V["W4"])
    Rg, _ = global_avgpool_forward(relu_backward(Rz4, c["relu4"]))  # (N, c)
    g, W5 = c["dense5"]
    Rlogits = Rg @ W5 + g @ V["W5"] + V["b5"]  # (N, K)
    Rdlogits = _loss_rop(logits, y, gamma, Rlogits, loss)  # (N, K)
    # R backward pass: R{dW} = R{a}^T dz + a^T R{dz};  R{da} = R{dz} W^T + dz V^T
    Rdg, RdW5, Rdb5 = dense_backward(Rdlogits, c["dense5"])
    RdW5 = RdW5 + Rg.T @ dlogits  # (c, K)
    Rdg = Rdg + dlogits @ V["W5"].T  # (N, c)
    Rdz4 = relu_backward(global_avgpool_backward(Rdg, c["pool4"]), c["relu4"])
    Rdp3, RdW4, Rdb4 = _conv_rop_backward(dz["dz4"], Rdz4, conv4, V["W4"], convR4)
    Rdz3 = relu_avgpool2_backward(Rdp3, c["pool3"], c["relu3"])
    Rdp2, RdW3, Rdb3 = _conv_rop_backward(dz["dz3"], Rdz3, conv3, V["W3"], convR3)
    Rdz2 = relu_avgpool2_backward(Rdp2, c["pool2"], c["relu2"])
    Rdh1, RdW2, Rdb2 = _conv_rop_backward(dz["dz2"], Rdz2, conv2, V["W2"], convR2)
    Rdz1 = relu_backward(Rdh1, c["relu1"])
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
    _, dlogits = _loss_on_batch(logits, y, gamma, loss)
    _, dz = _myrtle5_backward(dlogits, cache)
    dtype = params["W1"].dtype

    def matvec(v):
        V = myrtle5_unflatten(xp.asarray(v, dtype=dtype).reshape(-1), params)
        Hv = _myrtle5_rop(params, cache, logits, dlogits, dz, y, gamma, loss, V)
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


def nesterov_step(params, grads, velocity, lr, momentum=0.9):
    """One SGD step with Nesterov momentum, in place on ``params`` and ``velocity``.

    PyTorch's formulation (torch.optim.SGD(nesterov=True), dampening 0, weight decay 0):

        v     <- momentum * v + g
        theta <- theta - lr * (g + momentum * v)

    with v = 0 before the first step (PyTorch's first buffer, g, is the same thing). ``params``,
    ``grads`` and ``velocity`` are dicts with the same keys (or three arrays); the trainer owns
    params and velocity, which are edited in place; grads is only read. On CuPy each array takes
    one fused elementwise kernel (the NumPy lines below, compiled), not six launches.
    """
    if not isinstance(params, dict):
        params, grads, velocity = {"": params}, {"": grads}, {"": velocity}
    for k, theta in params.items():
        v, g = velocity[k], grads[k]
        if get_array_module(theta) is np:
            v *= momentum
            v += g  # v <- momentum v + g
            theta -= lr * (g + momentum * v)  # theta <- theta - lr (g + momentum v)
        else:
            scalar = theta.dtype.type
            _nesterov_kernel()(g, scalar(lr), scalar(momentum), theta, v)


@functools.lru_cache(maxsize=1)
def _nesterov_kernel():
    """The CuPy kernel of :func:`nesterov_step` (theta and v are read and written in place)."""
    import cupy

    return cupy.ElementwiseKernel(
        "T g, T lr, T momentum",
        "T theta, T v",
        "v = momentum * v + g; theta -= lr * (g + momentum * v);",
        "dynloss_nesterov_step",
    )


# ---------------------------------------------------------------------------------------------
# GPU kernels (CuPy): see "GPU kernels" in the module docstring
# ---------------------------------------------------------------------------------------------

CONV_METHODS = ("auto", "im2col", "3xtf32")  # the values of the DYNLOSS_CONV variable
# (warps along M, warps along N, warp tile M, warp tile N, reduction slice BK) of the two kernels
IGEMM_TILES = (4, 2, 32, 32, 32)  # output tile 128 pixels x 64 channels, 256 threads
WGRAD_TILES = (2, 4, 32, 16, 32)  # dW tile 64 x 64 over 32-pixel slices, 256 threads
WGRAD_BLOCKS_PER_SM = 8  # the dW kernel splits the pixels into this many blocks per SM
DIRECT_SMEM_FLOATS = 4800  # DIRECT_SMEM in the CUDA source: room for (9C + 1) C_out weights


def _tf32_enabled():
    """CuPy multiplies float32 matrices in TF32 when CUPY_TF32=1 (CuPy reads the variable)."""
    return os.environ.get("CUPY_TF32", "0") not in ("", "0")


def _gpu_float32(*arrays):
    """True if every array is a float32 CuPy array."""
    return all(get_array_module(a) is not np and a.dtype == np.float32 for a in arrays)


def _conv_method():
    """The DYNLOSS_CONV setting, checked: one of CONV_METHODS (default "auto")."""
    method = os.environ.get("DYNLOSS_CONV", "auto")
    if method not in CONV_METHODS:
        raise ValueError(f"DYNLOSS_CONV={method!r}: expected one of {', '.join(CONV_METHODS)}")
    return method


def _implicit_split(x, W):
    """How conv3x3(x, W) multiplies: None = im2col + a CuPy (cuBLAS) GEMM; 0 = the implicit GEMM
    in TF32; 1 = the implicit GEMM in 3xTF32. The implicit kernels need float32 CuPy arrays and
    input and output channels that are multiples of 64 (every tile divides them). Then TF32 when
    CUPY_TF32=1, and otherwise 3xTF32 only when DYNLOSS_CONV=3xtf32; DYNLOSS_CONV=im2col turns
    both off."""
    method = _conv_method()
    if method == "im2col" or not _gpu_float32(x, W) or not _channels_fit_tiles(*W.shape[2:]):
        return None
    if x.shape[0] * x.shape[1] * x.shape[2] >= 2**31:  # pixel indices are 32-bit in the kernels
        return None
    if _tf32_enabled():
        return 0
    return 1 if method == "3xtf32" else None


def _channels_fit_tiles(C, C_out):
    """Both channel counts are multiples of 64 and of every tile side that divides them (the input
    gradient swaps C and C_out)."""
    BM, BN, _ = _tile_shape(IGEMM_TILES)
    BMw, BNw, _ = _tile_shape(WGRAD_TILES)
    sides = (64, BN, IGEMM_TILES[4], BMw, BNw)
    return all(ch % d == 0 for ch in (C, C_out) for d in sides)


def _implicit_conv_ok(x, W):
    """Whether conv3x3(x, W) (and its backward pass) runs on the implicit-GEMM kernels."""
    return _implicit_split(x, W) is not None


def _direct_conv_ok(x, W):
    """Whether conv3x3(x, W) runs as the direct float32 kernel: CuPy float32, at most 4 input
    channels (conv1), C_out % 4 == 0, the weights fit DIRECT_SMEM_FLOATS; not with
    DYNLOSS_CONV=im2col. (There im2col + cuBLAS is a K = 9C <= 36 GEMM over unaligned rows.)"""
    C, C_out = W.shape[2], W.shape[3]
    return (
        _conv_method() != "im2col"
        and _gpu_float32(x, W)
        and C <= 4
        and C_out % 4 == 0
        and (9 * C + 1) * C_out <= DIRECT_SMEM_FLOATS
        and x.shape[0] * x.shape[1] * x.shape[2] * (C_out // 4) < 2**31 - 256
    )


def _tile_shape(tiles):
    """(block rows BM, block columns BN, threads) of a tile tuple."""
    warps_m, warps_n, wm, wn, _ = tiles
    return warps_m * wm, warps_n * wn, 32 * warps_m * warps_n


@functools.cache
def _cuda_module(tiles, split):
    """CONV_CUDA_SOURCE compiled (NVRTC, by CuPy) for one tile tuple, TF32 or 3xTF32 (split)."""
    import cupy

    names = ("WARPS_M", "WARPS_N", "WM", "WN", "BK")
    defines = tuple(f"-D{k}={int(v)}" for k, v in zip(names, tiles, strict=True))
    options = ("--std=c++17", f"-DSPLIT={int(split)}") + defines
    return cupy.RawModule(code=CONV_CUDA_SOURCE, options=options)


def _cuda_kernel(name, tiles=None, split=0):
    return _cuda_module(tuple(tiles or IGEMM_TILES), split).get_function(name)


@functools.lru_cache(maxsize=64)
def _gpu_constant(value, n, dtype, device_id):
    """A cached CuPy vector (n,) filled with value: read-only by convention (no allocation and
    fill on every call: the host, not the GPU, paces a Myrtle5 step)."""
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.full(n, value, dtype=dtype)


@functools.cache
def _sm_count(device_id):
    import cupy

    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


def _kernel_array(a, dtype, shape=None):
    """A C-contiguous, 16-byte-aligned CuPy array of dtype for a kernel argument (a copy only where
    needed: float4 loads need the alignment, and a view such as a row of a matrix may lack it)."""
    import cupy

    a = cupy.ascontiguousarray(a, dtype=dtype)
    if shape is not None and a.shape != tuple(shape):
        raise ValueError(f"expected an array of shape {tuple(shape)}, got {a.shape}")
    return a if a.data.ptr % 16 == 0 else a.copy()


def _grid1d(total, threads=256):
    return ((total + threads - 1) // threads,), (threads,)


def _implicit_conv(x, W, b=None, relu=False, gate=None):
    """conv3x3(x, W) on the tensor cores (TF32 or 3xTF32) without im2col, epilogue fused.

    x : (N, Hx, Wx, C) float32 CuPy;  W : (3, 3, C, C_out);  b : (C_out,) or None (zero)
    relu : apply max(., 0) after the bias;  gate : None or (N, Hx, Wx, C_out), then the result
    is multiplied by 1[gate > 0] instead (no bias): the input gradient times the ReLU's mask.
    Returns (N, Hx, Wx, C_out) float32.
    """
    import cupy

    split = _implicit_split(x, W)
    N, Hx, Wx, C = x.shape
    C_out = W.shape[3]
    x = _kernel_array(x, np.float32)
    w = _kernel_array(W, np.float32).reshape(9 * C, C_out)  # (9C, C_out)
    out = cupy.empty((N, Hx, Wx, C_out), dtype=np.float32)
    if b is None:
        bias = _gpu_constant(0, C_out, "<f4", x.device.id)
    else:
        bias = _kernel_array(b, np.float32, (C_out,))
    mode = 2 if gate is not None else (1 if relu else 0)
    gate = out if gate is None else _kernel_array(gate, np.float32, out.shape)  # read in mode 2
    BM, BN, threads = _tile_shape(IGEMM_TILES)
    grid = ((N * Hx * Wx + BM - 1) // BM, C_out // BN)
    i32 = np.int32
    _cuda_kernel("dynloss_conv3x3_igemm", IGEMM_TILES, split)(
        grid, (threads,), (x, w, bias, gate, out, i32(N), i32(Hx), i32(Wx), i32(C), i32(C_out),
                           i32(mode))
    )  # fmt: skip
    return out


def _gpu_ce_loss(logits, y, gamma):
    """F (0-d) and dF/dlogits (N, K) of the weighted cross-entropy (eq. 1) on CuPy."""
    import cupy

    N, K = logits.shape
    z = cupy.ascontiguousarray(logits)
    y = cupy.ascontiguousarray(cupy.asarray(y), dtype=np.int64)  # labels in 0..K-1, unchecked
    gamma = cupy.ascontiguousarray(cupy.asarray(gamma), dtype=z.dtype)
    per_sample = cupy.empty(N, dtype=z.dtype)
    dz = cupy.empty((N, K), dtype=z.dtype)
    name = "dynloss_ce_rows_f32" if z.dtype == np.float32 else "dynloss_ce_rows_f64"
    args = (z, y, gamma, per_sample, dz, np.int32(N), np.int32(K))
    _cuda_kernel(name)(*_grid1d(N, 128), args)
    return per_sample.sum(), dz


def _direct_conv(x, W, b, relu=False):
    """conv3x3(x, W) + b [relu] for a few input channels, one float32 CUDA kernel (no TF32).

    x : (N, Hx, Wx, C) float32 CuPy, C <= 4;  W : (3, 3, C, C_out);  b : (C_out,)
    Returns (N, Hx, Wx, C_out) float32.
    """
    import cupy

    N, Hx, Wx, C = x.shape
    C_out = W.shape[3]
    out = cupy.empty((N, Hx, Wx, C_out), dtype=np.float32)
    total = N * Hx * Wx * (C_out // 4)
    i32 = np.int32
    args = (_kernel_array(x, np.float32), _kernel_array(W, np.float32))
    args += (_kernel_array(b, np.float32, (C_out,)), out)
    args += (i32(Hx), i32(Wx), i32(C), i32(C_out), i32(relu), i32(total))
    _cuda_kernel("dynloss_conv3x3_direct")(*_grid1d(total), args)
    return out


def _implicit_wgrad(x, dout, W_shape, split):
    """dF/dW = cols^T dout of conv3x3 without cols: per-chunk partial sums on the tensor cores,
    then one fixed-order sum over the chunks (deterministic, no atomics).

    x : (N, Hx, Wx, C), dout : (N, Hx, Wx, C_out), float32 CuPy; split : 0 (TF32) or 1 (3xTF32).
    Returns dW (3, 3, C, C_out).
    """
    import cupy

    N, Hx, Wx, C = x.shape
    C_out = W_shape[3]
    BM, BN, threads = _tile_shape(WGRAD_TILES)
    BK = WGRAD_TILES[4]
    P = N * Hx * Wx
    blocks_per_chunk = (9 * C // BM) * (C_out // BN)
    target = max(1, WGRAD_BLOCKS_PER_SM * _sm_count(x.device.id) // blocks_per_chunk)
    chunk = -(-P // target)
    chunk = -(-chunk // BK) * BK  # a whole number of BK-pixel slices
    S = -(-P // chunk)
    L = 9 * C * C_out
    part = cupy.empty((S, L), dtype=np.float32)
    i32 = np.int32
    _cuda_kernel("dynloss_conv3x3_wgrad", WGRAD_TILES, split)(
        (9 * C // BM, C_out // BN, S), (threads,),
        (_kernel_array(x, np.float32), _kernel_array(dout, np.float32, (N, Hx, Wx, C_out)), part,
         i32(N), i32(Hx), i32(Wx), i32(C), i32(C_out), i32(chunk)),
    )  # fmt: skip
    dW = cupy.empty(L, dtype=np.float32)
    _cuda_kernel("dynloss_sum_parts")(*_grid1d(L), (part, dW, i32(S), i32(L)))
    return dW.reshape(W_shape)


def _gpu_im2col3x3(x):
    """im2col3x3 on CuPy in one kernel, copying the widest words (16, 8 or 4 bytes) that tile a
    pixel's C values; needs (C * itemsize) % 4 == 0."""
    import cupy

    N, Hx, Wx, C = x.shape
    row_bytes = C * x.itemsize
    word = next(w for w in (16, 8, 4) if row_bytes % w == 0)
    CW = row_bytes // word
    total = N * Hx * Wx * 9 * CW
    cols = cupy.empty((N * Hx * Wx, 9 * C), dtype=x.dtype)
    x = _kernel_array(x, x.dtype)
    i32 = np.int32
    _cuda_kernel(f"dynloss_im2col3x3_{word}")(
        *_grid1d(total), (x, cols, i32(Hx), i32(Wx), i32(CW), i32(total))
    )
    return cols


def _gpu_avgpool2(x):
    """avgpool2 of a float32 CuPy array (N, Hx, Wx, C) in one kernel: (N, Hx/2, Wx/2, C)."""
    import cupy

    N, Hx, Wx, C = x.shape
    out = cupy.empty((N, Hx // 2, Wx // 2, C), dtype=np.float32)
    total = out.size
    i32 = np.int32
    _cuda_kernel("dynloss_avgpool2")(
        *_grid1d(total), (_kernel_array(x, np.float32), out, i32(Hx), i32(Wx), i32(C), i32(total))
    )
    return out


def _gpu_relu_avgpool2_backward(dp, h):
    """relu_avgpool2_backward for float32 CuPy arrays in one kernel: dz (N, Hx, Wx, C)."""
    import cupy

    N, Hx, Wx, C = h.shape
    dz = cupy.empty(h.shape, dtype=np.float32)
    i32 = np.int32
    args = (_kernel_array(dp, np.float32, (N, Hx // 2, Wx // 2, C)), _kernel_array(h, np.float32))
    args += (dz, i32(Hx), i32(Wx), i32(C))
    _cuda_kernel("dynloss_relu_avgpool2_backward")(*_grid1d(dz.size), args + (i32(dz.size),))
    return dz


@functools.lru_cache(maxsize=1)
def _bias_relu_kernel():
    """z <- max(z + b, 0) in place, b (C_out,) broadcast over the last axis (NaN stays NaN)."""
    import cupy

    return cupy.ElementwiseKernel(
        "T b", "T z", "z = z + b; z = z < (T)0 ? (T)0 : z;", "dynloss_bias_relu"
    )


CONV_CUDA_SOURCE = r"""
// Implicit-GEMM 3x3 SAME convolutions, NHWC float32, on TF32 tensor cores (mma.sync m16n8k8).
// Compiled with -DWARPS_M -DWARPS_N -DWM -DWN -DBK (block of WARPS_M x WARPS_N warps, each
// computing a WM x WN tile of the output, BK-deep slices of the reduction per shared-memory tile).
#define MI (WM / 16)
#define NI (WN / 8)
#define BM (WARPS_M * WM)
#define BN (WARPS_N * WN)
#define NT (WARPS_M * WARPS_N * 32)

static_assert(WM % 16 == 0 && WN % 8 == 0 && BK % 8 == 0, "warp tiles of m16n8k8 steps");
#ifndef SPLIT
#define SPLIT 0  // 1: 3xTF32, each operand split into big + small TF32 parts, three MMAs
#endif

#ifndef DYNLOSS_EMULATED_MMA  // the CPU emulator in tests/ brings its own
// float -> TF32 (round to nearest, ties away), as the bit pattern the tensor cores read
__device__ __forceinline__ unsigned tf32(float f) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
    return r;
}


// c (16x8, fp32) += a (16x8, tf32, row-major) b (8x8, tf32, column-major); lane = 4 g + t holds
// a = A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4];  b = B[t][g], B[t+4][g];
// c = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]   (PTX ISA, mma.m16n8k8 fragments)
__device__ __forceinline__ void mma_tf32(float* c, const unsigned* a, const unsigned* b) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// What a tile keeps in shared memory: TF32 bits, or (SPLIT) the float32 bits, split later
__device__ __forceinline__ uint4 stash4(float4 v) {
#if SPLIT
    return make_uint4(__float_as_uint(v.x), __float_as_uint(v.y), __float_as_uint(v.z),
                      __float_as_uint(v.w));
#else
    return make_uint4(tf32(v.x), tf32(v.y), tf32(v.z), tf32(v.w));
#endif
}

// acc += A B for one m16n8k8 step from the stashed fragments. SPLIT: v = big + small with
// big = tf32(v), small = tf32(v - big); A B ~ As Bb + Ab Bs + Ab Bb (the small x small term,
// 2^-22 relative, is dropped), which is about as accurate as float32 (3xTF32).
__device__ __forceinline__ void mma_step(float* acc, const unsigned* a, const unsigned* b) {
#if SPLIT
    unsigned ab[4], as[4], bb[2], bs[2];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        ab[e] = tf32(__uint_as_float(a[e]));
        as[e] = tf32(__uint_as_float(a[e]) - __uint_as_float(ab[e]));
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
        bb[e] = tf32(__uint_as_float(b[e]));
        bs[e] = tf32(__uint_as_float(b[e]) - __uint_as_float(bb[e]));
    }
    mma_tf32(acc, as, bb);
    mma_tf32(acc, ab, bs);
    mma_tf32(acc, ab, bb);
#else
    mma_tf32(acc, a, b);
#endif
}

// out[p, o] = epilogue(sum_{a, b, c} x[p + (a-1) W + (b-1), c] w[(3a + b) C + c, o]) over the
// output pixels p = (n, i, j) whose tap (i + a - 1, j + b - 1) lies inside the image (SAME zeros).
// x (N*H*W, C), w (9C, CO), out (N*H*W, CO), all contiguous; C % BK == 0, CO % BN == 0.
// mode 0: out = acc + bias[o];  mode 1: out = relu(acc + bias[o]);  mode 2: out = acc * (gate > 0).
// Grid (ceil(P / BM), CO / BN), NT threads.
extern "C" __global__ void __launch_bounds__(NT)
dynloss_conv3x3_igemm(const float* __restrict__ x, const float* __restrict__ w,
                      const float* __restrict__ bias, const float* __restrict__ gate,
                      float* __restrict__ out, const int N, const int H, const int W,
                      const int C, const int CO, const int mode)
{
    constexpr int LDA = BK + 4;  // rows of As: g * LDA + t hits 32 distinct banks
    constexpr int LDB = BN + 8;  // rows of Bs: t * LDB + g hits 32 distinct banks
    __shared__ __align__(16) unsigned As[BM * LDA];  // [pixel][k], stash4 bits
    __shared__ __align__(16) unsigned Bs[BK * LDB];  // [k][out channel], stash4 bits
    constexpr int AV = BK / 4, AR = NT / AV, AP = BM / AR;  // float4 loads of the A tile
    constexpr int BV = BN / 4, BR = NT / BV, BP = BK / BR;  // float4 loads of the B tile
    static_assert(NT % AV == 0 && BM % AR == 0 && NT % BV == 0 && BK % BR == 0, "tile loads");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
    const int HW = H * W;
    const long long P = (long long)N * HW;
    const long long m0 = (long long)blockIdx.x * BM;
    const int n0 = blockIdx.y * BN;
    const int ac = (tid % AV) * 4, ar = tid / AV;
    const int bc = (tid % BV) * 4, br = tid / BV;

    int pi[AP], pj[AP];  // image row and column of this thread's A rows (-4: past the end)
#pragma unroll
    for (int r = 0; r < AP; ++r) {
        const long long p = m0 + ar + r * AR;
        const int rem = (int)(p % HW);  // once per thread
        pi[r] = p < P ? rem / W : -4;
        pj[r] = p < P ? rem % W : -4;
    }
    float4 ra[AP], rb[BP];
    auto load = [&](int kt) {  // global -> registers: the k-slice kt of A (shifted x) and of w
        const int k0 = kt * BK, tap = k0 / C, c0 = k0 - tap * C;
        const int da = tap / 3 - 1, db = tap % 3 - 1;
#pragma unroll
        for (int r = 0; r < AP; ++r) {
            const int ii = pi[r] + da, jj = pj[r] + db;
            ra[r] = make_float4(0.f, 0.f, 0.f, 0.f);
            if ((unsigned)ii < (unsigned)H && (unsigned)jj < (unsigned)W)
                ra[r] = __ldg(reinterpret_cast<const float4*>(
                    x + (m0 + ar + r * AR + da * W + db) * C + c0 + ac));
        }
#pragma unroll
        for (int r = 0; r < BP; ++r)
            rb[r] = __ldg(reinterpret_cast<const float4*>(
                w + (long long)(k0 + br + r * BR) * CO + n0 + bc));
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const int KT = 9 * C / BK;
    load(0);
    for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
        for (int r = 0; r < AP; ++r)
            *reinterpret_cast<uint4*>(&As[(ar + r * AR) * LDA + ac]) = stash4(ra[r]);
#pragma unroll
        for (int r = 0; r < BP; ++r)
            *reinterpret_cast<uint4*>(&Bs[(br + r * BR) * LDB + bc]) = stash4(rb[r]);
        __syncthreads();
        if (kt + 1 < KT) load(kt + 1);  // in flight while the tensor cores work on slice kt
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned af[MI][4], bf[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i) {
                const unsigned* a = &As[(wm + i * 16 + g) * LDA + kk + t];
                af[i][0] = a[0];
                af[i][1] = a[8 * LDA];
                af[i][2] = a[4];
                af[i][3] = a[8 * LDA + 4];
            }
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const unsigned* b = &Bs[(kk + t) * LDB + wn + j * 8 + g];
                bf[j][0] = b[0];
                bf[j][1] = b[4 * LDB];
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_step(acc[i][j], af[i], bf[j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < MI; ++i) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const long long p = m0 + wm + i * 16 + g + 8 * h;
            if (p >= P) continue;
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const int o = n0 + wn + j * 8 + 2 * t;
                const long long at = p * CO + o;
                float2 v = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
                if (mode == 2) {
                    const float2 gv = __ldg(reinterpret_cast<const float2*>(gate + at));
                    v.x *= gv.x > 0.f ? 1.f : 0.f;
                    v.y *= gv.y > 0.f ? 1.f : 0.f;
                } else {
                    v.x += __ldg(bias + o);
                    v.y += __ldg(bias + o + 1);
                    if (mode == 1) {
                        v.x = v.x < 0.f ? 0.f : v.x;
                        v.y = v.y < 0.f ? 0.f : v.y;
                    }
                }
                *reinterpret_cast<float2*>(out + at) = v;
            }
        }
    }
}

// Weight gradient, one partial sum per chunk of pixels:
// part[s, (3a + b) C + c, o] = sum_{p in chunk s} x[p + (a-1) W + (b-1), c] dz[p, o]
// (taps inside the image only).
// x (N*H*W, C), dz (N*H*W, CO), part (S, 9C, CO); C % BM == 0, CO % BN == 0, chunk % BK == 0.
// Grid (9 C / BM, CO / BN, S = ceil(P / chunk)), NT threads.
extern "C" __global__ void __launch_bounds__(NT)
dynloss_conv3x3_wgrad(const float* __restrict__ x, const float* __restrict__ dz,
                      float* __restrict__ part, const int N, const int H, const int W,
                      const int C, const int CO, const int chunk)
{
    constexpr int LDA = BM + 8;  // As[k][m]: t * LDA + g hits 32 distinct banks
    constexpr int LDB = BN + 8;
    __shared__ __align__(16) unsigned As[BK * LDA];  // [pixel][in channel], stash4 bits
    __shared__ __align__(16) unsigned Bs[BK * LDB];  // [pixel][out channel], stash4 bits
    constexpr int AV = BM / 4, AR = NT / AV, AP = BK / AR;
    constexpr int BV = BN / 4, BR = NT / BV, BP = BK / BR;
    static_assert(NT % AV == 0 && BK % AR == 0 && NT % BV == 0 && BK % BR == 0, "tile loads");

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wm = (warp / WARPS_N) * WM, wn = (warp % WARPS_N) * WN;
    const int HW = H * W;
    const long long P = (long long)N * HW;
    const int mtiles = C / BM;
    const int tap = blockIdx.x / mtiles, c0 = (blockIdx.x % mtiles) * BM;
    const int da = tap / 3 - 1, db = tap % 3 - 1;
    const int n0 = blockIdx.y * BN;
    const long long p0 = (long long)blockIdx.z * chunk;
    const long long p1 = p0 + chunk < P ? p0 + chunk : P;
    const int ac = (tid % AV) * 4, ar = tid / AV;
    const int bc = (tid % BV) * 4, br = tid / BV;

    float4 ra[AP], rb[BP];
    auto load = [&](long long pb) {
#pragma unroll
        for (int r = 0; r < AP; ++r) {
            const long long p = pb + ar + r * AR;
            ra[r] = make_float4(0.f, 0.f, 0.f, 0.f);
            if (p < p1) {
                const int rem = (int)p % HW;  // P < 2^31 (checked by the caller): 32-bit division
                const int ii = rem / W + da, jj = rem % W + db;
                if ((unsigned)ii < (unsigned)H && (unsigned)jj < (unsigned)W)
                    ra[r] = __ldg(reinterpret_cast<const float4*>(
                        x + (p + da * W + db) * C + c0 + ac));
            }
        }
#pragma unroll
        for (int r = 0; r < BP; ++r) {
            const long long p = pb + br + r * BR;
            rb[r] = p < p1 ? __ldg(reinterpret_cast<const float4*>(dz + p * CO + n0 + bc))
                           : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };

    float acc[MI][NI][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const int KT = (int)((p1 - p0 + BK - 1) / BK);
    load(p0);
    for (int kt = 0; kt < KT; ++kt) {
#pragma unroll
        for (int r = 0; r < AP; ++r)
            *reinterpret_cast<uint4*>(&As[(ar + r * AR) * LDA + ac]) = stash4(ra[r]);
#pragma unroll
        for (int r = 0; r < BP; ++r)
            *reinterpret_cast<uint4*>(&Bs[(br + r * BR) * LDB + bc]) = stash4(rb[r]);
        __syncthreads();
        if (kt + 1 < KT) load(p0 + (long long)(kt + 1) * BK);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            unsigned af[MI][4], bf[NI][2];
#pragma unroll
            for (int i = 0; i < MI; ++i) {  // as in the igemm kernel, but A[m][k] = As[k][m]
                const unsigned* a = &As[(kk + t) * LDA + wm + i * 16 + g];
                af[i][0] = a[0];
                af[i][1] = a[8];
                af[i][2] = a[4 * LDA];
                af[i][3] = a[4 * LDA + 8];
            }
#pragma unroll
            for (int j = 0; j < NI; ++j) {
                const unsigned* b = &Bs[(kk + t) * LDB + wn + j * 8 + g];
                bf[j][0] = b[0];
                bf[j][1] = b[4 * LDB];
            }
#pragma unroll
            for (int i = 0; i < MI; ++i)
#pragma unroll
                for (int j = 0; j < NI; ++j) mma_step(acc[i][j], af[i], bf[j]);
        }
        __syncthreads();
    }

    float* dst = part + ((long long)blockIdx.z * 9 * C + tap * C + c0) * CO + n0;
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int j = 0; j < NI; ++j)
                *reinterpret_cast<float2*>(dst + (long long)(wm + i * 16 + g + 8 * h) * CO
                                           + wn + j * 8 + 2 * t)
                    = make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
}

// part (S, L) -> out (L,): out[l] = sum_s part[s, l], in a fixed order (deterministic).
extern "C" __global__ void dynloss_sum_parts(const float* __restrict__ part,
                                             float* __restrict__ out, const int S, const int L)
{
    const int l = blockIdx.x * blockDim.x + threadIdx.x;
    if (l >= L) return;
    float s = 0.f;
    for (int k = 0; k < S; ++k) s += part[(long long)k * L + l];
    out[l] = s;
}

// im2col without a padded copy: cols[(p * 9 + 3a + b) * CW + c] = x[p + (a-1) W + (b-1), c] for
// taps inside the image, else 0. Copies machine words of 16, 8 or 4 bytes (CW words per pixel,
// any dtype); one thread per word; 32-bit indices (total = N*H*W * 9 * CW < 2^31).
template <class Word>
__device__ __forceinline__ void im2col3x3(const Word* __restrict__ x, Word* __restrict__ cols,
                                          const int H, const int W, const int CW, const int total)
{
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    const int c = e % CW, q = e / CW, tap = q % 9, p = q / 9;
    const int da = tap / 3 - 1, db = tap % 3 - 1;
    const int rem = p % (H * W), i = rem / W + da, j = rem % W + db;
    Word v{};
    if ((unsigned)i < (unsigned)H && (unsigned)j < (unsigned)W)
        v = __ldg(x + (p + da * W + db) * CW + c);
    cols[e] = v;
}

extern "C" __global__ void dynloss_im2col3x3_16(const int4* __restrict__ x, int4* __restrict__ cols,
                                                const int H, const int W, const int CW,
                                                const int total)
{
    im2col3x3(x, cols, H, W, CW, total);
}

extern "C" __global__ void dynloss_im2col3x3_8(const int2* __restrict__ x, int2* __restrict__ cols,
                                               const int H, const int W, const int CW,
                                               const int total)
{
    im2col3x3(x, cols, H, W, CW, total);
}

extern "C" __global__ void dynloss_im2col3x3_4(const int* __restrict__ x, int* __restrict__ cols,
                                               const int H, const int W, const int CW,
                                               const int total)
{
    im2col3x3(x, cols, H, W, CW, total);
}

// Direct 3x3 SAME convolution for a few input channels (conv1, C = 3), in float32 FMAs:
// out[p, o] = [relu](bias[o] + sum_{a, b, c} x[p + (a-1) W + (b-1), c] w[(3a + b) C + c, o]).
// One thread per pixel and 4 output channels; w (9C, CO) and bias in shared memory
// ((9C + 1) CO <= DIRECT_SMEM floats); CO % 4 == 0; total = N*H*W * CO/4 < 2^31.
#define DIRECT_SMEM 4800
extern "C" __global__ void dynloss_conv3x3_direct(const float* __restrict__ x,
                                                  const float* __restrict__ w,
                                                  const float* __restrict__ bias,
                                                  float* __restrict__ out, const int H,
                                                  const int W, const int C, const int CO,
                                                  const int relu, const int total)
{
    __shared__ __align__(16) float ws[DIRECT_SMEM];
    const int nw = 9 * C * CO;
    for (int k = threadIdx.x; k < nw; k += blockDim.x) ws[k] = w[k];
    for (int k = threadIdx.x; k < CO; k += blockDim.x) ws[nw + k] = bias[k];
    __syncthreads();
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    const int G = CO / 4, o = (e % G) * 4, p = e / G;
    const int rem = p % (H * W), i = rem / W, j = rem % W;
    float4 acc = *reinterpret_cast<const float4*>(ws + nw + o);
    for (int a = 0; a < 3; ++a) {
        if ((unsigned)(i + a - 1) >= (unsigned)H) continue;
        for (int b = 0; b < 3; ++b) {
            if ((unsigned)(j + b - 1) >= (unsigned)W) continue;
            const float* xs = x + (long long)(p + (a - 1) * W + (b - 1)) * C;
            const float* wt = ws + (3 * a + b) * C * CO + o;
            for (int c = 0; c < C; ++c) {
                const float v = __ldg(xs + c);
                const float4 wv = *reinterpret_cast<const float4*>(wt + c * CO);
                acc.x = fmaf(v, wv.x, acc.x);
                acc.y = fmaf(v, wv.y, acc.y);
                acc.z = fmaf(v, wv.z, acc.z);
                acc.w = fmaf(v, wv.w, acc.w);
            }
        }
    }
    if (relu) {
        acc.x = acc.x < 0.f ? 0.f : acc.x;
        acc.y = acc.y < 0.f ? 0.f : acc.y;
        acc.z = acc.z < 0.f ? 0.f : acc.z;
        acc.w = acc.w < 0.f ? 0.f : acc.w;
    }
    *reinterpret_cast<float4*>(out + (long long)p * CO + o) = acc;
}

// The weighted cross-entropy of eq. (1) for one network and its gradient, one thread per
// sample n (log-softmax shifted by the row maximum, as dynloss.log_softmax):
// loss[n] = gamma[y_n] (logsumexp(z_n) - z_n[y_n]) / N;
// dz[n, k] = gamma[y_n] (softmax(z_n)_k - [k == y_n]) / N.  z, dz (N, K); y (N,) int64.
template <class T>
__device__ __forceinline__ void ce_rows(const T* __restrict__ z, const long long* __restrict__ y,
                                        const T* __restrict__ gamma, T* __restrict__ loss,
                                        T* __restrict__ dz, const int N, const int K)
{
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    const T* zn = z + (long long)n * K;
    T m = zn[0];
    for (int k = 1; k < K; ++k) m = zn[k] > m ? zn[k] : m;
    T s = 0;
    for (int k = 0; k < K; ++k) s += exp(zn[k] - m);
    const T lse = m + log(s);
    const int yn = (int)y[n];
    const T w = gamma[yn] / (T)N;
    loss[n] = w * (lse - zn[yn]);
    for (int k = 0; k < K; ++k)
        dz[(long long)n * K + k] = w * (exp(zn[k] - lse) - (k == yn ? (T)1 : (T)0));
}

extern "C" __global__ void dynloss_ce_rows_f32(const float* __restrict__ z,
                                               const long long* __restrict__ y,
                                               const float* __restrict__ gamma,
                                               float* __restrict__ loss, float* __restrict__ dz,
                                               const int N, const int K)
{
    ce_rows(z, y, gamma, loss, dz, N, K);
}

extern "C" __global__ void dynloss_ce_rows_f64(const double* __restrict__ z,
                                               const long long* __restrict__ y,
                                               const double* __restrict__ gamma,
                                               double* __restrict__ loss, double* __restrict__ dz,
                                               const int N, const int K)
{
    ce_rows(z, y, gamma, loss, dz, N, K);
}

// 2x2 average pool, stride 2, float32 NHWC: out (N, H/2, W/2, C) from x (N, H, W, C); one thread
// per output value; 32-bit indices (total = N*H*W*C / 4 < 2^31).
extern "C" __global__ void dynloss_avgpool2(const float* __restrict__ x, float* __restrict__ out,
                                            const int H, const int W, const int C,
                                            const int total)
{
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    const int c = e % C, q = e / C, j = q % (W / 2), q2 = q / (W / 2);
    const int i = q2 % (H / 2), n = q2 / (H / 2);
    const int at = ((n * H + 2 * i) * W + 2 * j) * C + c;
    out[e] = (__ldg(x + at) + __ldg(x + at + C) + __ldg(x + at + W * C) + __ldg(x + at + W * C + C))
             * 0.25f;
}

// The gradient through h = relu(z), p = avgpool2(h): dz (N, H, W, C) = 1[h > 0] * dp / 4, with
// dp (N, H/2, W/2, C) = dF/dp; one thread per input value; 32-bit indices (total = N*H*W*C).
extern "C" __global__ void dynloss_relu_avgpool2_backward(const float* __restrict__ dp,
                                                          const float* __restrict__ h,
                                                          float* __restrict__ dz, const int H,
                                                          const int W, const int C,
                                                          const int total)
{
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= total) return;
    const int c = e % C, q = e / C, j = q % W, q2 = q / W, i = q2 % H, n = q2 / H;
    const float up = __ldg(dp + ((n * (H / 2) + i / 2) * (W / 2) + j / 2) * C + c);
    dz[e] = (__ldg(h + e) > 0.f ? 1.f : 0.f) * (0.25f * up);
}
"""
