"""What every stored settings file must hold: one declaration per file kind, checked on every read.

``sweep.json`` (a sweep's settings) and ``config.json`` (a run's kind and settings) are JSON
that a user may edit by hand. Before any command uses one, :func:`validate` checks its fields
against the declaration of its kind below: every required field present, of its type, within its
range; unknown fields refused. A violation is one line naming the file and the field (an
InputError: exit 2), raised before anything is written. The declarations are small validators
written here rather than a JSON-Schema library: the files are few and flat, and the messages
must name the option a user would recognise.
"""

from __future__ import annotations

import math

from apparatus.cli import MAX_AMPLITUDE, MAX_PERIOD, MAX_RATE, MAX_SEED, MIN_RATE, InputError


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def integer(low=None, high=None):
    """An integer within [low, high] (a JSON number without fraction; not true/false)."""

    def check(v):
        if not _is_int(v) or (low is not None and v < low) or (high is not None and v > high):
            bounds = "" if low is None else f" >= {low}"
            return f"expected an integer{bounds}, got {v!r}"
        return None

    return check


def number(low=None, low_open=False, high=None, high_open=False):
    """A finite number within its bounds."""

    def check(v):
        ok = (_is_int(v) or isinstance(v, float)) and math.isfinite(v)
        ok = ok and (low is None or v > low or (v == low and not low_open))
        ok = ok and (high is None or v < high or (v == high and not high_open))
        if not ok:
            lo = "" if low is None else f" {'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f" {'<' if high_open else '<='} {high:g}"
            return f"expected a finite number{lo}{hi}, got {v!r}"
        return None

    return check


def text(choices=None):
    """A string, one of ``choices`` when given."""

    def check(v):
        if not isinstance(v, str) or (choices is not None and v not in choices):
            what = "one of " + ", ".join(choices) if choices else "a string"
            return f"expected {what}, got {v!r}"
        return None

    return check


def boolean(v):
    return None if isinstance(v, bool) else f"expected true or false, got {v!r}"


def nullable(inner):
    """null, or what ``inner`` accepts."""
    return lambda v: None if v is None else inner(v)


def list_of(inner, unique=False):
    """A non-empty list of items ``inner`` accepts, distinct when ``unique``."""

    def check(v):
        if not isinstance(v, list) or not v:
            return f"expected a non-empty list, got {v!r}"
        for i, item in enumerate(v):
            problem = inner(item)
            if problem:
                return f"item {i}: {problem}"
        if unique and len({repr(x) for x in v}) != len(v):
            return "expected distinct values"
        return None

    return check


def mapping(schema):
    """A JSON object whose fields ``schema`` declares ({name: validator}; names ending in '?'
    are optional)."""
    return lambda v: check_fields(v, schema)


def check_fields(obj, schema):
    """None, or the first problem of ``obj`` against ``schema``, naming its field."""
    if not isinstance(obj, dict):
        return f"expected an object, got {type(obj).__name__}"
    fields = {name.rstrip("?"): (check, name.endswith("?")) for name, check in schema.items()}
    for name, (validator, optional) in fields.items():
        if name not in obj:
            if optional:
                continue
            return f"field {name!r} is missing"
        problem = validator(obj[name])
        if problem:
            return f"field {name!r}: {problem}"
    unknown = sorted(set(obj) - set(fields))
    return f"unknown field {unknown[0]!r}" if unknown else None


def validate(obj, schema, where):
    """Raise InputError naming ``where`` (a file) and the field when ``obj`` does not fit."""
    problem = check_fields(obj, schema)
    if problem:
        raise InputError(f"{where}: {problem}: fix or remove the file (see docs/formats.md)")


# ---------------------------------------------------------------------------------------------
# The declarations
# ---------------------------------------------------------------------------------------------

SEEDS = list_of(integer(0, MAX_SEED), unique=True)
COUNT, COUNT0 = integer(1), integer(0)
RATE = number(MIN_RATE, high=MAX_RATE)  # the command line's bounds (apparatus/cli.py)
AMPLITUDE = number(1, high=MAX_AMPLITUDE)
PERIOD = number(1, high=MAX_PERIOD)
INITS, LOSSES = ("standard", "glorot"), ("ce", "mse")
VAL_SETS = ("uniform", "inner", "outer", "reseed")
SPIRAL_COMMON = {"init": text(INITS), "loss": text(LOSSES), "seeds": SEEDS}
SPIRAL_RUN = {  # the settings of a spiral run: train (and dynamics)
    **SPIRAL_COMMON,
    "width": COUNT,
    "A": AMPLITUDE,
    "T": PERIOD,
    "steps": COUNT,
    "lr": RATE,
    "log_every": COUNT,
    "val_every": nullable(COUNT),
    "no_stop": boolean,
    "val": text(VAL_SETS),
}
PROTOCOL = {  # the Fig. 1 protocol's settings (apparatus/cifar_runs.resolve_settings)
    "data": text(("cifar10", "synthetic", "digits")),
    "md5": nullable(text()),
    "synthetic_train": nullable(COUNT),
    "synthetic_test": nullable(COUNT),
    "image_size": nullable(COUNT),
    "data_seed": nullable(COUNT0),
    "digits_train": nullable(COUNT),
    "epochs": COUNT,
    "batch": COUNT,
    "lr_peak": RATE,
    "lr_final": number(0),
    "peak_epoch": number(0, low_open=True),
    "stop_epoch": number(0),
    "momentum": number(0, high=1, high_open=True),
    "channels": COUNT,
    "dtype": text(("float32", "float64")),
    "train_eval_every": COUNT0,
    "eval_batch": COUNT,
    "data_fingerprint?": text(),
}
CONDITION = {  # one condition of an onset sweep (apparatus/onset.py)
    "T0": PERIOD,
    "lr": RATE,
    "dtype": text(("float64", "float32")),
    "noise": number(0),
    "beta": nullable(RATE),
    "force?": number(0),
}
SWEEPS = {  # sweep.json, by kind
    "spiral-phase": {
        **SPIRAL_COMMON,
        "width": COUNT,
        "A": list_of(AMPLITUDE, unique=True),
        "T": list_of(PERIOD, unique=True),
        "seed_block": COUNT,
        "steps": COUNT,
        "lr": RATE,
        "stop_last_period": boolean,
        "val": text(VAL_SETS),
    },
    "spiral-dynamics": {
        **SPIRAL_RUN,
        "hess_every": COUNT,
        "ntk_every": COUNT0,
        "top_k": COUNT,
    },
    "spiral-threshold": {
        **SPIRAL_COMMON,
        "widths": list_of(COUNT, unique=True),
        "lrs": list_of(RATE, unique=True),
        "A": AMPLITUDE,
        "T0": PERIOD,
        "steps0": COUNT,
        "static_steps": COUNT,
        "hess_every": COUNT,
        "val": text(VAL_SETS),
    },
    "spiral-onset": {
        **SPIRAL_COMMON,
        "width": COUNT,
        "A": AMPLITUDE,
        "periods": COUNT,
        "conditions": list_of(mapping(CONDITION)),
    },
    "cifar-phase": {
        **PROTOCOL,
        "A": list_of(AMPLITUDE, unique=True),
        "T": list_of(PERIOD, unique=True),
        "seeds": SEEDS,
    },
}
RUNS = {  # the "settings" of a run's config.json, by kind
    "spiral-train": SPIRAL_RUN,
    "spiral-density": {
        **SPIRAL_RUN,
        "at": list_of(COUNT0, unique=True),
        "probes": COUNT,
        "lanczos_steps": COUNT,
    },
    "cifar-train": {
        **PROTOCOL,
        "A": AMPLITUDE,
        "T": PERIOD,
        "seed": integer(0, MAX_SEED),
        "hess_every": COUNT0,
        "hess_batch": nullable(COUNT),
    },
}


def validate_sweep(obj, where):
    """A sweep.json: an object with a known ``kind`` and the fields of that kind."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if not isinstance(kind, str) or kind not in SWEEPS:
        kinds = ", ".join(SWEEPS)
        raise InputError(f"{where}: field 'kind': expected one of {kinds}, got {kind!r}")
    validate(obj, {"kind": text(), **SWEEPS[kind]}, where)


def validate_run(obj, where):
    """A run's config.json: a known ``kind`` and ``settings`` with that kind's fields (the rest
    of the file is a record for people, not read back)."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if not isinstance(kind, str) or kind not in RUNS:
        raise InputError(f"{where}: field 'kind': expected one of {', '.join(RUNS)}, got {kind!r}")
    problem = check_fields(obj.get("settings"), RUNS[kind])
    if problem:
        raise InputError(f"{where}: field 'settings': {problem}: fix or remove the file")
