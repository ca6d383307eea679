"""Spiral experiments of the paper (Figs. 2-5): data, batched full-batch training, and the CLI.

Commands
--------
python run_spiral.py                      the demo: width 100, A = 20, T = 1000, 30k steps (~10 s)
python run_spiral.py train --width 100 --A 1 --steps 35000 --out runs/static
python run_spiral.py train --width 100 --A 10 --T 200 --steps 35000 --out runs/fig3-point

Every run writes ``run.npz`` (data, initial and final parameters, the logged history),
``config.json`` (every setting and the package versions) and ``run.png`` (Fig. 4 (a)-(d)).

Symbols: M networks trained side by side, N samples, D = 2 inputs, H hidden units, K = 3 classes,
S logged steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dynloss import LOSSES, class_weights
from models import INITS, MLP_PARAM_NAMES, backend, init_mlp, to_host

K_SPIRAL = 3
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
    """The training spiral of the authors' notebook (cs231n): radii evenly spaced in [0, 1].

    Class j: radius linspace(0, 1, n), angle linspace(2 pi j/K, 2 pi j/K + 4 pi, n) plus
    N(0, noise^2), drawn from the legacy RandomState(seed) class by class. Radius 0 puts one point
    of every class at the origin, so training accuracy cannot exceed (K n - K + 1)/(K n).

    Returns X (K*n, 2) float64, y (K*n,) int64.
    """
    rs = np.random.RandomState(seed)
    radii = np.tile(np.linspace(0.0, 1.0, n_per_class), (K, 1))
    return _arms(radii, noise, rs.randn)


def make_spiral_val(n_per_class=N_PER_CLASS, K=K_SPIRAL, noise=SPIRAL_NOISE, seed=VAL_SEED):
    """Validation spiral: the same arms, radii drawn uniformly at random (sorted), fresh noise.

    The paper's validation set has "a different distribution of the points along the arms": here
    no point sits at a training radius (the training radii are evenly spaced). Note that the
    spiral is easy for a local classifier either way: a 1-nearest-neighbour classifier built on
    the training set scores 0.99 on this set and on a mere reseed of the noise alike.

    Returns X (K*n, 2) float64, y (K*n,) int64.
    """
    rng = np.random.default_rng(seed)
    radii = np.sort(rng.uniform(0.0, 1.0, size=(K, n_per_class)), axis=1)
    return _arms(radii, noise, lambda n: rng.normal(0.0, 1.0, n))


# ---------------------------------------------------------------------------------------------
# Batched full-batch gradient descent
# ---------------------------------------------------------------------------------------------

LOG_FIELDS = ("loss", "dloss", "loss_static", "train_acc", "val_acc")


@dataclass
class TrainSpec:
    """Everything that defines a batch of M training runs (besides the initial parameters).

    A, T, stop_step : (M,) per-network amplitude, period and the step from which Gamma = 1
    lr : learning rate eta; steps : number of updates; log_every : logging interval (steps);
    loss : "ce" or "mse".
    """

    A: np.ndarray
    T: np.ndarray
    stop_step: np.ndarray
    lr: float
    steps: int
    log_every: int
    loss: str = "ce"


def log_steps(steps, log_every):
    """The logged steps: 0, log_every, 2 log_every, ..., and always the final state ``steps``."""
    s = list(range(0, steps, log_every))
    return np.array(s + [steps], dtype=np.int64)


def _forward_loss(P, Xa, y, onehot, gamma, loss, xp):
    """Fused forward pass and loss for a block of networks (the training hot path).

    P : {"W1a": (M, D+1, H) (W1 with b1 as its last row), "W2": (M, H, K), "b2": (M, K)}
    Xa : (N, D+1) inputs with a column of ones;  gamma : (M, K)
    Returns F (M,), dlogits (M, N, K), h (M, N, H), logits (M, N, K).
    """
    N = Xa.shape[0]
    h = Xa @ P["W1a"]  # (M, N, H)  z1 = x W1 + b1
    xp.maximum(h, 0.0, out=h)  # (M, N, H)  h1 = relu(z1), in place on the fresh z1
    logits = h @ P["W2"]  # (M, N, K)
    logits += P["b2"][:, None, :]
    w = gamma[:, y] / N  # (M, N)  Gamma_{y_j} / N
    if loss == "ce":
        shifted = logits - logits.max(axis=-1, keepdims=True)  # (M, N, K)
        e = xp.exp(shifted)
        se = e.sum(axis=-1)  # (M, N)
        ce = xp.log(se) - (shifted * onehot).sum(axis=-1)  # (M, N)  CE_j
        F = (w * ce).sum(axis=1)  # (M,)  Eq. (1) / N
        dlogits = e / se[..., None] - onehot  # (M, N, K)  softmax(z) - onehot(y)
    else:
        dlogits = logits - onehot  # (M, N, K)  g of eq. (12)
        F = 0.5 * (w * (dlogits**2).sum(axis=-1)).sum(axis=1)  # (M,)  Eq. (8), weighted
    dlogits *= w[..., None]  # dF/dz = Gamma_y (softmax(z) - onehot(y)) / N
    return F, dlogits, h, logits


def _backward_update(P, Xa, dlogits, h, lr, xp):
    """Backward pass of :func:`_forward_loss` and the gradient-descent update, in place on P."""
    hT = xp.swapaxes(h, 1, 2)  # (M, H, N)
    dW2 = hT @ dlogits  # (M, H, K)  dF/dW2 = h1^T dz
    db2 = dlogits.sum(axis=1)  # (M, K)
    dh = dlogits @ xp.swapaxes(P["W2"], 1, 2)  # (M, N, H)  dF/dh1 = dz W2^T
    dh *= h > 0  # (M, N, H)  dF/dz1 = dF/dh1 * 1[z1 > 0]
    dW1a = Xa.T @ dh  # (M, D+1, H)  [dF/dW1; dF/db1] = [x 1]^T dF/dz1
    P["W1a"] -= lr * dW1a
    P["W2"] -= lr * dW2
    P["b2"] -= lr * db2


def _pack(params, xp):
    """MLP params (leading M) -> the trainer's fused layout (bias folded into W1a)."""
    W1a = np.concatenate([params["W1"], params["b1"][:, None, :]], axis=1)  # (M, D+1, H)
    copy = lambda a: xp.array(a, dtype=np.float64, copy=True)  # the trainer owns its arrays
    return {"W1a": copy(W1a), "W2": copy(params["W2"]), "b2": copy(params["b2"])}


def _unpack(P):
    """Inverse of :func:`_pack`, to NumPy arrays."""
    host = to_host(P)
    return {"W1": host["W1a"][:, :-1], "b1": host["W1a"][:, -1], "W2": host["W2"], "b2": host["b2"]}


def _metrics(P, Xa, y, onehot, logits, xp):
    """Static cross-entropy and accuracy of logits (M, N, K) on labels y (N,): two (M,) arrays."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    ce = xp.log(xp.exp(shifted).sum(axis=-1)) - (shifted * onehot).sum(axis=-1)  # (M, N)
    acc = (logits.argmax(axis=-1) == y[None, :]).mean(axis=1)
    return ce.mean(axis=1), acc


def _eval(P, Xa, y, onehot, xp):
    """Static loss and accuracy of the block P on (Xa, y): two (M,) arrays."""
    h = xp.maximum(Xa @ P["W1a"], 0.0)
    logits = h @ P["W2"] + P["b2"][:, None, :]
    return _metrics(P, Xa, y, onehot, logits, xp)


def train_block(params, data, spec, xp=np, on_log=None, progress=None):
    """Full-batch gradient descent on the dynamical loss for a block of M networks.

    Parameters
    ----------
    params : dict of NumPy arrays, W1 (M, D, H), b1 (M, H), W2 (M, H, K), b2 (M, K); not modified
    data : (X_train (N, D), y_train (N,), X_val (Nv, D), y_val (Nv,)) NumPy arrays
    spec : :class:`TrainSpec` with (M,) arrays A, T, stop_step
    xp : numpy or cupy
    on_log : optional callback(step, params_host) at every logged step (for spectra)
    progress : optional callable(n_network_steps) advancing a progress bar

    Returns
    -------
    dict with the final params (NumPy, shapes as the input), ``step`` (S,), ``gamma`` (S, M, K),
    every field of LOG_FIELDS as (S, M), ``diverged_step`` (M,) (-1 when finite throughout) and
    ``logged``, the number of rows written (S unless every network diverged).
    Step t's row holds the state before update t: F(t) (eq. 1), F(t) - F(t-1), the static
    cross-entropy and the accuracies; the last row (t = steps) is the final state. Once a network's
    loss is not finite it is marked diverged and its later rows are NaN; when every network of the
    block has diverged, training stops.
    """
    X, y, Xv, yv = data
    M, D, H = params["W1"].shape
    K = params["W2"].shape[2]
    Xa = xp.asarray(np.c_[X, np.ones(len(X))])  # (N, D+1)
    Xva = xp.asarray(np.c_[Xv, np.ones(len(Xv))])  # (Nv, D+1)
    y_d, yv_d = xp.asarray(y), xp.asarray(yv)
    onehot = xp.asarray(np.eye(K)[y])  # (N, K)
    onehot_v = xp.asarray(np.eye(K)[yv])
    P = _pack(params, xp)
    steps_logged = log_steps(spec.steps, spec.log_every)
    S = len(steps_logged)
    hist = {f: np.full((S, M), np.nan) for f in LOG_FIELDS}
    gamma_log = class_weights(steps_logged, spec.A, spec.T, K, spec.stop_step)  # (S, M, K)
    diverged = np.full(M, -1, dtype=np.int64)
    alive = np.ones(M, dtype=bool)
    F_prev = np.full(M, np.nan)
    chunk = 256  # Gamma for this many steps at a time, (chunk, M, K)
    lr = spec.lr
    row = 0
    with np.errstate(all="ignore"):
        for t0 in range(0, spec.steps + 1, chunk):
            ts = np.arange(t0, min(t0 + chunk, spec.steps + 1))
            gammas = xp.asarray(class_weights(ts, spec.A, spec.T, K, spec.stop_step))
            for i, t in enumerate(ts):
                F, dlogits, h, logits = _forward_loss(P, Xa, y_d, onehot, gammas[i], spec.loss, xp)
                F_host = F.get() if hasattr(F, "get") else F
                if row < S and t == steps_logged[row]:
                    loss_s, acc = _metrics(P, Xa, y_d, onehot, logits, xp)
                    loss_v, acc_v = _eval(P, Xva, yv_d, onehot_v, xp)
                    vals = {
                        "loss": F_host,
                        "dloss": F_host - F_prev,
                        "loss_static": loss_s,
                        "train_acc": acc,
                        "val_acc": acc_v,
                    }
                    for f, v in vals.items():
                        hist[f][row] = np.where(alive, to_host({"v": v})["v"], np.nan)
                    if on_log is not None:
                        on_log(int(t), _unpack(P))
                    row += 1
                bad = alive & ~np.isfinite(F_host)
                if bad.any():  # diverged: record the step; its later rows stay NaN
                    diverged[bad] = t
                    alive &= ~bad
                    if not alive.any():
                        break
                F_prev = F_host
                if t == spec.steps:
                    break
                _backward_update(P, Xa, dlogits, h, lr, xp)
                if progress is not None and (t + 1) % spec.log_every == 0:
                    progress(M * spec.log_every)
            if not alive.any():
                break
    out = {
        "params": _unpack(P),
        "step": steps_logged,
        "gamma": gamma_log,
        "diverged_step": diverged,
        "logged": row,
    }
    out.update(hist)
    return out


def train_many(params, data, spec, xp=np, block=None, workers=2, progress=True, desc="training"):
    """Train M networks as independent blocks, in parallel threads on the CPU, one block on a GPU.

    Blocks are trained independently (each network's result depends only on its own parameters
    and settings), so any split gives the same numbers. NumPy releases the GIL inside its kernels,
    so ``workers`` threads keep that many cores busy; BLAS is limited to one thread meanwhile.

    params : W1 (M, D, H), ... NumPy arrays;  spec : :class:`TrainSpec` with (M,) arrays
    block : networks per block (default: all on a GPU, a cache-sized block on the CPU)
    Returns the dict of :func:`train_block` for all M networks.
    """
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    M, _, H = params["W1"].shape
    if block is None:
        block = M if xp is not np else max(1, min(M, 64 // max(1, H // 100)))
    starts = list(range(0, M, block))
    total = M * spec.steps
    bar = tqdm(
        total=total,
        desc=desc,
        unit="net-step",
        unit_scale=True,
        disable=not progress,
        mininterval=0.5,
        smoothing=0.1,
    )

    def run(s):
        sl = slice(s, min(s + block, M))
        sub = {k: v[sl] for k, v in params.items()}
        sub_spec = TrainSpec(
            spec.A[sl],
            spec.T[sl],
            spec.stop_step[sl],
            spec.lr,
            spec.steps,
            spec.log_every,
            spec.loss,
        )
        return train_block(sub, data, sub_spec, xp=xp, progress=bar.update)

    if xp is np and workers > 1 and len(starts) > 1:
        with threadpool_limits(limits=1), ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(run, starts))
    else:
        parts = [run(s) for s in starts]
    bar.close()
    out = {"step": parts[0]["step"], "gamma": np.concatenate([p["gamma"] for p in parts], axis=1)}
    out["params"] = {k: np.concatenate([p["params"][k] for p in parts]) for k in MLP_PARAM_NAMES}
    for f in LOG_FIELDS:
        out[f] = np.concatenate([p[f] for p in parts], axis=1)
    out["diverged_step"] = np.concatenate([p["diverged_step"] for p in parts])
    out["logged"] = max(p["logged"] for p in parts)
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class InputError(ValueError):
    """Bad user input: reported in one line, with nothing written."""


def fail(msg):
    """Print one line to stderr and exit 2."""
    print(f"run_spiral.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def parse_int_list(text, name):
    """'0,1,2' or '0-4' (inclusive) -> list of ints."""
    try:
        if "-" in text.strip("-") and "," not in text:
            a, b = text.split("-")
            return list(range(int(a), int(b) + 1))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{name}: cannot read {text!r} as integers (e.g. 0,1,2 or 0-9)") from None


def check_out_dir(path):
    """Refuse an output path that is an existing file (before any work)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--out {path!r} is a file, not a folder")


def check_common(args):
    """Validate the options shared by every spiral command; raise InputError."""
    if args.width <= 0:
        raise InputError(f"--width must be positive, got {args.width}")
    if args.steps <= 0:
        raise InputError(f"--steps must be positive, got {args.steps}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise InputError(f"--lr must be positive and finite, got {args.lr}")
    if args.log_every <= 0:
        raise InputError(f"--log-every must be positive, got {args.log_every}")
    if args.init not in INITS:
        raise InputError(f"unknown --init {args.init!r}; choose one of {', '.join(INITS)}")
    if args.loss not in LOSSES:
        raise InputError(f"unknown --loss {args.loss!r}; choose one of {', '.join(LOSSES)}")
    check_out_dir(args.out)


def versions():
    """Versions of Python and the packages a result depends on."""
    import matplotlib
    import scipy

    v = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
    }
    try:
        import cupy

        v["cupy"] = cupy.__version__
    except ImportError:
        pass
    return v


def atomic_savez(path, **arrays):
    """np.savez to a temporary file in the same folder, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def add_train_options(p, defaults):
    """The options of ``train`` (also used by ``dynamics``), with per-command defaults."""
    p.add_argument("--width", type=int, default=defaults["width"], help="hidden units H")
    p.add_argument("--A", type=float, default=defaults["A"], help="amplitude (1: static loss)")
    p.add_argument("--T", type=float, default=defaults["T"], help="period in steps")
    p.add_argument("--steps", type=int, default=defaults["steps"], help="gradient-descent steps")
    p.add_argument("--lr", type=float, default=1.0, help="learning rate eta")
    p.add_argument("--seed", default="0", help="init seed(s): 0, or 0,1,2, or 0-4")
    p.add_argument("--init", default="standard", help=f"one of {', '.join(INITS)}")
    p.add_argument("--loss", default="ce", help=f"base loss: {', '.join(LOSSES)}")
    p.add_argument("--log-every", type=int, default=defaults["log_every"], help="steps per log")
    p.add_argument(
        "--no-stop",
        action="store_true",
        help="keep oscillating in the final period (default: Gamma = 1 for the last T)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--out", default=defaults["out"], help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def check_train(args):
    """Validate ``train`` options; return the list of seeds."""
    check_common(args)
    if not args.A >= 1:
        raise InputError(f"--A must be >= 1 (A = 1 is the static loss), got {args.A}")
    if not args.T >= 1:
        raise InputError(f"--T must be >= 1 step, got {args.T}")
    seeds = parse_int_list(args.seed, "--seed")
    if not seeds:
        raise InputError("--seed: give at least one seed")
    return seeds


def run_train(args, seeds, on_log=None):
    """Train len(seeds) networks with one setting; return (data, params0, result, spec)."""
    xp = backend(args.device)
    data = (*make_spiral_train(), *make_spiral_val())
    M = len(seeds)
    params0 = init_mlp(seeds, D=2, H=args.width, K=K_SPIRAL, init=args.init)
    stop = args.steps + 1 if args.no_stop else max(0, args.steps - args.T)
    spec = TrainSpec(
        A=np.full(M, args.A),
        T=np.full(M, args.T),
        stop_step=np.full(M, stop),
        lr=args.lr,
        steps=args.steps,
        log_every=args.log_every,
        loss=args.loss,
    )
    if on_log is None:
        res = train_many(params0, data, spec, xp=xp, progress=not args.quiet)
    else:
        res = train_block(params0, data, spec, xp=xp, on_log=on_log)
    return data, params0, res, spec


def run_arrays(data, params0, res, squeeze):
    """The arrays of run.npz (see README): the seed axis dropped when there is one seed."""
    X, y, Xv, yv = data
    pick = (lambda a, ax: np.take(a, 0, axis=ax)) if squeeze else (lambda a, ax: a)
    S = res["logged"]  # rows logged (fewer when every network diverged)
    arrays = {
        "X_train": X,
        "y_train": y,
        "X_val": Xv,
        "y_val": yv,
        "step": res["step"][:S],
        "gamma": pick(res["gamma"][:S], 1),
        "diverged_step": pick(res["diverged_step"], 0),
    }
    for k in MLP_PARAM_NAMES:
        arrays[k + "_init"] = pick(params0[k], 0)
        arrays[k] = pick(res["params"][k], 0)
    for f in LOG_FIELDS:
        arrays[f] = pick(res[f][:S], 1)
    return arrays


def plot_run(arrays, path, title):
    """Fig. 4 (a)-(d): Gamma_i(t), F(t), F(t) - F(t-1), training and validation accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = arrays["step"]
    first = lambda a: a if a.ndim == 1 else a[:, 0]
    fig, ax = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    gamma = arrays["gamma"] if arrays["gamma"].ndim == 2 else arrays["gamma"][:, 0]
    for i in range(gamma.shape[1]):
        ax[0].plot(step, gamma[:, i], lw=1, label=f"class {i}")
    ax[0].set_ylabel(r"$\Gamma_i(t)$")
    ax[0].legend(loc="upper right", fontsize=7, ncol=3)
    ax[1].plot(step, first(arrays["loss"]), lw=0.8)
    ax[1].set_ylabel(r"$\mathcal{F}(t)$")
    ax[1].set_yscale("log")
    ax[2].plot(step, first(arrays["dloss"]), lw=0.5)
    ax[2].set_ylabel(r"$\mathcal{F}(t)-\mathcal{F}(t-1)$")
    ax[3].plot(step, arrays["train_acc"], lw=0.8, color="C0", label="training")
    ax[3].plot(step, arrays["val_acc"], lw=0.8, color="C1", label="validation")
    ax[3].set_ylabel("accuracy")
    ax[3].set_ylim(0, 1.02)
    ax[3].set_xlabel("step t")
    h, lab = ax[3].get_legend_handles_labels()
    ax[3].legend(h[:1] + h[-1:], lab[:1] + lab[-1:], loc="lower right", fontsize=8)
    for a, letter in zip(ax, "abcd", strict=False):
        a.text(0.01, 0.85, f"({letter})", transform=a.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cmd_train(args):
    """``train``: one setting, one or a few seeds; writes run.npz, config.json, run.png."""
    seeds = check_train(args)
    t0 = time.time()
    data, params0, res, spec = run_train(args, seeds)
    os.makedirs(args.out, exist_ok=True)
    arrays = run_arrays(data, params0, res, squeeze=len(seeds) == 1)
    atomic_savez(os.path.join(args.out, "run.npz"), **arrays)
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config.update(
        seeds=seeds,
        stop_step=int(spec.stop_step[0]),
        versions=versions(),
        seconds=round(time.time() - t0, 2),
        data="spiral (run_spiral.make_spiral_*)",
        diverged_step=[int(d) for d in res["diverged_step"]],
    )
    write_json(os.path.join(args.out, "config.json"), config)
    title = (
        f"width {args.width}, A = {args.A:g}, T = {args.T:g}, lr = {args.lr:g}, "
        f"{args.init} init, seed(s) {args.seed}"
    )
    png = os.path.join(args.out, "run.png")
    plot_run(arrays, png, title)
    for m, s in enumerate(seeds):
        d = res["diverged_step"][m]
        state = (
            f"diverged at step {d}"
            if d >= 0
            else (f"train acc {res['train_acc'][-1, m]:.3f}, val acc {res['val_acc'][-1, m]:.3f}")
        )
        print(f"seed {s}: {state}")
    print(f"wrote {args.out}/run.npz, config.json and the figure {png}")


TRAIN_DEFAULTS = {
    "width": 100,
    "A": 20.0,
    "T": 1000.0,
    "steps": 30000,
    "log_every": 10,
    "out": "runs/spiral-train",
}


def build_parser():
    """The argparse parser of every spiral command."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("train", help="one training run (or a few seeds); Fig. 4 (a)-(d)")
    add_train_options(p, TRAIN_DEFAULTS)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv=None):
    """Entry point: no arguments runs the default ``train`` demo."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv if argv else ["train"])
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.func(args)
    except InputError as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
