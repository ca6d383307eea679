"""What the two command-line scripts share: one-line refusals, list parsers, output-folder checks.

Every bad input is refused before any work starts, in one line on stderr, with exit code 2:
argparse's own errors (an unknown option, a value of the wrong type) as well as the checks of
the scripts, which raise :class:`InputError`.
"""

from __future__ import annotations

import argparse
import os
import sys


class InputError(ValueError):
    """Bad user input (an option, a grid, a shard, a folder): reported in one line by
    :func:`fail`, before any work starts and with nothing written."""


def fail(script, msg):
    """Print ``script: error: msg`` as one line to stderr and exit 2."""
    print(f"{script}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, like every other refusal here."""

    def error(self, message):
        fail(self.prog.split()[0], message)


def parse_list(text, name, kind=float):
    """'1,5,10' -> [1.0, 5.0, 10.0] (sorted, unique); refuses empty or unreadable lists."""
    try:
        values = [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{name}: cannot read {text!r} as a comma-separated list") from None
    if not values:
        raise InputError(f"{name}: the list is empty")
    if len(set(values)) != len(values):
        raise InputError(f"{name}: repeated values in {text!r}")
    return sorted(values)


def parse_int_list(text, name):
    """'0,1,2' or '0-4' (inclusive) -> list of ints."""
    try:
        if "-" in text.strip("-") and "," not in text:
            a, b = text.split("-")
            return list(range(int(a), int(b) + 1))
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{name}: cannot read {text!r} as integers (e.g. 0,1,2 or 0-9)") from None


def check_out_dir(path):
    """Refuse an output path that is an existing file (before any work)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"--out {path!r} is a file, not a folder")


def run_main(parser, argv, script, default_argv=None, errors=(InputError,)):
    """Parse ``argv`` (``default_argv`` when it is empty), run the chosen command's ``func`` and
    turn the ``errors`` it raises into one-line refusals (exit 2). Returns 0, or 2 (with the
    help) when no command was given."""
    args = parser.parse_args(argv if argv or default_argv is None else default_argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        args.func(args)
    except errors as err:
        fail(script, str(err))
    return 0


def add_merge_command(sub, func, figure):
    """The ``merge`` subcommand of a phase sweep (both scripts)."""
    p = sub.add_parser("merge", help=f"combine the shards of a phase sweep; {figure}")
    p.add_argument("--out", required=True, help="sweep folder")
    p.set_defaults(func=func)
