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
from sweep import InputError, atomic_savez, check_out_dir, versions, write_json

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


CPU_TILE = 250  # hidden units per tile on the CPU: a tile's activations stay in a 1 MB L2


def _workspace(M, H, N, xp):
    """Buffers reused by every step of :func:`_forward_loss` and :func:`_backward_update`.

    Reusing them matters: a fresh multi-megabyte array per step costs page faults that, on the
    virtual machines we measured, took longer than the arithmetic. On the CPU a wide layer is
    processed in tiles of CPU_TILE hidden units, so that each tile's arrays are still in cache
    for the next operation (width 1000: 25% faster per step); a GPU takes the layer whole.
    """
    tile = H if (xp is not np or H <= CPU_TILE) else CPU_TILE
    return {
        "h": xp.empty((M, H, N)),
        "mask": xp.empty((M, H, N)),
        "dh": xp.empty((M, tile, N)),
        "tiles": [slice(j, min(j + tile, H)) for j in range(0, H, tile)],
    }


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
    if len(work["tiles"]) == 1:
        xp.matmul(P["W1aT"].reshape(M * H, D1), XaT, out=h.reshape(M * H, N))  # z1 = x W1 + b1
        xp.greater(h, 0.0, out=mask)  # (M, H, N)  1[z1 > 0] as floats
        h *= mask  # (M, H, N)  h1 = relu(z1) (a multiply is cheaper than maximum here)
        logits = P["W2T"] @ h  # (M, K, N)
    else:  # the same, tile by tile of hidden units
        logits = xp.zeros((M, P["W2T"].shape[1], N))
        for sl in work["tiles"]:
            hj, mj = h[:, sl], mask[:, sl]
            xp.matmul(P["W1aT"][:, sl], XaT, out=hj)  # (M, Hj, N)  z1 = x W1 + b1
            xp.greater(hj, 0.0, out=mj)  # 1[z1 > 0]
            hj *= mj  # h1 = relu(z1)
            logits += P["W2T"][:, :, sl] @ hj  # (M, K, N)  sum over the tiles of h1 W2
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
    h, mask = work["h"], work["mask"]
    dW2T = xp.empty_like(P["W2T"])  # (M, K, H)
    dW1aT = xp.empty_like(P["W1aT"])  # (M, H, D+1)
    W2 = xp.swapaxes(P["W2T"], 1, 2)  # (M, H, K)
    for sl in work["tiles"]:
        dh = work["dh"][:, : sl.stop - sl.start]  # (M, Hj, N)
        dW2T[:, :, sl] = dlogits @ xp.swapaxes(h[:, sl], 1, 2)  # dF/dW2 = h1^T dz (transposed)
        xp.matmul(W2[:, sl], dlogits, out=dh)  # (M, Hj, N)  dF/dh1 = dz W2^T (transposed)
        dh *= mask[:, sl]  # dF/dz1 = dF/dh1 * 1[z1 > 0]
        dW1aT[:, sl] = dh @ XaT.T  # [dF/dW1; dF/db1] = [x 1]^T dF/dz1 (transposed)
    db2 = dlogits.sum(axis=2, keepdims=True)  # (M, K, 1)
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
        "b2": host["b2"][:, :, 0].copy(),  # not a view of the live training buffer
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
    gamma_log = class_weights(steps_logged, spec.A, spec.T, K, spec.stop_step)  # Eqs. (2)-(5)
    diverged = xp.full(M, -1, dtype=xp.int64)  # kept on the device: no host sync per step
    F_prev = xp.full(M, xp.nan)
    chunk = 256  # Gamma for this many steps at a time, (chunk, M, K); also the host-sync interval
    tick = min(spec.log_every, 1000)  # progress-bar interval
    row = 0
    with np.errstate(all="ignore"):
        for t0 in range(0, spec.steps + 1, chunk):
            ts = np.arange(t0, min(t0 + chunk, spec.steps + 1))
            gammas = xp.asarray(class_weights(ts, spec.A, spec.T, K, spec.stop_step))  # (2)-(5)
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
                    alive = host["div"] < 0
                    keep = alive | (host["div"] == t)  # the loss keeps its diverging value
                    for f in LOG_FIELDS:
                        ok = keep if f in ("loss", "dloss") else alive
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


_WORKER = {}  # in a worker process: the shared progress counter and the parent's pid


def _worker_init(counter, parent):
    """Initialiser of a CPU worker process: one BLAS thread, the shared progress counter."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    _WORKER.update(counter=counter, parent=parent)


def _worker_progress(n):
    """Count n network-steps; a worker whose parent died (e.g. SIGKILL) stops at once."""
    with _WORKER["counter"].get_lock():
        _WORKER["counter"].value += n
    if os.getppid() != _WORKER["parent"]:
        os._exit(1)


def _worker_train(job):
    """Train one block in a worker process: job = (params, data, spec)."""
    return train_block(*job, progress=_worker_progress)


def _can_fork():
    """Worker processes by fork: Linux (elsewhere fork is unavailable or unsafe)."""
    return sys.platform.startswith("linux")


def train_many(params, data, spec, xp=np, block=None, workers=2, progress=True, desc="training"):
    """Train M networks as independent blocks: in ``workers`` processes on the CPU, one block on
    a GPU.

    Blocks are trained independently (each network's result depends only on its own parameters
    and settings), so any split gives the same numbers. On the CPU the blocks go to worker
    processes (fork, one BLAS thread each): threads were held back by the GIL, since a step is
    many short NumPy calls (width 1000: 1,700 network-steps/s on two threads, 2,800 on two
    processes). Where fork is unavailable, threads are used.

    params : W1 (M, D, H), ... NumPy arrays;  spec : :class:`TrainSpec` with (M,) arrays
    block : networks per block (default: all on a GPU, a cache-sized block on the CPU)
    Returns the dict of :func:`train_block` for all M networks.
    """
    import multiprocessing

    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    M, _, H = params["W1"].shape
    if block is None:
        block = M if xp is not np else max(1, min(M, 800 // H))  # ~2 MB of activations
    bar = tqdm(
        total=M * spec.steps,
        desc=desc,
        unit="net-step",
        unit_scale=True,
        disable=not progress,
        mininterval=0.5,
        smoothing=0.1,
    )
    jobs = []
    for s in range(0, M, block):
        sl = slice(s, min(s + block, M))
        sub_spec = TrainSpec(
            spec.A[sl],
            spec.T[sl],
            spec.stop_step[sl],
            spec.lr,
            spec.steps,
            spec.log_every,
            spec.loss,
        )
        jobs.append(({k: v[sl] for k, v in params.items()}, data, sub_spec))
    parallel = xp is np and workers > 1 and len(jobs) > 1
    if parallel and _can_fork():
        ctx = multiprocessing.get_context("fork")
        counter = ctx.Value("q", 0)
        with ctx.Pool(min(workers, len(jobs)), _worker_init, (counter, os.getpid())) as pool:
            pending_parts = pool.map_async(_worker_train, jobs, chunksize=1)
            seen = 0
            while not pending_parts.ready():
                pending_parts.wait(0.5)
                bar.update(counter.value - seen)
                seen = counter.value
            parts = pending_parts.get()
    elif parallel:
        with threadpool_limits(limits=1), ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(lambda job: train_block(*job, progress=bar.update), jobs))
    else:
        parts = [train_block(*job, xp=xp, progress=bar.update) for job in jobs]
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


def fail(msg):
    """Print one line to stderr and exit 2."""
    sweep.fail("run_spiral.py", msg)


def parse_int_list(text, name):
    """'0,1,2' or '0-4' (inclusive) -> list of ints."""
    try:
        if "-" in text.strip("-") and "," not in text:
            a, b = text.split("-")
            return list(range(int(a), int(b) + 1))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{name}: cannot read {text!r} as integers (e.g. 0,1,2 or 0-9)") from None


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
    try:
        backend(args.device)  # --device gpu without CuPy or a GPU: one line, before any work
    except RuntimeError as err:
        raise InputError(str(err)) from None
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
    else:  # one block, one thread: small products are slower on two BLAS threads
        from threadpoolctl import threadpool_limits
        from tqdm import tqdm

        bar = tqdm(
            total=M * args.steps,
            unit="net-step",
            unit_scale=True,
            disable=args.quiet,
            mininterval=0.5,
            desc="training + spectra",
        )
        with threadpool_limits(limits=1):
            res = train_block(params0, data, spec, xp=xp, on_log=on_log, progress=bar.update)
        bar.close()
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


def run_config(args, seeds, spec, t0, **extra):
    """config.json of a run: every option, the seeds, the stop step, versions, wall time."""
    config = {k: v for k, v in vars(args).items() if k != "func"}
    config.update(
        seeds=seeds,
        stop_step=int(spec.stop_step[0]),
        versions=versions(),
        seconds=round(time.time() - t0, 2),
        data="spiral (run_spiral.make_spiral_*)",
    )
    config.update(extra)
    return config


def cmd_train(args):
    """``train``: one setting, one or a few seeds; writes run.npz, config.json, run.png."""
    seeds = check_train(args)
    t0 = time.time()
    data, params0, res, spec = run_train(args, seeds)
    os.makedirs(args.out, exist_ok=True)
    arrays = run_arrays(data, params0, res, squeeze=len(seeds) == 1)
    atomic_savez(os.path.join(args.out, "run.npz"), **arrays)
    config = run_config(args, seeds, spec, t0, diverged_step=[int(d) for d in res["diverged_step"]])
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
    todo = set(todo)
    mine = [u for u in units if u[0] in todo]
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


# ---------------------------------------------------------------------------------------------
# Spectra along a trajectory: Fig. 4 (dynamics) and Fig. 5 (threshold)
# ---------------------------------------------------------------------------------------------

SPECTRA_FIELDS = ("hess_step", "hess_lmax", "hess_topk", "ntk_step", "ntk_lmax", "ntk_traced_lmax")


def check_spectra_options(args):
    """Validate --hess-every, --ntk-every and --top-k."""
    if args.hess_every <= 0:
        raise InputError(f"--hess-every must be positive, got {args.hess_every}")
    if args.ntk_every < 0:
        raise InputError(f"--ntk-every must be >= 0 (0: no NTK), got {args.ntk_every}")
    if args.top_k <= 0:
        raise InputError(f"--top-k must be positive, got {args.top_k}")


def spectra_run(args, seed):
    """One network trained with a SpectraTracker; returns (data, params0, res, spec, spectra)."""
    import spectra

    X, y = make_spiral_train()
    stop = args.steps + 1 if args.no_stop else max(0, args.steps - args.T)
    spec = TrainSpec(
        np.array([args.A]),
        np.array([args.T]),
        np.array([stop]),
        args.lr,
        args.steps,
        args.log_every,
        args.loss,
    )
    tracker = spectra.SpectraTracker(
        X, y, spec, k=args.top_k, every=args.hess_every, ntk_every=args.ntk_every
    )
    data, params0, res, spec = run_train(args, [seed], on_log=tracker)
    if res["diverged_step"][0] < 0:  # the last entries: measured at the final parameters
        tracker(args.steps, res["params"], force=True)
    return data, params0, res, spec, tracker.arrays()


def analyze_stability(arrays, lr, N, T, stop_step):
    """Bifurcations of F, the Hessian threshold (Fig. 4 caption), and when lambda_max settles.

    Returns a dict: ``bif_start, bif_end`` (episodes of F(t) - F(t-1) alternating in sign, from
    F at every logged step), ``thr_start, thr_end`` (instabilities of lambda_max),
    ``threshold``, ``gd_bound`` = 2/eta, ``ntk_bound`` = 2N/eta (eq. 14), and
    ``settled_period``: the number of periods T after which lambda_max never again exceeds the
    threshold while the loss still oscillates (nan when there is no threshold).
    """
    import spectra

    step = arrays["step"]
    contiguous = len(step) > 2 and np.all(np.diff(step[:-1]) == 1)
    if contiguous:
        bif_start, bif_end = spectra.bifurcation_episodes(arrays["loss"], step)
    else:  # F was not logged at every step: period-two bouncing cannot be seen
        bif_start = bif_end = np.zeros(0, dtype=np.int64)
    ok = np.isfinite(arrays["hess_lmax"])
    thr, thr_start, thr_end = spectra.hessian_threshold(
        arrays["hess_step"][ok], arrays["hess_lmax"][ok]
    )
    settled = np.nan
    if np.isfinite(thr):
        osc = ok & (arrays["hess_step"] < stop_step)
        above = arrays["hess_step"][osc][arrays["hess_lmax"][osc] > thr]
        settled = float(above.max() // T + 1) if len(above) else 0.0
    return {
        "bif_start": np.asarray(bif_start, dtype=np.int64),
        "bif_end": np.asarray(bif_end, dtype=np.int64),
        "thr_start": np.asarray(thr_start, dtype=np.int64),
        "thr_end": np.asarray(thr_end, dtype=np.int64),
        "threshold": np.float64(thr),
        "gd_bound": np.float64(2 / lr),
        "ntk_bound": np.float64(2 * N / lr),
        "settled_period": np.float64(settled),
    }


def zoom_window(info, step, T):
    """(t0, t1) around the first instability of lambda_max after the first period (else of F,
    else mid-run)."""
    for s0, s1 in (("thr_start", "thr_end"), ("bif_start", "bif_end")):
        if len(info[s0]):
            later = np.flatnonzero(info[s0] >= T)  # past the first period's transient if we can
            i = later[0] if len(later) else 0
            a, b = int(info[s0][i]), int(info[s1][i])
            pad = max(50, (b - a) // 2)
            return a - pad, b + pad
    mid = int(step[-1] // 2)
    return mid - int(T // 10), mid + int(T // 10)


def zoom_spectra(args, data, params0, spec, window):
    """Replay the run (it is deterministic) up to the end of ``window`` = (t0, t1), measuring
    the spectra every ``args.zoom_every`` steps inside it: the zoomed panels (k), (l)."""
    from threadpoolctl import threadpool_limits

    import spectra

    t0, t1 = max(0, window[0]), min(args.steps, window[1])
    tracker = spectra.SpectraTracker(
        data[0],
        data[1],
        spec,
        k=args.top_k,
        every=args.zoom_every,
        ntk_every=args.zoom_every if args.ntk_every else 0,
    )
    replay = TrainSpec(spec.A, spec.T, spec.stop_step, spec.lr, t1, 1, spec.loss)
    inside = lambda step, params: tracker(step, params) if t0 <= step <= t1 else None
    with threadpool_limits(limits=1):
        train_block(params0, data, replay, xp=backend(args.device), on_log=inside)
    return {"zoom_" + k: v for k, v in tracker.arrays().items()}


def plot_dynamics(arrays, info, path, title):
    """Fig. 4: (a) Gamma, (b) F, (c) F(t) - F(t-1), (d) accuracies, (e) Hessian lambda_max with
    the threshold, (f) NTK lambda_max with the eq. (14) bound; (g)-(l) the same zoomed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = arrays["step"]
    t0, t1 = zoom_window(info, step, arrays["T"])
    fig, ax = plt.subplots(6, 2, figsize=(13, 13), sharex="col")
    for col, (lo, hi) in enumerate(((step[0], step[-1]), (t0, t1))):
        sel = (step >= lo) & (step <= hi)
        pre = "zoom_" if col == 1 and "zoom_hess_step" in arrays else ""
        sp = {k: arrays[pre + k] for k in SPECTRA_FIELDS}
        hs = (sp["hess_step"] >= lo) & (sp["hess_step"] <= hi)
        ns = (sp["ntk_step"] >= lo) & (sp["ntk_step"] <= hi)
        a = ax[:, col]
        for i in range(arrays["gamma"].shape[1]):
            a[0].plot(step[sel], arrays["gamma"][sel, i], lw=1)
        a[1].plot(step[sel], arrays["loss"][sel], lw=0.6)
        a[1].set_yscale("log")
        a[2].plot(step[sel], arrays["dloss"][sel], lw=0.4)
        a[3].plot(step[sel], arrays["train_acc"][sel], lw=0.6, label="training")
        a[3].plot(step[sel], arrays["val_acc"][sel], lw=0.6, label="validation")
        a[4].plot(sp["hess_step"][hs], sp["hess_lmax"][hs], lw=0.6, color="k")
        if np.isfinite(info["threshold"]):
            a[4].axhline(info["threshold"], ls="--", color="C3", lw=1, label="threshold")
        a[4].axhline(info["gd_bound"], ls=":", color="C7", lw=1, label=r"$2/\eta$")
        a[5].plot(sp["ntk_step"][ns], sp["ntk_lmax"][ns], lw=0.6, label="full (NK x NK)")
        a[5].plot(sp["ntk_step"][ns], sp["ntk_traced_lmax"][ns], lw=0.6, label="traced (N x N)")
        a[5].axhline(info["ntk_bound"], ls=":", color="C7", lw=1, label=r"$2N/\eta$ (eq. 14)")
        a[5].set_xlabel("step t")
        for s0, color in (("thr_start", "g"), ("thr_end", "r")):
            for t in info[s0]:
                if lo <= t <= hi:
                    for row in a[1:]:
                        row.axvline(t, ls="--", color=color, lw=0.5, alpha=0.6)
        letters = "abcdef" if col == 0 else "ghijkl"
        for row, letter in zip(a, letters, strict=True):
            row.text(0.01, 0.85, f"({letter})", transform=row.transAxes)
    labels = (
        r"$\Gamma_i(t)$",
        r"$\mathcal{F}(t)$",
        r"$\mathcal{F}(t)-\mathcal{F}(t-1)$",
        "accuracy",
        r"Hessian $\lambda_{max}$",
        r"NTK $\lambda_{max}$",
    )
    for row, label in zip(ax[:, 0], labels, strict=True):
        row.set_ylabel(label)
    ax[3, 0].legend(fontsize=7, loc="lower right")
    ax[4, 0].legend(fontsize=7, loc="upper right")
    ax[5, 0].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def cmd_dynamics(args):
    """``dynamics``: one run with the Hessian and NTK spectra along it (Fig. 4)."""
    if args.quick:
        if (args.T, args.steps) != (DYNAMICS_DEFAULTS["T"], DYNAMICS_DEFAULTS["steps"]):
            raise InputError("--quick sets --T and --steps: give one or the other")
        args.T, args.steps = QUICK["T"], QUICK["steps"]
    seeds = check_train(args)
    check_spectra_options(args)
    if len(seeds) != 1:
        raise InputError("dynamics follows one network: give one --seed")
    t0 = time.time()
    data, params0, res, spec, spec_arrays = spectra_run(args, seeds[0])
    os.makedirs(args.out, exist_ok=True)
    arrays = run_arrays(data, params0, res, squeeze=True)
    arrays.update(spec_arrays)
    arrays["T"] = np.float64(args.T)
    info = analyze_stability(arrays, args.lr, len(data[0]), args.T, int(spec.stop_step[0]))
    arrays.update(info)
    if args.zoom_every > 0:
        window = zoom_window(info, arrays["step"], args.T)
        arrays.update(zoom_spectra(args, data, params0, spec, window))
    atomic_savez(os.path.join(args.out, "run.npz"), **arrays)
    config = run_config(
        args,
        seeds,
        spec,
        t0,
        threshold=float(info["threshold"]),
        settled_period=float(info["settled_period"]),
        bifurcation_episodes=len(info["bif_start"]),
        instabilities=len(info["thr_start"]),
    )
    write_json(os.path.join(args.out, "config.json"), config)
    png = os.path.join(args.out, "dynamics.png")
    title = (
        f"width {args.width}, A = {args.A:g}, T = {args.T:g}, lr = {args.lr:g}, "
        f"{args.steps} steps, Hessian every {args.hess_every}, NTK every {args.ntk_every}"
    )
    plot_dynamics(arrays, info, png, title)
    print(
        f"Hessian threshold {info['threshold']:.4g} (2/lr = {2 / args.lr:.4g}) from "
        f"{len(info['thr_start'])} instabilities; {len(info['bif_start'])} bifurcation episodes "
        f"of F; lambda_max stays below the threshold after {info['settled_period']:g} periods"
    )
    print(
        f"final train acc {arrays['train_acc'][-1]:.3f}, val acc {arrays['val_acc'][-1]:.3f}; "
        f"final Hessian lambda_max {arrays['hess_lmax'][-1]:.4g}, NTK lambda_max "
        f"{arrays['ntk_lmax'][-1]:.4g}"
        if len(arrays["ntk_lmax"])
        else ""
    )
    print(f"wrote {args.out}/run.npz, config.json and the figure {png}")


def threshold_units(widths, lrs):
    """Fig. 5 units: (name, width, lr, kind) for the dynamical runs and the static ones."""
    units = [(f"w{w}_lr{lr:g}", w, lr, "dynamic") for w in widths for lr in lrs]
    return units + [(f"static_w{w}", w, 1.0, "static") for w in widths]


def cmd_threshold(args):
    """``threshold``: Fig. 5, the Hessian threshold against the learning rate, and static runs."""
    check_common(args)
    check_spectra_options(args)
    widths = [int(w) for w in sweep.parse_list(args.widths, "--widths", int)]
    lrs = sweep.parse_list(args.lrs, "--lrs")
    if min(widths) <= 0 or min(lrs) <= 0:
        raise InputError("--widths and --lrs must be positive")
    if not args.A >= 1:
        raise InputError(f"--A must be >= 1, got {args.A}")
    if not (args.T0 / max(lrs) >= 1 and args.steps0 > args.T0 and args.static_steps > 0):
        raise InputError(
            f"need T0/eta >= 1 for every eta, steps0 > T0 (an oscillating part) and "
            f"--static-steps > 0; got T0 {args.T0:g}, steps0 {args.steps0}, "
            f"static steps {args.static_steps}"
        )
    cfg = {
        "kind": "spiral-threshold",
        "widths": widths,
        "lrs": lrs,
        "A": args.A,
        "T0": args.T0,
        "steps0": args.steps0,
        "static_steps": args.static_steps,
        "seed": args.seed,
        "init": args.init,
        "loss": args.loss,
        "hess_every": args.hess_every,
    }
    sweep.prepare(args.out, cfg)
    units = threshold_units(widths, lrs)
    todo = sweep.pending(args.out, [u[0] for u in units])
    for name, w, lr, kind in units:
        if name not in todo:
            continue
        sub = argparse.Namespace(**vars(args))
        sub.width, sub.lr, sub.no_stop, sub.top_k, sub.ntk_every = w, lr, False, 1, 0
        if kind == "dynamic":  # the Fig. 4 protocol rescaled: T = T0/eta, steps = steps0/eta
            sub.T, sub.steps = args.T0 / lr, int(round(args.steps0 / lr))
        else:
            sub.A, sub.T, sub.steps = 1.0, args.T0, args.static_steps
        sub.log_every = args.hess_every
        print(f"{name}: width {w}, lr {lr:g}, A {sub.A:g}, T {sub.T:g}, {sub.steps} steps")
        data, _, res, spec, sa = spectra_run(sub, args.seed)
        info = analyze_stability(
            {**sa, "step": res["step"], "loss": res["loss"][:, 0]},
            lr,
            len(data[0]),
            sub.T,
            int(spec.stop_step[0]),
        )
        sweep.save_unit(
            args.out,
            name,
            {
                "hess_step": sa["hess_step"],
                "hess_lmax": sa["hess_lmax"],
                "threshold": info["threshold"],
                "thr_start": info["thr_start"],
                "thr_end": info["thr_end"],
                "train_acc": res["train_acc"][-1, 0],
                "val_acc": res["val_acc"][-1, 0],
            },
        )
    merge_threshold(args.out)


def merge_threshold(out):
    """Fit the threshold's exponent per width and for all widths; threshold.npz and the figure."""
    from scipy.stats import linregress

    cfg = sweep.load_config(out)
    widths, lrs = cfg["widths"], np.array(cfg["lrs"])
    units = threshold_units(widths, cfg["lrs"])
    done = sweep.load_units(out, [u[0] for u in units])
    import spectra

    def threshold_of(unit):  # recomputed from the stored lambda_max series
        ok = np.isfinite(unit["hess_lmax"])
        return spectra.hessian_threshold(unit["hess_step"][ok], unit["hess_lmax"][ok])[0]

    thr = np.array([[threshold_of(done[f"w{w}_lr{lr:g}"]) for lr in lrs] for w in widths])
    fits = {}
    for key, rows in [(str(w), thr[i : i + 1]) for i, w in enumerate(widths)] + [("all", thr)]:
        x = np.log(np.tile(lrs, (len(rows), 1))).ravel()
        yv = np.log(rows).ravel()
        ok = np.isfinite(yv)
        if ok.sum() >= 3:
            r = linregress(x[ok], yv[ok])
            fits[key] = (r.slope, r.stderr, r.intercept)
        else:
            fits[key] = (np.nan, np.nan, np.nan)
    arrays = {
        "widths": np.array(widths),
        "lrs": lrs,
        "threshold": thr,
        "slope": np.array([fits[str(w)][0] for w in widths]),
        "slope_stderr": np.array([fits[str(w)][1] for w in widths]),
        "slope_all": np.float64(fits["all"][0]),
        "slope_all_stderr": np.float64(fits["all"][1]),
    }
    for w in widths:
        arrays[f"static_w{w}_hess_step"] = done[f"static_w{w}"]["hess_step"]
        arrays[f"static_w{w}_hess_lmax"] = done[f"static_w{w}"]["hess_lmax"]
        arrays[f"static_w{w}_train_acc"] = done[f"static_w{w}"]["train_acc"]
    atomic_savez(os.path.join(out, "threshold.npz"), **arrays)
    png = os.path.join(out, "threshold.png")
    plot_threshold(arrays, fits, cfg, png)
    for i, w in enumerate(widths):
        print(
            f"width {w}: threshold "
            + " ".join(f"{t:.4g}" for t in thr[i])
            + f" at lr {' '.join(f'{v:g}' for v in lrs)}; exponent {fits[str(w)][0]:.3f} "
            f"+- {fits[str(w)][1]:.3f}"
        )
    print(
        f"all widths: exponent {fits['all'][0]:.3f} +- {fits['all'][1]:.3f} (paper about -0.9, "
        "eq. (7): -1)"
    )
    print(f"wrote {out}/threshold.npz and the figure {png}")
    return arrays


def plot_threshold(arrays, fits, cfg, path):
    """Fig. 5: (a) threshold against eta (log-log) with fits; (b, c) static runs against it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths, lrs, thr = arrays["widths"], arrays["lrs"], arrays["threshold"]
    fig, ax = plt.subplots(1, 1 + len(widths), figsize=(5 + 4.5 * len(widths), 4))
    grid = np.geomspace(lrs.min(), lrs.max(), 50)
    for i, w in enumerate(widths):
        slope, err, icpt = fits[str(w)]
        ax[0].plot(lrs, thr[i], "o", color=f"C{i}", label=f"width {w}")
        if np.isfinite(slope):
            ax[0].plot(
                grid,
                np.exp(icpt) * grid**slope,
                "-",
                color=f"C{i}",
                lw=0.8,
                label=f"fit: exponent {slope:.2f} ± {err:.2f}",
            )
    ax[0].plot(grid, 2 / grid, ":", color="C7", label=r"$2/\eta$")
    ax[0].set_xscale("log")
    ax[0].set_yscale("log")
    ax[0].set_xticks(lrs, [f"{v:g}" for v in lrs])
    ax[0].minorticks_off()
    ax[0].set_xlabel(r"learning rate $\eta$")
    ax[0].set_ylabel(r"Hessian $\lambda_{max}$ threshold")
    ax[0].legend(fontsize=7)
    ax[0].set_title("(a)")
    at1 = np.nanmean(thr[:, np.argmin(np.abs(np.log(lrs)))])  # threshold at the lr nearest 1
    for i, w in enumerate(widths):
        a = ax[1 + i]
        a.plot(
            arrays[f"static_w{w}_hess_step"], arrays[f"static_w{w}_hess_lmax"], lw=0.6, color="k"
        )
        if np.isfinite(at1):
            a.axhline(at1, ls="--", color="C3", label="threshold from (a)")
        a.set_yscale("log")
        a.set_xlabel("step t")
        a.set_title(
            f"({'bc'[i] if i < 2 else i}) static loss (A = 1), lr 1, width {w}, "
            f"train acc {float(arrays[f'static_w{w}_train_acc']):.2f}",
            fontsize=9,
        )
        a.legend(fontsize=7)
    fig.suptitle(
        f"Fig. 5: A = {cfg['A']:g}, T = {cfg['T0']:g}/eta, {cfg['steps0']}/eta steps, "
        f"Hessian every {cfg['hess_every']} steps",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


DYNAMICS_DEFAULTS = {
    "width": 100,
    "A": 70.0,
    "T": 5000.0,
    "steps": 70000,
    "log_every": 1,
    "out": "runs/fig4",
}
QUICK = {"T": 1000.0, "steps": 14000}  # dynamics --quick: the same A, periods 5x shorter

TRAIN_DEFAULTS = {
    "width": 100,
    "A": 20.0,
    "T": 1000.0,
    "steps": 30000,
    "log_every": 10,
    "out": "runs/spiral-train",
}


def add_spectra_options(p):
    """How often the spectra are measured (both in steps; an odd stride shows period-two
    bouncing, which an even one never samples on both branches)."""
    p.add_argument("--hess-every", type=int, default=25, help="steps between Hessian lambda_max")
    p.add_argument("--ntk-every", type=int, default=25, help="steps between NTK lambda_max (0: no)")


def build_parser():
    """The argparse parser of every spiral command."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("train", help="one training run (or a few seeds); Fig. 4 (a)-(d)")
    add_train_options(p, TRAIN_DEFAULTS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("dynamics", help="one run with Hessian and NTK spectra: Fig. 4")
    add_train_options(p, DYNAMICS_DEFAULTS)
    add_spectra_options(p)
    p.add_argument("--top-k", type=int, default=1, help="Hessian eigenvalues kept (top k)")
    p.add_argument(
        "--zoom-every",
        type=int,
        default=1,
        help="replay the zoomed window with spectra every this many steps (0: off)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a shorter look: T = {QUICK['T']:g}, {QUICK['steps']} steps",
    )
    p.set_defaults(func=cmd_dynamics)

    p = sub.add_parser("threshold", help="Hessian threshold against the learning rate: Fig. 5")
    p.add_argument("--widths", default="100,1000")
    p.add_argument("--lrs", default="0.5,1,2,4", help="learning rates eta")
    p.add_argument("--A", type=float, default=70.0)
    p.add_argument("--T0", type=float, default=5000.0, help="T = T0/eta")
    p.add_argument("--steps0", type=int, default=70000, help="steps = steps0/eta")
    p.add_argument("--static-steps", type=int, default=35000, help="steps of the A = 1 runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="standard", help=f"one of {', '.join(INITS)}")
    p.add_argument("--loss", default="ce", help=f"base loss: {', '.join(LOSSES)}")
    add_spectra_options(p)
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--out", default="runs/fig5", help="output folder (resumable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_threshold, width=100, steps=1, lr=1.0, log_every=1, top_k=1)

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
    except InputError as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
