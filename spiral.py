"""The spiral of Figs. 2-5 and the reference training loop: full-batch gradient descent on the
dynamical loss, built only from dynloss.py and models.py.

Symbols: M networks trained side by side, N samples, D = 2 inputs, H hidden units, K = 3 classes,
S logged steps.

:func:`train_reference` is the loop to read: Gamma(t) (eqs. 2-5) -> forward -> loss (eq. 1) ->
backward -> update, one step at a time. Every spiral command runs it with ``--reference``; by
default the commands run fast/spiral_trainer.py, a fused and batched copy of the same loop that
is tested against this one (tests/test_spiral.py) and writes the same logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynloss import accuracy, class_weights, cross_entropy
from dynloss import diverged as loss_diverged
from models import RELU, mlp_forward, mlp_loss_and_grads

K_SPIRAL = 3
D_SPIRAL = 2  # the spiral's input dimension
N_PER_CLASS = 100
SPIRAL_NOISE = 0.2
TRAIN_SEED = 0  # the authors' notebook seeds NumPy's legacy global RNG with 0
VAL_SEED = 1


# ---------------------------------------------------------------------------------------------
# Data (Fig. 2)
# ---------------------------------------------------------------------------------------------


def _arms(radii, noise, rng_normal):
    """Points on the K arms: radii (K, n) in [0, 1] -> X (K*n, D), y (K*n,)."""
    K, n = radii.shape
    X, y = [], []
    for j in range(K):
        start = 2 * np.pi * j / K
        angle = start + 4 * np.pi * radii[j] + noise * rng_normal(n)  # 4 pi radians per arm
        X.append(np.c_[radii[j] * np.cos(angle), radii[j] * np.sin(angle)])
        y.append(np.full(n, j))
    return np.concatenate(X), np.concatenate(y).astype(np.int64)


def make_spiral_train(n_per_class=N_PER_CLASS, K=K_SPIRAL, noise=SPIRAL_NOISE, seed=TRAIN_SEED):
    """The training spiral of the authors' notebook, adapted from cs231n's (which spans 4
    radians per arm; this one 4 pi): radii evenly spaced in [0, 1].

    Class j: radius linspace(0, 1, n), angle linspace(2 pi j/K, 2 pi j/K + 4 pi, n) plus
    N(0, noise^2), drawn from the legacy RandomState(seed) class by class. Radius 0 puts one point
    of every class at the origin, so training accuracy cannot exceed (K n - K + 1)/(K n).

    Returns X (K*n, 2) float64, y (K*n,) int64.
    """
    rs = np.random.RandomState(seed)
    radii = np.tile(np.linspace(0.0, 1.0, n_per_class), (K, 1))
    return _arms(radii, noise, rs.randn)


VAL_SETS = {  # validation radii r in [0, 1] from u ~ U[0, 1] (K, n), sorted along each arm
    "uniform": lambda u: u,  # radii uniform along the arms (the default)
    "inner": lambda u: u**2,  # density 1 / (2 sqrt r): crowded towards the centre
    "outer": np.sqrt,  # density 2 r: crowded towards the outer ends
    "reseed": None,  # the training radii (evenly spaced), only the noise is fresh
}


def make_spiral_val(
    name="uniform", n_per_class=N_PER_CLASS, K=K_SPIRAL, noise=SPIRAL_NOISE, seed=VAL_SEED
):
    """A validation spiral: the same arms as the training set, another distribution of the
    points along them, fresh noise, from np.random.default_rng(seed).

    The paper's validation set has "a different distribution of the points along the arms";
    ``name`` picks a reading of that (``VAL_SETS``): "uniform" radii uniform at random in [0, 1]
    (no point at a training radius), "inner" crowded towards the centre where the arms meet (the
    hard part), "outer" crowded towards their outer ends, "reseed" the training radii with
    fresh noise. docs/choices.md gives each one's 1-nearest-neighbour accuracy.

    Returns X (K*n, 2) float64, y (K*n,) int64.
    """
    if name not in VAL_SETS:
        raise ValueError(f"unknown validation set {name!r}; choose one of {', '.join(VAL_SETS)}")
    rng = np.random.default_rng(seed)
    if VAL_SETS[name] is None:
        radii = np.tile(np.linspace(0.0, 1.0, n_per_class), (K, 1))
    else:
        radii = np.sort(VAL_SETS[name](rng.uniform(0.0, 1.0, size=(K, n_per_class))), axis=1)
    return _arms(radii, noise, lambda n: rng.normal(0.0, 1.0, n))


def spiral_params(width):
    """P, the parameters of one spiral network of ``width`` hidden units: W1, b1, W2, b2."""
    return (D_SPIRAL + 1 + K_SPIRAL) * width + K_SPIRAL


def spiral_data(val="uniform"):
    """The spiral with the validation set ``val``: X_train (N, 2), y_train (N,), X_val (Nv, 2),
    y_val (Nv,)."""
    return (*make_spiral_train(), *make_spiral_val(val))


def nearest_neighbour_accuracy(X_train, y_train, X, y):
    """Accuracy on (X, y) of the 1-nearest-neighbour classifier of the training set: how much
    room a validation set leaves to a smooth decision boundary. (N, D), (N,), (Nv, D), (Nv,)."""
    d2 = ((X[:, None, :] - X_train[None, :, :]) ** 2).sum(axis=2)  # (Nv, N)
    return float((y_train[d2.argmin(axis=1)] == y).mean())


# ---------------------------------------------------------------------------------------------
# What defines a training run, and what it logs
# ---------------------------------------------------------------------------------------------

LOG_FIELDS = ("loss", "dloss", "loss_static", "train_acc", "val_acc", "val_loss")


@dataclass
class TrainSpec:
    """Everything that defines a batch of M training runs (besides the initial parameters).

    A, T, stop_step : (M,) per-network amplitude, period and the step from which Gamma = 1
    lr : learning rate eta; steps : number of updates; log_every : logging interval (steps);
    loss : "ce" or "mse"; val_every : the validation set is evaluated at the logged steps that
    are multiples of this (and at the last step); None: at every logged step.
    """

    A: np.ndarray
    T: np.ndarray
    stop_step: np.ndarray
    lr: float
    steps: int
    log_every: int
    loss: str = "ce"
    val_every: int | None = None


def log_steps(steps, log_every):
    """The logged steps (S,): 0, log_every, 2 log_every, ..., and always the final ``steps``."""
    s = list(range(0, steps, log_every))
    return np.array(s + [steps], dtype=np.int64)


def stop_steps(steps, T, oscillate_to_end=False):
    """The first step with Gamma = 1: the final period is static (steps - T, at least 0) unless
    the oscillations run to the end (then steps + 1, never). T : float or (M,) array."""
    if oscillate_to_end:
        return np.full(np.shape(T), steps + 1) if np.ndim(T) else steps + 1
    return np.maximum(steps - np.asarray(T), 0) if np.ndim(T) else max(0, steps - T)


def finish_run(params, steps, gamma, log, diverged, rows):
    """The result of a training run (of :func:`train_reference` and of the fast trainer alike).

    params : final parameters (NumPy);  steps : (S,) logged steps;  gamma : (S, M, K);
    log : {field: (S, M)} for LOG_FIELDS;  diverged : (M,) divergence steps (-1: none);
    rows : rows written. A diverged network keeps its loss at the divergence step and NaN after
    it (its other fields are NaN from that step on); when every network diverged, the result
    keeps the rows up to the last divergence.
    Returns a dict: params, step, gamma, diverged_step, logged, and every field of LOG_FIELDS.
    """
    diverged = np.asarray(diverged)
    if (diverged >= 0).all():
        rows = int(np.searchsorted(steps, diverged.max(), side="right"))
    gone = diverged >= 0
    after = gone & (steps[:, None] > diverged)  # (S, M) rows after the divergence step
    at = gone & (steps[:, None] == diverged)  # the row of the divergence step itself
    for f in LOG_FIELDS:  # the loss keeps its diverging value, no more
        log[f][after | (at if f not in ("loss", "dloss") else False)] = np.nan
    out = {"params": params, "step": steps, "gamma": gamma, "diverged_step": diverged}
    out["logged"] = rows
    out.update({f: log[f] for f in LOG_FIELDS})
    return out


# ---------------------------------------------------------------------------------------------
# The reference training loop
# ---------------------------------------------------------------------------------------------


def train_reference(
    params, data, spec, on_log=None, progress=None, after_update=None, act=RELU, dtype="float64"
):
    """Full-batch gradient descent on the dynamical loss for M networks, one step at a time.

    params : W1 (M, D, H), b1 (M, H), W2 (M, H, K), b2 (M, K) (not modified);
    data : (X (N, D), y (N,), X_val (Nv, D), y_val (Nv,));  spec : :class:`TrainSpec`
    on_log : optional callback(step, params) at every logged step (a copy of the parameters);
    progress : optional callable(n) counting network-steps.
    Beyond the paper (the onset experiment, apparatus/onset.py): after_update, a callback(t,
    params) after update t that may change the parameters in place (its perturbations); act,
    the hidden activation (models.RELU; beyond/smooth.py's softplus); dtype, the arithmetic
    ("float32" for its control).
    Row s of the log is the state before update steps[s]: F (eq. 1), F(t) - F(t-1), the static
    cross-entropy, the accuracies; the last row (t = steps) is the final state. A network whose
    loss diverges (dynloss.diverged) is marked at that step; training stops once all have.
    Returns :func:`finish_run`'s dict.
    """
    X, y, Xv, yv = (np.asarray(a, dtype=dtype) if a.dtype.kind == "f" else a for a in data)
    params = {k: np.array(v, dtype=dtype) for k, v in params.items()}  # our own copies
    M, K = params["W2"].shape[0], params["W2"].shape[2]
    steps = log_steps(spec.steps, spec.log_every)  # (S,)
    log = {f: np.full((len(steps), M), np.nan) for f in LOG_FIELDS}  # (S, M) each
    val_every = spec.val_every or spec.log_every
    diverged = np.full(M, -1)  # the step at which each network's loss diverged (-1: never)
    F_prev, row = np.full(M, np.nan), 0
    with np.errstate(all="ignore"):  # a diverging network overflows: it is marked, not fatal
        for t in range(spec.steps + 1):
            gamma = class_weights(t, spec.A, spec.T, K, spec.stop_step)  # (M, K)  Eqs. (2)-(5)
            gamma = gamma.astype(dtype)
            F, grads, logits = mlp_loss_and_grads(params, X, y, gamma, spec.loss, act)  # Eq. (1)
            if t == 0:
                F0 = F  # the scale of divergence (dynloss.diverged)
            diverged = np.where((diverged < 0) & loss_diverged(F, F0), t, diverged)
            if t == steps[row]:  # log the state before update t
                log["loss"][row], log["dloss"][row] = F, F - F_prev
                log["loss_static"][row] = cross_entropy(logits, y)  # Gamma = 1
                log["train_acc"][row] = accuracy(logits, y)
                if t % val_every == 0 or t == spec.steps:
                    logits_val, _ = mlp_forward(Xv, params, act)  # (M, Nv, K)
                    log["val_loss"][row] = cross_entropy(logits_val, yv)
                    log["val_acc"][row] = accuracy(logits_val, yv)
                if on_log is not None:
                    on_log(t, {k: v.copy() for k, v in params.items()})
                row += 1
            if t == spec.steps or (diverged >= 0).all():
                break
            for k in params:
                params[k] -= spec.lr * grads[k]  # Eq. (9): theta <- theta - eta dF/dtheta
            if after_update is not None:
                after_update(t, params)
            F_prev = F
            if progress is not None:
                progress(M)
    gamma_log = class_weights(steps, spec.A, spec.T, K, spec.stop_step)  # (S, M, K)
    return finish_run(params, steps, gamma_log, log, diverged, row)
