"""The ``check`` command: every hand-written derivative against an independent computation, one
row each, printed as one table (``python run_spiral.py check``, ``python run_cifar.py check``).
This module holds the machinery and the spiral MLP's rows; apparatus/check_myrtle5.py holds
Myrtle5's.

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
from apparatus.cli import COUNT, SEED, InputError, check_memory, command
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
MAX_COORDS = 640  # coordinates (or columns) per row: every one at the default width 100
# (P = 603), a random subset beyond, so that width 1000 stays within seconds
DIRECTIONS = 4  # random unit directions of a second-order row
SOFTPLUS_BETA = 10.0  # the softplus network's beta (as in ``onset --betas relu,10``)
BLAS_THREADS = 1  # small matrices: a second OpenBLAS thread only waits, and on a busy 2-core
# machine its hand-offs made the dense eigensolver 100 times slower (3 s instead of 0.03 s)
PASS, FAIL, KINK = "PASS", "FAIL", "KINK"
FD_RTOL = {"float64": FD_RTOL_F64, "float32": FD_RTOL_F32}  # by the dtype of the derivatives
SAME_RTOL = {"float64": SAME_RTOL_F64, "float32": SAME_RTOL_F32}


# The dynamical loss of a check: amplitude A, period T and stop step of eqs. (2)-(5), and the
# step t whose Gamma(t) weighs the network rows (class 1 emphasised, mid-rise: tilted)
Schedule = namedtuple("Schedule", "A T stop t")
SPIRAL_SCHEDULE = Schedule(A=20.0, T=1000.0, stop=29000, t=1300)  # the default spiral run


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
