"""Sweeps that survive: grids, shards, atomic per-unit results, resume and merge.

Shared by the spiral phase diagrams (``run_spiral.py phase``, Fig. 3) and the CIFAR-10 ones
(``run_cifar.py phase``, Fig. 1). A sweep is a deterministic list of *units* (for example one
(T, A) cell and a block of seeds). Each finished unit is written atomically to
``OUT/units/<name>.npz`` (a temporary file, then a rename), so

* rerunning the same command skips every unit already on disk: a killed sweep loses at most the
  units in flight;
* ``--shard i/n`` runs units i, i+n, i+2n, ... only, so n machines (a SLURM job array) share one
  sweep, each writing into the same output folder;
* ``merge`` assembles the units into one array file once all of them exist.

The sweep's configuration is stored in ``OUT/sweep.json``; a rerun or a shard with a different
configuration in the same folder is refused, so results of different sweeps never mix.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import warnings

import numpy as np

from cli import InputError

PHASE_FIELDS = ("train_acc", "val_acc", "train_loss", "val_loss")  # per run of a phase diagram


def parse_shard(text):
    """'i/n' with 0 <= i < n -> (i, n); refuses anything else."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise InputError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {text}: need 0 <= i < n and n >= 1")
    return i, n


def shard(units, i, n):
    """The deterministic slice of the work for shard i of n: units i, i+n, i+2n, ..."""
    return units[i::n]


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
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def prepare(out, config):
    """Create OUT/units and OUT/sweep.json; refuse a folder that holds a different sweep.

    ``config`` holds only what defines the results (grid, seeds, steps, ...), never how the
    work is split (shard, device, batch size), so every shard writes the same sweep.json.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out!r} is a file, not a folder")
    path = os.path.join(out, "sweep.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(config)):
            diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            raise InputError(
                f"{out} holds a different sweep (differs in: {', '.join(diff)}); use another --out"
            )
    os.makedirs(os.path.join(out, "units"), exist_ok=True)
    write_json(path, config)


def load_config(out):
    """The sweep.json of a sweep folder."""
    path = os.path.join(out, "sweep.json")
    if not os.path.exists(path):
        raise InputError(f"{out} is not a sweep folder (no sweep.json)")
    with open(path) as f:
        return json.load(f)


def unit_path(out, name):
    """Where unit ``name`` is stored."""
    return os.path.join(out, "units", f"{name}.npz")


def pending(out, names):
    """The names among ``names`` whose results are not on disk yet, in order."""
    return [n for n in names if not os.path.exists(unit_path(out, n))]


def save_unit(out, name, arrays):
    """Store one finished unit atomically."""
    atomic_savez(unit_path(out, name), **arrays)


def load_units(out, names):
    """Load every unit; refuse with the count (and a few names) of those still missing."""
    missing = pending(out, names)
    if missing:
        raise InputError(
            f"{len(missing)} of {len(names)} units are not done yet in {out} "
            f"(e.g. {', '.join(missing[:3])}): run the remaining shards first"
        )
    result = {}
    for n in names:
        with np.load(unit_path(out, n)) as z:
            result[n] = {k: z[k] for k in z.files}
    return result


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


# ---------------------------------------------------------------------------------------------
# Phase diagrams: assembling the units, the summary and the table (Figs. 1 and 3)
# ---------------------------------------------------------------------------------------------


def assemble(done, placements, n_T, n_A, n_seeds):
    """Place every unit's results into (T, A, seed, ...) arrays.

    done : {name: {field: array (n, ...)}}, each unit's values with a leading axis of its n seeds
    placements : [(name, T index, A index, index of the unit's first seed)]
    Returns {field: (n_T, n_A, n_seeds, ...)}; integer fields are filled with -1, others NaN.
    """
    arrays = {}
    for name, ti, ai, s0 in placements:
        for f, v in done[name].items():
            v = np.asarray(v)
            if f not in arrays:
                integer = v.dtype.kind in "iu"
                arrays[f] = np.full(
                    (n_T, n_A, n_seeds, *v.shape[1:]),
                    -1 if integer else np.nan,
                    dtype=np.int64 if integer else np.float64,
                )
            arrays[f][ti, ai, s0 : s0 + len(v)] = v
    return arrays


def summarize(arrays, fields, A, T, seeds, diverged_field):
    """Grid, per-cell diverged counts, and the mean and std over seeds of each field, (b, a).

    Diverged runs hold NaN and are left out of the means; a cell whose runs all diverged is NaN.
    """
    summary = {
        "A": np.array(A, dtype=float),
        "T": np.array(T, dtype=float),
        "seeds": np.array(seeds),
        "diverged": (arrays[diverged_field] >= 0).sum(axis=2),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of an all-NaN cell: NaN
        for f in fields:
            summary[f + "_mean"] = np.nanmean(arrays[f], axis=2)
            summary[f + "_std"] = np.nanstd(arrays[f], axis=2)
    return summary


def print_table(summary, digits=2):
    """Mean final training / validation accuracy per cell, one row per T; a cell with diverged
    runs (left out of its means) is marked ``!k``, k the number of diverged runs."""
    A, div = summary["A"], summary["diverged"]
    print("mean train / val accuracy; rows T, columns A = " + " ".join(f"{a:g}" for a in A))
    for ti, T in enumerate(summary["T"]):
        cells = []
        for ai in range(len(A)):
            cell = (
                f"{summary['train_acc_mean'][ti, ai]:.{digits}f}/"
                f"{summary['val_acc_mean'][ti, ai]:.{digits}f}"
            )
            cells.append(cell + (f"!{div[ti, ai]}" if div[ti, ai] else ""))
        print(f"T={T:>6g}: {' '.join(cells)}")
    if div.any():
        print(
            f"!k: k runs of that cell diverged and are left out of its means ({div.sum()} in all)"
        )
