"""Results on disk: atomic writes, the identity of a folder's run, versions.

Every result is written to a temporary file in its folder and renamed into place, so a killed
command never leaves a half-written file. A run or sweep records its identity ({"kind",
"settings"}) in its folder (config.json or sweep.json); :func:`claim_folder` refuses a folder
that holds another run.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile

import numpy as np

from apparatus.cli import InputError


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


def folder_owner(out):
    """What an output folder holds: the identity {"kind", "settings"} of the run or sweep whose
    files are in it (sweep.json first, then a run's config.json), None for a folder without
    such files. A file that does not read is reported as {"kind": "unreadable", "path": ...}."""
    for name in ("sweep.json", "config.json"):
        path = os.path.join(out, name)
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                stored = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {"kind": "unreadable", "path": path}
        if not isinstance(stored, dict):
            return {"kind": "unreadable", "path": path}
        if name == "sweep.json":
            return {"kind": stored.get("kind", "sweep"), "settings": stored}
        return {"kind": stored.get("kind", "run"), "settings": stored.get("settings")}
    return None


def claim_folder(out, kind, settings, overwrite=False):
    """Refuse (InputError) an output folder that holds another run or sweep: of another kind, or
    with other settings; the same run may be redone (or resumed). ``overwrite`` lets the user
    replace another run of this kind explicitly."""
    owner = folder_owner(out)
    if owner is None:
        return
    if owner["kind"] == "unreadable":
        if overwrite:
            return
        raise InputError(f"{owner['path']} does not read: use another --out, or --overwrite")
    same = owner["kind"] == kind and owner["settings"] == json.loads(json.dumps(settings))
    if same or (overwrite and owner["kind"] == kind):
        return
    if owner["kind"] != kind:
        raise InputError(f"{out} holds a {owner['kind']} run, not a {kind} one: use another --out")
    diff = differing(owner["settings"] or {}, settings)
    raise InputError(
        f"{out} holds another {kind} run (differs in: {', '.join(diff)}): use another --out, "
        "or --overwrite to replace it"
    )


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
