"""Worker processes for the CPU: many independent jobs (blocks of networks, tracked runs) spread
over the cores, with one shared progress bar.

A step of the spiral trainer is many short NumPy calls, so threads are held back by the GIL;
forked processes with one BLAS thread each are not. Where fork is unavailable, threads are used;
on a GPU the jobs run one after another in this process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from threadpoolctl import threadpool_limits

from apparatus import signals

PROGRESS_POLL = 0.5  # seconds between progress-bar updates (and looks at the stop flag)
PAUSE_GRACE = 60  # seconds paused workers have to hand back their state after a signal
WORKERS = min(2, os.cpu_count() or 1)  # CPU worker processes: one per core, at most two

_WORKER = {}  # in a worker process: the shared progress counter and the parent's pid


def _worker_init(counter, parent):
    """Initialiser of a CPU worker process: one BLAS thread, the shared progress counter. A
    worker leaves Ctrl-C (SIGINT, which the terminal sends to the whole process group) to its
    parent; SIGTERM (from the parent, or from SLURM to every process of a job) sets its stop
    flag, which a pausable job reads between chunks (apparatus/signals.py)."""
    threadpool_limits(limits=1)
    signals.in_worker()
    _WORKER.update(counter=counter, parent=parent)


def _worker_progress(n):
    """Count n network-steps; a worker whose parent died (e.g. SIGKILL) stops at once."""
    with _WORKER["counter"].get_lock():
        _WORKER["counter"].value += n
    if os.getppid() != _WORKER["parent"]:
        os._exit(1)


def _worker_run(task):
    """Run one job in a worker process: task = (function, its positional arguments, pausable)."""
    fn, job, pause = task
    if pause:
        return fn(*job, progress=_worker_progress, should_pause=signals.requested)
    return fn(*job, progress=_worker_progress)


def _stop(pool):
    """End a pool's worker processes at once (SIGKILL: their jobs' results are not wanted) and
    release the pool without waiting for the jobs in flight."""
    for process in list(getattr(pool, "_processes", {}).values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _can_fork():
    """Worker processes by fork: Linux (elsewhere fork is unavailable or unsafe)."""
    return sys.platform.startswith("linux")


def _pause(pool, futures, done, first):
    """At a signal: ask the pool's workers to pause (SIGTERM), cancel the jobs not started, and
    pass what the running ones return (a result, or a paused state) to done(index, result)
    within PAUSE_GRACE seconds. futures[k] is job first + k. Returns the results (None where a
    job was cancelled or did not answer in time)."""
    for process in list(getattr(pool, "_processes", {}).values()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + PAUSE_GRACE
    results = []
    for k, future in enumerate(futures):
        result = None
        if not future.cancel():  # running or finished: wait for its answer
            with contextlib.suppress(TimeoutError, BrokenProcessPool, signals.Interrupted):
                result = future.result(timeout=max(0.0, deadline - time.monotonic()))
        if result is not None:
            done(first + k, result)
        results.append(result)
    return results


def run_jobs(fn, jobs, xp=np, workers=WORKERS, bar=None, done=None, pause=False):
    """[fn(*job, xp=xp, progress=...) for job in jobs], in ``workers`` processes on the CPU.

    fn : a module-level function (workers find it by name) taking ``progress``, a callable that
    counts network-steps for the progress bar ``bar`` (a tqdm or None). done : optional
    callable(index, result), called in this process as each job finishes, in order (to store
    results as they come). On the CPU the jobs go to worker processes (fork, one BLAS thread
    each): threads were held back by the GIL, since a step is many short NumPy calls. Where fork
    is unavailable, threads are used; on a GPU, one job after another in this process. A worker
    that dies (out of memory, a signal) raises ChildProcessError instead of a hang.

    Signals (apparatus/signals.py): without ``pause``, a SIGTERM or SIGINT stops the workers at
    once (their jobs' results are lost; the finished ones went to ``done``) and raises
    Interrupted. With ``pause``, fn also takes ``should_pause`` and returns a paused state when
    it says True: at a signal the workers are asked to pause, and the results come back with
    the paused states (None for jobs that had not started); the caller stores them."""
    count = bar.update if bar is not None else (lambda n: None)
    done = done or (lambda i, result: None)
    results = []
    parallel = xp is np and workers > 1 and len(jobs) > 1
    if parallel and _can_fork():
        ctx = multiprocessing.get_context("fork")
        counter = ctx.Value("q", 0)
        seen = 0
        pool = ProcessPoolExecutor(
            min(workers, len(jobs)), ctx, _worker_init, (counter, os.getpid())
        )
        try:
            futures = [pool.submit(_worker_run, (fn, job, pause)) for job in jobs]
            for future in futures:
                while True:
                    if signals.requested():
                        if not pause:
                            signals.check()
                        k = len(results)
                        results += _pause(pool, futures[k:], done, k)
                        _stop(pool)
                        return results
                    try:
                        results.append(future.result(timeout=PROGRESS_POLL))
                        break
                    except TimeoutError:
                        pass
                    except BrokenProcessPool:  # a worker was killed (out of memory, a signal)
                        raise ChildProcessError(
                            "a worker process died before its job ended"
                        ) from None
                    finally:
                        count(counter.value - seen)
                        seen = counter.value
                done(len(results) - 1, results[-1])
        except BaseException:  # an error, or a signal (Ctrl-C, SIGTERM): stop the workers now
            _stop(pool)
            raise
        pool.shutdown()
        return results
    if parallel:  # threads: with ``pause`` each job returns its paused state at a signal
        kw = {"should_pause": signals.requested} if pause else {}
        with threadpool_limits(limits=1), ThreadPoolExecutor(workers) as pool:
            for result in pool.map(lambda job: fn(*job, progress=count, **kw), jobs):
                results.append(result)
                done(len(results) - 1, result)
                if not pause:
                    signals.check()
        return results
    for job in jobs:
        if pause:
            if signals.requested():
                results.append(None)  # not started
                continue
            results.append(fn(*job, xp=xp, progress=count, should_pause=signals.requested))
        else:
            results.append(fn(*job, xp=xp, progress=signals.checking(count)))
        done(len(results) - 1, results[-1])
    return results
