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
PAIRED_FIELDS = ("train_acc", "val_acc")  # compared with the static loss (A = 1) seed by seed
CONFIDENCE = 0.95  # of the paired intervals


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


def prepare(out, config, grow=()):
    """Create OUT/units and OUT/sweep.json; refuse a folder that holds a different sweep.

    ``config`` holds only what defines the results (grid, seeds, steps, ...), never how the
    work is split (shard, device, batch size), so every shard writes the same sweep.json.
    grow : keys of list values that may grow: a config whose only differences are such lists
    extending the stored ones (the stored list is their start, e.g. more seeds) continues the
    sweep, and sweep.json records the longer lists.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out!r} is a file, not a folder")
    path = os.path.join(out, "sweep.json")
    owner = folder_owner(out)
    if owner is not None and not os.path.exists(path):
        raise InputError(f"{out} holds a {owner['kind']} run, not a sweep: use another --out")
    if os.path.exists(path):
        old, new = load_config(out), json.loads(json.dumps(config))
        diff = differing(old, new)
        extends = all(
            k in grow
            and isinstance(old.get(k), list)
            and isinstance(new.get(k), list)
            and new[k][: len(old[k])] == old[k]
            for k in diff
        )
        if diff and not extends:
            raise InputError(
                f"{out} holds a different sweep (differs in: {', '.join(diff)}); use another --out"
            )
    os.makedirs(os.path.join(out, "units"), exist_ok=True)
    write_json(path, config)


def load_config(out, kind=None):
    """The sweep.json of a sweep folder (InputError naming the file when it is unreadable, or
    when the sweep is not of ``kind``)."""
    path = os.path.join(out, "sweep.json")
    if not os.path.exists(path):
        raise InputError(f"{out} is not a sweep folder (no sweep.json)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path} is unreadable ({type(err).__name__}): not a sweep") from None
    if not isinstance(config, dict):
        raise InputError(f"{path} holds no sweep settings")
    if kind is not None and config.get("kind") != kind:
        raise InputError(f"{out} holds a {config.get('kind', 'unknown')} sweep, not a {kind} one")
    return config


def unit_path(out, name):
    """Where unit ``name`` is stored."""
    return os.path.join(out, "units", f"{name}.npz")


def check_unit(arrays, expect):
    """None if ``arrays`` has every field of ``expect`` ({field: shape, or a callable that
    takes the array and says whether it is right}), else what is wrong, in a few words."""
    for field, want in (expect or {}).items():
        if field not in arrays:
            return f"no field {field!r}"
        a = arrays[field]
        ok = want(a) if callable(want) else a.shape == tuple(want)
        if not ok:
            return f"field {field!r} has shape {a.shape}, dtype {a.dtype}"
    return None


def read_unit(out, name, expect=None):
    """(arrays, None) for a stored unit that reads and validates, else (None, reason)."""
    path = unit_path(out, name)
    if not os.path.exists(path):
        return None, "missing"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:  # truncated, empty, not a zip, a bad CRC: any unreadable file
        return None, f"unreadable ({type(err).__name__})"
    problem = check_unit(arrays, expect)
    return (None, problem) if problem else (arrays, None)


def pending(out, names, expect=None, say=print):
    """The names among ``names`` whose results are not on disk or do not validate (they are
    redone, and each stored one that does not validate is named through ``say``), in order.
    expect : callable name -> the ``expect`` of :func:`check_unit`."""
    todo = []
    for n in names:
        arrays, why = read_unit(out, n, expect and expect(n))
        if arrays is None:
            todo.append(n)
            if why != "missing":
                say(f"unit {unit_path(out, n)} is {why}: redoing it")
    return todo


def save_unit(out, name, arrays):
    """Store one finished unit atomically."""
    atomic_savez(unit_path(out, name), **arrays)


def load_units(out, names, expect=None):
    """Load every unit; refuse with the count (and a few names) of those still missing, or name
    the first stored unit that does not validate."""
    result, missing = {}, []
    for n in names:
        arrays, why = read_unit(out, n, expect and expect(n))
        if arrays is None and why == "missing":
            missing.append(n)
        elif arrays is None:
            raise InputError(
                f"unit {unit_path(out, n)} is {why}: rerun the sweep's command to redo it"
            )
        result[n] = arrays
    if missing:
        raise InputError(
            f"{len(missing)} of {len(names)} units are not done yet in {out} "
            f"(e.g. {', '.join(missing[:3])}): run the remaining shards first"
        )
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
    """Grid, per-cell diverged counts, the mean and std over seeds of each field, (n_T, n_A), and,
    when A = 1 is in the grid, the paired differences to it of PAIRED_FIELDS
    (:func:`paired_differences`).

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
        if 1.0 in A:
            for f in PAIRED_FIELDS:
                mean, lo, hi, n = paired_differences(arrays[f], list(A).index(1.0))
                summary.update({f"{f}_diff_mean": mean, f"{f}_diff_lo": lo, f"{f}_diff_hi": hi})
                summary[f"{f}_diff_n"] = n
    return summary


def mean_interval(values, confidence=CONFIDENCE):
    """The mean over the last axis (NaN left out) and its t interval mean +- t_{n-1} sd / sqrt(n)
    at ``confidence``, over the n finite values (NaN where n < 2). values : (..., S).
    Returns mean, lo, hi (...) float and n (...) int."""
    from scipy.stats import t as student_t

    values = np.asarray(values, dtype=np.float64)
    n = np.isfinite(values).sum(axis=-1)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # fewer than 2 values: NaN
        mean = np.nanmean(values, axis=-1)
        half = student_t.ppf(0.5 + confidence / 2, n - 1) * np.nanstd(values, axis=-1, ddof=1)
    half = np.where(n >= 2, half / np.sqrt(np.maximum(n, 1)), np.nan)
    return mean, mean - half, mean + half, n


def welch_difference(a, b, confidence=CONFIDENCE):
    """mean(b) - mean(a) of two independent samples over their last axis (NaN left out) and its
    Welch t interval: diff +- t_nu sqrt(va/na + vb/nb), nu from the Welch-Satterthwaite formula.
    a : (..., Sa), b : (..., Sb).  Returns diff, lo, hi (...) float (NaN where a side has < 2)."""
    from scipy.stats import t as student_t

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    na, nb = np.isfinite(a).sum(axis=-1), np.isfinite(b).sum(axis=-1)
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # fewer than 2 values: NaN
        ea = np.nanvar(a, axis=-1, ddof=1) / na  # squared standard errors of the two means
        eb = np.nanvar(b, axis=-1, ddof=1) / nb
        nu = (ea + eb) ** 2 / (ea**2 / (na - 1) + eb**2 / (nb - 1))
        diff = np.nanmean(b, axis=-1) - np.nanmean(a, axis=-1)
        half = student_t.ppf(0.5 + confidence / 2, nu) * np.sqrt(ea + eb)
    half = np.where((na >= 2) & (nb >= 2), half, np.nan)
    return diff, diff - half, diff + half


def paired_differences(values, static_index, confidence=CONFIDENCE):
    """The difference of every cell to the static cell (A = 1) of its row, seed by seed.

    values : (n_T, n_A, n_seeds), seed s the same initial network in every cell of a row;
    static_index : the A index of A = 1. For each cell, d_s = values[., ., s] - values[., static,
    s] over the seeds where both are finite: the mean of d and its paired t interval
    (:func:`mean_interval`). Returns mean, lo, hi (n_T, n_A) float and n (n_T, n_A) int.
    """
    d = values - values[:, static_index : static_index + 1, :]  # (n_T, n_A, n_seeds)
    return mean_interval(d, confidence)


def differing(old, new):
    """The keys whose values differ between two settings dicts (after a JSON round trip)."""
    old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


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
    if "val_acc_diff_mean" in summary:
        print(
            f"val acc minus val acc at A = 1, seed by seed: mean [{CONFIDENCE:.0%} paired t "
            "interval]; * where the interval excludes 0"
        )
        for ti, T in enumerate(summary["T"]):
            cells = []
            for ai in range(len(A)):
                m, lo, hi = (summary[f"val_acc_diff_{k}"][ti, ai] for k in ("mean", "lo", "hi"))
                mark = "*" if lo > 0 or hi < 0 else " "
                cells.append(
                    f"{m:+.{digits + 1}f} [{lo:+.{digits + 1}f},{hi:+.{digits + 1}f}]{mark}"
                )
            print(f"T={T:>6g}: {' '.join(cells)}")
