"""The experiment apparatus: what turns the core into reproducible experiments.

cli.py            the entry point of both scripts: input checks, one-line refusals, exit codes
schemas.py        what every stored settings file must hold, checked on every read
memory.py         what each command allocates, estimated before it runs (refusals, SLURM sizes)
signals.py        SIGTERM and Ctrl-C: a flag, and a stop at the next safe point
storage.py        atomic writes, the identity of an output folder, locks, versions
sweeps.py         resumable units of work: shards, resume, merge
workers.py        worker processes that spread independent jobs over the CPU cores
statistics.py     intervals over seeds, paired differences, bootstrap, phase-diagram summaries
spiral_sweeps.py  the spiral's sweeps (Figs. 3-5) and run files
tracker.py        the spectra tracker along a run (warm starts, replay, densities)
checks.py         the ``check`` command: every derivative against differences or dense solvers
                  (the machinery and the spiral MLP's rows)
check_myrtle5.py  its Myrtle5 rows: layers, network, R-operator, Nesterov, fused and CUDA copies
cifar_runs.py     a Fig. 1 run around protocol.train_epoch: settings, data, checkpoints, resume
cifar_files.py    the CIFAR-10 archive reader (md5-checked, safe unpickling)
digits.py         scikit-learn's handwritten digits as a small real data set
synthetic.py      synthetic CIFAR-like data in the official format (tests, demos)
onset.py          the onset experiment's runs: lambda_max and the period-two mode at every step
onset_analysis.py its analysis: cascades, thresholds, the merge, the fits
rule.py           the Fig. 4 rule read as a detector: its settings against the threshold
plots.py          every figure

Nothing in the top-level core imports from here.
"""

import os

os.environ["MPLBACKEND"] = "Agg"  # figures are files only; an unusable MPLBACKEND breaks the import
