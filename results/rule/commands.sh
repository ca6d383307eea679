#!/bin/bash
# The Fig. 4 rule read as a detector (docs/onset.md, "The threshold of Figs. 4-5"): the Fig. 4
# runs again with lambda_max at every step (the same trajectories: the tracker does not change
# training), the Fig. 5 sweep, then the rule at other jumps and strides. Run from the repository
# root; each command resumes; about 2.5 hours on 2 cores in all (Fig. 5: 2 hours).
set -eu
python run_spiral.py dynamics --seed 0-9 --hess-every 1 --ntk-every 0 --zoom-every 0 --out runs/fig4-every-step
python run_spiral.py threshold --seed 0-9 --out runs/fig5
python run_spiral.py rule --every-step runs/fig4-every-step --fig5 runs/fig5 --out results/rule
