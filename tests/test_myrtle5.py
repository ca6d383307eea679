"""Myrtle5: layers and the loss against central differences, the exact HVP, Lanczos, shapes.

Every check runs in float64 on tiny images (8x8, c = 2-4, N = 2-3). Backend-parametrized tests
run on NumPy and, where CuPy finds a GPU, on CuPy (marked ``gpu``), each through three
implementations: the reference (models.py's plain layers, xp-generic), the fused copy on its
NumPy table (fast/myrtle5.py) and on fast/layers.py's table (our CUDA kernels on CuPy, the NumPy
table otherwise). The central differences are always taken on the host in NumPy, so every case
checks its layers against the same reference; a plain loop over output pixels is the oracle of
the im2col convolution.
"""

import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.sparse.linalg import LinearOperator, eigsh

import models
import spectra
from dynloss import class_weights, to_device
from fast import gpu
from fast import myrtle5 as fused
from fast.layers import GPU_LAYERS
from models import (
    MYRTLE5_PARAM_NAMES,
    avgpool2_backward,
    avgpool2_forward,
    conv3x3_backward,
    conv3x3_forward,
    dense_forward,
    global_avgpool_forward,
    im2col3x3,
    init_myrtle5,
    myrtle5_flatten,
    myrtle5_forward,
    myrtle5_hvp,
    myrtle5_hvp_operator,
    myrtle5_loss_and_grads,
    myrtle5_unflatten,
    relu_backward,
    relu_forward,
)

FD_STEP = 1e-6  # central-difference step in float64 (truncation ~h^2, rounding ~eps/h: both tiny)
GRAD_RTOL = 1e-6  # relative error allowed between analytic and central-difference derivatives
KINK = 1e-4  # |pre-activation| margin: a step of FD_STEP moves any z by far less than this, so
# no central difference crosses a ReLU kink (the fixed seeds are checked to satisfy it)
SYM_RTOL = 1e-12  # asymmetry of the HVP-built Hessian: exact up to float64 rounding
EIG_RTOL = 1e-6  # Lanczos top eigenvalues against eigh of the finite-difference Hessian
MAX_FD_COORDS = 60  # larger arrays are checked on this many random coordinates
INIT_STD_SIGMAS = 6  # the sample std of n normal draws has relative std 1/sqrt(2n): allow 6 of them
A_DYN, T_DYN, T_NOW = 20.0, 10, 13  # a dynamical loss with A > 1, mid-period: gamma non-uniform
REPO = Path(__file__).resolve().parents[1]

BACKENDS = ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def xp(request):
    """The array module of the backend under test; the CuPy case skips cleanly without a GPU."""
    if request.param == "numpy":
        return np
    cupy = pytest.importorskip("cupy")
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # CUDA driver missing or broken
        n_gpus = 0
    if n_gpus < 1:
        pytest.skip("CuPy is installed but finds no GPU")
    return cupy


@pytest.fixture(params=["reference", "fused", "gpu table"])
def L(request):
    """The layers under test: models.py's plain ones (the module), fast/myrtle5.py's NumPy table,
    or fast/layers.py's table."""
    return {"reference": models, "fused": fused.CPU_LAYERS, "gpu table": GPU_LAYERS}[request.param]


@pytest.fixture(params=["fused", "gpu table"])
def F(request):
    """The fused tables only (their fused layers have no plain counterpart of the same name)."""
    return fused.CPU_LAYERS if request.param == "fused" else GPU_LAYERS


def net_of(L):
    """The network on the layers L: models.py itself, or fast/myrtle5.py on the table L."""
    if L is models:
        return models
    return SimpleNamespace(
        myrtle5_loss_and_grads=partial(fused.myrtle5_loss_and_grads, layers=L),
        myrtle5_hvp=partial(fused.myrtle5_hvp, layers=L),
        nesterov_step=L.nesterov_step,
    )


def host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def rel_err(a, b):
    a, b = host(a), host(b)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-300)


def sample_coords(shape, rng):
    """Every index of an array of ``shape``, or MAX_FD_COORDS random ones when it is larger."""
    size = int(np.prod(shape))
    flat = np.arange(size) if size <= MAX_FD_COORDS else rng.choice(size, MAX_FD_COORDS, False)
    return [np.unravel_index(i, shape) for i in flat]


def fd_check(f, arr, analytic, rng):
    """Central differences of the scalar f() in the entries of ``arr`` (host, edited in place)
    against ``analytic`` at sampled coordinates; returns the relative error."""
    coords = sample_coords(arr.shape, rng)
    numeric = np.empty(len(coords))
    for i, idx in enumerate(coords):
        old = arr[idx]
        arr[idx] = old + FD_STEP
        fp = f()
        arr[idx] = old - FD_STEP
        fm = f()
        arr[idx] = old
        numeric[i] = (fp - fm) / (2 * FD_STEP)
    analytic = host(analytic)
    return rel_err(np.array([analytic[idx] for idx in coords]), numeric)


def tiny_problem(seed, c=3, N=3, side=8):
    """Host float64 params with non-zero biases (a dead patch then gives z = b, away from the
    kink), random images and labels, and the gamma of a dynamical loss with A > 1."""
    rng = np.random.default_rng(seed)
    params = init_myrtle5(rng, c=c)
    for k in MYRTLE5_PARAM_NAMES:
        if k.startswith("b"):
            params[k] = rng.normal(0.0, 0.1, size=params[k].shape)
    x = rng.normal(size=(N, side, side, 3))
    y = rng.integers(0, 10, size=N)
    gamma = class_weights(T_NOW, A_DYN, T_DYN, 10)  # (K,)
    assert gamma.max() / gamma.min() > 2.0  # the weights really are tilted
    return params, x, y, gamma


def min_abs_preactivation(params, x):
    """min |z| over the four conv layers' pre-activations (the ReLU kinks)."""
    P, a, smallest = params, x, np.inf
    for layer in (1, 2, 3, 4):
        z, _ = conv3x3_forward(a, P[f"W{layer}"], P[f"b{layer}"])
        smallest = min(smallest, np.abs(z).min())
        a, _ = relu_forward(z)
        if layer in (2, 3):
            a, _ = avgpool2_forward(a)
    return smallest


def loss_value(params, x, y, gamma, loss):
    return float(myrtle5_loss_and_grads(params, x, y, gamma, loss)[0])


def grad_vector(params, x, y, gamma, loss):
    return myrtle5_flatten(myrtle5_loss_and_grads(params, x, y, gamma, loss)[1])


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def conv_reference(x, W, b):
    """Direct SAME 3x3 cross-correlation: out[n,i,j,o] = sum xpad[n,i+a,j+b,c] W[a,b,c,o] + b."""
    N, Hx, Wx, _ = x.shape
    xpad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((N, Hx, Wx, W.shape[3])) + b
    for a in range(3):
        for bb in range(3):
            out += np.einsum("nijc,co->nijo", xpad[:, a : a + Hx, bb : bb + Wx], W[a, bb])
    return out


@pytest.mark.parametrize(
    "dtype, C",
    [(np.float32, 4), (np.float32, 2), (np.float32, 3), (np.float64, 2), (np.float64, 1)],
)
def test_im2col_copies_the_exact_patches(xp, dtype, C):
    """im2col moves bytes in the widest words that tile a pixel (complex128, float64, ...):
    the patches must be bit-identical to the padded input's, for every word size."""
    x = np.random.default_rng(0).normal(size=(2, 4, 6, C)).astype(dtype)
    x_dev = xp.asarray(x)[:, :, ::-1]  # a non-contiguous input is accepted too
    xpad = np.pad(x[:, :, ::-1], ((0, 0), (1, 1), (1, 1), (0, 0)))
    expected = np.stack(
        [xpad[:, a : a + 4, b : b + 6] for a in range(3) for b in range(3)], axis=3
    ).reshape(2 * 4 * 6, 9 * C)
    for im2col in [im2col3x3] + ([gpu.im2col3x3] if gpu.im2col_applies(x_dev) else []):
        cols = im2col(x_dev)
        assert cols.dtype == dtype and cols.shape == expected.shape
        assert np.array_equal(host(cols), expected)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3, 4), (1, 4, 6, 2, 3)])
def test_conv3x3_value_and_gradients(xp, L, shape):
    N, Hx, Wx, C, C_out = shape
    rng = np.random.default_rng(1)
    x, W, b = (
        rng.normal(size=(N, Hx, Wx, C)),
        rng.normal(size=(3, 3, C, C_out)),
        rng.normal(size=C_out),
    )
    dout = rng.normal(size=(N, Hx, Wx, C_out))
    out, cache = L.conv3x3_forward(xp.asarray(x), xp.asarray(W), xp.asarray(b))
    assert rel_err(out, conv_reference(x, W, b)) < 1e-13  # same sums, other order
    dx, dW, db = L.conv3x3_backward(xp.asarray(dout), cache)
    assert dx.shape == x.shape and dW.shape == W.shape and db.shape == b.shape
    f = lambda: np.sum(conv3x3_forward(x, W, b)[0] * dout)
    assert fd_check(f, x, dx, rng) < GRAD_RTOL
    assert fd_check(f, W, dW, rng) < GRAD_RTOL
    assert fd_check(f, b, db, rng) < GRAD_RTOL
    none, dW2, _ = L.conv3x3_backward(xp.asarray(dout), cache, need_dx=False)
    assert none is None and rel_err(dW2, dW) == 0.0
    assert rel_err(L.conv3x3_input_grad(xp.asarray(dout), xp.asarray(W)), dx) < 1e-13


def test_the_im2col_convolution_equals_a_loop_over_output_pixels():
    """The oracle of the im2col convolution: one output pixel at a time, nine taps each."""
    rng = np.random.default_rng(21)
    x, W, b = rng.normal(size=(2, 5, 4, 3)), rng.normal(size=(3, 3, 3, 2)), rng.normal(size=2)
    N, Hx, Wx, C = x.shape
    xpad = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    loop = np.empty((N, Hx, Wx, W.shape[3]))
    for n in range(N):
        for i in range(Hx):
            for j in range(Wx):
                for o in range(W.shape[3]):
                    patch = xpad[n, i : i + 3, j : j + 3, :]  # (3, 3, C) around pixel (i, j)
                    loop[n, i, j, o] = np.sum(patch * W[:, :, :, o]) + b[o]
    assert rel_err(conv3x3_forward(x, W, b)[0], loop) < 1e-14


def test_fused_conv_layers_equal_their_plain_compositions(xp, F):
    rng = np.random.default_rng(22)
    x, W, b = rng.normal(size=(2, 8, 8, 3)), rng.normal(size=(3, 3, 3, 4)), rng.normal(size=4)
    dout = rng.normal(size=(2, 8, 8, 4))
    z, cache = F.conv3x3_forward(xp.asarray(x), xp.asarray(W), xp.asarray(b))
    h, (_, relu_cache) = F.conv3x3_relu_forward(xp.asarray(x), xp.asarray(W), xp.asarray(b))
    assert rel_err(h, relu_forward(conv3x3_forward(x, W, b)[0])[0]) < 1e-13
    V = rng.normal(size=W.shape)  # the R-operator's conv of the cached input with another kernel
    assert rel_err(F.conv3x3_cached_forward(cache, xp.asarray(V)), conv_reference(x, V, 0)) < 1e-13
    # relu -> conv backward: the input gradient times the ReLU's mask of the layer below
    hx = np.maximum(x, 0.0)
    _, hcache = F.conv3x3_forward(xp.asarray(hx), xp.asarray(W), xp.asarray(b))
    dz, dWh, dbh = F.relu_conv3x3_backward(xp.asarray(dout), xp.asarray(hx), hcache)
    dh, dWr, dbr = conv3x3_backward(dout, conv3x3_forward(hx, W, b)[1])
    assert rel_err(dz, relu_backward(dh, hx)) < 1e-13 and rel_err(dWh, dWr) < 1e-13
    assert rel_err(dbh, dbr) < 1e-13  # a GEMV against a sum: the same numbers, another order


def test_pools_and_dense_gradients(xp, L):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 8, 6, 3))
    d_pool = rng.normal(size=(2, 4, 3, 3))
    out, cache = L.avgpool2_forward(xp.asarray(x))
    assert rel_err(out, x.reshape(2, 4, 2, 3, 2, 3).mean(axis=(2, 4))) < 1e-15
    f = lambda: np.sum(avgpool2_forward(x)[0] * d_pool)
    assert fd_check(f, x, avgpool2_backward(xp.asarray(d_pool), cache), rng) < GRAD_RTOL

    d_gap = rng.normal(size=(2, 3))
    _, cache = L.global_avgpool_forward(xp.asarray(x))
    f = lambda: np.sum(global_avgpool_forward(x)[0] * d_gap)
    assert fd_check(f, x, L.global_avgpool_backward(xp.asarray(d_gap), cache), rng) < GRAD_RTOL

    g, W, b = rng.normal(size=(3, 4)), rng.normal(size=(4, 5)), rng.normal(size=5)
    d_dense = rng.normal(size=(3, 5))
    _, cache = L.dense_forward(xp.asarray(g), xp.asarray(W), xp.asarray(b))
    dg, dW, db = L.dense_backward(xp.asarray(d_dense), cache)
    f = lambda: np.sum(dense_forward(g, W, b)[0] * d_dense)
    for arr, analytic in ((g, dg), (W, dW), (b, db)):
        assert fd_check(f, arr, analytic, rng) < GRAD_RTOL


def test_fused_relu_pool_backward_equals_the_composition(xp, F):
    rng = np.random.default_rng(14)
    h, _ = relu_forward(xp.asarray(rng.normal(size=(2, 8, 6, 3))))
    dp = xp.asarray(rng.normal(size=(2, 4, 3, 3)))
    one_pass = F.relu_avgpool2_backward(dp, h.shape, h)
    assert rel_err(one_pass, relu_backward(avgpool2_backward(dp, h.shape), h)) == 0.0


def test_global_pool_is_three_2x2_pools_at_8x8():
    """neural-tangents pools 8x8 -> 1x1 by three 2x2 average pools: the same as the global mean."""
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 4))
    p = x
    for _ in range(3):
        p, _ = avgpool2_forward(p)
    assert rel_err(p[:, 0, 0, :], global_avgpool_forward(x)[0]) < 1e-15


# ---------------------------------------------------------------------------------------------
# The whole network
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_myrtle5_loss_gradient_matches_central_differences(xp, L, loss):
    params, x, y, gamma = tiny_problem(seed=4)
    assert min_abs_preactivation(params, x) > KINK
    F, grads, logits = net_of(L).myrtle5_loss_and_grads(
        to_device(params, xp), xp.asarray(x), xp.asarray(y), xp.asarray(gamma), loss
    )
    assert logits.shape == (3, 10) and F.shape == ()
    rng = np.random.default_rng(5)
    for k in MYRTLE5_PARAM_NAMES:
        assert grads[k].shape == params[k].shape
        f = lambda: loss_value(params, x, y, gamma, loss)
        assert fd_check(f, params[k], grads[k], rng) < GRAD_RTOL, k


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_hvp_matches_central_differences_of_the_gradient(xp, L, loss):
    params, x, y, gamma = tiny_problem(seed=6, c=4, N=2)
    assert min_abs_preactivation(params, x) > KINK
    theta = myrtle5_flatten(params)
    v = np.random.default_rng(7).normal(size=theta.shape)
    dev = to_device(params, xp)
    Hv = net_of(L).myrtle5_hvp(dev, *(xp.asarray(a) for a in (x, y, gamma, v)), loss)
    g = lambda t: grad_vector(myrtle5_unflatten(t, params), x, y, gamma, loss)
    fd = (g(theta + FD_STEP * v) - g(theta - FD_STEP * v)) / (2 * FD_STEP)
    assert Hv.shape == theta.shape
    assert rel_err(Hv, fd) < GRAD_RTOL


@pytest.fixture(scope="module")
def dense_hessians():
    """Tiny net (c = 2, 8x8, N = 2, P = 200): the Hessian from central differences of the
    analytic gradient, the HVP applied to the identity, and the HVP operator."""
    params, x, y, gamma = tiny_problem(seed=8, c=2, N=2)
    assert min_abs_preactivation(params, x) > KINK
    theta = myrtle5_flatten(params)
    P = theta.size
    g = lambda t: grad_vector(myrtle5_unflatten(t, params), x, y, gamma, "ce")
    H_fd = np.empty((P, P))
    for i in range(P):
        e = np.zeros(P)
        e[i] = FD_STEP
        H_fd[:, i] = (g(theta + e) - g(theta - e)) / (2 * FD_STEP)
    matvec = myrtle5_hvp_operator(params, x, y, gamma, "ce")
    H_hvp = np.stack([matvec(col) for col in np.eye(P)], axis=1)
    return H_fd, H_hvp, matvec


def test_dense_hessian_symmetric_and_equal_to_hvp_columns(dense_hessians):
    H_fd, H_hvp, _ = dense_hessians
    assert H_fd.shape == (200, 200)
    assert rel_err(H_fd, H_fd.T) < GRAD_RTOL  # finite differences: symmetric to their accuracy
    assert rel_err(H_hvp, H_hvp.T) < SYM_RTOL  # the R-operator Hessian: exactly symmetric
    assert rel_err(H_hvp, H_fd) < GRAD_RTOL


def test_lanczos_top_eigenvalues_match_eigh(dense_hessians):
    H_fd, _, matvec = dense_hessians
    P = H_fd.shape[0]
    op = LinearOperator((P, P), matvec=matvec, dtype=np.float64)
    lanczos = np.sort(eigsh(op, k=3, which="LA", v0=np.ones(P), return_eigenvectors=False))[::-1]
    exact = np.linalg.eigvalsh(0.5 * (H_fd + H_fd.T))[::-1][:3]
    assert lanczos[0] > 0
    assert rel_err(lanczos, exact) < EIG_RTOL


def test_spectra_top_eigs_on_the_myrtle5_hvp(dense_hessians):
    """spectra.top_eigs (generic eigsh 'LA' wrapper) plugs straight into the Myrtle5 HVP."""
    H_fd, _, matvec = dense_hessians
    vals, vecs = spectra.top_eigs(matvec, H_fd.shape[0], n_eig=2)
    exact = np.linalg.eigvalsh(0.5 * (H_fd + H_fd.T))[::-1][:2]
    assert rel_err(vals, exact) < EIG_RTOL
    assert vecs.shape == (H_fd.shape[0], 2)


# ---------------------------------------------------------------------------------------------
# Shapes, dtypes, init, flatten, the Nesterov step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("c, side_h, side_w", [(1, 8, 8), (5, 16, 24), (2, 32, 32)])
def test_any_width_and_image_size_divisible_by_8(c, side_h, side_w):
    rng = np.random.default_rng(9)
    params = init_myrtle5(rng, c=c)
    x = rng.normal(size=(2, side_h, side_w, 3))
    logits, _ = myrtle5_forward(x, params)
    assert logits.shape == (2, 10)
    P = myrtle5_flatten(params).size
    assert P == 27 * c + 27 * c**2 + 4 * c + 10 * c + 10


@pytest.mark.parametrize("side_h, side_w", [(12, 12), (8, 12), (4, 4)])
def test_image_size_not_divisible_by_8_raises(side_h, side_w):
    params = init_myrtle5(0, c=2)
    with pytest.raises(ValueError, match="divisible by 8"):
        myrtle5_forward(np.zeros((1, side_h, side_w, 3)), params)


def test_float32_stays_float32(xp, L):
    """The GPU trains in float32: a float64 gamma must not promote logits, loss or grads."""
    params, x, y, gamma = tiny_problem(seed=10)
    p32 = to_device({k: v.astype(np.float32) for k, v in params.items()}, xp)
    F, grads, logits = net_of(L).myrtle5_loss_and_grads(
        p32, xp.asarray(x, dtype=np.float32), xp.asarray(y), gamma
    )
    assert logits.dtype == np.float32 and F.dtype == np.float32
    assert all(grads[k].dtype == np.float32 for k in MYRTLE5_PARAM_NAMES)


def test_init_scale_order_and_seed():
    params = init_myrtle5(np.random.default_rng(11), c=64)
    assert tuple(params) == MYRTLE5_PARAM_NAMES
    for k, fan_in in (("W1", 27), ("W2", 576), ("W4", 576), ("W5", 64)):
        tol = INIT_STD_SIGMAS / np.sqrt(2 * params[k].size)
        assert abs(params[k].std() / np.sqrt(2.0 / fan_in) - 1) < tol, k
    assert all(not params[f"b{i}"].any() for i in range(1, 6))
    again = init_myrtle5(11, c=64)
    assert all(np.array_equal(params[k], again[k]) for k in MYRTLE5_PARAM_NAMES)
    assert init_myrtle5(0, c=2, dtype=np.float32)["W3"].dtype == np.float32


def test_flatten_round_trip():
    params = init_myrtle5(12, c=3)
    theta = myrtle5_flatten(params)
    back = myrtle5_unflatten(theta, params)
    assert theta.shape == (27 * 3 + 27 * 9 + 12 + 30 + 10,)
    assert all(np.array_equal(back[k], params[k]) for k in MYRTLE5_PARAM_NAMES)
    assert theta[: params["W1"].size].reshape(params["W1"].shape).tolist() == params["W1"].tolist()


def test_nesterov_step_is_pytorchs_recursion(xp, L):
    """torch.optim.SGD(nesterov=True): buf = g (step 1), buf = m buf + g; p -= lr (g + m buf)."""
    rng = np.random.default_rng(13)
    p0, gs = rng.normal(size=(2, 3)), rng.normal(size=(3, 2, 3))
    lr, m = 0.05, 0.9
    params, velocity = to_device({"W": p0}, xp), to_device({"W": np.zeros((2, 3))}, xp)
    W_before = params["W"]
    expected, buf = p0.copy(), None
    for g in gs:
        buf = g.copy() if buf is None else m * buf + g
        expected -= lr * (g + m * buf)
        net_of(L).nesterov_step(params, {"W": xp.asarray(g)}, velocity, lr, momentum=m)
    assert params["W"] is W_before  # updated in place
    assert rel_err(params["W"], expected) < 1e-14
    assert rel_err(velocity["W"], buf) < 1e-14
    theta, v = xp.asarray(p0.copy()), xp.zeros((2, 3))
    net_of(L).nesterov_step(theta, xp.asarray(gs[0]), v, lr, momentum=m)  # plain arrays work too
    assert rel_err(theta, p0 - lr * (1 + m) * gs[0]) < 1e-14


# ---------------------------------------------------------------------------------------------
# The scripts (CI runs them on the CPU)
# ---------------------------------------------------------------------------------------------


def test_benchmark_tiny_and_gpu_check_run_on_the_cpu():
    bench = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_myrtle5.py"), "--tiny"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bench.returncode == 0, bench.stderr
    assert "ms/step" in bench.stdout
    check = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check_myrtle5.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "PASS" in check.stdout or "skipped: no CuPy/GPU" in check.stdout


def test_the_tables_share_their_names_and_the_fused_copy_is_the_reference():
    """fast/layers.py's table has the names of fast/myrtle5.py's NumPy table and on NumPy arrays
    is it, bit for bit (the CUDA kernels: tests/test_igemm.py); the fused network equals the
    reference to float64 rounding (its bias sums are GEMVs)."""
    assert vars(GPU_LAYERS).keys() == vars(fused.CPU_LAYERS).keys()
    params, x, y, gamma = tiny_problem(seed=15)
    cpu = fused.myrtle5_loss_and_grads(params, x, y, gamma)
    gpu_table = fused.myrtle5_loss_and_grads(params, x, y, gamma, layers=GPU_LAYERS)
    assert float(cpu[0]) == float(gpu_table[0])
    assert all(np.array_equal(cpu[1][k], gpu_table[1][k]) for k in MYRTLE5_PARAM_NAMES)
    ref = myrtle5_loss_and_grads(params, x, y, gamma)
    assert rel_err(myrtle5_flatten(cpu[1]), myrtle5_flatten(ref[1])) < 1e-13
    v = np.random.default_rng(16).normal(size=myrtle5_flatten(params).shape)
    hv = [
        fused.myrtle5_hvp(params, x, y, gamma, v, layers=t) for t in (fused.CPU_LAYERS, GPU_LAYERS)
    ]
    assert np.array_equal(*hv)
    assert rel_err(hv[0], myrtle5_hvp(params, x, y, gamma, v)) < 1e-13


def test_models_imports_no_gpu_code():
    """models.py is the reference: no import of the fast path, no GPU branch."""
    source = (REPO / "models.py").read_text()
    assert "import gpu" not in source and "from fast" not in source and "cupy" not in source
