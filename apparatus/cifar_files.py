"""The CIFAR-10 (python version) loader, its checks and its safe unpickler (the Fig. 1 data; the
per-channel normalisation of the protocol is protocol.normalize).

Symbols: N samples, Hx/Wx image height/width (32 for CIFAR-10; as in models.py), C channels
(3: red, green, blue), K classes (10).

Images are returned in NHWC layout, ``x[n, row, col, channel]`` with shape (N, Hx, Wx, C), because
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

A synthetic stand-in in exactly this format (for tests and CPU demos) is apparatus/synthetic.py.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from protocol import CifarData

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

_MD5_CHUNK = 1 << 20

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
    bad = _fail(f"{where}: b'data' is not a uint8 (N, 3*Hx*Wx) array of an official batch")
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
    """Check one batch dict and turn it into (N, Hx, Wx, C) uint8 images and (N,) int64 labels."""
    if b"data" not in batch or b"labels" not in batch:
        raise _fail(f"{where} lacks b'data' or b'labels'")
    rows = _uint8_rows(batch[b"data"], where)
    n, row_length = rows.shape
    side = math.isqrt(row_length // N_CHANNELS)
    if row_length == 0 or N_CHANNELS * side * side != row_length:
        raise _fail(f"{where}: b'data' rows have length {row_length}, not 3*Hx*Wx (3072 for 32x32)")
    labels = batch[b"labels"]
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise _fail(f"{where}: b'labels' is not a list of ints")
    if len(labels) != n:
        raise _fail(f"{where}: {len(labels)} labels for {n} images")
    if labels and not all(0 <= v < n_labels for v in labels):
        raise _fail(f"{where}: labels outside 0..{n_labels - 1}")
    images = rows.reshape(n, N_CHANNELS, side, side).transpose(0, 2, 3, 1)  # (N, Hx, Wx, C)
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
        x_train=np.concatenate([x for x, _ in train]),  # (N_train, Hx, Wx, C)
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
        CifarData with x_train (N_train, Hx, Wx, C) uint8, y_train (N_train,) int64, x_test
        (N_test, Hx, Wx, C) uint8, y_test (N_test,) int64 -- for the official data N_train = 50000,
        N_test = 10000, Hx = Wx = 32, C = 3 -- and the K = 10 label names.

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
