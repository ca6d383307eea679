"""A run of the Fig. 1 protocol around protocol.train_epoch: its settings, data, seeds, logged
history, checkpoints with exact resume, and the optional Hessian eigenvalue.

* Seeds: seed s spawns two streams from np.random.SeedSequence(s): the first initialises the
  network (models.init_myrtle5), the second shuffles. The data do not depend on it.
* The optional Hessian eigenvalue is always computed in float64 on the CPU.
* Checkpoints: ``checkpoint.npz`` in the run's folder, written atomically (``p_<name>``/
  ``v_<name>``: parameters and Nesterov buffers in the run's dtype; ``epoch``, ``step``;
  ``rng_state``: the shuffling Generator's bit_generator.state as JSON; ``hist_<field>`` and
  ``gamma``: the history so far; ``hess_vec``: the warm start of the eigenvalue solver;
  ``diverged_epoch``; ``loss0``: the first minibatch's loss, the scale of divergence;
  ``settings``: the settings as JSON). A checkpoint is validated before it is resumed
  (:func:`read_checkpoint`). Resuming gives exactly the result of an uninterrupted run (bit for
  bit on the CPU). docs/formats.md describes run.npz.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from types import SimpleNamespace

import numpy as np
from tqdm import tqdm

import protocol
from apparatus import cifar_files as cifar
from apparatus import digits, signals, synthetic
from apparatus.cli import MAX_AMPLITUDE, MAX_PERIOD, MAX_SEED, InputError, check_number
from apparatus.storage import atomic_savez, identity
from dynloss import diverged as loss_diverged
from dynloss import to_device, to_host
from models import (
    MYRTLE5_DIVISOR,
    MYRTLE5_PARAM_NAMES,
    init_myrtle5,
    myrtle5_shapes,
)
from protocol import (
    BATCH,
    CHANNELS,
    EPOCHS,
    LR_FINAL,
    LR_PEAK,
    MOMENTUM,
    PEAK_EPOCH,
    STOP_EPOCH,
    evaluate,
    step_gammas,
    step_lrs,
    steps_per_epoch,
    stop_step,
    train_epoch,
)
from spectra import top_eigs

CHECKPOINT_NAME = "checkpoint.npz"
DIGITS_TRAIN = 300  # --data digits: training images of the stratified split (docs/digits.md)

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


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------

MD5_PATTERN = re.compile(r"^[0-9a-fA-F]{32}$")
DEFAULTS = {  # the options of run_cifar.py train and phase, at the Fig. 1 protocol
    "data": None,  # CIFAR-10 archive or folder (None: $CIFAR10_PATH), "synthetic" or "digits"
    "md5": cifar.OFFICIAL_MD5,
    "synthetic_train": 10000,
    "synthetic_test": 2000,
    "image_size": 32,
    "data_seed": 0,
    "digits_train": DIGITS_TRAIN,
    "epochs": None,  # None: EPOCHS, or DIGITS_PROTOCOL's for --data digits
    "batch": None,  # None: BATCH, or DIGITS_PROTOCOL's
    "lr_peak": LR_PEAK,
    "lr_final": LR_FINAL,
    "peak_epoch": None,  # None: PEAK_EPOCH / EPOCHS of the run
    "stop_epoch": None,  # None: STOP_EPOCH / EPOCHS of the run
    "momentum": MOMENTUM,
    "channels": None,  # None: CHANNELS, or DIGITS_PROTOCOL's
    "dtype": "auto",
    "train_eval_every": 1,
    "eval_batch": 500,
    "checkpoint_every": 10,
    "device": "cpu",
}
PAPER_PROTOCOL = {"epochs": EPOCHS, "batch": BATCH, "channels": CHANNELS}  # Fig. 1's scale
DIGITS_PROTOCOL = {"epochs": 140, "batch": 30, "channels": 16}  # the digits' scale (docs/digits.md)


def protocol_defaults(args):
    """The scale options left unset (None) filled in for the data: the paper's for CIFAR-10 and
    synthetic data, DIGITS_PROTOCOL for --data digits. Returns a namespace copy."""
    scale = DIGITS_PROTOCOL if getattr(args, "data", None) == "digits" else PAPER_PROTOCOL
    filled = dict(vars(args))
    for key, value in scale.items():
        if filled.get(key) is None:
            filled[key] = value
    return SimpleNamespace(**filled)


def resolve_settings(args):
    """Validate the protocol's options (names as in DEFAULTS); return the defining settings.

    ``args`` : any object with the attributes of DEFAULTS (run_cifar.py's options). The settings
    are what defines the result (not the output folder, device, checkpoint interval); the
    schedule's peak and stop epochs are scaled to the number of epochs when not given. A, T and
    seed are filled in by the caller, the data's fingerprint once it is loaded. Raises
    InputError.
    """
    args = protocol_defaults(args)
    count = lambda v, name: check_number(v, name, int, low=1)
    count(args.epochs, "--epochs")
    count(args.batch, "--batch")
    check_number(args.lr_peak, "--lr-peak", low=0, low_open=True)
    check_number(args.lr_final, "--lr-final", low=0)
    count(args.channels, "--channels")
    if not 0 <= check_number(args.momentum, "--momentum") < 1:
        raise InputError(f"--momentum must be in [0, 1), got {args.momentum}")
    count(args.checkpoint_every, "--checkpoint-every")
    check_number(args.train_eval_every, "--train-eval-every", int, low=0)
    count(args.eval_batch, "--eval-batch")
    E = args.epochs
    peak = E * PEAK_EPOCH / EPOCHS if args.peak_epoch is None else args.peak_epoch
    stop = E * STOP_EPOCH / EPOCHS if args.stop_epoch is None else args.stop_epoch
    if not 0 < check_number(peak, "--peak-epoch") <= E:
        raise InputError(f"--peak-epoch must be in (0, --epochs = {E}], got {peak}")
    if not 0 <= check_number(stop, "--stop-epoch") <= E:
        raise InputError(f"--stop-epoch must be in [0, --epochs = {E}], got {stop}")
    if args.dtype not in ("auto", "float32", "float64"):
        raise InputError(f"--dtype must be auto, float32 or float64, got {args.dtype!r}")
    if args.device not in ("cpu", "gpu"):
        raise InputError(f"--device must be cpu or gpu, got {args.device!r}")
    dtype = "float32" if args.dtype == "auto" else args.dtype
    kind = args.data if args.data in ("synthetic", "digits") else "cifar10"
    md5 = None
    if kind != "cifar10":
        check_number(args.data_seed, "--data-seed", int, low=0)
    if kind == "synthetic":
        count(args.synthetic_train, "--synthetic-train")
        count(args.synthetic_test, "--synthetic-test")
        n_batches = len(cifar.TRAIN_MEMBERS)
        if args.synthetic_train % n_batches:
            raise InputError(f"--synthetic-train must be a multiple of {n_batches}")
        check_image_size(args.image_size, "--image-size")
    elif kind == "digits":
        count(args.digits_train, "--digits-train")
    else:
        md5 = None if str(args.md5).lower() == "none" else str(args.md5).lower()
        if md5 is not None and not MD5_PATTERN.match(md5):
            raise InputError(f"--md5 must be 32 hex digits or 'none', got {args.md5!r}")
    synthetic = kind == "synthetic"
    return {
        "data": kind,
        "md5": md5,
        "synthetic_train": args.synthetic_train if synthetic else None,
        "synthetic_test": args.synthetic_test if synthetic else None,
        "image_size": args.image_size if synthetic else None,
        "data_seed": args.data_seed if kind != "cifar10" else None,
        "digits_train": args.digits_train if kind == "digits" else None,
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


def check_run(A, T, seed):
    """Validate one run's amplitude, period and seed, within the settings files' bounds."""
    check_number(A, "--A", low=1, high=MAX_AMPLITUDE)
    check_number(T, "--T", low=1, high=MAX_PERIOD)
    check_number(seed, "--seed", int, low=0, high=MAX_SEED)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def check_image_size(size, name):
    """Refuse an image side that Myrtle5 cannot take (InputError)."""
    if size <= 0 or size % MYRTLE5_DIVISOR:
        raise InputError(
            f"{name} {size}: Myrtle5 needs image sides that are positive multiples of "
            f"{MYRTLE5_DIVISOR} (three 2x2 average pools)"
        )


def load_data(settings, path, hess_batch=0):
    """Load and normalise the data (training-set statistics); check it fits the settings.

    path : --data (None: $CIFAR10_PATH) for CIFAR-10, unused for synthetic data and digits.
    Returns a dict: x_train (N, Hx, Wx, C) and x_test in the settings' dtype, y_train (N,),
    y_test, K classes, C channels, source, the fingerprint of the decoded data
    (cifar.fingerprint), and x_hess (hess_batch, Hx, Wx, C) float64 / y_hess when hess_batch > 0.
    Raises InputError (CifarError's one line, image sides, batch larger than the training set).
    """
    s = settings
    try:
        if s["data"] == "synthetic":
            n_per_batch = s["synthetic_train"] // len(cifar.TRAIN_MEMBERS)
            raw = synthetic.load_synthetic(
                s["data_seed"], n_per_batch, s["synthetic_test"], s["image_size"]
            )
        elif s["data"] == "digits":
            raw = digits.load_digits(s["digits_train"], s["data_seed"])
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
    data = protocol.normalize(raw, np.dtype(s["dtype"]))
    out = {
        "fingerprint": cifar.fingerprint(raw),
        "x_train": data.x_train,
        "y_train": data.y_train,
        "x_test": data.x_test,
        "y_test": data.y_test,
        "K": len(data.label_names),
        "C": data.x_train.shape[3],
        "source": data.source,
    }
    if hess_batch:
        mean, std = protocol.channel_stats(raw.x_train)
        out["x_hess"] = protocol.normalize_images(raw.x_train[:hess_batch], mean, std, np.float64)
        out["y_hess"] = raw.y_train[:hess_batch]
    return out


# ---------------------------------------------------------------------------------------------
# A run: state, checkpoints, history
# ---------------------------------------------------------------------------------------------


def top_hessian_eig(params, x, y, gamma, v0):
    """Top eigenvalue of the Hessian of the dynamical loss on (x, y), float64 on the CPU.

    spectra.top_eigs (eigsh, which='LA') on the fused copy of models.myrtle5_hvp_operator
    (fast/myrtle5.py, NumPy), warm-started from v0 (P,) (None: a fixed random start).
    Returns (lambda_max, eigenvector (P,)).
    """
    from fast.myrtle5 import myrtle5_hvp_operator

    host = {k: v.astype(np.float64) for k, v in to_host(params).items()}
    matvec = myrtle5_hvp_operator(host, x, y, gamma)
    P = sum(v.size for v in host.values())
    vals, vecs = top_eigs(matvec, P, n_eig=1, v0=v0)
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
        self.loss0 = np.nan  # the loss of the first minibatch: the scale of divergence


def _fresh_state(settings, K, C, xp):
    init_seq, shuffle_seq = np.random.SeedSequence(settings["seed"]).spawn(2)
    params = init_myrtle5(
        np.random.default_rng(init_seq),
        c=settings["channels"],
        in_channels=C,
        n_classes=K,
        dtype=np.dtype(settings["dtype"]),
    )
    params = to_device(params, xp)
    velocity = {k: xp.zeros_like(v) for k, v in params.items()}
    return _State(params, velocity, np.random.default_rng(shuffle_seq), settings["epochs"], K)


def _settings_json(settings):
    return json.dumps(settings, sort_keys=True)


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
        loss0=np.float64(state.loss0),
        settings=np.array(_settings_json(settings)),
        identity=np.array(identity(settings)),
    )
    atomic_savez(path, **arrays)


class CheckpointError(ValueError):
    """A checkpoint that does not read or does not fit the run: one line naming the file."""


def read_checkpoint(path, settings=None, K=None, C=None, spe=None):
    """Every array of a checkpoint, validated: readable (no bad CRC, no truncation), every field
    present, and, given the run's ``settings``, K classes, C input channels and ``spe`` steps per
    epoch, the shapes of that run (parameters, history, warm start), an epoch within the run and
    its step. Raises CheckpointError saying what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        stored = json.loads(str(arrays["settings"]))
        json.loads(str(arrays["rng_state"]))["bit_generator"]
    except KeyError as err:
        raise CheckpointError(f"checkpoint {path} lacks {err}") from None
    except Exception as err:  # a bad CRC, a truncated zip, garbage: unreadable
        raise CheckpointError(f"checkpoint {path} does not read ({type(err).__name__})") from None
    need = [f"p_{k}" for k in MYRTLE5_PARAM_NAMES] + [f"v_{k}" for k in MYRTLE5_PARAM_NAMES]
    need += [f"hist_{f}" for f in HIST_FIELDS] + ["epoch", "step", "rng_state", "gamma"]
    need += ["hess_vec", "diverged_epoch", "loss0", "identity"]
    missing = [k for k in need if k not in arrays]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing[:3])}")
    if str(arrays["identity"]) != identity(stored):  # its settings were edited, or another's
        raise CheckpointError(f"checkpoint {path}: its identity does not match its settings")
    if settings is not None:
        E = settings["epochs"]
        bad = any(arrays[f"hist_{f}"].shape != (E + 1,) for f in HIST_FIELDS)
        bad |= not 0 <= int(arrays["epoch"]) <= E
        if K is not None:
            bad |= arrays["gamma"].shape != (E + 1, K)
        if K is not None and C is not None:
            shapes = myrtle5_shapes(settings["channels"], C, K)
            for k, shape in shapes.items():
                bad |= arrays[f"p_{k}"].shape != shape or arrays[f"v_{k}"].shape != shape
            P = sum(int(np.prod(s)) for s in shapes.values())
            bad |= arrays["hess_vec"].size not in (0, P)
        if spe is not None:
            bad |= int(arrays["step"]) != int(arrays["epoch"]) * spe
        if bad:
            raise CheckpointError(f"checkpoint {path} does not fit this run")
    arrays["settings"] = stored
    return arrays


def load_checkpoint(path, settings, K, C, spe, xp):
    """Restore a :class:`_State` written by :func:`save_checkpoint` (validated first)."""
    z = read_checkpoint(path, settings, K, C, spe)
    params = to_device({k: z[f"p_{k}"] for k in MYRTLE5_PARAM_NAMES}, xp)
    velocity = to_device({k: z[f"v_{k}"] for k in MYRTLE5_PARAM_NAMES}, xp)
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = json.loads(str(z["rng_state"]))
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path}: bad rng_state ({type(err).__name__})") from None
    state = _State(params, velocity, rng, settings["epochs"], K)
    state.epoch, state.step = int(z["epoch"]), int(z["step"])
    state.hist = {f: z[f"hist_{f}"].copy() for f in HIST_FIELDS}
    state.gamma = z["gamma"].copy()
    state.hess_vec = z["hess_vec"].copy() if z["hess_vec"].size else None
    state.diverged_epoch = int(z["diverged_epoch"])
    state.loss0 = float(z["loss0"])
    return state


def _log_row(state, settings, data, dev, spe, hess_every, net):
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
                state.params, dev["x_train"], dev["y_train"], gamma, settings["eval_batch"], net
            )
            state.hist["train_loss"][e] = dyn
            state.hist["train_loss_static"][e] = static
            state.hist["train_acc"][e] = acc
        _, test_loss, test_acc = evaluate(
            state.params, dev["x_test"], dev["y_test"], gamma, settings["eval_batch"], net
        )
    state.hist["test_loss"][e], state.hist["test_acc"][e] = test_loss, test_acc
    if hess_every and e % hess_every == 0 and state.diverged_epoch < 0:
        lam, state.hess_vec = top_hessian_eig(
            state.params, data["x_hess"], data["y_hess"], gamma, state.hess_vec
        )
        state.hist["hess_top"][e] = lam


def _minibatch_progress(bar):
    """The progress callback of an epoch's minibatches: it advances ``bar`` and stops at once on
    Ctrl-C (SIGINT: the run resumes from its last checkpoint); SIGTERM lets the epoch end, so
    that the run is checkpointed there (:func:`train_run`)."""

    def step(n):
        if bar is not None:
            bar.update(n)
        if signals.requested() == signal.SIGINT:
            signals.check()

    return step


def _train_epoch(state, settings, dev, net, bar):
    """protocol.train_epoch on the run's state; records the epoch's mean minibatch loss and
    accuracy and the first loss of the run. Returns False when the loss has diverged."""
    B, t0 = settings["batch"], state.step
    spe = steps_per_epoch(dev["x_train"].shape[0], B)
    with np.errstate(all="ignore"):
        loss_sum, correct, F_first = train_epoch(
            state.params,
            state.velocity,
            dev["x_train"],
            dev["y_train"],
            state.rng,
            t0,
            settings,
            net,
            _minibatch_progress(bar),
        )
    if state.step == 0:
        state.loss0 = float(F_first)  # the scale of divergence (dynloss.diverged)
    host = to_host({"loss": loss_sum, "correct": correct})  # one host sync per epoch
    state.step += spe
    state.epoch += 1
    state.hist["batch_loss"][state.epoch] = float(host["loss"]) / spe
    state.hist["batch_acc"][state.epoch] = float(host["correct"]) / (spe * B)
    return not loss_diverged(float(host["loss"]) / spe, state.loss0)


def train_run(
    settings, data, xp, work, checkpoint_every, hess_every=0, progress=True, say=print, net=None
):
    """Train one Myrtle5 network; checkpoint into ``work`` and resume from it.

    settings : from :func:`resolve_settings` plus A, T, seed;  data : from :func:`load_data`;
    net : the network's implementation (None: models.MYRTLE5; fast/myrtle5.net_for: fused).
    Returns (state, info) with the finished :class:`_State` (history complete) and a dict of
    steps_per_epoch, stop_step, resumed_from (epoch or None) and seconds.
    """
    t_start = time.time()
    E, K = settings["epochs"], data["K"]
    spe = steps_per_epoch(data["x_train"].shape[0], settings["batch"])
    dev = {k: xp.asarray(data[k]) for k in ("x_train", "y_train", "x_test", "y_test")}
    dev["n_train"] = data["x_train"].shape[0]
    ckpt = os.path.join(work, CHECKPOINT_NAME)
    resumed = None
    if os.path.exists(ckpt):
        state = load_checkpoint(ckpt, settings, K, data["C"], spe, xp)
        resumed = state.epoch
        say(f"resuming from {ckpt} at epoch {state.epoch} of {E}")
    else:
        state = _fresh_state(settings, K, data["C"], xp)
        _log_row(state, settings, data, dev, spe, hess_every, net)
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
        finite = _train_epoch(state, settings, dev, net, bar)
        if not finite:  # diverged: not finite, or far above the first minibatch's loss
            state.diverged_epoch = state.epoch
        _log_row(state, settings, data, dev, spe, hess_every, net)
        bar.set_postfix(test_acc=f"{state.hist['test_acc'][state.epoch]:.3f}", refresh=False)
        stop = signals.requested()
        if state.epoch % checkpoint_every == 0 or state.epoch == E or not finite or stop:
            save_checkpoint(ckpt, state, settings)
        if stop:
            bar.close()
            raise signals.Interrupted(stop, f"the run in flight is checkpointed at epoch "
                                      f"{state.epoch} of {E} in {ckpt}")  # fmt: skip
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
    """The arrays of run.npz (module docstring): ``epoch``, ``step`` (E+1,), ``gamma`` (E+1, K),
    every history field (E+1,), scalars ``steps_per_epoch``, ``stop_step`` and the rest of info."""
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
