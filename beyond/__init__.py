"""Beyond the paper: the mathematics this project adds to the paper's, with its own derivations
and tests; the experiments that use it are in apparatus/ (onset.py, onset_analysis.py).

onset.py    where an instability begins: the period-two mode's amplitude, cascade entries,
            the linear map's growth, the forcing estimate
smooth.py   the smooth control network: softplus hidden units (beta -> infinity: ReLU)
density.py  the Hessian's whole spectrum: stochastic Lanczos quadrature, Hutchinson's trace

Nothing in the core (the top-level modules) imports from here.
"""
