"""Results on disk: atomic writes, the identity of a folder's run, locks, versions.

Every result is written to a temporary file in its folder and renamed into place, so a killed
command never leaves a half-written file. A run or sweep records its settings ({"kind",
"settings"}) in its folder (config.json or sweep.json), and every stored result (a sweep's
unit, a run's npz, a checkpoint) the :func:`identity` of the settings that produced it, which
reading checks. A folder belongs to one run (:func:`check_claim`): another run's folder, or
one with files this tool did not write, needs --overwrite. Two processes coordinate through
``fcntl.flock`` on lock files in the folder: :func:`folder_lock` for the short moments that
must not interleave, :func:`command_lock` for a command's whole work.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import tempfile
import time

import numpy as np

from apparatus.cli import InputError, hold


def atomic_savez(path, **arrays):
    """np.savez to a temporary file in the same folder, then rename: never a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results are for everyone to read
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """Write JSON atomically (a temporary file in the same folder, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


LOCK_NAME = ".lock"  # a folder's lock file; ".lock-<key>" files lock one command's work
IDENTITY_FILES = ("sweep.json", "config.json")  # what names a folder's run (sweep.json first)
GROWABLE = ("seeds", "conditions")  # sweep settings that may grow without changing a unit
LOCK_WAIT = 600  # seconds a command waits for a folder's lock held by another one
LOCK_POLL = 0.05  # seconds between tries of a held lock


def identity(obj):
    """A short fingerprint of JSON-able settings: the first 16 hex digits of the SHA-256 of their
    canonical JSON (sorted keys, no spaces). Equal settings, equal identity."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def unit_identity(sweep_config, name):
    """The identity of unit ``name`` of a sweep: its settings without the lists that may grow
    (a unit's own seeds or condition are in its name), and the name."""
    core = {k: v for k, v in sweep_config.items() if k not in GROWABLE}
    return identity({"sweep": core, "unit": name})


def exact_name(value):
    """A number as it appears in a file name: its short form (%g) when that reads back as the
    same number, else its full repr, so that distinct values never share a name."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def read_json(path):
    """A JSON file's content, or InputError naming the file when it does not read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} does not read ({type(err).__name__})") from None


def folder_owner(out):
    """The run or sweep whose files an output folder holds: {"kind", "settings", "path"} from
    sweep.json (settings: the whole file) or a run's config.json (its "settings"), each checked
    against its declaration (apparatus/schemas.py: InputError naming the file and the field);
    None for a folder without such a file."""
    from apparatus import schemas

    for name in IDENTITY_FILES:
        path = os.path.join(out, name)
        if not os.path.lexists(path):
            continue
        stored = read_json(path)
        if name == "sweep.json":
            schemas.validate_sweep(stored, path)
            return {"kind": stored["kind"], "settings": stored, "path": path}
        schemas.validate_run(stored, path)
        return {"kind": stored["kind"], "settings": stored["settings"], "path": path}
    return None


LEFTOVERS = (LOCK_NAME, ".tmp-")  # what this tool leaves in a folder it was killed writing


def foreign_entries(out):
    """The entries of an existing folder that no run of this tool wrote (everything, when it
    holds no identity file), this tool's own leftovers (locks, temporary files) aside. Returns a
    sorted list of names."""
    if not os.path.isdir(out) or any(os.path.lexists(os.path.join(out, n)) for n in IDENTITY_FILES):
        return []
    return sorted(n for n in os.listdir(out) if not n.startswith(LEFTOVERS))


def leftovers_only(out):
    """Whether ``out`` holds nothing but this tool's leftovers (what a command killed during its
    very first write leaves): a folder that is taken over without --overwrite."""
    if not os.path.isdir(out) or any(os.path.lexists(os.path.join(out, n)) for n in IDENTITY_FILES):
        return False
    names = os.listdir(out)
    return bool(names) and all(n.startswith(LEFTOVERS) for n in names)


def check_claim(out, kind, settings, overwrite=False, grow=(), union=()):
    """Whether a run or sweep of ``kind`` with ``settings`` may write into ``out``; raise
    InputError when it may not. Creates nothing.

    A folder belongs to one run: it may be new or empty, or hold this very run (the same
    settings: resumed or redone), or, for a sweep, the same sweep with shorter ``grow`` lists
    (more seeds), or lists in ``union`` that add to the stored ones (the onset sweep's
    conditions). Anything else (another run, another kind, files this tool did not write, an
    identity file that does not validate) needs ``overwrite``; a folder of another kind is
    refused even then. Returns the stored settings (None for a new folder)."""
    if not os.path.isdir(out):
        return None
    try:
        owner = folder_owner(out)
    except InputError:
        if overwrite:
            return None
        raise
    if owner is None:
        foreign = foreign_entries(out)
        if foreign and not overwrite:
            raise InputError(
                f"{out} holds files this tool did not write (e.g. {foreign[0]}): use another "
                "--out, or --overwrite to write into it"
            )
        return None
    if owner["kind"] != kind:
        raise InputError(f"{out} holds a {owner['kind']} run, not a {kind} one: use another --out")
    old, new = owner["settings"], json.loads(json.dumps(settings))
    diff = differing(old, new)
    extends = all(
        isinstance(old.get(k), list)
        and (k in union or (k in grow and new[k][: len(old[k])] == old[k]))
        for k in diff
    )
    if diff and not extends and not overwrite:
        what = "a different sweep" if "kind" in old else f"another {kind} run"
        raise InputError(
            f"{out} holds {what} (differs in: {', '.join(diff)}): use another --out, or "
            "--overwrite to replace it"
        )
    return old


@contextlib.contextmanager
def folder_lock(out, wait=LOCK_WAIT):
    """Hold the lock of folder ``out`` (an existing folder) for the moments that must not
    interleave between processes: claiming it, checking and writing its settings, moving a
    finished unit into place, merging. Waits up to ``wait`` seconds for another holder."""
    fd = os.open(os.path.join(out, LOCK_NAME), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise InputError(
                        f"{out} stays locked by another process: wait for it, or use another --out"
                    ) from None
                time.sleep(LOCK_POLL)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def command_lock(out, key):
    """Lock the work of one command on ``out`` until the command ends (``key``: what makes two
    commands the same, e.g. the sweep's identity and the shard): a second process with the same
    key is refused in one line instead of doing the same work beside it."""
    path = os.path.join(out, f"{LOCK_NAME}-{identity(key)}")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(
            f"another process is running this same command on {out}: wait for it to finish "
            "(then rerun to merge), or use another --out"
        ) from None
    hold(fd)


_UNIT_LOCKS = {}  # folder -> the descriptor of its units' lock file, open for this process


def try_unit_lock(out, index):
    """Lock unit ``index`` of the sweep in ``out`` for this process (a POSIX record lock on one
    byte of OUT/.lock-units): False when another process holds it (it is training that unit)."""
    if out not in _UNIT_LOCKS:
        _UNIT_LOCKS[out] = os.open(os.path.join(out, f"{LOCK_NAME}-units"), os.O_CREAT | os.O_RDWR)
    try:
        fcntl.lockf(_UNIT_LOCKS[out], fcntl.LOCK_EX | fcntl.LOCK_NB, 1, index)
    except OSError:  # EAGAIN or EACCES: held elsewhere
        return False
    return True


def unit_unlock(out, index):
    """Release :func:`try_unit_lock`'s lock of unit ``index``."""
    fcntl.lockf(_UNIT_LOCKS[out], fcntl.LOCK_UN, 1, index)


def begin_run(out, kind, settings, record, overwrite=False, outputs=()):
    """Claim ``out`` for a run (train, density): create it, and under its lock check the claim
    again (another process may have claimed it meanwhile), remove the previous run's
    ``outputs`` when ``overwrite``, and write ``record`` (the config.json, with "kind" and
    "settings") first, so that the folder names this run even if it is killed."""
    check_claim(out, kind, settings, overwrite)
    os.makedirs(out, exist_ok=True)
    command_lock(out, {"kind": kind, "settings": settings})
    with folder_lock(out):
        check_claim(out, kind, settings, overwrite)
        if overwrite:
            for name in outputs:
                if os.path.lexists(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
        write_json(os.path.join(out, "config.json"), record)


def differing(old, new):
    """The keys whose values differ between two settings dicts (after a JSON round trip)."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def versions():
    """Versions of Python and the packages a result depends on."""
    import matplotlib
    import scipy

    v = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "matplotlib": matplotlib.__version__,
        "platform": platform.platform(),
    }
    try:
        import cupy

        v["cupy"] = cupy.__version__
    except ImportError:
        pass
    return v
