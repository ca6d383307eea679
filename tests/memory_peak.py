"""python tests/memory_peak.py SCRIPT ARG...: a command's planned memory against its measured peak.

Imports SCRIPT (run_spiral.py or run_cifar.py) as a module, runs its command's check to read the
plan's memory estimate, then runs the command through its main; prints one line: the estimate,
this process's peak resident memory, the largest child's peak (worker processes), and the peak
after the imports (bytes, from resource.getrusage). tests/test_memory.py runs it in a
subprocess, so that each measurement starts from a fresh interpreter.
"""

import importlib
import os
import resource
import sys


def peak(who):
    return resource.getrusage(who).ru_maxrss * 1024  # Linux reports KiB


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    script, argv = sys.argv[1], sys.argv[2:]
    module = importlib.import_module(script.removesuffix(".py"))
    # Workers as threads, so that every job's arrays are in this process's peak: a forked
    # child's resident set counts the parent's pages it shares differently from one kernel to
    # another (the file-backed ones are not copied into its page tables at fork).
    from apparatus import workers

    workers._can_fork = lambda: False
    base = peak(resource.RUSAGE_SELF)
    args = module.build_parser().parse_args(argv)
    estimate = args.func.check(args)["memory"]
    code = module.main(argv)
    print(f"estimate={estimate} self={peak(resource.RUSAGE_SELF)} "
          f"child={peak(resource.RUSAGE_CHILDREN)} base={base} code={code}")  # fmt: skip


if __name__ == "__main__":
    main()
