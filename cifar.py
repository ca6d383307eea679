"""CIFAR-10 (python version) loader, per-channel normalisation and a synthetic stand-in.

Symbols: N samples, H/W image height/width (32 for CIFAR-10), C channels (3: red, green, blue),
K classes (10).

Images are returned in NHWC layout, ``x[n, row, col, channel]`` with shape (N, H, W, C), because
the Myrtle5 network in ``models.py`` takes NHWC input. Labels are int64 of shape (N,). There is no
augmentation (the Fig. 1 protocol).

Where the data comes from
-------------------------
``load_cifar10(path)`` reads the official "CIFAR-10 python version" from any of

- the archive ``cifar-10-python.tar.gz`` (its md5 is checked, members are read straight from the
  archive, nothing is extracted to disk),
- the extracted folder ``cifar-10-batches-py/``,
- a parent folder holding either of them (the extracted folder wins: it needs no md5 pass),

and falls back to the environment variable ``CIFAR10_PATH`` when ``path`` is None. Every failure
(missing path or member, md5 mismatch, corrupt archive or pickle, wrong shapes) raises
``CifarError`` with one line saying what is wrong and where to put the archive.

The batches are pickles. Unpickling can run arbitrary code, so they are read with an unpickler
that only resolves the few globals an official batch uses (NumPy's array reconstruction and
``_codecs.encode``) and refuses anything else.

Format (the official CIFAR-10 python version): ``data_batch_1`` .. ``data_batch_5``,
``test_batch``: a dict with ``b'data'`` uint8 (10000, 3072) -- each row 1024 red, then 1024
green, then 1024 blue values, each plane 32x32 row-major, i.e. a row is one image in CHW order --
and ``b'labels'``: a list of ints in 0..9. ``batches.meta`` has ``b'label_names'``.

Synthetic data
--------------
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

import dataclasses
import gzip
import hashlib
import io
import math
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

OFFICIAL_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
FOLDER_NAME = "cifar-10-batches-py"
ENV_VAR = "CIFAR10_PATH"
DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
HINT = (
    f"download {ARCHIVE_NAME} from {DOWNLOAD_URL} and pass --data PATH or set {ENV_VAR} "
    f"(to the archive, to the extracted {FOLDER_NAME}/ folder, or to a folder holding either)"
)
TRAIN_MEMBERS = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_MEMBER = "test_batch"
META_MEMBER = "batches.meta"
LABEL_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
N_CHANNELS = 3
PICKLE_PROTOCOL = 2  # the official batches were written by Python 2's cPickle, protocol 2

# Synthetic class signal, in pixel units (0..255); see the module docstring.
GREY = 128.0
COLOUR_AMPLITUDE = 40.0
STRIPE_AMPLITUDE = 24.0
STRIPES_PER_IMAGE = 4
COLOUR_JITTER_STD = 15.0
BRIGHTNESS_STD = 16.0
NOISE_STD = 48.0

_MD5_CHUNK = 1 << 20
_NORMALIZE_CHUNK = 2048  # images per step, bounds the float64 scratch memory

MAX_MEMBER_BYTES = 1 << 28  # a member larger than this is refused (an official batch: ~31 MB)
MAX_PIXELS = 1 << 31  # a batch of more bytes than this is refused before any allocation
DTYPE_UINT8 = ("u1", (0, False), (1, True))  # numpy.dtype's arguments in an official pickle
DTYPE_UINT8_STATE = (3, "|", None, None, None, -1, -1, 0)  # and its state, the only one allowed
RECONSTRUCT_ARGS = ((0,), b"b")  # _reconstruct(ndarray, (0,), b"b"): an empty array to fill


class _Record:
    """An inert record of a call the pickle asks for (and of the state it then sets): the
    unpickler builds no NumPy object at all; :func:`_uint8_rows` checks a record against the
    exact form of an official batch's uint8 array and only then builds the array itself."""

    def __init__(self, what, args):
        self.what, self.args, self.state = what, args, None

    def __setstate__(self, state):
        self.state = state


_NDARRAY = _Record("ndarray", ())  # the class argument of _reconstruct


def _latin1(text, encoding="latin1"):
    """_codecs.encode as a pickle uses it: a str in latin-1 to bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing _codecs.encode of anything but latin-1 text")
    return text.encode("latin-1")


# The only globals an official batch refers to (NumPy 1 names numpy.core, NumPy 2 numpy._core)
_SAFE_GLOBALS = {
    ("_codecs", "encode"): _latin1,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): lambda *args: _Record("dtype", args),
    ("numpy.core.multiarray", "_reconstruct"): lambda *args: _Record("array", args),
    ("numpy._core.multiarray", "_reconstruct"): lambda *args: _Record("array", args),
}


class CifarError(Exception):
    """CIFAR-10 data missing or unreadable; the message is one line and says how to fix it."""


@dataclasses.dataclass(frozen=True)
class CifarData:
    """A CIFAR-10-format data set.

    Attributes:
        x_train: (N_train, H, W, C) images, uint8 0..255 as loaded, float after ``normalize``.
        y_train: (N_train,) int64 labels in 0..K-1.
        x_test: (N_test, H, W, C) images, same dtype as ``x_train``.
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


def _fail(what: str) -> CifarError:
    """A CifarError whose message is one line: what is wrong, then the download hint."""
    return CifarError(f"{' '.join(what.split())}; {HINT}")


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}") from None


def _unpickle(blob: bytes, where: str) -> dict:
    """Decode one batch pickle (protocol 2, bytes keys) with the restricted unpickler."""
    try:
        obj = _SafeUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as err:  # any decoding failure of untrusted bytes is a corrupt file
        raise _fail(f"corrupt pickle {where} ({type(err).__name__}: {err})") from err
    if not isinstance(obj, dict):
        raise _fail(f"{where} holds a {type(obj).__name__}, expected a dict")
    return obj


def file_md5(path: str | os.PathLike) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_MD5_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve(path: str | os.PathLike | None) -> tuple[str, Path]:
    """Map the user's path to ("archive", file) or ("folder", cifar-10-batches-py folder)."""
    if path is None or str(path) == "":
        env = os.environ.get(ENV_VAR, "")
        if not env:
            raise _fail(f"no CIFAR-10 path given and {ENV_VAR} is not set")
        path = env
    path = Path(path).expanduser()
    if path.is_file():
        return "archive", path
    if not path.is_dir():
        raise _fail(f"CIFAR-10 path {path} does not exist")
    if (path / TRAIN_MEMBERS[0]).is_file() or path.name == FOLDER_NAME:
        return "folder", path
    if (path / FOLDER_NAME).is_dir():
        return "folder", path / FOLDER_NAME
    if (path / ARCHIVE_NAME).is_file():
        return "archive", path / ARCHIVE_NAME
    raise _fail(f"neither {ARCHIVE_NAME} nor {FOLDER_NAME}/ found in {path}")


def _read_folder(folder: Path) -> dict[str, bytes]:
    """Raw bytes of each needed member of an extracted cifar-10-batches-py folder."""
    blobs = {}
    for member in (*TRAIN_MEMBERS, TEST_MEMBER, META_MEMBER):
        member_path = folder / member
        if not member_path.is_file():
            raise _fail(f"missing member {member} in {folder}")
        if member_path.stat().st_size > MAX_MEMBER_BYTES:
            raise _fail(f"member {member} in {folder} is larger than {MAX_MEMBER_BYTES} bytes")
        blobs[member] = member_path.read_bytes()
    return blobs


def _read_archive(archive: Path, expected_md5: str | None) -> dict[str, bytes]:
    """Raw bytes of each needed member, read from the .tar.gz in one pass (md5 checked first)."""
    if expected_md5 is not None:
        actual = file_md5(archive)
        if actual != expected_md5.lower():
            raise _fail(
                f"md5 mismatch for {archive}: got {actual}, expected {expected_md5} "
                "(incomplete or wrong download?)"
            )
    wanted = {f"{FOLDER_NAME}/{m}": m for m in (*TRAIN_MEMBERS, TEST_MEMBER, META_MEMBER)}
    blobs = {}
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for info in tar:
                member = wanted.get(info.name.removeprefix("./"))
                if member is not None and info.isfile():
                    if info.size > MAX_MEMBER_BYTES:
                        raise _fail(f"member {info.name} of {archive} is larger than "
                                    f"{MAX_MEMBER_BYTES} bytes")  # fmt: skip
                    blobs[member] = tar.extractfile(info).read(MAX_MEMBER_BYTES + 1)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise _fail(f"corrupt archive {archive} ({type(err).__name__})") from err
    for name, member in wanted.items():
        if member not in blobs:
            raise _fail(f"missing member {name} in archive {archive}")
    return blobs


def _uint8_rows(record, where):
    """The (N, L) uint8 array an official batch's b'data' record describes, or CifarError.

    The record must be _reconstruct(ndarray, (0,), b"b") with the state (1, (N, L), dtype, False,
    raw bytes), the dtype numpy.dtype("u1", False, True) with DTYPE_UINT8_STATE, and len(raw) ==
    N L: everything is checked on plain Python values before NumPy sees any of it."""
    bad = _fail(f"{where}: b'data' is not a uint8 (N, 3*H*W) array of an official batch")
    if not (isinstance(record, _Record) and record.what == "array") or record.args[:1] != (
        _NDARRAY,
    ):
        raise bad
    if record.args[1:] != RECONSTRUCT_ARGS:
        raise bad
    state = record.state
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        raise bad
    _, shape, dtype, fortran, raw = state
    ok_shape = isinstance(shape, tuple) and len(shape) == 2
    ok_shape = ok_shape and all(type(v) is int and v >= 0 for v in shape)
    if not ok_shape or fortran not in (0, False) or not isinstance(raw, bytes):
        raise bad
    if (
        not (isinstance(dtype, _Record) and dtype.what == "dtype")
        or dtype.state != DTYPE_UINT8_STATE
    ):
        raise bad
    name, align, copy = dtype.args if len(dtype.args) == 3 else (None, None, None)
    if name != DTYPE_UINT8[0] or align not in DTYPE_UINT8[1] or copy not in DTYPE_UINT8[2]:
        raise bad
    if shape[0] * shape[1] > MAX_PIXELS or len(raw) != shape[0] * shape[1]:
        raise bad
    return np.frombuffer(raw, dtype=np.uint8).reshape(shape)


def _batch_arrays(batch: dict, where: str, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Check one batch dict and turn it into (N, H, W, C) uint8 images and (N,) int64 labels."""
    if b"data" not in batch or b"labels" not in batch:
        raise _fail(f"{where} lacks b'data' or b'labels'")
    rows = _uint8_rows(batch[b"data"], where)
    n, row_length = rows.shape
    side = math.isqrt(row_length // N_CHANNELS)
    if row_length == 0 or N_CHANNELS * side * side != row_length:
        raise _fail(f"{where}: b'data' rows have length {row_length}, not 3*H*H (3072 for 32x32)")
    labels = batch[b"labels"]
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise _fail(f"{where}: b'labels' is not a list of ints")
    if len(labels) != n:
        raise _fail(f"{where}: {len(labels)} labels for {n} images")
    if labels and not all(0 <= v < n_labels for v in labels):
        raise _fail(f"{where}: labels outside 0..{n_labels - 1}")
    images = rows.reshape(n, N_CHANNELS, side, side).transpose(0, 2, 3, 1)  # (N, H, W, C)
    return np.ascontiguousarray(images), np.array(labels, dtype=np.int64)


def _assemble(blobs: dict[str, bytes], where: str) -> CifarData:
    """Decode and check all members; concatenate the 5 training batches."""
    meta = _unpickle(blobs[META_MEMBER], f"{META_MEMBER} in {where}")
    names = meta.get(b"label_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, bytes) for n in names):
        raise _fail(f"{META_MEMBER} in {where} lacks a b'label_names' list of byte strings")
    try:
        label_names = tuple(n.decode("utf-8") for n in names)
    except UnicodeDecodeError:
        raise _fail(f"{META_MEMBER} in {where}: a label name is not UTF-8 text") from None

    def load(member):
        batch = _unpickle(blobs[member], f"{member} in {where}")
        return _batch_arrays(batch, f"{member} in {where}", len(label_names))

    train = [load(member) for member in TRAIN_MEMBERS]
    x_test, y_test = load(TEST_MEMBER)
    shapes = {x.shape[1:] for x, _ in train} | {x_test.shape[1:]}
    if len(shapes) != 1:
        raise _fail(f"batches in {where} have different image shapes {sorted(shapes)}")
    return CifarData(
        x_train=np.concatenate([x for x, _ in train]),  # (N_train, H, W, C)
        y_train=np.concatenate([y for _, y in train]),  # (N_train,)
        x_test=x_test,
        y_test=y_test,
        label_names=label_names,
        source=where,
    )


def load_cifar10(
    path: str | os.PathLike | None = None, *, expected_md5: str | None = OFFICIAL_MD5
) -> CifarData:
    """Load CIFAR-10 (python version) as uint8 NHWC images and int64 labels.

    Args:
        path: ``cifar-10-python.tar.gz``, the extracted ``cifar-10-batches-py/`` folder, or a
            folder holding either; None reads the environment variable ``CIFAR10_PATH``.
        expected_md5: md5 the archive must have (the official one by default; tests pass the md5
            of a generated archive). None skips the check. Not used for an extracted folder.

    Returns:
        CifarData with x_train (N_train, H, W, C) uint8, y_train (N_train,) int64, x_test
        (N_test, H, W, C) uint8, y_test (N_test,) int64 -- for the official data N_train = 50000,
        N_test = 10000, H = W = 32, C = 3 -- and the K = 10 label names.

    Raises:
        CifarError: one line saying what is wrong and where to put the archive.
    """
    kind, resolved = _resolve(path)
    if kind == "folder":
        return _assemble(_read_folder(resolved), f"folder {resolved}")
    return _assemble(_read_archive(resolved, expected_md5), f"archive {resolved}")


def fingerprint(data: CifarData) -> str:
    """A short hash (16 hex digits of SHA-256) of the decoded images and labels: which data a
    run used, whatever file they came from (recorded with a run's settings, so that resuming or
    sharding on other data is refused)."""
    digest = hashlib.sha256()
    for a in (data.x_train, data.y_train, data.x_test, data.y_test):
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.data)
    return digest.hexdigest()[:16]


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std of images, in units of pixel / 255.

    Args:
        x: (N, H, W, C) images with values 0..255 (uint8 for CIFAR-10).

    Returns:
        mean (C,) float64 and std (C,) float64; for the CIFAR-10 training set about
        (0.4914, 0.4822, 0.4465) and (0.2470, 0.2435, 0.2616).
    """
    total = np.zeros(x.shape[-1])
    total_sq = np.zeros(x.shape[-1])
    for start in range(0, x.shape[0], _NORMALIZE_CHUNK):
        chunk = x[start : start + _NORMALIZE_CHUNK].astype(np.float64)  # (n, H, W, C)
        total += chunk.sum(axis=(0, 1, 2))  # (C,); exact: integer sums stay below 2**53
        total_sq += np.square(chunk).sum(axis=(0, 1, 2))  # (C,)
    count = x.size // x.shape[-1]
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    return mean / 255.0, np.sqrt(var) / 255.0


def normalize_images(
    x: np.ndarray, mean: np.ndarray, std: np.ndarray, dtype=np.float32
) -> np.ndarray:
    """(x / 255 - mean) / std per channel, computed in float64 chunks and stored as ``dtype``.

    Args:
        x: (N, H, W, C) images with values 0..255.
        mean, std: (C,) statistics in units of pixel / 255, from ``channel_stats`` of the
            TRAINING images (also when normalising the test images).
        dtype: np.float32 or np.float64.

    Returns:
        (N, H, W, C) array of ``dtype``.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    out = np.empty(x.shape, dtype=dtype)  # (N, H, W, C)
    for start in range(0, x.shape[0], _NORMALIZE_CHUNK):
        chunk = x[start : start + _NORMALIZE_CHUNK].astype(np.float64) / 255.0
        out[start : start + _NORMALIZE_CHUNK] = (chunk - mean) / std
    return out


def normalize(data: CifarData, dtype=np.float32) -> CifarData:
    """Normalise train and test images per channel with the TRAINING-set mean and std.

    Args:
        data: CifarData with x_train (N_train, H, W, C) and x_test (N_test, H, W, C) in 0..255.
        dtype: np.float32 or np.float64 for the returned images.

    Returns:
        CifarData with float x_train (N_train, H, W, C) and x_test (N_test, H, W, C); labels,
        names unchanged, and the statistics recorded in ``source``.
    """
    mean, std = channel_stats(data.x_train)  # (C,), (C,)
    stats = ", ".join(f"{m:.4f}/{s:.4f}" for m, s in zip(mean, std, strict=True))
    return dataclasses.replace(
        data,
        x_train=normalize_images(data.x_train, mean, std, dtype),
        x_test=normalize_images(data.x_test, mean, std, dtype),
        source=f"{data.source}, normalised with train mean/std {stats}",
    )


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

    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename=ARCHIVE_NAME[:-3], mode="wb", fileobj=raw, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar,
    ):
        directory = tarfile.TarInfo(FOLDER_NAME)
        directory.type, directory.mode, directory.mtime = tarfile.DIRTYPE, 0o755, 0
        tar.addfile(directory)
        for member, blob in members.items():
            _tar_add(tar, f"{FOLDER_NAME}/{member}", blob)
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
