"""The ``check`` command: every hand-written derivative against an independent computation, one
row each, printed as one table (``python run_spiral.py check``, ``python run_cifar.py check``).

A row compares a derivative computed by hand with another route to the same numbers: a backward
pass against central differences of its forward pass, (f(theta + h v) - f(theta - h v)) / 2h =
<df/dtheta, v> + O(h^2), along coordinates e_i or random unit directions v; an R-operator
against central differences of the gradient (= H v + O(h^2)); an assembled matrix (the dense
Hessian, its Gauss-Newton part, the NTK) against another route to it, Lanczos against a dense
eigensolver, a fast copy against its reference; Gamma(t) (eqs. 2-5), the block-diagonal logit
Hessian and Nesterov's two lines against the equations written out once more here,
deliberately independent of the code they check. A row's error is max |a - b| / max(max |a|,
max |b|) over all it compares, in float64; it passes at most at its tolerance.

Differences are taken in float64 with h = FD_STEP whatever --dtype says: float32 derivatives
(at float32 parameters) are compared with float64 differences of the same forward pass at the
same point. float32's own differences cannot serve: its rounding (1e-7 of F, over 2h) needs
h >= 1e-2 to fall below 1e-3, and steps that large cross the ReLU kinks of most samples.
spectra.py works in float64 by design (it feeds scipy), so its rows do too.

ReLU kinks: a difference across a kink (a pre-activation whose sign differs between theta + h v
and theta - h v) measures no derivative. Each sample's ReLU states 1[z > 0] are compared at the
two ends of every difference; the samples where one flips are left out and the row is redone on
the others (both networks treat samples independently: what is left is an honest batch). The
"kinks" column counts them; a row with no sample left is KINK, reported and not failed.

Symbols: N samples, P parameters of one network, D directions of a row, K classes; the MLP is
one network (M = 1). docs/check.md says what each row proves.
"""

from __future__ import annotations

import os
import time
from collections import namedtuple
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

import dynloss
import models
import spectra
from apparatus import memory
from apparatus.cli import COUNT, SEED, InputError, check_memory, checked_backend, command
from apparatus.sweeps import check_unit
from beyond.smooth import softplus
from dynloss import LOSSES, class_weights, loss_backward, loss_forward
from models import INITS, MLP_PARAM_NAMES, MYRTLE5_PARAM_NAMES, flatten, mlp_forward, unflatten
from spiral import D_SPIRAL, K_SPIRAL, make_spiral_train, spiral_params

DTYPES = ("float64", "float32")
FD_STEP = 1e-6  # h ~ eps^(1/3) |theta| in float64: truncation h^2 ~ 1e-12, rounding eps/h ~ 1e-10
FD_RTOL_F64 = 1e-6  # float64 derivatives against the differences: they agree to ~1e-8
FD_RTOL_F32 = 1e-4  # float32 derivatives: their own rounding (6e-8, hundreds of terms deep)
SAME_RTOL_F64 = 1e-12  # the same numbers computed in another order, float64
SAME_RTOL_F32 = 1e-5  # the same in float32
GAMMA_RTOL = 1e-12  # Gamma(t) against eqs. (2)-(5) written out: float64 rounding
EXACT = 0.0  # class indices and the Gamma = 1 that class_weights sets: no rounding at all
EIG_TOL = 1e-10  # the residual asked of eigsh and of warm_top_eig in the Lanczos rows
EIG_RTOL = 1e-8  # their top eigenvalue against eigh: the error is ~ (tol lambda)^2 / gap
GPU_RTOL_F64 = 1e-10  # cuBLAS and our kernels against OpenBLAS: float64 in other orders
GPU_RTOL_F32 = 1e-4  # float32 kernels (direct, im2col, 3xTF32) against the float32 host; the HVP
# cancels more than the layers
GPU_RTOL_TF32 = 1e-2  # CUPY_TF32=1 rounds the GEMM inputs to 10-bit mantissas (5e-4 each)
MAX_COORDS = 640  # coordinates (or columns) per row: every one at the default width 100
# (P = 603), a random subset beyond, so that width 1000 stays within seconds
DIRECTIONS = 4  # random unit directions of a second-order row
LAYER_DIRECTIONS = 2  # random directions per argument of a Myrtle5 layer
SOFTPLUS_BETA = 10.0  # the softplus network's beta (as in ``onset --betas relu,10``)
MYRTLE5_IMAGES = 3  # N of the Myrtle5 check: small random images, as in tests/test_myrtle5.py
MYRTLE5_SIDE = 8  # image side: the smallest Myrtle5 takes (pools down to 1x1)
MYRTLE5_WIDTH = 3  # c at initialisation (a run's own c with --at)
MYRTLE5_IN, MYRTLE5_K = 3, 10  # CIFAR-10's colour channels and classes
NESTEROV_LR, NESTEROV_STEPS = 0.02, 3  # the Fig. 1 peak learning rate; steps of the Nesterov row
BLAS_THREADS = 1  # small matrices: a second OpenBLAS thread only waits, and on a busy 2-core
# machine its hand-offs made the dense eigensolver 100 times slower (3 s instead of 0.03 s)
PASS, FAIL, KINK = "PASS", "FAIL", "KINK"
FD_RTOL = {"float64": FD_RTOL_F64, "float32": FD_RTOL_F32}  # by the dtype of the derivatives
SAME_RTOL = {"float64": SAME_RTOL_F64, "float32": SAME_RTOL_F32}


# The dynamical loss of a check: amplitude A, period T and stop step of eqs. (2)-(5), and the
# step t whose Gamma(t) weighs the network rows (class 1 emphasised, mid-rise: tilted)
Schedule = namedtuple("Schedule", "A T stop t")
SPIRAL_SCHEDULE = Schedule(A=20.0, T=1000.0, stop=29000, t=1300)  # the default spiral run
MYRTLE5_SCHEDULE = Schedule(A=50.0, T=100.0, stop=58200, t=130)  # Fig. 1's best cell, the
# CIFAR-10 protocol's stop (epoch 600 of 50000 // 512 = 97 steps)


@dataclass
class Row:
    """One line of the table."""

    what: str  # the hand-written derivative (the function that computes it)
    against: str  # what it is compared with
    error: float  # relative error (module docstring); NaN when nothing was compared (KINK)
    tolerance: float
    status: str  # PASS, FAIL or KINK
    kinks: int | None = None  # samples left out at a ReLU kink (None: no ReLU in the row)
    section: str = ""
    note: str = ""  # what went wrong where a computation raised


def judge(what, against, error, tolerance, kinks=None):
    """A row that passes when the error is at most the tolerance (NaN fails)."""
    return Row(what, against, float(error), tolerance, PASS if error <= tolerance else FAIL, kinks)


def guarded(what, against, tol, compute):
    """judge(what, against, compute(), tol), or a FAIL row naming the exception compute raised:
    a broken derivative can break what consumes it (Lanczos on an asymmetric "Hessian" does not
    converge), and the table must still be printed."""
    try:
        return judge(what, against, compute(), tol)
    except Exception as err:  # any failure of the code under check is that row's FAIL
        return failed(what, against, tol, err)


def failed(what, against, tol, err):
    """The FAIL row of a computation that raised ``err``."""
    return Row(what, against, float("nan"), tol, FAIL, note=f"{type(err).__name__}: {err}")


def host(a):
    """A NumPy array from a NumPy or CuPy one."""
    return a.get() if hasattr(a, "get") else np.asarray(a)


def rel_error(a, b):
    """max |a - b| / max(max |a|, max |b|) of two arrays (or lists of arrays), in float64."""
    if isinstance(a, (list, tuple)):
        a, b = (np.concatenate([np.ravel(host(v)) for v in vs]) for vs in (a, b))
    a = np.asarray(host(a), dtype=np.float64)
    b = np.asarray(host(b), dtype=np.float64)
    scale = np.max(np.abs(np.concatenate([a.ravel(), b.ravel()])), initial=0.0)
    return float(np.max(np.abs(a - b), initial=0.0) / scale) if scale != 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Central differences, with the samples that cross a ReLU kink left out
# ---------------------------------------------------------------------------------------------


def central_differences(value, theta, directions):
    """(value(theta + h v) - value(theta - h v)) / 2h, h = FD_STEP, for each direction v.

    value : theta (P,) float64 -> (out, states), states a bool array (N, ...) of the ReLU
        states 1[z > 0] of each sample (None where there is no ReLU).
    directions : (D, P).  Returns the differences (D, ...) and ``crossed`` (N,) bool, the
    samples whose states differ between the two ends of some difference (None without states).
    """
    diffs, crossed = [], None
    for v in directions:
        up, up_states = value(theta + FD_STEP * v)
        down, down_states = value(theta - FD_STEP * v)
        diffs.append((np.asarray(up) - np.asarray(down)) / (2 * FD_STEP))
        if up_states is not None:
            flips = (up_states != down_states).reshape(len(up_states), -1).any(axis=1)  # (N,)
            crossed = flips if crossed is None else crossed | flips
    return np.stack(diffs), crossed


def fd_row(what, against, build, n, tol):
    """A central-difference row, the samples that cross a kink left out (module docstring).

    build(keep) : on the samples ``keep`` (n,) bool, returns theta (P,) float64, the directions
        (D, P), value (for :func:`central_differences`) and the hand-written derivatives along
        the directions (D, ...).
    """
    keep = np.ones(n, dtype=bool)
    while keep.any():
        try:
            theta, directions, value, analytic = build(keep)
            numeric, crossed = central_differences(value, theta, directions)
        except Exception as err:  # a derivative that raises fails its row
            return failed(what, against, tol, err)
        if crossed is None or not crossed.any():
            kinks = None if crossed is None else int(n - keep.sum())
            return judge(what, against, rel_error(analytic, numeric), tol, kinks)
        keep[np.flatnonzero(keep)[crossed]] = False
    return Row(what, against, float("nan"), tol, KINK, n)


def fixed(theta, directions, value, analytic):
    """build(keep) of a row without ReLU states: the same arrays whatever keep is."""
    return lambda keep: (theta, directions, value, analytic)


def coordinate_directions(n, start, size, rng):
    """The basis vectors e_i (D, n) of the coordinates start..start+size-1: every one, or
    MAX_COORDS of them at random when there are more."""
    idx = np.arange(size) if size <= MAX_COORDS else rng.choice(size, MAX_COORDS, replace=False)
    E = np.zeros((len(idx), n))
    E[np.arange(len(idx)), start + np.sort(idx)] = 1.0
    return E


def random_directions(n, count, rng, blocks=None):
    """``count`` random unit vectors (count, n); with ``blocks`` [(start, size)], ``count`` per
    block, each nonzero in its block only."""
    out = []
    for start, size in blocks or [(0, n)]:
        for _ in range(count):
            v = np.zeros(n)
            v[start : start + size] = rng.normal(size=size)
            out.append(v / np.linalg.norm(v))
    return np.array(out)


def spans(sizes):
    """[(start, size)] of consecutive blocks of the given sizes in one flat vector."""
    starts = np.cumsum([0] + list(sizes)[:-1])
    return [(int(s), int(n)) for s, n in zip(starts, sizes, strict=True)]


# ---------------------------------------------------------------------------------------------
# What a check runs on
# ---------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One network, a batch and the weights Gamma of a check, in --dtype.

    params : MLP W1 (1, D, H), b1 (1, H), W2 (1, H, K), b2 (1, K); Myrtle5 as models.py (no M)
    X : MLP (N, D); Myrtle5 (N, Hx, Wx, C_in).  y : (N,) labels.  gamma : (K,) Gamma_i(t).
    """

    model: str  # "MLP" or "Myrtle5"
    params: dict
    X: np.ndarray
    y: np.ndarray
    gamma: np.ndarray
    loss: str
    dtype: str
    schedule: Schedule
    where: str  # "initialisation (...)" or the run.npz read
    seed: int

    def rng(self, stream):
        """A generator of its own for each row (``stream`` names the row), so that a row's
        random directions do not depend on which rows ran before it."""
        return np.random.default_rng([self.seed, *stream.encode()])


def read_run(folder, names):
    """Every array of ``folder``/run.npz, refused in one line (InputError) when the folder or
    the file is missing, unreadable, or lacks one of ``names``."""
    path = os.path.join(folder, "run.npz")
    if not os.path.isdir(folder):
        raise InputError(f"--at {folder}: no such folder")
    if not os.path.isfile(path):
        raise InputError(f"--at {folder}: holds no run.npz (the output of a train command)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:  # truncated, not a zip, a bad CRC: any unreadable file
        raise InputError(f"--at {path}: does not read ({type(err).__name__})") from None
    missing = [k for k in names if k not in arrays]
    if missing:
        raise InputError(f"--at {path}: lacks {', '.join(missing)} (docs/formats.md)")
    return arrays


def refuse_bad(path, problem, arrays):
    """InputError for a run.npz whose arrays do not fit (``problem``), are not real numbers
    (complex, object, text) or are not finite: a bad file is refused, never read as a wrong
    derivative. arrays : {name: array} of the parameters and the data that the check uses."""
    if problem:
        raise InputError(f"--at {path}: {problem} (docs/formats.md)")
    for name, a in arrays.items():
        if a.dtype.kind not in "fiu":
            raise InputError(f"--at {path}: {name} holds {a.dtype} values, not real numbers")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            what = "parameters" if name in MLP_PARAM_NAMES + MYRTLE5_PARAM_NAMES else "data"
            raise InputError(f"--at {path}: {name} is not finite (its {what}; a diverged run?)")


def run_settings(folder):
    """The settings a ``train`` folder's config.json records (its loss and its schedule), or {}
    when it has none that read (the check then uses its own defaults and says so)."""
    from apparatus.storage import read_json

    path = os.path.join(folder, "config.json")
    try:
        settings = read_json(path).get("settings", {}) if os.path.exists(path) else {}
    except (InputError, AttributeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def run_schedule(settings, default, steps_per_unit=1):
    """The check's Schedule for a run's settings: its A, T and stop step, and t = 1.3 T (a
    tilted step, as the defaults'); ``default`` where the settings lack them.
    steps_per_unit : minibatch steps per epoch for a CIFAR run (its stop is an epoch)."""
    try:
        A, T = float(settings["A"]), float(settings["T"])
    except (KeyError, TypeError, ValueError):
        return default
    if "stop_epoch" in settings:  # a CIFAR run: Gamma = 1 from this epoch
        stop = int(round(float(settings["stop_epoch"]) * steps_per_unit))
    elif "steps" in settings:  # a spiral train run: the last period static unless --no-stop
        steps = int(settings["steps"])
        stop = steps + 1 if settings.get("no_stop") else max(0, steps - int(T))
    else:
        return default
    t = int(1.3 * T)
    if not (1 <= A and 1 <= T and 0 <= t < stop):
        return default
    return Schedule(A=A, T=T, stop=stop, t=t)


def spiral_run(folder):
    """The final W1, b1, W2, b2 (M = 1: the first seed's where several were trained), X_train
    and y_train of a ``run_spiral.py train`` folder, validated; and where they came from."""
    arrays = read_run(folder, MLP_PARAM_NAMES + ("X_train", "y_train"))
    seeds = arrays["b2"].ndim == 2
    pick = lambda a: a[0] if seeds and a.ndim and len(a) else a  # the first seed's
    first = {k: pick(arrays[k]) for k in MLP_PARAM_NAMES}
    X, y = arrays["X_train"], arrays["y_train"]
    D, H = first["W1"].shape if first["W1"].ndim == 2 else (-1, -1)
    K = first["b2"].shape[-1] if first["b2"].ndim else -1
    shapes = {"W1": (D, H), "b1": (H,), "W2": (H, K), "b2": (K,), "X_train": (len(X), D)}
    path = os.path.join(folder, "run.npz")
    problem = check_unit({**first, "X_train": X}, shapes)
    if not problem and min(D, H, K, len(X)) < 1:
        problem = f"a network of width {H} with {D} inputs and {K} classes on {len(X)} points"
    if not problem and not (y.shape == (len(X),) and y.dtype.kind in "iu" and len(y)):
        problem = "y_train is not one integer label per training point"
    elif not problem and not (y.min() >= 0 and y.max() < K):
        problem = f"y_train holds labels outside 0..{K - 1}"
    refuse_bad(path, problem, {**first, "X_train": X})
    where = f"{path}, final parameters" + (" (first seed)" if seeds else "")
    return {k: v[None] for k, v in first.items()}, X, y, where


def spiral_problem(width=100, loss=None, init="standard", seed=0, dtype="float64", at=None):
    """The spiral check: the MLP at initialisation on the training spiral, or at the final
    parameters of a ``run_spiral.py train`` folder ``at`` on its training data, with that run's
    loss and Gamma(t) schedule (its config.json) unless ``loss`` is given."""
    s = SPIRAL_SCHEDULE
    if at is None:
        need = memory.dense_check(spiral_params(width))
        check_memory(need, f"check with P = {spiral_params(width)} parameters (dense Hessians)")
        X, y = make_spiral_train()
        params = models.init_mlp([seed], D_SPIRAL, width, K_SPIRAL, init=init)
        where = f"initialisation ({init} init, seed {seed})"
    else:
        params, X, y, where = spiral_run(at)
        settings = run_settings(at)
        s = run_schedule(settings, s)
        loss = loss or settings.get("loss")
    loss = loss if loss in LOSSES else "ce"
    P = sum(v[0].size for v in params.values())
    check_memory(memory.dense_check(P), f"check with P = {P} parameters (dense Hessians)")
    gamma = class_weights(s.t, s.A, s.T, params["W2"].shape[2], s.stop)  # (K,)
    params = {k: np.asarray(v, dtype=dtype) for k, v in params.items()}
    X = np.asarray(X, dtype=dtype)
    return Problem("MLP", params, X, np.asarray(y), gamma, loss, dtype, s, where, seed)


def myrtle5_problem(width=MYRTLE5_WIDTH, loss=None, seed=0, dtype="float64", at=None):
    """The Myrtle5 check: MYRTLE5_IMAGES random images of MYRTLE5_SIDE^2 pixels and random
    labels, at initialisation (c = ``width``) or at the final parameters W1..b5 of a
    ``run_cifar.py train`` folder ``at`` (its c, channels and classes; its loss and Gamma(t)
    schedule unless ``loss`` is given)."""
    rng = np.random.default_rng(seed)
    s = MYRTLE5_SCHEDULE
    if at is None:
        need = memory.myrtle5_check(width, MYRTLE5_IN, MYRTLE5_K)
        check_memory(need, f"check at width c = {width}")
        params = models.init_myrtle5(rng, c=width, in_channels=MYRTLE5_IN, n_classes=MYRTLE5_K)
        where = f"initialisation (seed {seed})"
    else:
        arrays = read_run(at, MYRTLE5_PARAM_NAMES)
        params = {k: arrays[k] for k in MYRTLE5_PARAM_NAMES}
        W1, W5 = params["W1"], params["W5"]
        c, C_in = (W1.shape[3], W1.shape[2]) if W1.ndim == 4 else (0, 0)
        K = W5.shape[1] if W5.ndim == 2 else 0
        path = os.path.join(at, "run.npz")
        problem = check_unit(params, models.myrtle5_shapes(c, C_in, K))
        if not problem and min(c, C_in, K) < 1:
            problem = f"a Myrtle5 of width {c} with {C_in} channels and {K} classes"
        refuse_bad(path, problem, params)
        settings = run_settings(at)
        spe = arrays.get("steps_per_epoch")
        s = run_schedule(settings, s, int(spe) if spe is not None and spe.shape == () else 1)
        loss = loss or settings.get("loss")
        where = f"{path}, final parameters"
    loss = loss if loss in LOSSES else "ce"
    C_in, K = params["W1"].shape[2], params["W5"].shape[1]
    X = rng.normal(size=(MYRTLE5_IMAGES, MYRTLE5_SIDE, MYRTLE5_SIDE, C_in)).astype(dtype)
    y = rng.integers(0, K, size=MYRTLE5_IMAGES)
    gamma = class_weights(s.t, s.A, s.T, K, s.stop)  # (K,)
    params = {k: np.asarray(v, dtype=dtype) for k, v in params.items()}
    return Problem("Myrtle5", params, X, y, gamma, loss, dtype, s, where, seed)


# ---------------------------------------------------------------------------------------------
# dynloss.py: the loss's gradient and curvature in the logits, and Gamma(t)
# ---------------------------------------------------------------------------------------------


def gamma_by_hand(t, A, T, K, stop):
    """Eqs. (2)-(5) written out once more, for one step t, in plain Python floats: deliberately
    independent of dynloss.class_weights (the triangle's second half is written descending
    from A, not as eq. (3)'s 2A - m t_T - 1). Returns a list of K weights."""
    if t >= stop:
        return [1.0] * K  # the final period is static
    t_T = t % T  # Eq. (2)
    if t_T <= T / 2:
        f = 1.0 + (A - 1.0) * t_T / (T / 2)  # Eq. (3): 1 -> A over the first half period
    else:
        f = A - (A - 1.0) * (t_T - T / 2) / (T / 2)  # ... and A -> 1 over the second
    emphasised = int(t // T) % K  # Eq. (4)
    raw = [f if i == emphasised else 1.0 for i in range(K)]
    return [K * r / sum(raw) for r in raw]  # Eq. (5)


def gamma_rows(schedule, K):
    """Gamma(t) against eqs. (2)-(5) at a few steps, and its invariants: sum K, the emphasised
    class, Gamma = 1 from the stop step."""
    A, T, stop = schedule.A, schedule.T, schedule.stop
    fractions = (0, 0.25, 0.5, 0.75, 0.999, 1, 2.4, K + 0.5)  # rise, peak, fall, next classes
    steps = np.array([int(f * T) for f in fractions] + [stop - 1, stop, stop + int(T / 2)])
    gamma = class_weights(steps, A, T, K, stop_step=stop)  # (S, K)
    by_hand = np.array([gamma_by_hand(int(t), A, T, K, stop) for t in steps])
    tilted = (steps < stop) & (steps % T != 0)  # where one class is emphasised
    wrong = gamma[tilted].argmax(axis=1) != (steps[tilted] // T) % K
    static = np.abs(gamma[steps >= stop] - 1.0).max()
    what = f"dynloss.class_weights Gamma(t), {len(steps)} steps"
    return [
        judge(what, "eqs. (2)-(5) written out", rel_error(gamma, by_hand), GAMMA_RTOL),
        judge("class_weights: sum_i Gamma_i", "K (eq. 5)", rel_error(gamma.sum(1), K), GAMMA_RTOL),
        judge("class_weights: emphasised class", "floor(t/T) mod K (eq. 4)", wrong.mean(), EXACT),
        judge("class_weights: from the stop step on", "Gamma = 1", static, EXACT),
    ]


def loss_rows(logits, y, gamma, prob):
    """For both base losses: dF/dz against central differences of F (every logit up to
    MAX_COORDS), and the logit curvature R{dF/dz} (loss_rop) against central differences of dF/dz.
    logits : (1, N, K) in --dtype; gamma : (K,)."""
    tol, rows = FD_RTOL[prob.dtype], []
    z64, shape = logits.astype(np.float64).ravel(), logits.shape  # differences in float64
    for loss in LOSSES:
        cache = loss_forward(logits, y, gamma.astype(logits.dtype)[None], loss)[1]
        at = lambda z, loss=loss: loss_forward(z.reshape(shape), y, gamma[None], loss)
        F = lambda z, at=at: (at(z)[0][0], None)
        dF = lambda z, at=at: (loss_backward(at(z)[1]).ravel(), None)
        E = coordinate_directions(z64.size, 0, z64.size, prob.rng("dz" + loss))
        build = fixed(z64, E, F, E @ loss_backward(cache).ravel())
        rows.append(fd_row(f"dynloss.loss_backward dF/dz ({loss})", "central differences of F",
                           build, 1, tol))  # fmt: skip
        V = random_directions(z64.size, DIRECTIONS, prob.rng("rop" + loss))
        Rg = [dynloss.loss_rop(cache, v.reshape(shape).astype(logits.dtype)).ravel() for v in V]
        rows.append(fd_row(f"dynloss.loss_rop R{{dF/dz}} ({loss})", "central differences of "
                           "dF/dz", fixed(z64, V, dF, np.stack(Rg)), 1, tol))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------
# The MLP (models.py) and its spectra (spectra.py)
# ---------------------------------------------------------------------------------------------


def relu_states(cache):
    """The ReLU states 1[z1 > 0] (N, H) of one network from a models.mlp_forward cache (its ReLU
    cache is h1, positive exactly where z1 is); None for a smooth activation (no kink)."""
    act, hidden = cache[1]
    return hidden[0] > 0 if act is models.RELU else None


def mlp_on(prob, keep, act=models.RELU):
    """The check's MLP on the samples ``keep``: theta (P,) its parameters in float64, and

    loss, grad, logits : theta -> (value, ReLU states), in float64 (what is differenced);
    gradient() (P,), hvp(v (P,)) (P,) : the hand-written derivatives at the parameters, in
    --dtype; params, X, y : the float64 arrays (for spectra.py).
    """
    like = prob.params  # (1, ...) in --dtype
    like64 = {k: v.astype(np.float64) for k, v in like.items()}
    X, X64, y = prob.X[keep], prob.X[keep].astype(np.float64), prob.y[keep]
    gamma, gamma64 = prob.gamma.astype(prob.dtype)[None], prob.gamma[None]  # (1, K)
    at = lambda theta, template=like64: unflatten(theta[None], template)

    def loss(theta):
        logits, cache = mlp_forward(X64, at(theta), act)
        return loss_forward(logits, y, gamma64, prob.loss)[0][0], relu_states(cache)

    def grad(theta):
        params = at(theta)
        grads = models.mlp_loss_and_grads(params, X64, y, gamma64, prob.loss, act)[1]
        states = relu_states(mlp_forward(X64, params, act)[1])
        return flatten(grads)[0], states

    def logits(theta):
        z, cache = mlp_forward(X64, at(theta), act)
        return z.ravel(), relu_states(cache)

    def gradient():
        return flatten(models.mlp_loss_and_grads(like, X, y, gamma, prob.loss, act)[1])[0]

    def hvp(v):
        V = at(v.astype(prob.dtype), like)
        return flatten(models.mlp_hvp(like, X, y, gamma, V, prob.loss, act))[0]

    return SimpleNamespace(theta=flatten(like64)[0], loss=loss, grad=grad, logits=logits,
                           gradient=gradient, hvp=hvp, params=like64, X=X64, y=y)  # fmt: skip


def mlp_along(prob, stream, value, analytic, act=models.RELU):
    """build(keep) of an MLP row along DIRECTIONS random unit directions V: ``value`` names the
    function of :func:`mlp_on` that is differenced ("loss" or "grad"); analytic(f, V) gives the
    hand-written derivatives along V (D, ...)."""

    def build(keep):
        f = mlp_on(prob, keep, act)
        V = random_directions(f.theta.size, DIRECTIONS, prob.rng(stream))
        return f.theta, V, getattr(f, value), analytic(f, V)

    return build


def mlp_rows(prob):
    """The MLP's gradient against central differences of F, array by array and coordinate by
    coordinate (every one up to MAX_COORDS), and its R-operator Hv against central differences
    of the gradient along random directions."""
    tol, N = FD_RTOL[prob.dtype], len(prob.X)
    sizes = [prob.params[k][0].size for k in MLP_PARAM_NAMES]
    rows = []
    for name, (start, size) in zip(MLP_PARAM_NAMES, spans(sizes), strict=True):
        E = coordinate_directions(sum(sizes), start, size, prob.rng(name))

        def build(keep, E=E):
            f = mlp_on(prob, keep)
            return f.theta, E, f.loss, E @ f.gradient()

        what = f"models.mlp_backward dF/d{name}"
        rows.append(fd_row(what, "central differences of F (coordinates)", build, N, tol))
    build = mlp_along(prob, "hvp", "grad", lambda f, V: np.stack([f.hvp(v) for v in V]))
    what, against = "models.mlp_hvp Hv (R-operator)", "central differences of the gradient"
    return rows + [fd_row(what, against, build, N, tol)]


def softplus_rows(prob):
    """The softplus network (beyond/smooth.py; smooth, no kinks), along random directions: the
    gradient against central differences of F, and against central differences of the gradient
    the R-operator with its sigma'' term (both in --dtype) and the dense Hessian with its
    activation-curvature blocks (spectra.hessian(act=softplus), float64)."""
    tol, N, beta = FD_RTOL[prob.dtype], len(prob.X), SOFTPLUS_BETA
    act = softplus(beta)
    grad = mlp_along(prob, "sp", "loss", lambda f, V: V @ f.gradient(), act)
    hvp = mlp_along(prob, "sp", "grad", lambda f, V: np.stack([f.hvp(v) for v in V]), act)
    hessian = lambda f: spectra.hessian(f.params, f.X, f.y, prob.gamma, prob.loss, act=act)
    dense = mlp_along(prob, "sp", "grad", lambda f, V: V @ hessian(f), act)
    by_F, by_g = "central differences of F", "central differences of the gradient"
    return [
        fd_row("softplus: models.mlp_backward dF/dtheta", by_F, grad, N, tol),
        fd_row("softplus: models.mlp_hvp (sigma'' term)", by_g, hvp, N, tol),
        fd_row(f"softplus: spectra.hessian (beta {beta:g})", by_g, dense, N, FD_RTOL_F64),
    ]


def logit_hessian_by_hand(w, s, K):
    """The block-diagonal logit Hessian d2F/dz2 (N*K, N*K), written out block by block from the
    pieces of dynloss.logit_curvature: w_n (diag(s_n) - s_n s_n^T), or w_n I_K for MSE.
    Deliberately independent of spectra.gn_factor's factored form. w : (N,); s : (N, K) or None."""
    N = len(w)
    Hz = np.zeros((N * K, N * K))
    for n in range(N):
        block = np.eye(K) if s is None else np.diag(s[n]) - np.outer(s[n], s[n])
        Hz[n * K : (n + 1) * K, n * K : (n + 1) * K] = w[n] * block
    return Hz


def spectra_rows(prob):
    """spectra.py, in float64: the Jacobian against central differences of the logits, the NTK
    against the hand-written backward and R-forward passes, the dense Hessian against the
    R-operator and its transpose, the Gauss-Newton part against J^T (d2F/dz2) J, Lanczos against
    a dense eigensolver; then the spectra tracker's fused products (fast/mlp_spectra.py)
    against these references. Returns (spectra's rows, the fast copies' rows)."""
    f = mlp_on(prob, slice(None))
    p, X, y, gamma, loss = f.params, f.X, f.y, prob.gamma, prob.loss
    P, N, K = f.theta.size, len(X), p["W2"].shape[2]
    rng = prob.rng("spectra")
    E = coordinate_directions(P, 0, P, rng)  # (D, P)

    def build(keep):
        g = mlp_on(prob, keep)
        return g.theta, E, g.logits, E @ spectra.logits_jacobian(p, g.X).T  # J (N*K, P)

    J_row = fd_row("spectra.logits_jacobian J", "central differences of the logits", build, N,
                   FD_RTOL_F64)  # fmt: skip
    ntk, traced = spectra.ntk(p, X), spectra.ntk_traced(p, X)  # (N*K, N*K), (N, N)
    U = random_directions(N * K, DIRECTIONS, rng)  # (D, N*K)
    JJt_u = np.stack([spectra.ntk_operator(p, X).matvec(u) for u in U])
    block_mean = sum(ntk.reshape(N, K, N, K)[:, k, :, k] for k in range(K)) / K  # (N, N)
    H = spectra.hessian(p, X, y, gamma, loss)  # (P, P)
    hvp = spectra.hessian_matvec(p, X, y, gamma, loss)  # spectra.hvp, its forward pass kept
    columns = np.stack([hvp(e) for e in E])  # (D, P)
    gauss_newton = spectra.hessian(p, X, y, gamma, loss, parts=True)[0]
    w, s = dynloss.logit_curvature(loss_forward(mlp_forward(X, p)[0], y, gamma[None], loss)[1])
    Hz = logit_hessian_by_hand(w[0], None if s is None else s[0], K)  # (N*K, N*K)
    J = spectra.logits_jacobian(p, X)
    top = scipy.linalg.eigh(H, eigvals_only=True, subset_by_index=[P - 1, P - 1])[0]
    lanczos = lambda: spectra.hessian_top_eigs(p, X, y, gamma, loss=loss, tol=EIG_TOL)[0][0]
    warm = lambda: spectra.warm_top_eig(hvp, P, tol=EIG_TOL)[0]
    same, dense = SAME_RTOL_F64, "scipy.linalg.eigh, dense"
    rows = [
        J_row,
        judge("spectra.ntk Theta = J J^T (eq. 11)", "J (J^T u): mlp_backward, mlp_jvp",
              rel_error(U @ ntk, JJt_u), same),
        judge("spectra.ntk_traced", "mean of Theta's K diagonal blocks",
              rel_error(traced, block_mean), same),
        judge("spectra.hessian H (dense)", "spectra.hvp on basis vectors e_i",
              rel_error(E @ H, columns), same),
        judge("spectra.hessian H", "its transpose", rel_error(H, H.T), same),
        judge("spectra.hessian(parts=True) Gauss-Newton", "J^T (d2F/dz2) J, blocks by hand",
              rel_error(gauss_newton, J.T @ Hz @ J), same),
        guarded("spectra.hessian_top_eigs lambda_max", dense, EIG_RTOL,
                lambda: rel_error(lanczos(), top)),
        guarded("spectra.warm_top_eig lambda_max", dense, EIG_RTOL, lambda: rel_error(warm(), top)),
    ]  # fmt: skip
    from fast import mlp_spectra as fast_spectra  # the fast copies, loaded for their rows only

    state = fast_spectra.net_state(p, X)
    V, u = random_directions(P, DIRECTIONS, rng), random_directions(N, DIRECTIONS, rng)
    fused = fast_spectra.hessian_matvec(state, y, gamma, loss)
    pairs = [
        ("hessian_matvec", "spectra.hvp", [fused(v) for v in V], [hvp(v) for v in V]),
        ("ntk_matvec", "spectra.ntk Theta u", [fast_spectra.ntk_matvec(state)(b) for b in U],
         U @ ntk),
        ("ntk_traced_matvec", "spectra.ntk_traced u",
         [fast_spectra.ntk_traced_matvec(state)(a) for a in u], u @ traced),
    ]  # fmt: skip
    fast = [judge(f"fast.mlp_spectra.{name}", against, rel_error(np.stack(a), b), same)
            for name, against, a, b in pairs]  # fmt: skip
    return rows, fast


@threadpool_limits.wrap(limits=BLAS_THREADS)
def spiral_rows(prob):
    """Every row of the spiral table, in sections."""
    logits = mlp_forward(prob.X, prob.params)[0]  # (1, N, K)
    first = loss_rows(logits, prob.y, prob.gamma, prob) + gamma_rows(prob.schedule, logits.shape[2])
    spectral, fast = spectra_rows(prob)
    return sections(
        ("dynloss.py: the loss in the logits, Gamma(t)", first),
        (f"models.py: the MLP ({prob.dtype})", mlp_rows(prob)),
        ("spectra.py (float64)", spectral),
        (f"the softplus MLP ({prob.dtype}; spectra.py in float64)", softplus_rows(prob)),
        ("fast/mlp_spectra.py against spectra.py (float64)", fast),
    )


def sections(*named):
    """The rows of (section title, rows) pairs, each row tagged with its section."""
    out = []
    for title, rows in named:
        for row in rows:
            row.section = title
            out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# Myrtle5 (models.py): its layers, the network, the R-operator, Nesterov
# ---------------------------------------------------------------------------------------------


def myrtle5_states(cache):
    """The ReLU states (N, ...) of the four convolutions from a models.myrtle5_forward cache (the
    ReLU caches are the outputs h, positive exactly where z is)."""
    N = len(cache["relu1"])
    return np.concatenate([cache[f"relu{i}"].reshape(N, -1) > 0 for i in (1, 2, 3, 4)], axis=1)


def myrtle5_on(prob, keep):
    """The check's Myrtle5 on the images ``keep``: theta (P,) its parameters in float64; loss
    and grad : theta -> (value, ReLU states) in float64; gradient() and hvp(v): the hand-written
    derivatives at the parameters, in --dtype."""
    like, x, y, gamma = prob.params, prob.X[keep], prob.y[keep], prob.gamma
    like64, x64 = {k: v.astype(np.float64) for k, v in like.items()}, x.astype(np.float64)
    at = lambda theta: models.myrtle5_unflatten(theta, like64)

    def loss(theta):
        logits, cache = models.myrtle5_forward(x64, at(theta))
        return models.loss_on_batch(logits, y, gamma, prob.loss)[0], myrtle5_states(cache)

    def grad(theta):
        params = at(theta)
        grads = models.myrtle5_loss_and_grads(params, x64, y, gamma, prob.loss)[1]
        return models.myrtle5_flatten(grads), myrtle5_states(models.myrtle5_forward(x64, params)[1])

    gradient = lambda: models.myrtle5_flatten(
        models.myrtle5_loss_and_grads(like, x, y, gamma, prob.loss)[1]
    )
    hvp = lambda v: models.myrtle5_hvp(like, x, y, gamma, v, prob.loss)
    theta = models.myrtle5_flatten(like64)
    return SimpleNamespace(theta=theta, loss=loss, grad=grad, gradient=gradient, hvp=hvp)


def myrtle5_network_rows(prob):
    """The whole network's gradient (one random direction in each parameter array) against
    central differences of F, and its R-operator against central differences of the gradient."""
    tol, N = FD_RTOL[prob.dtype], len(prob.X)
    blocks = spans([prob.params[k].size for k in MYRTLE5_PARAM_NAMES])

    def build_grad(keep):
        f = myrtle5_on(prob, keep)
        V = random_directions(f.theta.size, 1, prob.rng("myrtle5 grad"), blocks)
        return f.theta, V, f.loss, V @ f.gradient()

    def build_hvp(keep):
        f = myrtle5_on(prob, keep)
        V = random_directions(f.theta.size, DIRECTIONS, prob.rng("myrtle5 hvp"))
        return f.theta, V, f.grad, np.stack([f.hvp(v) for v in V])

    return [
        fd_row("models.myrtle5_backward dF/dW1..db5", "central differences of F (per array)",
               build_grad, N, tol),
        fd_row("models.myrtle5_hvp Hv (R-operator)", "central differences of the gradient",
               build_hvp, N, tol),
    ]  # fmt: skip


def layer_inputs(prob):
    """The network's own arrays on the check batch (host, --dtype): each layer's inputs, random
    upstream gradients of its outputs' shapes (d_*), and what the GPU rows need besides."""
    P, L = prob.params, models
    logits, cache = models.myrtle5_forward(prob.X, P)
    z1 = L.conv3x3_forward(prob.X, P["W1"], P["b1"])[0]  # (N, Hx, Wx, c)
    z2 = L.conv3x3_forward(cache["relu1"], P["W2"], P["b2"])[0]
    a = dict(P, x=prob.X, z1=z1, h1=cache["relu1"], z2=z2, h2=cache["relu2"], h4=cache["relu4"])
    a.update(g=cache["dense5"][0], logits=logits, y=prob.y, gamma=prob.gamma)
    like = {"d_conv": z2, "d_pool": L.avgpool2_forward(z2)[0], "d_gap": a["g"], "d_dense": logits}
    like.update({"V2": P["W2"]}, **{"g" + k: P[k] for k in MYRTLE5_PARAM_NAMES})
    like.update({"v" + k: P[k] for k in MYRTLE5_PARAM_NAMES})  # a Nesterov velocity
    rng = prob.rng("layer inputs")
    a.update({k: rng.normal(size=v.shape).astype(prob.dtype) for k, v in like.items()})
    return a


def layer_specs(a):
    """(label, arguments (the first one indexed by sample), upstream gradient, forward(**args)
    -> (output, ReLU states or None), backward(dout, **args) -> the gradients in argument
    order) of every Myrtle5 layer of models.py, and of the fused ones of fast/myrtle5.py."""
    from fast import myrtle5 as fused  # the fused layers' rows

    L, F, relu = models, fused, lambda z: models.relu_forward(z)[0]
    conv, dense = L.conv3x3_forward, L.dense_forward
    return [
        ("models.conv3x3_backward", dict(x=a["h1"], W=a["W2"], b=a["b2"]), a["d_conv"],
         lambda x, W, b: (conv(x, W, b)[0], None),
         lambda d, x, W, b: L.conv3x3_backward(d, conv(x, W, b)[1])),
        ("models.relu_backward", dict(z=a["z2"]), a["d_conv"],
         lambda z: (relu(z), relu(z) > 0), lambda d, z: [L.relu_backward(d, relu(z))]),
        ("models.avgpool2_backward", dict(x=a["h2"]), a["d_pool"],
         lambda x: (L.avgpool2_forward(x)[0], None),
         lambda d, x: [models.avgpool2_backward(d, x.shape)]),
        ("models.global_avgpool_backward", dict(x=a["h4"]), a["d_gap"],
         lambda x: (L.global_avgpool_forward(x)[0], None),
         lambda d, x: [L.global_avgpool_backward(d, x.shape)]),
        ("models.dense_backward", dict(x=a["g"], W=a["W5"], b=a["b5"]), a["d_dense"],
         lambda x, W, b: (dense(x, W, b)[0], None),
         lambda d, x, W, b: L.dense_backward(d, dense(x, W, b)[1])),
        ("fast/myrtle5.relu_avgpool2_backward", dict(z=a["z2"]), a["d_pool"],
         lambda z: (L.avgpool2_forward(relu(z))[0], relu(z) > 0),
         lambda d, z: [F.relu_avgpool2_backward(d, z.shape, relu(z))]),
        ("fast/myrtle5.relu_conv3x3_backward", dict(z=a["z1"], W=a["W2"], b=a["b2"]), a["d_conv"],
         lambda z, W, b: (conv(relu(z), W, b)[0], relu(z) > 0),
         lambda d, z, W, b: F.relu_conv3x3_backward(d, relu(z), conv(relu(z), W, b)[1])),
    ]  # fmt: skip


def layer_row(prob, label, args, dout, forward, backward):
    """One layer's backward pass (in --dtype) against central differences (float64) of
    <forward(args), dout>, along LAYER_DIRECTIONS random directions in each argument."""
    names, rng = list(args), prob.rng(label)

    def build(keep):
        a, d = dict(args, **{names[0]: args[names[0]][keep]}), dout[keep]
        blocks = spans([a[k].size for k in names])
        theta = np.concatenate([a[k].ravel() for k in names]).astype(np.float64)
        V = random_directions(theta.size, LAYER_DIRECTIONS, rng, blocks)

        def value(t):
            parts = {
                k: t[s : s + n].reshape(a[k].shape) for k, (s, n) in zip(names, blocks, strict=True)
            }
            out, states = forward(**parts)
            return np.sum(out * d.astype(np.float64)), states

        return theta, V, value, V @ np.concatenate([np.ravel(g) for g in backward(d, **a)])

    what = f"{label} " + ", ".join("d" + k for k in names)
    against = "central differences of <out, dout>"
    return fd_row(what, against, build, len(dout), FD_RTOL[prob.dtype])


def nesterov_row(prob, a):
    """models.nesterov_step for NESTEROV_STEPS steps against its two
    lines written out here, from a random velocity with a random gradient per step."""
    m, flat = models.NESTEROV_MOMENTUM, models.myrtle5_flatten
    params = {k: a[k].copy() for k in MYRTLE5_PARAM_NAMES}
    velocity = {k: a["v" + k].copy() for k in MYRTLE5_PARAM_NAMES}
    theta, v = flat(params), flat(velocity)
    for step in range(NESTEROV_STEPS):
        grads = {k: (step + 1) * a["g" + k] for k in MYRTLE5_PARAM_NAMES}
        models.nesterov_step(params, grads, velocity, NESTEROV_LR)
        g = flat(grads)
        v = m * v + g  # Nesterov's two lines, deliberately independent of models.nesterov_step
        theta = theta - NESTEROV_LR * (g + m * v)
    error = rel_error([flat(params), flat(velocity)], [theta, v])
    what = f"models.nesterov_step, {NESTEROV_STEPS} steps"
    return judge(what, "v = m v + g; theta -= lr (g + m v)", error, SAME_RTOL[prob.dtype])


def gpu_cases(loss):
    """What each entry of the layer table computes in the GPU rows: (table, inputs) -> arrays."""
    conv = lambda L, a: L.conv3x3_forward(a["h1"], a["W2"], a["b2"])

    def nesterov(L, a):
        params = {k: a[k] for k in MYRTLE5_PARAM_NAMES}  # copies: the step edits them in place
        velocity = {k: a["v" + k] for k in MYRTLE5_PARAM_NAMES}
        L.nesterov_step(params, {k: a["g" + k] for k in MYRTLE5_PARAM_NAMES}, velocity, NESTEROV_LR)
        return list(params.values()) + list(velocity.values())

    return {
        "conv3x3_forward": lambda L, a: conv(L, a)[:1],
        "conv3x3_relu_forward": lambda L, a: L.conv3x3_relu_forward(a["h1"], a["W2"], a["b2"])[:1],
        "conv3x3_backward": lambda L, a: L.conv3x3_backward(a["d_conv"], conv(L, a)[1]),
        "relu_conv3x3_backward":
            lambda L, a: L.relu_conv3x3_backward(a["d_conv"], a["h1"], conv(L, a)[1]),
        "conv3x3_input_grad": lambda L, a: [L.conv3x3_input_grad(a["d_conv"], a["W2"])],
        "conv3x3_cached_forward": lambda L, a: [L.conv3x3_cached_forward(conv(L, a)[1], a["V2"])],
        "avgpool2_forward": lambda L, a: L.avgpool2_forward(a["h2"])[:1],
        "relu_avgpool2_backward":
            lambda L, a: [L.relu_avgpool2_backward(a["d_pool"], a["h2"].shape, a["h2"])],
        "dense_backward": lambda L, a: L.dense_backward(a["d_dense"], (a["g"], a["W5"])),
        "loss_on_batch": lambda L, a: L.loss_on_batch(a["logits"], a["y"], a["gamma"], loss),
        "nesterov_step": nesterov,
    }  # fmt: skip


def gpu_rows(prob, xp):
    """Each entry of fast/layers.py's GPU_LAYERS that is not fast/myrtle5.py's NumPy layer
    itself, run on the backend ``xp`` against CPU_LAYERS on the host on the same inputs (the
    network's own arrays), then the whole gradient and Hv on the GPU table against the
    reference (models.py) on the host."""
    from fast import gpu
    from fast import myrtle5 as fused
    from fast.layers import GPU_LAYERS

    tol = GPU_RTOL_F64
    if prob.dtype == "float32":
        tol = GPU_RTOL_TF32 if gpu.config().tf32 else GPU_RTOL_F32
    a, cases, rows = layer_inputs(prob), gpu_cases(prob.loss), []
    fresh = lambda: {k: v.copy() for k, v in a.items()}
    against = "fast/myrtle5.CPU_LAYERS on the host"
    for name, fast in vars(GPU_LAYERS).items():
        if fast is getattr(fused.CPU_LAYERS, name):
            continue  # the NumPy layer's own function, shared by both tables
        if name not in cases:
            rows.append(Row(f"GPU_LAYERS.{name}", "(no case written)", float("nan"), tol, FAIL))
            continue
        out, ref = (
            cases[name](GPU_LAYERS, dynloss.to_device(fresh(), xp)),
            cases[name](fused.CPU_LAYERS, fresh()),
        )
        rows.append(judge(f"GPU_LAYERS.{name}", against, rel_error(list(out), list(ref)), tol))
    v = prob.rng("gpu hvp").normal(size=models.myrtle5_flatten(prob.params).size)
    grads = lambda m, *a, **kw: m.myrtle5_loss_and_grads(*a, prob.loss, **kw)[1]
    hvp = lambda m, *a, **kw: {"Hv": m.myrtle5_hvp(*a, v, prob.loss, **kw)}
    on_host = (prob.params, prob.X, prob.y, prob.gamma)
    on_device = (dynloss.to_device(prob.params, xp), *(xp.asarray(b) for b in on_host[1:]))
    for what, run in (("myrtle5_loss_and_grads", grads), ("myrtle5_hvp", hvp)):
        out, ref = run(fused, *on_device, layers=GPU_LAYERS), run(models, *on_host)
        error = rel_error(list(out.values()), list(ref.values()))
        rows.append(judge(f"fast/myrtle5.{what}, GPU_LAYERS", "models.py on the host", error, tol))
    return rows


def fused_rows(prob):
    """fast/myrtle5.py's fused network on NumPy (what the commands run) against the reference:
    the same numbers in another order (its bias sums are GEMVs)."""
    from fast import myrtle5 as fused

    v = prob.rng("fused hvp").normal(size=models.myrtle5_flatten(prob.params).size)
    args = (prob.params, prob.X, prob.y, prob.gamma)
    flat = models.myrtle5_flatten
    rows = []
    for what, f in (
        ("myrtle5_loss_and_grads", lambda m: flat(m.myrtle5_loss_and_grads(*args, prob.loss)[1])),
        ("myrtle5_hvp", lambda m: m.myrtle5_hvp(*args, v, prob.loss)),
    ):
        error = rel_error(f(fused), f(models))
        rows.append(judge(f"fast/myrtle5.{what}", "models.py (the reference)", error,
                          SAME_RTOL[prob.dtype]))  # fmt: skip
    return rows


@threadpool_limits.wrap(limits=BLAS_THREADS)
def myrtle5_rows(prob, xp=np):
    """Every row of the Myrtle5 table, in sections; the GPU rows when ``xp`` is CuPy."""
    logits = models.myrtle5_forward(prob.X, prob.params)[0][None]  # (1, N, K)
    first = loss_rows(logits, prob.y, prob.gamma, prob) + gamma_rows(prob.schedule, logits.shape[2])
    a = layer_inputs(prob)
    layers = [layer_row(prob, *spec) for spec in layer_specs(a)] + [nesterov_row(prob, a)]
    named = [
        ("dynloss.py: the loss in the logits, Gamma(t)", first),
        (f"models.py: the Myrtle5 layers ({prob.dtype})", layers),
        (f"models.py: Myrtle5 ({prob.dtype})", myrtle5_network_rows(prob)),
        (f"fast/myrtle5.py: the fused copy ({prob.dtype})", fused_rows(prob)),
    ]
    if xp is not np:
        named.append(("fast/layers.py on the GPU", gpu_rows(prob, xp)))
    return sections(*named)


# ---------------------------------------------------------------------------------------------
# The table and the commands
# ---------------------------------------------------------------------------------------------


def describe(prob):
    """The lines above a check's table: the network, where, the data, Gamma, the step h."""
    P = sum(v.size for v in prob.params.values())
    K, N, s, g = len(prob.gamma), len(prob.X), prob.schedule, prob.gamma
    if prob.model == "MLP":
        D, H = prob.params["W1"].shape[1:]
        net, data = f"the spiral MLP {D} -> {H} -> {K}", f"its {N} training points"
    else:
        side, C_in = prob.X.shape[1], prob.X.shape[3]
        net = f"Myrtle5, c = {prob.params['W1'].shape[3]}, {C_in} -> {K}"
        data = f"{N} random {side}x{side} images, random labels"
    weights = f"class {g.argmax()} {g.max():.3g}, the others {g.min():.3g}"
    return [
        f"check: {net} (P = {P}) at {prob.where}",
        f"data: {data}; loss {prob.loss}; Gamma(t = {s.t}; A = {s.A:g}, T = {s.T:g}): {weights}",
        f"derivatives in {prob.dtype}; central differences in float64, h = {FD_STEP:g}",
        "error: max |a - b| / max(|a|, |b|); kinks: samples left out where a difference crossed "
        "a ReLU kink",
    ]


def format_table(rows):
    """The table's lines: a row per derivative, under its section's title."""
    w1, w2 = max(len(r.what) for r in rows), max(len(r.against) for r in rows)
    tol = lambda t: f"{t:.0e}" if t else "0"
    lines = [
        f"{'#':>3}  {'what':<{w1}}  {'against':<{w2}}  {'error':>7}  {'tol':>5}  kinks  status"
    ]
    section = None
    for i, r in enumerate(rows, start=1):
        if r.section != section:
            section = r.section
            lines.append(f"     {section}")
        error = "-" if np.isnan(r.error) else f"{r.error:.1e}"
        kinks = "-" if r.kinks is None else str(r.kinks)
        lines.append(f"{i:>3}  {r.what:<{w1}}  {r.against:<{w2}}  {error:>7}  {tol(r.tolerance):>5}"
                     f"  {kinks:>5}  {r.status}" + (f" ({r.note})" if r.note else ""))  # fmt: skip
    return lines


def exit_code(rows):
    """0 when no row failed (PASS or KINK everywhere), else 1."""
    return int(any(r.status == FAIL for r in rows))


def report(prob, rows, seconds):
    """Print the header, the table and a summary line; return the exit code."""
    counts = ", ".join(f"{sum(r.status == s for r in rows)} {s}" for s in (PASS, FAIL, KINK))
    print("\n".join(describe(prob) + [""] + format_table(rows) + [""]))
    verdict = "FAILED" if exit_code(rows) else "every derivative agrees"
    print(f"{verdict}: {len(rows)} rows, {counts} ({seconds:.2f} s)")
    return exit_code(rows)


def check_spiral_check(args):
    """``run_spiral.py check``: the problem (the network, its data, loss and schedule; a run
    read with --at is validated), and the memory of its dense matrices."""
    start = time.perf_counter()
    prob = spiral_problem(args.width, args.loss, args.init, args.seed, args.dtype, args.at)
    P = sum(v[0].size for v in prob.params.values())
    return {"problem": prob, "start": start, "memory": memory.dense_check(P),
            "what": f"check with P = {P} parameters (dense Hessians)"}  # fmt: skip


@command(check_spiral_check)
def cmd_spiral_check(args, plan):
    """``run_spiral.py check``: print the spiral table; return 0 (no FAIL) or 1."""
    prob = plan["problem"]
    return report(prob, spiral_rows(prob), time.perf_counter() - plan["start"])


def check_cifar_check(args):
    """``run_cifar.py check``: the backend, the problem (a run read with --at is validated),
    the memory of its weights."""
    xp = checked_backend(args.device)  # --device gpu without CuPy or a GPU: one line, exit 2
    start = time.perf_counter()
    prob = myrtle5_problem(args.width, args.loss, args.seed, args.dtype, args.at)
    W1, W5 = prob.params["W1"], prob.params["W5"]
    need = memory.myrtle5_check(W1.shape[3], W1.shape[2], W5.shape[1])
    return {"problem": prob, "xp": xp, "start": start, "memory": need,
            "what": "the Myrtle5 check"}  # fmt: skip


@command(check_cifar_check)
def cmd_cifar_check(args, plan):
    """``run_cifar.py check``: print the Myrtle5 table; return 0 (no FAIL) or 1."""
    prob = plan["problem"]
    return report(prob, myrtle5_rows(prob, plan["xp"]), time.perf_counter() - plan["start"])


def add_options(p):
    """--loss, --seed, --dtype and --at, shared by both check commands."""
    p.add_argument("--loss", default=None, choices=LOSSES,
                   help="base loss of the network rows (default ce; --at: the run's)")  # fmt: skip
    p.add_argument("--seed", type=SEED, default=0, help="init seed; also the random directions")
    p.add_argument("--dtype", default="float64", choices=DTYPES,
                   help="dtype of the derivatives (the differences are float64)")  # fmt: skip
    p.add_argument("--at", metavar="RUN_FOLDER", help="check at RUN_FOLDER/run.npz's final "
                   "parameters (a train run's) instead of at initialisation")  # fmt: skip


def add_spiral_check_command(sub):
    """The ``check`` subcommand of run_spiral.py (sub: an argparse subparsers object)."""
    p = sub.add_parser("check", help="every hand-written derivative of the MLP, one table")
    p.add_argument("--width", type=COUNT, default=100, help="hidden units H (--at: the run's)")
    p.add_argument("--init", default="standard", choices=INITS, help="initialisation")
    add_options(p)
    p.set_defaults(func=cmd_spiral_check)


def add_cifar_check_command(sub):
    """The ``check`` subcommand of run_cifar.py (sub: an argparse subparsers object)."""
    p = sub.add_parser("check", help="every hand-written derivative of Myrtle5, one table")
    p.add_argument("--width", "--channels", dest="width", type=COUNT, default=MYRTLE5_WIDTH,
                   help="Myrtle5 width c (--at: the run's)")  # fmt: skip
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="gpu: also fast/layers.py's CUDA table on the GPU")  # fmt: skip
    add_options(p)
    p.set_defaults(func=cmd_cifar_check)
