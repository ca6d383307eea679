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
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

import sweep
from dynloss import LOSSES, class_weights
from models import INITS, MLP_PARAM_NAMES, backend, init_mlp, to_host
from sweep import atomic_savez, versions, write_json

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

LOG_FIELDS = ("loss", "dloss", "loss_static", "train_acc", "val_acc", "val_loss")


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


def _workspace(M, H, N, xp):
    """Buffers reused by every step of :func:`_forward_loss` and :func:`_backward_update`.

    Reusing them matters: a fresh multi-megabyte array per step costs page faults that, on the
    virtual machines we measured, took longer than the arithmetic.
    """
    return {k: xp.empty((M, H, N)) for k in ("h", "mask", "dh")}


def _forward_loss(P, XaT, y, onehotT, gamma, loss, xp, work):
    """Fused forward pass and loss for a block of networks (the training hot path).

    The trainer keeps everything feature-major (samples last), so that the sums over the K
    classes run across contiguous (M, N) slices rather than along a length-K inner axis.

    P : {"W1aT": (M, H, D+1) (W1^T with b1 as its last column), "W2T": (M, K, H), "b2": (M, K, 1)}
    XaT : (D+1, N) inputs with a row of ones;  onehotT : (K, N);  gamma : (M, K)
    work : buffers from :func:`_workspace`, overwritten
    Returns F (M,), dlogits (M, K, N), logits (M, K, N); work["h"], work["mask"] hold h1, 1[z1>0].
    """
    N = XaT.shape[1]
    M, H, D1 = P["W1aT"].shape
    h, mask = work["h"], work["mask"]
    xp.matmul(P["W1aT"].reshape(M * H, D1), XaT, out=h.reshape(M * H, N))  # z1 = x W1 + b1
    xp.greater(h, 0.0, out=mask)  # (M, H, N)  1[z1 > 0] as floats
    h *= mask  # (M, H, N)  h1 = relu(z1) (a multiply is cheaper than maximum here)
    logits = P["W2T"] @ h  # (M, K, N)
    logits += P["b2"]
    w = gamma[:, y] / N  # (M, N)  Gamma_{y_j} / N
    if loss == "ce":
        shifted = logits - logits.max(axis=1, keepdims=True)  # (M, K, N)
        e = xp.exp(shifted)
        se = e.sum(axis=1)  # (M, N)
        ce = xp.log(se) - (shifted * onehotT).sum(axis=1)  # (M, N)  CE_j
        F = (w * ce).sum(axis=1)  # (M,)  Eq. (1) / N
        e /= se[:, None, :]  # (M, K, N)  softmax(z)
        dlogits = e - onehotT  # softmax(z) - onehot(y)
    else:
        dlogits = logits - onehotT  # (M, K, N)  g of eq. (12)
        F = 0.5 * (w * (dlogits**2).sum(axis=1)).sum(axis=1)  # (M,)  Eq. (8), weighted
    dlogits *= w[:, None, :]  # dF/dz = Gamma_y (softmax(z) - onehot(y)) / N
    return F, dlogits, logits


def _backward_update(P, XaT, dlogits, lr, xp, work):
    """Backward pass of :func:`_forward_loss` and the gradient-descent update, in place on P."""
    h, mask, dh = work["h"], work["mask"], work["dh"]
    dW2T = dlogits @ xp.swapaxes(h, 1, 2)  # (M, K, H)  dF/dW2 = h1^T dz (transposed)
    db2 = dlogits.sum(axis=2, keepdims=True)  # (M, K, 1)
    xp.matmul(xp.swapaxes(P["W2T"], 1, 2), dlogits, out=dh)  # (M, H, N)  dF/dh1 = dz W2^T
    dh *= mask  # (M, H, N)  dF/dz1 = dF/dh1 * 1[z1 > 0]
    dW1aT = dh @ XaT.T  # (M, H, D+1)  [dF/dW1; dF/db1] = [x 1]^T dF/dz1 (transposed)
    P["W1aT"] -= lr * dW1aT
    P["W2T"] -= lr * dW2T
    P["b2"] -= lr * db2


def _pack(params, xp):
    """MLP params (leading M) -> the trainer's layout: transposed, b1 folded into W1aT."""
    W1a = np.concatenate([params["W1"], params["b1"][:, None, :]], axis=1)  # (M, D+1, H)
    copy = lambda a: xp.array(np.ascontiguousarray(a), dtype=np.float64)  # the trainer's own
    return {
        "W1aT": copy(W1a.transpose(0, 2, 1)),
        "W2T": copy(params["W2"].transpose(0, 2, 1)),
        "b2": copy(params["b2"][:, :, None]),
    }


def _unpack(P):
    """Inverse of :func:`_pack`, to NumPy arrays."""
    host = to_host(P)
    W1a = host["W1aT"].transpose(0, 2, 1)  # (M, D+1, H)
    return {
        "W1": np.ascontiguousarray(W1a[:, :-1]),
        "b1": np.ascontiguousarray(W1a[:, -1]),
        "W2": np.ascontiguousarray(host["W2T"].transpose(0, 2, 1)),
        "b2": host["b2"][:, :, 0],
    }


def _metrics(y, onehotT, logits, xp):
    """Static cross-entropy and accuracy of logits (M, K, N) on labels y (N,): two (M,) arrays."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    ce = xp.log(xp.exp(shifted).sum(axis=1)) - (shifted * onehotT).sum(axis=1)  # (M, N)
    acc = (logits.argmax(axis=1) == y[None, :]).astype(xp.float64).mean(axis=1)
    return ce.mean(axis=1), acc


def _eval(P, XaT, y, onehotT, xp):
    """Static loss and accuracy of the block P on (XaT, y): two (M,) arrays."""
    h = xp.maximum(P["W1aT"] @ XaT, 0.0)  # (M, H, N)
    logits = P["W2T"] @ h + P["b2"]  # (M, K, N)
    return _metrics(y, onehotT, logits, xp)


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
    Xa = xp.asarray(np.c_[X, np.ones(len(X))].T.copy())  # (D+1, N)
    Xva = xp.asarray(np.c_[Xv, np.ones(len(Xv))].T.copy())  # (D+1, Nv)
    y_d, yv_d = xp.asarray(y), xp.asarray(yv)
    onehot = xp.asarray(np.eye(K)[y].T.copy())  # (K, N)
    onehot_v = xp.asarray(np.eye(K)[yv].T.copy())
    P = _pack(params, xp)
    work = _workspace(M, H, len(X), xp)
    steps_logged = log_steps(spec.steps, spec.log_every)
    S = len(steps_logged)
    hist = {f: np.full((S, M), np.nan) for f in LOG_FIELDS}
    gamma_log = class_weights(steps_logged, spec.A, spec.T, K, spec.stop_step)  # (S, M, K)
    diverged = xp.full(M, -1, dtype=xp.int64)  # kept on the device: no host sync per step
    F_prev = xp.full(M, xp.nan)
    chunk = 256  # Gamma for this many steps at a time, (chunk, M, K); also the host-sync interval
    tick = min(spec.log_every, 1000)  # progress-bar interval
    row = 0
    with np.errstate(all="ignore"):
        for t0 in range(0, spec.steps + 1, chunk):
            ts = np.arange(t0, min(t0 + chunk, spec.steps + 1))
            gammas = xp.asarray(class_weights(ts, spec.A, spec.T, K, spec.stop_step))
            for i, t in enumerate(ts):
                F, dlogits, logits = _forward_loss(
                    P, Xa, y_d, onehot, gammas[i], spec.loss, xp, work
                )
                newly = ~xp.isfinite(F) & (diverged < 0)
                diverged = xp.where(newly, int(t), diverged)  # first non-finite loss
                if row < S and t == steps_logged[row]:
                    loss_s, acc = _metrics(y_d, onehot, logits, xp)
                    loss_v, acc_v = _eval(P, Xva, yv_d, onehot_v, xp)
                    vals = {
                        "loss": F,
                        "dloss": F - F_prev,
                        "loss_static": loss_s,
                        "train_acc": acc,
                        "val_acc": acc_v,
                        "val_loss": loss_v,
                    }
                    host = to_host({**vals, "div": diverged})
                    ok = (host["div"] < 0) | (host["div"] == t)  # keep the diverging value
                    for f in LOG_FIELDS:
                        hist[f][row] = np.where(ok, host[f], np.nan)
                    if on_log is not None:
                        on_log(int(t), _unpack(P))
                    row += 1
                F_prev = F
                if t == spec.steps:
                    break
                _backward_update(P, Xa, dlogits, spec.lr, xp, work)
                if progress is not None and (t + 1) % tick == 0:
                    progress(M * tick)
            if bool((diverged >= 0).all()):  # one host sync per chunk: stop when all diverged
                break
    div = to_host({"d": diverged})["d"]
    if (div >= 0).all():  # every network diverged: keep the rows up to the last divergence
        row = int(np.searchsorted(steps_logged, div.max(), side="right"))
    out = {
        "params": _unpack(P),
        "step": steps_logged,
        "gamma": gamma_log,
        "diverged_step": div,
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
        block = M if xp is not np else max(1, min(M, 800 // H))  # ~2 MB of activations
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


# ---------------------------------------------------------------------------------------------
# Phase diagrams (Fig. 3)
# ---------------------------------------------------------------------------------------------

PHASE_A = "1,2,5,10,20,30,50,70,100"
PHASE_T = "50,100,200,300,500,1000,2000,3000"
PHASE_FIELDS = ("train_acc", "val_acc", "train_loss", "val_loss")


def phase_units(n_T, n_A, seeds, seed_block):
    """The units in a fixed order: (name, T index, A index, seeds) per cell and seed block."""
    units = []
    for ti in range(n_T):
        for ai in range(n_A):
            for b in range(0, len(seeds), seed_block):
                units.append((f"T{ti:03d}_A{ai:03d}_s{b:05d}", ti, ai, seeds[b : b + seed_block]))
    return units


def check_phase(args):
    """Validate ``phase`` options before any work; return (A list, T list, seeds, shard)."""
    check_common(args)
    A_list = sweep.parse_list(args.A, "--A")
    T_list = sweep.parse_list(args.T, "--T")
    if min(A_list) < 1:
        raise InputError(f"--A values must be >= 1 (1 is the static loss), got {min(A_list)}")
    if min(T_list) < 1:
        raise InputError(f"--T values must be >= 1 step, got {min(T_list)}")
    if not args.no_stop and max(T_list) >= args.steps:
        raise InputError(
            f"--steps {args.steps} leaves no oscillating steps for T = {max(T_list):g}"
        )
    if args.seeds <= 0 or args.seed_block <= 0:
        raise InputError("--seeds and --seed-block must be positive")
    if args.batch is not None and args.batch <= 0:
        raise InputError(f"--batch must be positive, got {args.batch}")
    return (
        A_list,
        T_list,
        list(range(args.seed0, args.seed0 + args.seeds)),
        sweep.parse_shard(args.shard),
    )


def phase_config(args, A_list, T_list, seeds):
    """What defines a sweep's results (not how the work is split): stored as sweep.json."""
    return {
        "kind": "spiral-phase",
        "width": args.width,
        "A": A_list,
        "T": T_list,
        "seeds": seeds,
        "seed_block": args.seed_block,
        "steps": args.steps,
        "lr": args.lr,
        "init": args.init,
        "loss": args.loss,
        "stop_last_period": not args.no_stop,
    }


def train_units(units, cfg, xp, batch, workers, progress):
    """Train the networks of several units together; yield (name, arrays) per finished unit."""
    data = (*make_spiral_train(), *make_spiral_val())
    seeds = [s for u in units for s in u[3]]
    A = np.array([cfg["A"][u[2]] for u in units for _ in u[3]], dtype=float)
    T = np.array([cfg["T"][u[1]] for u in units for _ in u[3]], dtype=float)
    steps = cfg["steps"]
    stop = np.maximum(steps - T, 0) if cfg["stop_last_period"] else np.full(len(A), steps + 1)
    spec = TrainSpec(A, T, stop, cfg["lr"], steps, steps, cfg["loss"])
    params = init_mlp(seeds, D=2, H=cfg["width"], K=K_SPIRAL, init=cfg["init"])
    res = train_many(
        params,
        data,
        spec,
        xp=xp,
        workers=workers,
        progress=progress,
        desc=f"{len(units)} cells x seeds",
    )
    final = {
        "train_acc": res["train_acc"][-1],
        "val_acc": res["val_acc"][-1],
        "train_loss": res["loss_static"][-1],
        "val_loss": res["val_loss"][-1],
        "diverged_step": res["diverged_step"],
    }
    start = 0
    for u in units:
        n = len(u[3])
        yield u[0], {k: v[start : start + n] for k, v in final.items()}
        start += n


def cmd_phase(args):
    """``phase``: a (T, A) grid x seeds for one width; resumable, shardable; Fig. 3."""
    A_list, T_list, seeds, (i, n) = check_phase(args)
    cfg = phase_config(args, A_list, T_list, seeds)
    xp = backend(args.device)
    sweep.prepare(args.out, cfg)
    write_json(os.path.join(args.out, "versions.json"), versions())
    units = phase_units(len(T_list), len(A_list), seeds, args.seed_block)
    todo = sweep.pending(args.out, [u[0] for u in sweep.shard(units, i, n)])
    mine = [u for u in units if u[0] in set(todo)]
    if args.batch is None:
        args.batch = (4096 if args.width <= 100 else 1024) if xp is not np else 64
    per_batch = max(1, args.batch // args.seed_block)
    print(
        f"shard {i}/{n}: {len(mine)} of {len(sweep.shard(units, i, n))} units to run "
        f"({len(units)} in the sweep), {per_batch} unit(s) per batch"
    )
    t0 = time.time()
    for b in range(0, len(mine), per_batch):
        for name, arrays in train_units(
            mine[b : b + per_batch], cfg, xp, args.batch, 2, not args.quiet
        ):
            sweep.save_unit(args.out, name, arrays)
    print(f"shard {i}/{n} done in {time.time() - t0:.0f} s")
    if n == 1:
        merge_phase(args.out)
    else:
        print(f"when every shard is done: python run_spiral.py merge --out {args.out}")


def merge_phase(out):
    """Combine the units of a finished sweep into phase.npz and the Fig. 3 figure."""
    cfg = sweep.load_config(out)
    A_list, T_list, seeds = cfg["A"], cfg["T"], cfg["seeds"]
    units = phase_units(len(T_list), len(A_list), seeds, cfg["seed_block"])
    done = sweep.load_units(out, [u[0] for u in units])
    placements = [(name, ti, ai, seeds.index(us[0])) for name, ti, ai, us in units]
    arrays = sweep.assemble(done, placements, len(T_list), len(A_list), len(seeds))
    summary = sweep.summarize(arrays, PHASE_FIELDS, A_list, T_list, seeds, "diverged_step")
    atomic_savez(os.path.join(out, "phase.npz"), **arrays, **summary)
    png = os.path.join(out, "phase.png")
    title = (
        f"spiral, width {cfg['width']}, {len(seeds)} seeds, {cfg['steps']} steps, "
        f"lr {cfg['lr']:g}, {cfg['init']} init"
    )
    sweep.plot_phase(summary, png, title, "period T (steps)")
    sweep.print_table(summary)
    print(f"wrote {out}/phase.npz and the figure {png}")
    return summary


def cmd_merge(args):
    """``merge``: combine the shards of a sweep into phase.npz and its figure."""
    merge_phase(args.out)


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

    p = sub.add_parser("phase", help="a (T, A) grid x seeds: Fig. 3 (resumable, shardable)")
    p.add_argument("--width", type=int, default=100, help="hidden units H")
    p.add_argument("--A", default=PHASE_A, help="amplitudes, e.g. 1,5,10")
    p.add_argument("--T", default=PHASE_T, help="periods in steps, e.g. 100,300")
    p.add_argument("--seeds", type=int, default=50, help="seeds per cell (the paper: 50)")
    p.add_argument("--seed0", type=int, default=0, help="first seed")
    p.add_argument("--seed-block", type=int, default=50, help="seeds per unit of work")
    p.add_argument("--steps", type=int, default=35000)
    p.add_argument("--lr", type=float, default=1.0)
    p.add_argument("--init", default="standard", help=f"one of {', '.join(INITS)}")
    p.add_argument("--loss", default="ce", help=f"base loss: {', '.join(LOSSES)}")
    p.add_argument("--no-stop", action="store_true", help="oscillate in the last period too")
    p.add_argument("--shard", default="0/1", help="i/n: run the i-th of n slices of the work")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="networks trained together (default 64 on the CPU, 1024-4096 on a GPU)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--out", default="runs/phase-w100", help="sweep folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_phase, log_every=1)

    p = sub.add_parser("merge", help="combine the shards of a phase sweep; Fig. 3")
    p.add_argument("--out", required=True, help="sweep folder")
    p.set_defaults(func=cmd_merge)
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
    except (InputError, sweep.SweepError) as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
