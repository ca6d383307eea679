"""What a signal does: SIGTERM (a SLURM time limit, scancel, preemption) and SIGINT (Ctrl-C) set a
flag, and the work stops at its next safe point.

A handler that raised where the signal landed could land inside a library (np.savez, a figure,
the worker pool's bookkeeping) and end the command with a traceback. Here the handler only
records the signal (:func:`note`); the loops read the flag where stopping is safe: between
training steps (the progress callbacks), between the fast trainer's chunks, between units,
between Myrtle5 minibatches, in the worker pool's polling loop (:func:`check` raises
:class:`Interrupted` there). A job that can pause (the fast trainer's blocks) returns its state
instead, which the caller stores so that a rerun continues it. ``run_main`` (apparatus/cli.py)
turns Interrupted into one line and exit 128 + n.

Worker processes (apparatus/workers.py) set the same flag on SIGTERM, which their parent forwards;
they ignore SIGINT, which the terminal sends to the whole process group and the parent handles.

Before the heavy imports of a script, :func:`guard_startup` makes a signal end the process at
once with one line: there is nothing to store yet; after the command, :func:`ignore_after_work`
keeps the interpreter's exit quiet. Only during Python's own start-up (tens of milliseconds,
before the interpreter reaches the script's first line) does a signal take its default action.
"""

from __future__ import annotations

import os
import signal

SIGNAL_EXIT = 128  # a command ended by signal n exits with 128 + n (130: SIGINT, 143: SIGTERM)
STOPPING = (signal.SIGINT, signal.SIGTERM)
_FLAG = {"signum": 0}  # the first stopping signal received by this process (0: none)


class Interrupted(BaseException):
    """A stopping signal arrived and the work reached a safe point: raised by :func:`check`.
    ``stored`` says what the stop kept beyond the finished units (e.g. a checkpoint), or "".
    A BaseException, so that ``except Exception`` does not swallow it; every ``finally`` runs."""

    def __init__(self, signum, stored=""):
        super().__init__(signum)
        self.signum, self.stored = signum, stored


def note(signum, frame=None):
    """The signal handler: remember the first stopping signal, nothing else."""
    if not _FLAG["signum"]:
        _FLAG["signum"] = signum


def requested():
    """The stopping signal received (its number), or 0."""
    return _FLAG["signum"]


def check():
    """Raise :class:`Interrupted` if a stopping signal arrived: call where stopping is safe."""
    if _FLAG["signum"]:
        raise Interrupted(_FLAG["signum"])


def install():
    """Route SIGINT and SIGTERM to :func:`note`; returns the previous handlers."""
    return {s: signal.signal(s, note) for s in STOPPING}


def restore(previous):
    """Put back the handlers :func:`install` returned, and clear the flag."""
    for s, handler in previous.items():
        signal.signal(s, handler)
    _FLAG["signum"] = 0


def guard_startup(script):
    """Until :func:`install` runs: a stopping signal ends the process at once with one line
    (the script is still importing; nothing has been written)."""

    def leave(signum, frame):
        name = signal.Signals(signum).name
        os.write(2, f"{script}: error: interrupted by {name} while starting; nothing was written\n"
                 .encode())  # fmt: skip
        os._exit(SIGNAL_EXIT + signum)

    for s in STOPPING:
        signal.signal(s, leave)


def checking(progress=None):
    """A progress callback (n network-steps) that also stops at a signal: for loops that call
    their progress callback between steps (spiral.train_reference)."""

    def count(n):
        if progress is not None:
            progress(n)
        check()

    return count


def in_worker():
    """In a worker process: SIGTERM sets the flag (the parent forwards it), SIGINT is ignored."""
    _FLAG["signum"] = 0
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, note)


def ignore_after_work():
    """Once the command has returned: ignore further stopping signals while the interpreter
    exits (it would reset Python-level handlers to the default action there, and a signal in
    that instant would kill the process without a word after the work was done)."""
    for s in STOPPING:
        signal.signal(s, signal.SIG_IGN)
