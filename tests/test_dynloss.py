"""The class weights of eqs. (2)-(5) and the dynamical loss of eq. (1), with its gradient."""

import numpy as np
import pytest

from dynloss import accuracy, class_weights, cross_entropy, loss_backward, loss_forward

FD_STEP = 1e-6  # central-difference step in float64
GRAD_RTOL = 1e-6  # relative error allowed between analytic and central-difference gradients
EXACT = 1e-12  # for identities that hold to rounding


def rel_err(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a)), np.max(np.abs(b)), 1e-300)


@pytest.mark.parametrize("A,T,K", [(2.0, 10, 3), (70.0, 5000, 3), (5.5, 7.5, 10), (1.0, 3, 4)])
def test_weights_sum_to_K_and_are_positive(A, T, K):
    t = np.arange(0, int(4 * K * T) + 3)
    g = class_weights(t, A, T, K)  # (S, K)
    assert g.shape == (len(t), K)
    np.testing.assert_allclose(g.sum(axis=1), K, rtol=EXACT)
    assert (g > 0).all()
    assert g.max() <= K


def test_emphasised_class_cycles_with_period_T_and_KT():
    A, T, K = 10.0, 20, 3
    t = np.arange(0, 6 * K * T)
    g = class_weights(t, A, T, K)
    # within period p the emphasised class is p mod K (eq. 4); it cycles through every class
    for p in range(6 * K):
        block = g[p * T + 1 : (p + 1) * T]  # t_T = 0 has every weight equal to 1
        assert (block.argmax(axis=1) == p % K).all()
    np.testing.assert_allclose(g[K * T :], g[: -K * T], rtol=EXACT)  # period K*T overall
    # period T in the class pattern: shifting by T rolls the classes by one
    np.testing.assert_allclose(g[T:], np.roll(g[:-T], 1, axis=1), rtol=EXACT)


def test_triangle_wave_peaks_at_half_period():
    A, T, K = 70.0, 5000, 3
    t = np.arange(T)
    g = class_weights(t, A, T, K)[:, 0]
    assert g.argmax() == T // 2
    np.testing.assert_allclose(g.max(), K * A / (A + K - 1), rtol=EXACT)  # eq. (5) at f = A
    np.testing.assert_allclose(g[0], 1.0, rtol=EXACT)  # t_T = 0: f = 1, all weights 1
    # eq. (3): linear rise with slope m = 2(A-1)/T of the raw weight
    f = 1 + 2 * (A - 1) / T * 1000
    np.testing.assert_allclose(g[1000], K * f / (f + K - 1), rtol=EXACT)


def test_A_equal_1_is_plain_cross_entropy_exactly():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 7, 3))
    y = rng.integers(0, 3, size=7)
    g = class_weights(123, np.ones(2), np.array([10.0, 33.0]), 3)  # (M, K)
    assert (g == 1.0).all()
    F, _ = loss_forward(logits, y, g)
    np.testing.assert_array_equal(F, cross_entropy(logits, y))


def test_stop_step_switches_oscillations_off_per_network():
    g = class_weights(
        np.arange(100),
        np.array([5.0, 5.0]),
        np.array([10.0, 10.0]),
        3,
        stop_step=np.array([50, 1000]),
    )  # (S, M, K)
    assert (g[50:, 0] == 1.0).all()
    assert not (g[50:, 1] == 1.0).all()
    np.testing.assert_array_equal(g[:50, 0], g[:50, 1])


def test_per_network_A_and_T_match_scalar_calls():
    A, T = np.array([1.0, 3.0, 40.0]), np.array([7.0, 50.0, 1000.0])
    t = np.arange(0, 3000, 13)
    g = class_weights(t, A, T, 3)  # (S, M, K)
    for m in range(3):
        np.testing.assert_array_equal(g[:, m], class_weights(t, A[m], T[m], 3))


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("M,A,T,t", [(1, 1.0, 10, 0), (3, 5.0, 100, 37), (2, 70.0, 5000, 3100)])
def test_loss_gradient_matches_central_differences(loss, M, A, T, t):
    rng = np.random.default_rng(M + t)
    N, K = 9, 3
    logits = rng.normal(size=(M, N, K))
    y = rng.integers(0, K, size=N)
    gamma = class_weights(t, np.full(M, A), np.full(M, T), K)
    F, cache = loss_forward(logits, y, gamma, loss)
    dz = loss_backward(cache)
    num = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        e = np.zeros_like(logits)
        e[idx] = FD_STEP
        num[idx] = (
            loss_forward(logits + e, y, gamma, loss)[0][idx[0]]
            - loss_forward(logits - e, y, gamma, loss)[0][idx[0]]
        ) / (2 * FD_STEP)
    assert rel_err(dz, num) < GRAD_RTOL


def test_loss_is_gamma_weighted_mean_of_cross_entropies():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1, 5, 3))
    y = np.array([0, 1, 2, 2, 0])
    gamma = np.array([[0.5, 1.0, 1.5]])
    p = np.exp(logits[0]) / np.exp(logits[0]).sum(axis=1, keepdims=True)
    expected = np.mean(gamma[0, y] * -np.log(p[np.arange(5), y]))
    np.testing.assert_allclose(loss_forward(logits, y, gamma)[0], expected, rtol=EXACT)


def test_loss_is_stable_for_huge_logits():
    logits = np.array([[[1000.0, 0.0, -1000.0], [0.0, 800.0, 0.0]]])
    F, cache = loss_forward(logits, np.array([0, 1]), np.ones((1, 3)))
    assert np.isfinite(F).all() and np.isfinite(loss_backward(cache)).all()


def test_accuracy():
    logits = np.array([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]]])
    assert accuracy(logits, np.array([0, 1, 2, 2]))[0] == 0.75


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        loss_forward(np.zeros((1, 2, 3)), np.array([0, 1]), np.ones((1, 3)), "hinge")
