"""What each command allocates, in bytes, before it allocates it: the memory half of the input
checks (apparatus/cli.check_memory refuses a plan above MEMORY_FRACTION of the machine).

Each estimate is the process's baseline (Python, NumPy, SciPy, Matplotlib imported: BASE) plus
the arrays the command's code creates, term by term, with the number of copies that live at once
read from the code (and measured: tests/test_memory.py runs every command at two sizes in a
subprocess and holds each estimate within a factor MEMORY_TOLERANCE of the measured peak).
Worker processes (apparatus/workers.py) each hold their own job's arrays: their terms are counted
once per worker that runs at once.

Symbols: M networks, H hidden units, N training points (N_SPIRAL), S logged rows, P parameters.
"""

from __future__ import annotations

import os

F64 = 8  # bytes of a float64
BASE = 110 * 2**20  # the interpreter with NumPy, SciPy and Matplotlib imported (measured ~100 MiB)
N_SPIRAL = 300  # training points of the spiral (and as many validation points)
K_SPIRAL, D_SPIRAL = 3, 2
LOG_FIELDS = 6  # spiral.LOG_FIELDS: loss, dloss, loss_static, train_acc, val_acc, val_loss
LOG_BUFFER = 1 << 25  # fast/spiral_trainer.LOG_BUFFER_BYTES: logits kept between metric passes
FAST_MASKS = 1.1  # (M, H, 2N) arrays of the fast trainer's block: its two masks, and temporaries
REFERENCE_ACTIVATIONS = 2.6  # (M, H, 2N) arrays of models.mlp_loss_and_grads at once (z1, h1, dh1)
TRACKER_ACTIVATIONS = 2.0  # (N, H) arrays of one tracked network (its state and the products)
LOG_COPIES = 4  # copies of the logged history at once (trainer, result, run arrays, the file)
CPU_BLOCK_UNITS = 400  # fast/spiral_trainer.CPU_BLOCK_UNITS
ONSET_DENSE = 4.4  # (P, P) matrices of the onset tracker's dense spectra at once (the Hessian's
# two parts and their sum, the eigensolver's work)
DENSE_COPIES = 7  # (P, P) float64 matrices alive at once in the spectra rows of a check (the
# Hessian, its parts, J^T Hz J, the eigensolver's work): 2.2 GB measured at width 1000 (P = 6003)
JACOBIAN_COPIES = 7  # (N K, P) float64 matrices with them (J, J^T Hz, the differenced logits)
CHECK_FIXED = 36 * 2**20  # what a check imports and holds beyond BASE whatever its width


def workers_at_once(jobs, workers=None):
    """Worker processes that run at once for ``jobs`` jobs on the CPU (apparatus/workers)."""
    workers = workers or min(2, os.cpu_count() or 1)
    return max(1, min(workers, jobs))


def spiral_params(width):
    """P of one spiral network: (D + 1 + K) H + K."""
    return (D_SPIRAL + 1 + K_SPIRAL) * width + K_SPIRAL


def history(M, rows):
    """The logged history of M networks over ``rows`` rows, with its copies: (S, M) fields and
    Gamma (S, M, K)."""
    return LOG_COPIES * F64 * rows * M * (LOG_FIELDS + K_SPIRAL)


def fast_block(M, H, rows):
    """One block of the fast trainer: its masks and temporaries, its logged logits' buffer."""
    masks = FAST_MASKS * F64 * M * H * 2 * N_SPIRAL
    logits = min(LOG_BUFFER, F64 * rows * M * (K_SPIRAL + 1) * N_SPIRAL)
    return masks + logits + history(M, rows) + 4 * F64 * M * spiral_params(H)


def spiral_training(M, H, rows, reference=False, gpu=False):
    """Training M networks of width H logging ``rows`` rows (train, a phase batch): on the
    CPU blocks of about CPU_BLOCK_UNITS hidden units in worker processes; on a GPU one block
    (its device memory, and the host's history); the reference loop in this process."""
    if reference:
        act = REFERENCE_ACTIVATIONS * F64 * M * H * 2 * N_SPIRAL
        return BASE + act + history(M, rows) + 4 * F64 * M * spiral_params(H)
    block = M if gpu else max(1, min(M, CPU_BLOCK_UNITS // H))
    blocks = -(-M // block)
    at_once = 1 if gpu else workers_at_once(blocks)
    return BASE + at_once * fast_block(block, H, rows) + history(M, rows)


def tracked(M_job, jobs, H, steps, log_every, spectra_rows, k=1, ntk=True):
    """Training with the spectra tracker (dynamics, threshold): ``jobs`` jobs of M_job networks
    (each trained as one block, with a tracker per network: its (N, H) state and products, its
    Lanczos vectors), as many at once as there are workers; the series of every network."""
    P = spiral_params(H)
    per_net = TRACKER_ACTIVATIONS * F64 * N_SPIRAL * H + 24 * F64 * P * max(k, 1)
    if ntk:
        per_net += 24 * F64 * N_SPIRAL * K_SPIRAL
    rows = steps // log_every + 2
    job = fast_block(M_job, H, rows) + M_job * per_net
    series = F64 * M_job * jobs * spectra_rows * (k + 3)
    return BASE + workers_at_once(jobs) * job + 3 * series


def density(H, steps, log_every, probes, lanczos_steps, at):
    """A density run: one network trained, SLQ's Lanczos basis (P, m) at each chosen step."""
    P = spiral_params(H)
    rows = steps // log_every + 2
    slq = F64 * P * (min(lanczos_steps, P) + 6) + F64 * len(at) * probes * lanczos_steps * 3
    return spiral_training(1, H, rows) + slq + TRACKER_ACTIVATIONS * F64 * N_SPIRAL * H


def onset(M_job, H, steps, jobs, series):
    """An onset sweep: in each worker, a job of M_job networks on the reference loop, each
    with its tracker's per-step series and the dense spectra at events ((P, P) and (NK, NK))."""
    P = spiral_params(H)
    per_job = REFERENCE_ACTIVATIONS * F64 * M_job * H * 2 * N_SPIRAL
    per_job += F64 * M_job * (steps + 1) * (series + LOG_FIELDS + K_SPIRAL)
    per_job += ONSET_DENSE * F64 * P * P + 4 * F64 * (N_SPIRAL * K_SPIRAL) ** 2
    return BASE + workers_at_once(jobs) * per_job + 2 * F64 * M_job * (steps + 1) * series


def dense_check(P, NK=N_SPIRAL * K_SPIRAL):
    """A check command's dense matrices: the exact Hessian, its parts, eigh's work (P, P); the
    Jacobian and its products (NK, P)."""
    return BASE + CHECK_FIXED + F64 * P * (DENSE_COPIES * P + JACOBIAN_COPIES * NK)


def files(paths, copies=3):
    """Commands that read stored arrays (merge, reeval, rule): the arrays of ``paths`` as they
    are loaded and assembled, ``copies`` at once."""
    return BASE + copies * sum(os.path.getsize(p) for p in paths if os.path.exists(p))


CIFAR_IMAGES, CIFAR_SIDE = 60000, 32  # CIFAR-10: 50,000 + 10,000 images of 32 x 32 x 3
DIGITS_IMAGES, DIGITS_SIDE = 1797, 8  # scikit-learn's digits (padded to 8 x 8: apparatus/digits)
HISTORY_COLUMNS = 32  # float64 values per epoch in a run's history
ACTIVATION_COPIES = 28.5  # feature maps of a batch Myrtle5 keeps at once (forward, cache,
# backward, the im2col columns)
PIXEL_BYTES = 1900  # bytes per image pixel of a batch whatever the width (input columns, pools)
CIFAR_FIXED = 16 * 2**20  # what a run holds whatever its size (the figure, the history's plot)
WEIGHT_COPIES = 2.1  # float64-sized copies of the weights at once in training (float32: the
# parameters, velocity, gradients and the checkpoint's copy)
CHECK_WEIGHT_COPIES = 32  # ... and in the check (float64: each row's parameters, gradients,
# R-operator products and differences)


def myrtle5_weights(c, in_channels, classes):
    """Parameters of Myrtle5 (models.myrtle5_shapes): four 3 x 3 convolutions and a dense layer."""
    return 9 * in_channels * c + 3 * 9 * c * c + c * classes + 4 * c + classes


def cifar_data(settings):
    """(images, side, channels) of the run's data set."""
    if settings["data"] == "synthetic":
        return settings["synthetic_train"] + settings["synthetic_test"], settings["image_size"], 3
    if settings["data"] == "digits":
        return DIGITS_IMAGES, DIGITS_SIDE, 1
    return CIFAR_IMAGES, CIFAR_SIDE, 3


def cifar_run(settings):
    """A run of the Fig. 1 protocol: its images (raw bytes, the normalised copy), the feature
    maps of a training and an evaluation batch, the weights with their copies, the history
    (the coefficients: a least-squares fit to peaks measured at batches 8 and 64, widths 96 to
    384, which it reproduces within 1%)."""
    n, side, C = cifar_data(settings)
    itemsize = 8 if settings["dtype"] == "float64" else 4
    images = n * side * side * C * (1 + 2 * itemsize)
    batch = max(settings["batch"], settings["eval_batch"])
    activations = ACTIVATION_COPIES * batch * side * side * settings["channels"] * itemsize
    activations += PIXEL_BYTES * batch * side * side
    weights = WEIGHT_COPIES * 8 * myrtle5_weights(settings["channels"], C, 10)
    history = F64 * (settings["epochs"] + 1) * HISTORY_COLUMNS
    return BASE + CIFAR_FIXED + images + activations + weights + history


def myrtle5_check(c, in_channels, classes):
    """run_cifar.py check: the weights in float64 with their copies (the parameters, gradients,
    R-operator products and differences of every row), and a few images' feature maps."""
    return BASE + CHECK_WEIGHT_COPIES * F64 * myrtle5_weights(c, in_channels, classes)
