"""The Myrtle5 layer table of the GPU: fast/myrtle5.py's CPU_LAYERS with our CUDA kernels where
they apply.

fast/myrtle5.py's network calls its layers through a table (``layers=``); this module builds the
table with the same names and signatures (cs231n's ``fast_layers``). Each entry below hands its
arrays to a kernel of fast/gpu.py when the kernel applies (CuPy arrays of the dtypes and shapes
it is written for) and to the NumPy/CuPy layers of fast/myrtle5.py otherwise, so the table is
correct for any input; on NumPy arrays it is CPU_LAYERS. fast/myrtle5.net_for is the one place
where a command picks its table. tests/test_igemm.py and tests/test_myrtle5.py check every
kernel and every entry against the reference (on a GPU through CuPy, without one through the
CPU emulator of the kernels).
"""

from __future__ import annotations

from types import SimpleNamespace

import models
from dynloss import get_array_module
from fast import gpu
from fast import myrtle5 as fused


def conv3x3_forward(x, W, b):
    """models.conv3x3_forward; the cache's cols is None where the kernel never writes them."""
    if gpu.conv_applies(x, W):
        return gpu.conv3x3_forward(x, W, b)
    return models.conv3x3_forward(x, W, b)


def conv3x3_relu_forward(x, W, b):
    """fast/myrtle5.conv3x3_relu_forward, with the bias and the ReLU fused into the kernel."""
    if gpu.conv_applies(x, W):
        return gpu.conv3x3_relu_forward(x, W, b)
    return fused.conv3x3_relu_forward(x, W, b)


def conv3x3_backward(dout, cache, need_dx=True):
    """fast/myrtle5.conv3x3_backward."""
    x, W, _ = cache
    if gpu.conv_applies(x, W):
        return gpu.conv3x3_backward(dout, cache, need_dx)
    return fused.conv3x3_backward(dout, cache, need_dx)


def relu_conv3x3_backward(dout, relu_cache, conv_cache):
    """fast/myrtle5.relu_conv3x3_backward, the ReLU's mask applied in the input-gradient kernel."""
    x, W, _ = conv_cache
    if gpu.conv_applies(x, W):
        return gpu.conv3x3_backward(dout, conv_cache, True, gate=relu_cache)
    return fused.relu_conv3x3_backward(dout, relu_cache, conv_cache)


def conv3x3_input_grad(dout, W):
    """models.conv3x3_input_grad: the SAME conv of dout with the flipped kernel."""
    if gpu.conv_applies(dout, W):
        return gpu.conv3x3_forward(dout, gpu.flipped_kernel(W), None)[0]
    return models.conv3x3_input_grad(dout, W)


def conv3x3_cached_forward(cache, V):
    """fast/myrtle5.conv3x3_cached_forward; where the kernels kept no cols, the conv again."""
    a, _, cols = cache
    if cols is None:
        xp = get_array_module(a)
        return conv3x3_forward(a, V, xp.zeros(V.shape[3], dtype=V.dtype))[0]
    return fused.conv3x3_cached_forward(cache, V)


def avgpool2_forward(x):
    """models.avgpool2_forward (which refuses odd sides) in one kernel for float32."""
    if gpu.pool_applies(x) and x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0:
        return gpu.avgpool2_forward(x)
    return models.avgpool2_forward(x)


def relu_avgpool2_backward(dout, pool_cache, relu_cache):
    """fast/myrtle5.relu_avgpool2_backward in one kernel for float32."""
    if gpu.pool_applies(dout, relu_cache):
        return gpu.relu_avgpool2_backward(dout, pool_cache, relu_cache)
    return fused.relu_avgpool2_backward(dout, pool_cache, relu_cache)


def dense_backward(dout, cache):
    """fast/myrtle5.dense_backward (a copy of its one line) with the column sum as one GEMV
    against a cached ones vector (gpu.column_sums); tied to it by tests/test_myrtle5.py on a
    GPU."""
    x, W = cache
    if gpu.handles(dout):
        return dout @ W.T, x.T @ dout, gpu.column_sums(dout)
    return fused.dense_backward(dout, cache)


def loss_on_batch(logits, y, gamma, loss="ce"):
    """models.loss_on_batch: eq. (1) and its gradient in one kernel for the cross-entropy."""
    if gpu.ce_applies(logits, loss):
        return gpu.ce_loss(logits, y, gamma)
    return models.loss_on_batch(logits, y, gamma, loss)


def nesterov_step(params, grads, velocity, lr, momentum=models.NESTEROV_MOMENTUM):
    """models.nesterov_step, the two lines of each array in one kernel."""
    if not isinstance(params, dict) or not gpu.handles(*params.values()):
        return models.nesterov_step(params, grads, velocity, lr, momentum)
    for k, theta in params.items():
        gpu.nesterov_update(grads[k], lr, momentum, theta, velocity[k])


GPU_LAYERS = SimpleNamespace(
    **{
        **vars(fused.CPU_LAYERS),
        "conv3x3_forward": conv3x3_forward,
        "conv3x3_relu_forward": conv3x3_relu_forward,
        "conv3x3_backward": conv3x3_backward,
        "relu_conv3x3_backward": relu_conv3x3_backward,
        "conv3x3_input_grad": conv3x3_input_grad,
        "conv3x3_cached_forward": conv3x3_cached_forward,
        "avgpool2_forward": avgpool2_forward,
        "relu_avgpool2_backward": relu_avgpool2_backward,
        "dense_backward": dense_backward,
        "loss_on_batch": loss_on_batch,
        "nesterov_step": nesterov_step,
    }
)
