"""The hand-written MLP: gradients against central differences, initialisations, flatten."""

import numpy as np
import pytest

from dynloss import class_weights
from models import (
    affine_backward,
    affine_forward,
    flatten,
    init_mlp,
    mlp_loss_and_grads,
    relu_backward,
    relu_forward,
    unflatten,
)

FD_STEP = 1e-6  # central-difference step in float64
GRAD_RTOL = 1e-6  # relative error allowed between analytic and central-difference gradients
KINK = 1e-3  # pre-activations closer than this to 0 would make central differences cross the kink


def rel_err(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-300)


def numeric_grad(f, x):
    """Central differences of the scalar f() with respect to every entry of x (edited in place)."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + FD_STEP
        fp = f()
        x[idx] = old - FD_STEP
        fm = f()
        x[idx] = old
        g[idx] = (fp - fm) / (2 * FD_STEP)
    return g


def test_affine_and_relu_layers_with_upstream_gradient():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 4))
    W = rng.normal(size=(2, 4, 3))
    b = rng.normal(size=(2, 3))
    dout = rng.normal(size=(2, 5, 3))
    out, cache = affine_forward(x, W, b)
    dx, dW, db = affine_backward(dout, cache)
    f = lambda: np.sum(affine_forward(x, W, b)[0] * dout)
    assert rel_err(dx, numeric_grad(f, x)) < GRAD_RTOL
    assert rel_err(dW, numeric_grad(f, W)) < GRAD_RTOL
    assert rel_err(db, numeric_grad(f, b)) < GRAD_RTOL

    z = rng.normal(size=(2, 5, 4))
    assert np.abs(z).min() > KINK
    h, c = relu_forward(z)
    dh = rng.normal(size=z.shape)
    fz = lambda: np.sum(relu_forward(z)[0] * dh)
    assert rel_err(relu_backward(dh, c), numeric_grad(fz, z)) < GRAD_RTOL


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("M,A,T,t", [(1, 1.0, 10, 5), (2, 10.0, 50, 30), (3, 70.0, 5000, 4000)])
def test_mlp_gradients_match_central_differences(loss, M, A, T, t):
    rng = np.random.default_rng(10 * M + t)
    N, D, H, K = 12, 2, 6, 3
    params = init_mlp(range(M), D, H, K, init="glorot")
    X = rng.normal(size=(N, D))
    while np.abs(X @ params["W1"] + params["b1"][:, None, :]).min() < KINK:  # keep off the kink
        X = rng.normal(size=(N, D))
    y = rng.integers(0, K, size=N)
    gamma = class_weights(t, np.full(M, A), np.full(M, T), K)
    F, grads, _ = mlp_loss_and_grads(params, X, y, gamma, loss)
    for name, p in params.items():
        f = lambda: mlp_loss_and_grads(params, X, y, gamma, loss)[0].sum()
        assert rel_err(grads[name], numeric_grad(f, p)) < GRAD_RTOL, name


def test_networks_in_a_batch_are_independent():
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(10, 2)), rng.integers(0, 3, size=10)
    params = init_mlp([5, 6, 7], 2, 8, 3)
    gamma = class_weights(11, np.array([1.0, 4.0, 9.0]), np.array([5.0, 6.0, 7.0]), 3)
    F, grads, _ = mlp_loss_and_grads(params, X, y, gamma)
    for m in range(3):
        one = {k: v[m : m + 1] for k, v in params.items()}
        Fm, gm, _ = mlp_loss_and_grads(one, X, y, gamma[m : m + 1])
        np.testing.assert_allclose(Fm[0], F[m], rtol=1e-14)
        for k in grads:
            np.testing.assert_allclose(gm[k][0], grads[k][m], rtol=1e-13, atol=1e-16)


def test_initialisation_scales_and_seed_independence():
    D, H, K = 2, 1000, 3
    p = init_mlp([0, 1], D, H, K, init="standard")
    assert p["W1"].shape == (2, D, H) and p["W2"].shape == (2, H, K)
    # W ~ N(0, 1/fan_in), biases exactly 0
    np.testing.assert_allclose(p["W2"].var(), 1 / H, rtol=0.1)
    np.testing.assert_allclose(p["W1"].var(), 1 / D, rtol=0.1)
    assert (p["b1"] == 0).all() and (p["b2"] == 0).all()
    g = init_mlp([0], D, H, K, init="glorot")
    np.testing.assert_allclose(g["W1"].var(), 2 / (D + H), rtol=0.1)
    np.testing.assert_allclose(g["b1"].std(), 0.01, rtol=0.1)
    # a network's parameters depend only on its own seed
    q = init_mlp([1], D, H, K, init="standard")
    for k in p:
        np.testing.assert_array_equal(p[k][1], q[k][0])
    with pytest.raises(ValueError, match="unknown init"):
        init_mlp([0], D, H, K, init="xavier")


def test_flatten_roundtrip():
    p = init_mlp([0, 1], 2, 4, 3, init="glorot")
    theta = flatten(p)
    assert theta.shape == (2, 2 * 4 + 4 + 4 * 3 + 3)
    back = unflatten(theta, p)
    for k in p:
        np.testing.assert_array_equal(back[k], p[k])
