"""Synthetic CIFAR-like data in the official CIFAR-10 format: a stand-in for tests and CPU demos.

``write_synthetic_archive`` writes a small archive in exactly that format (for tests, and to try
the pipeline without the 170 MB download); ``load_synthetic`` builds the same data in memory (for
``--data synthetic`` demos). With ``learnable=True`` the class signal of an image of class k is

- a mean colour: an offset of amplitude ``COLOUR_AMPLITUDE`` along hue angle 2 pi k / K in the
  plane orthogonal to grey (the offsets of the three channels sum to 0), blurred by a per-image
  colour jitter in that plane (std ``COLOUR_JITTER_STD`` per direction), so that neighbouring
  hues overlap and the mean colour alone classifies about 70% of the images, and
- a stripe grating of amplitude ``STRIPE_AMPLITUDE`` and period H / 4 pixels, oriented at
  angle pi k / K, with a random phase per image,

on top of grey 128, a per-image brightness jitter (same in all channels, std
``BRIGHTNESS_STD``) and independent pixel noise (std ``NOISE_STD``); the result is rounded and
clipped to 0..255. The class is invisible in any single pixel but easy to read from averages over
the image: a nearest-mean classifier on the mean colour gets about 70% (chance 10%), and a
matched filter for the stripe orientation gets about 100%, so a small convnet can go well above
chance, up to near 100% once its filters pick up the stripes. With ``learnable=False`` the
pixels are uniform on 0..255 and carry no signal.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile

import numpy as np

from apparatus.cifar_files import (
    ARCHIVE_NAME,
    FOLDER_NAME,
    LABEL_NAMES,
    META_MEMBER,
    N_CHANNELS,
    PICKLE_PROTOCOL,
    TEST_MEMBER,
    TRAIN_MEMBERS,
    file_md5,
)
from protocol import CifarData

# Synthetic class signal, in pixel units (0..255); see the module docstring.
GREY = 128.0
COLOUR_AMPLITUDE = 40.0
STRIPE_AMPLITUDE = 24.0
STRIPES_PER_IMAGE = 4
COLOUR_JITTER_STD = 15.0
BRIGHTNESS_STD = 16.0
NOISE_STD = 48.0


def images_to_rows(x: np.ndarray) -> np.ndarray:
    """Official row layout: (N, H, W, C) images -> (N, C*H*W) rows (all red, green, blue)."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(x.shape[0], -1)


def synthetic_images(
    n: int, rng: np.random.Generator, image_size: int = 32, learnable: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Draw synthetic CIFAR-like images; the class signal is described in the module docstring.

    Args:
        n: number of images N; labels are balanced over the K = 10 classes, in random order.
        rng: the random generator.
        image_size: H = W.
        learnable: True for the class signal, False for uniform noise pixels.

    Returns:
        x (N, H, W, C) uint8 and y (N,) int64.
    """
    n_classes = len(LABEL_NAMES)
    y = rng.permutation(np.arange(n) % n_classes).astype(np.int64)  # (N,)
    shape = (n, image_size, image_size, N_CHANNELS)
    if not learnable:
        return rng.integers(0, 256, size=shape, dtype=np.uint8), y
    hue = 2 * np.pi * y / n_classes  # (N,)
    channel_angle = 2 * np.pi * np.arange(N_CHANNELS) / N_CHANNELS  # (C,)
    colour = COLOUR_AMPLITUDE * np.cos(hue[:, None] - channel_angle)  # (N, C), sums to 0
    jitter = COLOUR_JITTER_STD * rng.standard_normal((n, N_CHANNELS))  # (N, C)
    colour += jitter - jitter.mean(axis=1, keepdims=True)  # keep the offsets off the grey axis
    orientation = np.pi * y / n_classes  # (N,)
    grid = np.arange(image_size)
    along = (
        grid[None, :, None] * np.cos(orientation)[:, None, None]
        + grid[None, None, :] * np.sin(orientation)[:, None, None]
    )  # (N, H, W): distance along the stripes' normal
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    stripes = np.cos(2 * np.pi * STRIPES_PER_IMAGE * along / image_size + phase)  # (N, H, W)
    brightness = BRIGHTNESS_STD * rng.standard_normal((n, 1, 1, 1))
    noise = NOISE_STD * rng.standard_normal(shape, dtype=np.float32)  # (N, H, W, C)
    x = (
        GREY + brightness + colour[:, None, None, :] + STRIPE_AMPLITUDE * stripes[..., None] + noise
    )  # (N, H, W, C)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), y


def _tar_add(tar: tarfile.TarFile, name: str, blob: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    info.mode = 0o644
    info.mtime = 0  # fixed, so that the same data give the same md5
    tar.addfile(info, io.BytesIO(blob))


def write_archive(
    path: str | os.PathLike,
    train_rows: np.ndarray,
    train_labels: np.ndarray,
    test_rows: np.ndarray,
    test_labels: np.ndarray,
    label_names: tuple[str, ...] = LABEL_NAMES,
) -> str:
    """Write a .tar.gz in the official CIFAR-10 python format from rows in the official layout.

    The archive holds ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5`` (the
    training rows split into 5 equal consecutive batches), ``test_batch``, ``batches.meta`` and a
    ``readme.html``; each batch a protocol-2 pickle of a dict with bytes keys b'batch_label',
    b'labels' (list of int), b'data' (uint8 rows), b'filenames'. Gzip and tar times are fixed,
    so equal inputs give equal md5s.

    Args:
        path: the archive file to write.
        train_rows: (N_train, C*H*W) uint8, each row red plane, green plane, blue plane, each
            plane H x W row-major; N_train divisible by 5.
        train_labels: (N_train,) ints in 0..K-1.
        test_rows: (N_test, C*H*W) uint8, same layout.
        test_labels: (N_test,) ints in 0..K-1.
        label_names: K class names.

    Returns:
        The archive's hex md5 (pass it as ``expected_md5`` to ``load_cifar10``).
    """
    n_batches = len(TRAIN_MEMBERS)
    if train_rows.shape[0] % n_batches:
        raise ValueError(f"N_train = {train_rows.shape[0]} is not divisible by {n_batches}")
    per_batch = train_rows.shape[0] // n_batches

    def batch_pickle(label, rows, labels):
        batch = {
            b"batch_label": label.encode(),
            b"labels": [int(v) for v in labels],
            b"data": np.ascontiguousarray(rows, dtype=np.uint8),
            b"filenames": [f"synthetic_{i:05d}.png".encode() for i in range(len(labels))],
        }
        return pickle.dumps(batch, protocol=PICKLE_PROTOCOL)

    members = {}
    for i, member in enumerate(TRAIN_MEMBERS):
        part = slice(i * per_batch, (i + 1) * per_batch)
        label = f"training batch {i + 1} of {n_batches}"
        members[member] = batch_pickle(label, train_rows[part], train_labels[part])
    members[TEST_MEMBER] = batch_pickle("testing batch 1 of 1", test_rows, test_labels)
    meta = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [name.encode() for name in label_names],
        b"num_vis": train_rows.shape[1],
    }
    members[META_MEMBER] = pickle.dumps(meta, protocol=PICKLE_PROTOCOL)
    members["readme.html"] = b"<html><body>Synthetic CIFAR-10-format data.</body></html>\n"

    tmp = f"{path}.tmp-{os.getpid()}"  # written whole, then renamed into place
    try:
        with (
            open(tmp, "wb") as raw,
            gzip.GzipFile(filename=ARCHIVE_NAME[:-3], mode="wb", fileobj=raw, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar,
        ):
            directory = tarfile.TarInfo(FOLDER_NAME)
            directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(directory)
            for member, blob in members.items():
                _tar_add(tar, f"{FOLDER_NAME}/{member}", blob)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return file_md5(path)


def write_synthetic_archive(
    path: str | os.PathLike,
    n_train_per_batch: int,
    n_test: int,
    rng: np.random.Generator,
    image_size: int = 32,
    learnable: bool = True,
) -> str:
    """Write a small synthetic archive in exactly the official CIFAR-10 python format.

    Draws 5 * n_train_per_batch training images, then n_test test images, with
    ``synthetic_images`` (same draws as ``load_synthetic`` with the same generator state).

    Args:
        path: the .tar.gz file to write (name it cifar-10-python.tar.gz to be found in a folder).
        n_train_per_batch: images per data batch; N_train = 5 * n_train_per_batch.
        n_test: N_test.
        rng: the random generator.
        image_size: H = W (32 for CIFAR-10's shape).
        learnable: True for the class signal of the module docstring, False for pure noise.

    Returns:
        The archive's hex md5.
    """
    n_train = len(TRAIN_MEMBERS) * n_train_per_batch
    x_train, y_train = synthetic_images(n_train, rng, image_size, learnable)
    x_test, y_test = synthetic_images(n_test, rng, image_size, learnable)
    return write_archive(path, images_to_rows(x_train), y_train, images_to_rows(x_test), y_test)


def load_synthetic(
    seed: int = 0,
    n_train_per_batch: int = 1000,
    n_test: int = 1000,
    image_size: int = 32,
    learnable: bool = True,
) -> CifarData:
    """Synthetic CIFAR-like data in memory, deterministic for a seed (for ``--data synthetic``).

    Equal to ``load_cifar10`` of ``write_synthetic_archive(..., np.random.default_rng(seed))``
    with the same sizes.

    Returns:
        CifarData with x_train (5 * n_train_per_batch, H, W, C) uint8, y_train (N_train,) int64,
        x_test (n_test, H, W, C) uint8, y_test (n_test,) int64, H = W = image_size, C = 3.
    """
    rng = np.random.default_rng(seed)
    n_train = len(TRAIN_MEMBERS) * n_train_per_batch
    x_train, y_train = synthetic_images(n_train, rng, image_size, learnable)
    x_test, y_test = synthetic_images(n_test, rng, image_size, learnable)
    return CifarData(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        label_names=LABEL_NAMES,
        source=(
            f"synthetic(seed={seed}, n_train={n_train}, n_test={n_test}, "
            f"image_size={image_size}, learnable={learnable})"
        ),
    )
