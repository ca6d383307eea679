"""What the two command-line scripts share: one validation layer for numbers and for output
folders, one-line refusals, and the entry point.

Every bad input is refused before any work starts, in one line on stderr, with exit code 2 and
nothing written: argparse's own errors (an unknown option, a value that is not a number), the
typed options below (finite, in range, an integer where an integer is meant), the list parsers,
the output-folder check and the memory estimate, and the scripts' own checks, which raise
:class:`InputError`. A full disk or another failed write ends the run with one line (exit 1);
what was stored before is intact, since every result is written to a temporary file and renamed.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import signal
import sys

from apparatus import signals
from apparatus.signals import SIGNAL_EXIT

MAX_SEEDS = 100_000  # a seed list longer than this is a typo, not a sweep
MAX_SEED = 2**63 - 1  # NumPy's seeds are non-negative 64-bit integers (the settings files' bound)
MAX_AMPLITUDE = 1e9  # A: far beyond any experiment, and Gamma's arithmetic stays finite
MAX_PERIOD = 1e12  # T (steps): Gamma's t mod T stays exact in float64
MAX_RATE = 1e6  # a learning rate or a softplus beta
MIN_RATE = 1e-12  # ... and the smallest one (T0/eta and steps0/eta stay countable)
MAX_STEPS = 10**9  # steps of one run: a longer one is a typo (its logs alone would not fit)
MAX_PERTURBATION = 1e3  # the norm of a perturbation or a forcing per step
MAX_LIST = 10_000  # values in a grid list (--A, --T, --lrs, --widths)
MEMORY_FRACTION = 0.8  # a command may plan to use at most this share of the machine's memory
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NAME_MAX = 255  # bytes in one file or folder name (Linux file systems)
PATH_MAX = 4096  # bytes in a whole path (Linux)


class InputError(ValueError):
    """Bad user input (an option, a grid, a shard, a folder): reported in one line by
    :func:`fail`, before any work starts and with nothing written."""


def fail(script, msg, code=2):
    """Print ``script: error: msg`` as one line to stderr and exit (2: bad input)."""
    print(f"{script}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, like every other refusal here."""

    def error(self, message):
        fail(self.prog.split()[0], message)


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------


def _in_range(value, low, high, low_open, high_open=False):
    if low is not None and (value < low or (low_open and value == low)):
        return False
    return high is None or value < high or (not high_open and value == high)


def _bounds(low, high, low_open, kind, high_open=False):
    lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
    hi = "" if high is None else (f"< {high:g}" if high_open else f"<= {high:g}")
    what = "an integer" if kind is int else "a finite number"
    return f"{what} {' and '.join(b for b in (lo, hi) if b)}".strip()


def check_number(value, name, kind=float, low=None, high=None, low_open=False, high_open=False):
    """``value`` as ``kind`` if it is one (finite; an integer for int) within the bounds, else
    InputError naming the option."""
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            number = int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
        else:
            number = float(value)
    except (TypeError, ValueError, OverflowError):
        expected = _bounds(low, high, low_open, kind, high_open)
        raise InputError(f"{name}: expected {expected}, got {value!r}") from None
    finite = kind is int or math.isfinite(number)
    if not finite or not _in_range(number, low, high, low_open, high_open):
        raise InputError(
            f"{name} must be {_bounds(low, high, low_open, kind, high_open)}, got {value}"
        )
    return number


def number(kind=float, low=None, high=None, low_open=False, high_open=False):
    """An argparse ``type=``: a finite float (or an int) within the bounds; errors are one line."""

    def convert(text):
        try:
            return check_number(text, "value", kind, low, high, low_open, high_open)
        except InputError as err:  # argparse adds the option's name itself
            message = str(err).removeprefix("value: ").removeprefix("value ")
            raise argparse.ArgumentTypeError(message) from None

    convert.__name__ = "integer" if kind is int else "number"  # argparse names the type so
    return convert


AMPLITUDE = number(float, low=1, high=MAX_AMPLITUDE)  # 1 <= A (A = 1: the static loss)
PERIOD = number(float, low=1, high=MAX_PERIOD)  # T >= 1 step
COUNT = number(int, low=1)  # a positive integer
COUNT0 = number(int, low=0)  # a non-negative integer
SEEDS = number(int, low=1, high=MAX_SEEDS)  # a number of seeds
SEED = number(int, low=0, high=MAX_SEED)  # one seed
RATE = number(float, low=MIN_RATE, high=MAX_RATE)  # a learning rate
NONNEG = number(float, low=0)  # a finite number >= 0
FRACTION = number(float, low=0, high=1, high_open=True)  # in [0, 1), a momentum


def parse_items(text, name, convert):
    """'a,b,c' -> [convert(a), convert(b), convert(c)] in order: refuses an empty list, empty
    items ('1,,5'), more than MAX_LIST items, and items that are the same after ``convert``
    (its normal form: 10 and 10.0, float64 twice). convert(item, name) raises InputError."""
    items = str(text).split(",")
    if not str(text).strip():
        raise InputError(f"{name}: the list is empty")
    if any(not v.strip() for v in items):
        raise InputError(f"{name}: an empty item in {text!r}")
    if len(items) > MAX_LIST:
        raise InputError(f"{name}: {len(items)} values, more than {MAX_LIST}")
    values = [convert(v.strip(), name) for v in items]
    if len({repr(v) for v in values}) != len(values):
        raise InputError(f"{name}: repeated values in {text!r}")
    return values


def parse_list(text, name, kind=float, low=None, high=None, low_open=False):
    """'1,5,10' -> [1.0, 5.0, 10.0] (sorted, unique): every value finite and within the bounds;
    refuses empty lists, empty items ('1,,5'), unreadable or repeated values."""
    number = lambda v, n: check_number(v, n, kind, low, high, low_open)
    return sorted(parse_items(text, name, number))


def parse_choices(text, name, choices):
    """'a,b' -> ['a', 'b']: each one of ``choices``, none repeated (parse_items)."""

    def choice(v, n):
        if v not in choices:
            raise InputError(f"{n}: {v!r} is not one of {', '.join(choices)}")
        return v

    return parse_items(text, name, choice)


def parse_seeds(text, name):
    """'0,1,2' or '0-4' (inclusive) -> a list of distinct seeds >= 0, at most MAX_SEEDS."""
    text = str(text).strip()
    unreadable = InputError(f"{name}: cannot read {text!r} as seeds (e.g. 0, 0,1,2 or 0-9)")
    if "-" in text.strip("-") and "," not in text:
        try:
            a, b = (int(v) for v in text.split("-"))
        except ValueError:
            raise unreadable from None
        if a > b:
            raise InputError(f"{name}: the range {text!r} is empty")
        if b - a + 1 > MAX_SEEDS:
            raise InputError(f"{name}: {b - a + 1} seeds, more than {MAX_SEEDS}")
        seeds = list(range(a, b + 1))
    else:
        items = text.split(",")
        if any(not v.strip() for v in items):
            raise InputError(f"{name}: an empty item in {text!r}")
        if len(items) > MAX_SEEDS:
            raise InputError(f"{name}: {len(items)} seeds, more than {MAX_SEEDS}")
        try:
            seeds = [int(v) for v in items]
        except ValueError:
            raise unreadable from None
    if not seeds:
        raise InputError(f"{name}: give at least one seed")
    if min(seeds) < 0 or max(seeds) > MAX_SEED:
        raise InputError(f"{name}: seeds must be from 0 to 2**63 - 1, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise InputError(f"{name}: repeated seeds in {text!r}")
    return seeds


# ---------------------------------------------------------------------------------------------
# Output folders and memory
# ---------------------------------------------------------------------------------------------


def check_out_dir(path, name="--out"):
    """Refuse, before any work, an output folder that cannot take results: an empty path, a
    file, a path under a file, a folder (or the nearest existing parent of a new one) this
    process cannot write to. Creates nothing."""
    if not str(path).strip():
        raise InputError(f"{name} is empty: give a folder for the results")
    if os.path.islink(path) and not os.path.exists(path):
        raise InputError(f"{name} {path!r} is a symbolic link to nothing: give a folder")
    path = os.path.abspath(path)
    for part in path.split(os.sep):
        if len(os.fsencode(part)) > NAME_MAX:
            raise InputError(f"{name}: the name {part[:40]!r}... is longer than {NAME_MAX} bytes")
    if len(os.fsencode(path)) >= PATH_MAX:
        raise InputError(f"{name}: the path is longer than {PATH_MAX} bytes")
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        where = "is a file" if probe == path else f"lies under the file {probe}"
        raise InputError(f"{name} {path!r} {where}, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{name}: cannot write to {probe}")


def backend(device):
    """The array module for ``device`` in {"cpu", "gpu"}; "gpu" needs CuPy and a GPU."""
    import numpy as np

    if device == "cpu":
        return np
    if device == "gpu":
        try:
            import cupy
        except ImportError as err:
            raise RuntimeError(
                "--device gpu needs CuPy: pip install -r requirements-gpu.txt"
            ) from err
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("--device gpu: CuPy found no GPU")
        return cupy
    raise ValueError(f"unknown device {device!r}; choose cpu or gpu")


def checked_backend(device):
    """:func:`backend`, its failures (no CuPy, no GPU) as one-line input errors."""
    try:
        return backend(device)
    except (RuntimeError, ValueError) as err:
        raise InputError(str(err)) from None


def physical_memory():
    """Bytes of memory of this machine (None where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(nbytes, what):
    """Refuse a command whose arrays would need more than MEMORY_FRACTION of the memory."""
    total = physical_memory()
    if total and nbytes > MEMORY_FRACTION * total:
        raise InputError(
            f"{what} needs about {nbytes / 2**30:.3g} GiB, more than {MEMORY_FRACTION:.0%} of "
            f"this machine's {total / 2**30:.3g} GiB"
        )


# ---------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------


_HELD = []  # descriptors of the locks the running command holds (storage.command_lock)


def hold(fd):
    """Keep the lock on descriptor ``fd`` until the command run by :func:`run_main` ends."""
    _HELD.append(fd)


def _release_held():
    while _HELD:
        os.close(_HELD.pop())  # closing a descriptor releases its flock


def progress_note():
    """Where the newest live progress bar stands, e.g. " at 1,234 of 30,000 net-steps", or ""."""
    try:
        from tqdm import tqdm
    except ImportError:
        return ""
    bars = [b for b in list(getattr(tqdm, "_instances", [])) if b.total]
    note = f" at {int(bars[-1].n):,} of {int(bars[-1].total):,} {bars[-1].unit}s" if bars else ""
    for bar in bars:
        bar.close()  # ends the bar's line, so that the message starts its own
    return note


def command(check):
    """Declare a command's function together with its check: ``check(args)`` validates every
    input of the command (numbers, lists, folders, stored settings) and returns the plan, a dict
    with the validated values, ``memory`` (the bytes the command will allocate,
    apparatus/memory.py) and ``what`` (what needs it); :func:`run_main` refuses a plan above
    MEMORY_FRACTION of the machine, and only then calls ``func(args, plan)``. A command without
    a check does not run (tests/test_refusals.py walks every subcommand)."""

    def declare(func):
        func.check = check
        return func

    return declare


def run_main(parser, argv, script, default_argv=None, errors=(InputError,)):
    """Parse ``argv`` (``default_argv`` when it is empty), run the chosen command's ``func``;
    the command's check runs first (:func:`command`); the ``errors`` the check or the command
    raise become one-line refusals (exit 2), a failed write (a full disk) one
    line saying what is safe (exit 1), running out of memory one line (exit 1), SIGINT (Ctrl-C)
    and SIGTERM (a SLURM time limit) one line saying where the work stopped, what was stored and
    that a rerun resumes it (exit 130 / 143; apparatus/signals.py). Returns the command's exit
    code: 0, or the int its ``func`` returns; 2 (with the help) without one."""
    args = parser.parse_args(argv if argv or default_argv is None else default_argv)
    if args.command is None:
        parser.print_help()
        return 2
    if hasattr(args, "out_for"):  # a default --out that depends on other options
        args.out_given = args.out is not None
        args.out = args.out if args.out_given else vars(args).pop("out_for")(args)
        vars(args).pop("out_for", None)  # not an option: config.json records the options
    previous = signals.install()
    safe = "results stored before are intact (every file is written whole, then renamed)"
    try:
        check = getattr(args.func, "check", None)
        if check is None:
            raise RuntimeError(f"command {args.command!r} has no check (apparatus/cli.command)")
        plan = check(args)
        check_memory(plan["memory"], plan["what"])
        code = args.func(args, plan)
        if signals.requested():  # it came while the last of the work was done: all is stored
            raise signals.Interrupted(signals.requested(), "the command had finished its work")
    except errors as err:
        fail(script, str(err))
    except signals.Interrupted as stop:
        name = signal.Signals(stop.signum).name
        kept = f"; {stop.stored}" if stop.stored else ""
        fail(
            script,
            f"interrupted by {name}{progress_note()}: the finished units and runs are stored"
            f"{kept}; rerun the same command to resume",
            SIGNAL_EXIT + stop.signum,
        )
    except MemoryError:
        fail(script, f"out of memory: {safe}; try a smaller setting or a larger machine", 1)
    except OSError as err:
        where = f" ({err.filename})" if err.filename else ""
        if err.errno in NO_SPACE:
            fail(script, f"no space left on the device{where}: {safe}; free space and rerun", 1)
        fail(script, f"{err.strerror or err}{where}: {safe}", 1)
    finally:
        _release_held()
        signals.restore(previous)
    return code if isinstance(code, int) else 0


def add_merge_command(sub, func, figure):
    """The ``merge`` subcommand of a phase sweep (both scripts)."""
    p = sub.add_parser("merge", help=f"combine the shards of a phase sweep; {figure}")
    p.add_argument("--out", required=True, help="sweep folder")
    p.set_defaults(func=func)
