"""The Fig. 1 training protocol for Myrtle5: the data's normalisation, the schedule, one epoch of
training, evaluation.

Protocol (the Fig. 1 caption)
-----------------------------
Myrtle5 with c = 64 channels (models.py), CIFAR-10 without augmentation, normalised per channel
with the training-set mean and std (:func:`normalize`; apparatus/cifar_files.py reads the
archive); Nesterov momentum 0.9 (models.nesterov_step, PyTorch's form); minibatches of 512; 700
epochs; the dynamical loss (eqs. 1-5) with t counted in minibatch steps; oscillations stopped
(Gamma = 1) from epoch 600; test accuracy after every epoch.

* Learning rate: changes EVERY STEP. ``lr_at(t, steps_per_epoch, ...)`` is the piecewise-linear
  schedule evaluated at the fractional epoch e = t / steps_per_epoch: 0 at e = 0, lr_peak (0.02)
  at the peak epoch (300), lr_final (0.002) at the final epoch (700). Update t uses lr_at(t), so
  the first update only fills the momentum buffer (lr 0).
* Short runs: without a peak or stop epoch both are SCALED to the number of epochs, at 300/700
  and 600/700 of the run (fractional epochs are fine: everything is counted in steps).
* Gamma: update t uses dynloss.class_weights(t, A, T, K, stop_step) with
  stop_step = round(stop_epoch * steps_per_epoch); Gamma = 1 from that step on.
* Minibatches: a new permutation of the training set every epoch, drawn from the run's own
  np.random.Generator; the last partial batch is DROPPED, so every step sees exactly ``batch``
  images (CIFAR-10: 50000 // 512 = 97 steps per epoch; the 336 images left out differ from epoch
  to epoch). The paper does not say which it did.
* dtype: float32 by default (the paper's JAX runs were float32); float64 for exact checks.

Symbols: N images (a minibatch: B), Hx and Wx their height and width, C their channels, K
classes, t the minibatch step, E epochs, spe steps per epoch.

``settings`` is a dict of the protocol's values (apparatus/cifar_runs.py resolves them from the
command line): A, T, epochs, batch, lr_peak, lr_final, peak_epoch, stop_epoch, momentum, dtype.
The run around :func:`train_epoch` (seeds, checkpoints and exact resume, the logged history) is
apparatus/cifar_runs.py's.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dynloss import class_weights, get_array_module, loss_forward, per_sample_cross_entropy, to_host
from models import MYRTLE5, NESTEROV_MOMENTUM

# The Fig. 1 protocol (caption)
EPOCHS = 700
PEAK_EPOCH = 300  # learning rate 0 -> LR_PEAK linearly up to this epoch (of EPOCHS) ...
STOP_EPOCH = 600  # ... and Gamma = 1 from this epoch (of EPOCHS) on
LR_PEAK = 0.02
LR_FINAL = 0.002  # reached at the final epoch
BATCH = 512
MOMENTUM = NESTEROV_MOMENTUM
CHANNELS = 64


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


def lr_schedule(steps, spe, settings):
    """lr_at with the schedule of ``settings``: steps (S,) -> (S,) float64."""
    s = settings
    return lr_at(steps, spe, s["lr_peak"], s["lr_final"], s["peak_epoch"], s["epochs"])


def step_lrs(settings, spe, t0, t1):
    """lr_at for the updates t0 <= t < t1: (t1-t0,) float64."""
    return lr_schedule(np.arange(t0, t1), spe, settings)


# ---------------------------------------------------------------------------------------------
# The data: CIFAR-10-format images, normalised per channel
# ---------------------------------------------------------------------------------------------

NORMALIZE_CHUNK = 2048  # images per step of the normalisation: bounds its float64 scratch memory


@dataclasses.dataclass(frozen=True)
class CifarData:
    """A CIFAR-10-format data set.

    Attributes:
        x_train: (N_train, Hx, Wx, C) images, uint8 0..255 as loaded, float after ``normalize``.
        y_train: (N_train,) int64 labels in 0..K-1.
        x_test: (N_test, Hx, Wx, C) images, same dtype as ``x_train``.
        y_test: (N_test,) int64 labels in 0..K-1.
        label_names: K class names.
        source: where the data came from (archive path, folder path, or synthetic settings).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    label_names: tuple[str, ...]
    source: str


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of images, in units of pixel / 255.

    x : (N, Hx, Wx, C) images with values 0..255 (uint8 for CIFAR-10). Returns mean (C,) and
    std (C,) float64; for the CIFAR-10 training set about (0.4914, 0.4822, 0.4465) and (0.2470,
    0.2435, 0.2616).
    """
    total = np.zeros(x.shape[-1])
    total_sq = np.zeros(x.shape[-1])
    for start in range(0, x.shape[0], NORMALIZE_CHUNK):
        chunk = x[start : start + NORMALIZE_CHUNK].astype(np.float64)  # (n, Hx, Wx, C)
        total += chunk.sum(axis=(0, 1, 2))  # (C,); exact: integer sums stay below 2**53
        total_sq += np.square(chunk).sum(axis=(0, 1, 2))  # (C,)
    count = x.size // x.shape[-1]
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    return mean / 255.0, np.sqrt(var) / 255.0


def normalize_images(x, mean, std, dtype=np.float32):
    """(x / 255 - mean) / std per channel, computed in float64 chunks and stored as ``dtype``.

    Args:
        x: (N, Hx, Wx, C) images with values 0..255.
        mean, std: (C,) statistics in units of pixel / 255, from ``channel_stats`` of the
            TRAINING images (also when normalising the test images).
        dtype: np.float32 or np.float64.

    Returns:
        (N, Hx, Wx, C) array of ``dtype``.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    out = np.empty(x.shape, dtype=dtype)  # (N, Hx, Wx, C)
    for start in range(0, x.shape[0], NORMALIZE_CHUNK):
        chunk = x[start : start + NORMALIZE_CHUNK].astype(np.float64) / 255.0
        out[start : start + NORMALIZE_CHUNK] = (chunk - mean) / std
    return out


def normalize(data: CifarData, dtype=np.float32) -> CifarData:
    """Normalise train and test images per channel with the TRAINING-set mean and std.

    data : CifarData, x_train (N_train, Hx, Wx, C) and x_test (N_test, Hx, Wx, C) in 0..255;
    dtype : np.float32 or np.float64. Returns a CifarData with those images normalised as
    ``dtype``, labels and names unchanged, the statistics recorded in ``source``.
    """
    mean, std = channel_stats(data.x_train)  # (C,), (C,)
    stats = ", ".join(f"{m:.4f}/{s:.4f}" for m, s in zip(mean, std, strict=True))
    return dataclasses.replace(
        data,
        x_train=normalize_images(data.x_train, mean, std, dtype),
        x_test=normalize_images(data.x_test, mean, std, dtype),
        source=f"{data.source}, normalised with train mean/std {stats}",
    )


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------


def train_epoch(params, velocity, x, y, rng, t0, settings, net=None, progress=None):
    """One epoch of the protocol: minibatch steps t0, t0 + 1, ... of Nesterov momentum on the
    dynamical loss, in place on ``params`` and ``velocity`` (dicts on the backend of x).

    x : (N, Hx, Wx, C) training images, y : (N,) labels, on the backend of params;
    rng : np.random.Generator of the minibatch order;  settings : the protocol's values;
    net : the network's implementation: forward, loss_and_grads, nesterov_step (None:
    models.MYRTLE5, the reference; fast/myrtle5.py packs the fused copies);
    progress : optional callable(steps).
    Returns loss_sum, correct (0-d arrays: the sum of the steps' F, the correct predictions) and
    the first step's F (the scale of divergence of a run).
    """
    net = net or MYRTLE5
    xp = get_array_module(x)
    B, K = settings["batch"], params["b5"].shape[0]
    spe = steps_per_epoch(x.shape[0], B)
    gammas = step_gammas(settings, spe, t0, t0 + spe, K)  # (spe, K)  Eqs. (2)-(5)
    gammas = xp.asarray(gammas, dtype=np.dtype(settings["dtype"]))
    lrs = step_lrs(settings, spe, t0, t0 + spe)  # (spe,) on the host
    order = rng.permutation(x.shape[0])[: spe * B].reshape(spe, B)  # the rest is dropped
    order = xp.asarray(order)  # (spe, B)
    loss_sum = correct = xp.zeros((), dtype=np.float64)
    for i in range(spe):
        xb, yb = x[order[i]], y[order[i]]  # (B, Hx, Wx, C), (B,)
        F, grads, logits = net.loss_and_grads(params, xb, yb, gammas[i])  # Eq. (1)
        # float(): a weak Python scalar keeps float32 arithmetic in float32 (NEP 50)
        net.nesterov_step(params, grads, velocity, float(lrs[i]), settings["momentum"])
        if i == 0:
            F_first = F  # the scale of divergence of a run
        loss_sum = loss_sum + F
        correct = correct + (logits.argmax(axis=1) == yb).sum()
        if progress is not None:
            progress(1)
    return loss_sum, correct, F_first


def evaluate(params, x, y, gamma, batch, net=None):
    """Dynamical loss (eq. 1 with ``gamma``), static cross-entropy and accuracy on (x, y).

    x : (N, Hx, Wx, C) and y : (N,) on the backend of params; gamma : (K,); forward passes of
    ``batch`` images; net : as :func:`train_epoch`'s. Returns three floats (one host sync).
    """
    xp = get_array_module(x)
    gamma_row = xp.asarray(gamma, dtype=np.float64)[None]  # (1, K): M = 1 network
    dyn = static = correct = xp.zeros((), dtype=np.float64)
    for s in range(0, x.shape[0], batch):
        yb = y[s : s + batch]  # (n,)
        logits, _ = (net or MYRTLE5).forward(x[s : s + batch], params)  # (n, K)
        logits64 = logits.astype(np.float64)[None]  # (1, n, K)
        dyn = dyn + loss_forward(logits64, yb, gamma_row)[0][0] * len(yb)  # n F of eq. (1)
        static = static + per_sample_cross_entropy(logits64, yb).sum()  # sum_j CE_j
        correct = correct + (logits.argmax(axis=1) == yb).sum()
    n = x.shape[0]
    host = to_host({"dyn": dyn, "static": static, "correct": correct})
    return float(host["dyn"]) / n, float(host["static"]) / n, float(host["correct"]) / n
