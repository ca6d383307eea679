"""The experiment apparatus: what turns the core into reproducible experiments.

cli.py           input checks, one-line refusals, the entry point of both scripts
storage.py       atomic writes, the identity of an output folder, versions
sweeps.py        resumable units of work: shards, resume, merge
statistics.py    intervals over seeds, paired differences, bootstrap, phase-diagram summaries
spiral_sweeps.py the spiral's sweeps (Figs. 3-5) and run files
tracker.py       the spectra tracker along a run (warm starts, replay, densities)
cifar_runs.py    a Fig. 1 run around protocol.train_epoch: settings, data, checkpoints, resume
plots.py         every figure
digits.py        scikit-learn's handwritten digits as a small real data set
synthetic.py     synthetic CIFAR-like data in the official format (tests, demos)

Nothing in the top-level core imports from here.
"""

import os

os.environ["MPLBACKEND"] = "Agg"  # figures are files only; an unusable MPLBACKEND breaks the import
