"""CIFAR-10 experiments of the paper (Fig. 1): Myrtle5 trained with the dynamical loss, and the CLI.

Commands
--------
One point of Fig. 1 (one GPU; the defaults are the Fig. 1 protocol, A = 50, T = 100):
    python run_cifar.py train --data ~/cifar-10-python.tar.gz --device gpu --out runs/c-A50-T100
The static baseline (A = 1 line of Fig. 1, validation accuracy ~0.73 in the paper):
    python run_cifar.py train --data ~/cifar-10-python.tar.gz --A 1 --device gpu --out runs/c-A1
Fig. 1, the phase diagram ((T, A) grid x 30 seeds; a SLURM array: slurm/cifar_phase.sbatch):
    python run_cifar.py phase --data PATH --seeds 30 --shard i/n --device gpu --out runs/cifar-phase
    python run_cifar.py merge --out runs/cifar-phase
  (phase evaluates the whole training set only after the last epoch, --train-eval-every 0, and
  the test set after every epoch; its units are one run each, checkpointed in OUT/work/<unit>/.)
A CPU demo on synthetic data (about 75 s on 2 cores; benchmarks/cifar_demo/README.md):
    python run_cifar.py train --data synthetic --synthetic-train 2000 --synthetic-test 1000 \\
        --image-size 16 --channels 16 --batch 100 --epochs 14 --lr-peak 0.05 --lr-final 0.005 \\
        --A 20 --T 20 --out runs/cifar-demo/A20-T20

Protocol (Fig. 1 caption, SETUP.md), every item an option
---------------------------------------------------------
Myrtle5 with c = 64 channels (models.py), CIFAR-10 without augmentation, normalised per channel
with the training-set mean and std; Nesterov momentum 0.9 (models.nesterov_step, PyTorch's form);
minibatches of 512; 700 epochs; the dynamical loss (eqs. 1-5) with t counted in minibatch steps;
oscillations stopped (Gamma = 1) from epoch 600; test accuracy after every epoch.

* Learning rate: changes EVERY STEP. ``lr_at(t, steps_per_epoch, ...)`` is the piecewise-linear
  schedule evaluated at the fractional epoch e = t / steps_per_epoch: 0 at e = 0, lr_peak (0.02)
  at the peak epoch (300), lr_final (0.002) at the final epoch (700). Update t uses lr_at(t), so
  the first update only fills the momentum buffer (lr 0).
* Short runs: without --peak-epoch / --stop-epoch both are SCALED to --epochs, at 300/700 and
  600/700 of the run (fractional epochs are fine: everything is counted in steps).
* Gamma: update t uses dynloss.class_weights(t, A, T, K, stop_step) with
  stop_step = round(stop_epoch * steps_per_epoch); Gamma = 1 from that step on.
* Minibatches: a new permutation of the training set every epoch, drawn from the run's own
  np.random.Generator; the last partial batch is DROPPED, so every step sees exactly --batch
  images (CIFAR-10: 50000 // 512 = 97 steps per epoch; the 336 images left out differ from epoch
  to epoch). The paper does not say which it did.
* Seeds: --seed s spawns two streams from np.random.SeedSequence(s): the first initialises the
  network (models.init_myrtle5), the second shuffles. The data (and the synthetic data's seed) do
  not depend on it.
* dtype (--dtype auto): float32 on the GPU and on the CPU (the paper's JAX runs were float32;
  float32 is ~25% faster here). Use --dtype float64 for exact checks (the tests do); the optional
  Hessian eigenvalue is always computed in float64 on the CPU.

Outputs of ``train`` (in --out)
-------------------------------
run.npz: the history, one row per epoch e = 0..E (row e is the state after e epochs, i.e. before
update t = e * steps_per_epoch; row 0 is the initial network): ``epoch`` (E+1,), ``step``, ``lr``
(the learning rate of update t), ``gamma`` (E+1, K) (Gamma of update t), ``train_loss`` (the
dynamical loss, eq. 1 with that gamma, over the whole training set), ``train_loss_static``
(plain cross-entropy), ``train_acc``, ``test_loss`` (static), ``test_acc``, ``batch_loss`` and
``batch_acc`` (means over the epoch's minibatches, as trained; NaN in row 0), ``hess_top`` (top
Hessian eigenvalue of the dynamical loss on the first --hess-batch training images, NaN where
not computed), and the scalars ``steps_per_epoch``, ``stop_step``, ``diverged_epoch`` (-1: the
loss stayed finite), and the final parameters ``W1`` .. ``b5`` (models.MYRTLE5_PARAM_NAMES).
Full-set training metrics are computed every --train-eval-every epochs and at the end (NaN
elsewhere). config.json: every setting (``settings``: what defines the result; ``options``: the
command line), the device, data source, steps per epoch, timings, final accuracies and versions.
run.png: Gamma_i(t), learning rate, losses, training and test accuracy against epoch.

Checkpoints: OUT/checkpoint.npz, written atomically every --checkpoint-every epochs and at the end
(``p_<name>``/``v_<name>``: parameters and Nesterov buffers in the run's dtype; ``epoch``,
``step``; ``rng_state``: the shuffling Generator's bit_generator.state as JSON; ``hist_<field>``
and ``gamma``: the history so far; ``hess_vec``: the warm start of the eigenvalue solver;
``diverged_epoch``; ``settings``: the settings as JSON). Rerunning the same command resumes from
it and gives exactly the run.npz of an uninterrupted run (bit for bit on the CPU); an --out that
holds a run with other settings is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time

import numpy as np

import cifar
import sweep
from dynloss import class_weights, log_softmax
from models import (
    MYRTLE5_DIVISOR,
    MYRTLE5_PARAM_NAMES,
    backend,
    get_array_module,
    init_myrtle5,
    myrtle5_forward,
    myrtle5_hvp_operator,
    myrtle5_loss_and_grads,
    nesterov_step,
    to_device,
    to_host,
)
from sweep import InputError, atomic_savez, check_out_dir, versions, write_json

# The Fig. 1 protocol (caption; SETUP.md)
EPOCHS = 700
PEAK_EPOCH = 300  # learning rate 0 -> LR_PEAK linearly up to this epoch (of EPOCHS) ...
STOP_EPOCH = 600  # ... and Gamma = 1 from this epoch (of EPOCHS) on
LR_PEAK = 0.02
LR_FINAL = 0.002  # reached at the final epoch
BATCH = 512
MOMENTUM = 0.9
CHANNELS = 64
CHECKPOINT_NAME = "checkpoint.npz"
MD5_PATTERN = re.compile(r"^[0-9a-fA-F]{32}$")

HIST_FIELDS = (
    "lr",
    "train_loss",
    "train_loss_static",
    "train_acc",
    "test_loss",
    "test_acc",
    "batch_loss",
    "batch_acc",
    "hess_top",
)


def fail(msg):
    """Print one line to stderr and exit 2."""
    sweep.fail("run_cifar.py", msg)


def lr_at(
    step,
    steps_per_epoch,
    lr_peak=LR_PEAK,
    lr_final=LR_FINAL,
    peak_epoch=PEAK_EPOCH,
    final_epoch=EPOCHS,
):
    """Learning rate of update ``step``; changes every step (not once per epoch).

    Piecewise linear in the fractional epoch e = step / steps_per_epoch: lr_peak * e / peak_epoch
    for e < peak_epoch, then linear from lr_peak at peak_epoch to lr_final at final_epoch. Needs
    0 < peak_epoch <= final_epoch. step : int or array (S,); returns a float or (S,) float64.
    """
    e = np.asarray(step, dtype=np.float64) / steps_per_epoch
    rise = lr_peak * e / peak_epoch
    span = final_epoch - peak_epoch
    fall = lr_peak + (lr_final - lr_peak) * (e - peak_epoch) / span if span > 0 else lr_peak + 0 * e
    lr = np.where(e < peak_epoch, rise, fall)
    return float(lr) if lr.ndim == 0 else lr


def steps_per_epoch(n_train, batch):
    """Minibatch steps per epoch: the last partial batch is dropped."""
    return n_train // batch


def stop_step(settings, spe):
    """The first step with Gamma = 1: round(stop_epoch * steps_per_epoch)."""
    return int(round(settings["stop_epoch"] * spe))


def step_gammas(settings, spe, t0, t1, K):
    """Gamma_i(t) (eqs. 2-5, stopped at the stop step) for the updates t0 <= t < t1: (t1-t0, K)."""
    steps = np.arange(t0, t1)
    return class_weights(steps, settings["A"], settings["T"], K, stop_step(settings, spe))


def step_lrs(settings, spe, t0, t1):
    """lr_at for the updates t0 <= t < t1: (t1-t0,) float64."""
    return lr_at(
        np.arange(t0, t1),
        spe,
        settings["lr_peak"],
        settings["lr_final"],
        settings["peak_epoch"],
        settings["epochs"],
    )


# ---------------------------------------------------------------------------------------------
# Settings and data
# ---------------------------------------------------------------------------------------------


def _positive(value, name, integer=False):
    ok = value > 0 and math.isfinite(value)
    if not ok:
        raise InputError(f"{name} must be positive{'' if integer else ' and finite'}, got {value}")


def resolve_settings(args):
    """Validate the options shared by ``train`` and ``phase``; return the defining settings.

    The settings are what defines the result (not --out, --device, --checkpoint-every,
    --quiet); the schedule's peak and stop epochs are scaled to --epochs when not given.
    A, T and seed are filled in by the caller. Raises InputError.
    """
    _positive(args.epochs, "--epochs", integer=True)
    _positive(args.batch, "--batch", integer=True)
    _positive(args.lr_peak, "--lr-peak")
    if not (args.lr_final >= 0 and math.isfinite(args.lr_final)):
        raise InputError(f"--lr-final must be >= 0 and finite, got {args.lr_final}")
    _positive(args.channels, "--channels", integer=True)
    if not 0 <= args.momentum < 1:
        raise InputError(f"--momentum must be in [0, 1), got {args.momentum}")
    _positive(args.checkpoint_every, "--checkpoint-every", integer=True)
    if args.train_eval_every < 0:
        raise InputError(f"--train-eval-every must be >= 0, got {args.train_eval_every}")
    _positive(args.eval_batch, "--eval-batch", integer=True)
    E = args.epochs
    peak = E * PEAK_EPOCH / EPOCHS if args.peak_epoch is None else args.peak_epoch
    stop = E * STOP_EPOCH / EPOCHS if args.stop_epoch is None else args.stop_epoch
    if not 0 < peak <= E:
        raise InputError(f"--peak-epoch must be in (0, --epochs = {E}], got {peak}")
    if not 0 <= stop <= E:
        raise InputError(f"--stop-epoch must be in [0, --epochs = {E}], got {stop}")
    if args.dtype not in ("auto", "float32", "float64"):
        raise InputError(f"--dtype must be auto, float32 or float64, got {args.dtype!r}")
    if args.device not in ("cpu", "gpu"):
        raise InputError(f"--device must be cpu or gpu, got {args.device!r}")
    dtype = "float32" if args.dtype == "auto" else args.dtype
    synthetic = args.data == "synthetic"
    if synthetic:
        _positive(args.synthetic_train, "--synthetic-train", integer=True)
        _positive(args.synthetic_test, "--synthetic-test", integer=True)
        n_batches = len(cifar.TRAIN_MEMBERS)
        if args.synthetic_train % n_batches:
            raise InputError(f"--synthetic-train must be a multiple of {n_batches}")
        check_image_size(args.image_size, "--image-size")
        md5 = None
    else:
        md5 = None if str(args.md5).lower() == "none" else str(args.md5).lower()
        if md5 is not None and not MD5_PATTERN.match(md5):
            raise InputError(f"--md5 must be 32 hex digits or 'none', got {args.md5!r}")
    check_out_dir(args.out)
    return {
        "data": "synthetic" if synthetic else "cifar10",
        "md5": md5,
        "synthetic_train": args.synthetic_train if synthetic else None,
        "synthetic_test": args.synthetic_test if synthetic else None,
        "image_size": args.image_size if synthetic else None,
        "data_seed": args.data_seed if synthetic else None,
        "epochs": E,
        "batch": args.batch,
        "lr_peak": args.lr_peak,
        "lr_final": args.lr_final,
        "peak_epoch": peak,
        "stop_epoch": stop,
        "momentum": args.momentum,
        "channels": args.channels,
        "dtype": dtype,
        "train_eval_every": args.train_eval_every,
        "eval_batch": args.eval_batch,
    }


def check_image_size(size, name):
    if size <= 0 or size % MYRTLE5_DIVISOR:
        raise InputError(
            f"{name} {size}: Myrtle5 needs image sides that are positive multiples of "
            f"{MYRTLE5_DIVISOR} (three 2x2 average pools)"
        )


def check_run(settings, A, T, seed):
    """Validate one run's amplitude, period and seed."""
    if not (A >= 1 and math.isfinite(A)):
        raise InputError(f"--A must be >= 1 (A = 1 is the static loss), got {A}")
    if not (T >= 1 and math.isfinite(T)):
        raise InputError(f"--T must be >= 1 minibatch step, got {T}")
    if seed < 0:
        raise InputError(f"--seed must be >= 0, got {seed}")


def get_backend(device):
    """models.backend, with its failures as one-line input errors."""
    try:
        return backend(device)
    except (RuntimeError, ValueError) as err:
        raise InputError(str(err)) from None


def load_data(settings, path, hess_batch=0):
    """Load and normalise the data (training-set statistics); check it fits the settings.

    path : --data (None: $CIFAR10_PATH) for CIFAR-10, unused for synthetic data.
    Returns a dict: x_train (N, Hx, Wx, 3) and x_test in the settings' dtype, y_train (N,),
    y_test, K, source, and x_hess (hess_batch, Hx, Wx, 3) float64 / y_hess when hess_batch > 0.
    Raises InputError (CifarError's one line, image sides, batch larger than the training set).
    """
    s = settings
    try:
        if s["data"] == "synthetic":
            n_per_batch = s["synthetic_train"] // len(cifar.TRAIN_MEMBERS)
            raw = cifar.load_synthetic(
                s["data_seed"], n_per_batch, s["synthetic_test"], s["image_size"]
            )
        else:
            raw = cifar.load_cifar10(path, expected_md5=s["md5"])
    except cifar.CifarError as err:
        raise InputError(str(err)) from None
    check_image_size(raw.x_train.shape[1], "image size")
    n_train = raw.x_train.shape[0]
    if s["batch"] > n_train:
        raise InputError(f"--batch {s['batch']} is larger than the {n_train} training images")
    if hess_batch > n_train:
        raise InputError(f"--hess-batch {hess_batch} exceeds the {n_train} training images")
    data = cifar.normalize(raw, np.dtype(s["dtype"]))
    out = {
        "x_train": data.x_train,
        "y_train": data.y_train,
        "x_test": data.x_test,
        "y_test": data.y_test,
        "K": len(data.label_names),
        "source": data.source,
    }
    if hess_batch:
        mean, std = cifar.channel_stats(raw.x_train)
        out["x_hess"] = cifar.normalize_images(raw.x_train[:hess_batch], mean, std, np.float64)
        out["y_hess"] = raw.y_train[:hess_batch]
    return out


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def evaluate(params, x, y, gamma, batch):
    """Dynamical loss (eq. 1 with ``gamma``), static cross-entropy and accuracy on (x, y).

    x : (N, Hx, Wx, 3) and y : (N,) on the backend of params; gamma : (K,); forward passes of
    ``batch`` images. Returns three floats (one host sync).
    """
    xp = get_array_module(x)
    w = xp.asarray(gamma, dtype=np.float64)  # (K,)
    dyn = static = correct = xp.zeros((), dtype=np.float64)
    for s in range(0, x.shape[0], batch):
        yb = y[s : s + batch]  # (n,)
        logits, _ = myrtle5_forward(x[s : s + batch], params)  # (n, K)
        logp = log_softmax(logits.astype(np.float64))  # (n, K)
        ce = -xp.take_along_axis(logp, yb[:, None], axis=1)[:, 0]  # (n,)  CE_j
        dyn = dyn + (w[yb] * ce).sum()  # sum_j Gamma_{y_j} CE_j
        static = static + ce.sum()
        correct = correct + (logits.argmax(axis=1) == yb).sum()
    n = x.shape[0]
    host = to_host({"dyn": dyn, "static": static, "correct": correct})
    return float(host["dyn"]) / n, float(host["static"]) / n, float(host["correct"]) / n


def top_hessian_eig(params, x, y, gamma, v0):
    """Top eigenvalue of the Hessian of the dynamical loss on (x, y), float64 on the CPU.

    spectra.top_eigs (eigsh, which='LA') on models.myrtle5_hvp_operator, warm-started from v0
    (P,) (None: a fixed random start). Returns (lambda_max, eigenvector (P,)).
    """
    import spectra

    host = {k: v.astype(np.float64) for k, v in to_host(params).items()}
    matvec = myrtle5_hvp_operator(host, x, y, gamma)
    P = sum(v.size for v in host.values())
    vals, vecs = spectra.top_eigs(matvec, P, k=1, v0=v0)
    return float(vals[0]), vecs[:, 0]


class _State:
    """A run in progress: parameters and buffers on the backend, everything else on the host."""

    def __init__(self, params, velocity, rng, epochs, K):
        self.params, self.velocity, self.rng = params, velocity, rng
        self.epoch = 0  # epochs completed
        self.step = 0  # updates done
        self.hist = {f: np.full(epochs + 1, np.nan) for f in HIST_FIELDS}  # (E+1,) each
        self.gamma = np.full((epochs + 1, K), np.nan)  # (E+1, K)
        self.hess_vec = None
        self.diverged_epoch = -1


def _fresh_state(settings, K, xp):
    init_seq, shuffle_seq = np.random.SeedSequence(settings["seed"]).spawn(2)
    params = init_myrtle5(
        np.random.default_rng(init_seq),
        c=settings["channels"],
        in_channels=3,
        n_classes=K,
        dtype=np.dtype(settings["dtype"]),
    )
    params = to_device(params, xp)
    velocity = {k: xp.zeros_like(v) for k, v in params.items()}
    return _State(params, velocity, np.random.default_rng(shuffle_seq), settings["epochs"], K)


def _settings_json(settings):
    return json.dumps(settings, sort_keys=True)


def differing(old, new):
    """The keys whose values differ between two settings dicts (after a JSON round trip)."""
    new = json.loads(json.dumps(new))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def save_checkpoint(path, state, settings):
    """Write the state atomically (format: module docstring)."""
    arrays = {f"p_{k}": v for k, v in to_host(state.params).items()}
    arrays.update({f"v_{k}": v for k, v in to_host(state.velocity).items()})
    arrays.update({f"hist_{f}": v for f, v in state.hist.items()})
    arrays.update(
        epoch=np.int64(state.epoch),
        step=np.int64(state.step),
        rng_state=np.array(json.dumps(state.rng.bit_generator.state)),
        gamma=state.gamma,
        hess_vec=np.zeros(0) if state.hess_vec is None else state.hess_vec,
        diverged_epoch=np.int64(state.diverged_epoch),
        settings=np.array(_settings_json(settings)),
    )
    atomic_savez(path, **arrays)


def read_checkpoint_settings(path):
    with np.load(path) as z:
        return json.loads(str(z["settings"]))


def load_checkpoint(path, settings, K, xp):
    """Restore a :class:`_State` written by :func:`save_checkpoint`."""
    with np.load(path) as z:
        params = to_device({k: z[f"p_{k}"] for k in MYRTLE5_PARAM_NAMES}, xp)
        velocity = to_device({k: z[f"v_{k}"] for k in MYRTLE5_PARAM_NAMES}, xp)
        rng = np.random.default_rng()
        rng.bit_generator.state = json.loads(str(z["rng_state"]))
        state = _State(params, velocity, rng, settings["epochs"], K)
        state.epoch, state.step = int(z["epoch"]), int(z["step"])
        state.hist = {f: z[f"hist_{f}"].copy() for f in HIST_FIELDS}
        state.gamma = z["gamma"].copy()
        state.hess_vec = z["hess_vec"].copy() if z["hess_vec"].size else None
        state.diverged_epoch = int(z["diverged_epoch"])
    return state


def _log_row(state, settings, data, dev, spe, hess_every):
    """Fill history row e = state.epoch: the state before update t = e * steps_per_epoch."""
    e, t, E = state.epoch, state.step, settings["epochs"]
    K = data["K"]
    gamma = step_gammas(settings, spe, t, t + 1, K)[0]  # (K,)
    state.gamma[e] = gamma
    state.hist["lr"][e] = step_lrs(settings, spe, t, t + 1)[0]
    every = settings["train_eval_every"]
    with np.errstate(all="ignore"):
        if e == E or (every > 0 and e % every == 0):
            dyn, static, acc = evaluate(
                state.params, dev["x_train"], dev["y_train"], gamma, settings["eval_batch"]
            )
            state.hist["train_loss"][e] = dyn
            state.hist["train_loss_static"][e] = static
            state.hist["train_acc"][e] = acc
        _, test_loss, test_acc = evaluate(
            state.params, dev["x_test"], dev["y_test"], gamma, settings["eval_batch"]
        )
    state.hist["test_loss"][e], state.hist["test_acc"][e] = test_loss, test_acc
    if hess_every and e % hess_every == 0 and state.diverged_epoch < 0:
        lam, state.hess_vec = top_hessian_eig(
            state.params, data["x_hess"], data["y_hess"], gamma, state.hess_vec
        )
        state.hist["hess_top"][e] = lam


def _train_epoch(state, settings, dev, spe, K, xp, bar):
    """One epoch of minibatch Nesterov steps on the dynamical loss; updates state in place."""
    B, t0 = settings["batch"], state.step
    perm = state.rng.permutation(dev["n_train"])  # a new order every epoch
    dtype = np.dtype(settings["dtype"])
    gammas = xp.asarray(step_gammas(settings, spe, t0, t0 + spe, K), dtype=dtype)  # (spe, K)
    lrs = step_lrs(settings, spe, t0, t0 + spe)  # (spe,) on the host
    idx_all = xp.asarray(perm[: spe * B].reshape(spe, B))  # (spe, B); the rest is dropped
    loss_sum = correct = xp.zeros((), dtype=np.float64)
    with np.errstate(all="ignore"):
        for i in range(spe):
            idx = idx_all[i]
            xb, yb = dev["x_train"][idx], dev["y_train"][idx]  # (B, Hx, Wx, 3), (B,)
            F, grads, logits = myrtle5_loss_and_grads(state.params, xb, yb, gammas[i])
            # float(): a weak Python scalar keeps float32 arithmetic in float32 (NEP 50)
            nesterov_step(state.params, grads, state.velocity, float(lrs[i]), settings["momentum"])
            loss_sum = loss_sum + F
            correct = correct + (logits.argmax(axis=1) == yb).sum()
            if bar is not None:
                bar.update(1)
    host = to_host({"loss": loss_sum, "correct": correct})  # one host sync per epoch
    state.step += spe
    state.epoch += 1
    state.hist["batch_loss"][state.epoch] = float(host["loss"]) / spe
    state.hist["batch_acc"][state.epoch] = float(host["correct"]) / (spe * B)
    return math.isfinite(float(host["loss"]))


def train_run(settings, data, xp, work, checkpoint_every, hess_every=0, progress=True, say=print):
    """Train one Myrtle5 network; checkpoint into ``work`` and resume from it.

    settings : from :func:`resolve_settings` plus A, T, seed;  data : from :func:`load_data`.
    Returns (state, info) with the finished :class:`_State` (history complete) and a dict of
    steps_per_epoch, stop_step, resumed_from (epoch or None) and seconds.
    """
    from tqdm import tqdm

    t_start = time.time()
    E, K = settings["epochs"], data["K"]
    spe = steps_per_epoch(data["x_train"].shape[0], settings["batch"])
    dev = {k: xp.asarray(data[k]) for k in ("x_train", "y_train", "x_test", "y_test")}
    dev["n_train"] = data["x_train"].shape[0]
    ckpt = os.path.join(work, CHECKPOINT_NAME)
    resumed = None
    if os.path.exists(ckpt):
        state = load_checkpoint(ckpt, settings, K, xp)
        resumed = state.epoch
        say(f"resuming from {ckpt} at epoch {state.epoch} of {E}")
    else:
        state = _fresh_state(settings, K, xp)
        _log_row(state, settings, data, dev, spe, hess_every)
    bar = tqdm(
        total=E * spe,
        initial=state.step,
        desc=f"A={settings['A']:g} T={settings['T']:g} seed={settings['seed']}",
        unit="step",
        disable=not progress,
        mininterval=0.5,
        leave=False,
    )
    while state.epoch < E and state.diverged_epoch < 0:
        finite = _train_epoch(state, settings, dev, spe, K, xp, bar)
        if not finite:
            state.diverged_epoch = state.epoch
        _log_row(state, settings, data, dev, spe, hess_every)
        bar.set_postfix(test_acc=f"{state.hist['test_acc'][state.epoch]:.3f}", refresh=False)
        if state.epoch % checkpoint_every == 0 or state.epoch == E or not finite:
            save_checkpoint(ckpt, state, settings)
    bar.close()
    info = {
        "steps_per_epoch": spe,
        "stop_step": stop_step(settings, spe),
        "resumed_from_epoch": resumed,
        "seconds": round(time.time() - t_start, 2),
    }
    return state, info


def final_metrics(state):
    """Final training / test metrics; NaN when the run diverged."""
    E = len(state.hist["test_acc"]) - 1
    pick = lambda f: float("nan") if state.diverged_epoch >= 0 else float(state.hist[f][E])
    return {
        "train_acc": pick("train_acc"),
        "val_acc": pick("test_acc"),
        "train_loss": pick("train_loss_static"),
        "val_loss": pick("test_loss"),
    }


def run_arrays(state, info):
    """The arrays of run.npz (module docstring)."""
    E = len(state.hist["test_acc"]) - 1
    arrays = {
        "epoch": np.arange(E + 1),
        "step": np.arange(E + 1) * info["steps_per_epoch"],
        "gamma": state.gamma,
        "steps_per_epoch": np.int64(info["steps_per_epoch"]),
        "stop_step": np.int64(info["stop_step"]),
        "diverged_epoch": np.int64(state.diverged_epoch),
    }
    arrays.update(state.hist)
    arrays.update(to_host(state.params))
    return arrays


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def plot_run(arrays, settings, path, title):
    """Gamma_i(t) (every step), learning rate, losses, accuracies (and lambda_max) vs epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spe = int(arrays["steps_per_epoch"])
    epoch = arrays["epoch"]
    E = int(epoch[-1])
    K = arrays["gamma"].shape[1]
    stride = max(1, E * spe // 20000)  # at most ~20k points per curve
    steps = np.arange(0, E * spe, stride)
    gam = class_weights(steps, settings["A"], settings["T"], K, int(arrays["stop_step"]))
    has_hess = np.isfinite(arrays["hess_top"]).any()
    n = 5 if has_hess else 4
    fig, ax = plt.subplots(n, 1, figsize=(8, 2.1 * n + 0.6), sharex=True)
    for i in range(K):
        ax[0].plot(steps / spe, gam[:, i], lw=0.4, rasterized=True)
    ax[0].set_ylabel(r"$\Gamma_i(t)$")
    ax[1].plot(
        steps / spe,
        lr_at(
            steps,
            spe,
            settings["lr_peak"],
            settings["lr_final"],
            settings["peak_epoch"],
            settings["epochs"],
        ),
        color="k",
        lw=1,
    )
    ax[1].set_ylabel("learning rate")
    ok = np.isfinite(arrays["train_loss"])
    ax[2].plot(epoch[ok], arrays["train_loss"][ok], ".-", ms=3, label="train (dynamical)")
    ax[2].plot(epoch[ok], arrays["train_loss_static"][ok], ".-", ms=3, label="train (static)")
    ax[2].plot(epoch, arrays["test_loss"], ".-", ms=3, label="test")
    ax[2].set_yscale("log")
    ax[2].set_ylabel("loss")
    ax[2].legend(fontsize=7, loc="upper right")
    ax[3].plot(epoch[ok], arrays["train_acc"][ok], ".-", ms=3, label="training")
    ax[3].plot(epoch, arrays["test_acc"], ".-", ms=3, label="test")
    ax[3].axhline(1.0 / K, color="grey", lw=0.5, ls=":")
    ax[3].set_ylim(0, 1.02)
    ax[3].set_ylabel("accuracy")
    ax[3].legend(fontsize=7, loc="lower right")
    if has_hess:
        ok = np.isfinite(arrays["hess_top"])
        ax[4].plot(epoch[ok], arrays["hess_top"][ok], "o-", ms=3)
        ax[4].set_ylabel(r"$\lambda_{max}$ (Hessian)")
    for a, letter in zip(ax, "abcde", strict=False):
        a.text(0.01, 0.85, f"({letter})", transform=a.transAxes)
        a.axvline(settings["stop_epoch"], color="grey", lw=0.5, ls="--")
    ax[-1].set_xlabel("epoch")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def read_config_settings(path):
    with open(path) as f:
        return json.load(f)["settings"]


def check_existing(out, settings):
    """Refuse an --out that holds a run (or its checkpoint) with other settings."""
    for path, read in (
        (os.path.join(out, CHECKPOINT_NAME), read_checkpoint_settings),
        (os.path.join(out, "config.json"), read_config_settings),
    ):
        if os.path.exists(path):
            try:
                old = read(path)
            except Exception as err:  # an unreadable file is not ours to overwrite
                raise InputError(
                    f"cannot read {path} ({type(err).__name__}); use another --out"
                ) from None
            diff = differing(old, settings)
            if diff:
                raise InputError(
                    f"{out} holds a run with other settings (differs in: {', '.join(diff)}); "
                    "use another --out"
                )


def check_train(args):
    """Validate ``train`` before any work: returns (settings, xp, data)."""
    settings = resolve_settings(args)
    check_run(settings, args.A, args.T, args.seed)
    if args.hess_every < 0:
        raise InputError(f"--hess-every must be >= 0, got {args.hess_every}")
    settings.update(A=args.A, T=args.T, seed=args.seed, hess_every=args.hess_every)
    settings["hess_batch"] = args.hess_batch if args.hess_every else None
    if args.hess_every:
        _positive(args.hess_batch, "--hess-batch", integer=True)
        try:
            import spectra  # noqa: F401
        except ImportError as err:
            raise InputError(f"--hess-every needs spectra.py ({err})") from None
    xp = get_backend(args.device)
    check_existing(args.out, settings)
    data = load_data(settings, args.data, args.hess_batch if args.hess_every else 0)
    return settings, xp, data


def cmd_train(args):
    """``train``: one run of the Fig. 1 protocol; writes run.npz, config.json, run.png."""
    settings, xp, data = check_train(args)
    os.makedirs(args.out, exist_ok=True)
    config = {
        "settings": settings,
        "options": {k: v for k, v in vars(args).items() if k != "func"},
        "device": args.device,
        "data_source": data["source"],
        "versions": versions(),
        "status": "running",
    }
    write_json(os.path.join(args.out, "config.json"), config)
    state, info = train_run(
        settings,
        data,
        xp,
        args.out,
        args.checkpoint_every,
        hess_every=args.hess_every,
        progress=not args.quiet,
    )
    arrays = run_arrays(state, info)
    atomic_savez(os.path.join(args.out, "run.npz"), **arrays)
    final = final_metrics(state)
    trained = settings["epochs"] - (info["resumed_from_epoch"] or 0)
    config.update(info, status="done", final=final, diverged_epoch=state.diverged_epoch)
    config["seconds_per_epoch"] = round(info["seconds"] / max(trained, 1), 3)
    write_json(os.path.join(args.out, "config.json"), config)
    title = (
        f"Myrtle5 c={settings['channels']}, {settings['data']}, A = {settings['A']:g}, "
        f"T = {settings['T']:g} steps, batch {settings['batch']}, lr {settings['lr_peak']:g}, "
        f"{settings['epochs']} epochs, seed {settings['seed']}"
    )
    png = os.path.join(args.out, "run.png")
    plot_run(arrays, settings, png, title)
    if state.diverged_epoch >= 0:
        print(f"diverged in epoch {state.diverged_epoch}")
    print(
        f"final train acc {state.hist['train_acc'][-1]:.4f}, test acc "
        f"{state.hist['test_acc'][-1]:.4f} ({info['seconds']:.1f} s, "
        f"{config['seconds_per_epoch']:.2f} s/epoch)"
    )
    print(f"wrote {args.out}/run.npz, config.json and the figure {png}")


# ---------------------------------------------------------------------------------------------
# Phase diagrams (Fig. 1)
# ---------------------------------------------------------------------------------------------

PHASE_A = "1,5,10,20,30,50,70,100"
PHASE_T = "10,25,50,100,250,500,1000"
PHASE_FIELDS = ("train_acc", "val_acc", "train_loss", "val_loss")


def phase_units(n_T, n_A, seeds):
    """One run per unit, seeds outermost (every cell gets its first seed first):
    (name, T index, A index, seed)."""
    return [
        (f"T{ti:03d}_A{ai:03d}_s{s:05d}", ti, ai, s)
        for s in seeds
        for ti in range(n_T)
        for ai in range(n_A)
    ]


def check_phase(args):
    """Validate ``phase``: returns (sweep config, xp, data, shard)."""
    settings = resolve_settings(args)
    A_list = sweep.parse_list(args.A, "--A")
    T_list = sweep.parse_list(args.T, "--T")
    if args.seeds <= 0:
        raise InputError(f"--seeds must be positive, got {args.seeds}")
    check_run(settings, min(A_list), min(T_list), args.seed0)
    check_run(settings, max(A_list), max(T_list), args.seed0)
    shard = sweep.parse_shard(args.shard)
    xp = get_backend(args.device)
    cfg = {"kind": "cifar-phase", **settings, "A": A_list, "T": T_list}
    cfg["seeds"] = list(range(args.seed0, args.seed0 + args.seeds))
    if os.path.exists(os.path.join(args.out, "sweep.json")):
        diff = differing(sweep.load_config(args.out), cfg)
        if diff:
            raise InputError(
                f"{args.out} holds a different sweep (differs in: {', '.join(diff)}); "
                "use another --out"
            )
    data = load_data(settings, args.data)
    return cfg, xp, data, shard


def unit_settings(cfg, A, T, seed):
    """The settings of one run of the sweep (what ``train`` would store)."""
    s = {k: v for k, v in cfg.items() if k not in ("kind", "A", "T", "seeds")}
    s.update(A=A, T=T, seed=seed, hess_every=0, hess_batch=None)
    return s


def cmd_phase(args):
    """``phase``: the (T, A) grid x seeds, one run per unit; resumable, shardable; Fig. 1."""
    cfg, xp, data, (i, n) = check_phase(args)
    sweep.prepare(args.out, cfg)
    write_json(os.path.join(args.out, "versions.json"), versions())
    units = phase_units(len(cfg["T"]), len(cfg["A"]), cfg["seeds"])
    mine = sweep.shard(units, i, n)
    todo = set(sweep.pending(args.out, [u[0] for u in mine]))
    print(f"shard {i}/{n}: {len(todo)} of {len(mine)} runs to do ({len(units)} in the sweep)")
    t0 = time.time()
    for name, ti, ai, seed in mine:
        if name not in todo:
            continue
        settings = unit_settings(cfg, cfg["A"][ai], cfg["T"][ti], seed)
        work = os.path.join(args.out, "work", name)
        os.makedirs(work, exist_ok=True)
        if os.path.exists(os.path.join(work, CHECKPOINT_NAME)):
            diff = differing(
                read_checkpoint_settings(os.path.join(work, CHECKPOINT_NAME)), settings
            )
            if diff:
                raise InputError(f"{work} holds another run (differs in: {', '.join(diff)})")
        state, info = train_run(
            settings, data, xp, work, args.checkpoint_every, progress=not args.quiet, say=print
        )
        arrays = {k: np.array([v], dtype=np.float64) for k, v in final_metrics(state).items()}
        arrays["diverged_epoch"] = np.array([state.diverged_epoch], dtype=np.int64)
        arrays["val_acc_history"] = state.hist["test_acc"][None]  # a leading axis of one seed
        sweep.save_unit(args.out, name, arrays)
        shutil.rmtree(work)
        if not args.quiet:
            acc, val = arrays["train_acc"][0], arrays["val_acc"][0]
            print(f"{name}: train acc {acc:.4f}, val acc {val:.4f}")
    print(f"shard {i}/{n} done in {time.time() - t0:.0f} s")
    if n == 1:
        merge_phase(args.out)
    else:
        print(f"when every shard is done: python run_cifar.py merge --out {args.out}")


def merge_phase(out):
    """Combine the units of a finished sweep into phase.npz and the Fig. 1 figure."""
    cfg = sweep.load_config(out)
    A_list, T_list, seeds = cfg["A"], cfg["T"], cfg["seeds"]
    units = phase_units(len(T_list), len(A_list), seeds)
    done = sweep.load_units(out, [u[0] for u in units])
    placements = [(name, ti, ai, seeds.index(seed)) for name, ti, ai, seed in units]
    arrays = sweep.assemble(done, placements, len(T_list), len(A_list), len(seeds))
    summary = sweep.summarize(arrays, PHASE_FIELDS, A_list, T_list, seeds, "diverged_epoch")
    atomic_savez(os.path.join(out, "phase.npz"), **arrays, **summary)
    png = os.path.join(out, "phase.png")
    title = (
        f"Myrtle5 c={cfg['channels']}, {cfg['data']}, {len(seeds)} seeds per point, "
        f"{cfg['epochs']} epochs, batch {cfg['batch']}, lr peak {cfg['lr_peak']:g}"
    )
    sweep.plot_phase(summary, png, title, "period T (minibatch steps)")
    sweep.print_table(summary, digits=3)
    print(f"wrote {out}/phase.npz and the figure {png}")
    return summary


def cmd_merge(args):
    """``merge``: combine the shards of a sweep into phase.npz and its figure."""
    merge_phase(args.out)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, like every other refusal here."""

    def error(self, message):
        fail(message)


def add_common_options(p, out):
    """Data, protocol and device options shared by ``train`` and ``phase``."""
    p.add_argument(
        "--data",
        default=None,
        help="CIFAR-10 archive/folder (default: $CIFAR10_PATH), or 'synthetic'",
    )
    p.add_argument(
        "--md5", default=cifar.OFFICIAL_MD5, help="expected archive md5 ('none': no check)"
    )
    p.add_argument("--synthetic-train", type=int, default=10000, help="synthetic training images")
    p.add_argument("--synthetic-test", type=int, default=2000, help="synthetic test images")
    p.add_argument("--image-size", type=int, default=32, help="synthetic image side (8k)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--epochs", type=int, default=EPOCHS, help="final epoch (700)")
    p.add_argument("--batch", type=int, default=BATCH, help="minibatch size (512)")
    p.add_argument("--lr-peak", type=float, default=LR_PEAK, help="peak learning rate (0.02)")
    p.add_argument(
        "--lr-final", type=float, default=LR_FINAL, help="learning rate at the end (0.002)"
    )
    p.add_argument(
        "--peak-epoch", type=float, default=None, help="epoch of the peak (300/700 of --epochs)"
    )
    p.add_argument(
        "--stop-epoch", type=float, default=None, help="Gamma = 1 from here (600/700 of --epochs)"
    )
    p.add_argument("--momentum", type=float, default=MOMENTUM, help="Nesterov momentum (0.9)")
    p.add_argument("--channels", type=int, default=CHANNELS, help="Myrtle5 width c (64)")
    p.add_argument("--dtype", default="auto", help="auto (float32), float32 or float64")
    p.add_argument(
        "--train-eval-every",
        type=int,
        default=1,
        help="full training-set evaluation every E epochs and at the end (0: end only)",
    )
    p.add_argument("--eval-batch", type=int, default=500, help="images per evaluation pass")
    p.add_argument("--checkpoint-every", type=int, default=10, help="epochs between checkpoints")
    p.add_argument("--device", default="cpu", help="cpu or gpu")
    p.add_argument("--out", default=out, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser():
    """The argparse parser of every CIFAR-10 command."""
    parser = _Parser(prog="run_cifar.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("train", help="one run of the Fig. 1 protocol")
    add_common_options(p, "runs/cifar-train")
    p.add_argument("--A", type=float, default=50.0, help="amplitude (1: static loss)")
    p.add_argument("--T", type=float, default=100.0, help="period in minibatch steps")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed")
    p.add_argument(
        "--hess-every", type=int, default=0, help="top Hessian eigenvalue every E epochs (0: off)"
    )
    p.add_argument("--hess-batch", type=int, default=512, help="first N training images")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("phase", help="a (T, A) grid x seeds: Fig. 1 (resumable, shardable)")
    add_common_options(p, "runs/cifar-phase")
    p.add_argument("--A", default=PHASE_A, help="amplitudes, e.g. 1,10,50")
    p.add_argument("--T", default=PHASE_T, help="periods in minibatch steps, e.g. 50,100")
    p.add_argument("--seeds", type=int, default=30, help="seeds per point (the paper: 30)")
    p.add_argument("--seed0", type=int, default=0, help="first seed")
    p.add_argument("--shard", default="0/1", help="i/n: run the i-th of n slices of the work")
    p.set_defaults(func=cmd_phase, train_eval_every=0)

    p = sub.add_parser("merge", help="combine the shards of a phase sweep; Fig. 1")
    p.add_argument("--out", required=True, help="sweep folder")
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv=None):
    """Entry point."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.func(args)
    except (InputError, cifar.CifarError) as err:
        fail(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
