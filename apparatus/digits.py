"""scikit-learn's handwritten digits as a small real-image data set for Myrtle5 (Fig. 1's question).

CIFAR-10 cannot be downloaded everywhere; scikit-learn's wheel carries the UCI handwritten
digits inside it (``sklearn.datasets.load_digits``: 1,797 grey-scale 8x8 images of the digits
0-9, about 180 per class, pixel values 0..16), so they load offline wherever scikit-learn
installs. scikit-learn is an optional dependency used only here
(``pip install -r requirements-digits.txt``).

:func:`load_digits` returns them like cifar.load_cifar10 does CIFAR-10: a protocol.CifarData of
NHWC images (N, 8, 8, 1) and int64 labels, so that cifar.normalize (per-channel mean and std of
the training split) and the Myrtle5 protocol take them unchanged (8x8 fits Myrtle5: sides
divisible by 8). The train/test split is stratified and fixed by a seed: for every class the
same fraction of its images (the class's share of ``n_train``, largest remainders rounded up)
goes to the training split, drawn with np.random.default_rng(seed); the rest is the test split.
"""

from __future__ import annotations

import numpy as np

from apparatus.cifar_files import CifarError
from protocol import CifarData

N_IMAGES = 1797  # the data set's size
N_CLASSES = 10
SIDE = 8  # images are SIDE x SIDE, one channel
MAX_PIXEL = 16  # pixel values are integers 0..16
INSTALL_HINT = "pip install -r requirements-digits.txt (scikit-learn)"


def stratified_split(y, n_train, rng):
    """Indices (train, test) with n_train training samples, each class in proportion to its size.

    y : (N,) labels;  rng : np.random.Generator. Class k gets floor(n_train * n_k / N) training
    samples, and the classes with the largest remainders one more, until n_train are chosen.
    """
    classes, counts = np.unique(y, return_counts=True)
    share = n_train * counts / len(y)
    take = np.floor(share).astype(int)
    order = np.argsort(-(share - take), kind="stable")  # largest remainders first
    take[order[: n_train - take.sum()]] += 1
    train = []
    for k, n_k in zip(classes, take, strict=True):
        members = np.flatnonzero(y == k)
        train.append(rng.permutation(members)[:n_k])
    train = np.sort(np.concatenate(train))
    test = np.setdiff1d(np.arange(len(y)), train)
    return train, test


def load_digits(n_train, seed=0):
    """The handwritten digits split into n_train training and 1797 - n_train test images.

    Returns protocol.CifarData with x_train (n_train, 8, 8, 1) uint8 in 0..16, y_train (n_train,)
    int64, x_test (1797 - n_train, 8, 8, 1), y_test, the label names "0".."9" and the source.
    Raises CifarError (one line) without scikit-learn or for an n_train that leaves a split
    without every class.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise CifarError(f"--data digits needs scikit-learn: {INSTALL_HINT}") from None
    if not N_CLASSES <= n_train <= N_IMAGES - N_CLASSES:
        raise CifarError(
            f"--digits-train {n_train}: between {N_CLASSES} and {N_IMAGES - N_CLASSES} "
            "images, so that both splits hold every class"
        )
    d = sklearn_digits()
    x = d.images.astype(np.uint8)[..., None]  # (N, 8, 8, 1), values 0..16
    y = d.target.astype(np.int64)  # (N,)
    train, test = stratified_split(y, n_train, np.random.default_rng(seed))
    return CifarData(
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        label_names=tuple(str(k) for k in range(N_CLASSES)),
        source=f"sklearn.datasets.load_digits, stratified split n_train={n_train} seed={seed}",
    )
