"""The GPU fast path of models.py's Myrtle5: launchers of our CUDA kernels (fast/kernels/*.cu)
and the CuPy glue.

Nothing here is needed to read the math: every function has a NumPy reference in models.py (or
dynloss.py) with the same arguments and results, and fast/layers.py builds the layer table that
hands each layer to a kernel here when the kernel applies (``conv_applies`` and its siblings).
tests/test_igemm.py checks every kernel against those references: through CuPy on a GPU, and
without one by compiling fast/kernels/*.cu with nvcc and running them on the CPU
(tests/cuda_emulator.cpp).

Why our own kernels: CuPy 14 has no cuDNN. What runs where (docs/gpu.md has the measurements):

- conv3x3, float32 with TF32 (CUPY_TF32=1), input and output channels multiples of 64: the
  implicit GEMM of kernels/conv_igemm.cu. A block of ``IGEMM_TILES`` computes 128 pixels x 64
  output channels; for each 32-wide slice of the K = 9C reduction it gathers the shifted input
  pixels (zeros outside the image) and the weight rows into shared memory, rounded to TF32, and
  the warps multiply them with ``mma.sync.m16n8k8``. The epilogue adds the bias and the ReLU
  (forward), or multiplies by the ReLU mask of the layer below (input gradient: the same kernel
  with the flipped kernel). dW = cols^T dout is a second kernel: pixels split into chunks
  (``WGRAD_BLOCKS_PER_SM`` blocks per SM), one partial sum per chunk, then one fixed-order sum
  (deterministic, no atomics).
- the same with DYNLOSS_CONV=3xtf32 and TF32 off: every operand split into big = tf32(v) and
  small = tf32(v - big), three MMAs per step: float32-level accuracy (not IEEE) on tensor cores.
- conv1 (at most 4 input channels), float32: a direct float32 kernel (kernels/layers.cu).
- otherwise (float32 without TF32, float64, DYNLOSS_CONV=im2col): im2col in one kernel (no
  padded copy) and one cuBLAS GEMM, bias + ReLU in place on the GEMM output.
- float32 pools, the ReLU + pool backward pass, the weighted cross-entropy with its gradient
  (float32 and float64) and the Nesterov update: one kernel each (the host, not the GPU, is near
  the limit of a Myrtle5 step, so fewer calls matter).

Settings: DYNLOSS_CONV (auto | im2col | 3xtf32) and CUPY_TF32 are read once, by :func:`config`
(``gpu.config.cache_clear()`` makes it read them again). CuPy is imported only inside functions,
so importing this module never needs it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
IGEMM_SOURCE = KERNEL_DIR / "conv_igemm.cu"  # compiled once per tile tuple and split
LAYERS_SOURCE = KERNEL_DIR / "layers.cu"  # no compile-time parameters

CONV_METHODS = ("auto", "im2col", "3xtf32")  # the values of the DYNLOSS_CONV variable
# (warps along M, warps along N, warp tile M, warp tile N, reduction slice BK) of the two kernels
IGEMM_TILES = (4, 2, 32, 32, 32)  # output tile 128 pixels x 64 channels, 256 threads
WGRAD_TILES = (2, 4, 32, 16, 32)  # dW tile 64 x 64 over 32-pixel slices, 256 threads
TILE_NAMES = ("WARPS_M", "WARPS_N", "WM", "WN", "BK")  # the -D names of the tile tuple
WGRAD_BLOCKS_PER_SM = 8  # the dW kernel splits the pixels into this many blocks per SM
DIRECT_SMEM_FLOATS = 4800  # DIRECT_SMEM in kernels/layers.cu: room for (9C + 1) C_out weights
DIRECT_MAX_CHANNELS = 4  # the direct kernel is for conv1 (3 input channels)
IMPLICIT_CHANNELS = 64  # implicit-GEMM channel counts are multiples of this
INT32_LIMIT = 2**31 - 256  # kernels index with 32-bit ints; a margin for the last block
INT32_PIXELS = 2**31  # the fused layer kernels number the pixels (N H W) with 32-bit ints
THREADS = 256  # threads per block of the elementwise kernels
CE_THREADS = 128  # threads per block of the cross-entropy kernel (one thread per sample)
IM2COL_WORDS = (16, 8, 4)  # bytes per copied word, widest first


@dataclass(frozen=True)
class Config:
    """What the GPU dispatch reads from the environment: the DYNLOSS_CONV method and TF32."""

    conv: str
    tf32: bool


@functools.cache
def config():
    """DYNLOSS_CONV (checked: one of CONV_METHODS, default auto) and CUPY_TF32, read once."""
    method = os.environ.get("DYNLOSS_CONV", "auto")
    if method not in CONV_METHODS:
        raise ValueError(f"DYNLOSS_CONV={method!r}: expected one of {', '.join(CONV_METHODS)}")
    return Config(conv=method, tf32=os.environ.get("CUPY_TF32", "0") not in ("", "0"))


# ---------------------------------------------------------------------------------------------
# When the fast path applies
# ---------------------------------------------------------------------------------------------


def _is_cupy(a):
    return type(a).__module__.split(".")[0] == "cupy"


def handles(*arrays):
    """True if every array is a float32 or float64 CuPy array (what the kernels are written for)."""
    return all(_is_cupy(a) and a.dtype in (np.float32, np.float64) for a in arrays)


def _float32(*arrays):
    return all(_is_cupy(a) and a.dtype == np.float32 for a in arrays)


def im2col_applies(x):
    """im2col3x3 of x (N, Hx, Wx, C) as one kernel: CuPy, whole 4-byte words per pixel, and
    fewer than 2^31 words of output (32-bit indices)."""
    N, Hx, Wx, C = x.shape
    row_bytes = C * x.itemsize
    return handles(x) and row_bytes % 4 == 0 and N * Hx * Wx * 9 * row_bytes // 4 < INT32_LIMIT


def conv_applies(x, W):
    """Whether conv3x3(x, W) and its backward pass run here (all CuPy float32/float64 cases)."""
    return handles(x, W) and im2col_applies(x)


def pool_applies(*arrays):
    """The pool kernels: float32 CuPy arrays of fewer than 2^31 values."""
    return _float32(*arrays) and all(a.size < INT32_LIMIT for a in arrays)


def ce_applies(logits, loss):
    """The cross-entropy kernel: CuPy float32/float64 logits (N, K) and the "ce" loss."""
    return loss == "ce" and handles(logits)


def tile_shape(tiles):
    """(block rows BM, block columns BN, threads) of a tile tuple."""
    warps_m, warps_n, wm, wn, _ = tiles
    return warps_m * wm, warps_n * wn, 32 * warps_m * warps_n


def channels_fit_tiles(C, C_out, igemm_tiles=None, wgrad_tiles=None):
    """Both channel counts are multiples of 64 and of every tile side that divides them (the input
    gradient swaps C and C_out)."""
    igemm_tiles = igemm_tiles or IGEMM_TILES
    BM, BN, _ = tile_shape(igemm_tiles)
    BMw, BNw, _ = tile_shape(wgrad_tiles or WGRAD_TILES)
    sides = (IMPLICIT_CHANNELS, BN, igemm_tiles[4], BMw, BNw)
    return all(ch % d == 0 for ch in (C, C_out) for d in sides)


def implicit_split(x, W):
    """How conv3x3(x, W) multiplies: None = im2col + a cuBLAS GEMM; 0 = the implicit GEMM in TF32;
    1 = the implicit GEMM in 3xTF32. The implicit kernels need float32 CuPy arrays and channel
    counts that fit the tiles. Then TF32 when CUPY_TF32=1, and otherwise 3xTF32 only when
    DYNLOSS_CONV=3xtf32; DYNLOSS_CONV=im2col turns both off."""
    cfg = config()
    if cfg.conv == "im2col" or not _float32(x, W) or not channels_fit_tiles(*W.shape[2:]):
        return None
    if x.shape[0] * x.shape[1] * x.shape[2] >= INT32_PIXELS:
        return None
    if cfg.tf32:
        return 0
    return 1 if cfg.conv == "3xtf32" else None


def direct_applies(x, W):
    """The direct float32 conv kernel: float32 CuPy, at most DIRECT_MAX_CHANNELS input channels,
    C_out % 4 == 0, weights that fit DIRECT_SMEM_FLOATS; not with DYNLOSS_CONV=im2col. (There
    im2col + cuBLAS is a K = 9C <= 36 GEMM over unaligned rows.)"""
    C, C_out = W.shape[2], W.shape[3]
    return (
        config().conv != "im2col"
        and _float32(x, W)
        and C <= DIRECT_MAX_CHANNELS
        and C_out % 4 == 0
        and (9 * C + 1) * C_out <= DIRECT_SMEM_FLOATS
        and x.shape[0] * x.shape[1] * x.shape[2] * (C_out // 4) < INT32_LIMIT
    )


# ---------------------------------------------------------------------------------------------
# The layers (same arguments and results as their references in models.py)
# ---------------------------------------------------------------------------------------------


def im2col3x3(x):
    """models.im2col3x3 in one kernel, copying the widest words (16, 8 or 4 bytes) that tile a
    pixel's C values: x (N, Hx, Wx, C) -> cols (N*Hx*Wx, 9C), no padded copy."""
    import cupy

    N, Hx, Wx, C = x.shape
    row_bytes = C * x.itemsize
    word = next(w for w in IM2COL_WORDS if row_bytes % w == 0)
    CW = row_bytes // word
    total = N * Hx * Wx * 9 * CW
    cols = cupy.empty((N * Hx * Wx, 9 * C), dtype=x.dtype)
    x = _kernel_array(x, x.dtype)
    i32 = np.int32
    _layers_kernel(f"dynloss_im2col3x3_{word}")(
        *_grid1d(total), (x, cols, i32(Hx), i32(Wx), i32(CW), i32(total))
    )
    return cols


def conv3x3_forward(x, W, b):
    """models.conv3x3_forward: (out (N, Hx, Wx, C_out), cache (x, W, cols or None)); b may be
    None (no bias). cols is None where the kernel never writes it (implicit GEMM, direct)."""
    if implicit_split(x, W) is not None:
        return _implicit_conv(x, W, b), (x, W, None)
    if direct_applies(x, W) and b is not None:
        return _direct_conv(x, W, b), (x, W, None)
    cols = im2col3x3(x)  # (N*Hx*Wx, 9C)
    out = (cols @ W.reshape(-1, W.shape[3])).reshape(x.shape[:3] + (W.shape[3],))
    if b is not None:
        out += b
    return out, (x, W, cols)


def conv3x3_relu_forward(x, W, b):
    """models.conv3x3_relu_forward: h = relu(conv3x3(x, W) + b), caches ((x, W, cols), h). The
    bias and the ReLU are applied in the kernel's epilogue, or in place on the GEMM's output."""
    if implicit_split(x, W) is not None:
        h = _implicit_conv(x, W, b, relu=True)
        return h, ((x, W, None), h)
    if direct_applies(x, W):
        h = _direct_conv(x, W, b, relu=True)
        return h, ((x, W, None), h)
    h, conv_cache = conv3x3_forward(x, W, None)  # cols W, no bias yet
    _bias_relu_kernel()(b, h)  # h = max(cols W + b, 0), in place on the array just made
    return h, (conv_cache, h)


def conv3x3_backward(dout, cache, need_dx=True, gate=None):
    """models.conv3x3_backward: (dx or None, dW (3, 3, C, C_out), db (C_out,)); with ``gate``
    (the ReLU output below) dx is multiplied by 1[gate > 0] (inside the kernel when implicit)."""
    x, W, cols = cache
    C_out = W.shape[3]
    dout2 = dout.reshape(-1, C_out)  # (N*Hx*Wx, C_out)
    db = column_sums(dout2)  # (C_out,)
    split = implicit_split(x, W)
    if split is not None:
        dW = _implicit_wgrad(x, dout, W.shape, split)  # (3, 3, C, C_out)
        dx = _implicit_conv(dout, flipped_kernel(W), gate=gate) if need_dx else None
        return dx, dW, db
    if cols is None:
        cols = im2col3x3(x)
    dW = (cols.T @ dout2).reshape(W.shape)  # (3, 3, C, C_out)
    dx = None
    if need_dx:
        dx = conv3x3_forward(dout, flipped_kernel(W), None)[0]  # (N, Hx, Wx, C)
        if gate is not None:
            dx = dx * (gate > 0)
    return dx, dW, db


def flipped_kernel(W):
    """W (3, 3, C, C_out) flipped in both spatial axes, C and C_out swapped: (3, 3, C_out, C)."""
    import cupy

    return cupy.ascontiguousarray(W[::-1, ::-1].transpose(0, 1, 3, 2))


def column_sums(a):
    """a (R, C) -> (C,) as ones (R,) @ a, one GEMV with a cached ones vector. (CuPy's generic
    reduction over the leading axis of a tall (N*Hx*Wx, c) array took 12 ms against 0.08 ms on an
    H200 at batch 512, c = 64, 32x32.)"""
    return _constant(1, a.shape[0], a.dtype.str, a.device.id) @ a  # (C,)


def avgpool2_forward(x):
    """models.avgpool2_forward for float32: (N, Hx/2, Wx/2, C) in one kernel; cache x.shape."""
    import cupy

    N, Hx, Wx, C = x.shape
    out = cupy.empty((N, Hx // 2, Wx // 2, C), dtype=np.float32)
    total = out.size
    i32 = np.int32
    _layers_kernel("dynloss_avgpool2")(
        *_grid1d(total), (_kernel_array(x, np.float32), out, i32(Hx), i32(Wx), i32(C), i32(total))
    )
    return out, x.shape


def relu_avgpool2_backward(dp, pool_cache, h):
    """models.relu_avgpool2_backward for float32 in one kernel: dz (N, Hx, Wx, C)."""
    import cupy

    N, Hx, Wx, C = pool_cache
    dz = cupy.empty(h.shape, dtype=np.float32)
    i32 = np.int32
    args = (_kernel_array(dp, np.float32, (N, Hx // 2, Wx // 2, C)), _kernel_array(h, np.float32))
    args += (dz, i32(Hx), i32(Wx), i32(C))
    _layers_kernel("dynloss_relu_avgpool2_backward")(*_grid1d(dz.size), args + (i32(dz.size),))
    return dz


def ce_loss(logits, y, gamma):
    """models.loss_on_batch for "ce": F (0-d) and dF/dlogits (N, K) of eq. (1) in one kernel."""
    import cupy

    N, K = logits.shape
    z = cupy.ascontiguousarray(logits)
    y = cupy.ascontiguousarray(cupy.asarray(y), dtype=np.int64)  # labels in 0..K-1, unchecked
    gamma = cupy.ascontiguousarray(cupy.asarray(gamma), dtype=z.dtype)
    per_sample = cupy.empty(N, dtype=z.dtype)
    dz = cupy.empty((N, K), dtype=z.dtype)
    name = "dynloss_ce_rows_f32" if z.dtype == np.float32 else "dynloss_ce_rows_f64"
    args = (z, y, gamma, per_sample, dz, np.int32(N), np.int32(K))
    _layers_kernel(name)(*_grid1d(N, CE_THREADS), args)
    return per_sample.sum(), dz


def nesterov_update(g, lr, momentum, theta, v):
    """models.nesterov_step for one array, in place on theta and v: one fused kernel."""
    scalar = theta.dtype.type
    _nesterov_kernel()(g, scalar(lr), scalar(momentum), theta, v)


# ---------------------------------------------------------------------------------------------
# Kernel launchers
# ---------------------------------------------------------------------------------------------


def _implicit_conv(x, W, b=None, relu=False, gate=None):
    """conv3x3(x, W) on the tensor cores (TF32 or 3xTF32) without im2col, epilogue fused.

    x : (N, Hx, Wx, C) float32 CuPy;  W : (3, 3, C, C_out);  b : (C_out,) or None (zero)
    relu : apply max(., 0) after the bias;  gate : None or (N, Hx, Wx, C_out), then the result
    is multiplied by 1[gate > 0] instead (no bias): the input gradient times the ReLU's mask.
    Returns (N, Hx, Wx, C_out) float32.
    """
    import cupy

    split = implicit_split(x, W)
    N, Hx, Wx, C = x.shape
    C_out = W.shape[3]
    x = _kernel_array(x, np.float32)
    w = _kernel_array(W, np.float32).reshape(9 * C, C_out)  # (9C, C_out)
    out = cupy.empty((N, Hx, Wx, C_out), dtype=np.float32)
    if b is None:
        bias = _constant(0, C_out, "<f4", x.device.id)
    else:
        bias = _kernel_array(b, np.float32, (C_out,))
    mode = 2 if gate is not None else (1 if relu else 0)
    gate = out if gate is None else _kernel_array(gate, np.float32, out.shape)  # read in mode 2
    BM, BN, threads = tile_shape(IGEMM_TILES)
    grid = ((N * Hx * Wx + BM - 1) // BM, C_out // BN)
    i32 = np.int32
    _igemm_kernel("dynloss_conv3x3_igemm", IGEMM_TILES, split)(
        grid, (threads,), (x, w, bias, gate, out, i32(N), i32(Hx), i32(Wx), i32(C), i32(C_out),
                           i32(mode))
    )  # fmt: skip
    return out


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
    _layers_kernel("dynloss_conv3x3_direct")(*_grid1d(total), args)
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
    BM, BN, threads = tile_shape(WGRAD_TILES)
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
    _igemm_kernel("dynloss_conv3x3_wgrad", WGRAD_TILES, split)(
        (9 * C // BM, C_out // BN, S), (threads,),
        (_kernel_array(x, np.float32), _kernel_array(dout, np.float32, (N, Hx, Wx, C_out)), part,
         i32(N), i32(Hx), i32(Wx), i32(C), i32(C_out), i32(chunk)),
    )  # fmt: skip
    dW = cupy.empty(L, dtype=np.float32)
    _igemm_kernel("dynloss_sum_parts", WGRAD_TILES, split)(*_grid1d(L), (part, dW, i32(S), i32(L)))
    return dW.reshape(W_shape)


@functools.cache
def _igemm_module(tiles, split):
    """kernels/conv_igemm.cu compiled (NVRTC, by CuPy) for one tile tuple, TF32 or 3xTF32."""
    import cupy

    defines = tuple(f"-D{k}={int(v)}" for k, v in zip(TILE_NAMES, tiles, strict=True))
    options = ("--std=c++17", f"-DSPLIT={int(split)}") + defines
    return cupy.RawModule(code=IGEMM_SOURCE.read_text(), options=options)


@functools.cache
def _layers_module():
    """kernels/layers.cu compiled (NVRTC, by CuPy)."""
    import cupy

    return cupy.RawModule(code=LAYERS_SOURCE.read_text(), options=("--std=c++17",))


def _igemm_kernel(name, tiles, split):
    return _igemm_module(tuple(tiles), split).get_function(name)


def _layers_kernel(name):
    return _layers_module().get_function(name)


@functools.lru_cache(maxsize=64)
def _constant(value, n, dtype, device_id):
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


def _grid1d(total, threads=THREADS):
    return ((total + threads - 1) // threads,), (threads,)


@functools.lru_cache(maxsize=1)
def _bias_relu_kernel():
    """z <- max(z + b, 0) in place, b (C_out,) broadcast over the last axis (NaN stays NaN)."""
    import cupy

    return cupy.ElementwiseKernel(
        "T b", "T z", "z = z + b; z = z < (T)0 ? (T)0 : z;", "dynloss_bias_relu"
    )


@functools.lru_cache(maxsize=1)
def _nesterov_kernel():
    """theta and v of models.nesterov_step, read and written in place."""
    import cupy

    return cupy.ElementwiseKernel(
        "T g, T lr, T momentum",
        "T theta, T v",
        "v = momentum * v + g; theta -= lr * (g + momentum * v);",
        "dynloss_nesterov_step",
    )
