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

import os

import numpy as np

from apparatus import signals
from apparatus.cli import InputError
from apparatus.storage import (
    atomic_savez,
    check_claim,
    command_lock,
    differing,
    folder_lock,
    leftovers_only,
    read_json,
    unit_identity,
    write_json,
)

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


def prepare(out, config, grow=(), overwrite=False, work=None, union=()):
    """Claim ``out`` for a sweep: create OUT/units and write OUT/sweep.json, under the folder's
    lock; refuse (InputError, nothing written) a folder that holds another sweep or run, or
    files this tool did not write, unless ``overwrite`` (then units of the other sweep no longer
    match this one's identity and are redone).

    ``config`` holds only what defines the results (grid, seeds, steps, ...), never how the
    work is split (shard, device, batch size), so every shard writes the same sweep.json.
    grow : keys of list values that may grow: a config whose only differences are such lists
    extending the stored ones (the stored list is their start, e.g. more seeds) continues the
    sweep, and sweep.json records the longer lists.
    work : what distinguishes this command's share of the work (the shard): a second process
    doing the same share is refused (storage.command_lock).
    union : keys of lists this command adds to (the onset sweep's conditions): the stored list
    and this one's new items, read and written under the folder's lock, so that two commands
    adding conditions at once both land.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out!r} is a file, not a folder")
    kind = config["kind"]
    check_claim(out, kind, config, overwrite, grow, union)
    if leftovers_only(out):
        print(f"{out} holds only this tool's leftovers (locks, temporary files): taking it over")
    os.makedirs(out, exist_ok=True)
    if work is not None:
        command_lock(out, {"sweep": unit_identity(config, ""), "work": work})
    with folder_lock(out):
        old = check_claim(out, kind, config, overwrite, grow, union)  # again: another process
        merged = dict(config)  # may have claimed or grown it meanwhile
        same_sweep = old is not None and set(differing(old, config)) <= set(grow) | set(union)
        for k in grow if same_sweep else ():  # a longer list the sweep already has is kept
            if len(old[k]) > len(config[k]) and old[k][: len(config[k])] == config[k]:
                merged[k] = old[k]
        for k in union if old is not None and not overwrite else ():
            merged[k] = old[k] + [item for item in config[k] if item not in old[k]]
        write_json(os.path.join(out, "sweep.json"), merged)
    os.makedirs(os.path.join(out, "units"), exist_ok=True)
    return merged


def load_config(out, kind=None):
    """The sweep.json of a sweep folder, checked against its declaration (apparatus/schemas.py):
    InputError naming the file and the field when it does not fit, or when the sweep is not of
    ``kind``."""
    from apparatus import schemas

    path = os.path.join(out, "sweep.json")
    if not os.path.exists(path):
        raise InputError(f"{out} is not a sweep folder (no sweep.json)")
    config = read_json(path)
    schemas.validate_sweep(config, path)
    if kind is not None and config["kind"] != kind:
        raise InputError(f"{out} holds a {config['kind']} sweep, not a {kind} one")
    return config


def unit_path(out, name):
    """Where unit ``name`` is stored."""
    return os.path.join(out, "units", f"{name}.npz")


IDENTITY_FIELD = "_identity"  # the field of a unit holding storage.unit_identity of its sweep


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


def read_unit(out, name, expect=None, config=None):
    """(arrays, None) for a stored unit that reads, belongs to this sweep (its identity, from
    ``config``: the sweep.json, read when None) and validates, else (None, reason). The
    returned arrays hold the results only (no identity field). A safe point to stop at a
    signal (apparatus/signals.py)."""
    signals.check()
    path = unit_path(out, name)
    if not os.path.lexists(path):
        return None, "missing"
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:  # truncated, empty, not a zip, a bad CRC: any unreadable file
        return None, f"unreadable ({type(err).__name__})"
    config = load_config(out) if config is None else config
    stored = arrays.pop(IDENTITY_FIELD, None)
    if stored is None or stored.shape != () or str(stored) != unit_identity(config, name):
        return None, "from another sweep (its settings are not this sweep's)"
    problem = check_unit(arrays, expect)
    return (None, problem) if problem else (arrays, None)


def pending(out, names, expect=None, say=print):
    """The names among ``names`` whose results are not on disk, belong to another sweep or do
    not validate (they are redone, and each stored one that is not this sweep's result is named
    through ``say``), in order. expect : callable name -> the ``expect`` of :func:`check_unit`."""
    todo, config = [], load_config(out)
    for n in names:
        arrays, why = read_unit(out, n, expect and expect(n), config)
        if arrays is None:
            todo.append(n)
            if why != "missing":
                say(f"unit {unit_path(out, n)} is {why}: redoing it")
    return todo


def save_unit(out, name, arrays):
    """Store one finished unit atomically, with its identity in this sweep (an identity a copy
    from another unit carries is replaced)."""
    arrays = {k: v for k, v in arrays.items() if k != IDENTITY_FIELD}
    ident = unit_identity(load_config(out), name)
    atomic_savez(unit_path(out, name), **arrays, **{IDENTITY_FIELD: np.array(ident)})


def load_units(out, names, expect=None):
    """Load every unit; refuse with the count (and a few names) of those still missing, or name
    the first stored unit that does not validate or belongs to another sweep."""
    result, missing, config = {}, [], load_config(out)
    for n in names:
        arrays, why = read_unit(out, n, expect and expect(n), config)
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
            f"(e.g. {', '.join(missing[:3])}){_missing_shards(out, names, missing)}"
        )
    return result


SHARDS_FILE = "shards.json"  # the number of shards the sweep's sharded commands split it into


def note_shards(out, n):
    """Record that the sweep in ``out`` is split into n shards (for the merge's message)."""
    if n > 1:
        write_json(os.path.join(out, SHARDS_FILE), {"shards": n})


def _missing_shards(out, names, missing):
    """Which shards the missing units belong to, and how to redo them, when the sweep was
    sharded (:func:`note_shards`; names in the sweep's order, as :func:`shard` splits them)."""
    path = os.path.join(out, SHARDS_FILE)
    try:
        n = int(read_json(path)["shards"]) if os.path.exists(path) else 0
    except (InputError, KeyError, TypeError, ValueError):
        n = 0
    if n < 2:
        return ": run the remaining shards first"
    where = {n_: i for i, n_ in enumerate(names)}
    shards = sorted({where[m] % n for m in missing})
    listed = ",".join(str(k) for k in shards)
    return (
        f": shard(s) {listed} of {n} have not finished; rerun them (--shard i/{n}; on "
        f"SLURM: sbatch --array={listed} with SHARDS={n})"
    )


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
