"""The fast spiral trainer: spiral.train_reference for many MLPs at once, fused and batched.

Symbols: M networks trained side by side, N samples, D = 2 inputs, H hidden units, K = 3 classes,
S logged steps. ``train_block`` trains a block of M networks in one process; ``train_many``
splits a larger batch into blocks for worker processes (CPU, apparatus/workers.py) or trains it
whole (GPU). Both return what spiral.train_reference returns, and the commands write the same
files from either (``--reference`` picks the reference).

Which reference each piece replaces (tests/test_spiral.py ties every pair)
---------------------------------------------------------------------------
    this module                         the reference it copies
    _logits                             models.mlp_forward (logits only)
    _forward_loss                       dynloss.loss_forward + dynloss.loss_backward
    _backward_update                    models.mlp_backward + the update of spiral.train_reference
    _eval, _flush_logs                  the logged metrics: dynloss.cross_entropy, accuracy (called)
    train_block                         the loop of spiral.train_reference, in chunks of steps
    the result                          spiral.finish_run (called)

The trainer's layout, and how it maps onto models.mlp_*
-------------------------------------------------------
The step is a fused copy of ``models.mlp_loss_and_grads`` followed by a gradient-descent step
(eq. 1 with the weights of eqs. 2-5), re-laid-out for speed. Everything is feature-major
(samples last), so that the sums over the K classes run across contiguous (M, N) slices, and the
hidden bias is folded into the first layer:

    models.py (row vectors)                    this trainer (columns)
    X (N, D)                                   XaT = [X, 1]^T (D+1, N)
    W1 (M, D, H), b1 (M, H)                    W1aT = [W1; b1]^T (M, H, D+1)
    W2 (M, H, K), b2 (M, K)                    W2T = W2^T (M, K, H), b2 (M, K, 1)
    z1 = X W1 + b1 (M, N, H)                   z1^T = W1aT XaT (M, H, N)
    logits = h1 W2 + b2 (M, N, K)              logits^T = W2T h1^T + b2 (M, K, N)
    dF/dz (M, N, K)                            dlogits (M, K, N), its transpose

:func:`pack` and :func:`unpack` convert between the two. The fused trainer and the layer-by-layer
reference give the same step to 1e-13 and the same logs to 1e-9 (tests/test_spiral.py); it keeps
its own copy because the reference's order of operations and allocations would lose what makes it
fast (1.5-2.3 times the reference on one network and one BLAS thread, more with many networks:
docs/speed.md).

The fused step: everything through the hidden mask
---------------------------------------------------
The hidden activations are written once per step, as the 0/1 mask m = 1[z1 > 0] (M, H, N), and
both passes go through it; with D+1 = 3 inputs (the bias row included) and K = 3 classes that
replaces five thin products and three elementwise passes over (M, H, N) arrays by two GEMMs with
K(D+1) = 9 rows or columns. Since h1_jn = m_jn z1_jn = m_jn sum_d W1a_dj x_dn:

    logits_kn  = sum_j W2_jk h1_jn + b2_k           = sum_d x_dn (G m)_kdn + b2_k
    dF/dW2_jk  = sum_n h1_jn dz_kn                  = sum_d W1a_dj R_kdj
    dF/dW1a_dj = sum_n x_dn m_jn sum_k W2_jk dz_kn  = sum_k W2_jk R_kdj

    with G_kd,j = W2_jk W1a_dj and R_kdj = sum_n dz_kn x_dn m_jn,

with dz = dF/dlogits; R is one product Q m^T with Q_kd,n = dz_kn x_dn. The sums are the same
numbers in another order (equal to about 1e-16 relative). On the CPU a wide layer is processed in
tiles of ``CPU_TILE`` hidden units, blocks of networks go to worker processes, and every buffer
is allocated once per block.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from tqdm import tqdm

from apparatus import signals
from apparatus.workers import WORKERS, run_jobs
from dynloss import accuracy, class_weights, cross_entropy, to_host
from dynloss import diverged as loss_diverged
from models import MLP_PARAM_NAMES
from spiral import LOG_FIELDS, finish_run, log_steps

GAMMA_CHUNK = 256  # Gamma for this many steps at a time, (chunk, M, K); also the host-sync interval
PROGRESS_TICK = 1000  # at most this many steps between progress-bar updates
LOG_BUFFER_BYTES = 1 << 25  # logged logits kept between two passes of the metrics (32 MiB)
CPU_BLOCK_UNITS = 400  # a CPU block holds about this many hidden units (M H): ~1 MB of mask
CPU_TILE = 250  # hidden units per tile on the CPU: a tile's (M, Hj, N) mask stays in L2 cache


def _workspace(M, H, N, Nv, xp):
    """The (M, H, N) buffers of the training and validation masks 1[z1 > 0], reused by every
    step (a fresh multi-megabyte array per step costs page faults that can take longer than the
    arithmetic), and the tiles of hidden units: on the CPU a
    wide layer is processed CPU_TILE units at a time, so that each tile is still in cache for
    the next operation; a GPU takes the layer whole."""
    tile = H if (xp is not np or H <= CPU_TILE) else CPU_TILE
    return {
        "mask": xp.empty((M, H, N)),
        "mask_val": xp.empty((M, H, Nv)),
        "tiles": [slice(j, min(j + tile, H)) for j in range(0, H, tile)],
    }


def _logits(P, XaT, mask, tiles, xp):
    """The forward pass of a block through the hidden mask alone (module docstring, "The fused
    step"): writes mask = 1[z1 > 0] (M, H, N) and returns logits^T (M, K, N).

    P : {"W1aT": (M, H, D+1), "W2T": (M, K, H), "b2": (M, K, 1)};  XaT : (D+1, N)
    """
    M, H, D1 = P["W1aT"].shape
    K, N = P["W2T"].shape[1], XaT.shape[1]
    W1a = P["W1aT"].transpose(0, 2, 1)  # (M, D+1, H), a view
    G = (P["W2T"][:, :, None, :] * W1a[:, None, :, :]).reshape(M, K * D1, H)  # W2_jk W1a_dj
    if len(tiles) == 1:
        xp.matmul(P["W1aT"].reshape(M * H, D1), XaT, out=mask.reshape(M * H, N))  # z1^T
        xp.greater(mask, 0.0, out=mask)  # (M, H, N)  1[z1 > 0], in place
        GM = G @ mask  # (M, K(D+1), N)  sum_j W2_jk W1a_dj m_jn
    else:  # the same, tile by tile of hidden units
        GM = xp.zeros((M, K * D1, N))
        for sl in tiles:
            m = mask[:, sl]  # (M, Hj, N)
            xp.matmul(P["W1aT"][:, sl], XaT, out=m)  # z1^T of the tile
            xp.greater(m, 0.0, out=m)  # 1[z1 > 0]
            GM += G[:, :, sl] @ m
    logits = xp.einsum("mkdn,dn->mkn", GM.reshape(M, K, D1, N), XaT)  # (h1 W2)^T = sum_d x_dn GM
    logits += P["b2"]  # (M, K, N)
    return logits


def _forward_loss(P, XaT, onehotT, w, loss, xp, work):
    """Fused forward pass and loss for a block of networks (the training hot path).

    The trainer keeps everything feature-major (samples last), so that the sums over the K
    classes run across contiguous (M, N) slices rather than along a length-K inner axis.

    P : {"W1aT": (M, H, D+1) (W1^T with b1 as its last column), "W2T": (M, K, H), "b2": (M, K, 1)}
    XaT : (D+1, N) inputs with a row of ones;  onehotT : (K, N)
    w : (M, N) the sample weights Gamma_{y_j}(t) / N of eq. (1)
    work : buffers from :func:`_workspace`; work["mask"] is overwritten with 1[z1 > 0]
    Returns F (M,), dlogits (M, K, N), logits (M, K, N), and the per-sample cross-entropy
    CE_j (M, N) for "ce" (None for "mse"): the static loss of a logged row.
    """
    logits = _logits(P, XaT, work["mask"], work["tiles"], xp)  # (M, K, N)
    ce = None
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
    dlogits *= w[:, None, :]  # dF/dz = Gamma_y (softmax(z) - onehot(y)) / N (MSE: (z - onehot))
    return F, dlogits, logits, ce


def _backward_update(P, XaT, dlogits, lr, xp, work):
    """Backward pass of :func:`_forward_loss` through the same mask, and the gradient-descent
    update, in place on P (module docstring, "The fused step")."""
    M, H, D1 = P["W1aT"].shape
    K, N = dlogits.shape[1], dlogits.shape[2]
    Qt = (dlogits[:, :, None, :] * XaT).reshape(M, K * D1, N)  # (M, K(D+1), N)  dz_kn x_dn
    R = (Qt @ work["mask"].transpose(0, 2, 1)).reshape(M, K, D1, H)  # sum_n dz_kn x_dn m_jn
    W1a = P["W1aT"].transpose(0, 2, 1)  # (M, D+1, H), a view
    dW2T = xp.einsum("mkdj,mdj->mkj", R, W1a)  # (M, K, H)  sum_n dz_kn h_jn = (dF/dW2)^T
    dW1a = xp.einsum("mkdj,mkj->mdj", R, P["W2T"])  # (M, D+1, H)  [dF/dW1; dF/db1]
    db2 = dlogits.sum(axis=2, keepdims=True)  # (M, K, 1)  dF/db2
    P["W1aT"] -= lr * dW1a.transpose(0, 2, 1)
    P["W2T"] -= lr * dW2T
    P["b2"] -= lr * db2


def pack(params, xp):
    """MLP params W1 (M, D, H), b1 (M, H), W2 (M, H, K), b2 (M, K) -> the trainer's layout:
    W1aT (M, H, D+1) with b1 folded in, W2T (M, K, H), b2 (M, K, 1), own copies on ``xp``."""
    W1a = np.concatenate([params["W1"], params["b1"][:, None, :]], axis=1)  # (M, D+1, H)
    copy = lambda a: xp.array(np.ascontiguousarray(a), dtype=np.float64)  # the trainer's own
    return {
        "W1aT": copy(W1a.transpose(0, 2, 1)),
        "W2T": copy(params["W2"].transpose(0, 2, 1)),
        "b2": copy(params["b2"][:, :, None]),
    }


def unpack(P):
    """Inverse of :func:`pack`: W1 (M, D, H), b1 (M, H), W2 (M, H, K), b2 (M, K) NumPy arrays."""
    host = to_host(P)
    W1a = host["W1aT"].transpose(0, 2, 1)  # (M, D+1, H)
    return {
        "W1": np.ascontiguousarray(W1a[:, :-1]),
        "b1": np.ascontiguousarray(W1a[:, -1]),
        "W2": np.ascontiguousarray(host["W2T"].transpose(0, 2, 1)),
        "b2": host["b2"][:, :, 0].copy(),  # not a view of the live training buffer
    }


def _metrics(y, logits, ce=None):
    """Static cross-entropy and accuracy of logits (M, K, N) on labels y (N,): two (M,) arrays,
    from dynloss (on the transposed view). ce : the per-sample cross-entropy (M, N) where it is
    known already (the training loss of :func:`_forward_loss`)."""
    z = logits.transpose(0, 2, 1)  # (M, N, K), a view
    return (cross_entropy(z, y) if ce is None else ce.mean(axis=1)), accuracy(z, y)


def _eval(P, XaT, y, xp, work):
    """Static loss and accuracy of the block P on (XaT, y): two (M,) arrays."""
    logits = _logits(P, XaT, work["mask_val"], work["tiles"], xp)  # (M, K, Nv)
    return _metrics(y, logits)


def _flush_logs(hist, pending, bufs, Fs, F_before, y, xp):
    """Write the training columns of the logged rows ``pending`` [(row, index in the chunk)]:
    F and F(t) - F(t-1) from the chunk's losses Fs (chunk, M) (F_before: the loss of the step
    before the chunk), the static cross-entropy and accuracy from the rows' logits and
    per-sample losses kept in ``bufs`` ("logits" (R, M, K, N), "ce" (R, M, N) or None): one pass
    for many rows instead of a few calls per row."""
    if not pending:
        return
    rows = np.array([r for r, _ in pending])
    idx = np.array([i for _, i in pending])
    n, (_, M, K, N) = len(pending), bufs["logits"].shape
    ce = None if bufs["ce"] is None else bufs["ce"][:n].reshape(n * M, N)
    logits = bufs["logits"][:n].reshape(n * M, K, N)
    loss_s, acc = _metrics(y, logits, ce)  # (n M,)
    F_ext = xp.concatenate([F_before[None], Fs])  # F_ext[i] = F(t - 1) of chunk index i
    hist[0, rows] = Fs[idx]  # loss
    hist[1, rows] = Fs[idx] - F_ext[idx]  # dloss
    hist[2, rows] = loss_s.reshape(n, M)  # loss_static
    hist[3, rows] = acc.reshape(n, M)  # train_acc
    pending.clear()


def _diverged(Fs, t_first, diverged, F0, xp):
    """diverged (M,) with the first step of Fs (n, M) (losses of steps t_first, t_first + 1,
    ...) whose loss has diverged (dynloss.diverged, from the initial losses F0 (M,)) marked for
    the networks not yet diverged."""
    if len(Fs) == 0:
        return diverged
    bad = loss_diverged(Fs, F0)  # (n, M)
    first = t_first + bad.argmax(axis=0)  # (M,)
    return xp.where((diverged < 0) & bad.any(axis=0), first, diverged)


PAUSE_STATE = ("W1aT", "W2T", "b2", "hist", "diverged", "F_before", "F0")  # a paused block's arrays


def train_block(params, data, spec, xp=np, on_log=None, progress=None, should_pause=None,
                state=None):  # fmt: skip
    """Full-batch gradient descent on the dynamical loss for a block of M networks.

    Parameters
    ----------
    params : dict of NumPy arrays, W1 (M, D, H), b1 (M, H), W2 (M, H, K), b2 (M, K); not modified
    data : (X_train (N, D), y_train (N,), X_val (Nv, D), y_val (Nv,)) NumPy arrays
    spec : spiral.TrainSpec with (M,) arrays A, T, stop_step
    xp : numpy or cupy
    on_log : optional callback(step, params_host) at every logged step (for spectra)
    progress : optional callable(n_network_steps) advancing a progress bar
    should_pause : optional callable() -> bool, asked between chunks of GAMMA_CHUNK steps (after
        the first chunk of this call); when it says True, the block stops there and returns
        ``{"paused": the step it stopped before, **its state}``: the packed parameters and the
        logs so far (PAUSE_STATE), host arrays
    state : such a paused dict: the block continues from it, and the result equals an
        uninterrupted run's bit for bit (the same steps in the same chunks)

    Returns
    -------
    spiral.finish_run's dict, as spiral.train_reference: the final params (NumPy, shapes as the
    input), ``step`` (S,), ``gamma`` (S, M, K), every field of LOG_FIELDS as (S, M),
    ``diverged_step`` (M,) (-1 when finite throughout) and ``logged``, the number of rows written
    (S unless every network diverged). Step t's row holds the state before update t: F(t)
    (eq. 1), F(t) - F(t-1), the static cross-entropy and the accuracies; the last row
    (t = steps) is the final state. Once a network's loss has diverged (dynloss.diverged: not
    finite, or far above its initial loss), it is marked diverged at that step (checked every
    GAMMA_CHUNK steps) and its later rows are NaN; when every network of the block has
    diverged, training stops.
    """
    X, y, Xv, yv = data
    M, D, H = params["W1"].shape
    K = params["W2"].shape[2]
    Xa = xp.asarray(np.c_[X, np.ones(len(X))].T.copy())  # (D+1, N)
    Xva = xp.asarray(np.c_[Xv, np.ones(len(Xv))].T.copy())  # (D+1, Nv)
    y_d, yv_d = xp.asarray(y), xp.asarray(yv)
    onehot = xp.asarray(np.eye(K)[y].T.copy())  # (K, N)
    P = pack(params, xp)
    work = _workspace(M, H, len(X), len(Xv), xp)
    steps_logged = log_steps(spec.steps, spec.log_every)
    S = len(steps_logged)
    hist = xp.full((len(LOG_FIELDS), S, M), xp.nan)  # rows written on the device, masked below
    gamma_log = class_weights(steps_logged, spec.A, spec.T, K, spec.stop_step)  # Eqs. (2)-(5)
    val_every = spec.val_every or spec.log_every
    diverged = xp.full(M, -1, dtype=xp.int64)  # kept on the device: no host sync per step
    F_before = xp.full(M, xp.nan)  # the loss of the step before the current chunk
    F0 = None  # the loss at step 0, set by the first chunk
    start = 0  # the first step of this call
    if state is not None:  # continue a paused block
        P = {k: xp.array(state[k]) for k in ("W1aT", "W2T", "b2")}  # copies: trained in place
        hist, diverged = xp.array(state["hist"]), xp.array(state["diverged"])
        F_before, F0 = xp.array(state["F_before"]), xp.array(state["F0"])
        start = int(state["paused"])
    per_row = M * (K + 1) * len(X) * 8  # bytes of one logged row's logits and losses
    R = max(1, min(S, LOG_BUFFER_BYTES // per_row))  # logged rows buffered between two passes
    bufs = {
        "logits": xp.empty((R, M, K, len(X))),
        "ce": xp.empty((R, M, len(X))) if spec.loss == "ce" else None,
    }
    pending = []  # logged rows of the chunk whose training columns are not written yet
    tick = min(spec.log_every, PROGRESS_TICK)  # progress-bar interval
    row = int(np.searchsorted(steps_logged, start))  # the next row to log
    with np.errstate(all="ignore"):
        for t0 in range(start, spec.steps + 1, GAMMA_CHUNK):
            if t0 > start and should_pause is not None and should_pause():
                kept = {"hist": hist, "diverged": diverged, "F_before": F_before, "F0": F0}
                return {"paused": t0, **{k: np.array(v) for k, v in to_host({**P, **kept}).items()}}
            ts = np.arange(t0, min(t0 + GAMMA_CHUNK, spec.steps + 1))
            gammas = xp.asarray(class_weights(ts, spec.A, spec.T, K, spec.stop_step))  # (2)-(5)
            ws = gammas[:, :, y_d] / len(X)  # (chunk, M, N)  Gamma_{y_j}(t) / N of eq. (1)
            Fs = xp.empty((len(ts), M))  # the chunk's losses
            for i, t in enumerate(ts):
                F, dlogits, logits, ce = _forward_loss(P, Xa, onehot, ws[i], spec.loss, xp, work)
                Fs[i] = F
                if row < S and t == steps_logged[row]:
                    bufs["logits"][len(pending)] = logits
                    if ce is not None:
                        bufs["ce"][len(pending)] = ce
                    pending.append((row, i))
                    if len(pending) == R:
                        _flush_logs(hist, pending, bufs, Fs, F_before, y_d, xp)
                    if t % val_every == 0 or t == spec.steps:
                        hist[4:6, row] = xp.stack(_eval(P, Xva, yv_d, xp, work)[::-1])
                    if on_log is not None:
                        on_log(int(t), unpack(P))
                    row += 1
                if t == spec.steps:
                    break
                _backward_update(P, Xa, dlogits, spec.lr, xp, work)
                if progress is not None and (t + 1) % tick == 0:
                    progress(M * tick)
            _flush_logs(hist, pending, bufs, Fs, F_before, y_d, xp)
            if t0 == 0:
                F0 = Fs[0].copy()  # (M,) the initial loss, the scale of divergence
            diverged = _diverged(Fs[: i + 1], t0, diverged, F0, xp)
            F_before = Fs[i]
            if bool((diverged >= 0).all()):  # one host sync per chunk: stop when all diverged
                break
    host = to_host({"diverged": diverged, "hist": hist})
    log = {f: host["hist"][i] for i, f in enumerate(LOG_FIELDS)}  # (S, M) each
    return finish_run(unpack(P), steps_logged, gamma_log, log, host["diverged"], row)


def block_size(M, H, xp=np):
    """Networks per block of train_many: all of them on a GPU; on the CPU about CPU_BLOCK_UNITS
    hidden units' worth (the block's masks stay in L2 cache)."""
    return M if xp is not np else max(1, min(M, CPU_BLOCK_UNITS // H))


def _block_job(params, data, spec, state, xp=np, progress=None, should_pause=None):
    """One block of :func:`train_many` as a worker job: train_block, from ``state`` if given."""
    return train_block(params, data, spec, xp, progress=progress, should_pause=should_pause,
                       state=state)  # fmt: skip


def train_many(
    params, data, spec, xp=np, block=None, workers=WORKERS, progress=True, desc="training",
    pause=False, resume=None,
):  # fmt: skip
    """Train M networks as independent blocks: in ``workers`` processes on the CPU, one block on
    a GPU.

    Blocks are trained independently (each network's result depends only on its own parameters
    and settings), so any split gives the same numbers; :func:`run_jobs` runs them.

    params : W1 (M, D, H), ... NumPy arrays;  spec : spiral.TrainSpec with (M,) arrays
    block : networks per block (default: all on a GPU, a cache-sized block on the CPU)
    pause : at a signal (apparatus/signals.py) the blocks pause at their next chunk and
        :class:`Paused` is raised with every block's part (its result if it had finished, its
        paused state, or None if it had not started)
    resume : such a list of parts (one per block, same blocks): finished blocks are not trained
        again, paused ones continue
    Returns the dict of :func:`train_block` for all M networks.
    """
    M, _, H = params["W1"].shape
    if block is None:
        block = block_size(M, H, xp)
    slices = [slice(s, min(s + block, M)) for s in range(0, M, block)]
    resume = resume if resume is not None else [None] * len(slices)
    if len(resume) != len(slices):
        raise ValueError(f"resume holds {len(resume)} blocks, the batch has {len(slices)}")
    parts = [r if r is not None and "paused" not in r else None for r in resume]  # finished
    bar = tqdm(
        total=M * spec.steps,
        desc=desc,
        unit="net-step",
        unit_scale=True,
        disable=not progress,
        mininterval=0.5,
        smoothing=0.1,
    )
    jobs, todo = [], []
    for b, sl in enumerate(slices):
        if parts[b] is not None:
            bar.update((sl.stop - sl.start) * spec.steps)
            continue
        sub_spec = replace(spec, A=spec.A[sl], T=spec.T[sl], stop_step=spec.stop_step[sl])
        jobs.append(({k: v[sl] for k, v in params.items()}, data, sub_spec, resume[b]))
        todo.append(b)
    results = run_jobs(_block_job, jobs, xp, workers, bar, pause=pause)
    bar.close()
    for b, result in zip(todo, results, strict=True):
        parts[b] = result
    if any(p is None or "paused" in p for p in parts):
        raise Paused(signals.requested(), parts)
    out = {"step": parts[0]["step"], "gamma": np.concatenate([p["gamma"] for p in parts], axis=1)}
    out["params"] = {k: np.concatenate([p["params"][k] for p in parts]) for k in MLP_PARAM_NAMES}
    for f in LOG_FIELDS:
        out[f] = np.concatenate([p[f] for p in parts], axis=1)
    out["diverged_step"] = np.concatenate([p["diverged_step"] for p in parts])
    out["logged"] = max(p["logged"] for p in parts)
    return out


class Paused(signals.Interrupted):
    """A signal paused :func:`train_many`: ``parts`` holds, per block, its result, its paused
    state, or None (not started); pass them back as ``resume`` to continue."""

    def __init__(self, signum, parts):
        super().__init__(signum)
        self.parts = parts
